"""The ADL's stores as the aggregator reads them (registered on import)."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from routing_suite import store_format
from routing_suite.adl import identify, plots, tables
from routing_suite.aggregate.studies import StudyKind, register_study, section, tables_then_plots


def _section(rows: list[tables.AdlRow], headline: str, notes: list[str], cfg: Any) -> str:
    mixing = " The mixing ablation: `adl_mixing.md`, `adl_mixing.csv`." if tables.mixing_rows(rows) else ""
    files = "Tables: `adl_table.md`, `adl_table.csv`." + mixing + (
        " Plots: `adl_relevance`, `adl_steering`, `adl_delta_ce`." if cfg.plots else "")
    return section("Activation Difference Lens", headline, files,
                   [f"- {r.family}/{r.behavior}: `{r.path}`" for r in tables.sort_rows(rows)])


_GRADERS: dict[str, tuple] = {}


def _read(path, cfg: Any) -> tables.AdlRow:
    """A store's row with its goal identification (none when the config names no goals);
    the grader (an embedding model) is made once per config."""
    if cfg.get("goals") is None or cfg.get("goal_grader") is None:
        return tables.read_cell(path)
    key = OmegaConf.to_yaml({"goals": cfg.goals, "goal_grader": cfg.goal_grader})
    if key not in _GRADERS:
        _GRADERS[key] = identify.from_config(cfg)
    return tables.read_cell(path, *_GRADERS[key])


register_study(StudyKind(
    "adl", "ADL", store_format.ADL_STAGES, _read, tables.headline,
    tables_then_plots(tables.write, plots.write_all), _section,
))
