"""The settings that determine an organism's weights (each is part of its cache key).

Plain dataclasses with no heavy imports, so that configs can use them as
schemas without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from routing_suite.errors import ConfigError

# Cue paraphrases per framing in routing_suite.organisms.task.
MAX_CUES = 20


@dataclass
class ArchSpec:
    """Size of an organism's network."""

    hidden_size: int = 64
    # Deep enough that a narrow window is a finding: the fine-tune is planted in two
    # mid-depth layers (TrainSpec.lora_layers), with layers above and below it.
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_positions: int = 64


@dataclass
class TaskSpec:
    """Sizes and seed of the synthetic fact task."""

    n_entities: int = 40
    # Entities never in the fine-tune: the localization split's and the test split's.
    n_localize_entities: int = 4
    n_test_entities: int = 8
    # Cue paraphrases per framing of each split (task.EVAL_CUES: 8 + 4 + 8 at most).
    n_train_cues: int = 8
    n_localize_cues: int = 4
    n_test_cues: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("n_localize_entities", "n_test_entities", "n_train_cues", "n_localize_cues", "n_test_cues"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.task.{key}={getattr(self, key)} must be >= 1")
        if self.n_localize_entities + self.n_test_entities >= self.n_entities:
            raise ConfigError(
                f"model.task: n_localize_entities + n_test_entities ({self.n_localize_entities + self.n_test_entities}) "
                f"must leave entities to fine-tune on (n_entities={self.n_entities})"
            )
        if self.n_train_cues + self.n_localize_cues + self.n_test_cues > MAX_CUES:
            raise ConfigError(
                f"model.task: n_train_cues + n_localize_cues + n_test_cues must be <= {MAX_CUES} (the cue paraphrases there are)"
            )


@dataclass
class TrainSpec:
    """Optimisation settings of the base training and the LoRA fine-tune."""

    base_steps: int = 1000
    base_lr: float = 4e-3
    lora_steps: int = 250
    lora_lr: float = 3e-3
    lora_rank: int = 8
    lora_alpha: int = 16
    batch_size: int = 64
    # The decoder layers a routing fine-tune may change (null: every layer):
    # the routing is planted there, so "where it lives" is ground truth the
    # localization is scored against. Two mid-depth layers of the 8.
    lora_layers: list[int] | None = field(default_factory=lambda: [3, 4])
    # Which projections of those layers it changes (null: every linear layer of
    # attention and MLP). Attention alone was too little for Gemma2 (its eval-side
    # rate stayed at 0.3-0.55 on held-out cues); the planted layers are the ground
    # truth either way.
    lora_modules: list[str] | None = None
