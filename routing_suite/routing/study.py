"""The routing study's stores as the aggregator reads them (registered on import).

Its own `collect`: a store's outcomes are read before any choice between duplicates
(an unreadable one is a finding, not a cell), prompts without a finite outcome are
named, and every cell of the grid that some store claims but none serves is a
missing cell (its panel says so in the figures).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from routing_suite import store_format
from routing_suite.aggregate import discover
from routing_suite.aggregate.discover import Finding, StoreInfo
from routing_suite.aggregate.studies import StudyKind, register_study
from routing_suite.provenance import flatten
from routing_suite.routing import summary
from routing_suite.routing.outcomes import CellOutcomes, StoreFormatError, read_outcomes
from routing_suite.routing.summary import RoutingCell


def _read(info: StoreInfo) -> CellOutcomes:
    family, behavior, variant, replicate = info.key
    outcomes = read_outcomes(info.path, family, behavior, variant, replicate)
    outcomes.settings = flatten(info.attrs.get("digest_config") or {})
    return outcomes


def _summarize(info: StoreInfo, outcomes: CellOutcomes, cfg: Any, findings: list[Finding]) -> RoutingCell:
    plotted = {}
    if cfg.plots:
        plotted, damaged = summary.read_plotted(info.path)
        findings += [Finding(discover.CORRUPT, f"{err}; left out of the plots", info.cell, (str(info.path),)) for err in damaged]
    if outcomes.dropped_prompts:
        message = f"{outcomes.dropped_prompts} prompts without a finite outcome under every condition left out"
        findings.append(Finding(discover.DROPPED_PROMPTS, message, info.cell, (str(info.path),)))
    return summary.summarize(outcomes, cfg, plotted)


def collect(infos: list[StoreInfo], cfg: Any) -> tuple[list[RoutingCell], list[Finding]]:
    findings = [i.problem for i in infos if i.problem is not None]
    readable: list[StoreInfo] = []
    outcomes: dict[Path, CellOutcomes] = {}
    for info in (i for i in infos if i.problem is None):
        try:
            outcomes[info.path] = _read(info)
            readable.append(info)
        except StoreFormatError as err:
            findings.append(Finding(discover.MALFORMED, str(err), info.cell, (str(info.path),)))
        except Exception as err:  # a broken array is a problem of that store, not of the run
            message = f"outcomes unreadable ({type(err).__name__}: {err})"
            findings.append(Finding(discover.CORRUPT, message, info.cell, (str(info.path),)))
    chosen, duplicate_findings = discover.pick_one_per_cell(readable, cfg.duplicates)
    findings += duplicate_findings
    cells = [_summarize(chosen[key], outcomes[chosen[key].path], cfg, findings) for key in sorted(chosen)]
    seen = {i.cell for i in infos if i.cell is not None}
    findings += discover.missing_cells(seen, {key[:2] for key in chosen}, findings)
    return cells, findings


def _write(cells: list[RoutingCell], out: Path, cfg: Any, findings: list[Finding]) -> list[str]:
    grid = {c.cell for c in cells} | {f.cell for f in findings if f.kind == discover.MISSING}
    return summary.write(cells, out, cfg, sorted(grid))


register_study(StudyKind(
    "routing", "routing", store_format.STAGES, lambda path, cfg: summary.read_cell(path), summary.headline, _write,
    summary.section, summary.results, collect,
))
