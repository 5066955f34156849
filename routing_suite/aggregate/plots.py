"""Figures for the appendix: gaps per condition, path-patching effects, probes per layer.

Figures are built with the object API (`matplotlib.figure.Figure`, Agg canvas),
never pyplot, so nothing depends on a display or global state. Each is saved
as PNG and PDF at a fixed DPI with no dates in the metadata, so the same
inputs give the same bytes. Panels sit on a family x behaviour grid; a cell of
the grid without usable data shows that in its panel instead of vanishing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from routing_suite.aggregate.read import condition_key
from routing_suite.aggregate.stats import NEAR_ZERO, ConditionStats
from routing_suite.aggregate.tables import display, sort_rows

log = logging.getLogger(__name__)

Cell = tuple[str, str]
BASELINE_COLOR = "#595959"
INTERVENTION_COLOR = "#1f77b4"
CONTROL_COLORS = ("#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
MODEL_COLORS = {"base": "#7f7f7f", "finetuned": "#d62728"}
SITE_STYLES = ("-", "--", ":", "-.")
SOURCE_LABELS = {"deploy_to_eval": "deploy → eval", "finetuned_to_base": "fine-tune → base"}
_METADATA = {
    "png": {"Software": None},
    "pdf": {"CreationDate": None, "ModDate": None, "Creator": None, "Producer": None},
}


def save(fig: Figure, out: Path, stem: str, dpi: int) -> list[Path]:
    """`stem`.png and `stem`.pdf, deterministic."""
    paths = []
    for fmt in ("png", "pdf"):
        path = out / f"{stem}.{fmt}"
        fig.savefig(path, format=fmt, dpi=dpi, metadata=_METADATA[fmt])
        paths.append(path)
    return paths


def _grid(cells: list[Cell]) -> tuple[list[str], list[str]]:
    return sorted({f for f, _ in cells}), sorted({b for _, b in cells})


def _span(n: int, size: float, gap: float) -> float:
    """Inches taken by n panels of `size` with `gap` between them."""
    return n * size + (n - 1) * gap


def _panels(
    fig: Figure, nrows: int, ncols: int, x0: float, y0: float, size: tuple[float, float], gaps: tuple[float, float]
) -> list[list[Axes]]:
    """A grid of axes whose lower-left corner sits at (x0, y0) inches; panel size and gaps in inches.

    Fixed margins instead of constrained layout: the figures stay the same
    size whatever the labels, and saving is several times faster.
    """
    width, height = fig.get_size_inches()
    (w, h), (wgap, hgap) = size, gaps
    grid = fig.add_gridspec(
        nrows,
        ncols,
        left=x0 / width,
        right=(x0 + ncols * w + (ncols - 1) * wgap) / width,
        bottom=y0 / height,
        top=(y0 + nrows * h + (nrows - 1) * hgap) / height,
        wspace=wgap / w,
        hspace=hgap / h,
    )
    return [[fig.add_subplot(grid[r, c]) for c in range(ncols)] for r in range(nrows)]


def _colorbar(fig: Figure, image, x0: float, y0: float, height: float, label: str) -> None:
    width, fig_height = fig.get_size_inches()
    cax = fig.add_axes((x0 / width, y0 / fig_height, 0.15 / width, height / fig_height))
    fig.colorbar(image, cax=cax, label=label)


def _panel_grid(rows: int, cols: int, size, gaps, margins) -> tuple[Figure, list]:
    """A figure of rows x cols panels of `size` inches with `gaps` between them and
    (left, bottom, top, right) margins; the panels' axes by row."""
    left, bottom, top, right = margins
    fig = Figure(figsize=(left + right + _span(cols, size[0], gaps[0]), bottom + top + _span(rows, size[1], gaps[1])))
    return fig, _panels(fig, rows, cols, left, bottom, size, gaps)


def _first_filled(row: list[bool]) -> int:
    """The first panel of a row that shows data: it carries the row's y labels."""
    return next((c for c, filled in enumerate(row) if filled), 0)


def _why_empty(cell: Cell, used: set[Cell], what: str) -> str:
    return f"no {what}" if cell in used else "no usable store"


def _empty(ax: Axes, text: str) -> None:
    # No frame: a neighbour's y labels may reach into this panel's space.
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="#777777")
    ax.set_axis_off()


# ---------------------------------------------------------------- gaps


def gap_figure(rows: list[ConditionStats], grid: list[Cell]) -> Figure:
    """One panel per cell: the gap under every condition, a bar for the mean over
    builds and one point per build with its 95% interval."""
    families, behaviors = _grid(grid)
    by_cell: dict[Cell, list[ConditionStats]] = {}
    for row in sort_rows(rows):
        by_cell.setdefault((row.family, row.behavior), []).append(row)
    # Controls and comparisons (e.g. the base model's own subspace) get the palette.
    others = sorted(
        {(r.condition, r.kind) for r in rows if r.kind not in ("baseline", "intervention")},
        key=lambda ck: condition_key(*ck),
    )
    colors = {c: CONTROL_COLORS[i % len(CONTROL_COLORS)] for i, (c, _) in enumerate(others)}
    low = min([r.gap.lo for r in rows if np.isfinite(r.gap.lo)] + [-NEAR_ZERO])
    high = max([r.gap.hi for r in rows if np.isfinite(r.gap.hi)] + [NEAR_ZERO])
    pad = 0.08 * (high - low)
    size, gaps, left, bottom, top = (3.0, 1.9), (0.3, 0.45), 0.8, 0.95, 0.7
    fig = Figure(
        figsize=(
            left + 0.2 + _span(len(behaviors), size[0], gaps[0]),
            bottom + top + _span(len(families), size[1], gaps[1]),
        )
    )
    axes = _panels(fig, len(families), len(behaviors), left, bottom, size, gaps)
    legend: dict[str, object] = {}
    for r, family in enumerate(families):
        first = _first_filled([(family, b) in by_cell for b in behaviors])
        for c, behavior in enumerate(behaviors):
            ax = axes[r][c]
            ax.set_title(f"{family} / {behavior}", fontsize=10)
            cell = by_cell.get((family, behavior))
            if not cell:
                _empty(ax, "no usable store")
                continue
            conditions = list(dict.fromkeys((s.condition, s.kind) for s in cell))
            builds = sorted({(s.variant, s.replicate) for s in cell})
            ax.axhspan(-NEAR_ZERO, NEAR_ZERO, color="#dddddd", zorder=0)
            ax.axhline(0, color="black", linewidth=0.8, zorder=1)
            for x, (name, kind) in enumerate(conditions):
                runs = [s for s in cell if s.condition == name]
                fill = BASELINE_COLOR if kind == "baseline" else INTERVENTION_COLOR if kind == "intervention" else colors[name]
                bar = ax.bar(x, np.mean([s.gap.value for s in runs]), color=fill, alpha=0.55, zorder=2)
                offsets = np.linspace(-0.25, 0.25, len(builds)) if len(builds) > 1 else np.zeros(1)
                for s in runs:
                    dx = offsets[builds.index((s.variant, s.replicate))]
                    err = [[max(s.gap.value - s.gap.lo, 0)], [max(s.gap.hi - s.gap.value, 0)]]
                    ax.errorbar(x + dx, s.gap.value, yerr=err, fmt="o", color=fill, ecolor="black", markersize=3,
                                capsize=2, linewidth=0.8, zorder=3)
                legend.setdefault(display(name), bar)
            ax.set_xticks([])
            ax.set_ylim(low - pad, high + pad)
            ax.tick_params(labelsize=8, labelleft=c == first)
            if c == first:
                ax.set_ylabel("gap (deploy − eval)", fontsize=9)
    legend[f"near zero (±{NEAR_ZERO})"] = Patch(color="#dddddd")
    fig.legend(
        list(legend.values()),
        list(legend.keys()),
        loc="lower center",
        ncol=min(len(legend), 5),
        fontsize=9,
        frameon=False,
    )
    fig.suptitle(
        "Eval/deploy gap per condition\n(bars: mean over builds; points: each build, 95% cluster-bootstrap interval)",
        y=1 - 0.1 / fig.get_size_inches()[1],
        va="top",
        fontsize=10,
    )
    return fig


# ---------------------------------------------------------------- path patching


def _window_box(ax: Axes, window: list[int] | None, n_rows: int) -> None:
    if window is None:
        return
    first, last = window
    ax.add_patch(
        Rectangle(
            (first - 0.5, -0.5), last - first + 1, n_rows, fill=False, edgecolor="black", linewidth=1.5, linestyle="--"
        )
    )


def _window_columns(ds: xr.Dataset, layers: list[int]) -> list[int] | None:
    window = ds.attrs.get("window")
    if window is None or len(window) != 2 or not all(int(w) in layers for w in window):
        return None
    return [layers.index(int(w)) for w in window]


def _layer_ticks(ax: Axes, layers: list[int], axis: str) -> None:
    step = max(1, -(-len(layers) // 8))
    positions, labels = list(range(0, len(layers), step)), [str(v) for v in layers[::step]]
    (ax.set_xticks if axis == "x" else ax.set_yticks)(positions, labels)


def patching_figure(data: dict[Cell, xr.Dataset], grid: list[Cell], used: set[Cell]) -> Figure:
    """Per cell: fraction of the gap each layer restores, one row per patching source."""
    families, behaviors = _grid(grid)
    values = [float(np.nanmax(np.abs(ds["layer_effect"].values))) for ds in data.values() if "layer_effect" in ds]
    vmax = max(values + [1e-9])
    size, gaps, left, bottom, top, right = (3.0, 0.9), (0.3, 0.55), 1.25, 0.55, 0.7, 1.2
    fig, axes = _panel_grid(len(families), len(behaviors), size, gaps, (left, bottom, top, right))
    image = None
    for r, family in enumerate(families):
        first = _first_filled(["layer_effect" in data.get((family, b), {}) for b in behaviors])
        for c, behavior in enumerate(behaviors):
            ax = axes[r][c]
            ax.set_title(f"{family} / {behavior}", fontsize=10)
            ds = data.get((family, behavior))
            if ds is None or "layer_effect" not in ds:
                _empty(ax, _why_empty((family, behavior), used, "localize/layer_effect"))
                continue
            effect = ds["layer_effect"].transpose("source", "layer")
            image = ax.imshow(
                effect.values, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest"
            )
            layers = [int(v) for v in effect["layer"].values]
            _layer_ticks(ax, layers, "x")
            ax.set_yticks(
                range(effect.sizes["source"]), [SOURCE_LABELS.get(str(s), str(s)) for s in effect["source"].values]
            )
            ax.tick_params(labelsize=8, labelleft=c == first)
            _window_box(ax, _window_columns(ds, layers), effect.sizes["source"])
            if r == len(families) - 1:
                ax.set_xlabel("layer", fontsize=9)
    if image is not None:
        width = fig.get_size_inches()[0]
        _colorbar(fig, image, width - right + 0.25, bottom, _span(len(families), size[1], gaps[1]), "fraction of the gap restored")
    fig.suptitle(
        "Path patching per layer (dashed box: the chosen intervention window)",
        y=1 - 0.2 / fig.get_size_inches()[1],
        va="top",
    )
    return fig


def head_figure(data: dict[Cell, xr.Dataset], grid: list[Cell], used: set[Cell], source: str) -> Figure:
    """Per cell: fraction of the gap each attention head restores, for one patching source."""
    families, behaviors = _grid(grid)
    picked = {
        k: ds["head_effect"].sel(source=source).transpose("layer", "head")
        for k, ds in data.items()
        if "head_effect" in ds and source in ds["source"].values
    }
    vmax = max([float(np.nanmax(np.abs(v.values))) for v in picked.values()] + [1e-9])
    size, gaps, left, bottom, top, right = (2.3, 1.8), (0.3, 0.55), 0.75, 0.55, 0.7, 1.2
    fig, axes = _panel_grid(len(families), len(behaviors), size, gaps, (left, bottom, top, right))
    image = None
    for r, family in enumerate(families):
        first = _first_filled([(family, b) in picked for b in behaviors])
        for c, behavior in enumerate(behaviors):
            ax = axes[r][c]
            ax.set_title(f"{family} / {behavior}", fontsize=10)
            effect = picked.get((family, behavior))
            if effect is None:
                _empty(ax, _why_empty((family, behavior), used, "localize/head_effect"))
                continue
            image = ax.imshow(
                effect.values,
                aspect="auto",
                cmap="RdBu_r",
                vmin=-vmax,
                vmax=vmax,
                interpolation="nearest",
                origin="lower",
            )
            ax.set_xticks(range(effect.sizes["head"]), [str(int(h)) for h in effect["head"].values])
            _layer_ticks(ax, [int(v) for v in effect["layer"].values], "y")
            ax.tick_params(labelsize=8)
            if r == len(families) - 1:
                ax.set_xlabel("head", fontsize=9)
            if c == first:
                ax.set_ylabel("layer", fontsize=9)
    if image is not None:
        width = fig.get_size_inches()[0]
        _colorbar(fig, image, width - right + 0.25, bottom, _span(len(families), size[1], gaps[1]), "fraction of the gap restored")
    label = SOURCE_LABELS.get(source, source)
    fig.suptitle(f"Path patching per attention head, patching {label}", y=1 - 0.2 / fig.get_size_inches()[1], va="top")
    return fig


# ---------------------------------------------------------------- probes


def probe_figure(data: dict[Cell, xr.Dataset], grid: list[Cell], used: set[Cell]) -> Figure:
    """Per cell and layer: held-out probe accuracy (left block) and direction norm (right block), base vs fine-tune."""
    families, behaviors = _grid(grid)
    sites = sorted({str(s) for ds in data.values() for s in ds["site"].values})
    size, gaps, left, bottom, top, block_gap = (2.5, 1.6), (0.45, 0.5), 0.75, 0.9, 0.95, 0.75
    block_width = _span(len(behaviors), size[0], gaps[0])
    fig = Figure(
        figsize=(left + 2 * block_width + block_gap + 0.2, bottom + top + _span(len(families), size[1], gaps[1]))
    )
    width, height = fig.get_size_inches()
    spec = (
        ("probe_accuracy", "probe accuracy", "Held-out probe accuracy, eval vs deploy (dotted: chance)"),
        ("direction_norm", "direction norm", "Norm of the mean deploy − eval difference"),
    )
    for b, (var, ylabel, title) in enumerate(spec):
        x0 = left + b * (block_width + block_gap)
        axes = _panels(fig, len(families), len(behaviors), x0, bottom, size, gaps)
        fig.text((x0 + block_width / 2) / width, 1 - 0.55 / height, title, ha="center", va="top", fontsize=11)
        for r, family in enumerate(families):
            first = _first_filled([var in data.get((family, b), {}) for b in behaviors])
            for c, behavior in enumerate(behaviors):
                ax = axes[r][c]
                ax.set_title(f"{family} / {behavior}", fontsize=9)
                ds = data.get((family, behavior))
                if ds is None or var not in ds:
                    _empty(ax, _why_empty((family, behavior), used, f"fit/{var}"))
                    continue
                for model in (str(m) for m in ds["model"].values):
                    for s, site in enumerate(sites):
                        if site not in ds["site"].values:
                            continue
                        line = ds[var].sel(model=model, site=site)
                        style = SITE_STYLES[s % len(SITE_STYLES)]
                        color = MODEL_COLORS.get(model, "black")
                        ax.plot(
                            line["layer"].values,
                            line.values,
                            color=color,
                            linestyle=style,
                            marker="o",
                            markersize=2.5,
                            linewidth=1.2,
                        )
                layers = [int(v) for v in ds["layer"].values]
                step = max(1, -(-len(layers) // 8))
                ax.set_xticks(layers[::step])  # whole layers, not fractions
                if var == "probe_accuracy":
                    ax.axhline(0.5, color="black", linestyle=":", linewidth=0.8)
                    ax.set_ylim(0.35, 1.03)
                ax.tick_params(labelsize=8)
                if r == len(families) - 1:
                    ax.set_xlabel("layer", fontsize=9)
                if c == first:
                    ax.set_ylabel(ylabel, fontsize=9)
    handles = [
        Line2D([], [], color=color, label="base" if m == "base" else "fine-tuned") for m, color in MODEL_COLORS.items()
    ]
    handles += [
        Line2D([], [], color="black", linestyle=SITE_STYLES[i % len(SITE_STYLES)], label=f"site: {s}")
        for i, s in enumerate(sites)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle("Eval/deploy directions per layer, base vs fine-tuned", y=1 - 0.15 / height, va="top")
    return fig
