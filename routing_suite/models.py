"""The (base, fine-tuned) model pair every experiment studies.

A `model` config instantiates a source (`ModelSource`: the built-in organisms
in `routing_suite.organisms.source`, the real SmolLM2 organism in
`routing_suite.pretrained`, your own fine-tune in `routing_suite.user_models`); instantiating only validates
(cheap), `load(behavior)` builds or reads the weights. The pair
holds plain transformers models: the fine-tune is the adapter merged into a
copy of the base, so both share the family's module paths
(`routing_suite.families`). Wrapping for nnsight happens in `nnsight_model`.

A backend can ask for another placement (`Placement`): the fine-tune run as
the base plus the adapter's low-rank updates applied inside each trace
(`finetune="deltas"`, what NDIF needs, since it hosts bases and not our
adapters), and the base named by its id or path with its weights on the
server (`weights="remote"`: only the config is read here).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from routing_suite.errors import ConfigError
from routing_suite.lora import LoraAdapter
from routing_suite.prompts import PromptPair
from routing_suite.provenance import file_digest

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


FINETUNE_MODES = ("merged", "deltas")
WEIGHTS = ("local", "remote")


@dataclass(frozen=True)
class Placement:
    """How a backend wants the pair: the fine-tune merged or as adapter updates
    applied in the trace; the weights in this process or only on the server."""

    finetune: str = "merged"
    weights: str = "local"

    def __post_init__(self) -> None:
        if self.finetune not in FINETUNE_MODES or self.weights not in WEIGHTS:
            raise ValueError(f"placement {self} is not in {FINETUNE_MODES} x {WEIGHTS}")


@dataclass(frozen=True)
class Traced:
    """What one trace runs: an nnsight model and, for a fine-tune run as the base
    plus its adapter, the adapter whose updates every invoke of it applies."""

    nn: Any
    lora: LoraAdapter | None = None


@dataclass
class ModelPair:
    family: str
    tokenizer: PreTrainedTokenizerBase
    base: PreTrainedModel
    # None when the fine-tune runs as the base plus `lora` (Placement.finetune="deltas").
    finetuned: PreTrainedModel | None
    # What identifies the weights, for the store's provenance.
    identity: dict[str, Any] = field(default_factory=dict)
    adapter_path: Path | None = None
    lora: LoraAdapter | None = None
    # nnsight wrappers made by the loader (remote weights: models named by id or path).
    wrappers: dict[str, Any] = field(default_factory=dict)
    # What the cell is called in stores and tables (default: the family).
    label: str | None = None

    def __post_init__(self) -> None:
        if self.finetuned is None and self.lora is None and "finetuned" not in self.wrappers:
            raise ValueError("a pair needs a fine-tuned model, its wrapper, or the adapter to apply to the base")
        # Experiments only read and steer activations: no gradients anywhere.
        for model in (self.base, self.finetuned):
            if model is not None:
                model.requires_grad_(False)

    @property
    def cell_name(self) -> str:
        return self.label or self.family

    def to(self, device: str) -> ModelPair:
        """Both models on `device` (before anything wraps them for nnsight); inputs follow
        (nnsight moves them to the model's device), and every edit, patch and adapter
        update is made on the device and in the dtype of the activation it changes."""
        if self.wrappers:
            raise ValueError("move the pair before it is traced (its nnsight wrappers hold the models)")
        for model in (self.base, self.finetuned):
            if model is not None and model.device.type != "meta":
                model.to(device)
        return self

    def model(self, which: str) -> PreTrainedModel:
        if which not in ("base", "finetuned"):
            raise ValueError(f"model {which!r} is not one of ['base', 'finetuned']")
        model = self.base if which == "base" else self.finetuned
        if model is None:
            raise ValueError("this pair runs the fine-tune as the base plus adapter updates: there is no merged model")
        return model

    def _wrapper(self, which: str):
        if which not in self.wrappers:
            self.wrappers[which] = nnsight_model(self.model(which), self.tokenizer)
        return self.wrappers[which]

    def traced(self, which: str) -> Traced:
        """What a trace of one model runs, made once and shared by every stage.

        With the fine-tune as adapter updates, both models share the base's
        wrapper, so their invokes can go into one trace (one request)."""
        if which == "finetuned" and self.finetuned is None and "finetuned" not in self.wrappers:
            return Traced(self._wrapper("base"), self.lora)
        if which not in ("base", "finetuned"):
            raise ValueError(f"model {which!r} is not one of ['base', 'finetuned']")
        return Traced(self._wrapper(which))

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


def remote_model(repo: str | Path, tokenizer: PreTrainedTokenizerBase, revision: str | None = None):
    """An nnsight wrapper that names a checkpoint for a server: only its config is
    read here (a meta model); the weights are the server's.

    A local checkpoint is named by its absolute path, which a server on this
    machine loads as it is; nnsight would otherwise ask the Hub for the id."""
    from nnsight.modeling import huggingface
    from nnsight.modeling.transformers import TransformersModel

    name = str(repo)
    if Path(name).exists():
        name = str(Path(name).resolve())
        huggingface._ID_CACHE[name] = name
    # Eager attention, as the local loaders use: the remote env carries it, so
    # the server switches its model to the same implementation.
    return TransformersModel(
        name, revision=revision, task="text-generation", tokenizer=tokenizer, attn_implementation="eager"
    )


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is not one of {list(_DTYPES)}")
    return _DTYPES[dtype]


def as_dataclass(cls: type, value: Any) -> Any:
    """Accept a dataclass instance, a DictConfig or a dict (or None: defaults)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    return cls(**(value or {}))


def check_adapter_files(adapter: Path, key: str = "model.adapter") -> None:
    """Refuse, before any work, an adapter folder whose config is not JSON or whose
    weights file is cut short (a safetensors file: an 8-byte header length, the JSON
    header, then the tensors, whose last byte the header says)."""
    config = Path(adapter) / "adapter_config.json"
    weights = Path(adapter) / "adapter_model.safetensors"
    for needed in (config, weights):
        if not needed.is_file():
            raise ConfigError(f"{key}={str(adapter)!r} has no {needed.name}")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key}: {str(config)!r} is not valid JSON ({err}); the adapter's files are damaged") from err
    size = weights.stat().st_size
    with open(weights, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(handle.read(length)) if 0 < length <= size - 8 else None
        except (ValueError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise ConfigError(f"{key}: {str(weights)!r} is not a whole safetensors file (its header cannot be read)")
    end = max((int(t["data_offsets"][1]) for name, t in header.items() if name != "__metadata__"), default=0)
    if size != 8 + length + end:
        raise ConfigError(f"{key}: {str(weights)!r} is cut short or padded: {size} bytes, its header describes {8 + length + end}")


def adapter_digest(adapter: Path) -> str:
    """A hash of an adapter's weights file (what identifies a LoRA fine-tune's weights)."""
    return file_digest(Path(adapter) / "adapter_model.safetensors")


def weights_digest(model: PreTrainedModel) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        # The raw bytes (numpy has no bfloat16; float32 bytes are what .numpy() gave).
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
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


class ModelSource(Protocol):
    """What every `model` config instantiates."""

    # The cell's name in stores and tables.
    name: str
    # The model's depth when known before loading (checks run before any work); None: after loading.
    num_layers: int | None
    # How the model answers (`scoring.is_correct`), unless behavior.answer_match says otherwise.
    answer_match: str
    # The behaviour names it can be loaded for (a built-in organism's fine-tunes); None: any.
    behaviors: tuple[str, ...] | None

    def prompt_sets(self, behavior: str) -> dict[str, list[PromptPair]]:
        """Its own fit, localize and test splits, whole (data.prompts replaces them)."""

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, without loading the weights (prompt files are rendered with it)."""

    def finetune_examples(self, behavior: str) -> list[tuple[str, str]] | None:
        """The (prompt, completion) pairs the fine-tune was trained on; None: not known."""

    def load(self, behavior: str, placement: Placement = ...) -> ModelPair: ...


def pair_with_adapter(
    family: str,
    tokenizer: PreTrainedTokenizerBase,
    base_ref: str | Path,
    adapter: Path,
    placement: Placement,
    identity: dict[str, Any],
    load_base,
    dtype: torch.dtype,
    revision: str | None = None,
) -> ModelPair:
    """A base and its LoRA fine-tune, placed as the backend asks (see `Placement`)."""
    if placement.weights == "remote":
        if placement.finetune == "merged":
            raise ConfigError("a fine-tune whose base runs remotely cannot be merged here: it runs as adapter updates")
        wrapper = remote_model(base_ref, tokenizer, revision)
        check_adapter_matches(adapter, wrapper._module)
        lora = LoraAdapter.load(adapter)
        return ModelPair(family, tokenizer, wrapper._module, None, identity, adapter, lora, {"base": wrapper})
    base = load_base()
    if placement.finetune == "deltas":
        check_adapter_matches(adapter, base)
        return ModelPair(family, tokenizer, base, None, identity, adapter, LoraAdapter.load(adapter))
    return ModelPair(family, tokenizer, base, merged_finetune(base_ref, adapter, dtype, revision), identity, adapter)
