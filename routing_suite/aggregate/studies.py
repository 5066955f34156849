"""The studies the aggregator reads besides the routing study, as a registry.

Each kind names the root attribute `experiment` its stores carry, the stages a
finished store has done, how one store becomes a report, and how a list of
reports is written (tables, plots with `plots=true`), summed up in a headline
and listed in report.md. A store whose `experiment` no kind claims is a routing
store (`routing_suite.aggregate.pipeline`). A new study registers its kind with
`register_study`; a name registered twice is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routing_suite import schema
from routing_suite.aggregate import adl_tables, em_tables, em_transfer_tables

ROUTING = "routing"


@dataclass(frozen=True)
class StudyKind:
    """One study's stores as the aggregator reads them (see the module doc)."""

    experiment: str  # the stores' root attribute, and the prefix of the run's result keys
    title: str  # how findings name the study
    stages: tuple[str, ...]
    read: Callable[[Path, Any], Any]  # (store, aggregator config) -> report
    headline: Callable[[list], str]
    write: Callable[[list, Path, Any], None]  # (reports, out folder, aggregator config)
    section: Callable[[list, str, bool], str]  # (reports, headline, plots) -> report.md section


STUDIES: dict[str, StudyKind] = {}


def register_study(kind: StudyKind) -> None:
    if kind.experiment == ROUTING or kind.experiment in STUDIES:
        raise ValueError(f"a study kind named {kind.experiment!r} is registered already")
    STUDIES[kind.experiment] = kind


def _section(title: str, headline: str, files: str, entries: list[str]) -> str:
    return "\n".join([f"## {title}", "", headline, "", files, "", *entries]) + "\n"


# ---------------------------------------------------------------- ADL


def _adl_write(rows: list[adl_tables.AdlRow], out: Path, cfg: Any) -> None:
    adl_tables.write(rows, out, plots=cfg.plots, dpi=cfg.dpi)


def _adl_section(rows: list[adl_tables.AdlRow], headline: str, plots: bool) -> str:
    files = "Tables: `adl_table.md`, `adl_table.csv`; plots: `adl_relevance`, `adl_steering`, `adl_delta_ce`."
    return _section("Activation Difference Lens", headline, files,
                    [f"- {r.family}/{r.behavior}: `{r.path}`" for r in adl_tables.sort_rows(rows)])


# ---------------------------------------------------------------- EM


def _em_write(reports: list[em_tables.EmReport], out: Path, cfg: Any) -> None:
    em_tables.write(reports, out)
    if cfg.plots:
        from routing_suite.aggregate import em_plots  # matplotlib only when plotting

        em_plots.write_em(reports, out, cfg.dpi)


def _em_section(reports: list[em_tables.EmReport], headline: str, plots: bool) -> str:
    files = "Tables: `em_table.md`, `em_table.csv`." + (" Plots: `em_cosine`." if plots else "")
    return _section("Emergent-misalignment directions", headline, files,
                    [f"- {r.family}/em: `{r.path}`" for r in sorted(reports, key=lambda r: r.family)])


def _transfer_write(reports: list[em_transfer_tables.TransferReport], out: Path, cfg: Any) -> None:
    em_transfer_tables.write(reports, out)
    if cfg.plots:
        from routing_suite.aggregate import em_plots

        em_plots.write_transfer(reports, out, cfg.dpi)


def _transfer_section(reports: list[em_transfer_tables.TransferReport], headline: str, plots: bool) -> str:
    files = "Tables: `em_transfer_table.md`, `em_transfer_table.csv`." + (
        " Plots: `em_transfer`, `em_transfer_maps`." if plots else "")
    return _section("Emergent-misalignment directions across architectures", headline, files,
                    [f"- {r.pair}: `{r.path}`" for r in sorted(reports, key=lambda r: (r.receiver, r.donor))])


register_study(StudyKind(
    "adl", "ADL", schema.ADL_STAGES, lambda path, cfg: adl_tables.read_cell(path), adl_tables.headline, _adl_write,
    _adl_section,
))
register_study(StudyKind(
    "em", "EM", schema.EM_STAGES, lambda path, cfg: em_tables.read_store(path, cfg.n_resamples, cfg.seed, cfg.confidence),
    em_tables.headline, _em_write, _em_section,
))
# One report per donor -> receiver pair (cell: receiver, "em_from_<donor>").
register_study(StudyKind(
    "em_transfer", "EM transfer", schema.EM_TRANSFER_STAGES,
    lambda path, cfg: em_transfer_tables.read_store(path, cfg.n_resamples, cfg.seed, cfg.confidence),
    em_transfer_tables.headline, _transfer_write, _transfer_section,
))
