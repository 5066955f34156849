"""Controls: conditions that edit another subspace by exactly the intervention's amount.

DESIGN.md: a control is *matched* when it changes each edited activation by
the same L2 amount as the intervention does. Every control here is matched
by construction: at each window layer its edit makes the change the
intervention's edit would make to the same activation, carried coordinate
by coordinate into the control's subspace (`SubspaceEdit.matched`), so the
norms agree on every prompt, position and generation step, with no
rescaling. What differs between the controls is only the subspace:

- `random`: random subspaces of the intervention's rank (one condition per seed);
- `orthogonal`: random subspaces orthogonal to the routing subspace;
- `non_routing`: the subspace of the same rank, in the same layers, that
  carries no framing signal by the suite's own measurement (the fit stage's
  `non_routing_subspace`: main directions of the activations with the
  routing subspace projected out whose held-out framing probe is at most
  `fit.NON_ROUTING_MAX_PROBE`);
- `semantic`: a content contrast (two topics, same framing), routing
  subspace projected out.

`other_layer` is not a control (kind "comparison"): the routing subspace of
the nearest layers outside the window that represent the framing, clamped
there the way the intervention clamps its own. Such a layer may feed the
window, so blocking it is a finding about that layer, reported beside its
own path-patching effect, never counted as a control.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

from routing_suite import analysis
from routing_suite.errors import ConfigError
from routing_suite.interventions import Condition, SubspaceEdit
from routing_suite.routing.settings import InterventionSpec
from routing_suite.routing.targets import aligned_target, step_target

log = logging.getLogger(__name__)

TARGET_FRAMINGS = {"eval_mean": ("eval",), "deploy_mean": ("deploy",), "pooled_mean": ("eval", "deploy")}
# A one-sided clamp's sides: the other framing's mean (InterventionSpec.bound).
OTHER_FRAMING = {"eval_mean": "deploy_mean", "deploy_mean": "eval_mean"}


@dataclass
class ControlContext:
    """What a control needs: the fit results, the intervention's edits (one per window layer),
    the fit-split activations of the intervention's site, and a seeded generator."""

    spec: InterventionSpec
    fit: xr.Dataset
    main_edits: dict[int, SubspaceEdit]
    acts: xr.Dataset  # fit split, last position, the intervention's site
    rng: np.random.Generator
    # Per-position means for the aligned clamp (routing_suite.routing.targets), or None.
    aligned: xr.Dataset | None = None

    @property
    def window_layers(self) -> list[int]:
        return sorted(self.main_edits)

    def matched(self, layer: int, basis: np.ndarray) -> SubspaceEdit:
        """An edit on `basis` at a window layer, matched to the intervention's edit there."""
        basis = torch.from_numpy(np.ascontiguousarray(basis, dtype=np.float32))
        return SubspaceEdit(layer, basis, self.spec.mode, matched=self.main_edits[layer])

    def condition(self, name: str, edits: list[SubspaceEdit], seed: int | None = None, kind: str = "control") -> Condition:
        return Condition(name, kind, self.spec.site, self.spec.positions, edits, steps=self.spec.steps, seed=seed)

    def fitted(self, variable: str, layer: int) -> np.ndarray:
        """The intervention's rank of a fitted subspace (rows) at `layer`."""
        return self.fit[variable].sel(model=self.spec.fit_model, site=self.spec.site, layer=layer).values[: self.spec.rank]


def clamp_edits(
    spec: InterventionSpec, fit: xr.Dataset, fit_acts: xr.Dataset, layers: list[int], fit_model: str, aligned: xr.Dataset | None = None,
) -> list[SubspaceEdit]:
    """`spec`'s edits at `layers` on `fit_model`'s routing subspaces (targets from the fine-tune's
    fit activations: at the last prompt token, or per position, and per generation
    step when it holds step means, from `aligned` when given)."""
    edits = []
    other = OTHER_FRAMING.get(spec.target) if spec.bound == "one_sided" else None
    for layer in layers:
        basis = fit.subspace.sel(model=fit_model, site=spec.site, layer=layer).values[: spec.rank]
        target, steps = _clamp_targets(spec.target, fit_acts, layer, basis, aligned)
        side = step_side = None
        if other is not None:
            other_target, other_steps = _clamp_targets(other, fit_acts, layer, basis, aligned)
            side = np.sign(other_target - target)
            step_side = None if steps is None else np.sign(other_steps - steps)
        edits.append(SubspaceEdit(layer, _tensor(basis), spec.mode, _tensor(target), step_target=_tensor(steps), alpha=spec.alpha,
                                  side=_tensor(side), step_side=_tensor(step_side)))
    return edits


def _tensor(values: np.ndarray | None) -> torch.Tensor | None:
    return None if values is None else torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def _clamp_targets(target: str, fit_acts: xr.Dataset, layer: int, basis: np.ndarray, aligned: xr.Dataset | None):
    """`target`'s coordinates in `basis`: per offset and per step from `aligned` when given
    (steps None without step means), else the fit prompts' last-token mean (steps None)."""
    if aligned is not None:
        framings = TARGET_FRAMINGS[target]
        return aligned_target(aligned, layer, framings, basis), step_target(aligned, layer, framings, basis)
    values = fit_acts.sel(model="finetuned", layer=layer)
    h_target = np.concatenate([values.sel(framing=f).values for f in TARGET_FRAMINGS[target]])
    return (h_target @ basis.T).mean(0).astype(np.float32), None


def _complete(basis: np.ndarray) -> bool:
    """False when the fit stage found fewer rows than asked (it leaves those zero)."""
    return bool(np.all(np.linalg.norm(basis, axis=-1) > 0.5))


@dataclass
class RandomControl:
    """Random subspaces of the intervention's rank, in the window; one condition per seed."""

    name: str = "random"
    seeds: int = 3

    def avoided(self, ctx: ControlContext, layer: int) -> np.ndarray | None:
        """Rows the random subspace at `layer` must be orthogonal to (None: anywhere)."""
        return None

    def build(self, ctx: ControlContext) -> list[Condition]:
        d = ctx.acts.sizes["hidden"]

        def basis(layer: int) -> np.ndarray:
            return analysis.random_subspace(d, ctx.spec.rank, ctx.rng, avoid=self.avoided(ctx, layer))

        return [ctx.condition(self.name, [ctx.matched(layer, basis(layer)) for layer in ctx.window_layers], s) for s in range(self.seeds)]


@dataclass
class OrthogonalControl(RandomControl):
    """Random subspaces within the orthogonal complement of the routing subspace."""

    name: str = "orthogonal"

    def avoided(self, ctx: ControlContext, layer: int) -> np.ndarray | None:
        return ctx.fitted("subspace", layer)


@dataclass
class NonRoutingControl:
    """The window layers' subspace that carries no framing signal (fit: `non_routing_subspace`).

    Left out of a cell, saying why, when the fit found fewer such directions
    than the intervention's rank at some window layer."""

    name: str = "non_routing"
    seeds: int = 1

    def build(self, ctx: ControlContext) -> list[Condition]:
        bases = {layer: ctx.fitted("non_routing_subspace", layer) for layer in ctx.window_layers}
        short = [layer for layer, b in bases.items() if not _complete(b)]
        if short:
            log.warning(
                "non_routing control left out: at layers %s fewer than %d directions carry no framing signal", short, ctx.spec.rank
            )
            return []
        probe = {layer: float(np.nanmax(ctx.fitted("non_routing_probe", layer))) for layer in ctx.window_layers}
        log.info("non_routing control: largest framing probe accuracy of its directions per layer %s", probe)
        return [ctx.condition(self.name, [ctx.matched(layer, bases[layer]) for layer in ctx.window_layers])]


@dataclass
class SemanticControl:
    """A subspace fit on a content contrast (two topics, same framing), in the window."""

    name: str = "semantic"
    seeds: int = 1

    def build(self, ctx: ControlContext) -> list[Condition]:
        bases = {layer: ctx.fitted("semantic_subspace", layer) for layer in ctx.window_layers}
        if not all(_complete(b) for b in bases.values()):
            log.warning("semantic control left out: the content contrast spans fewer than %d directions", ctx.spec.rank)
            return []
        return [ctx.condition(self.name, [ctx.matched(layer, bases[layer]) for layer in ctx.window_layers])]


@dataclass
class OtherLayerControl:
    """A comparison, not a control: the routing subspace of layers outside the window.

    The layers are the nearest ones outside the window (after it first) that
    represent the framing (the fit model's held-out probe accuracy at least
    `min_probe_accuracy`), as many as the window has; each is clamped the way
    the intervention clamps its own layers, at its natural magnitude. None: left out."""

    name: str = "other_layer"
    seeds: int = 1
    min_probe_accuracy: float = 0.75

    def build(self, ctx: ControlContext) -> list[Condition]:
        layers = [int(x) for x in ctx.fit.layer.values]
        probe = ctx.fit.probe_accuracy.sel(model=ctx.spec.fit_model, site=ctx.spec.site)
        window = ctx.window_layers
        outside = [layer for layer in layers if layer not in window and float(probe.sel(layer=layer)) >= self.min_probe_accuracy]
        if not outside:
            log.warning("other_layer left out: no layer outside the window %s has a framing probe accuracy >= %.2f",
                        window, self.min_probe_accuracy)
            return []

        def distance(layer: int) -> tuple[int, int]:
            return (layer - window[-1], 0) if layer > window[-1] else (window[0] - layer, 1)

        chosen = sorted(sorted(outside, key=distance)[: len(window)])
        edits = clamp_edits(ctx.spec, ctx.fit, ctx.acts, chosen, ctx.spec.fit_model, ctx.aligned)
        return [ctx.condition(self.name, edits, kind="comparison")]


def check_controls(controls: dict) -> None:
    names = [c.name for c in controls.values()]
    if len(set(names)) != len(names):
        raise ConfigError(f"control: two controls share a name ({sorted(names)})")
    for c in controls.values():
        if c.seeds < 1:
            raise ConfigError(f"control.{c.name}.seeds={c.seeds} must be >= 1")
