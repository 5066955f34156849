"""EM figures (object API, fixed margins, deterministic PNG + PDF, as routing_suite.aggregate.plots).

    em_cosine         per family, the cosine matrix of the fine-tunes' directions, one heatmap per layer
    em_transfer       per donor -> receiver pair and fine-tune kind, the reduction of the misaligned
                      rate by ablating the mapped direction, the native one and each matched control
    em_transfer_maps  per pair, the ridge maps' held-out R^2 per layer beside token identity alone
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from routing_suite.aggregate.em_tables import EmReport
from routing_suite.aggregate.em_transfer_tables import DIRECTIONS, TransferReport
from routing_suite.aggregate.plots import (
    BASELINE_COLOR,
    CONTROL_COLORS,
    INTERVENTION_COLOR,
    _colorbar,
    _panel_grid,
    save,
)

DIRECTION_COLORS = dict(zip(DIRECTIONS, (INTERVENTION_COLOR, BASELINE_COLOR, *CONTROL_COLORS)))


def _title(fig: Figure, text: str) -> None:
    fig.suptitle(text, y=1 - 0.15 / fig.get_size_inches()[1], va="top", fontsize=10)


def cosine_figure(reports: list[EmReport]) -> Figure:
    """Rows: families; columns: layers; each panel the fine-tune x fine-tune cosine matrix."""
    reports = sorted(reports, key=lambda r: r.family)
    cosines = [xr.open_zarr(r.path, group="em_directions").cosine.load() for r in reports]
    n_layers = max(c.sizes["layer"] for c in cosines)
    fig, axes = _panel_grid(len(reports), n_layers, (1.7, 1.7), (0.25, 0.55), (1.1, 0.9, 0.6, 1.2))
    image = None
    for r, (rep, cos) in enumerate(zip(reports, cosines)):
        names = [str(f).removeprefix("em_") for f in cos.finetune.values]
        for c in range(n_layers):
            ax = axes[r][c]
            ax.set_title(f"{rep.family} L{c}", fontsize=8)
            if c >= cos.sizes["layer"]:
                ax.set_axis_off()
                continue
            values = cos.isel(layer=c).values
            image = ax.imshow(values, vmin=-1, vmax=1, cmap="RdBu_r")
            for i, j in np.ndindex(values.shape):
                if np.isfinite(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:+.2f}", ha="center", va="center", fontsize=5.5)
            ax.set_xticks(range(len(names)), names if r == len(reports) - 1 else [], fontsize=6, rotation=35, ha="right")
            ax.set_yticks(range(len(names)), names if c == 0 else [], fontsize=6)
    if image is not None:
        width = fig.get_size_inches()[0]
        _colorbar(fig, image, width - 1.0, 0.9, 1.7, "cosine")
    _title(fig, "Cosine between fine-tunes' misaligned - aligned directions, per layer")
    return fig


def transfer_figure(reports: list[TransferReport]) -> Figure:
    """One panel per pair and fine-tune kind: reduction by each ablation, with its 95% interval."""
    panels = [(rep, kind) for rep in sorted(reports, key=lambda r: (r.receiver, r.donor))
              for kind in dict.fromkeys(r.model for r in rep.rows if r.table == "ablation")]
    cols = min(4, max(1, len(panels)))
    rows = -(-len(panels) // cols)
    fig, axes = _panel_grid(rows, cols, (2.6, 1.9), (0.35, 0.6), (0.8, 0.7, 0.8, 0.2 + max(0.0, 3 - cols) * 1.6))
    values = [r for rep, kind in panels for r in rep.rows if r.table == "ablation" and r.model == kind and r.statistic == "reduction"]
    finite = [v for r in values for v in (r.lo, r.hi, r.value) if np.isfinite(v)]
    low, high = min(finite + [-0.1]), max(finite + [0.1])
    pad = 0.08 * (high - low)
    for p in range(rows * cols):
        ax = axes[p // cols][p % cols]
        if p >= len(panels):
            ax.set_axis_off()
            continue
        rep, kind = panels[p]
        est = [next((r for r in rep.rows if r.table == "ablation" and r.model == kind and r.condition == d and r.statistic == "reduction"),
                    None) for d in DIRECTIONS]
        mid = np.array([e.value if e else np.nan for e in est])
        err = np.array([[e.value - e.lo if e else 0 for e in est], [e.hi - e.value if e else 0 for e in est]])
        x = np.arange(len(DIRECTIONS))
        ax.axhline(0, color="black", linewidth=0.8, zorder=1)
        ax.bar(x, mid, color=[DIRECTION_COLORS[d] for d in DIRECTIONS], zorder=2)
        ax.errorbar(x, mid, yerr=np.clip(np.nan_to_num(err), 0, None), fmt="none", ecolor="black", capsize=2.5, linewidth=0.9, zorder=3)
        ax.set_xticks([])
        ax.set_ylim(low - pad, high + pad)
        ax.set_title(f"{rep.pair} / {kind.removeprefix('em_')}", fontsize=8)
        ax.tick_params(labelsize=7, labelleft=p % cols == 0)
        if p % cols == 0:
            ax.set_ylabel("reduction of misaligned rate", fontsize=8)
    handles = [Patch(color=DIRECTION_COLORS[d], label=d.replace("_", " ")) for d in DIRECTIONS]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    _title(fig, "Ablation in the receiver's fine-tune: mapped donor direction vs native vs matched controls\n"
                "(reduction of the misaligned rate, 95% paired bootstrap interval)")
    return fig


FAMILY_COLORS = {"llama": "#1f77b4", "qwen2": "#ff7f0e", "gemma2": "#2ca02c", "mistral": "#9467bd"}


def maps_figure(reports: list[TransferReport]) -> Figure:
    """One panel per receiver: the held-out R^2 of each donor's maps per layer (solid) and of the
    token's identity alone (dashed; a property of the receiver and the held-out texts)."""
    receivers = sorted({r.receiver for r in reports})
    # At least 7 inches wide: room for the title and the legend.
    right = max(0.2, 7.0 - 0.8 - len(receivers) * 3.2 + 0.6)
    fig, axes = _panel_grid(1, len(receivers), (2.6, 2.0), (0.6, 0.3), (0.8, 1.0, 0.6, right))
    donors: dict[str, str] = {}
    for c, receiver in enumerate(receivers):
        ax = axes[0][c]
        mine = sorted((r for r in reports if r.receiver == receiver), key=lambda r: r.donor)
        for rep in mine:
            rows = [r for r in rep.rows if r.table == "maps" and r.statistic == "r2"]
            color = FAMILY_COLORS.get(rep.donor, BASELINE_COLOR)
            donors[rep.donor] = color
            ax.plot([int(r.condition.removeprefix("layer")) for r in rows], [r.value for r in rows], color=color, marker="o",
                    markersize=3, linewidth=1.1)
        token = [r for r in mine[0].rows if r.table == "maps" and r.statistic == "r2_token_identity"]
        layers = [int(r.condition.removeprefix("layer")) for r in token]
        ax.plot(layers, [r.value for r in token], color="black", linestyle="--", marker="x", markersize=3, linewidth=1.0)
        ax.set_xticks(layers)
        ax.set_title(f"receiver {receiver}", fontsize=8)
        ax.set_xlabel("receiver layer", fontsize=8)
        ax.tick_params(labelsize=7)
        if c == 0:
            ax.set_ylabel("held-out R^2", fontsize=8)
    handles = [Line2D([], [], color=color, marker="o", markersize=3, label=f"map from {donor}") for donor, color in sorted(donors.items())]
    handles.append(Line2D([], [], color="black", linestyle="--", marker="x", markersize=3, label="token identity alone"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    _title(fig, "Ridge maps donor base -> receiver base: R^2 on held-out texts")
    return fig


def write_all(em_reports: list[EmReport], transfer_reports: list[TransferReport], out: Path, dpi: int) -> list[Path]:
    written: list[Path] = []
    if em_reports:
        written += save(cosine_figure(em_reports), out, "em_cosine", dpi)
    if transfer_reports:
        written += save(transfer_figure(transfer_reports), out, "em_transfer", dpi)
        written += save(maps_figure(transfer_reports), out, "em_transfer_maps", dpi)
    return written
