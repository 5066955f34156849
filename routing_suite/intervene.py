"""The intervene stage: generate on held-out prompts under every condition.

Conditions: the no-op baseline, the intervention (e.g. clamp), the base
model's own subspace applied the same way in the fine-tune (installed vs
inherited: kind "comparison"), and each control. Each batch of test prompts
runs once, every condition as an invoke of the same batched generation.
Outcomes are stored per prompt (the aggregator bootstraps over them).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from routing_suite import analysis, schema
from routing_suite.controls import TARGET_FRAMINGS, ControlContext
from routing_suite.errors import ConfigError
from routing_suite.interventions import Condition, InterventionSpec, SubspaceEdit
from routing_suite.models import ModelPair
from routing_suite.scoring import Behavior
from routing_suite.steering import generate_under_conditions
from routing_suite.store import text

log = logging.getLogger(__name__)


def _last(values: xr.DataArray) -> xr.DataArray:
    return values.sel(position="last") if "last" in values.position.values else values.isel(position=-1)


def subspace_edits(spec: InterventionSpec, fit: xr.Dataset, fit_acts: xr.Dataset, layers: list[int], fit_model: str) -> list[SubspaceEdit]:
    """The intervention's edits at `layers`, from `fit_model`'s subspaces."""
    edits = []
    for layer in layers:
        basis = fit.subspace.sel(model=fit_model, site=spec.site, layer=layer).values[: spec.rank]
        values = fit_acts.sel(model="finetuned", layer=layer)
        h_target = np.concatenate([values.sel(framing=f).values for f in TARGET_FRAMINGS[spec.target]])
        target = (h_target @ basis.T).mean(0).astype(np.float32)
        edits.append(SubspaceEdit(layer, torch.from_numpy(np.ascontiguousarray(basis)), spec.mode, torch.from_numpy(target), alpha=spec.alpha))
    return edits


def build_conditions(
    spec: InterventionSpec, controls: dict, fit: xr.Dataset, localize: xr.Dataset, acts: xr.Dataset, window: list[int], seed: int
) -> list[Condition]:
    if spec.site not in fit.site.values:
        raise ConfigError(f"intervention.site={spec.site!r} was not fit (collect.sites must include it)")
    if spec.rank > fit.sizes["rank"]:
        raise ConfigError(f"intervention.rank={spec.rank} is larger than the fitted rank {fit.sizes['rank']}")
    layers = list(range(window[0], window[1] + 1))
    fit_acts = _last(acts[spec.site].sel(prompt=acts.split.values == "fit"))
    main = Condition(spec.name, "intervention", spec.site, spec.positions, subspace_edits(spec, fit, fit_acts, layers, spec.fit_model), steps=spec.steps)
    conditions = [Condition(schema.BASELINE, "baseline"), main]
    if spec.fit_model == "finetuned":
        base_edits = subspace_edits(spec, fit, fit_acts, layers, "base")
        conditions.append(Condition(f"{spec.name}_base_subspace", "comparison", spec.site, spec.positions, base_edits, steps=spec.steps))
    reference = {}
    for edit in main.edits:
        h = np.concatenate([fit_acts.sel(model="finetuned", layer=edit.layer, framing=f).values for f in schema.FRAMINGS])
        reference[edit.layer] = analysis.mean_change_norm(edit.change(torch.from_numpy(h)).numpy())
    ctx = ControlContext(
        spec=spec,
        fit=fit,
        window_layers=layers,
        layer_effects=localize.layer_effect.sel(source="deploy_to_eval").values,
        acts=fit_acts,
        reference_norms=reference,
        rng=np.random.default_rng(seed),
    )
    for control in controls.values():
        conditions += control.build(ctx)
    return conditions


def _norm(condition: Condition, fit_acts: xr.DataArray) -> float:
    """Mean L2 norm of a condition's change, averaged over its layers (0 for the baseline)."""
    if not condition.edits:
        return 0.0
    norms = []
    for edit in condition.edits:
        h = np.concatenate([fit_acts.sel(model="finetuned", layer=edit.layer, framing=f).values for f in schema.FRAMINGS])
        norms.append(analysis.mean_change_norm(edit.change(torch.from_numpy(h)).numpy()))
    return float(np.mean(norms))


def intervene(
    pair: ModelPair, acts: xr.Dataset, conditions: list[Condition], behavior: Behavior, backend, batch_size: int, progress: bool = True
) -> xr.Dataset:
    """Per-prompt outcomes of every condition on the held-out test prompts."""
    test = acts.sel(prompt=acts.split.values == "test")
    prompt_ids = [str(p) for p in test.prompt.values]
    answers = [str(a) for a in test.answer.values]
    texts = {f: [str(p) for p in test[f"{f}_prompt"].values] for f in schema.FRAMINGS}
    names = list(dict.fromkeys(c.name for c in conditions))
    kinds = [next(c.kind for c in conditions if c.name == n) for n in names]
    performed = np.zeros((len(names), 2, len(prompt_ids)), np.float32)
    correct = np.zeros_like(performed)
    counts = np.array([sum(c.name == n for c in conditions) for n in names], np.float32)
    traced = pair.traced("finetuned")
    for start in tqdm(range(0, len(prompt_ids), batch_size), desc="intervene", unit="batch", disable=not progress):
        sl = slice(start, start + batch_size)
        prompts = texts["eval"][sl] + texts["deploy"][sl]
        completions = generate_under_conditions(
            traced, pair.family, pair.tokenizer, prompts, conditions, behavior.max_new_tokens, pair.num_layers, backend
        )
        n = len(answers[sl])
        for condition in conditions:
            key = condition.name if condition.seed is None else f"{condition.name}#{condition.seed}"
            ci = names.index(condition.name)
            for fi in range(2):
                rows = completions[key][fi * n : (fi + 1) * n]
                performed[ci, fi, sl] += [behavior.performed(c, a) for c, a in zip(rows, answers[sl])]
                correct[ci, fi, sl] += [behavior.correct(c, a) for c, a in zip(rows, answers[sl])]
    performed /= counts[:, None, None]
    correct /= counts[:, None, None]
    fit_acts = _last(acts[conditions[1].site].sel(prompt=acts.split.values == "fit"))
    norms = [np.mean([_norm(c, fit_acts) for c in conditions if c.name == n]) for n in names]
    layers = {n: next(c.layers for c in conditions if c.name == n) for n in names}
    return xr.Dataset(
        {
            "performed": (("condition", "framing", "prompt"), performed),
            "correct": (("condition", "framing", "prompt"), correct),
            "perturbation_norm": (("condition",), np.array(norms, np.float32)),
            "n_seeds": (("condition",), counts.astype(np.int32)),
        },
        coords={
            "condition": text(names),
            "kind": ("condition", text(kinds)),
            "framing": text(schema.FRAMINGS),
            "prompt": text(prompt_ids),
            "layers": ("condition", text(",".join(map(str, layers[n])) for n in names)),
        },
    )
