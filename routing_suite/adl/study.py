"""The ADL's stores as the aggregator reads them (registered on import)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from routing_suite import schema
from routing_suite.adl import tables
from routing_suite.aggregate.studies import StudyKind, register_study, section


def _write(rows: list[tables.AdlRow], out: Path, cfg: Any, findings: list) -> list[str]:
    tables.write(rows, out, plots=cfg.plots, dpi=cfg.dpi)
    return []


def _section(rows: list[tables.AdlRow], headline: str, notes: list[str], cfg: Any) -> str:
    files = "Tables: `adl_table.md`, `adl_table.csv`; plots: `adl_relevance`, `adl_steering`, `adl_delta_ce`."
    return section("Activation Difference Lens", headline, files,
                   [f"- {r.family}/{r.behavior}: `{r.path}`" for r in tables.sort_rows(rows)])


register_study(StudyKind(
    "adl", "ADL", schema.ADL_STAGES, lambda path, cfg: tables.read_cell(path), tables.headline, _write, _section,
))
