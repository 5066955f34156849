"""The benchmark's plain baseline for interventions does the same work as the suite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TEST_ORGANISM

from routing_suite import bench
from routing_suite import bench_conditions as bc
from routing_suite.bench_localize import localize_figures
from routing_suite.config import register_configs
from routing_suite.interventions import Condition, SubspaceEdit
from routing_suite.organisms import task as T
from routing_suite.organisms.pairs import organism_pairs
from routing_suite.routing import cell

register_configs()


def _basis(hidden: int, rank: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(hidden, rank, generator=torch.Generator().manual_seed(seed)))
    return q.T.contiguous()


def test_hooked_generate_matches_the_suites_batched_conditions(llama_underperform, llama_source):
    pair = llama_underperform
    pairs = organism_pairs(T.make_task(llama_source.spec.task), "heldout", "heldout")[:6]
    prompts = [p.eval_prompt for p in pairs] + [p.deploy_prompt for p in pairs]
    d = pair.hidden_size
    # Strong edits, so a condition that was not applied (or applied at the wrong
    # steps or positions) changes the completions.
    clamp = [SubspaceEdit(layer, _basis(d, 2, layer), "clamp", torch.full((2,), 30.0)) for layer in (1, 2)]
    steer = [SubspaceEdit(1, _basis(d, 1, 7), "steer", alpha=30.0)]
    # per position from the prompt's end, a NaN row leaving its position alone
    per_position = torch.tensor([[-20.0, 10.0], [float("nan"), float("nan")], [5.0, -30.0], [30.0, 30.0]])
    aligned = [SubspaceEdit(layer, _basis(d, 2, layer), "clamp", per_position) for layer in (1, 2)]
    # and per generation step: step 1's row, step 2 left alone (NaN), steps past the rows too
    per_step = torch.tensor([[25.0, -25.0], [float("nan"), float("nan")], [-30.0, 20.0]])
    stepped = [SubspaceEdit(layer, _basis(d, 2, layer), "clamp", per_position, step_target=per_step) for layer in (1, 2)]
    conditions = [
        Condition("baseline", "baseline"),
        Condition("clamp_prompt_all", "intervention", "attn", "all", clamp, steps="prompt"),
        Condition("clamp_aligned", "control", "attn", "aligned", aligned, steps="prompt"),
        Condition("clamp_aligned_steps", "control", "attn", "aligned", stepped, steps="all"),
        Condition("clamp_every_last", "control", "attn", "last", clamp, steps="all", seed=3),
        Condition("steer_resid", "control", "resid", "all", steer, steps="all"),
    ]
    suite = bc.suite_generate(pair, prompts, conditions, max_new_tokens=6)
    hooks = bc.hooks_generate(pair, prompts, conditions, max_new_tokens=6)
    assert suite.keys() == hooks.keys() == {"baseline", "clamp_prompt_all", "clamp_aligned", "clamp_aligned_steps", "clamp_every_last#3", "steer_resid"}
    assert suite == hooks
    # The edits matter: otherwise the comparison says nothing.
    changed = {name: sum(a != b for a, b in zip(texts, suite["baseline"])) for name, texts in suite.items()}
    assert all(changed[name] > 0 for name in changed if name != "baseline"), changed
    assert suite["clamp_aligned_steps"] != suite["clamp_aligned"]  # the generated steps' edits matter too


def test_the_benchmarks_cell_gives_its_conditions_and_test_prompts(llama_underperform, organism_cache, tmp_path):
    """`make bench` builds its intervention conditions from a real cell, as the routing run does."""
    small = [*TEST_ORGANISM, "control=[random]", "data.max_fit=24", "localize.per_head=false", "localize.max_prompts=4", "localize.max_window=2"]
    cfg = bc.routing_cfg("llama", organism_cache, tmp_path, 8, small)
    conditions, prompts, max_new = bc.cell_conditions(cfg, cell.run(cfg))
    assert [c.kind for c in conditions][:2] == ["baseline", "intervention"] and "control" in {c.kind for c in conditions}
    # the stored per-position and per-step targets, as the cell clamped (positions=aligned, steps=all by default)
    assert all(e.target.dim() == 2 and e.step_target is not None for e in conditions[1].edits)
    assert len(prompts) == 2 * 8 and len(set(prompts)) == len(prompts) and max_new == int(cfg.behavior.max_new_tokens)


def test_the_localize_benchmark_times_both_methods_and_the_floor_on_the_same_activations(llama_underperform, organism_cache, tmp_path):
    """`make bench`'s localize figures: exact patching (every window up to max_window, no heads)
    and attribution (every layer and head) on one collect of the localize split, and the
    exact method's plain-forward floor over the same patch sets."""
    small = [*TEST_ORGANISM, "localize.per_head=false", "localize.max_prompts=8", "localize.max_window=2"]
    remote = bc.routing_cfg("llama", organism_cache, tmp_path / "remote", 8,
                            [*small, "backend=ndif", "backend.simulate=true", "backend.host=http://ndif.example.invalid"])
    figures = localize_figures(bc.routing_cfg("llama", organism_cache, tmp_path, 8, small), repeats=1, remote_cfg=remote)
    layers = figures["localize_layers"]
    assert layers == 6 and figures["localize_prompts"] == 8 and figures["localize_heads"] == llama_underperform.num_heads
    assert figures["localize_exact_patch_sets_per_source"] == layers + (layers - 1)  # single layers and pairs
    assert figures["localize_exact_per_head"] is False
    for key in ("exact", "attribution", "exact_floor"):
        assert figures[f"localize_{key}_seconds"] > 0
    # The ratio of the unrounded seconds (the printed seconds are rounded to 1 ms).
    assert figures["localize_speedup"] == pytest.approx(figures["localize_exact_seconds"] / figures["localize_attribution_seconds"], rel=0.05)
    assert 1 <= figures["localize_attribution_confirmed"] <= 2 * 2  # confirm=2 windows of each length up to 2
    assert figures["localize_exact_window"].startswith("[") and figures["localize_attribution_window"].startswith("[")
    # Through the remote path: the plain passes and the patches, or the plain passes, one
    # gradient pass per source and the confirmations; each sends something back.
    for method in ("exact", "attribution"):
        assert figures[f"localize_remote_{method}_requests"] >= 1 and figures[f"localize_remote_{method}_bytes_down"] > 0
        assert figures[f"localize_remote_{method}_bytes_up"] == 0  # the simulation sends nothing
    rho = figures["localize_spearman_deploy_to_eval"]
    assert rho != rho or -1 <= rho <= 1  # NaN only when one method's effects are all equal


def test_the_fit_benchmark_times_the_stage_against_the_same_fit_in_memory_and_leaves_the_cell_alone(llama_underperform, organism_cache, tmp_path):
    small = [*TEST_ORGANISM, "control=[random]", "data.max_fit=24", "localize.per_head=false", "localize.max_prompts=4", "localize.max_window=2"]
    cfg = bc.routing_cfg("llama", organism_cache, tmp_path, 8, small)
    store = Path(cell.run(cfg)["store"])
    before = {p.relative_to(store): p.read_bytes() for p in sorted((store / "fit").rglob("*")) if p.is_file()}
    figures = bench.fit_figures(store, int(cfg.fit.max_rank), repeats=2)
    assert set(figures) == {"fit_stage_seconds", "fit_compute_seconds", "fit_ratio"}
    assert figures["fit_stage_seconds"] > 0 and figures["fit_compute_seconds"] > 0
    assert figures["fit_ratio"] == pytest.approx(figures["fit_stage_seconds"] / figures["fit_compute_seconds"], rel=0.05)
    after = {p.relative_to(store): p.read_bytes() for p in sorted((store / "fit").rglob("*")) if p.is_file()}
    assert after == before
