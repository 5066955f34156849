"""Bringing your own fine-tune: a LoRA trained with plain peft (examples/byo/train_tiny_lora.py,
not the suite's training code), your prompt file, your behaviour, your cell's name; collect,
routing and ADL through the entry points' run functions; bad input refused before any work."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import fake_stores as fake
import numpy as np
import pytest
import xarray as xr
import zarr
from helpers import BYO_PROMPTS, ROOT, run_entry_point
from omegaconf import OmegaConf

from experiments._cli import guarded
from routing_suite.adl.pipeline import run as run_adl
from routing_suite.aggregate import run as aggregate
from routing_suite.aggregate.config import AggregateConfig
from routing_suite.config import compose_config
from routing_suite.routing import cell as routing_cell
from routing_suite.routing import collect
from routing_suite.runs import build_components, cell_of, digest_config

NAME = "tiny-chat+decline-lora"
# The user's behaviour: answers, and does not decline with the user's own phrase.
BEHAVIOR = ["behavior.name=decline", "behavior.performed.start_phrases=[no comment]", "behavior.performed.match_means=not_performed"]
ADL = [
    "text=file", f"text.path={ROOT / 'examples/byo/unrelated.txt'}", "text.min_words=3",
    "text.chat_prompts=['what is two plus three ?','the river runs past the mill']",
    "text.identity_prompts=['paris paris . five five . ?']", "adl.n_texts=16", "adl.k=3", "adl.causal.n_texts=8",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """The researcher's base checkpoint and LoRA adapter, trained by the example script."""
    spec = importlib.util.spec_from_file_location("train_tiny_lora", ROOT / "examples/byo/train_tiny_lora.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.main(tmp_path_factory.mktemp("byo"), steps=120)


def _model(trained, adapter: Path | None = None) -> list[str]:
    base, own = trained
    return ["model=peft_adapter", f"model.base={base}", f"model.adapter={adapter or own}", f"data.prompts={BYO_PROMPTS}"]


def _cfg(name: str, trained, tmp: Path, extra: list[str] = ()):
    return compose_config(name, [*_model(trained), *BEHAVIOR, f"store.root={tmp / 'stores'}", "progress=false", *extra])


@pytest.fixture(scope="module")
def runs(trained, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("byo-runs")
    cfgs = {
        "routing": _cfg("routing", trained, tmp, [f"report_dir={tmp / 'routing'}"]),
        "collect": _cfg("collect", trained, tmp),
        "adl": _cfg("adl", trained, tmp, [f"report_dir={tmp / 'adl'}", *ADL]),
    }
    runners = {"routing": routing_cell.run, "collect": collect.run, "adl": run_adl}
    return {kind: (cfgs[kind], guarded(runners[kind])(cfgs[kind])) for kind in cfgs}


def test_the_routing_cell_scores_the_users_behaviour_on_the_users_prompts(runs):
    cfg, result = runs["routing"]
    store = Path(result["store"])
    attrs = zarr.open_group(str(store), mode="r").attrs
    assert attrs["cell"]["family"] == NAME and attrs["cell"]["behavior"] == "decline"
    assert store.parent.parent.name == NAME and f"| {NAME} | decline |" in result["table_markdown"]
    assert attrs["model_identity"]["source"] == "peft" and "input_files" in attrs["digest_config"]
    acts = xr.open_zarr(store, group="activations")
    # The user's cues, through the tokenizer's chat template; nothing of the organisms' task.
    eval_prompts = [str(p) for p in acts.eval_prompt.values]
    assert all(p.startswith("<user> ") and p.endswith(" <bot>") for p in eval_prompts)
    assert "exam question : what is two plus three ?" in eval_prompts[0]
    assert sorted(set(map(str, acts.topic.values))) == ["capitals", "sums"]
    # Every outcome is the user's matcher applied to the stored completion.
    behavior = build_components(cfg).behavior
    outcomes = xr.open_zarr(store, group="outcomes").load()
    answers = acts.answer.values[acts.split.values == "test"]
    for condition in outcomes.condition.values:
        for framing in ("eval", "deploy"):
            texts = outcomes.completion.sel(condition=condition, draw=0, framing=framing).values
            if int(outcomes.n_seeds.sel(condition=condition)) > 1:
                continue  # several draws: the stored outcome is their mean
            scored = [behavior.performs(str(t), str(a)) for t, a in zip(texts, answers)]
            np.testing.assert_array_equal(outcomes.performed.sel(condition=condition, framing=framing).values, np.array(scored, float))
    baseline = outcomes.performed.sel(condition="baseline")
    # Measured, not 0 by construction: the user's matcher performs on some baseline completion.
    assert float(baseline.max()) == 1 and result["warnings"] == []
    gap = float(baseline.sel(framing="deploy").mean() - baseline.sel(framing="eval").mean())
    lines = (Path(result["table_dir"]) / "cells.csv").read_text().splitlines()
    rows = [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]
    row = next(r for r in rows if r["condition"] == "baseline")
    assert row["family"] == NAME and float(row["gap"]) == pytest.approx(gap, abs=1e-6)


def test_collect_and_adl_use_the_prompt_file_and_the_users_text(runs):
    _, collected = runs["collect"]
    assert collected["n_prompts"] == 8 * 4 + 4 * 2 + 4 * 3
    assert zarr.open_group(collected["store"], mode="r").attrs["cell"]["family"] == NAME
    _, adl = runs["adl"]
    attrs = zarr.open_group(adl["store"], mode="r").attrs
    assert attrs["cell"]["family"] == NAME and f"| {NAME} | decline |" in adl["table_markdown"]
    # no candidate goal is the user's behaviour: identification is left out, the run is not refused
    assert adl["row"]["n_goals"] == 0 and adl["row"]["goal_true"] == ""
    # The fine-tuning data: the completions of the prompt file's fit pairs (both framings).
    assert attrs["adl"]["n_finetune_examples"] == 2 * 8 * 4 and attrs["adl"]["text_source"] == "unrelated.txt"
    assert xr.open_zarr(adl["store"], group="adl_mean").attrs["n_texts"] == 16


def test_two_adapters_and_two_ranks_are_four_rows(trained, tmp_path):
    """Cells are named by the model; settings that differ are variants of a cell: stores with the
    provenance real runs would write (fake outcomes) aggregate into four rows, no duplicates."""
    second = tmp_path / "refuse-lora"
    shutil.copytree(trained[1], second)
    for adapter in (trained[1], second):
        for rank in (1, 2):
            cfg = compose_config("routing", [*_model(trained, adapter), *BEHAVIOR, f"intervention.rank={rank}"])
            setup = build_components(cfg)
            digest_cfg = digest_config(cfg)
            cell = cell_of(setup, setup.source.name, digest_cfg)
            fake.write_store(tmp_path / "stores", cell["family"], cell["behavior"], replicate=cell["replicate"],
                             variant=cell["variant"], settings=digest_cfg, groups=("outcomes",))
    result = aggregate(OmegaConf.structured(AggregateConfig(root=str(tmp_path / "stores"), out=str(tmp_path / "out"), plots=False)))
    md = (tmp_path / "out" / "table.md").read_text()
    assert result["n_cells"] == 4 and not [f for f in result["findings"] if f.startswith("duplicate")]
    for name in (NAME, "tiny-chat+refuse-lora"):
        for rank in (1, 2):
            assert f"| {name} | decline | intervention.rank={rank} |" in md


def _bad_jsonl(path: Path, drop: str | None = None, splits=("fit", "localize", "test")) -> Path:
    rows = [{"id": f"q{i}-{s}", "eval_prompt": f"exam : what is {i} {s} ?", "deploy_prompt": f"hey : what is {i} {s} ?",
             "answer": "five", "split": s} for s in splits for i in range(2)]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != drop}) + "\n" for r in rows))
    return path


def _refused(run, cfg, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        guarded(run)(cfg)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_input_is_one_line_exit_2_and_nothing_written(trained, tmp_path, capsys):
    base = tmp_path / "neox"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    template = tmp_path / "t.yaml"
    template.write_text(json.dumps({"splits": {"fit": {"tasks": [{"id": "q", "question": "?", "answer": "a"}],
                                                       "eval_cues": ["exam :", "test :"], "deploy_cues": ["hey :"]}}}))
    stores = tmp_path / "stores"
    cases = [
        ([f"data.prompts={_bad_jsonl(tmp_path / 'a.jsonl', drop='deploy_prompt')}"], "missing field(s) ['deploy_prompt']"),
        ([f"data.prompts={template}"], "split fit: 2 eval cues and 1 deploy cues"),
        ([f"data.prompts={_bad_jsonl(tmp_path / 'b.jsonl', splits=('fit',))}"], "has no localize or test pairs (a held-out split"),
        (["behavior.performed.phrases=[]"], "behavior.performed.phrases is empty"),
        ([f"model.base={base}"], "model.family is not set and cannot be inferred: model.base="),
        (["data.prompts=null"], "data.prompts is not set: a fine-tune of your own has no prompt sets of its own"),
        ([f"data.prompts={_bad_jsonl(tmp_path / 'c.jsonl')}"], "control=semantic needs two topics in the fit split"),
    ]
    for overrides, message in cases:
        cfg = compose_config("routing", [*_model(trained), *BEHAVIOR, f"store.root={stores}", *overrides])
        line = _refused(routing_cell.run, cfg, capsys)
        assert line.startswith("error: ") and message in line, (overrides, line)
    # ADL with your own adapter: your unrelated text and your fine-tuning data, never the organisms'.
    adl = [*_model(trained), *BEHAVIOR, f"store.root={stores}"]
    line = _refused(run_adl, compose_config("adl", adl), capsys)
    assert "text=organism needs an organism model" in line
    no_data = compose_config("adl", [*adl, *ADL, f"data.prompts={_bad_jsonl(tmp_path / 'd.jsonl')}"])
    assert "the ADL needs the fine-tuning data of model" in _refused(run_adl, no_data, capsys)
    assert not stores.exists()


def test_the_entry_point_refuses_a_bad_prompt_file_and_leaves_no_run_folder(trained, tmp_path, monkeypatch, capsys):
    bad = _bad_jsonl(tmp_path / "bad.jsonl", drop="answer")
    code, lines = run_entry_point("routing", [*_model(trained)[:-1], f"data.prompts={bad}", *BEHAVIOR], tmp_path, monkeypatch, capsys)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"error: data.prompts='{bad}' line 1: missing field(s) ['answer']"), lines
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.*"))


def test_a_bfloat16_model_runs_the_cell_with_edits_in_its_dtype(trained, tmp_path):
    """model.dtype=bfloat16: activations, adapter updates, patches and every edit are made in
    the activation's dtype (and device: the same casts serve a GPU); the store holds float32."""
    cfg = _cfg("routing", trained, tmp_path, [f"report_dir={tmp_path / 'table'}", "model.dtype=bfloat16",
                                              "data.max_fit=24", "data.max_test=8", "control=[random]"])
    result = routing_cell.run(cfg)
    outcomes = xr.open_zarr(result["store"], group="outcomes")
    assert outcomes.perturbation_norm.sel(condition="random") == pytest.approx(float(outcomes.perturbation_norm.sel(condition="clamp")), rel=1e-4)
    acts = xr.open_zarr(result["store"], group="activations")
    assert acts.attn.dtype == np.float32 and np.isfinite(acts.attn.values).all()
