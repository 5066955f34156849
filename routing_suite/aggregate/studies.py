"""The registry of the studies whose stores the aggregator reads.

Each kind names the root attribute `experiment` its stores carry, the stages a
finished store has done, how one store becomes a report (an object with a
`path`), and how a list of reports is written (tables, plots with `plots=true`),
summed up in a headline, given its section of report.md and its keys in the
run's result. The aggregator itself knows no study: the built-in ones register
themselves when `load_studies` imports their modules (`BUILTIN`), and a study of
your own calls `register_study` the same way; a name registered twice is refused.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routing_suite.aggregate.discover import Finding, StoreInfo

# Each of these modules registers its study's kind when imported.
BUILTIN = ("routing_suite.routing.study", "routing_suite.adl.study", "routing_suite.em.study")

Collect = Callable[[list[StoreInfo], Any], tuple[list, list[Finding]]]


@dataclass(frozen=True)
class StudyKind:
    """One study's stores as the aggregator reads them (see the module doc)."""

    experiment: str  # the stores' root attribute, and the prefix of the run's default result keys
    title: str  # how findings and report.md name the study
    stages: tuple[str, ...]
    read: Callable[[Path, Any], Any]  # (store, aggregator config) -> report
    headline: Callable[[list], str]
    # (reports, out folder, aggregator config, every finding) -> notes for report.md (e.g. plots skipped)
    write: Callable[[list, Path, Any, list[Finding]], list[str]]
    section: Callable[[list, str, list[str], Any], str]  # (reports, headline, notes, config) -> report.md section
    # (reports, headline, out folder) -> the run's result keys; None: <experiment>_headline, n_<experiment>_cells
    results: Callable[[list, str | None, Path], dict[str, Any]] | None = None
    # The study's own choice of usable stores and reading; None: the aggregator's (`pipeline.collect_study`).
    collect: Collect | None = None

    def result(self, reports: list, headline: str | None, out: Path) -> dict[str, Any]:
        if self.results is not None:
            return self.results(reports, headline, out)
        return {f"{self.experiment}_headline": headline, f"n_{self.experiment}_cells": len(reports)}


STUDIES: dict[str, StudyKind] = {}


def register_study(kind: StudyKind) -> None:
    if kind.experiment in STUDIES:
        raise ValueError(f"a study kind named {kind.experiment!r} is registered already")
    STUDIES[kind.experiment] = kind


def load_studies() -> dict[str, StudyKind]:
    """The registry, with every built-in study in it (importing a module twice is a no-op)."""
    for module in BUILTIN:
        importlib.import_module(module)
    return STUDIES


def tables_then_plots(tables: Callable[[list, Path], Any], plots: Callable[[list, Path, int], Any]):
    """A kind's `write` for a study that writes its tables, and with plots=true its figures."""

    def write(reports: list, out: Path, cfg: Any, findings: list[Finding]) -> list[str]:
        tables(reports, out)
        if cfg.plots:
            plots(reports, out, cfg.dpi)
        return []

    return write


def section(title: str, headline: str, files: str, entries: list[str]) -> str:
    """The usual section of a study in report.md: headline, its files, one line per store."""
    return "\n".join([f"## {title}", "", headline, "", files, "", *entries]) + "\n"
