"""Your own fine-tune: a base checkpoint plus a PEFT adapter, or two full checkpoints.

Neither has prompt sets or fine-tuning data of its own: the prompts come from
your prompt file (`data.prompts`, `routing_suite.prompt_files`), the ADL's
fine-tuning data from that file or `adl.finetune_file`. A run without them is
refused before any work.

The cell is named by `model.name` (default: the adapter's
`base_model_name_or_path` + the adapter's folder, or the fine-tune's folder),
which stores and tables use where the organisms show their family. The family
(whose module paths the suite reads) is `model.family`, or the base
checkpoint's `config.json` `model_type` when that is one the suite knows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from routing_suite.errors import ConfigError
from routing_suite.families import MODULE_PATHS, family_paths
from routing_suite.models import (
    ModelPair,
    Placement,
    adapter_digest,
    check_adapter_files,
    check_dtype,
    pair_with_adapter,
    remote_model,
    weights_digest,
)
from routing_suite.prompts import PromptPair

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _check_source(key: str, value: str) -> None:
    """A local path must exist; anything else must look like a Hub id."""
    if Path(value).exists():
        return
    looks_local = value.startswith((".", "/", "~")) or value.count("/") != 1
    if looks_local or not _HUB_ID.match(value):
        raise ConfigError(f"{key}={value!r} does not exist (give an existing path or a Hub id 'org/name')")


def _config_json(ref: str, revision: str | None) -> dict | None:
    """A checkpoint's config.json: from its folder, or from the local Hub cache (never the network)."""
    path: Path | str | None = Path(ref) / "config.json"
    if not Path(path).is_file():
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(ref, "config.json", revision=revision)
        if not isinstance(path, str):
            return None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def infer_family(base: str, revision: str | None = None) -> str:
    """The family whose module paths the base uses: its config.json's model_type."""
    known = sorted(MODULE_PATHS)
    config = _config_json(base, revision)
    if config is None:
        raise ConfigError(f"model.family is not set and model.base={base!r} has no config.json here to infer it from; set model.family (one of {known})")
    model_type = config.get("model_type")
    if model_type not in MODULE_PATHS:
        raise ConfigError(
            f"model.family is not set and cannot be inferred: model.base={base!r} has model_type={model_type!r}, "
            f"not one of {known}; set model.family to the family whose module paths it shares"
        )
    return model_type


def _check(family: str | None, dtype: str, sources: dict[str, str], revision: str | None) -> str:
    """Every source exists, the dtype is known, and the family (given or inferred) too."""
    for key, value in sources.items():
        _check_source(key, value)
    check_dtype(dtype)
    if family is None:
        return infer_family(sources["model.base"], revision)
    family_paths(family)
    return family


def _check_name(name: str) -> str:
    if not name.strip() or "/" in name or name.startswith("."):
        raise ConfigError(f"model.name={name!r} must be a non-empty folder name (no '/', not starting with '.')")
    return name


def _tokenizer(base: str, revision: str | None) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(base, revision=revision)
    tokenizer.padding_side = "left"
    return tokenizer


def _adapter_folder(adapter: str, revision: str | None) -> Path:
    """A local adapter folder as it is; a Hub id downloaded (adapters are small), at
    `revision` when one is given; either checked whole."""
    if Path(adapter).exists():
        folder = Path(adapter)
    else:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import RevisionNotFoundError

        try:
            folder = Path(snapshot_download(adapter, revision=revision))
        except RevisionNotFoundError as err:
            raise ConfigError(
                f"model.adapter_revision (or model.revision)={revision!r}: the Hub has no such revision of {adapter!r}"
            ) from err
    check_adapter_files(folder)
    return folder


class UserPrompts:
    """What a fine-tune of your own does not have: prompt sets and fine-tuning data."""

    # The depth and width are read from the checkpoint when it is loaded.
    num_layers = None
    hidden_size = None
    # A real model answers in a sentence: the answer counts wherever it appears.
    answer_match = "anywhere"
    # behavior.name is yours to choose.
    behaviors = None

    def prompt_sets(self, behavior: str) -> dict[str, list[PromptPair]]:
        raise ConfigError(
            "data.prompts is not set: a fine-tune of your own has no prompt sets of its own; give your prompt file "
            "(JSONL, CSV or a YAML template: README, 'Bringing your own model and prompts')"
        )

    def finetune_examples(self, behavior: str) -> None:
        return None


@dataclass
class PeftSource(UserPrompts):
    """A base checkpoint (local path or Hub id) plus a PEFT adapter."""

    base: str
    adapter: str
    family: str | None = None
    name: str | None = None
    # Hub revisions pin what is downloaded: `revision` the base, and the adapter too
    # unless `adapter_revision` is given (a local adapter has none).
    revision: str | None = None
    adapter_revision: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        sources = {"model.base": self.base, "model.adapter": self.adapter}
        self.family = _check(self.family, self.dtype, sources, self.revision)
        if Path(self.adapter).exists():
            check_adapter_files(Path(self.adapter))
        self.name = _check_name(self.name or self._default_name())

    def _default_name(self) -> str:
        """<the adapter's base model>+<the adapter's folder>."""
        config = Path(self.adapter) / "adapter_config.json"
        base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path") if config.is_file() else None
        return f"{Path(str(base or self.base).rstrip('/')).name}+{Path(self.adapter.rstrip('/')).name}"

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return _tokenizer(self.base, self.revision)

    def load(self, behavior: str, placement: Placement = Placement()) -> ModelPair:
        dtype = check_dtype(self.dtype)

        def load_base() -> PreTrainedModel:
            return AutoModelForCausalLM.from_pretrained(self.base, dtype=dtype, revision=self.revision, attn_implementation="eager").eval()

        adapter_revision = self.adapter_revision or self.revision
        adapter = _adapter_folder(self.adapter, adapter_revision)
        identity = {"source": "peft", "base": self.base, "adapter": self.adapter, "revision": self.revision,
                    "adapter_revision": adapter_revision, "adapter_sha256": adapter_digest(adapter)}
        pair = pair_with_adapter(self.family, self.tokenizer(), self.base, adapter, placement, identity, load_base, dtype, self.revision)
        pair.label = self.name
        if placement.weights == "local":
            pair.identity["base_sha256"] = weights_digest(pair.base)
        return pair


@dataclass
class CheckpointPairSource(UserPrompts):
    """Two full checkpoints of the same architecture."""

    base: str
    finetuned: str
    family: str | None = None
    name: str | None = None
    # Hub revisions: `revision` pins both checkpoints unless `finetuned_revision` is given.
    revision: str | None = None
    finetuned_revision: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        sources = {"model.base": self.base, "model.finetuned": self.finetuned}
        self.family = _check(self.family, self.dtype, sources, self.revision)
        self.name = _check_name(self.name or Path(self.finetuned.rstrip("/")).name)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return _tokenizer(self.base, self.revision)

    def load(self, behavior: str, placement: Placement = Placement()) -> ModelPair:
        dtype = check_dtype(self.dtype)
        tokenizer = self.tokenizer()
        finetuned_revision = self.finetuned_revision or self.revision
        identity = {"source": "checkpoints", "base": self.base, "finetuned": self.finetuned, "revision": self.revision,
                    "finetuned_revision": finetuned_revision}
        if placement.weights == "remote":
            wrappers = {"base": remote_model(self.base, tokenizer, self.revision),
                        "finetuned": remote_model(self.finetuned, tokenizer, finetuned_revision)}
            return ModelPair(self.family, tokenizer, wrappers["base"]._module, None, identity, wrappers=wrappers, label=self.name)
        kwargs = dict(dtype=dtype, attn_implementation="eager")
        base = AutoModelForCausalLM.from_pretrained(self.base, revision=self.revision, **kwargs).eval()
        finetuned = AutoModelForCausalLM.from_pretrained(self.finetuned, revision=finetuned_revision, **kwargs).eval()
        identity.update(base_sha256=weights_digest(base), finetuned_sha256=weights_digest(finetuned))
        if base.config.hidden_size != finetuned.config.hidden_size:
            raise ConfigError(
                f"model.finetuned={self.finetuned!r} has hidden size {finetuned.config.hidden_size}, "
                f"model.base={self.base!r} has {base.config.hidden_size}"
            )
        return ModelPair(self.family, tokenizer, base, finetuned, identity, label=self.name)
