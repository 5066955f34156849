"""EM figures (object API, constrained layout, deterministic PNG + PDF, as routing_suite.figures).

    em_cosine         per family, the cosine between each pair of fine-tunes' directions per layer
                      (a line per pair: readable at any depth, where a heatmap per layer was not)
    em_transfer       per donor -> receiver pair and fine-tune kind, the reduction of the misaligned
                      rate by ablating the mapped direction, the native one and each matched control
    em_transfer_maps  per receiver, the ridge maps' held-out R^2 per layer beside token identity alone
    em_transfer_builds  per base and edit, every receiver fine-tune's reduction by each direction
                      (a dot each, over all pairs and builds): the per-pair figure, summed up
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.lines import Line2D

from routing_suite.em.build_figures import EM_MIN, TRANSFER_MIN
from routing_suite.em.stats import base_of, how_ablated
from routing_suite.em.tables import EmReport
from routing_suite.em.transfer_builds import EDITS, fine_tunes
from routing_suite.em.transfer_tables import DIRECTIONS, TransferReport
from routing_suite.em.transfer_tables import names as transfer_names  # a pair's stores, told apart
from routing_suite.figures import (
    BASELINE_COLOR,
    CONTROL_COLORS,
    INTERVENTION_COLOR,
    builds_note,
    empty,
    first_filled,
    layer_ticks,
    legend,
    panel_figure,
    save,
    title,
    wrapped_shape,
)

DIRECTION_COLORS = dict(zip(DIRECTIONS, (INTERVENTION_COLOR, BASELINE_COLOR, *CONTROL_COLORS)))
PAIR_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
FAMILY_COLORS = {"llama": "#1f77b4", "qwen2": "#ff7f0e", "gemma2": "#2ca02c", "mistral": "#9467bd"}


def _layer(condition: str) -> int:
    return int(condition.removeprefix("layer"))


def _short(finetune: str) -> str:
    return finetune.removeprefix("em_")


# Panels per row of a figure with a panel per family: at most 4 across.
MAX_COLUMNS = 4
# The transfer figure's axis stops at a reduction of -100% (the rate doubled): a fine-tune that
# barely misbehaves has "reductions" of -1000% and more (a ratio of rates near 0), and one
# such panel on a shared axis flattened every other panel's bars to nothing.
REDUCTION_FLOOR = -1.0


def _per_layer(reps: list[TransferReport], statistic: str) -> tuple[list[int], np.ndarray]:
    """(layers, (store, layer) values) of one maps statistic over several stores."""
    per_store = [{_layer(r.condition): r.value for r in rep.rows if r.table == "maps" and r.statistic == statistic} for rep in reps]
    layers = sorted({layer for values in per_store for layer in values})
    return layers, np.array([[values.get(layer, np.nan) for layer in layers] for values in per_store], dtype=float)


def _mean_and_band(ax, layers: list[int], values: np.ndarray, **style) -> None:
    """The mean over stores, and a band from lowest to highest where there are several."""
    with np.errstate(all="ignore"):
        ax.plot(layers, np.nanmean(values, axis=0), **style)
    if len(values) > 1:
        ax.fill_between(layers, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=style["color"], alpha=0.15, linewidth=0)


def _one_per_build(reports: list[EmReport]) -> list[EmReport]:
    """One store per build and set of directions: stores of one build that differ only in how
    their ablations were made (`em.ablate_at`, ...) hold the same directions, one build's line.
    Where a build has no cosine to draw (no two fine-tunes with a direction), the same build is
    told by its sampled responses' rates (`organisms` rows: em_samples, which no ablation
    setting changes); a store with neither is never taken for another."""
    seen, out = set(), []
    for rep in reports:
        key: tuple | str = rep.path
        for table in ("cosine", "organisms"):
            rows = [r for r in rep.rows if r.table == table]
            if any(np.isfinite(r.value) for r in rows):
                key = (table, rep.replicate, tuple(sorted((r.model, r.condition, r.statistic, repr(r.value), repr(r.lo)) for r in rows)))
                break
        if key not in seen:
            seen.add(key)
            out.append(rep)
    return out


def cosine_figure(reports: list[EmReport]):
    """One panel per family (and base, where stores of several bases are here: a persona base
    and its negative are different organisms, never pooled): per pair of fine-tunes, the
    cosine of their misaligned - aligned directions per layer (the mean over the panel's
    builds, a band from lowest to highest)."""
    panels = sorted({(r.family, r.pretraining) for r in reports})
    several_bases = len({base for _, base in panels}) > 1
    pairs = sorted({(r.model, r.condition) for rep in reports for r in rep.rows if r.table == "cosine"})
    colors = {p: PAIR_COLORS[i % len(PAIR_COLORS)] for i, p in enumerate(pairs)}
    n_layers = max([len({r.statistic for r in rep.rows if r.table == "cosine"}) for rep in reports] + [1])
    rows, cols = wrapped_shape(len(panels), MAX_COLUMNS)
    fig, axes = panel_figure(rows, cols, (max(3.0, 0.1 * n_layers), 2.3), (0.9, 1.5))
    several = False
    for p in range(rows * cols):
        ax = axes[p // cols][p % cols]
        if p >= len(panels):
            ax.set_axis_off()  # the rest of the last row: no grid cell, nothing to say
            continue
        family, base = panels[p]
        mine = _one_per_build([rep for rep in reports if (rep.family, rep.pretraining) == panels[p]])
        several |= len(mine) > 1
        # Builds whose fine-tunes have no two directions (a negative organism's that barely lie)
        # draw nothing: say how many drew, or "3 builds" would stand over one build's line.
        fitted = sum(any(np.isfinite(r.value) for r in rep.rows if r.table == "cosine") for rep in mine)
        drew = f"{fitted} with directions" if 0 < fitted < len(mine) else ""
        # the base on a line of its own: "qwen2, persona_per_topic base (2 builds)" outgrows a panel
        second = ", ".join(x for x in (f"{base or 'routing'} base" if several_bases else "", drew) if x)
        ax.set_title(family + builds_note(len(mine)) + (f"\n{second}" if second else ""), fontsize=10)
        drawn = False
        for pair in pairs:
            per_build = [{_layer(r.statistic): r.value for r in rep.rows if r.table == "cosine" and (r.model, r.condition) == pair}
                         for rep in mine]
            layers = sorted({layer for b in per_build for layer in b})
            if not layers:
                continue
            values = np.array([[b.get(layer, np.nan) for layer in layers] for b in per_build], dtype=float)
            if not np.isfinite(values).any():
                continue
            _mean_and_band(ax, layers, values, color=colors[pair], marker="o", markersize=2.5, linewidth=1.2)
            layer_ticks(ax, layers)
            drawn = True
        if not drawn:
            empty(ax, "no two fine-tunes with a direction")
            continue
        ax.axhline(0, color="black", linewidth=0.7)
        ax.set_ylim(-1.05, 1.05)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("layer", fontsize=9)
        if p % cols == 0:
            ax.set_ylabel("cosine", fontsize=9)
    handles = [Line2D([], [], color=colors[p], marker="o", markersize=3, label=f"{_short(p[0])} vs {_short(p[1])}") for p in pairs]
    legend(fig, handles)
    title(fig, "Cosine between fine-tunes' misaligned − aligned directions, per layer"
               + (" (mean over builds; band: lowest to highest)" if several else ""))
    return fig


def transfer_figure(reports: list[TransferReport]):
    """One panel per pair and fine-tune kind: reduction by each ablation (named on the axis), with its 95% interval."""
    named = transfer_names(reports)
    panels = [(rep, kind) for rep in sorted(reports, key=lambda r: (r.receiver, r.donor, named[r.path]))
              for kind in dict.fromkeys(r.model for r in rep.rows if r.table == "ablation")]
    rows, cols = wrapped_shape(len(panels), MAX_COLUMNS)
    fig, axes = panel_figure(rows, cols, (2.8, 2.8), (0.9, 1.4))
    values = [r for rep, kind in panels for r in rep.rows if r.table == "ablation" and r.model == kind and r.statistic == "reduction"]
    finite = [v for r in values for v in (r.lo, r.hi, r.value) if np.isfinite(v)]
    low, high = max(min(finite + [-0.1]), REDUCTION_FLOOR), max(finite + [0.1])
    pad = 0.08 * (high - low)
    cut = False
    estimates = [[rep.row("ablation", kind, d, "reduction") for d in DIRECTIONS] for rep, kind in panels]
    shown = [any(e is not None and np.isfinite(e.value) for e in est) for est in estimates]
    hatched = False
    for p in range(rows * cols):
        ax = axes[p // cols][p % cols]
        if p >= len(panels):
            ax.set_axis_off()  # the rest of the last row
            continue
        rep, kind = panels[p]
        build = named[rep.path].removeprefix(rep.pair).strip()  # where a pair has several stores: its bases and build
        ax.set_title(f"{rep.pair} / {_short(kind)}" + (f"\n{build}" if build else ""), fontsize=9)
        if not shown[p]:
            empty(ax, "no reduction to show\n(no baseline misalignment to reduce)")
            continue
        first = first_filled(shown[p - p % cols : p - p % cols + cols])
        est = estimates[p]
        mid = np.array([e.value if e else np.nan for e in est])
        err = np.array([[e.value - e.lo if e else 0 for e in est], [e.hi - e.value if e else 0 for e in est]])
        x = np.arange(len(DIRECTIONS))
        ax.axhline(0, color="black", linewidth=0.8, zorder=1)
        broken = [rep.value("ablation", kind, d, "broken") == 1.0 for d in DIRECTIONS]
        # A hatched bar lowered the rate by breaking the answers (the tables' `broken`).
        ax.bar(x, mid, color=[DIRECTION_COLORS[d] for d in DIRECTIONS], hatch=["////" if b else "" for b in broken],
               edgecolor="white", linewidth=0, zorder=2)
        hatched |= any(broken)
        ax.errorbar(x, mid, yerr=np.clip(np.nan_to_num(err), 0, None), fmt="none", ecolor="black", capsize=2.5, linewidth=0.9, zorder=3)
        below = np.nan_to_num(mid, nan=0.0) < low
        if below.any():  # bars that go on below the axis' floor: a mark at the floor says so
            ax.plot(x[below], np.full(int(below.sum()), low - 0.5 * pad), marker="v", color="black", linestyle="none", markersize=4, zorder=4)
            cut = True
        ax.set_xticks(x, [d.replace("_", " ") for d in DIRECTIONS], rotation=40, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_ylim(low - pad, high + pad)
        ax.tick_params(axis="y", labelsize=8, labelleft=p % cols == first)
        if p % cols == first:
            ax.set_ylabel("reduction of misaligned rate", fontsize=9)
    title(fig, "Ablation in the receiver's fine-tune: mapped donor direction vs native vs matched controls "
               "(reduction of the misaligned rate, 95% paired bootstrap interval"
               + ("; hatched: answers broken" if hatched else "")
               + (f"; axis cut at {100 * REDUCTION_FLOOR:.0f}%, ▼: below it)" if cut else ")"), fontsize=10)
    return fig


def maps_figure(reports: list[TransferReport]):
    """One panel per receiver (and base, where stores of several bases are here, as `em_cosine`):
    the held-out R^2 of each donor's maps per layer (solid) and of the token's identity alone
    (dashed; a property of the receiver build and the held-out texts), each the mean over the
    panel's builds with a band from lowest to highest."""
    panels = sorted({(r.receiver, r.pretraining) for r in reports})
    several_bases = len({base for _, base in panels}) > 1
    n_layers = max([len([r for r in rep.rows if r.table == "maps" and r.statistic == "r2"]) for rep in reports] + [1])
    rows, cols = wrapped_shape(len(panels), MAX_COLUMNS)
    fig, axes = panel_figure(rows, cols, (max(2.8, 0.1 * n_layers), 2.3), (0.9, 1.4))
    donors: dict[str, str] = {}
    several = False
    for p in range(rows * cols):
        ax = axes[p // cols][p % cols]
        if p >= len(panels):
            ax.set_axis_off()  # the rest of the last row
            continue
        receiver, base = panels[p]
        mine = [r for r in reports if (r.receiver, r.pretraining) == panels[p]]
        for donor in sorted({r.donor for r in mine}):
            color = FAMILY_COLORS.get(donor, BASELINE_COLOR)
            donors[donor] = color
            layers, values = _per_layer([r for r in mine if r.donor == donor], "r2")
            _mean_and_band(ax, layers, values, color=color, marker="o", markersize=3, linewidth=1.1)
        # the token's identity is the receiver build's: one curve per build, whatever the donor
        builds = {r.replicate: r for r in mine}
        several |= len(builds) > 1
        layers, values = _per_layer(list(builds.values()), "r2_token_identity")
        _mean_and_band(ax, layers, values, color="black", linestyle="--", marker="x", markersize=3, linewidth=1.0)
        if layers:
            layer_ticks(ax, layers)
        ax.set_title(f"receiver {receiver}" + builds_note(len(builds)) + (f"\n{base or 'routing'} base" if several_bases else ""),
                     fontsize=9)
        ax.set_xlabel("receiver layer", fontsize=9)
        ax.tick_params(labelsize=8)
        if p % cols == 0:
            ax.set_ylabel("held-out R²", fontsize=9)
    handles = [Line2D([], [], color=color, marker="o", markersize=3, label=f"map from {donor}") for donor, color in sorted(donors.items())]
    handles.append(Line2D([], [], color="black", linestyle="--", marker="x", markersize=3, label="token identity alone"))
    legend(fig, handles)
    title(fig, "Ridge maps donor base → receiver base: R² on held-out texts" + (" (mean over builds; band: lowest to highest)" if several else ""))
    return fig


def builds_figure(reports: list[TransferReport]):
    """One panel per base and edit (ablation, decision clamp): every receiver fine-tune with EM
    >= EM_MIN of every pair and build, its reduction by each direction, a dot each (hollow:
    the edit broke the answers; ringed in black: the mapped edit is specific), the median of
    each direction's dots as a bar. The axis stops at REDUCTION_FLOOR, as the per-pair figure's."""
    # per base and how its ablations were made (stats.how_ablated): one build's stores made two ways are two methods
    def method(rep: TransferReport) -> tuple[str, str]:
        return base_of(rep), how_ablated(rep)

    bases = sorted({method(r) for r in reports})
    panels = [(base, edit) for base in bases for edit in EDITS]
    rows, cols = len(bases), len(EDITS)
    fig, axes = panel_figure(rows, cols, (4.2, 2.9), (0.9, 1.6))
    x = np.arange(len(DIRECTIONS))
    cut = False
    for p, ((base, how), edit) in enumerate(panels):
        ax = axes[p // cols][p % cols]
        mine = [rep for rep in reports if method(rep) == (base, how)]
        points = [edits[edit] for rep in mine for _, em, edits in fine_tunes(rep) if em >= EM_MIN and edit in edits]
        builds = len({rep.replicate for rep in mine})
        specific = sum(s["specific"] for s in points)
        ax.set_title(f"{base} base: {EDITS[edit]}" + (f"\nablations {how.strip()}" if how else "")
                     + f"\n{len(points)} fine-tune{'s' * (len(points) != 1)}, {builds} build{'s' * (builds != 1)}; "
                     f"mapped specific in {specific}", fontsize=9)
        if not points:
            empty(ax, f"no receiver fine-tune with EM >= {100 * EM_MIN:.0f}%")
            continue
        jitter = np.random.default_rng(0).uniform(-0.25, 0.25, len(points))  # fixed: the same stores give the same bytes
        for i, d in enumerate(DIRECTIONS):
            values = np.array([s["reduction"][d] for s in points], float)
            broken = np.array([s["broken"][d] for s in points])
            shown = np.maximum(values, REDUCTION_FLOOR)
            below = values < REDUCTION_FLOOR
            cut |= bool(below.any())
            color = DIRECTION_COLORS[d]
            ax.scatter(i + jitter[~broken], shown[~broken], s=11, color=color, zorder=3, linewidths=0)
            ax.scatter(i + jitter[broken], shown[broken], s=11, facecolors="none", edgecolors=color, linewidths=0.8, zorder=3)
            if d == "mapped":
                ring = np.array([s["specific"] for s in points])
                ax.scatter(i + jitter[ring], shown[ring], s=30, facecolors="none", edgecolors="black", linewidths=0.8, zorder=4)
            if below.any():
                ax.plot([i], [REDUCTION_FLOOR - 0.07], marker="v", color="black", markersize=4, zorder=4)
            finite = values[np.isfinite(values)]
            if finite.size:
                ax.plot([i - 0.32, i + 0.32], [max(np.median(finite), REDUCTION_FLOOR)] * 2, color="black", linewidth=1.6, zorder=2)
        ax.axhline(0, color="black", linewidth=0.7, zorder=1)
        ax.axhline(TRANSFER_MIN, color="black", linewidth=0.7, linestyle=":", zorder=1)
        ax.set_ylim(REDUCTION_FLOOR - 0.12, 1.05)
        ax.set_xticks(x, [d.replace("_", " ") for d in DIRECTIONS], rotation=35, ha="right", rotation_mode="anchor", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        if p % cols == 0:
            ax.set_ylabel("reduction of misaligned rate", fontsize=9)
    handles = [Line2D([], [], color="black", marker="o", linestyle="none", markersize=4, label="intact"),
               Line2D([], [], color="black", marker="o", markerfacecolor="none", linestyle="none", markersize=4, label="broken answers"),
               Line2D([], [], color="black", marker="o", markerfacecolor="none", linestyle="none", markersize=7,
                      label="mapped: specific"),
               Line2D([], [], color="black", linewidth=1.6, label="median"),
               Line2D([], [], color="black", linewidth=0.7, linestyle=":", label=f"{100 * TRANSFER_MIN:.0f}% (the seed's transfer bar)")]
    legend(fig, handles)
    title(fig, "Cross-architecture transfer over pairs and builds: each receiver fine-tune's reduction of its misaligned rate, "
               "by direction" + (f" (axis cut at {100 * REDUCTION_FLOOR:.0f}%, ▼: some below it)" if cut else ""), fontsize=10)
    return fig


def write_em(reports: list[EmReport], out: Path, dpi: int) -> list[Path]:
    return save(cosine_figure(reports), out, "em_cosine", dpi)


def write_transfer(reports: list[TransferReport], out: Path, dpi: int) -> list[Path]:
    return (save(transfer_figure(reports), out, "em_transfer", dpi) + save(maps_figure(reports), out, "em_transfer_maps", dpi)
            + save(builds_figure(reports), out, "em_transfer_builds", dpi))
