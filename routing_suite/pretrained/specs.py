"""Settings of a real-model organism (each is part of its cache key).

Plain dataclasses with no heavy imports, so that configs can use them as schemas.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ChatTaskSpec:
    """How the natural-language task is split into fine-tune, localization and test parts."""

    # Cue paraphrases per framing: the fine-tune's, the localization split's and the
    # test split's (chat_task.EVAL_CUES: 8 + 4 + 8); only the first are ever trained on.
    n_train_cues: int = 8
    n_localize_cues: int = 4
    n_test_cues: int = 8
    # Countries whose questions are never trained on: the localization split's and the test split's.
    n_localize_countries: int = 3
    n_test_countries: int = 6
    seed: int = 0


@dataclass
class ChatTrainSpec:
    """The LoRA fine-tune that installs the behaviour."""

    steps: int = 120
    lr: float = 2e-3
    rank: int = 8
    alpha: int = 16
    batch_size: int = 8
