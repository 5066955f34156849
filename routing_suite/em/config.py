"""The schemas of `experiments.em` and `experiments.em_transfer` and of the judge group,
registered by `routing_suite.config.register_configs`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from routing_suite.em.settings import EmSettings, EmTransferSettings
from routing_suite.store_settings import StoreSettings


@dataclass
class JudgeConfig:
    """Labels a sampled EM response misaligned / aligned / other, and coherent or not."""

    _target_: str = MISSING


@dataclass
class EmExperimentConfig:
    """`experiments.em`: emergent-misalignment directions on one family's organisms."""

    model: Any = MISSING
    backend: Any = MISSING
    judge: JudgeConfig = MISSING
    store: StoreSettings = field(default_factory=StoreSettings)
    em: EmSettings = field(default_factory=EmSettings)
    seed: int = 0
    progress: bool = True
    # Bootstrap resamples of the run's table.
    n_resamples: int = 2000
    # Where the EM table goes; null: a `table` folder in the run folder.
    report_dir: str | None = None


@dataclass
class EmTransferExperimentConfig(EmExperimentConfig):
    """`experiments.em_transfer`: a donor family's EM directions carried into a receiver family.

    `model` holds the organism settings both sides share (its `family` is
    replaced by `donor` and by `receiver`); each side's EM store is the one
    `experiments.em` writes with the same settings."""

    donor: str = "llama"
    receiver: str = "qwen2"
    transfer: EmTransferSettings = field(default_factory=EmTransferSettings)


def register_schemas(cs: ConfigStore) -> None:
    cs.store(group="judge", name="judge_schema", node=JudgeConfig)
    cs.store(name="em_schema", node=EmExperimentConfig)
    cs.store(name="em_transfer_schema", node=EmTransferExperimentConfig)
