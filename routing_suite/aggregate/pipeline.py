"""run(cfg): find the stores, hand each to the study that wrote it (the registry in
`routing_suite.aggregate.studies`), and write every study's tables and plots and
one report.md. This module knows no study."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routing_suite import store_format
from routing_suite.aggregate import discover
from routing_suite.aggregate.config import DUPLICATE_POLICIES
from routing_suite.aggregate.discover import Finding
from routing_suite.aggregate.report import finding_line, render
from routing_suite.aggregate.studies import StudyKind, load_studies
from routing_suite.errors import ConfigError, RunFailure

log = logging.getLogger(__name__)


def _check(cfg: Any) -> None:
    if cfg.duplicates not in DUPLICATE_POLICIES:
        raise ConfigError(f"duplicates={cfg.duplicates!r} is not one of {list(DUPLICATE_POLICIES)}")
    if not 0 < cfg.confidence < 1:
        raise ConfigError(f"confidence={cfg.confidence!r} must lie strictly between 0 and 1")
    if cfg.n_resamples < 1:
        raise ConfigError(f"n_resamples={cfg.n_resamples!r} must be at least 1")
    if cfg.dpi < 1:
        raise ConfigError(f"dpi={cfg.dpi!r} must be at least 1")


def _output_dir(cfg: Any) -> Path:
    if cfg.out is not None:
        out = Path(cfg.out)
    else:
        from hydra.core.hydra_config import HydraConfig

        try:
            out = Path(HydraConfig.get().runtime.output_dir)
        except ValueError:
            raise ConfigError("out is null and no Hydra run folder is active; set out=<folder>") from None
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class Collected:
    """What `collect` found: per registered study the reports of its usable stores, and
    everything found wrong on the way."""

    n_found: int
    reports: dict[str, list] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    cells: dict[str, tuple[str, str]] = field(default_factory=dict)  # store path -> cell, where it names one

    def used(self) -> dict[str, tuple[str, str]]:
        """Each store in the tables, by path, with its cell."""
        paths = {str(Path(r.path).resolve()) for reports in self.reports.values() for r in reports}
        return {p: cell for p, cell in self.cells.items() if p in paths}


def collect(cfg: Any, stores: list[Path] | None = None) -> Collected:
    """The usable stores under cfg.root, or among `stores` when given, read by their studies."""
    paths = discover.find_stores(cfg.root) if stores is None else sorted({Path(p).resolve() for p in stores})
    if not paths:
        raise ConfigError(
            f"root={cfg.root!r} holds no run stores (folders ending {store_format.STORE_SUFFIX} or {store_format.PARTIAL_SUFFIX})"
        )
    every = [discover.inspect_store(p) for p in paths]
    studies = load_studies()
    found = Collected(len(paths), cells={str(i.path): i.cell for i in every if i.cell is not None})
    for info in (i for i in every if i.experiment not in studies):
        message = f"experiment {info.experiment!r}: no study reads it (registered: {', '.join(studies)})"
        found.findings.append(info.problem or Finding(discover.MALFORMED, message, info.cell, (str(info.path),)))
    for name, kind in studies.items():
        mine = [i for i in every if i.experiment == name]
        if not mine:
            reports, findings = [], []
        elif kind.collect is not None:
            reports, findings = kind.collect(mine, cfg)
        else:
            reports, findings = collect_study(kind, mine, cfg)
        found.reports[name] = reports
        found.findings += findings
    return found


def collect_study(kind: StudyKind, infos: list[discover.StoreInfo], cfg: Any) -> tuple[list, list[Finding]]:
    """One report per cell, read by the study's `read`, from the stores that finished
    every stage of the study; the others as findings."""
    what = kind.title
    findings = [i.problem for i in infos if i.problem is not None]
    usable = []
    for info in (i for i in infos if i.problem is None):
        if not set(kind.stages) <= set(info.attrs.get("stages_done", [])):
            findings.append(Finding(discover.MALFORMED, f"{what} store without every {what} stage", info.cell, (str(info.path),)))
        else:
            usable.append(info)
    chosen, duplicate_findings = discover.pick_one_per_cell(usable, cfg.duplicates)
    results = []
    for key in sorted(chosen):
        try:
            results.append(kind.read(chosen[key].path, cfg))
        except ConfigError:  # the config's fault (e.g. a grader that is not installed), not the store's
            raise
        except Exception as err:  # a broken store is a problem of that store, not of the run
            message = f"{what} groups unreadable ({type(err).__name__}: {err})"
            findings.append(Finding(discover.CORRUPT, message, key[:2], (str(chosen[key].path),)))
    return results, findings + duplicate_findings


def run(cfg: Any, stores: list[Path] | None = None) -> dict[str, Any]:
    """Aggregate every usable store under cfg.root into cfg.out (or the Hydra run folder).

    `stores`: exactly these stores instead (a sweep's own, see
    routing_suite.callbacks.AggregateSweep); cfg.root then only names them in the report.
    """
    start = time.perf_counter()
    _check(cfg)
    # Everything is read before anything is written: a damaged group is a finding in
    # report.md, never a run that stops with half its files written.
    found = collect(cfg, stores)
    out = _output_dir(cfg)
    for finding in found.findings:
        log.warning("%s", finding_line(finding))
    sections, results, counts = [], {}, {}
    for name, kind in load_studies().items():
        done = found.reports.get(name, [])
        headline = kind.headline(done) if done else None
        if done:
            notes = kind.write(done, out, cfg, found.findings)
            sections.append(kind.section(done, headline, notes, cfg))
        counts[kind.title] = len(done)
        results.update(kind.result(done, headline, out))
    report = render(cfg.root, found.n_found, counts, found.findings, found.used(), sections, cfg.duplicates)
    (out / "report.md").write_text(report, encoding="utf-8")
    if not any(found.reports.values()):
        raise ConfigError(f"root={cfg.root!r}: {found.n_found} stores found, none usable; see {out / 'report.md'}")
    if damaged := [f for f in found.findings if f.kind == discover.CORRUPT]:
        raise RunFailure(
            f"{len(damaged)} store group(s) cannot be read, first {finding_line(damaged[0])}; "
            f"everything else is written, and {out / 'report.md'} lists them"
        )
    seconds = time.perf_counter() - start
    log.info("%d cells from %d stores in %.2f s -> %s", sum(counts.values()), found.n_found, seconds, out)
    return {**results, "out": str(out), "n_stores": found.n_found,
            "findings": [finding_line(f) for f in found.findings], "seconds": seconds}
