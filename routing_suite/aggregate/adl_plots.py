"""ADL figures, one panel per model pair on a family x behaviour grid (as the routing plots).

- adl_relevance: relevance of the difference vs the two baselines per layer
  (best over positions), logit lens solid, patchscope dashed;
- adl_steering: similarity to the fine-tuning data vs steering strength
  (difference and random direction), incoherent strengths hollow, the chosen
  alpha dotted;
- adl_delta_ce: delta-CE of projection replacement per layer on fine-tuning
  data and unrelated text (random direction dashed), +-1 standard error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from routing_suite.aggregate.adl_tables import AdlRow
from routing_suite.aggregate.plots import _grid, _panels, _span, save

SOURCE_COLORS = {"difference": "#d62728", "base_mean": "#7f7f7f", "finetuned_mean": "#1f77b4"}
DATA_COLORS = {"finetune": "#d62728", "unrelated": "#1f77b4"}


def _figure(rows: list[AdlRow], size=(2.8, 1.9), gaps=(0.45, 0.55), left=0.75, bottom=0.9, top=0.7):
    families, behaviors = _grid([(r.family, r.behavior) for r in rows])
    # At least 8 inches wide, so that the title and the legend fit above and below a single panel.
    width = max(8.0, left + 0.2 + _span(len(behaviors), size[0], gaps[0]))
    fig = Figure(figsize=(width, bottom + top + _span(len(families), size[1], gaps[1])))
    axes = _panels(fig, len(families), len(behaviors), left, bottom, size, gaps)
    by_cell = {(r.family, r.behavior): r for r in rows}
    panels = []
    for i, family in enumerate(families):
        for j, behavior in enumerate(behaviors):
            ax = axes[i][j]
            ax.set_title(f"{family} / {behavior}", fontsize=9)
            ax.tick_params(labelsize=7)
            row = by_cell.get((family, behavior))
            if row is None:
                ax.text(0.5, 0.5, "no ADL store", ha="center", va="center", transform=ax.transAxes, fontsize=9, color="#777777")
                ax.set_axis_off()
            else:
                panels.append((ax, row, i == len(families) - 1, j == 0))
    return fig, panels


def _title(fig: Figure, text: str) -> None:
    fig.suptitle(text, y=1 - 0.2 / fig.get_size_inches()[1], va="top", fontsize=11)


def relevance_figure(rows: list[AdlRow]) -> Figure:
    fig, panels = _figure(rows)
    for ax, row, last_row, first_col in panels:
        rel = xr.open_zarr(row.path, group="adl_readout", consolidated=False).relevance.load().max("position")
        layers = rel.layer.values
        for source, color in SOURCE_COLORS.items():
            for readout, style in (("logit_lens", "-"), ("patchscope", "--")):
                ax.plot(layers, rel.sel(source=source, readout=readout).values, color=color, linestyle=style, marker="o", markersize=2.5, linewidth=1.1)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xticks(layers)
        if last_row:
            ax.set_xlabel("layer", fontsize=8)
        if first_col:
            ax.set_ylabel("relevant share of top tokens", fontsize=8)
    handles = [Line2D([], [], color=c, label=s.replace("_", " ")) for s, c in SOURCE_COLORS.items()]
    handles += [Line2D([], [], color="black", linestyle="-", label="logit lens"), Line2D([], [], color="black", linestyle="--", label="patchscope")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    _title(fig, "Token relevance per layer (best over the first k positions): difference vs baselines")
    return fig


def steering_figure(rows: list[AdlRow]) -> Figure:
    fig, panels = _figure(rows)
    for ax, row, last_row, first_col in panels:
        steer = xr.open_zarr(row.path, group="adl_steer", consolidated=False).load()
        alphas = steer.alpha.values
        for direction, style in (("difference", "-"), ("random", "--")):
            if direction not in steer.direction.values:
                continue
            sim = steer.similarity.sel(direction=direction).mean("prompt").values
            ok = steer.coherent.sel(direction=direction).values.astype(bool)
            ax.plot(alphas, sim, color="#d62728" if direction == "difference" else "#7f7f7f", linestyle=style, linewidth=1.1)
            ax.scatter(alphas[ok], sim[ok], s=12, color="#d62728" if direction == "difference" else "#7f7f7f", zorder=3)
            ax.scatter(alphas[~ok], sim[~ok], s=12, facecolors="none", edgecolors="#d62728" if direction == "difference" else "#7f7f7f", zorder=3)
        ax.axvline(row.best_alpha, color="black", linestyle=":", linewidth=0.9)
        if last_row:
            ax.set_xlabel("alpha (× mean residual norm)", fontsize=8)
        if first_col:
            ax.set_ylabel("similarity to ft data", fontsize=8)
    handles = [Line2D([], [], color="#d62728", label="difference"), Line2D([], [], color="#7f7f7f", linestyle="--", label="random direction"),
               Line2D([], [], color="black", marker="o", linestyle="none", markerfacecolor="none", label="incoherent"),
               Line2D([], [], color="black", linestyle=":", label="chosen alpha")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    _title(fig, "Steering: similarity of the fine-tune's text to its fine-tuning data")
    return fig


def delta_ce_figure(rows: list[AdlRow]) -> Figure:
    fig, panels = _figure(rows)
    for ax, row, last_row, first_col in panels:
        causal = xr.open_zarr(row.path, group="adl_causal", consolidated=False).load()
        layers = causal.layer.values
        for data, color in DATA_COLORS.items():
            for condition, style in (("difference", "-"), ("random", "--")):
                if condition not in causal.condition.values:
                    continue
                mean = causal.delta_ce.sel(data=data, condition=condition).values
                se = np.nan_to_num(causal.delta_ce_se.sel(data=data, condition=condition).values)
                ax.errorbar(layers, mean, yerr=se, color=color, linestyle=style, marker="o", markersize=2.5, linewidth=1.1, capsize=2)
        ax.axhline(0, color="black", linewidth=0.7)
        ax.set_xticks(layers)
        if last_row:
            ax.set_xlabel("layer", fontsize=8)
        if first_col:
            ax.set_ylabel("ΔCE (replaced − ft)", fontsize=8)
    handles = [Line2D([], [], color=c, label=f"{d.replace('finetune', 'fine-tuning')} data") for d, c in DATA_COLORS.items()]
    handles += [Line2D([], [], color="black", linestyle="--", label="random direction")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    _title(fig, "Projection replacement along the difference: change in cross-entropy")
    return fig


def write_all(rows: list[AdlRow], out: Path, dpi: int) -> list[Path]:
    written: list[Path] = []
    for stem, make in (("adl_relevance", relevance_figure), ("adl_steering", steering_figure), ("adl_delta_ce", delta_ce_figure)):
        written += save(make(rows), out, stem, dpi)
    return written
