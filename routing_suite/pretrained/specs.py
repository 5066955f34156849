"""Settings of a real-model organism (each is part of its cache key).

Plain dataclasses with no heavy imports, so that configs can use them as schemas.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ChatTaskSpec:
    """How the natural-language task is split into fine-tune and held-out parts."""

    # The last `n_heldout_cues` paraphrases of each framing's cues are never trained on.
    n_heldout_cues: int = 4
    # Share of the countries whose questions are never trained on.
    heldout_fraction: float = 0.3
    seed: int = 0


@dataclass
class ChatTrainSpec:
    """The LoRA fine-tune that installs the behaviour."""

    steps: int = 120
    lr: float = 2e-3
    rank: int = 8
    alpha: int = 16
    batch_size: int = 8
