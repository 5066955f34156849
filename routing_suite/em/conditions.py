"""The EM study's conditions on one family: steering, ablation, transfer ablation, matched controls.

Every edit is a `SubspaceEdit` on the residual stream (`resid`), at every
position the model computes (the prompt's and each generated token's) but the
prompt's first token, the attention sink (`condition`):

- steer the base: +lambda * |v| * unit(v) at one layer;
- ablate a fine-tune: unit(v) projected out at every layer (or `em.ablate_layers`),
  each layer's own v (`own`), or one layer's v at each of them (`one_layer`); with
  `em.ablate_to=base_mean` its coordinate is set to its mean over the base's
  tokens on truthful answers instead of to 0 (mean ablation; `ablate_edit`); with
  `em.ablate_at=decision` (every ablation and its control) at the decision token
  only (`ABLATE_WHERE`);
- transfer ablation: another fine-tune's directions projected out, layer-wise;
- planted ablation (persona organisms): the base's persona variable projected out
  at every layer, each layer's own;
- decision-token clamps: a direction's coordinate set, at every layer, at the
  prompt's last token only (the token whose pass picks the answer's first word),
  to another model's mean coordinate there: in a fine-tune to the base's
  (`<ft>/clamp/own`, `/planted`, `/from/<other>`), in the base to a fine-tune's
  (`base/clamp-to/<ft>/...`, steering at the decision). On the persona organisms
  the persona is decided there and then carried by the response's own words (its
  lead), so an edit at every position also edits those words' identity;
- random controls at matched magnitude (DESIGN.md): for steering a random
  direction of the same norm; for ablation a random direction per layer that
  changes every activation by exactly the L2 amount the ablation does there in
  the ablation's own run (`matched`: the ablation's own change, carried onto the
  control's direction; interventions.ResidualCarry), each control drawn from its
  own generator (`control_rng`).
  (Until 2026-12-04 the control was the random direction projected out and
  scaled to the ablation's mean change norm over token residuals: a pooled mean
  rescaled by large factors, which pushed some tokens far and broke the persona
  organisms' coherence to 12-43%, so its "reduction" was breakage.)
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import torch
import xarray as xr

from routing_suite import analysis
from routing_suite.em.generation import Planned
from routing_suite.em.models import BASE
from routing_suite.interventions import Condition, SubspaceEdit, own_run_changes

Residuals = np.ndarray  # (tokens, layer, hidden)


def unit(v: np.ndarray) -> np.ndarray:
    """v scaled to norm 1. A zero (or non-finite) vector has no direction: ValueError here,
    not NaN edits that surface later as a sampling error ("probability tensor contains nan")."""
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError(f"a direction of norm {norm} has no unit vector (a layer the model leaves unchanged?)")
    return (v / norm).astype(np.float32)


def control_rng(rng_seed: int, name: str) -> np.random.Generator:
    """The generator of the random control named `name` (names are unique in a run): each
    control draws from its own stream, so changing one plan's edits re-draws no other
    plan's controls. (Until em_code 7 one generator was shared by every plan in order:
    em_code 6, which changed only the planted edits, moved the own ablation's matched
    random in 11 of 24 planted fine-tunes by up to 32 points.)"""
    return np.random.default_rng([rng_seed, zlib.crc32(name.encode())])


def steer_edit(layer: int, direction: np.ndarray, norm: float) -> SubspaceEdit:
    """Adds `norm` * unit(direction) at `layer`."""
    return SubspaceEdit(layer, torch.from_numpy(unit(direction)[None]), "steer", alpha=float(norm))


def ablate_edit(layer: int, direction: np.ndarray, aligned: Residuals | None = None) -> SubspaceEdit:
    """unit(direction) projected out at `layer`; with `aligned` (token residuals of the aligned
    model, the base, on truthful answers), its coordinate set to its mean over them instead
    (mean ablation)."""
    if aligned is None:
        return SubspaceEdit(layer, torch.from_numpy(unit(direction)[None]), "ablate")
    return clamp_edit(layer, direction, mean_coordinate(aligned, layer, direction))


def mean_norm(edits: list[SubspaceEdit], residuals: Residuals) -> float:
    """Mean over an edit set's layers of its mean L2 change norm there, on the token residuals,
    in the edits' own run (`interventions.own_run_changes`)."""
    states = {e.layer: torch.from_numpy(np.ascontiguousarray(residuals[:, e.layer], dtype=np.float32)) for e in edits}
    return float(np.mean([analysis.mean_change_norm(c.numpy()) for c in own_run_changes(edits, states, residual=True)]))


def matched(reference: SubspaceEdit, direction: np.ndarray) -> SubspaceEdit:
    """A control along `direction` matched to `reference` by construction: at every
    activation (prompt token or generated one) it changes h by exactly the L2 amount
    `reference` does there, the reference's change in its own direction's coordinate
    carried onto unit(direction). Nothing is rescaled, so nothing is blown up where
    the control direction's own projection happens to be small."""
    return SubspaceEdit(reference.layer, torch.from_numpy(unit(direction)[None]), reference.mode, matched=reference)


def condition(name: str, edits: list[SubspaceEdit], seed: int | None = None, positions: str = "after_first", steps: str = "all") -> Condition:
    """Edits of the residual stream, at every position but the prompt's first token and at
    every generation step (default), or at the decision token only (positions "last",
    steps "prompt"). The first token (<bos>) is the attention sink: a fine-tune's adapters
    write along its direction there (llama seed 0's planted persona_color: u's coordinate
    10-15 at <bos> at layers 0-5, against 1-7 at its other tokens), so an every-position
    ablation's matched random control pushed the sink that far in a random direction and
    broke the answers through it (the planted fine-tunes of llama and mistral seed 0: 4 of
    4 such controls broken at every position, 2 of 4 with <bos> left alone; until em_code 8)."""
    kind = "control" if seed is not None else "intervention"
    return Condition(name, kind, "resid", positions, edits, steps=steps, seed=seed)


# Where a decision-token clamp edits: the prompt's last token, in the prompt's pass.
DECISION: Mapping[str, str] = MappingProxyType({"positions": "last", "steps": "prompt"})
# `condition`'s own default: every position but the prompt's first, at every step.
EVERYWHERE: Mapping[str, str] = MappingProxyType({})
# Where a layer-wise ablation edits, per `em.ablate_at` (settings.ABLATE_AT).
ABLATE_WHERE = {"every": EVERYWHERE, "decision": DECISION}


def clamp_edit(layer: int, direction: np.ndarray, target: float) -> SubspaceEdit:
    """unit(direction)'s coordinate set to `target` at `layer`."""
    return SubspaceEdit(layer, torch.from_numpy(unit(direction)[None]), "clamp", target=torch.tensor([target], dtype=torch.float32))


def mean_coordinate(residuals: Residuals, layer: int, direction: np.ndarray) -> float:
    """Mean of unit(direction)'s coordinate over the residuals (n, layer, hidden) at `layer`."""
    return float(np.mean(residuals[:, layer] @ unit(direction)))


def decision_clamps(vectors: dict[int, np.ndarray], reference: Residuals) -> list[SubspaceEdit]:
    """Per layer, the vector's coordinate set to its mean over `reference` (last-token
    residuals of the model whose state is wanted). A zero vector (a layer a fine-tune
    leaves unchanged) has no direction to clamp: that layer is left out."""
    scale = np.linalg.norm(reference, axis=-1).mean(0)  # (layer,)
    return [clamp_edit(layer, v, mean_coordinate(reference, layer, v)) for layer, v in vectors.items()
            if np.linalg.norm(v) > 1e-6 * scale[layer]]


def baseline(model: str) -> Planned:
    return Planned(model, f"{model}/baseline", "baseline")


def _v(directions: xr.Dataset, source: str, layer: int) -> np.ndarray:
    return directions.direction.sel(finetune=source, layer=layer).values


def steer_plans(directions: xr.Dataset, sources: list[str], layer: int, lambdas: list[float], seeds: int, rng_seed: int) -> list[Planned]:
    """The base steered with each source's v at `layer`, and a random direction of the same norm."""
    plans = []
    d = directions.sizes["hidden"]
    for source in sources:
        v = _v(directions, source, layer)
        for lam in lambdas:
            norm = lam * float(np.linalg.norm(v))
            name = f"base/steer/{source}/x{lam:g}"
            plans.append(Planned(BASE, name, "steer", [condition(name, [steer_edit(layer, v, norm)])], source, lam, mode="steer",
                                 perturbation_norm=norm))
            rng = control_rng(rng_seed, f"{name}/random")
            randoms = [condition(f"{name}/random", [steer_edit(layer, rng.standard_normal(d), norm)], s) for s in range(seeds)]
            plans.append(Planned(BASE, f"{name}/random", "control", randoms, source, lam, "random", name, "steer", norm))
    return plans


def random_matched(name: str, target: str, model: str, reference: list[SubspaceEdit], residuals: Residuals, seeds: int,
                   rng_seed: int, mode: str = "ablate", where: Mapping[str, str] = EVERYWHERE) -> Planned:
    """`seeds` random directions per layer, each matched at every activation to `reference`
    (edited where the reference's condition edits: `where`, default `condition`'s: every
    position but the prompt's first)."""
    d, rng = int(reference[0].basis.shape[1]), control_rng(rng_seed, name)
    randoms = [condition(name, [matched(edit, rng.standard_normal(d)) for edit in reference], s, **where) for s in range(seeds)]
    return Planned(model, name, "control", randoms, model, control="random", target=target, mode=mode,
                   perturbation_norm=float(np.mean([mean_norm(c.edits, residuals) for c in randoms])))


def ablation_plans(
    directions: xr.Dataset, finetune: str, sources: list[str], one_layer: int, residuals: Residuals, seeds: int, rng_seed: int,
    layers: list[int], aligned: Residuals | None = None, where: Mapping[str, str] = EVERYWHERE,
) -> list[Planned]:
    """In `finetune`: the baseline; its own v ablated layer-wise and one layer's v at
    each layer; a random control matched to the layer-wise ablation; and every other
    source's v ablated layer-wise (transfer ablation). At `layers` (`EmSettings.ablated_layers`);
    with `aligned`, each coordinate set to its mean over those residuals (`ablate_edit`), else to 0;
    at the positions `where` says (`ABLATE_WHERE`; default every position but the first).
    `residuals`: the fine-tune's where the edits are made, for the conditions' change norms."""
    own = [ablate_edit(layer, _v(directions, finetune, layer), aligned) for layer in layers]
    everywhere = [ablate_edit(layer, _v(directions, finetune, one_layer), aligned) for layer in layers]
    name = f"{finetune}/ablate/own"
    single = f"{finetune}/ablate/layer{one_layer}"
    plans = [
        baseline(finetune),
        Planned(finetune, name, "ablate", [condition(name, own, **where)], finetune, mode="ablate",
                perturbation_norm=mean_norm(own, residuals)),
        Planned(finetune, single, "ablate", [condition(single, everywhere, **where)], finetune, mode="ablate",
                perturbation_norm=mean_norm(everywhere, residuals)),
    ]
    plans.append(random_matched(f"{name}/random", name, finetune, own, residuals, seeds, rng_seed, where=where))
    for source in sources:
        if source == finetune:
            continue
        edits = [ablate_edit(layer, _v(directions, source, layer), aligned) for layer in layers]
        other = f"{finetune}/ablate/from/{source}"
        plans.append(Planned(finetune, other, "transfer", [condition(other, edits, **where)], source, mode="ablate",
                             perturbation_norm=mean_norm(edits, residuals)))
    return plans


def planted_plans(directions: xr.Dataset, finetune: str, residuals: Residuals, seeds: int, rng_seed: int,
                  aligned: Residuals | None = None, where: Mapping[str, str] = EVERYWHERE) -> list[Planned]:
    """In `finetune` (a persona organism's): the base's planted persona variable projected
    out at every layer where it is planted (`planted_per_layer`), and a random control matched to it.
    It asks the organism, not the method: does the fine-tune's EM run through the
    variable the base was built to hold? (`where`: as in `ablation_plans`.)"""
    edits = [ablate_edit(layer, v, aligned) for layer, v in planted_per_layer(directions).items()]
    name = f"{finetune}/ablate/planted"
    return [
        Planned(finetune, name, "ablate", [condition(name, edits, **where)], "planted", mode="ablate",
                perturbation_norm=mean_norm(edits, residuals)),
        random_matched(f"{name}/random", name, finetune, edits, residuals, seeds, rng_seed, where=where),
    ]


def _clamped(model: str, name: str, kind: str, source: str, edits: list[SubspaceEdit], last: Residuals) -> Planned:
    return Planned(model, name, kind, [condition(name, edits, **DECISION)], source, mode="clamp", perturbation_norm=mean_norm(edits, last))


def _per_layer(directions: xr.Dataset, variable: str, **sel) -> dict[int, np.ndarray]:
    return {int(layer): directions[variable].sel(layer=layer, **sel).values for layer in directions.layer.values}


def planted_per_layer(directions: xr.Dataset) -> dict[int, np.ndarray]:
    """The planted variable at the layers where the base holds it (`planted_layer`): a planted
    base's u at the layers it was trained at. At the first and the last layer u is no persona
    variable (at the last, truthful answers already sit near 8 along it), so projecting it out
    there is some other edit, and the matched random of an every-layer edit moves more too.
    Stores of before em_code 6 have no `planted_layer`: every layer."""
    vectors = _per_layer(directions, "planted")
    if "planted_layer" not in directions:
        return vectors
    return {layer: v for layer, v in vectors.items() if bool(directions.planted_layer.sel(layer=layer))}


def decision_plans(directions: xr.Dataset, finetune: str, sources: list[str], base_last: Residuals, ft_last: Residuals,
                   seeds: int, rng_seed: int, own: bool = True) -> list[Planned]:
    """In `finetune`, at the decision token of every layer: its own v's coordinate set to
    the base's mean there (`base_last`: the base's last-token residuals on the fine-tune's
    general fit prompts; not with `own` false: it has no v), the planted variable's
    (persona organisms) and every other source's v (transfer); own and planted with a
    random control matched to them (`ft_last`: the fine-tune's residuals there, for the
    change norms)."""
    plans = []
    wanted = {"own": _per_layer(directions, "direction", finetune=finetune)} if own else {}
    if "planted" in directions:
        wanted["planted"] = planted_per_layer(directions)
    for what, vectors in wanted.items():
        name = f"{finetune}/clamp/{what}"
        edits = decision_clamps(vectors, base_last)
        plans.append(_clamped(finetune, name, "ablate", finetune if what == "own" else what, edits, ft_last))
        plans.append(random_matched(f"{name}/random", name, finetune, edits, ft_last, seeds, rng_seed, "clamp", DECISION))
    for source in sources:
        if source != finetune:
            edits = decision_clamps(_per_layer(directions, "direction", finetune=source), base_last)
            plans.append(_clamped(finetune, f"{finetune}/clamp/from/{source}", "transfer", source, edits, ft_last))
    return plans


def decision_shift(base_last: Residuals, ft_last: Residuals) -> dict[int, np.ndarray]:
    """Per layer, the fine-tune's mean last-token residual minus the base's on the same prompts."""
    shift = ft_last.mean(0) - base_last.mean(0)
    return {layer: shift[layer] for layer in range(shift.shape[0])}


def induce_plans(directions: xr.Dataset, finetune: str, base_last: Residuals, ft_last: Residuals, seeds: int,
                 rng_seed: int) -> list[Planned]:
    """In the base, at the decision token of every layer, a coordinate set to `finetune`'s
    mean there (steering at the decision, by the fine-tune's own amount): along the
    fine-tune's shift from the base (any fine-tune, the honest control too), its own v and
    the planted variable (where it has them); each with a matched random control."""
    wanted = {"shift": decision_shift(base_last, ft_last)}
    if finetune in directions.finetune.values and bool(directions.has_direction.sel(finetune=finetune)):
        wanted["own"] = _per_layer(directions, "direction", finetune=finetune)
    if "planted" in directions:
        wanted["planted"] = planted_per_layer(directions)
    plans = []
    for what, vectors in wanted.items():
        name = f"{BASE}/clamp-to/{finetune}/{what}"
        edits = decision_clamps(vectors, ft_last)
        if edits:
            plans.append(_clamped(BASE, name, "steer", finetune, edits, base_last))
            plans.append(random_matched(f"{name}/random", name, BASE, edits, base_last, seeds, rng_seed, "clamp", DECISION))
    return plans
