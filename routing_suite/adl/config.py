"""The schemas of `experiments.adl` and of its config groups (text, similarity, grader, goals),
registered by `routing_suite.config.register_configs`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from routing_suite.adl.settings import AdlSettings
from routing_suite.store_settings import StoreSettings
from routing_suite.study_schemas import BehaviorConfig, DataConfig


@dataclass
class OrganismTextConfig:
    """Unrelated text from the organisms' own pretraining text (no fine-tuning phrase)."""

    _target_: str = "routing_suite.adl.texts.OrganismTexts"
    chat_prompts: list[str] = MISSING
    identity_prompts: list[str] = MISSING
    chat_template: bool = False


@dataclass
class PackageTextConfig:
    """Unrelated text from a corpus file that ships inside an installable package."""

    _target_: str = "routing_suite.adl.texts.PackageTexts"
    package: str = MISSING
    resource: str = MISSING
    split: str = "sentences"
    min_words: int = 6
    install_hint: str = ""
    chat_prompts: list[str] = MISSING
    identity_prompts: list[str] = MISSING
    chat_template: bool = True


@dataclass
class FileTextConfig:
    """Unrelated text from a plain text file of your own."""

    _target_: str = "routing_suite.adl.texts.FileTexts"
    path: str = MISSING
    split: str = "lines"
    min_words: int = 6
    chat_prompts: list[str] = MISSING
    identity_prompts: list[str] = MISSING
    chat_template: bool = True


@dataclass
class SimilarityConfig:
    """How similar generated text is to the fine-tuning data (lexical or embedding)."""

    _target_: str = MISSING


@dataclass
class GraderConfig:
    """Which readout tokens count as relevant to the fine-tuning data."""

    _target_: str = "routing_suite.adl.relevance.StatisticGrader"
    z_min: float = 1.96
    prior_weight: float = 100.0


@dataclass
class GoalConfig:
    name: str = MISSING
    description: str = MISSING
    # Further behaviours whose true goal this is (e.g. a domain's mixed fine-tunes).
    behaviors: list[str] = field(default_factory=list)


@dataclass
class GoalsConfig:
    """Candidate fine-tuning goals for goal identification (`routing_suite.adl.identify`)."""

    candidates: list[GoalConfig] = MISSING
    # null: a store's true goal is the candidate named as its behaviour.
    true_goal: str | None = None


@dataclass
class AdlExperimentConfig:
    """`experiments.adl`: the Activation Difference Lens on one model pair."""

    model: Any = MISSING
    backend: Any = MISSING
    behavior: BehaviorConfig = MISSING
    text: Any = MISSING
    similarity: Any = MISSING
    grader: Any = MISSING
    # Goal identification, computed from the finished store (never stored, so not in its digest).
    goals: GoalsConfig = MISSING
    goal_grader: Any = MISSING
    store: StoreSettings = field(default_factory=StoreSettings)
    # data.prompts: a prompt file whose fit items carry completions is the fine-tuning data.
    data: DataConfig = field(default_factory=DataConfig)
    adl: AdlSettings = field(default_factory=AdlSettings)
    seed: int = 0
    progress: bool = True
    # Where the ADL table goes; null: a `table` folder in the run folder.
    report_dir: str | None = None


def register_schemas(cs: ConfigStore) -> None:
    cs.store(group="text", name="organism_text_schema", node=OrganismTextConfig)
    cs.store(group="text", name="package_text_schema", node=PackageTextConfig)
    cs.store(group="text", name="file_text_schema", node=FileTextConfig)
    cs.store(group="similarity", name="similarity_schema", node=SimilarityConfig)
    cs.store(group="grader", name="grader_schema", node=GraderConfig)
    cs.store(group="goals", name="goals_schema", node=GoalsConfig)
    cs.store(name="adl_schema", node=AdlExperimentConfig)
