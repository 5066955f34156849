"""The schemas of `experiments.routing` and `experiments.collect` and of their config
groups (intervention, control), registered by `routing_suite.config.register_configs`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from routing_suite.routing.settings import FitSettings, InterventionSpec, LocalizeSettings
from routing_suite.store_settings import StoreSettings
from routing_suite.study_schemas import BehaviorConfig, DataConfig


@dataclass
class InterventionConfig(InterventionSpec):
    """An intervention on a subspace of one site, in a window of layers."""

    _target_: str = "routing_suite.routing.settings.InterventionSpec"


@dataclass
class ControlConfig:
    """A control built from another subspace, at matched perturbation magnitude."""

    _target_: str = MISSING
    name: str = MISSING
    seeds: int = 3


@dataclass
class CollectSettings:
    """Which sites, layers and positions the collect stage saves."""

    sites: list[str] = field(default_factory=lambda: ["resid", "attn"])
    layers: list[int] | None = None  # null: every layer
    positions: str = "last"  # last | first_k | answer_mean
    k: int = 5
    # "none": every prompt's activations; "paired_sums" (experiments.collect only):
    # the server sums h(deploy) - h(eval) over each batch, for difference-of-means.
    reduce: str = "none"


@dataclass
class CollectExperimentConfig:
    """`experiments.collect`: trace both models under both framings into a store."""

    model: Any = MISSING
    backend: Any = MISSING
    behavior: BehaviorConfig = MISSING
    store: StoreSettings = field(default_factory=StoreSettings)
    data: DataConfig = field(default_factory=DataConfig)
    collect: CollectSettings = field(default_factory=CollectSettings)
    seed: int = 0
    progress: bool = True


@dataclass
class RoutingExperimentConfig:
    """`experiments.routing`: one cell (model pair x behaviour) end to end."""

    model: Any = MISSING
    backend: Any = MISSING
    behavior: BehaviorConfig = MISSING
    intervention: InterventionConfig = MISSING
    control: dict[str, ControlConfig] = field(default_factory=dict)
    store: StoreSettings = field(default_factory=StoreSettings)
    data: DataConfig = field(default_factory=DataConfig)
    collect: CollectSettings = field(default_factory=lambda: CollectSettings(sites=["resid", "attn", "heads"]))
    fit: FitSettings = field(default_factory=FitSettings)
    localize: LocalizeSettings = field(default_factory=LocalizeSettings)
    seed: int = 0
    progress: bool = True
    # Where the cell's table goes; null: a `table` folder in the run folder.
    report_dir: str | None = None


def register_schemas(cs: ConfigStore) -> None:
    cs.store(group="intervention", name="intervention_schema", node=InterventionConfig)
    cs.store(group="control", name="control_schema", node=ControlConfig)
    cs.store(name="routing_schema", node=RoutingExperimentConfig)
    cs.store(name="collect_schema", node=CollectExperimentConfig)
