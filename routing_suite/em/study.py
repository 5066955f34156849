"""The EM study's stores (one fine-tune's directions, and transfer across
architectures) as the aggregator reads them (registered on import)."""

from __future__ import annotations

from typing import Any

from routing_suite import store_format
from routing_suite.aggregate.studies import StudyKind, register_study, section, tables_then_plots
from routing_suite.em import builds, plots, stats, tables, transfer_builds, transfer_tables


def _em_section(reports: list[tables.EmReport], headline: str, notes: list[str], cfg: Any) -> str:
    files = ("Tables: `em_table.md`, `em_table.csv`; over builds: `em_builds.md`, `em_builds.csv`."
             + (" Plots: `em_cosine`." if cfg.plots else ""))
    named = stats.labels(reports)
    return section("Emergent-misalignment directions", headline, files,
                   [f"- {named[r.path]}/em: `{r.path}`" for r in tables.sort_reports(reports)])


def _write_em(reports: list[tables.EmReport], out) -> None:
    tables.write(reports, out)
    builds.write(reports, out)


def _transfer_section(reports: list[transfer_tables.TransferReport], headline: str, notes: list[str], cfg: Any) -> str:
    files = ("Tables: `em_transfer_table.md`, `em_transfer_table.csv`; over builds: `em_transfer_builds.md`, "
             "`em_transfer_builds.csv`.") + (
        " Plots: `em_transfer`, `em_transfer_maps`, `em_transfer_builds`." if cfg.plots else "")
    return section("Emergent-misalignment directions across architectures", headline, files,
                   [f"- {r.pair}: `{r.path}`" for r in sorted(reports, key=lambda r: (r.receiver, r.donor))])


def _write_transfer(reports: list[transfer_tables.TransferReport], out) -> None:
    transfer_tables.write(reports, out)
    transfer_builds.write(reports, out)


def _read_em(path, cfg):
    return tables.read_store(path, cfg.n_resamples, cfg.seed, cfg.confidence)


def _read_transfer(path, cfg):
    return transfer_tables.read_store(path, cfg.n_resamples, cfg.seed, cfg.confidence)


register_study(StudyKind(
    "em", "EM", store_format.EM_STAGES, _read_em, tables.headline, tables_then_plots(_write_em, plots.write_em), _em_section,
))
# One report per donor -> receiver pair (cell: receiver, "em_from_<donor>").
register_study(StudyKind(
    "em_transfer", "EM transfer", store_format.EM_TRANSFER_STAGES, _read_transfer, transfer_tables.headline,
    tables_then_plots(_write_transfer, plots.write_transfer), _transfer_section,
))
