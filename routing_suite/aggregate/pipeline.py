"""run(cfg): find the stores, check them, compute every cell, write tables, plots and the report."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from routing_suite import schema
from routing_suite.aggregate import discover, pooled, read, tables
from routing_suite.aggregate.config import DUPLICATE_POLICIES
from routing_suite.aggregate.discover import Finding
from routing_suite.aggregate.report import finding_line, render
from routing_suite.aggregate.stats import ConditionStats, cell_stats
from routing_suite.aggregate.studies import STUDIES, StudyKind
from routing_suite.errors import ConfigError, RunFailure
from routing_suite.provenance import flatten

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
    """What `collect` found: routing cells, findings, and per registered study
    (`routing_suite.aggregate.studies`) the reports of its stores."""

    n_found: int
    cells: list[read.CellOutcomes]
    findings: list[Finding]
    reports: dict[str, list] = field(default_factory=dict)


def collect(cfg: Any, stores: list[Path] | None = None) -> Collected:
    """The usable cells under cfg.root, or among `stores` when given (one store each),
    everything found wrong on the way, and each registered study's reports (its
    stores read apart from routing stores)."""
    paths = discover.find_stores(cfg.root) if stores is None else sorted({Path(p).resolve() for p in stores})
    if not paths:
        raise ConfigError(
            f"root={cfg.root!r} holds no run stores (folders ending {schema.STORE_SUFFIX} or {schema.PARTIAL_SUFFIX})"
        )
    every = [discover.inspect_store(p) for p in paths]
    reports: dict[str, list] = {}
    study_findings: list[Finding] = []
    for name, kind in STUDIES.items():
        reports[name], found = collect_study(kind, [i for i in every if i.experiment == name], cfg)
        study_findings += found
    infos = [i for i in every if i.experiment not in STUDIES]
    findings = [i.problem for i in infos if i.problem is not None]
    readable: list[discover.StoreInfo] = []
    outcomes: dict[Path, read.CellOutcomes] = {}
    for info in (i for i in infos if i.problem is None):
        family, behavior, variant, replicate = info.key
        try:
            outcomes[info.path] = read.read_outcomes(info.path, family, behavior, variant, replicate)
            outcomes[info.path].settings = flatten(info.attrs.get("digest_config") or {})
            readable.append(info)
        except read.StoreFormatError as err:
            findings.append(Finding(discover.MALFORMED, str(err), info.cell, (str(info.path),)))
        except Exception as err:  # a broken array is a problem of that store, not of the run
            findings.append(
                Finding(
                    discover.CORRUPT,
                    f"outcomes unreadable ({type(err).__name__}: {err})",
                    info.cell,
                    (str(info.path),),
                )
            )
    chosen, duplicate_findings = discover.pick_one_per_cell(readable, cfg.duplicates)
    findings += duplicate_findings
    cells = [outcomes[chosen[key].path] for key in sorted(chosen)]
    for c in cells:
        if c.dropped_prompts:
            message = f"{c.dropped_prompts} prompts without a finite outcome under every condition left out"
            findings.append(Finding(discover.DROPPED_PROMPTS, message, (c.family, c.behavior), (c.path,)))
    seen = {i.cell for i in infos if i.cell is not None}
    findings += discover.missing_cells(seen, {key[:2] for key in chosen}, findings)
    return Collected(len(paths), cells, findings + study_findings, reports)


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
        except Exception as err:  # a broken store is a problem of that store, not of the run
            message = f"{what} groups unreadable ({type(err).__name__}: {err})"
            findings.append(Finding(discover.CORRUPT, message, key[:2], (str(chosen[key].path),)))
    return results, findings + duplicate_findings


PlotInputs = dict[str, dict[str, Any]]  # group -> store path -> its plotted variables


def _plot_inputs(cells: list[read.CellOutcomes]) -> tuple[PlotInputs, list[Finding]]:
    """Each store's localize and fit arrays the plots show, read before anything is
    written; a group that cannot be read is a finding (its cell is left out of that plot)."""
    wanted = {"localize": ("layer_effect", "head_effect"), "fit": ("probe_accuracy", "direction_norm")}
    inputs: PlotInputs = {group: {} for group in wanted}
    findings = []
    for c in cells:
        for group, variables in wanted.items():
            try:
                ds = read.read_group(c.path, group, variables)
            except read.CorruptGroup as err:
                findings.append(Finding(discover.CORRUPT, f"{err}; left out of the plots", (c.family, c.behavior), (c.path,)))
                continue
            if ds is not None:
                inputs[group][c.path] = ds
    return inputs, findings


def pooled_groups(cells: list[read.CellOutcomes], datasets: dict[str, Any], variables: tuple[str, ...]) -> dict[tuple[str, str], Any]:
    """Per cell, the stores' `datasets` pooled over the cell's builds (plots.pool_builds),
    each build marked with its variant and the layers its fine-tune was planted in."""
    from routing_suite.aggregate import plots
    from routing_suite.aggregate.patching_plots import planted_layers

    builds: dict[tuple[str, str], list] = {}
    for c in cells:
        ds = datasets.get(c.path)
        if ds is not None:
            ds.attrs.update(planted=planted_layers(c.settings), variant=c.variant)
            builds.setdefault((c.family, c.behavior), []).append(ds)
    pooled = {k: plots.pool_builds(v, variables) for k, v in builds.items()}
    return {k: v for k, v in pooled.items() if v is not None}


def figures(
    rows: list[ConditionStats], cells: list[read.CellOutcomes], grid: list[tuple[str, str]], inputs: PlotInputs | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The routing figures by file stem, and notes on the ones skipped (for report.md).
    `inputs`: the stores' plotted groups, read already (None: read them here)."""
    from routing_suite.aggregate import patching_plots, plots

    if inputs is None:
        inputs, _ = _plot_inputs(cells)
    notes: list[str] = []
    used = {(c.family, c.behavior) for c in cells}
    made = {"gaps": plots.gap_figure(rows, grid, read.variant_labels(cells))}
    localize = pooled_groups(cells, inputs["localize"], ("layer_effect", "head_effect"))
    fit = pooled_groups(cells, inputs["fit"], ("probe_accuracy", "direction_norm"))
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


def _plots(
    out: Path, rows: list[ConditionStats], cells: list[read.CellOutcomes], grid: list[tuple[str, str]], dpi: int,
    inputs: PlotInputs,
) -> list[str]:
    """Write the figures; returns notes on the ones skipped."""
    from routing_suite.aggregate.figures import save

    made, notes = figures(rows, cells, grid, inputs)
    written = [path for stem, fig in made.items() for path in save(fig, out, stem, dpi)]
    for note in notes:
        log.info("%s", note)
    log.info("plots: %s", ", ".join(p.name for p in written))
    return notes


def run(cfg: Any, stores: list[Path] | None = None) -> dict[str, Any]:
    """Aggregate every usable store under cfg.root into cfg.out (or the Hydra run folder).

    `stores`: exactly these stores instead (a sweep's own, see
    routing_suite.callbacks.AggregateSweep); cfg.root then only names them in the report.
    """
    start = time.perf_counter()
    _check(cfg)
    found = collect(cfg, stores)
    n_found, cells, findings = found.n_found, found.cells, found.findings
    out = _output_dir(cfg)
    # Everything is read before anything is written: a damaged group is a finding in
    # report.md, never a run that stops with half its files written.
    inputs: PlotInputs = {"localize": {}, "fit": {}}
    if cfg.plots and cells:
        inputs, damaged = _plot_inputs(cells)
        findings = findings + damaged
    for finding in findings:
        log.warning("%s", finding_line(finding))
    settings = {k: cfg[k] for k in ("confidence", "n_resamples", "seed", "duplicates")}
    rows = [row for c in cells for row in cell_stats(c, cfg.n_resamples, cfg.seed, cfg.confidence)]
    grouped = tables.group_cells(rows, read.variant_labels(cells))
    headline = pooled.headline(grouped) if grouped else None
    grid = sorted({(c.family, c.behavior) for c in cells} | {f.cell for f in findings if f.kind == discover.MISSING})
    notes: list[str] = []
    files: dict[str, str] = {}
    if grouped:
        files = {
            "cells.csv": tables.cells_csv(rows),
            "table.md": pooled.markdown_table(grouped),
            "table_builds.md": tables.builds_markdown(grouped),
            "table.csv": pooled.wide_csv(grouped),
            "table.tex": pooled.latex_table(grouped),
            "headline.txt": headline + "\n",
        }
        for name, text in files.items():
            (out / name).write_text(text, encoding="utf-8")
        if cfg.plots:
            notes = _plots(out, rows, cells, grid, cfg.dpi, inputs)
    report = render(cfg.root, settings, n_found, cells, findings, headline, notes)
    study_results: dict[str, Any] = {}
    for name, kind in STUDIES.items():
        done = found.reports.get(name, [])
        study_headline = kind.headline(done) if done else None
        if done:
            kind.write(done, out, cfg)
            report += kind.section(done, study_headline, cfg.plots)
        study_results.update({f"{name}_headline": study_headline, f"n_{name}_cells": len(done)})
    (out / "report.md").write_text(report, encoding="utf-8")
    if not grouped and not any(found.reports.values()):
        raise ConfigError(f"root={cfg.root!r}: {n_found} stores found, none usable; see {out / 'report.md'}")
    if damaged := [f for f in findings if f.kind == discover.CORRUPT]:
        raise RunFailure(
            f"{len(damaged)} store group(s) cannot be read, first {finding_line(damaged[0])}; "
            f"everything else is written, and {out / 'report.md'} lists them"
        )
    seconds = time.perf_counter() - start
    log.info("%d cells from %d stores in %.2f s -> %s", len(grouped), n_found, seconds, out)
    return {
        "headline": headline,
        "table_markdown": files.get("table.md"),
        **study_results,
        "out": str(out),
        "n_cells": len(grouped),
        "n_stores": n_found,
        "findings": [finding_line(f) for f in findings],
        "rows": [asdict(r) for r in tables.sort_rows(rows)],
        "seconds": seconds,
    }
