"""Path-patching figures: the fraction of the gap each layer (and each attention head) restores.

Per cell the mean over its builds (routing_suite.routing.plots.pool_builds),
with two marks of where the routing lives: the window the localization chose
(dashed box; one per distinct window when the builds disagree) and the layers
the fine-tune was planted in (hatched, store attribute
digest_config.model.train.lora_layers: ground truth for the organisms).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from routing_suite.figures import (
    Cell,
    empty,
    first_filled,
    grid_of,
    layer_step,
    layer_ticks,
    legend,
    panel_figure,
    title,
)
from routing_suite.routing.plots import estimated_note, pooled_note, pooled_title, why_empty

SOURCE_LABELS = {"deploy_to_eval": "deploy → eval", "finetuned_to_base": "fine-tune → base"}
PLANTED_COLOR = "#2ca02c"
CMAP = "RdBu_r"
GAP_LABEL = "fraction of the gap restored"


def planted_layers(settings: dict) -> list[int]:
    """The layers a build's fine-tune was planted in (flattened store config); [] when
    the store does not say or the fine-tune changed every layer (nothing to mark)."""
    layers = settings.get("model.train.lora_layers")
    return sorted(int(v) for v in layers) if isinstance(layers, (list, tuple)) else []


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted indices as (first, last)."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def _mark_planted(ax: Axes, layers: list[int], planted: list[int], across: int, axis: str) -> bool:
    """Hatch the planted layers' columns (axis "x") or rows (axis "y") of a heatmap
    `across` cells deep; returns whether any was drawn."""
    where = [layers.index(p) for p in planted if p in layers]
    for first, last in _runs(where):
        xy, w, h = ((first - 0.5, -0.5), last - first + 1, across) if axis == "x" else ((-0.5, first - 0.5), across, last - first + 1)
        # Hatched, not filled: the heatmap's colours stay readable underneath.
        ax.add_patch(Rectangle(xy, w, h, fill=False, hatch="///", edgecolor=PLANTED_COLOR, linewidth=0, zorder=2))
    return bool(where)


def _mark_windows(ax: Axes, layers: list[int], windows: list[list[int]], across: int, axis: str) -> list[str]:
    """A dashed box per distinct window the builds chose; returns how each was chosen ("3–4 ×2")."""
    counts = Counter(tuple(w) for w in windows if all(v in layers for v in w))
    for (first, last), _ in sorted(counts.items()):
        a, b = layers.index(first), layers.index(last)
        xy, w, h = ((a - 0.5, -0.5), b - a + 1, across) if axis == "x" else ((-0.5, a - 0.5), across, b - a + 1)
        ax.add_patch(Rectangle(xy, w, h, fill=False, edgecolor="black", linewidth=1.6, linestyle="--", zorder=3))
    if len(counts) <= 1:
        return []
    return [f"{a}–{b} ×{n}" for (a, b), n in sorted(counts.items())]


def _legend_handles(planted: bool) -> list:
    handles = [Line2D([], [], color="black", linestyle="--", linewidth=1.6, label="window the localization chose")]
    if planted:
        handles.append(Patch(facecolor="white", edgecolor=PLANTED_COLOR, hatch="///", label="layers the fine-tune was planted in"))
    return handles


def _panel_title(family: str, behavior: str, ds: xr.Dataset | None, windows: list[str] | None = None) -> str:
    text = f"{family} / {behavior}" + pooled_note(ds)
    return text + (f"\nwindows {', '.join(windows)}" if windows else "")


def patching_figure(data: dict[Cell, xr.Dataset], grid: list[Cell], used: set[Cell]):
    """Per cell: the fraction of the gap each layer restores, one row per patching source."""
    families, behaviors = grid_of(grid)
    values = [float(np.nanmax(np.abs(ds["layer_effect"].values))) for ds in data.values() if "layer_effect" in ds]
    vmax = max(values + [1e-9])
    n_layers = max([ds.sizes.get("layer", 1) for ds in data.values()] + [1])
    fig, axes = panel_figure(len(families), len(behaviors), (max(3.0, 0.13 * n_layers), 1.45), (2.3, 1.6))
    image, any_planted = None, False
    for r, family in enumerate(families):
        first = first_filled(["layer_effect" in data.get((family, b), {}) for b in behaviors])
        for c, behavior in enumerate(behaviors):
            ax = axes[r][c]
            ds = data.get((family, behavior))
            if ds is None or "layer_effect" not in ds:
                ax.set_title(_panel_title(family, behavior, None), fontsize=10)
                empty(ax, why_empty((family, behavior), used, "localize/layer_effect"))
                continue
            effect = ds["layer_effect"].transpose("source", "layer")
            n_sources = effect.sizes["source"]
            image = ax.imshow(effect.values, aspect="auto", cmap=CMAP, vmin=-vmax, vmax=vmax, interpolation="nearest")
            layers = [int(v) for v in effect["layer"].values]
            layer_ticks(ax, layers, "x", positions=True)
            ax.set_yticks(range(n_sources), [SOURCE_LABELS.get(str(s), str(s)) for s in effect["source"].values])
            ax.tick_params(labelsize=8, labelleft=c == first)
            any_planted |= _mark_planted(ax, layers, ds.attrs.get("planted", []), n_sources, "x")
            disagree = _mark_windows(ax, layers, ds.attrs.get("windows", []), n_sources, "x")
            ax.set_title(_panel_title(family, behavior, ds, disagree), fontsize=10)
            ax.set_xlabel("layer", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=[ax for row in axes for ax in row], label=GAP_LABEL, shrink=0.9, aspect=30)
    legend(fig, _legend_handles(any_planted))
    title(fig, "Path patching per layer: the fraction of the eval/deploy gap patching one layer's attention output "
               "restores" + pooled_title(data.values()) + estimated_note(data.values()))
    return fig


def head_sources(data: dict[Cell, xr.Dataset]) -> list[str]:
    """The patching sources some cell has per-head effects for (none: per-head patching was off everywhere)."""
    return sorted({str(s) for ds in data.values() if "head_effect" in ds for s in ds["source"].values})


def head_figure(data: dict[Cell, xr.Dataset], grid: list[Cell], used: set[Cell], source: str):
    """Per cell: the fraction of the gap each attention head restores, for one patching source."""
    families, behaviors = grid_of(grid)
    picked = {k: ds for k, ds in data.items() if "head_effect" in ds and source in ds["source"].values}
    effects = {k: ds["head_effect"].sel(source=source).transpose("layer", "head") for k, ds in picked.items()}
    vmax = max([float(np.nanmax(np.abs(v.values))) for v in effects.values()] + [1e-9])
    n_layers = max([v.sizes["layer"] for v in effects.values()] + [1])
    n_heads = max([v.sizes["head"] for v in effects.values()] + [1])
    panel = (max(2.4, 0.12 * n_heads + 0.6), max(2.0, 0.07 * n_layers + 0.6))
    fig, axes = panel_figure(len(families), len(behaviors), panel, (1.9, 1.6))
    image, any_planted = None, False
    for r, family in enumerate(families):
        first = first_filled([(family, b) in effects for b in behaviors])
        for c, behavior in enumerate(behaviors):
            ax = axes[r][c]
            effect = effects.get((family, behavior))
            if effect is None:
                ax.set_title(_panel_title(family, behavior, None), fontsize=10)
                reason = "no per-head effects\n(per-head patching off)" if (family, behavior) in data else None
                empty(ax, reason or why_empty((family, behavior), used, "localize/head_effect"))
                continue
            ds = picked[(family, behavior)]
            image = ax.imshow(effect.values, aspect="auto", cmap=CMAP, vmin=-vmax, vmax=vmax, interpolation="nearest",
                              origin="lower")
            heads = [int(h) for h in effect["head"].values]
            step = layer_step(len(heads))
            ax.set_xticks([i for i, h in enumerate(heads) if h % step == 0], [str(h) for h in heads if h % step == 0])
            layers = [int(v) for v in effect["layer"].values]
            layer_ticks(ax, layers, "y", positions=True)
            any_planted |= _mark_planted(ax, layers, ds.attrs.get("planted", []), len(heads), "y")
            disagree = _mark_windows(ax, layers, ds.attrs.get("windows", []), len(heads), "y")
            ax.set_title(_panel_title(family, behavior, ds, disagree), fontsize=10)
            ax.tick_params(labelsize=8)
            ax.set_xlabel("head", fontsize=9)
            if c == first:
                ax.set_ylabel("layer", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=[ax for row in axes for ax in row], label=GAP_LABEL, shrink=0.9, aspect=30)
    legend(fig, _legend_handles(any_planted))
    label = SOURCE_LABELS.get(source, source)
    title(fig, f"Path patching per attention head, patching {label}: the fraction of the gap each head restores"
               + pooled_title(picked.values()) + estimated_note(picked.values()))
    return fig
