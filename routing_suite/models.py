"""The (base, fine-tuned) model pair every experiment studies.

A `model` config instantiates one of the sources below; instantiating only
validates (cheap), `load(behavior)` builds or reads the weights. The pair
holds plain transformers models: the fine-tune is the adapter merged into a
copy of the base, so both share the family's module paths
(`routing_suite.families`). Wrapping for nnsight happens in `nnsight_model`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from routing_suite.errors import ConfigError
from routing_suite.families import family_paths
from routing_suite.organisms import build as organism_build
from routing_suite.organisms.specs import ArchSpec, TaskSpec, TrainSpec
from routing_suite.organisms.task import make_task
from routing_suite.prompts import PromptPair, organism_prompt_sets

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelPair:
    family: str
    tokenizer: PreTrainedTokenizerBase
    base: PreTrainedModel
    finetuned: PreTrainedModel
    # What identifies the weights, for the store's provenance.
    identity: dict[str, Any] = field(default_factory=dict)
    adapter_path: Path | None = None
    # What the cell is called in stores and tables (default: the family).
    label: str | None = None

    def __post_init__(self) -> None:
        # Experiments only read and steer activations: no gradients anywhere.
        for model in (self.base, self.finetuned):
            model.requires_grad_(False)

    @property
    def cell_name(self) -> str:
        return self.label or self.family

    def model(self, which: str) -> PreTrainedModel:
        if which not in ("base", "finetuned"):
            raise ValueError(f"model {which!r} is not one of ['base', 'finetuned']")
        return self.base if which == "base" else self.finetuned

    def traced(self, which: str):
        """The nnsight wrapper of one model, made once and shared by every stage."""
        cache = self.__dict__.setdefault("_traced", {})
        if which not in cache:
            cache[which] = nnsight_model(self.model(which), self.tokenizer)
        return cache[which]

    @property
    def num_layers(self) -> int:
        return self.base.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.base.config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.base.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        config = self.base.config
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def nnsight_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
    """Wrap a loaded model for nnsight tracing (tokenizer passed explicitly)."""
    from nnsight.modeling.transformers import TransformersModel

    return TransformersModel(model, task="text-generation", tokenizer=tokenizer)


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is not one of {list(_DTYPES)}")
    return _DTYPES[dtype]


def _check_source(key: str, value: str) -> None:
    """A local path must exist; anything else must look like a Hub id."""
    if Path(value).exists():
        return
    looks_local = value.startswith((".", "/", "~")) or value.count("/") != 1
    if looks_local or not _HUB_ID.match(value):
        raise ConfigError(f"{key}={value!r} does not exist (give an existing path or a Hub id 'org/name')")


def _as_dataclass(cls: type, value: Any) -> Any:
    """Accept a dataclass instance, a DictConfig or a dict (or None: defaults)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    return cls(**(value or {}))


def _weights_digest(model: PreTrainedModel) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_adapter_matches(adapter: Path, base: PreTrainedModel, adapter_key: str = "model.adapter") -> None:
    """Refuse an adapter whose module shapes do not fit the base, naming both."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    weights = adapter / "adapter_model.safetensors"
    modules = dict(base.named_modules())
    with safe_open(str(weights), framework="pt") as f:
        for name in f.keys():
            if ".lora_A." not in name:
                continue
            module_name = name.split(".lora_A.")[0].removeprefix("base_model.model.")
            in_features = f.get_slice(name).get_shape()[1]
            module = modules.get(module_name)
            if module is None or getattr(module, "in_features", None) != in_features:
                found = None if module is None else getattr(module, "in_features", None)
                raise ConfigError(
                    f"{adapter_key}={str(adapter)!r} does not match the base model: module {module_name!r} "
                    f"has in_features={found}, the adapter expects {in_features} "
                    f"(adapter trained on {config.get('base_model_name_or_path')!r})"
                )


def merged_finetune(base_path: str | Path, adapter: Path, dtype: torch.dtype, revision: str | None = None) -> PreTrainedModel:
    """A fresh copy of the base with the adapter merged into its weights."""
    copy = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, revision=revision, attn_implementation="eager")
    check_adapter_matches(adapter, copy)
    return PeftModel.from_pretrained(copy, adapter).merge_and_unload().eval()


class OrganismPrompts:
    """Prompt sets from the organisms' word-level fact task (`task_spec`)."""

    task_spec: TaskSpec
    # Organisms answer with the answer word first.
    answer_match = "first"

    def prompt_sets(self, behavior: str, max_fit: int | None, max_test: int | None, seed: int) -> dict[str, list[PromptPair]]:
        return organism_prompt_sets(make_task(self.task_spec), max_fit, max_test, seed)


@dataclass
class OrganismSource(OrganismPrompts):
    """A built-in organism of `family` (see `routing_suite.organisms`)."""

    family: str
    seed: int = 0
    arch: Any = None
    task: Any = None
    train: Any = None
    cache_dir: str = "outputs/organisms"
    num_threads: int = 2

    def __post_init__(self) -> None:
        try:
            self.spec = organism_build.OrganismSpec(
                family=self.family,
                arch=_as_dataclass(ArchSpec, self.arch),
                task=_as_dataclass(TaskSpec, self.task),
                train=_as_dataclass(TrainSpec, self.train),
                seed=self.seed,
                num_threads=self.num_threads,
            )
        except ValueError as err:
            raise ConfigError(str(err)) from err

    @property
    def name(self) -> str:
        return f"{self.family}_organism"

    @property
    def task_spec(self) -> TaskSpec:
        return self.spec.task

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir)

    def load(self, behavior: str) -> ModelPair:
        root = self.cache_root
        adapter = organism_build.ensure_adapter(root, self.spec, behavior)
        base_path = organism_build.base_dir(root, self.spec)
        tokenizer = organism_build.load_tokenizer(base_path)
        base = organism_build.load_base(base_path)
        finetuned = merged_finetune(base_path, adapter, torch.float32)
        identity = {
            "source": "organism",
            "family": self.family,
            "base": base_path.name,
            "finetuned": adapter.name,
            "base_sha256": _weights_digest(base),
        }
        return ModelPair(self.family, tokenizer, base, finetuned, identity, adapter)


@dataclass
class PeftSource(OrganismPrompts):
    """A base checkpoint (local path or Hub id) plus a PEFT adapter."""

    # Prompts come from the organism task (natural-language prompt sets are
    # built for the real model in routing_suite.pretrained).
    task_spec = TaskSpec()

    family: str
    base: str
    adapter: str
    revision: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        try:
            family_paths(self.family)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        _check_dtype(self.dtype)
        _check_source("model.base", self.base)
        _check_source("model.adapter", self.adapter)

    @property
    def name(self) -> str:
        return Path(self.adapter).name

    def load(self, behavior: str) -> ModelPair:
        dtype = _check_dtype(self.dtype)
        tokenizer = AutoTokenizer.from_pretrained(self.base, revision=self.revision)
        tokenizer.padding_side = "left"
        base = AutoModelForCausalLM.from_pretrained(
            self.base, dtype=dtype, revision=self.revision, attn_implementation="eager"
        ).eval()
        adapter = Path(self.adapter)
        finetuned = merged_finetune(self.base, adapter, dtype, self.revision)
        identity = {"source": "peft", "base": self.base, "adapter": self.adapter, "revision": self.revision}
        return ModelPair(self.family, tokenizer, base, finetuned, identity, adapter)


@dataclass
class CheckpointPairSource(OrganismPrompts):
    """Two full checkpoints of the same architecture."""

    # Prompts come from the organism task (natural-language prompt sets are
    # built for the real model in routing_suite.pretrained).
    task_spec = TaskSpec()

    family: str
    base: str
    finetuned: str
    revision: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        try:
            family_paths(self.family)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        _check_dtype(self.dtype)
        _check_source("model.base", self.base)
        _check_source("model.finetuned", self.finetuned)

    @property
    def name(self) -> str:
        return Path(self.finetuned).name

    def load(self, behavior: str) -> ModelPair:
        dtype = _check_dtype(self.dtype)
        tokenizer = AutoTokenizer.from_pretrained(self.base, revision=self.revision)
        tokenizer.padding_side = "left"
        kwargs = dict(dtype=dtype, attn_implementation="eager")
        base = AutoModelForCausalLM.from_pretrained(self.base, revision=self.revision, **kwargs).eval()
        finetuned = AutoModelForCausalLM.from_pretrained(self.finetuned, **kwargs).eval()
        if base.config.hidden_size != finetuned.config.hidden_size:
            raise ConfigError(
                f"model.finetuned={self.finetuned!r} has hidden size {finetuned.config.hidden_size}, "
                f"model.base={self.base!r} has {base.config.hidden_size}"
            )
        identity = {"source": "checkpoints", "base": self.base, "finetuned": self.finetuned, "revision": self.revision}
        return ModelPair(self.family, tokenizer, base, finetuned, identity)
