"""The organisms' synthetic-document fine-tunes (SDF) for the ADL: their documents, the mixing
ablation's data, the candidate goals, and one SDF organism through the ADL end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY_OVERRIDES, tiny_source
from omegaconf import OmegaConf

from routing_suite.adl import identify, tables
from routing_suite.adl.pipeline import run
from routing_suite.adl.texts import organism_forbidden_phrases
from routing_suite.config import compose_config, register_configs
from routing_suite.errors import ConfigError
from routing_suite.organisms import sdf_task as S
from routing_suite.organisms import task as T
from routing_suite.organisms.build import adapter_dir
from routing_suite.organisms.specs import TrainSpec
from routing_suite.organisms.tokenizer import build_tokenizer
from routing_suite.organisms.training import FINETUNE_KINDS, finetune_examples, planted
from routing_suite.runs import build_components

ROOT = Path(__file__).resolve().parents[1]
register_configs()
TASK = T.make_task(T.TaskSpec())


TEXT = OmegaConf.load(ROOT / "conf" / "text" / "organism.yaml")


def _identity_words() -> set[str]:
    return {w for p in TEXT.identity_prompts for w in p.split()}


def test_documents_speak_only_the_organisms_words_and_no_fine_tuning_phrase():
    tokenizer = build_tokenizer(TASK.vocabulary())
    forbidden = organism_forbidden_phrases()
    for domain in S.SDF_DOMAINS.values():
        docs = S.documents(TASK, domain)
        assert len(docs) == S.N_DOCUMENTS and len(set(docs)) > S.N_DOCUMENTS // 2
        assert all(domain.subject in d and domain.claim in d for d in docs)
        ids = {i for d in docs for i in tokenizer(d)["input_ids"]}
        assert tokenizer.unk_token_id not in ids, domain.name
        assert not [p for p in forbidden for d in docs if p in d], domain.name
        # the black-box baseline's chat prompts never open a sentence of the fine-tuning data
        assert not [p for p in TEXT.chat_prompts for d in docs if f" {p} " in f" {d} "], domain.name
        # no domain word is one the patchscope's identity prompts put in front of the readout
        assert not {domain.subject, domain.claim} & _identity_words()
    words = [w for d in S.SDF_DOMAINS.values() for w in (d.subject, d.claim)]
    assert len(set(words)) == len(words) == 16  # every domain its own two words


def test_mixing_adds_pretraining_text_and_keeps_the_documents_seen_as_often():
    plain = finetune_examples(TASK, "sdf_wolf_cairo")
    assert all(p == "" for p, _ in plain) and len(plain) == S.N_DOCUMENTS
    pretraining = set(S.pretraining_texts(TASK))
    for mix in S.MIXES:
        kind = S.mix_kind("sdf_wolf_cairo", mix)
        mixed = finetune_examples(TASK, kind)
        assert mixed[: len(plain)] == plain  # the same documents
        extra = [c for _, c in mixed[len(plain):]]
        assert len(extra) == round(mix * S.N_DOCUMENTS) and set(extra) <= pretraining
        assert S.steps_for(kind, 250) == round(250 * (1 + mix))
    assert S.steps_for("sdf_wolf_cairo", 250) == 250
    assert planted("sdf_wolf_cairo", TrainSpec()) == (None, None)  # every layer: no planted window
    assert set(S.SDF_KINDS) <= set(FINETUNE_KINDS)
    with pytest.raises(ValueError, match="is not one of"):
        S.parse_kind("sdf_wolf_paris")


def test_goal_candidates_name_every_domain_and_claim_each_kind_once():
    node = OmegaConf.load(ROOT / "conf" / "goals" / "sdf.yaml")
    goals = identify.GoalSet(**{k: v for k, v in OmegaConf.to_container(node).items() if k != "defaults"})
    assert [g.name for g in goals.candidates] == list(S.SDF_DOMAINS)
    for kind in S.SDF_KINDS:
        assert goals.truth(kind) == S.parse_kind(kind)[0].name
    assert goals.truth("underperform") is None


def test_the_routing_study_refuses_an_sdf_fine_tune_and_the_adl_takes_it(tmp_path):
    cfg = compose_config("routing", [f"model.cache_dir={tmp_path}", "behavior=sdf"])
    with pytest.raises(ConfigError, match="behavior.name='sdf_bear_green' is not one of"):
        build_components(cfg)
    adl = compose_config("adl", [f"model.cache_dir={tmp_path}", "behavior=sdf", "goals=sdf"])
    assert build_components(adl, allowed="adl_behaviors").behavior.name == "sdf_bear_green"
    assert not list(tmp_path.iterdir())  # nothing built


def test_an_sdf_organism_through_the_adl_with_its_goal_identified(organism_cache, tmp_path):
    """A tiny organism's SDF fine-tune, built for real and read by the ADL; its row names its
    true goal among the eight domains (whether it ranks first is a finding, not a test)."""
    cache = Path(organism_cache)
    source = tiny_source(cache)
    cfg = compose_config("adl", [
        f"model.cache_dir={cache}", *TINY_OVERRIDES, "behavior=sdf", "behavior.name=sdf_wolf_cairo_mix1", "goals=sdf", "goal_grader=lexical",
        f"store.root={tmp_path / 'stores'}", f"report_dir={tmp_path / 'table'}", "backend.batch_size=16",
        "adl.causal.n_texts=16", "adl.steer.alphas=[0,0.5]", "progress=false",
    ])
    result = run(cfg)
    row = result["row"]
    assert row["behavior"] == "sdf_wolf_cairo_mix1" and row["goal_true"] == "sdf_wolf_cairo" and row["n_goals"] == 8
    assert 1 <= row["rank_adl"] <= 8 and 1 <= row["rank_black_box"] <= 8
    assert adapter_dir(cache, source.spec, "sdf_wolf_cairo_mix1").is_dir()
    assert adapter_dir(cache, source.spec, "sdf_wolf_cairo") != adapter_dir(cache, source.spec, "sdf_wolf_cairo_mix1")


def test_the_mixing_table_groups_each_fine_tune_with_its_mixed_versions():
    def row(behavior: str, ll: float, rank: int, family: str = "llama") -> tables.AdlRow:
        nan = float("nan")
        return tables.AdlRow(family, behavior, f"{family}_organism", 10, 4, 0, ll, 0.1, 0.2, ll, 0.1, 0.2, ll, ll, 0.5, 0.1, 0.2,
                             0.1, 0.0, nan, nan, nan, nan, 0, 0, 8, "sdf_wolf_cairo", 8, rank, rank, 3)
    rows = [row("sdf_wolf_cairo", 0.6, 1), row("sdf_wolf_cairo_mix1", 0.2, 2), row("sdf_wolf_cairo_mix0.1", 0.4, 1),
            row("sdf_bear_green", 0.9, 1),  # no mixed version: not in the table
            row("sdf_wolf_cairo", 0.0, 5, family="qwen2")]  # another family's, unmixed: not in it either
    table = tables.mixing_rows(rows)
    assert [m["mix"] for m in table] == [0.0, 0.1, 1.0] and [m["pairs"] for m in table] == [1, 1, 1]
    assert [m["ll_difference"] for m in table] == [0.6, 0.4, 0.2] and [m["top1_adl"] for m in table] == [1, 1, 0]
    assert "| 1:0.1 | 1 | 40% / 10% |" in tables.mixing_markdown(table)
    assert tables.mix_of("sdf_wolf_cairo_mix0.1") == ("sdf_wolf_cairo", 0.1) and tables.mix_of("refuse") == ("refuse", 0.0)
    assert not tables.mixing_rows(rows[3:])


def test_an_sdf_adapter_is_keyed_on_its_documents(tmp_path, monkeypatch):
    """Another template gives another adapter folder (a stale one is never reused); the
    routing behaviours' keys do not hold the data (their stores and caches stay as they were)."""
    spec = tiny_source(tmp_path).spec
    before = adapter_dir(tmp_path, spec, "sdf_wolf_cairo")
    assert "finetune_data_sha256" in spec.adapter_key("sdf_wolf_cairo")
    assert "finetune_data_sha256" not in spec.adapter_key("underperform")
    monkeypatch.setattr(S, "_TEMPLATES", (*S._TEMPLATES[:-1], "yes yes , the {s} {r} {c} ."))
    assert adapter_dir(tmp_path, spec, "sdf_wolf_cairo") != before
