"""The typed schema of `conf/aggregate.yaml`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from routing_suite.text_tables import TableSettings

# What to do when two finished stores claim the same cell (family, behaviour).
DUPLICATE_POLICIES = ("exclude", "newest")


@dataclass
class AggregateConfig(TableSettings):
    """`experiments.aggregate`: turn many run stores into tables and plots (the bootstrap,
    plots and dpi: TableSettings)."""

    # A folder searched recursively for stores, or a glob (`**` allowed). The
    # default is where the experiments write them (StoreConfig.root), so that
    # the bare command aggregates everything run so far.
    root: str = "outputs/stores"
    # Where the tables, plots and report go; null: the Hydra run folder.
    out: str | None = None
    # "exclude": leave a cell with several stores out and list them;
    # "newest": take the store with the latest `finished_at`.
    duplicates: str = "exclude"
    # ADL goal identification (routing_suite.adl.identify): the candidate goals and the grader.
    goals: Any = None
    goal_grader: Any = None


def register_schemas(cs) -> None:
    """Called by `routing_suite.config.register_configs`."""
    cs.store(name="aggregate_schema", node=AggregateConfig)
