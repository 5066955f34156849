"""The settings that determine an organism's weights (each is part of its cache key).

Plain dataclasses with no heavy imports, so that configs can use them as
schemas without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ArchSpec:
    """Size of an organism's network."""

    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_positions: int = 64


@dataclass
class TaskSpec:
    """Sizes and seed of the synthetic fact task."""

    n_entities: int = 40
    n_heldout_cues: int = 3
    heldout_entity_fraction: float = 0.3
    seed: int = 0


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
