"""The typed schema of `conf/aggregate.yaml`."""

from __future__ import annotations

from dataclasses import dataclass

# What to do when two finished stores claim the same cell (family, behaviour).
DUPLICATE_POLICIES = ("exclude", "newest")


@dataclass
class AggregateConfig:
    """`experiments.aggregate`: turn many run stores into tables and plots."""

    # A folder searched recursively for stores, or a glob (`**` allowed). The
    # default is where the experiments write them (StoreConfig.root), so that
    # the bare command aggregates everything run so far.
    root: str = "outputs/stores"
    # Where the tables, plots and report go; null: the Hydra run folder.
    out: str | None = None
    # Bootstrap over prompts: the same seed and count for every condition of a
    # cell, so that all of a cell's intervals come from the same resamples.
    n_resamples: int = 2000
    seed: int = 0
    confidence: float = 0.95
    # "exclude": leave a cell with several stores out and list them;
    # "newest": take the store with the latest `finished_at`.
    duplicates: str = "exclude"
    plots: bool = True
    # Fixed so that the same inputs give the same image bytes.
    dpi: int = 150


def register_schemas(cs) -> None:
    """Called by `routing_suite.config.register_configs`."""
    cs.store(name="aggregate_schema", node=AggregateConfig)
