"""The EM study's stores (one fine-tune's directions, and transfer across
architectures) as the aggregator reads them (registered on import)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from routing_suite import schema
from routing_suite.aggregate.studies import StudyKind, register_study, section
from routing_suite.em import tables, transfer_tables


def _em_write(reports: list[tables.EmReport], out: Path, cfg: Any, findings: list) -> list[str]:
    tables.write(reports, out)
    if cfg.plots:
        from routing_suite.em import plots  # matplotlib only when plotting

        plots.write_em(reports, out, cfg.dpi)
    return []


def _em_section(reports: list[tables.EmReport], headline: str, notes: list[str], cfg: Any) -> str:
    files = "Tables: `em_table.md`, `em_table.csv`." + (" Plots: `em_cosine`." if cfg.plots else "")
    return section("Emergent-misalignment directions", headline, files,
                   [f"- {r.family}/em: `{r.path}`" for r in sorted(reports, key=lambda r: r.family)])


def _transfer_write(reports: list[transfer_tables.TransferReport], out: Path, cfg: Any, findings: list) -> list[str]:
    transfer_tables.write(reports, out)
    if cfg.plots:
        from routing_suite.em import plots

        plots.write_transfer(reports, out, cfg.dpi)
    return []


def _transfer_section(reports: list[transfer_tables.TransferReport], headline: str, notes: list[str], cfg: Any) -> str:
    files = "Tables: `em_transfer_table.md`, `em_transfer_table.csv`." + (
        " Plots: `em_transfer`, `em_transfer_maps`." if cfg.plots else "")
    return section("Emergent-misalignment directions across architectures", headline, files,
                   [f"- {r.pair}: `{r.path}`" for r in sorted(reports, key=lambda r: (r.receiver, r.donor))])


register_study(StudyKind(
    "em", "EM", schema.EM_STAGES, lambda path, cfg: tables.read_store(path, cfg.n_resamples, cfg.seed, cfg.confidence),
    tables.headline, _em_write, _em_section,
))
# One report per donor -> receiver pair (cell: receiver, "em_from_<donor>").
register_study(StudyKind(
    "em_transfer", "EM transfer", schema.EM_TRANSFER_STAGES,
    lambda path, cfg: transfer_tables.read_store(path, cfg.n_resamples, cfg.seed, cfg.confidence),
    transfer_tables.headline, _transfer_write, _transfer_section,
))
