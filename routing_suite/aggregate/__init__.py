"""The aggregator: many finished run stores in, each study's tables and plots and one
report.md out. It knows no study; each registers how its stores are read and written.

    discover  find stores under a folder or glob, check them, one per cell
    studies   the registry of study kinds (routing, adl, em, em_transfer built in)
    report    report.md's frame: what was read, left out, and why
    pipeline  run(cfg) -> dict, what `python -m experiments.aggregate` calls
    config    the typed schema of conf/aggregate.yaml

Each study's own tables and plots live in its package (`routing_suite.routing.summary`,
`routing_suite.adl.tables`, `routing_suite.em.tables`). It never loads a model.
"""

from routing_suite.aggregate.pipeline import run

__all__ = ["run"]
