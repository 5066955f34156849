"""What every figure of every study shares: the figure itself, saving, the grid, ticks, legends.

Figures are built with the object API (`matplotlib.figure.Figure`, Agg canvas),
never pyplot, so nothing depends on a display or global state. Layout is
matplotlib's constrained layout: titles, tick labels, legends and colorbars get
the room they need, so nothing is clipped whatever the labels, from one panel to
a 4 x 3 grid. Each figure is saved as PNG and PDF at a fixed DPI with no dates
in the metadata, so the same inputs give the same bytes.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

Cell = tuple[str, str]
_METADATA = {
    "png": {"Software": None},
    "pdf": {"CreationDate": None, "ModDate": None, "Creator": None, "Producer": None},
}
# A figure is never narrower than this: the title and the legend of a single
# panel need the room (a single panel then stretches to the width).
MIN_WIDTH = 6.4
# Layer axes carry at most this many tick labels (30+ layers stay readable).
MAX_LAYER_TICKS = 8
_NICE_STEPS = (1, 2, 5, 10, 20, 25, 50, 100)
EMPTY_COLOR = "#777777"
# One colour per role in every study's figures: unedited, the intervention, its controls.
BASELINE_COLOR = "#595959"
INTERVENTION_COLOR = "#1f77b4"
CONTROL_COLORS = ("#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


def save(fig: Figure, out: Path, stem: str, dpi: int) -> list[Path]:
    """`stem`.png and `stem`.pdf, deterministic."""
    paths = []
    for fmt in ("png", "pdf"):
        path = out / f"{stem}.{fmt}"
        fig.savefig(path, format=fmt, dpi=dpi, metadata=_METADATA[fmt])
        paths.append(path)
    return paths


def grid_of(cells: Sequence[Cell]) -> tuple[list[str], list[str]]:
    """The families (rows) and behaviours (columns) of a family x behaviour grid."""
    return sorted({f for f, _ in cells}), sorted({b for _, b in cells})


def wrapped_shape(n: int, max_cols: int) -> tuple[int, int]:
    """Rows and columns of a figure of n panels laid out row by row, at most `max_cols` across."""
    cols = min(max_cols, max(1, n))
    return -(-max(1, n) // cols), cols


def new_figure(width: float, height: float) -> Figure:
    """An empty constrained-layout figure of width x height inches."""
    fig = Figure(figsize=(width, height), layout="constrained")
    fig.get_layout_engine().set(w_pad=0.06, h_pad=0.06, wspace=0.04, hspace=0.06)
    return fig


def panel_figure(rows: int, cols: int, panel: tuple[float, float], extra: tuple[float, float] = (1.0, 1.4),
                 min_width: float = MIN_WIDTH) -> tuple[Figure, list[list[Axes]]]:
    """A constrained-layout figure of rows x cols panels of about `panel` inches each;
    `extra` (width, height) inches for the labels, titles and legend around them."""
    fig = new_figure(max(min_width, cols * panel[0] + extra[0]), rows * panel[1] + extra[1])
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [list(row) for row in axes]


def wrap(text: str, width_in: float, fontsize: float) -> str:
    """`text` broken into lines that fit `width_in` inches at `fontsize` (each paragraph apart)."""
    # About 0.55 em per character for the default sans-serif font.
    chars = max(20, int(width_in * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def title(fig: Figure, text: str, fontsize: float = 11) -> None:
    """The figure's title, wrapped to its width (a title wider than the figure is clipped)."""
    fig.suptitle(wrap(text, fig.get_size_inches()[0] - 0.3, fontsize), fontsize=fontsize)


def legend(fig: Figure, handles: list, labels: list[str] | None = None, fontsize: float = 9) -> None:
    """A legend below the panels, in as many columns as fit the figure's width."""
    labels = labels if labels is not None else [h.get_label() for h in handles]
    if not handles:
        return
    # One entry: the handle (~0.6 in) and the label at ~0.55 em per character. One row when
    # every entry fits; else columns as wide as the widest entry.
    widths = [0.6 + len(s) * 0.55 * fontsize / 72 for s in labels]
    room = fig.get_size_inches()[0] - 0.3
    ncol = len(handles) if sum(widths) <= room else max(1, min(len(handles), int(room // max(widths))))
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=fontsize, frameon=False)


def empty(ax: Axes, text: str) -> None:
    """A grid cell without data says why, in its panel."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color=EMPTY_COLOR)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("#cccccc")


def layer_step(n: int, max_ticks: int = MAX_LAYER_TICKS) -> int:
    """A round step (1, 2, 5, 10, ...) that labels at most `max_ticks` of n layers."""
    return next((s for s in _NICE_STEPS if -(-n // s) <= max_ticks), -(-n // max_ticks))


def layer_ticks(ax: Axes, layers: Sequence[int], axis: str = "x", positions: bool = False) -> None:
    """Tick the layers that are multiples of a round step. `positions`: the axis is indexed
    by position in `layers` (a heatmap's columns), not by the layer's number (a line plot)."""
    step = layer_step(len(layers))
    picked = [(i, int(v)) for i, v in enumerate(layers) if int(v) % step == 0] or [(0, int(layers[0]))]
    where = [i if positions else v for i, v in picked]
    (ax.set_xticks if axis == "x" else ax.set_yticks)(where, [str(v) for _, v in picked])
    if not positions:  # whole layers only; no ticks outside the data
        lo, hi = min(layers), max(layers)
        (ax.set_xlim if axis == "x" else ax.set_ylim)(lo - 0.5, hi + 0.5)


def first_filled(row: Sequence[bool]) -> int:
    """The first panel of a row that shows data: it carries the row's y label."""
    return next((c for c, filled in enumerate(row) if filled), 0)


def builds_note(n: int, variants: int = 1) -> str:
    """What a panel's title says about how many stores it pools: builds (replicate
    organisms), and variants (other settings of the cell) when there are several."""
    if variants > 1:
        return f" ({variants} variants, {n} stores)"
    return "" if n <= 1 else f" ({n} builds)"
