"""The schemas of the config groups every study's experiment uses: `behavior` (what is
scored, conf/behavior/*.yaml) and `data` (which prompt pairs). The studies' own schemas
(`routing_suite.<study>.config`) build on them; `routing_suite.config` registers them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class PerformedConfig:
    """When a completion performs the behaviour (`scoring.Performed`): every test set holds."""

    # The expected answer is in the completion (found by behavior.answer_match).
    answer: bool = False
    # Word sequences anywhere in the completion, or at its start; null: none.
    phrases: list[str] | None = None
    start_phrases: list[str] | None = None
    # A Python regular expression searched in the raw completion; null: none.
    regex: str | None = None
    # What a phrase or regex match means: performed (a marker) or not_performed (a refusal).
    match_means: str = "performed"


@dataclass
class BehaviorConfig:
    """A behaviour and how to score it; conf/behavior/*.yaml are presets (see routing_suite/scoring.py)."""

    _target_: str = "routing_suite.scoring.Behavior"
    name: str = MISSING
    max_new_tokens: int = 6
    performed: PerformedConfig = field(default_factory=PerformedConfig)
    # first | anywhere | normalized | substring | choice; null: the model source's
    # (first for the organisms, anywhere for a chat model or your own).
    answer_match: str | None = None
    # Completion starts path patching reads ("{answer}": the pair's expected answer).
    first_tokens: list[str] = field(default_factory=lambda: [" {answer}"])
    # A class by _target_ deciding `performed` instead (scoring.Judge); null: none.
    judge: Any = None


@dataclass
class DataConfig:
    """Where the prompt pairs come from, and how many of each split (null: all), drawn with `seed`."""

    # A prompt file (JSONL, CSV or a YAML template; routing_suite/prompt_files.py)
    # used with any model source; null: the source's own prompt sets.
    prompts: str | None = None
    # Render the file's prompts through the tokenizer's chat template: auto (when
    # the tokenizer has one), true (it must have one) or false.
    chat_template: str = "auto"
    max_fit: int | None = None
    max_localize: int | None = None
    max_test: int | None = None
    seed: int = 0
