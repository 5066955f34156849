"""Controls: conditions built from other subspaces, at matched perturbation magnitude.

Each control builds edits of the intervention's mode on another subspace,
each edit scaled so that the mean L2 norm of its change (measured on the fit
split's activations at that layer) equals the intervention's own at the
same position in the window. Several seeds make several conditions of one
name; the outcomes of one name are averaged per prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

from routing_suite import analysis
from routing_suite.errors import ConfigError
from routing_suite.interventions import Condition, InterventionSpec, SubspaceEdit

log = logging.getLogger(__name__)

TARGET_FRAMINGS = {"eval_mean": ("eval",), "deploy_mean": ("deploy",), "pooled_mean": ("eval", "deploy")}


@dataclass
class ControlContext:
    """What a control needs: fit results, window, the fit-split activations, norms to match."""

    spec: InterventionSpec
    fit: xr.Dataset
    window_layers: list[int]
    layer_effects: np.ndarray  # deploy_to_eval effect per layer
    acts: xr.Dataset  # fit split, last position, the intervention's site
    reference_norms: dict[int, float]  # per window layer, the intervention's mean change norm
    rng: np.random.Generator

    def h(self, layer: int, framings: tuple[str, ...] = ("eval", "deploy")) -> np.ndarray:
        values = self.acts.sel(model="finetuned", layer=layer)
        return np.concatenate([values.sel(framing=f).values for f in framings])

    def edit(self, layer: int, basis: np.ndarray, reference_layer: int) -> SubspaceEdit:
        """An edit on `basis` at `layer`, matched to the intervention's norm at `reference_layer`."""
        basis = np.ascontiguousarray(basis, dtype=np.float32)
        target = (self.h(layer, TARGET_FRAMINGS[self.spec.target]) @ basis.T).mean(0).astype(np.float32)
        edit = SubspaceEdit(layer, torch.from_numpy(basis), self.spec.mode, torch.from_numpy(target), alpha=self.spec.alpha)
        change = edit.change(torch.from_numpy(self.h(layer))).numpy()
        edit.scale = analysis.matching_scale(self.reference_norms[reference_layer], change)
        return edit


def _condition(ctx: ControlContext, name: str, edits: list[SubspaceEdit], seed: int | None = None) -> Condition:
    return Condition(name, "control", ctx.spec.site, ctx.spec.positions, edits, steps=ctx.spec.steps, seed=seed)


def _routing_basis(ctx: ControlContext, layer: int) -> np.ndarray:
    return ctx.fit.subspace.sel(model=ctx.spec.fit_model, site=ctx.spec.site, layer=layer).values[: ctx.spec.rank]


@dataclass
class RandomControl:
    """Random subspaces of the intervention's rank, in the window; one condition per seed."""

    name: str = "random"
    seeds: int = 3

    def build(self, ctx: ControlContext) -> list[Condition]:
        d = ctx.acts.sizes["hidden"]
        return [
            _condition(ctx, self.name, [ctx.edit(layer, analysis.random_subspace(d, ctx.spec.rank, ctx.rng), layer) for layer in ctx.window_layers], s)
            for s in range(self.seeds)
        ]


@dataclass
class OrthogonalControl:
    """Random subspaces within the orthogonal complement of the routing subspace."""

    name: str = "orthogonal"
    seeds: int = 3

    def build(self, ctx: ControlContext) -> list[Condition]:
        d = ctx.acts.sizes["hidden"]

        def basis(layer: int) -> np.ndarray:
            return analysis.random_subspace(d, ctx.spec.rank, ctx.rng, avoid=_routing_basis(ctx, layer))

        return [_condition(ctx, self.name, [ctx.edit(layer, basis(layer), layer) for layer in ctx.window_layers], s) for s in range(self.seeds)]


@dataclass
class NonRoutingControl:
    """The routing subspaces fit at layers outside the window, applied there.

    Only layers that represent the framing qualify (the fit model's held-out
    probe accuracy there at least `min_probe_accuracy`): a subspace fit where
    eval and deploy cannot be told apart is no framing subspace, and matching
    its tiny natural change to the intervention's magnitude makes an arbitrary
    huge perturbation (a prototype's layer-0 version broke every cell). Of
    those, as many as the window has, the nearest, after the window first. With
    none, the control is left out of the cell and the reason logged.
    """

    name: str = "non_routing"
    seeds: int = 1
    min_probe_accuracy: float = 0.75

    def build(self, ctx: ControlContext) -> list[Condition]:
        layers = [int(x) for x in ctx.fit.layer.values]
        probe = ctx.fit.probe_accuracy.sel(model=ctx.spec.fit_model, site=ctx.spec.site)
        outside = [
            layer for layer in layers
            if layer not in ctx.window_layers and float(probe.sel(layer=layer)) >= self.min_probe_accuracy
        ]
        if not outside:
            log.warning(
                "non_routing control left out: no layer outside the window %s has a framing probe accuracy >= %.2f",
                ctx.window_layers, self.min_probe_accuracy,
            )
            return []
        first, last = min(ctx.window_layers), max(ctx.window_layers)

        def distance(layer: int) -> tuple[int, int]:
            return (layer - last, 0) if layer > last else (first - layer, 1)

        chosen = sorted(sorted(outside, key=distance)[: len(ctx.window_layers)])
        refs = ctx.window_layers
        edits = [ctx.edit(layer, _routing_basis(ctx, layer), refs[min(i, len(refs) - 1)]) for i, layer in enumerate(chosen)]
        return [_condition(ctx, self.name, edits)]


@dataclass
class SemanticControl:
    """A subspace fit on a content contrast (two topics, same framing), in the window."""

    name: str = "semantic"
    seeds: int = 1

    def build(self, ctx: ControlContext) -> list[Condition]:
        def basis(layer: int) -> np.ndarray:
            b = ctx.fit.semantic_subspace.sel(model=ctx.spec.fit_model, site=ctx.spec.site, layer=layer).values
            return b[: ctx.spec.rank]

        return [_condition(ctx, self.name, [ctx.edit(layer, basis(layer), layer) for layer in ctx.window_layers])]


def check_controls(controls: dict) -> None:
    names = [c.name for c in controls.values()]
    if len(set(names)) != len(names):
        raise ConfigError(f"control: two controls share a name ({sorted(names)})")
    for c in controls.values():
        if c.seeds < 1:
            raise ConfigError(f"control.{c.name}.seeds={c.seeds} must be >= 1")
