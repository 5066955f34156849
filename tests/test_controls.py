"""Controls are matched by construction (DESIGN.md), whatever the build: invariants, no thresholds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from routing_suite import analysis
from routing_suite.backends import LocalBackend
from routing_suite.errors import ConfigError
from routing_suite.families import site_path
from routing_suite.interventions import ResidualCarry, SubspaceEdit, own_run_changes
from routing_suite.routing.controls import (
    ControlContext,
    NonRoutingControl,
    OrthogonalControl,
    OtherLayerControl,
    RandomControl,
    SemanticControl,
    clamp_edits,
)
from routing_suite.routing.fit import NON_ROUTING_MAX_PROBE, non_routing_subspace
from routing_suite.routing.settings import InterventionSpec
from routing_suite.routing.targets import SHARED_STEP, aligned_means, aligned_target, step_means, step_target

D, RANK, LAYERS = 16, 2, 6


def _orthonormal(rng, rank=RANK, d=D):
    return analysis.random_subspace(d, rank, rng)


@pytest.mark.parametrize("mode", ["clamp", "ablate", "steer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_matched_edit_moves_every_activation_by_the_interventions_amount(mode, dtype):
    rng = np.random.default_rng(0)
    main = SubspaceEdit(3, torch.from_numpy(_orthonormal(rng)), mode, torch.tensor([2.0, -1.0]), alpha=1.5)
    control = SubspaceEdit(3, torch.from_numpy(_orthonormal(rng)), mode, matched=main)
    h = torch.from_numpy(rng.normal(size=(5, 7, D)) * 3).to(dtype)  # (prompt, position, hidden)
    want, got = main.change(h).double().norm(dim=-1), control.change(h).double().norm(dim=-1)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # ... and the change lies in the control's own subspace.
    c = control.change(h).double()
    basis = control.basis.double()
    torch.testing.assert_close(c, (c @ basis.T) @ basis, rtol=tol, atol=tol)
    assert control.change(h).dtype == dtype


def _stream(edits_by_layer: dict, writes: torch.Tensor, carry: ResidualCarry | None) -> list[torch.Tensor]:
    """A residual stream whose layer k adds writes[k] (tokens, hidden), edited after each layer
    in order: each layer's change."""
    h, changes = torch.zeros_like(writes[0]), []
    for k, write in enumerate(writes):
        h = h + write
        change = edits_by_layer[k].change(h, carry=carry) if k in edits_by_layer else torch.zeros_like(h)
        h, changes = h + change, changes + [change]
    return changes


@pytest.mark.parametrize("mode", ["ablate", "clamp"])
def test_on_the_residual_stream_a_control_is_matched_to_the_interventions_change_in_its_own_run(mode):
    """A direction ablated (or clamped) at four layers of a stream that writes along it at every
    layer: in its own run the first layer's edit takes most of it and the later ones only what
    their layer adds. The matched control, carried, changes each layer by that same amount;
    without the carry it took the whole coordinate again at every layer (the defect until
    2026-12-07: pushed twice as far from the clean run as the ablation)."""
    rng = np.random.default_rng(4)
    tokens, layers = 30, 6
    u = torch.from_numpy(_orthonormal(rng, rank=1))
    writes = torch.from_numpy(rng.normal(size=(layers, tokens, D)).astype(np.float32))
    writes[0] += 5.0 * u[0]  # the variable is written early and carried
    writes[1:] += 0.3 * u[0]
    target = torch.tensor([-1.0])
    main = {k: SubspaceEdit(k, u, mode, target) for k in (1, 2, 3, 4)}
    control = {k: SubspaceEdit(k, torch.from_numpy(_orthonormal(rng, rank=1)), mode, matched=e) for k, e in main.items()}
    wanted = _stream(main, writes, None)
    got = _stream(control, writes, ResidualCarry())
    for k in main:
        torch.testing.assert_close(got[k].norm(dim=-1), wanted[k].norm(dim=-1), rtol=1e-4, atol=1e-4)
    assert float(wanted[2].norm(dim=-1).mean()) < 0.5 * float(wanted[1].norm(dim=-1).mean())  # the stream as described
    uncarried = _stream(control, writes, None)
    assert float(uncarried[2].norm(dim=-1).mean()) > 2 * float(wanted[2].norm(dim=-1).mean())


@pytest.mark.parametrize("residual", [True, False])
def test_a_conditions_recorded_change_is_its_own_runs_and_a_matched_control_records_as_much(residual):
    """`own_run_changes`, which the recorded perturbation norms come from: on the residual stream
    each layer sees the changes made before it (a clamp at two layers changes the second layer
    by nothing more), elsewhere each layer's activation is edited alone; either way a matched
    control changes each row by the intervention's amount."""
    rng = np.random.default_rng(5)
    u = torch.from_numpy(_orthonormal(rng, rank=1))
    main = [SubspaceEdit(k, u, "clamp", torch.tensor([2.0])) for k in (2, 3)]
    control = [SubspaceEdit(e.layer, torch.from_numpy(_orthonormal(rng, rank=1)), "clamp", matched=e) for e in main]
    shared = torch.from_numpy(rng.normal(size=(40, D)).astype(np.float32))
    states = {2: shared, 3: shared.clone()}  # layer 3 writes nothing: its clean state is layer 2's
    wanted = own_run_changes(main, states, residual)
    got = own_run_changes(control, states, residual)
    for w, g in zip(wanted, got):
        torch.testing.assert_close(g.norm(dim=-1), w.norm(dim=-1), rtol=1e-5, atol=1e-5)
    if residual:
        torch.testing.assert_close(wanted[1], torch.zeros_like(wanted[1]), rtol=0, atol=1e-5)
    else:
        for e, w in zip(main, wanted):
            torch.testing.assert_close(w, e.change(states[e.layer]), rtol=0, atol=0)
        assert float(wanted[1].norm(dim=-1).mean()) > 0.1


def _fit(rng) -> xr.Dataset:
    """A fit group of the shape the fit stage writes, with orthonormal subspaces per layer."""
    dims = ("model", "site", "layer")
    shape = (2, 1, LAYERS)
    sub = np.stack([[[analysis.random_subspace(D, 4, rng) for _ in range(LAYERS)]] for _ in range(2)])
    sem = np.stack([[[analysis.random_subspace(D, 4, rng) for _ in range(LAYERS)]] for _ in range(2)])
    non = np.stack([[[analysis.random_subspace(D, 4, rng) for _ in range(LAYERS)]] for _ in range(2)])
    probe = np.full(shape, 0.9, np.float32)
    probe[:, :, 0] = 0.5  # layer 0 does not represent the framing
    return xr.Dataset(
        {
            "subspace": (dims + ("rank", "hidden"), sub),
            "semantic_subspace": (dims + ("rank", "hidden"), sem),
            "non_routing_subspace": (dims + ("rank", "hidden"), non),
            "non_routing_probe": (dims + ("rank",), np.full((*shape, 4), 0.52, np.float32)),
            "probe_accuracy": (dims, probe),
        },
        coords={"model": ["base", "finetuned"], "site": ["attn"], "layer": np.arange(LAYERS), "rank": np.arange(4)},
    )


def _acts(rng) -> xr.Dataset:
    values = rng.normal(size=(2, 2, 30, LAYERS, D)).astype(np.float32)
    return xr.DataArray(
        values, dims=("model", "framing", "prompt", "layer", "hidden"),
        coords={"model": ["base", "finetuned"], "framing": ["eval", "deploy"], "layer": np.arange(LAYERS)},
    )


def test_every_control_is_matched_at_every_window_layer_and_other_layer_is_a_comparison():
    rng = np.random.default_rng(1)
    fit, acts = _fit(rng), _acts(rng)
    spec = InterventionSpec(rank=RANK)
    window = [2, 3]
    main = clamp_edits(spec, fit, acts, window, "finetuned")
    ctx = ControlContext(spec=spec, fit=fit, main_edits={e.layer: e for e in main}, acts=acts, rng=rng)
    h = torch.from_numpy(rng.normal(size=(40, D)).astype(np.float32))
    built = {}
    for control in (RandomControl(seeds=2), OrthogonalControl(seeds=2), NonRoutingControl(), SemanticControl()):
        conditions = control.build(ctx)
        assert len(conditions) == control.seeds and all(c.kind == "control" for c in conditions)
        for condition in conditions:
            assert condition.layers == window
            for edit in condition.edits:
                assert edit.matched is ctx.main_edits[edit.layer] and edit.scale == 1.0
                torch.testing.assert_close(edit.change(h).norm(dim=-1), edit.matched.change(h).norm(dim=-1), rtol=1e-5, atol=1e-5)
        built[control.name] = conditions
    # orthogonal: no overlap with the routing subspace
    routing = fit.subspace.sel(model="finetuned", site="attn", layer=2).values[:RANK]
    for condition in built["orthogonal"]:
        basis = condition.edits[0].basis.numpy()
        assert np.abs(basis @ routing.T).max() < 1e-5
    # non_routing is the fit's non-routing subspace of the window layers
    np.testing.assert_allclose(
        built["non_routing"][0].edits[0].basis.numpy(), fit.non_routing_subspace.sel(model="finetuned", site="attn", layer=2).values[:RANK]
    )
    other = OtherLayerControl().build(ctx)
    assert len(other) == 1 and other[0].kind == "comparison" and other[0].name == "other_layer"
    assert not set(other[0].layers) & set(window) and 0 not in other[0].layers  # layer 0 carries no framing
    assert all(e.matched is None for e in other[0].edits)


def test_non_routing_is_left_out_when_the_fit_found_too_few_directions():
    rng = np.random.default_rng(2)
    fit, acts = _fit(rng), _acts(rng)
    fit["non_routing_subspace"].loc[{"layer": 3}] = 0.0
    spec = InterventionSpec(rank=RANK)
    main = clamp_edits(spec, fit, acts, [2, 3], "finetuned")
    ctx = ControlContext(spec=spec, fit=fit, main_edits={e.layer: e for e in main}, acts=acts, rng=rng)
    assert NonRoutingControl().build(ctx) == []


def test_the_non_routing_subspace_carries_no_framing_and_avoids_the_routing_subspace():
    """Framing along e0; large variance along e1 and e2 that the framing does not move."""
    rng = np.random.default_rng(3)
    n = 200

    def draw(shift):
        h = rng.normal(size=(n, D)) * 0.3
        h[:, 1] += rng.normal(size=n) * 5
        h[:, 2] += rng.normal(size=n) * 3
        h[:, 0] += shift
        return h

    ev, dp, hev, hdp = draw(0.0), draw(2.0), draw(0.0), draw(2.0)
    routing = np.eye(D)[:1].astype(np.float32)
    basis, accuracy = non_routing_subspace(ev, dp, hev, hdp, routing, 2)
    assert (accuracy <= NON_ROUTING_MAX_PROBE).all()
    assert np.abs(basis @ routing.T).max() < 1e-6
    # the high-variance, framing-free directions e1 and e2
    assert np.abs(basis[:, 1:3]).sum(1).min() > 0.95


def test_an_aligned_clamp_sets_each_prompt_position_to_the_target_of_its_distance_from_the_end():
    """Row -j of a per-position target is position -j's (left padding aligns every row's end);
    positions before the first row and NaN rows keep their coordinates; one position (a
    generated token, or last-token activations) gets the last row; controls match per position."""
    rng = np.random.default_rng(4)
    basis = torch.from_numpy(_orthonormal(rng))
    target = torch.tensor([[np.nan, np.nan], [1.0, -2.0], [0.5, 3.0], [4.0, 1.0]])
    main = SubspaceEdit(2, basis, "clamp", target)
    h = torch.from_numpy(rng.normal(size=(3, 6, D)))
    coords = main.apply(h) @ basis.double().T
    torch.testing.assert_close(coords[:, -3:], target[-3:].double().expand(3, -1, -1))
    torch.testing.assert_close(coords[:, :3], h[:, :3] @ basis.double().T)  # NaN row and before: untouched
    torch.testing.assert_close(main.apply(h[:, -1:])[:, 0] @ basis.double().T, target[-1].double().expand(3, -1))
    torch.testing.assert_close(main.apply(h[:, -1]) @ basis.double().T, target[-1].double().expand(3, -1))
    # a one-row target is the old clamp, bit for bit
    flat = SubspaceEdit(2, basis, "clamp", target[-1])
    assert torch.equal(flat.change(h), (target[-1].double() - h @ basis.double().T) @ basis.double())
    control = SubspaceEdit(2, torch.from_numpy(_orthonormal(rng)), "clamp", matched=main)
    torch.testing.assert_close(control.change(h).norm(dim=-1), main.change(h).norm(dim=-1))


def test_aligned_targets_pool_the_framings_by_count_and_follow_the_subspace():
    rng = np.random.default_rng(5)
    k = 4
    means = rng.normal(size=(2, 1, k, D)).astype(np.float32)
    counts = np.array([[0, 2, 5, 5], [0, 6, 5, 5]], np.int32)
    means[:, :, 0] = np.nan
    aligned = xr.Dataset(
        {"aligned_mean": (("framing", "target_layer", "offset", "hidden"), means), "aligned_count": (("framing", "offset"), counts)},
        coords={"framing": ["eval", "deploy"], "target_layer": [3], "offset": [f"last{i}" for i in range(k - 1, -1, -1)]},
    )
    basis = _orthonormal(rng)
    deploy = aligned_target(aligned, 3, ("deploy",), basis)
    np.testing.assert_allclose(deploy[1:], means[1, 0, 1:] @ basis.T, rtol=1e-5)
    assert np.isnan(deploy[0]).all()
    pooled = aligned_target(aligned, 3, ("eval", "deploy"), basis)
    np.testing.assert_allclose(pooled[1], ((2 * means[0, 0, 1] + 6 * means[1, 0, 1]) / 8) @ basis.T, rtol=1e-5)


def test_aligned_means_through_the_tracer_equal_plain_hooks(llama_underperform):
    """The per-position means the aligned clamp reads equal a plain forward hook's, offset by offset."""
    pair = llama_underperform
    prompts = {"eval": ["this is a test . what is the color of baba ? answer :", "eval : what is the city of koko ? answer :"],
               "deploy": ["a user asks me . what is the color of baba ? answer :", "hey : what is the city of koko ? answer :"]}
    acts = xr.Dataset(
        {"eval_prompt": ("prompt", prompts["eval"]), "deploy_prompt": ("prompt", prompts["deploy"]), "split": ("prompt", ["fit", "fit"])},
    )
    layers = [1, 2]
    got = aligned_means(pair, acts, layers, "attn", LocalBackend(), batch_size=1)
    model, tok = pair.model("finetuned"), pair.tokenizer
    for framing, texts in prompts.items():
        for layer in layers:
            rows: list[torch.Tensor] = []
            module = dict(model.named_modules())[site_path(pair.family, "attn", layer)]
            handle = module.register_forward_hook(lambda m, i, o, rows=rows: rows.append((o[0] if isinstance(o, tuple) else o)[0].detach()))
            with torch.no_grad():
                for text in texts:
                    model(**tok(text, return_tensors="pt"))
            handle.remove()
            k = got.sizes["offset"]
            for j in range(1, k + 1):  # position -j of every prompt long enough
                have = [r[-j] for r in rows if r.shape[0] >= j]
                assert int(got.aligned_count.sel(framing=framing).values[-j]) == len(have)
                if have:
                    torch.testing.assert_close(
                        torch.from_numpy(got.aligned_mean.sel(framing=framing, target_layer=layer).values[-j]),
                        torch.stack(have).mean(0), rtol=1e-4, atol=1e-5,
                    )


def test_a_generated_token_is_clamped_to_its_own_steps_target_and_controls_match_it():
    """Step k > 0 (the k-th generated token's pass) gets step row k - 1; NaN rows and steps
    past the last row leave the token alone; step 0 (the prompt) still gets the prompt rows;
    a matched control moves each generated token by the clamp's amount at that step."""
    rng = np.random.default_rng(6)
    basis = torch.from_numpy(_orthonormal(rng))
    target = torch.tensor([[1.0, -2.0], [4.0, 1.0]])
    steps = torch.tensor([[7.0, 0.5], [np.nan, np.nan], [-3.0, 2.0]])
    main = SubspaceEdit(2, basis, "clamp", target, step_target=steps)
    token = torch.from_numpy(rng.normal(size=(3, 1, D)))  # (prompt, one new position, hidden)
    coords = lambda x: x @ basis.double().T  # noqa: E731
    torch.testing.assert_close(coords(main.apply(token, 1))[:, 0], steps[0].double().expand(3, -1))
    torch.testing.assert_close(coords(main.apply(token, 3))[:, 0], steps[2].double().expand(3, -1))
    assert torch.equal(main.apply(token, 2), token)  # NaN row
    assert torch.equal(main.apply(token, 4), token)  # past the completions' longest
    torch.testing.assert_close(coords(main.apply(token, 0))[:, 0], target[-1].double().expand(3, -1))
    h = torch.from_numpy(rng.normal(size=(3, 5, D)))
    torch.testing.assert_close(coords(main.apply(h, 0))[:, -2:], target.double().expand(3, -1, -1))
    control = SubspaceEdit(2, torch.from_numpy(_orthonormal(rng)), "clamp", matched=main)
    for step in (1, 2, 3):
        torch.testing.assert_close(control.change(token, step).norm(dim=-1), main.change(token, step).norm(dim=-1))
    # without step targets a generated token gets the last prompt row, as before
    plain = SubspaceEdit(2, basis, "clamp", target)
    torch.testing.assert_close(coords(plain.apply(token, 2))[:, 0], target[-1].double().expand(3, -1))


def test_step_means_through_the_tracer_equal_greedy_generation_with_hooks(llama_underperform):
    """The k-th generated token's mean that the clamp reads for step k equals a plain
    greedy `generate` with a forward hook: the hook's value at that token, averaged over
    the completions that reach it before their <eos>."""
    pair = llama_underperform
    prompts = {"eval": ["this is a test . what is the color of baba ? answer :", "eval : what is the city of koko ? answer :"],
               "deploy": ["a user asks me . what is the color of baba ? answer :", "hey : what is the city of koko ? answer :"]}
    acts = xr.Dataset(
        {"eval_prompt": ("prompt", prompts["eval"]), "deploy_prompt": ("prompt", prompts["deploy"]), "split": ("prompt", ["fit", "fit"])},
    )
    layer, max_new = 2, 4
    got = step_means(pair, acts, [layer], "attn", LocalBackend(), batch_size=2, max_new_tokens=max_new)
    assert list(got.step.values) == [f"step{k}" for k in range(1, max_new)]
    model, tok = pair.model("finetuned"), pair.tokenizer
    module = dict(model.named_modules())[site_path(pair.family, "attn", layer)]
    for framing, texts in prompts.items():
        per_step: dict[int, list[torch.Tensor]] = {}
        for text in texts:
            seen: list[torch.Tensor] = []
            handle = module.register_forward_hook(lambda m, i, o, seen=seen: seen.append((o[0] if isinstance(o, tuple) else o)[0, -1].detach()))
            enc = tok(text, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            handle.remove()
            new = out[0, enc["input_ids"].shape[1] :].tolist()
            for k in range(1, max_new):  # pass k reads generated token k (seen[k]; seen[0] is the prompt's pass)
                if k <= len(new) and tok.eos_token_id not in new[:k] and k < len(seen):
                    per_step.setdefault(k, []).append(seen[k])
        for k in range(1, max_new):
            have = per_step.get(k, [])
            assert int(got.step_count.sel(framing=framing).values[k - 1]) == len(have)
            if have:
                torch.testing.assert_close(
                    torch.from_numpy(got.step_mean.sel(framing=framing, target_layer=layer).values[k - 1]),
                    torch.stack(have).mean(0), rtol=1e-4, atol=1e-4,
                )
    basis = _orthonormal(np.random.default_rng(7), d=pair.hidden_size)
    # as the cell stores them: beside the per-position means
    both = xr.merge([aligned_means(pair, acts, [layer], "attn", LocalBackend(), batch_size=2), got])
    assert step_target(both, layer, ("deploy",), basis).shape == (max_new - 1, RANK)
    assert step_target(both.drop_vars(["step_mean", "step_count"]), layer, ("deploy",), basis) is None


def test_a_generated_step_is_clamped_only_where_both_framings_completions_still_run():
    rng = np.random.default_rng(8)
    n, steps = 10, 4
    means = rng.normal(size=(2, 1, steps, D)).astype(np.float32)
    # eval completions end after one token, deploy ones after three
    counts = np.array([[n, int(SHARED_STEP * n) - 1, 0, 0], [n, n, n, 0]], np.int32)
    means[:, 0][counts == 0] = np.nan
    aligned = xr.Dataset(
        {"step_mean": (("framing", "target_layer", "step", "hidden"), means), "step_count": (("framing", "step"), counts),
         "aligned_count": (("framing", "offset"), np.full((2, 1), n, np.int32))},
        coords={"framing": ["eval", "deploy"], "target_layer": [3], "step": [f"step{k}" for k in range(1, steps + 1)]},
    )
    basis = _orthonormal(rng)
    target = step_target(aligned, 3, ("deploy",), basis)
    np.testing.assert_allclose(target[0], means[1, 0, 0] @ basis.T, rtol=1e-5)
    assert np.isnan(target[1:]).all()


def test_a_one_sided_clamp_moves_only_coordinates_on_the_other_framings_side():
    """bound=one_sided: a coordinate past the target on the target framing's side is
    kept, one on the other framing's side is set to the target, per position, per
    generation step and per coordinate; NaN sides clamp either way; a matched
    control moves each activation by exactly the one-sided clamp's amount."""
    rng = np.random.default_rng(7)
    basis = torch.from_numpy(_orthonormal(rng))
    target = torch.tensor([[1.0, -2.0], [4.0, 1.0]])
    side = torch.tensor([[1.0, -1.0], [np.nan, 1.0]])  # sign of (other framing's mean - target)
    steps, step_side = torch.tensor([[0.0, 0.0]]), torch.tensor([[-1.0, 1.0]])
    edit = SubspaceEdit(2, basis, "clamp", target, step_target=steps, side=side, step_side=step_side)
    coords = lambda x: x @ basis.double().T  # noqa: E731
    h = torch.from_numpy(rng.normal(size=(50, 3, D)) * 4)  # (prompt, position, hidden)
    before, after = coords(h), coords(edit.apply(h))
    for pos in (-2, -1):
        for r in range(RANK):
            other_side = (before[:, pos, r] - target[pos, r]) * torch.nan_to_num(side[pos, r]).double() > 0
            if torch.isnan(side[pos, r]):
                other_side = torch.ones_like(other_side)
            expected = torch.where(other_side | (side[pos, r] == 0), target[pos, r].double(), before[:, pos, r])
            torch.testing.assert_close(after[:, pos, r], expected)
            assert 0 < int(other_side.sum()) < 50 or torch.isnan(side[pos, r])  # both sides occur
    torch.testing.assert_close(after[:, 0], before[:, 0])  # before the first row: untouched
    token = h[:, :1]
    stepped = coords(edit.apply(token, 1))[:, 0]
    for r in range(RANK):
        moved = (coords(token)[:, 0, r] - steps[0, r]) * step_side[0, r] > 0
        torch.testing.assert_close(stepped[:, r], torch.where(moved, steps[0, r].double(), coords(token)[:, 0, r]), atol=1e-6, rtol=1e-6)
    control = SubspaceEdit(2, torch.from_numpy(_orthonormal(rng)), "clamp", matched=edit)
    torch.testing.assert_close(control.change(h).norm(dim=-1), edit.change(h).norm(dim=-1))
    torch.testing.assert_close(control.change(token, 1).norm(dim=-1), edit.change(token, 1).norm(dim=-1))
    # two-sided: every coordinate set to the target
    two = SubspaceEdit(2, basis, "clamp", target)
    torch.testing.assert_close(coords(two.apply(h))[:, -2:], target.double().expand(50, -1, -1), atol=1e-6, rtol=1e-6)


def test_one_sided_clamp_edits_take_their_sides_from_the_other_framings_mean():
    rng = np.random.default_rng(8)
    layer, n = 1, 40
    basis = _orthonormal(rng)
    shift = 3 * basis[0] - 2 * basis[1]
    values = np.stack([rng.normal(size=(n, D)) + shift, rng.normal(size=(n, D))])  # eval, deploy
    acts = xr.Dataset({"attn": (("model", "framing", "prompt", "layer", "hidden"), values[None, :, :, None].astype(np.float32))},
                      coords={"model": ["finetuned"], "framing": ["eval", "deploy"], "layer": [layer]})
    fit = xr.Dataset({"subspace": (("model", "site", "layer", "rank", "hidden"), basis[None, None, None].astype(np.float32))},
                     coords={"model": ["finetuned"], "site": ["attn"], "layer": [layer]})
    spec = InterventionSpec(bound="one_sided")
    (edit,) = clamp_edits(spec, fit, acts.attn, [layer], "finetuned")
    assert edit.side.tolist() == [1.0, -1.0]  # the eval mean lies at +3, -2 from the deploy mean
    (plain,) = clamp_edits(InterventionSpec(), fit, acts.attn, [layer], "finetuned")
    assert plain.side is None
    torch.testing.assert_close(edit.target, plain.target)
    for bad in ({"target": "pooled_mean"}, {"mode": "ablate"}):
        with pytest.raises(ConfigError, match="intervention.bound=one_sided needs mode=clamp"):
            InterventionSpec(bound="one_sided", **bad)
