"""ADL figures, one panel per model pair on a family x behaviour grid (as the routing plots).

- adl_relevance: relevance of the difference vs the two baselines per layer
  (best over positions), logit lens solid, patchscope dashed;
- adl_steering: similarity to the fine-tuning data vs steering strength
  (difference and random direction), strengths incoherent in some build hollow,
  the chosen alpha dotted;
- adl_delta_ce: delta-CE of projection replacement per layer on fine-tuning
  data and unrelated text (random direction dashed), +-1 standard error.

A cell with several builds (ADL stores of replicate organisms) shows the mean
over its builds, and a band from the lowest to the highest build. With more
behaviours than MAX_GRID_COLUMNS (the SDF domains and their mixed fine-tunes)
the grid would be too wide to read: the pairs present are laid out row by row
instead, each panel titled with its family and behaviour.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from routing_suite.adl.tables import AdlRow
from routing_suite.figures import (
    builds_note,
    empty,
    first_filled,
    grid_of,
    layer_ticks,
    legend,
    panel_figure,
    save,
    title,
    wrapped_shape,
)

SOURCE_COLORS = {"difference": "#d62728", "base_mean": "#7f7f7f", "finetuned_mean": "#1f77b4"}
DATA_COLORS = {"finetune": "#d62728", "unrelated": "#1f77b4"}
DIRECTION_COLORS = {"difference": "#d62728", "random": "#7f7f7f"}
BAND_NOTE = "band: lowest to highest build"
MAX_GRID_COLUMNS = 6


def _open(row: AdlRow, group: str) -> xr.Dataset:
    return xr.open_zarr(row.path, group=group, consolidated=False).load()


def _pool(arrays: list[xr.DataArray]) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    """Mean, min and max over builds (aligned on their coordinates)."""
    stacked = xr.concat(arrays, dim="build", join="outer", combine_attrs="drop")
    return stacked.mean("build"), stacked.min("build"), stacked.max("build")


def _figure(rows: list[AdlRow], draw: Callable[[Axes, list[AdlRow]], None], ylabel: str, xlabel: str, per_layer: bool):
    """A panel per cell, drawn by `draw(ax, builds)`; returns the figure and whether a cell pools builds."""
    families, behaviors = grid_of([(r.family, r.behavior) for r in rows])
    by_cell: dict[tuple[str, str], list[AdlRow]] = {}
    for r in sorted(rows, key=lambda r: (r.family, r.behavior, r.path)):
        by_cell.setdefault((r.family, r.behavior), []).append(r)
    n_layers = max(r.n_layers for r in rows)
    panel = (max(2.8, 0.1 * n_layers) if per_layer else 2.8, 2.1)
    if len(behaviors) <= MAX_GRID_COLUMNS:  # family x behaviour, an empty panel where a pair is missing
        cells: list[tuple[str, str] | None] = [(f, b) for f in families for b in behaviors]
        n_rows, n_cols = len(families), len(behaviors)
    else:  # the pairs present, row by row
        cells = list(by_cell)
        n_rows, n_cols = wrapped_shape(len(cells), MAX_GRID_COLUMNS)
        cells += [None] * (n_rows * n_cols - len(cells))
    fig, axes = panel_figure(n_rows, n_cols, panel, (1.0, 1.5))
    for i in range(n_rows):
        row_cells = cells[i * n_cols : (i + 1) * n_cols]
        first = first_filled([c in by_cell for c in row_cells])
        for j, cell in enumerate(row_cells):
            ax = axes[i][j]
            if cell is None:
                ax.set_axis_off()  # the rest of the last row: no pair, nothing to say
                continue
            builds = by_cell.get(cell, [])
            ax.set_title(f"{cell[0]} / {cell[1]}" + builds_note(len(builds)), fontsize=9)
            if not builds:
                empty(ax, "no ADL store")
                continue
            draw(ax, builds)
            ax.tick_params(labelsize=8)
            ax.set_xlabel(xlabel, fontsize=8)
            if j == first:
                ax.set_ylabel(ylabel, fontsize=8)
    return fig, any(len(b) > 1 for b in by_cell.values())


def _band(ax: Axes, x, lo: xr.DataArray, hi: xr.DataArray, color: str, several: bool) -> None:
    if several:
        ax.fill_between(x, lo.values, hi.values, color=color, alpha=0.12, linewidth=0)


def relevance_figure(rows: list[AdlRow]):
    def draw(ax: Axes, builds: list[AdlRow]) -> None:
        mean, lo, hi = _pool([_open(r, "adl_readout").relevance.max("position") for r in builds])
        layers = mean.layer.values
        for source, color in SOURCE_COLORS.items():
            for readout, style in (("logit_lens", "-"), ("patchscope", "--")):
                pick = {"source": source, "readout": readout}
                ax.plot(layers, mean.sel(pick).values, color=color, linestyle=style, marker="o", markersize=2,
                        linewidth=1.1)
                _band(ax, layers, lo.sel(pick), hi.sel(pick), color, len(builds) > 1)
        ax.set_ylim(-0.03, 1.03)
        layer_ticks(ax, [int(v) for v in layers])

    fig, several = _figure(rows, draw, "relevant share of top tokens", "layer", per_layer=True)
    handles = [Line2D([], [], color=c, label=s.replace("_", " ")) for s, c in SOURCE_COLORS.items()]
    handles += [Line2D([], [], color="black", linestyle="-", label="logit lens"),
                Line2D([], [], color="black", linestyle="--", label="patchscope")]
    handles += [Patch(color="#999999", alpha=0.3, label=BAND_NOTE)] if several else []
    legend(fig, handles, fontsize=8)
    title(fig, "Token relevance per layer (best over the first k positions): difference vs baselines"
               + (" (mean over builds)" if several else ""))
    return fig


def steering_figure(rows: list[AdlRow]):
    def draw(ax: Axes, builds: list[AdlRow]) -> None:
        steers = [_open(r, "adl_steer") for r in builds]
        for direction, style in (("difference", "-"), ("random", "--")):
            if not all(direction in s.direction.values for s in steers):
                continue
            color = DIRECTION_COLORS[direction]
            mean, lo, hi = _pool([s.similarity.sel(direction=direction).mean("prompt") for s in steers])
            # Coherent only where every build stayed coherent.
            ok = np.logical_and.reduce([s.coherent.sel(direction=direction).reindex(alpha=mean.alpha).fillna(False)
                                        .values.astype(bool) for s in steers])
            alphas = mean.alpha.values
            ax.plot(alphas, mean.values, color=color, linestyle=style, linewidth=1.1)
            _band(ax, alphas, lo, hi, color, len(builds) > 1)
            ax.scatter(alphas[ok], mean.values[ok], s=12, color=color, zorder=3)
            ax.scatter(alphas[~ok], mean.values[~ok], s=12, facecolors="none", edgecolors=color, zorder=3)
        for alpha in sorted({r.best_alpha for r in builds}):
            ax.axvline(alpha, color="black", linestyle=":", linewidth=0.9)

    fig, several = _figure(rows, draw, "similarity to fine-tuning data", "alpha (× mean residual norm)", per_layer=False)
    handles = [Line2D([], [], color=DIRECTION_COLORS["difference"], label="difference"),
               Line2D([], [], color=DIRECTION_COLORS["random"], linestyle="--", label="random direction"),
               Line2D([], [], color="black", marker="o", linestyle="none", markerfacecolor="none",
                      label="incoherent" + (" (in some build)" if several else "")),
               Line2D([], [], color="black", linestyle=":", label="chosen alpha" + (" (each build)" if several else ""))]
    handles += [Patch(color="#999999", alpha=0.3, label=BAND_NOTE)] if several else []
    legend(fig, handles, fontsize=8)
    title(fig, "Steering: similarity of the fine-tune's text to its fine-tuning data"
               + (" (mean over builds)" if several else ""))
    return fig


def delta_ce_figure(rows: list[AdlRow]):
    def draw(ax: Axes, builds: list[AdlRow]) -> None:
        causals = [_open(r, "adl_causal") for r in builds]
        layers = None
        for data, color in DATA_COLORS.items():
            for condition, style in (("difference", "-"), ("random", "--")):
                if not all(condition in c.condition.values for c in causals):
                    continue
                mean, lo, hi = _pool([c.delta_ce.sel(data=data, condition=condition) for c in causals])
                layers = mean.layer.values
                if len(builds) > 1:
                    ax.plot(layers, mean.values, color=color, linestyle=style, marker="o", markersize=2, linewidth=1.1)
                    _band(ax, layers, lo, hi, color, True)
                else:
                    se = np.nan_to_num(causals[0].delta_ce_se.sel(data=data, condition=condition).values)
                    ax.errorbar(layers, mean.values, yerr=se, color=color, linestyle=style, marker="o", markersize=2,
                                linewidth=1.1, capsize=1.5, elinewidth=0.7)
        ax.axhline(0, color="black", linewidth=0.7)
        if layers is not None:
            layer_ticks(ax, [int(v) for v in layers])

    fig, several = _figure(rows, draw, "ΔCE (replaced − fine-tune)", "layer", per_layer=True)
    handles = [Line2D([], [], color=c, label=f"{d.replace('finetune', 'fine-tuning')} data") for d, c in DATA_COLORS.items()]
    handles += [Line2D([], [], color="black", linestyle="--", label="random direction")]
    handles += [Patch(color="#999999", alpha=0.3, label=BAND_NOTE)] if several else []
    legend(fig, handles, fontsize=8)
    what = "mean over builds" if several else "error bars ±1 standard error"
    title(fig, f"Projection replacement along the difference: change in cross-entropy ({what})")
    return fig


def write_all(rows: list[AdlRow], out: Path, dpi: int) -> list[Path]:
    written: list[Path] = []
    for stem, make in (("adl_relevance", relevance_figure), ("adl_steering", steering_figure), ("adl_delta_ce", delta_ce_figure)):
        written += save(make(rows), out, stem, dpi)
    return written
