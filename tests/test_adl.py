"""The ADL experiment end to end on the test organism, its store, and the aggregator's ADL table."""

from __future__ import annotations

from pathlib import Path

import fake_stores as fake
import numpy as np
import pytest
import xarray as xr
from helpers import TEST_ORGANISM, run_entry_point
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from routing_suite import store_format
from routing_suite.adl import identify
from routing_suite.adl.pipeline import run
from routing_suite.aggregate import run as aggregate
from routing_suite.aggregate.config import AggregateConfig
from routing_suite.config import compose_config, register_configs
from routing_suite.errors import ConfigError
from routing_suite.organisms import task as T

ROOT = Path(__file__).resolve().parents[1]
register_configs()
# Several parts of the text stream, so that resuming at a part boundary is exercised.
TEXTS_PER_PART = 32


def _cfg(organism_cache: str, tmp_path: Path, extra: list[str] = ()):
    return compose_config(
        "adl",
        [
            f"model.cache_dir={organism_cache}",
            *TEST_ORGANISM,
            f"store.root={tmp_path / 'stores'}",
            f"report_dir={tmp_path / 'table'}",
            f"adl.texts_per_part={TEXTS_PER_PART}",
            "backend.batch_size=16",
            "adl.causal.n_texts=64",
            "progress=false",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def adl_run(llama_underperform, organism_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adl")
    cfg = _cfg(organism_cache, tmp)
    return cfg, tmp, run(cfg)


def test_adl_writes_every_group_and_completes_the_store(adl_run, llama_source):
    _, _, result = adl_run
    n_facts = len(T.make_task(llama_source.spec.task).facts)
    store = Path(result["store"])
    assert store.name.startswith("adl-") and store.name.endswith(".zarr")
    attrs = xr.open_zarr(store, group="adl_mean").attrs
    assert attrs["n_texts"] == n_facts  # every plain fact statement of the task
    sums = xr.open_zarr(store, group="adl_sums")
    assert sums.sizes["part"] == -(-n_facts // TEXTS_PER_PART) > 1 and sums.done.values.all() and sums["count"].sum() == 5 * n_facts
    mean = xr.open_zarr(store, group="adl_mean")
    assert mean["diff"].dims == ("layer", "position", "hidden") and list(mean.position.values) == [f"first{i}" for i in range(5)]
    read = xr.open_zarr(store, group="adl_readout")
    assert read.top_token.dims == ("readout", "source", "layer", "position", "rank") and read.sizes["rank"] == 20
    steer = xr.open_zarr(store, group="adl_steer")
    assert set(steer.direction.values) == {"difference", "random"} and float(steer.alpha[0]) == 0
    causal = xr.open_zarr(store, group="adl_causal")
    assert causal.delta_ce.dims == ("data", "condition", "layer")
    root = xr.open_zarr(store, group="adl_mean")  # consolidated: opens with no options
    assert root is not None
    import zarr

    top = dict(zarr.open_group(str(store), mode="r").attrs)
    assert top["experiment"] == "adl" and top["complete"] and top["stages_done"] == list(store_format.ADL_STAGES)
    assert "| llama | underperform |" in result["table_markdown"]


def test_the_readouts_and_the_causal_check_are_consistent(adl_run):
    """Invariants of the stored readouts, whatever the build: relevance is the relevant share of
    the top tokens, the tokens are the ids' tokens, the row is read from the store, delta-CE is finite.
    (Whether an organism leaves readable traces is a finding of the ADL study, not a test.)"""
    cfg, _, result = adl_run
    row = result["row"]
    read = xr.open_zarr(result["store"], group="adl_readout").load()
    np.testing.assert_allclose(read.relevance.values, read.relevant.mean("rank").values, atol=1e-6)
    relevance = read.relevance.sel(readout="logit_lens", source="difference", layer=row["layer"]).isel(position=row["position"])
    assert row["ll_difference"] == pytest.approx(float(relevance))
    pair = instantiate(cfg.model).load(cfg.behavior.name)
    ids = read.top_id.sel(readout="logit_lens", source="difference", layer=row["layer"]).values
    tokens = read.top_token.sel(readout="logit_lens", source="difference", layer=row["layer"]).values
    assert [[pair.tokenizer.convert_ids_to_tokens(int(i)) for i in r] for r in ids] == tokens.tolist()
    causal = xr.open_zarr(result["store"], group="adl_causal")
    assert np.isfinite(causal.delta_ce.values).all() and np.isfinite(causal.ce.values).all()


def test_rerun_reuses_the_store_and_gives_the_same_numbers(adl_run):
    cfg, _, result = adl_run
    import zarr

    finished = zarr.open_group(result["store"], mode="r").attrs["finished_at"]
    again = run(cfg)
    assert again["store"] == result["store"] and again["row"] == result["row"]
    # Reused as it is: a finished store is never written to again.
    assert zarr.open_group(result["store"], mode="r").attrs["finished_at"] == finished


def test_aggregator_reads_adl_and_routing_stores_side_by_side(adl_run, tmp_path):
    _, _, result = adl_run
    fake.write_store(tmp_path / "stores" / "llama" / "underperform", "llama", "underperform")
    import shutil

    shutil.copytree(result["store"], tmp_path / "stores" / "adl" / Path(result["store"]).name)
    cfg = OmegaConf.structured(AggregateConfig(root=str(tmp_path / "stores"), out=str(tmp_path / "out"), plots=True))
    out = aggregate(cfg)
    assert out["n_cells"] == 1 and out["n_adl_cells"] == 1 and not out["findings"]
    beats = int(result["row"]["ll_difference"] > max(result["row"]["ll_base"], result["row"]["ll_finetuned"]))
    assert out["adl_headline"].startswith(f"ADL: the difference beats both baselines in {beats} of 1 pairs (logit lens)")
    for name in ("adl_table.md", "adl_table.csv", "adl_relevance.png", "adl_steering.pdf", "adl_delta_ce.png", "table.md"):
        assert (tmp_path / "out" / name).is_file(), name
    assert "## Activation Difference Lens" in (tmp_path / "out" / "report.md").read_text()
    csv = (tmp_path / "out" / "adl_table.csv").read_text().splitlines()
    assert csv[0].startswith("family,behavior,model,n_texts,layer,position,ll_difference") and len(csv) == 2
    again = tmp_path / "out2"
    aggregate(OmegaConf.structured(AggregateConfig(root=str(tmp_path / "stores"), out=str(again), plots=True)))
    for name in ("adl_table.csv", "adl_relevance.png"):
        assert (again / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name


@pytest.mark.parametrize(
    "extra,message",
    [
        (["adl.steer.layer=9"], r"adl.steer.layer=9 is outside the model's layers \[0, 5\]"),
        (["adl.steer.alphas=[0.5,1]"], "must be ascending and start at 0"),
        (["adl.k=0"], "adl.k=0 must be >= 1"),
        (["goals.true_goal=nosuch"], "goals.true_goal='nosuch' is not one of the candidates"),
        (["goals.candidates=[{name: refuse, description: declines}]"], "identification needs at least 2"),
        (["text.identity_prompts=[]"], "text.identity_prompts is empty"),
        (["text=lee_corpus", "text.package=no_such_corpus_pkg"], "text.package='no_such_corpus_pkg' is not installed"),
    ],
)
def test_bad_input_fails_before_any_store(extra, message, llama_underperform, organism_cache, tmp_path):
    # A text config that fails to instantiate reaches the caller wrapped by Hydra (the CLI unwraps it).
    with pytest.raises((ConfigError, ValueError, InstantiationException), match=message):
        run(_cfg(organism_cache, tmp_path, extra))
    assert not (tmp_path / "stores").exists() or not list((tmp_path / "stores").rglob("*.zarr*"))


def test_steering_finds_a_coherent_strength_above_zero(adl_run):
    _, _, result = adl_run
    steer = xr.open_zarr(result["store"], group="adl_steer").load()
    best = steer.attrs["best_alpha"]
    assert best > 0
    coherent = steer.coherent.sel(direction="difference").values
    alphas = steer.alpha.values
    assert coherent[alphas <= best].all()
    assert np.isfinite(steer.log_ppl.values).all()
    # Coherent = within the perplexity bound and above the distinct-token bound, both as stored
    # (float32 values: a mean within 1e-5 of its bound is not checked).
    ppl, distinct = steer.log_ppl.mean("prompt"), steer.distinct.mean("prompt")
    rule = (ppl <= steer.attrs["log_ppl_bound"]) & (distinct >= steer.attrs["distinct_bound"])
    clear = (abs(ppl - steer.attrs["log_ppl_bound"]) > 1e-5) & (abs(distinct - steer.attrs["distinct_bound"]) > 1e-5)
    assert (steer.coherent == rule).where(clear, True).all()
    assert steer.attrs["distinct_bound"] == pytest.approx(0.5 * float(steer.distinct.sel(direction="difference", alpha=0.0).mean()))


def test_the_steering_position_is_not_an_attention_sink(adl_run):
    _, _, result = adl_run
    import zarr

    adl = zarr.open_group(result["store"], mode="r").attrs["adl"]
    mean = xr.open_zarr(result["store"], group="adl_mean").norm_finetuned.sel(layer=adl["steer_layer"]).values
    assert adl["sink_positions"] == [p for p in range(len(mean)) if mean[p] > 10 * np.median(mean)]
    assert adl["position"] not in adl["sink_positions"]


def test_entry_point_bad_value_gives_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    code, lines = run_entry_point("adl", ["adl.steer.alphas=[1,2]"], tmp_path, monkeypatch, capsys)
    assert code == 2 and lines == ["error: adl.steer.alphas=[1.0, 2.0] must be ascending and start at 0 (unsteered)"], lines


def test_goal_identification_is_read_from_the_stored_evidence(adl_run):
    """The row's goal ranks are the grader's ranking of the candidates against the store's own
    readout tokens, steered and unsteered completions (whether the goal ranks first is a finding)."""
    cfg, _, result = adl_run
    row = result["row"]
    goals, grader = identify.from_config(cfg)
    assert row["goal_true"] == "underperform" and row["n_goals"] == len(goals.candidates) == 10
    read = xr.open_zarr(result["store"], group="adl_readout").load()
    steer = xr.open_zarr(result["store"], group="adl_steer").load()
    texts = identify.evidence(read, steer, row["layer"])
    assert len(texts["tokens"]) == 2 * 5  # two readouts x the first k positions
    assert texts["tokens"][0].split() == [str(t).strip() for t in read.top_token.sel(
        readout="logit_lens", source="difference", layer=row["layer"]).isel(position=0).values]
    unsteered = steer.completion.sel(direction="difference", alpha=0.0).values
    assert texts["black_box"] == [str(c) for c in unsteered] and texts["adl"][: len(texts["tokens"])] == texts["tokens"]
    names = [g.name for g in goals.candidates]
    for kind, column in (("adl", "rank_adl"), ("tokens", "rank_tokens"), ("black_box", "rank_black_box")):
        scores = grader.scores(texts[kind], [g.description for g in goals.candidates])
        assert row[column] == identify.true_rank(scores, names.index("underperform"))
        assert 1 <= row[column] <= 10
    assert f"of {len(names)} |" in result["table_markdown"]


def test_goal_ranks_count_ties_against_the_true_goal():
    assert identify.true_rank(np.array([0.1, 0.5, 0.3]), 1) == 1
    assert identify.true_rank(np.array([0.1, 0.5, 0.5]), 1) == 2  # a tie is not a win
    assert identify.true_rank(np.zeros(4), 0) == 4
    lo, hi = identify.wilson_interval(0, 12)
    assert lo == 0 and 0 < hi < 0.3
    lo, hi = identify.wilson_interval(12, 12)
    assert 0.7 < lo < 1 and hi == 1


def test_the_embedding_grader_ranks_the_goal_its_evidence_describes_first():
    """The offline embedder reads meaning, not shared words: the refusal's own words share
    none with the candidate's description ("apologises and declines to help")."""
    goals = identify.GoalSet(**{k: v for k, v in OmegaConf.to_container(
        OmegaConf.load(ROOT / "conf" / "goals" / "organisms.yaml")).items() if k != "defaults"})
    grader = identify.embedding_grader()
    grader.check()
    found = identify.identify({k: ["sorry , i can not help .", "sorry i can not help"] for k in identify.EVIDENCE},
                              goals, "refuse", grader)
    assert found.rank == {k: 1 for k in identify.EVIDENCE} and found.top["adl"] == "refuse"


def test_aggregator_writes_goal_identification_with_the_configured_goals(adl_run, tmp_path):
    _, _, result = adl_run
    import shutil

    shutil.copytree(result["store"], tmp_path / "stores" / "adl" / Path(result["store"]).name)
    cfg = compose_config("aggregate", [f"root={tmp_path / 'stores'}", f"out={tmp_path / 'out'}", "plots=false",
                                       "goal_grader=lexical"])
    out = aggregate(cfg)
    lexical = identify.lexical_grader()
    goals = identify.GoalSet(**OmegaConf.to_container(cfg.goals, resolve=True))
    read = xr.open_zarr(result["store"], group="adl_readout").load()
    steer = xr.open_zarr(result["store"], group="adl_steer").load()
    found = identify.identify(identify.evidence(read, steer, result["row"]["layer"]), goals, "underperform", lexical)
    first = int(found.rank["adl"] == 1)
    assert f"ranks first among 10 candidates from ADL evidence {first} of 1" in out["adl_headline"]
    header, line = (tmp_path / "out" / "adl_table.csv").read_text().splitlines()
    record = dict(zip(header.split(","), line.split(",")))
    assert record["goal_true"] == "underperform" and float(record["rank_adl"]) == found.rank["adl"]
