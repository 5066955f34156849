"""The routing study's results from finished stores: each cell's bootstrapped rows, the
tables (per build and pooled over builds), the figures, the headline and report.md's
section. The aggregator reaches it through `routing_suite.routing.study`; one cell
writes its own table with `write_cell`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import xarray as xr

from routing_suite.figures import save
from routing_suite.provenance import flatten
from routing_suite.routing import patching_plots, plots, pooled, report, tables
from routing_suite.routing.outcomes import CellOutcomes, CorruptGroup, read_group, read_outcomes, variant_labels
from routing_suite.routing.stats import ConditionStats, cell_stats
from routing_suite.store import read_store_attrs
from routing_suite.text_tables import TableSettings, write_files

log = logging.getLogger(__name__)

# The localize and fit arrays the figures show, per group.
PLOTTED = {"localize": ("layer_effect", "head_effect"), "fit": ("probe_accuracy", "direction_norm")}


@dataclass
class RoutingCell:
    """One store's outcomes, their rows (one per condition) and, for the figures, its plotted
    groups (read before anything is written)."""

    outcomes: CellOutcomes
    rows: list[ConditionStats]
    plotted: dict[str, xr.Dataset] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return self.outcomes.path

    @property
    def cell(self) -> tuple[str, str]:
        return self.outcomes.family, self.outcomes.behavior


def read_plotted(path: str | Path) -> tuple[dict[str, xr.Dataset], list[CorruptGroup]]:
    """The store's plotted groups that it has, and the damaged ones (left out of the figures)."""
    found, damaged = {}, []
    for group, variables in PLOTTED.items():
        try:
            ds = read_group(path, group, variables)
        except CorruptGroup as err:
            damaged.append(err)
            continue
        if ds is not None:
            found[group] = ds
    return found, damaged


def summarize(outcomes: CellOutcomes, settings: Any, plotted: dict[str, xr.Dataset] | None = None) -> RoutingCell:
    rows = cell_stats(outcomes, settings.n_resamples, settings.seed, settings.confidence)
    return RoutingCell(outcomes, rows, plotted or {})


def _rows(cells: list[RoutingCell]) -> list[ConditionStats]:
    return [r for c in cells for r in c.rows]


def grouped(cells: list[RoutingCell]) -> list[tables.Cell]:
    """The rows grouped by cell (family, behaviour, variant) and build."""
    return tables.group_cells(_rows(cells), variant_labels([c.outcomes for c in cells]))


def headline(cells: list[RoutingCell]) -> str:
    return pooled.headline(grouped(cells))


def table_files(cells: list[RoutingCell]) -> dict[str, str]:
    by_cell = grouped(cells)
    return {
        "cells.csv": tables.cells_csv(_rows(cells)),
        "table.md": pooled.markdown_table(by_cell),
        "table_builds.md": tables.builds_markdown(by_cell),
        "table.csv": pooled.wide_csv(by_cell),
        "table.tex": pooled.latex_table(by_cell),
        "headline.txt": pooled.headline(by_cell) + "\n",
    }


def pooled_groups(cells: list[RoutingCell], group: str) -> dict[tuple[str, str], xr.Dataset]:
    """Per cell, the stores' `group` pooled over the cell's builds (plots.pool_builds),
    each build marked with its variant and the layers its fine-tune was planted in."""
    builds: dict[tuple[str, str], list] = {}
    for c in cells:
        ds = c.plotted.get(group)
        if ds is not None:
            ds.attrs.update(planted=patching_plots.planted_layers(c.outcomes.settings), variant=c.outcomes.variant)
            builds.setdefault(c.cell, []).append(ds)
    pooled_builds = {k: plots.pool_builds(v, PLOTTED[group]) for k, v in builds.items()}
    return {k: v for k, v in pooled_builds.items() if v is not None}


def figures(cells: list[RoutingCell], grid: list[tuple[str, str]]) -> tuple[dict[str, Any], list[str]]:
    """The routing figures by file stem, and notes on the ones skipped (for report.md)."""
    notes: list[str] = []
    used = {c.cell for c in cells}
    made = {"gaps": plots.gap_figure(_rows(cells), grid, variant_labels([c.outcomes for c in cells]))}
    localize, fit = pooled_groups(cells, "localize"), pooled_groups(cells, "fit")
    if any("layer_effect" in ds for ds in localize.values()):
        made["patching"] = patching_plots.patching_figure(localize, grid, used)
    else:
        notes.append("patching skipped: no store has localize/layer_effect")
    # A store written with per-head patching off holds head_effect as NaN only: no figure of it.
    sources = patching_plots.head_sources(localize)
    for source in sources:
        made[f"patching_heads_{source}"] = patching_plots.head_figure(localize, grid, used, source)
    if not sources:
        notes.append("patching_heads skipped: no store has per-head effects (localize/head_effect absent or all NaN: "
                     "per-head patching off)")
    if any("probe_accuracy" in ds or "direction_norm" in ds for ds in fit.values()):
        made["probes"] = plots.probe_figure(fit, grid, used)
    else:
        notes.append("probes skipped: no store has fit/probe_accuracy or fit/direction_norm")
    return made, notes


def write(cells: list[RoutingCell], out: Path, settings: Any, grid: list[tuple[str, str]] | None = None) -> list[str]:
    """The tables, and with settings.plots the figures, into `out`; returns notes on the
    figures skipped. `grid`: the panels (default: the cells'; the aggregator adds missing ones)."""
    write_files(out, table_files(cells))
    if not settings.plots:
        return []
    made, notes = figures(cells, grid or sorted({c.cell for c in cells}))
    written = [path for stem, fig in made.items() for path in save(fig, out, stem, settings.dpi)]
    for note in notes:
        log.info("%s", note)
    log.info("plots: %s", ", ".join(p.name for p in written))
    return notes


def section(cells: list[RoutingCell], headline_text: str | None, notes: list[str], settings: Any) -> str:
    return report.section([c.outcomes for c in cells], headline_text, notes, float(settings.confidence),
                          int(settings.n_resamples), int(settings.seed))


def results(cells: list[RoutingCell], headline_text: str | None, out: Path) -> dict[str, Any]:
    table = out / "table.md"
    return {
        "headline": headline_text,
        "table_markdown": table.read_text(encoding="utf-8") if cells and table.exists() else None,
        "n_cells": len(grouped(cells)),
        "rows": [asdict(r) for r in tables.sort_rows(_rows(cells))],
    }


def read_cell(path: str | Path) -> CellOutcomes:
    """A finished routing store's outcomes, named by its root attribute `cell`."""
    attrs = read_store_attrs(path)
    cell = attrs.get("cell") or {}
    outcomes = read_outcomes(Path(path), cell["family"], cell["behavior"], str(cell.get("variant") or ""),
                             str(cell.get("replicate") or ""))
    outcomes.settings = flatten(attrs.get("digest_config") or {})
    return outcomes


def write_cell(store: str | Path, out: Path, seed: int) -> dict[str, Any]:
    """One finished cell's tables, figures and report.md (the same code and defaults as a
    grid's, the bootstrap seeded by `seed`); returns the aggregator's result keys."""
    settings = TableSettings(seed=seed)
    plotted, damaged = read_plotted(store) if settings.plots else ({}, [])
    for err in damaged:
        log.warning("%s; left out of the plots", err)
    cells = [summarize(read_cell(store), settings, plotted)]
    notes = write(cells, out, settings)
    text = headline(cells)
    page = "\n".join(["# Routing cell report", "", f"- store: `{Path(store).resolve()}`", "", ""])
    (out / "report.md").write_text(page + section(cells, text, notes, settings), encoding="utf-8")
    return results(cells, text, out)
