"""The ADL's stores as the aggregator reads them (registered on import)."""

from __future__ import annotations

from typing import Any

from routing_suite import store_format
from routing_suite.adl import plots, tables
from routing_suite.aggregate.studies import StudyKind, register_study, section, tables_then_plots


def _section(rows: list[tables.AdlRow], headline: str, notes: list[str], cfg: Any) -> str:
    files = "Tables: `adl_table.md`, `adl_table.csv`." + (
        " Plots: `adl_relevance`, `adl_steering`, `adl_delta_ce`." if cfg.plots else "")
    return section("Activation Difference Lens", headline, files,
                   [f"- {r.family}/{r.behavior}: `{r.path}`" for r in tables.sort_rows(rows)])


register_study(StudyKind(
    "adl", "ADL", store_format.ADL_STAGES, lambda path, cfg: tables.read_cell(path), tables.headline,
    tables_then_plots(tables.write, plots.write_all), _section,
))
