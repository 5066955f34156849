"""The aggregator: many finished run stores in, gap-reduction tables and plots out.

    discover  find stores under a folder or glob, check them, one per cell
    read      per-prompt outcomes and the plotted fit/localize arrays
    stats     gaps, reductions, paired bootstrap intervals (scipy)
    tables    cells.csv, table.{md,csv,tex}, the headline line
    plots     gaps, path patching, probes (matplotlib, PNG + PDF)
    report    report.md: what was used, skipped, and why
    pipeline  run(cfg) -> dict, what `python -m experiments.aggregate` calls

It never loads a model.
"""

from routing_suite.aggregate.pipeline import run

__all__ = ["run"]
