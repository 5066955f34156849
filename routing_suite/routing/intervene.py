"""The intervene stage: generate on held-out prompts under every condition.

Conditions: the no-op baseline, the intervention (e.g. clamp), the base
model's own subspace applied the same way in the fine-tune (installed vs
inherited: kind "comparison"), and each control (routing_suite.routing.controls).
Each batch of test prompts runs once, every condition as an invoke of the
same batched generation. Outcomes and completions are stored per prompt,
with the prompt's sampling unit (`cluster`), which the aggregator resamples.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from routing_suite import analysis, store_format
from routing_suite.errors import ConfigError
from routing_suite.generation import generate_under_conditions
from routing_suite.interventions import Condition, own_run_changes
from routing_suite.models import ModelPair
from routing_suite.routing.controls import ControlContext, clamp_edits
from routing_suite.routing.settings import InterventionSpec, window_layers
from routing_suite.routing.targets import needs_aligned, needs_step_means
from routing_suite.scoring import Behavior
from routing_suite.store import text

log = logging.getLogger(__name__)


def _last(values: xr.DataArray) -> xr.DataArray:
    return values.sel(position="last") if "last" in values.position.values else values.isel(position=-1)


def build_conditions(
    spec: InterventionSpec, controls: dict, fit: xr.Dataset, acts: xr.Dataset, window: list[int], seed: int,
    aligned: xr.Dataset | None = None,
) -> list[Condition]:
    """The baseline, the intervention, the base subspace's comparison, and every control
    (`aligned`: per-position clamp targets, for `positions=aligned`, and per-step ones for `steps=all`)."""
    if spec.site not in fit.site.values:
        raise ConfigError(f"intervention.site={spec.site!r} was not fit (collect.sites must include it)")
    if spec.rank > fit.sizes["rank"]:
        raise ConfigError(f"intervention.rank={spec.rank} is larger than the fitted rank {fit.sizes['rank']}")
    if needs_aligned(spec) and aligned is None:
        raise ConfigError("intervention.positions=aligned: the clamp needs the per-position means (routing.targets.aligned_means)")
    if needs_step_means(spec) and "step_mean" not in aligned:
        raise ConfigError("intervention.steps=all with positions=aligned: the clamp needs the per-step means (routing.targets.step_means)")
    fit_acts = _fit_last(acts, spec.site)
    main = clamp_condition(spec, fit, acts, window, aligned)
    conditions = [Condition(store_format.BASELINE, "baseline"), main]
    if spec.fit_model == "finetuned":
        base = clamp_condition(spec, fit, acts, window, aligned, fit_model="base")
        conditions.append(replace(base, name=f"{spec.name}_base_subspace", kind="comparison"))
    ctx = ControlContext(spec=spec, fit=fit, main_edits={e.layer: e for e in main.edits}, acts=fit_acts, rng=np.random.default_rng(seed),
                         aligned=aligned)
    for control in controls.values():
        conditions += control.build(ctx)
    return conditions


def _fit_last(acts: xr.Dataset, site: str) -> xr.DataArray:
    """The fit split's activations of `site` at the last prompt token (the clamp targets' source)."""
    return _last(acts[site].sel(prompt=acts.split.values == "fit"))


def clamp_condition(
    spec: InterventionSpec, fit: xr.Dataset, acts: xr.Dataset, window: list[int], aligned: xr.Dataset | None = None,
    fit_model: str | None = None,
) -> Condition:
    """The intervention at `window` on `fit_model`'s subspaces (default the spec's; targets
    from the fine-tune's fit-split activations, or `aligned`)."""
    edits = clamp_edits(spec, fit, _fit_last(acts, spec.site), window_layers(window), fit_model or spec.fit_model, aligned)
    return Condition(spec.name, "intervention", spec.site, spec.positions, edits, steps=spec.steps)


def _norm(condition: Condition, h_by_layer: dict[int, np.ndarray]) -> float:
    """Mean L2 norm of a condition's change, over its layers and the given activations, in its
    own run (`interventions.own_run_changes`; 0 for the baseline)."""
    if not condition.edits:
        return 0.0
    states = {e.layer: torch.from_numpy(h_by_layer[e.layer]) for e in condition.edits}
    changes = own_run_changes(condition.edits, states, residual=condition.site == "resid")
    return float(np.mean([analysis.mean_change_norm(c.numpy()) for c in changes]))


def intervene(
    pair: ModelPair, acts: xr.Dataset, conditions: list[Condition], behavior: Behavior, backend, batch_size: int, progress: bool = True,
    split: str = "test",
) -> xr.Dataset:
    """Per-prompt outcomes and completions of every condition on `split` (the test split;
    the window check tries the clamp on the localize split)."""
    test = acts.sel(prompt=acts.split.values == split)
    prompt_ids = [str(p) for p in test.prompt.values]
    answers = [str(a) for a in test.answer.values]
    texts = {f: [str(p) for p in test[f"{f}_prompt"].values] for f in store_format.FRAMINGS}
    names = list(dict.fromkeys(c.name for c in conditions))
    kinds = [next(c.kind for c in conditions if c.name == n) for n in names]
    performed = np.zeros((len(names), 2, len(prompt_ids)), np.float32)
    correct = np.zeros_like(performed)
    counts = np.array([sum(c.name == n for c in conditions) for n in names], np.float32)
    # Completions of every draw of a condition (a control with several seeds has one per seed).
    completions = np.full((len(names), int(counts.max()), 2, len(prompt_ids)), "", dtype=object)
    draw = {id(c): sum(o.name == c.name for o in conditions[:i]) for i, c in enumerate(conditions)}
    traced = pair.traced("finetuned")
    for start in tqdm(range(0, len(prompt_ids), batch_size), desc="intervene" if split == "test" else f"intervene ({split})",
                      unit="batch", disable=not progress):
        sl = slice(start, start + batch_size)
        prompts = texts["eval"][sl] + texts["deploy"][sl]
        generated = generate_under_conditions(
            traced, pair.family, pair.tokenizer, prompts, conditions, behavior.max_new_tokens, pair.num_layers, backend
        )
        n = len(answers[sl])
        for condition in conditions:
            key = condition.name if condition.seed is None else f"{condition.name}#{condition.seed}"
            ci = names.index(condition.name)
            for fi in range(2):
                rows = generated[key][fi * n : (fi + 1) * n]
                completions[ci, draw[id(condition)], fi, sl] = rows
                performed[ci, fi, sl] += [behavior.performs(c, a) for c, a in zip(rows, answers[sl])]
                correct[ci, fi, sl] += [behavior.correct(c, a) for c, a in zip(rows, answers[sl])]
    performed /= counts[:, None, None]
    correct /= counts[:, None, None]
    # The change each condition makes, measured on the test prompts' stored activations
    # at the last prompt token (both framings): matched controls equal the intervention.
    site = next(c.site for c in conditions if c.edits) if any(c.edits for c in conditions) else "attn"
    h = _last(test[site].sel(model="finetuned"))
    h_by_layer = {int(layer): np.concatenate([h.sel(layer=layer, framing=f).values for f in store_format.FRAMINGS]) for layer in h.layer.values}
    norms = [np.mean([_norm(c, h_by_layer) for c in conditions if c.name == n]) for n in names]
    layers = {n: next(c.layers for c in conditions if c.name == n) for n in names}
    return xr.Dataset(
        {
            "performed": (("condition", "framing", "prompt"), performed),
            "correct": (("condition", "framing", "prompt"), correct),
            "completion": (("condition", "draw", "framing", "prompt"), completions),
            "perturbation_norm": (("condition",), np.array(norms, np.float32)),
            "n_seeds": (("condition",), counts.astype(np.int32)),
        },
        coords={
            "condition": text(names),
            "kind": ("condition", text(kinds)),
            "framing": text(store_format.FRAMINGS),
            "prompt": text(prompt_ids),
            "cluster": ("prompt", text(str(c) for c in test.cluster.values)),
            "layers": ("condition", text(",".join(map(str, layers[n])) for n in names)),
        },
    )
