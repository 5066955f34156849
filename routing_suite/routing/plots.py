"""Routing figures for the appendix: gaps per condition and probes per layer (path patching:
routing_suite.routing.patching_plots).

Panels sit on a family x behaviour grid; a cell of the grid without usable data
shows that in its panel instead of vanishing. A cell may hold several builds
(replicate organisms): the gap figure shows each build beside the mean, the
per-layer figures show the mean over the cell's builds (`pool_builds`) and say so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from routing_suite.figures import (
    BASELINE_COLOR,
    CONTROL_COLORS,
    INTERVENTION_COLOR,
    MIN_WIDTH,
    Cell,
    builds_note,
    empty,
    first_filled,
    grid_of,
    layer_ticks,
    legend,
    new_figure,
    panel_figure,
    title,
    wrap,
)
from routing_suite.routing.outcomes import condition_key
from routing_suite.routing.stats import NEAR_ZERO, ConditionStats
from routing_suite.routing.tables import display, sort_rows

MODEL_COLORS = {"base": "#7f7f7f", "finetuned": "#d62728"}
SITE_STYLES = ("-", "--", ":", "-.")
NEAR_ZERO_COLOR = "#dddddd"


def why_empty(cell: Cell, used: set[Cell], what: str) -> str:
    return f"no {what}" if cell in used else "no usable store"


# ---------------------------------------------------------------- pooling builds


def _has_values(da: xr.DataArray) -> bool:
    # An all-NaN array is a stage that did not run (head_effect without per-head patching).
    return bool(np.isfinite(da.values).any())


def pool_builds(builds: Sequence[xr.Dataset], variables: Sequence[str]) -> xr.Dataset | None:
    """One cell's builds as one dataset: per variable the mean over the builds that hold
    finite values of it, and `<var>_min` / `<var>_max` over them; None when no build holds any.

    attrs: `n_builds` (datasets pooled), `n_variants` (distinct `variant` attributes: a
    cell's runs with other settings pool too, and the titles say so), `windows` (each
    build's chosen window, when its store has one), `planted` (the union of the builds'
    planted layers)."""
    out = xr.Dataset()
    for var in variables:
        have = [ds[var] for ds in builds if var in ds and _has_values(ds[var])]
        if not have:
            continue
        stacked = xr.concat(have, dim="build", join="outer", combine_attrs="drop")
        with np.errstate(all="ignore"):  # a layer NaN in every build stays NaN, without a warning
            out[var] = stacked.mean("build", skipna=True)
            out[f"{var}_min"] = stacked.min("build", skipna=True)
            out[f"{var}_max"] = stacked.max("build", skipna=True)
    if not out.data_vars:
        return None
    out.attrs["n_builds"] = len(builds)
    out.attrs["n_variants"] = len({ds.attrs.get("variant", "") for ds in builds})
    out.attrs["windows"] = [[int(w) for w in ds.attrs["window"]] for ds in builds if len(ds.attrs.get("window") or ()) == 2]
    out.attrs["planted"] = sorted({int(v) for ds in builds for v in ds.attrs.get("planted") or ()})
    # How a localize group's effects were found (stores from before `method` existed: exact).
    out.attrs["methods"] = sorted({ds.attrs.get("method", "exact") for ds in builds if "window" in ds.attrs})
    return out


def pooled_note(ds: xr.Dataset | None) -> str:
    """A panel title's note on what `pool_builds` pooled."""
    return "" if ds is None else builds_note(ds.attrs.get("n_builds", 1), ds.attrs.get("n_variants", 1))


def estimated_note(data) -> str:
    """A patching figure title's note when some of its effects are attribution estimates."""
    methods = [set(ds.attrs.get("methods") or ()) for ds in data]
    if not any("attribution" in m for m in methods):
        return ""
    every = all(m == {"attribution"} for m in methods)
    return "; first-order estimates (localize.method=attribution)" + ("" if every else " in some builds")


def pooled_title(data) -> str:
    """A figure title's note on what its panels pool (data: the pooled datasets)."""
    if any(ds.attrs.get("n_variants", 1) > 1 for ds in data):
        return " (mean over each cell's builds and variants)"
    return " (mean over builds)" if any(ds.attrs.get("n_builds", 1) > 1 for ds in data) else ""


# ---------------------------------------------------------------- gaps


def _columns(cell: list[ConditionStats]) -> list[tuple[str, str, str]]:
    """A cell's bars, in table order: (variant, condition, kind), variant by variant."""
    columns = []
    for variant in sorted({s.variant for s in cell}):
        mine = sorted({(s.condition, s.kind) for s in cell if s.variant == variant}, key=lambda ck: condition_key(*ck))
        columns += [(variant, c, k) for c, k in mine]
    return columns


def _variant_groups(ax, columns: list[tuple[str, str, str]], labels: dict[str, str]) -> None:
    """Several variants in one panel: a dotted line between their groups of bars and each
    group's settings ("intervention.rank=2") above it."""
    variants = list(dict.fromkeys(v for v, _, _ in columns))
    if len(variants) < 2:
        return
    spans = [[x for x, (v, _, _) in enumerate(columns) if v == variant] for variant in variants]
    for span in spans[1:]:
        ax.axvline(span[0] - 0.5, color="#999999", linestyle=":", linewidth=0.9)
    top = ax.secondary_xaxis("top")
    top.set_xticks([(span[0] + span[-1]) / 2 for span in spans], [labels.get(v) or v for v in variants], fontsize=8)
    top.tick_params(length=0)


def _stores_note(cell: list[ConditionStats]) -> str:
    """How many variants and builds a gap panel shows."""
    return builds_note(len({(s.variant, s.replicate) for s in cell}), len({s.variant for s in cell}))


def gap_figure(rows: list[ConditionStats], grid: list[Cell], labels: dict[tuple[str, str, str], str] | None = None):
    """One panel per cell: the gap under every condition (named on the axis), a bar for
    the mean over builds and one point per build with its 95% interval.

    `labels`: per (family, behavior, variant) the settings that tell a cell's variants
    apart (read.variant_labels); a cell with several variants gets a bar per variant."""
    labels = labels or {}
    families, behaviors = grid_of(grid)
    by_cell: dict[Cell, list[ConditionStats]] = {}
    for row in sort_rows(rows):
        by_cell.setdefault((row.family, row.behavior), []).append(row)
    # Controls and comparisons (e.g. the base model's own subspace) get the palette.
    others = sorted({(r.condition, r.kind) for r in rows if r.kind not in ("baseline", "intervention")},
                    key=lambda ck: condition_key(*ck))
    colors = {c: CONTROL_COLORS[i % len(CONTROL_COLORS)] for i, (c, _) in enumerate(others)}
    low = min([r.gap.lo for r in rows if np.isfinite(r.gap.lo)] + [-NEAR_ZERO])
    high = max([r.gap.hi for r in rows if np.isfinite(r.gap.hi)] + [NEAR_ZERO])
    pad = 0.08 * (high - low)
    n_bars = max([len(_columns(c)) for c in by_cell.values()] + [1])
    # Room for the rotated condition names under each row.
    fig, axes = panel_figure(len(families), len(behaviors), (max(2.6, 0.38 * n_bars), 2.9), (0.9, 1.6))
    for r, family in enumerate(families):
        first = first_filled([(family, b) in by_cell for b in behaviors])
        for c, behavior in enumerate(behaviors):
            ax = axes[r][c]
            cell = by_cell.get((family, behavior))
            ax.set_title(f"{family} / {behavior}" + _stores_note(cell or []), fontsize=10)
            if not cell:
                empty(ax, "no usable store")
                continue
            columns = _columns(cell)
            ax.axhspan(-NEAR_ZERO, NEAR_ZERO, color=NEAR_ZERO_COLOR, zorder=0)
            ax.axhline(0, color="black", linewidth=0.8, zorder=1)
            for x, (variant, name, kind) in enumerate(columns):
                runs = sorted((s for s in cell if s.condition == name and s.variant == variant), key=lambda s: s.replicate)
                fill = BASELINE_COLOR if kind == "baseline" else INTERVENTION_COLOR if kind == "intervention" else colors[name]
                ax.bar(x, np.mean([s.gap.value for s in runs]), width=0.8, color=fill, alpha=0.55, zorder=2)
                offsets = np.linspace(-0.25, 0.25, len(runs)) if len(runs) > 1 else np.zeros(1)
                for dx, s in zip(offsets, runs):
                    err = [[max(s.gap.value - s.gap.lo, 0)], [max(s.gap.hi - s.gap.value, 0)]]
                    ax.errorbar(x + dx, s.gap.value, yerr=err, fmt="o", color=fill, ecolor="black", markersize=3,
                                capsize=2, linewidth=0.8, zorder=3)
            ax.set_xticks(range(len(columns)), [display(name) for _, name, _ in columns], rotation=40, ha="right",
                          rotation_mode="anchor", fontsize=8)
            ax.set_xlim(-0.6, len(columns) - 0.4)
            _variant_groups(ax, columns, {v: labels.get((family, behavior, v), "") for v, _, _ in columns})
            ax.set_ylim(low - pad, high + pad)
            ax.tick_params(axis="y", labelsize=8, labelleft=c == first)
            if c == first:
                ax.set_ylabel("gap (deploy − eval)", fontsize=9)
    handles = [
        Patch(color=INTERVENTION_COLOR, alpha=0.55, label="bar: mean over builds"),
        Line2D([], [], color="black", marker="o", markersize=3, linewidth=0.8, label="point: one build, 95% interval"),
        Patch(color=NEAR_ZERO_COLOR, label=f"near zero (±{NEAR_ZERO})"),
    ]
    legend(fig, handles)
    title(fig, "Eval/deploy gap (deploy rate − eval rate) per condition; intervals: cluster bootstrap over sampling units")
    return fig


# ---------------------------------------------------------------- probes


PROBE_PANELS = (
    ("probe_accuracy", "probe accuracy", "Held-out probe accuracy, eval vs deploy (dotted: chance)"),
    ("direction_norm", "direction norm", "Norm of the mean deploy − eval difference"),
)


def probe_figure(data: dict[Cell, xr.Dataset], grid: list[Cell], used: set[Cell]):
    """Per cell and layer, base vs fine-tune: held-out probe accuracy (left) and the
    direction's norm (right); the mean over the cell's builds, a band from the lowest
    to the highest build where there are several."""
    families, behaviors = grid_of(grid)
    sites = sorted({str(s) for ds in data.values() for s in ds["site"].values})
    n_layers = max([ds.sizes.get("layer", 1) for ds in data.values()] + [1])
    panel = (max(2.5, 0.09 * n_layers), 2.0)
    width = max(MIN_WIDTH, 2 * len(behaviors) * panel[0] + 1.6)
    fig = new_figure(width, len(families) * panel[1] + 1.9)
    blocks = fig.subfigures(1, 2, wspace=0.03)
    several = any(ds.attrs.get("n_builds", 1) > 1 for ds in data.values())
    for block, (var, ylabel, heading) in zip(blocks, PROBE_PANELS):
        block.suptitle(wrap(heading, width / 2 - 0.3, 10), fontsize=10)
        axes = block.subplots(len(families), len(behaviors), squeeze=False)
        for r, family in enumerate(families):
            first = first_filled([var in data.get((family, b), {}) for b in behaviors])
            for c, behavior in enumerate(behaviors):
                ax = axes[r][c]
                ds = data.get((family, behavior))
                ax.set_title(f"{family} / {behavior}" + pooled_note(ds), fontsize=9)
                if ds is None or var not in ds:
                    empty(ax, why_empty((family, behavior), used, f"fit/{var}"))
                    continue
                _probe_lines(ax, ds, var, sites)
                layer_ticks(ax, [int(v) for v in ds["layer"].values])
                if var == "probe_accuracy":
                    ax.axhline(0.5, color="black", linestyle=":", linewidth=0.8)
                    ax.set_ylim(0.35, 1.03)
                ax.tick_params(labelsize=8)
                ax.set_xlabel("layer", fontsize=8)
                if c == first:
                    ax.set_ylabel(ylabel, fontsize=9)
    handles = [Line2D([], [], color=color, label="base" if m == "base" else "fine-tuned") for m, color in MODEL_COLORS.items()]
    handles += [Line2D([], [], color="black", linestyle=SITE_STYLES[i % len(SITE_STYLES)], label=f"site: {s}")
                for i, s in enumerate(sites)]
    if several:
        handles.append(Patch(color="#999999", alpha=0.3, label="band: lowest to highest build"))
    legend(fig, handles)
    title(fig, "Eval/deploy directions per layer, base vs fine-tuned" + pooled_title(data.values()))
    return fig


def _probe_lines(ax, ds: xr.Dataset, var: str, sites: list[str]) -> None:
    band = ds.attrs.get("n_builds", 1) > 1 and f"{var}_min" in ds
    for model in (str(m) for m in ds["model"].values):
        color = MODEL_COLORS.get(model, "black")
        for s, site in enumerate(sites):
            if site not in ds["site"].values:
                continue
            line = ds[var].sel(model=model, site=site)
            layers = line["layer"].values
            ax.plot(layers, line.values, color=color, linestyle=SITE_STYLES[s % len(SITE_STYLES)], marker="o",
                    markersize=2.5, linewidth=1.2)
            if band:
                lo, hi = (ds[f"{var}_{e}"].sel(model=model, site=site).values for e in ("min", "max"))
                ax.fill_between(layers, lo, hi, color=color, alpha=0.15, linewidth=0)
