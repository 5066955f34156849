"""The routing cell end to end on the test organism (small prompt sets)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from helpers import TEST_ORGANISM
from hydra.errors import InstantiationException

from experiments import localize_agreement
from routing_suite.config import compose_config, register_configs
from routing_suite.errors import ConfigError
from routing_suite.routing import agreement
from routing_suite.routing import cell as routing_cell

register_configs()


def _cfg(organism_cache: str, tmp_path: Path, extra: list[str] = ()):
    return compose_config(
        "routing",
        [
            f"model.cache_dir={organism_cache}",
            *TEST_ORGANISM,
            f"store.root={tmp_path / 'stores'}",
            f"report_dir={tmp_path / 'table'}",
            "data.max_fit=80",
            "data.max_test=48",
            "progress=false",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def cell(llama_underperform, organism_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routing")
    cfg = _cfg(organism_cache, tmp)
    return cfg, tmp, routing_cell.run(cfg)


def test_cell_runs_every_stage_and_completes_the_store(cell):
    _, _, result = cell
    store = Path(result["store"])
    assert store.name.endswith(".zarr") and store.exists()
    ds = xr.open_zarr(store, group="outcomes")
    assert list(ds.condition.values[:2]) == ["baseline", "clamp"]
    assert set(ds.kind.values) == {"baseline", "intervention", "control", "comparison"}
    assert {"random", "orthogonal", "semantic"} <= set(ds.condition.values)
    # other_layer is reported, never counted as a control
    if "other_layer" in ds.condition.values:
        assert str(ds.kind.sel(condition="other_layer").values) == "comparison"
    assert ds.performed.dims == ("condition", "framing", "prompt") and ds.sizes["prompt"] == 48
    assert ((ds.performed >= 0) & (ds.performed <= 1)).all()
    localized = xr.open_zarr(store, group="localize")
    assert len(localized.attrs["window"]) == 2 and localized.attrs["split"] == "localize"
    assert localized.attrs["finetuned_to_base_framing"] in ("eval", "deploy")
    assert "| llama | underperform |" in result["table_markdown"]
    assert result["headline"].startswith("clamping reduces the gap in")
    # The entry point's return value (Hydra's metric for an optimizing sweep) is the clamp's reduction, not a time.
    clamp = xr.open_zarr(store, group="outcomes").performed.sel(condition=["baseline", "clamp"]).mean("prompt")
    gaps = (clamp.sel(framing="deploy") - clamp.sel(framing="eval")).values
    assert result["reduction"] == pytest.approx((gaps[0] - gaps[1]) / gaps[0], abs=1e-6)
    attrs = zarr.open_group(str(store), mode="r").attrs
    assert attrs["cell"]["replicate"] == "0" and attrs["cpu_capability"] and attrs["cpu_model"]
    assert {"base_sha256", "adapter_sha256"} <= set(attrs["model_identity"]) and attrs["digest_config"]["weights"]


def test_the_window_is_chosen_on_prompts_the_clamp_is_never_scored_on(cell):
    _, _, result = cell
    acts = xr.open_zarr(result["store"], group="activations")
    split = acts.split.values
    localize, test = acts.sel(prompt=split == "localize"), acts.sel(prompt=split == "test")
    prompts = lambda ds: {str(p) for f in ("eval", "deploy") for p in ds[f"{f}_prompt"].values}  # noqa: E731
    assert localize.sizes["prompt"] > 0 and not prompts(localize) & prompts(test)
    assert not {str(c) for c in localize.cluster.values} & {str(c) for c in test.cluster.values}
    outcomes = xr.open_zarr(result["store"], group="outcomes")
    assert set(map(str, outcomes.prompt.values)) == {str(p) for p in test.prompt.values}


def test_the_window_check_tries_the_clamp_on_the_localize_split_before_taking_a_window(cell):
    """The rule's window is tried first, then only its sub-windows, never one containing a
    refused window; the window taken is a try that reduced the gap with the task intact
    (or the verdict says none did), and it is the window the intervene stage clamped."""
    _, _, result = cell
    localized = xr.open_zarr(result["store"], group="localize").load()
    rule = tuple(localized.attrs["rule_window"])
    tries = list(zip(localized.check_first.values.tolist(), localized.check_last.values.tolist()))
    assert tries[0] == rule and all(rule[0] <= a <= b <= rule[1] for a, b in tries)
    intact = localized.check_intact.values
    for i, (a, b) in enumerate(tries):
        assert not any(not intact[j] and a <= tries[j][0] and tries[j][1] <= b for j in range(i))
    window = tuple(localized.attrs["window"])
    verdict = localized.attrs["check"]
    if verdict in ("kept", "moved"):
        i = tries.index(window)
        assert intact[i] and localized.check_reduction.values[i] > 0 and i == len(tries) - 1
        assert (verdict == "kept") == (window == rule)
    acts = xr.open_zarr(result["store"], group="activations")
    assert localized.attrs["check_prompts"] == int((acts.split.values == "localize").sum())
    assert xr.open_zarr(result["store"], group="outcomes").attrs["window"] == list(window) == result["window"]
    moved = int(window != rule)
    assert f"the window check moved the rule's window in {moved} of 1 builds" in result["headline"]
    with open(Path(result["table_dir"]) / "cells.csv", newline="", encoding="utf-8") as f:
        clamp = next(r for r in csv.DictReader(f) if r["condition"] == "clamp")
    assert clamp["rule_window"] == ",".join(map(str, range(rule[0], rule[1] + 1))) and clamp["window_check"] == verdict


def test_the_planted_layers_are_found(cell):
    """The organism's fine-tune may change only its planted layers (model.train.lora_layers):
    the window path patching picks overlaps them."""
    cfg, _, result = cell
    first, last = result["window"]
    assert set(range(first, last + 1)) & set(cfg.model.train.lora_layers)


def test_patching_the_fine_tune_into_the_base_below_the_planted_layers_changes_nothing(cell):
    """Below the planted layers the two models compute the same activations, so patching the
    fine-tune's attention output into the base there has no effect at all (any build, any CPU);
    from the planted layers on it has one."""
    cfg, _, result = cell
    effect = xr.open_zarr(result["store"], group="localize").layer_effect.sel(source="finetuned_to_base").load()
    planted = cfg.model.train.lora_layers
    below = effect.sel(layer=[layer for layer in effect.layer.values if layer < min(planted)])
    assert np.abs(below.values).max() <= 1e-5, below.values
    assert np.abs(effect.sel(layer=planted).values).max() > 1e-3, effect.values


@pytest.fixture(scope="module")
def attributed(llama_underperform, organism_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attribution")
    return routing_cell.run(_cfg(organism_cache, tmp, ["localize.method=attribution"]))


def test_attribution_chooses_its_window_on_exact_effects_that_equal_exact_patching(cell, attributed):
    """localize.method=attribution estimates every layer, window and head, then patches the
    best-estimated windows exactly: the window is chosen on those exact effects, which are
    the exact method's for the same windows (same prompts, same forward), and it overlaps
    the planted layers. Below the planted layers the fine-tune's values are the base's, so
    the estimate of patching them into the base is 0 (to float rounding)."""
    cfg, _, result = cell
    exact = xr.open_zarr(result["store"], group="localize").load()
    found = xr.open_zarr(attributed["store"], group="localize").load()
    assert found.attrs["method"] == "attribution" and exact.attrs["method"] == "exact"
    confirmed = [tuple(w) for w in found.attrs["confirmed"]]
    window = tuple(found.attrs["rule_window"])  # the rule's pick; the window check may take a sub-window of it
    assert window in confirmed and attributed["window"] == list(found.attrs["window"])
    planted = cfg.model.train.lora_layers
    assert set(range(window[0], window[1] + 1)) & set(planted)
    for a, b in confirmed:
        same = exact.window_effect.sel(source="deploy_to_eval", first=a, last=b).values
        assert found.window_effect.sel(source="deploy_to_eval", first=a, last=b).values == pytest.approx(same, abs=1e-4)
    # Only the confirmed windows were patched exactly; every window has its estimate.
    patched = np.isfinite(found.window_effect.sel(source="deploy_to_eval").values)
    assert patched.sum() == len(confirmed) < np.isfinite(exact.window_effect.sel(source="deploy_to_eval").values).sum()
    n = found.sizes["layer"]
    assert np.isfinite(found.window_estimate.sel(source="deploy_to_eval").values).sum() == n * (n + 1) // 2
    assert np.isfinite(found.head_effect.values).all()
    ft_to_base = found.layer_effect.sel(source="finetuned_to_base")
    # Below the planted layers donor and clean values are the same computation (batched
    # differently: equal to float rounding), so the estimate is 0 to rounding.
    assert np.abs(ft_to_base.sel(layer=[layer for layer in found.layer.values if layer < min(planted)]).values).max() <= 1e-5


def test_the_agreement_command_pairs_each_build_with_its_attribution_twin(cell, attributed, tmp_path, capsys):
    """`python -m experiments.localize_agreement <exact> <other>` pairs stores by cell, build
    and settings other than the method; a folder that is not one is refused in one line."""
    _, _, result = cell
    exact_root, other_root = Path(result["store"]).parents[2], Path(attributed["store"]).parents[2]
    rows = agreement.compare(exact_root, other_root)
    assert [(r.family, r.behavior, r.replicate) for r in rows] == [("llama", "underperform", "0")]
    assert rows[0].other_window == attributed["window"] and rows[0].exact_window == result["window"]
    assert rows[0].confirmed == len(xr.open_zarr(attributed["store"], group="localize").attrs["confirmed"])
    localize_agreement.main([str(exact_root), str(other_root)])
    out = capsys.readouterr().out
    assert "1 builds of 1 cells paired" in out and "llama/underperform build 0: Spearman deploy_to_eval" in out
    with pytest.raises(SystemExit):
        localize_agreement.main([str(exact_root), str(tmp_path / "missing")])
    assert "missing is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an empty folder: nothing to pair
        localize_agreement.main([str(exact_root), str(tmp_path)])
    assert "no store of the one folder has a counterpart" in capsys.readouterr().err


def test_controls_are_matched_by_construction(cell):
    """Each control moves each edited activation by exactly the clamp's amount (DESIGN.md): the
    mean change on the test prompts is the clamp's, with no scale factor."""
    _, _, result = cell
    ds = xr.open_zarr(result["store"], group="outcomes")
    norms = ds.perturbation_norm.to_series()
    kinds = ds.kind.to_series()
    assert norms["baseline"] == 0 and norms["clamp"] > 0
    for control in kinds[kinds == "control"].index:
        assert norms[control] == pytest.approx(norms["clamp"], rel=1e-4), control


def test_completions_are_stored_and_give_the_outcomes(cell):
    cfg, _, result = cell
    from hydra.utils import instantiate

    behavior = instantiate(cfg.behavior, answer_match="first")
    ds = xr.open_zarr(result["store"], group="outcomes").load()
    answers = _answers(result)
    for condition in ("baseline", "clamp"):
        for framing in ("eval", "deploy"):
            texts = ds.completion.sel(condition=condition, draw=0, framing=framing).values
            scored = [behavior.performs(str(t), str(a)) for t, a in zip(texts, answers)]
            np.testing.assert_array_equal(ds.performed.sel(condition=condition, framing=framing).values, np.array(scored, float))
    # ... and report.md shows a few of them, every condition side by side.
    report = (Path(result["table_dir"]) / "report.md").read_text()
    first = str(ds.completion.sel(condition="clamp", draw=0, framing="eval").values[0]) or "(empty)"
    assert "## Completions" in report and f"| {first} |" in report


def _answers(result) -> np.ndarray:
    acts = xr.open_zarr(result["store"], group="activations")
    return acts.answer.values[acts.split.values == "test"]


def test_rerun_skips_every_stage_and_gives_the_same_outcomes(cell):
    cfg, _, result = cell
    again = routing_cell.run(cfg)
    assert again["store"] == result["store"]
    assert result["stages_run"] == ["collect", "fit", "localize", "intervene"]
    assert again["stages_run"] == []
    a = xr.open_zarr(result["store"], group="outcomes").load()
    np.testing.assert_array_equal(a.performed.values, xr.open_zarr(again["store"], group="outcomes").performed.values)


def test_a_finish_cut_short_is_completed_by_the_rerun(cell, organism_cache, tmp_path):
    """Killed after the store was marked complete but before its rename: the same
    command finishes it and writes the table (no stage runs again)."""
    _, _, result = cell
    final = Path(result["store"])
    partial = tmp_path / "stores" / final.parent.relative_to(final.parents[2]) / final.name.replace(".zarr", ".zarr.partial")
    shutil.copytree(final, partial)
    assert zarr.open_group(str(partial), mode="r").attrs["complete"]
    again = routing_cell.run(_cfg(organism_cache, tmp_path))
    assert again["stages_run"] == [] and again["store"].endswith(".zarr") and Path(again["store"]).exists()
    assert not list((tmp_path / "stores").rglob("*.partial")) and (tmp_path / "table" / "table.md").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["intervention.window=[2,9]"], r"intervention.window=\[2, 9\] is outside the model's layers \[0, 5\]"),
        (["intervention.window=[1,2]", "collect.layers=[2,3]"], r"intervention.window=\[1, 2\] must lie within collect.layers"),
        (["model.seed=-1"], r"model.seed=-1 must be >= 0"),
        (["model.train.lora_layers=[3,9]"], r"model.train.lora_layers=\[3, 9\]: the planted layers must be among"),
        (["intervention.rank=5", "fit.max_rank=100"], "must satisfy rank <= max_rank <= fit pairs"),
        (["intervention.site=resid", "collect.sites=[attn,heads]"], "intervention.site='resid' must be among collect.sites"),
        (["data.max_test=0"], r"data.max_test=0 must be >= 1"),
        (["localize.method=guess"], r"localize.method='guess' is not one of \['exact', 'attribution'\]"),
        (["localize.confirm=0"], r"localize.confirm=0 must be >= 1"),
    ],
)
def test_bad_input_fails_before_compute(extra, message, tmp_path):
    """Nothing is built or written: the organism cache stays empty too."""
    # Hydra wraps what a component's constructor raises; the entry point's guard unwraps it.
    with pytest.raises((ConfigError, ValueError, InstantiationException), match=message):
        routing_cell.run(_cfg(str(tmp_path / "organisms"), tmp_path, extra))
    assert not (tmp_path / "stores").exists() or not list((tmp_path / "stores").rglob("*.zarr*"))
    assert not (tmp_path / "organisms").exists() or not list((tmp_path / "organisms").rglob("organism.json"))
