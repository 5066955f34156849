"""The built-in organisms as a model source (`model=<family>_organism`): their prompt
sets from the word-level fact task, and the (base, fine-tune) pair built or read
from the organism cache, placed as the backend asks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from routing_suite.errors import ConfigError
from routing_suite.models import ModelPair, Placement, adapter_digest, as_dataclass, pair_with_adapter, weights_digest
from routing_suite.organisms import build as organism_build
from routing_suite.organisms.pairs import organism_prompt_sets
from routing_suite.organisms.specs import ArchSpec, TaskSpec, TrainSpec
from routing_suite.organisms.task import BEHAVIORS, make_task
from routing_suite.organisms.training import FINETUNE_KINDS, finetune_examples
from routing_suite.prompts import PromptPair


class OrganismPrompts:
    """Prompt sets from the organisms' word-level fact task (`task_spec`)."""

    task_spec: TaskSpec
    # Organisms answer with the answer word first.
    answer_match = "first"
    # The model's depth and width when they are known before loading (checks run before any work); None: after loading.
    num_layers = None
    hidden_size = None
    # The behaviours an organism can be fine-tuned for (behavior.name picks one).
    behaviors = BEHAVIORS
    # What the ADL may study: any fine-tune kind (routing behaviours, EM and SDF datasets).
    adl_behaviors = FINETUNE_KINDS

    def prompt_sets(self, behavior: str) -> dict[str, list[PromptPair]]:
        """The fit, localize and test splits (routing_suite.prompts.SPLITS), whole."""
        return organism_prompt_sets(make_task(self.task_spec))

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The word-level tokenizer (built from the task's words, no model needed; no chat template)."""
        task = make_task(self.task_spec)
        return organism_build.new_tokenizer(task, getattr(self, "pretraining", "routing"))

    def finetune_examples(self, behavior: str) -> list[tuple[str, str]]:
        """The (prompt, completion) pairs the fine-tune for `behavior` is trained on."""
        return finetune_examples(make_task(self.task_spec), behavior, getattr(self, "pretraining", "routing"))


@dataclass
class OrganismSource(OrganismPrompts):
    """A built-in organism of `family` (see `routing_suite.organisms`)."""

    family: str
    seed: int = 0
    arch: Any = None
    task: Any = None
    train: Any = None
    cache_dir: str = "outputs/organisms"
    num_threads: int = 1
    processes: int = 1
    pretraining: str = "routing"

    def __post_init__(self) -> None:
        try:
            self.spec = organism_build.OrganismSpec(
                family=self.family,
                arch=as_dataclass(ArchSpec, self.arch),
                task=as_dataclass(TaskSpec, self.task),
                train=as_dataclass(TrainSpec, self.train),
                seed=self.seed,
                num_threads=self.num_threads,
                processes=self.processes,
                pretraining=self.pretraining,
            )
        except ValueError as err:
            raise ConfigError(str(err)) from err

    @property
    def name(self) -> str:
        return f"{self.family}_organism"

    @property
    def num_layers(self) -> int | None:
        """Known before anything is built: the organism's configured depth."""
        return self.spec.arch.num_layers

    @property
    def hidden_size(self) -> int | None:
        return self.spec.arch.hidden_size

    @property
    def task_spec(self) -> TaskSpec:
        return self.spec.task

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir)

    def load(self, behavior: str, placement: Placement = Placement()) -> ModelPair:
        root = self.cache_root
        adapter = organism_build.ensure_adapter(root, self.spec, behavior)
        base_path = organism_build.base_dir(root, self.spec)
        tokenizer = organism_build.load_tokenizer(base_path)
        identity = {"source": "organism", "family": self.family, "base": base_path.name, "finetuned": adapter.name,
                    "adapter_sha256": adapter_digest(adapter)}
        pair = pair_with_adapter(
            self.family, tokenizer, base_path, adapter, placement, identity, lambda: organism_build.load_base(base_path), torch.float32
        )
        if placement.weights == "local":
            pair.identity["base_sha256"] = weights_digest(pair.base)
        return pair

