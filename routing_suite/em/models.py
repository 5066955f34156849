"""One family's base model and its EM fine-tunes, side by side.

Each fine-tune is loaded as a `ModelPair` of the model source (an organism:
built or read from its cache); the base comes from the first pair, so every
model shares one tokenizer and the family's module paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from routing_suite.errors import ConfigError
from routing_suite.models import ModelPair, Traced
from routing_suite.organisms import build as organism_build
from routing_suite.organisms.source import OrganismSource

BASE = "base"


@dataclass
class EmModels:
    """The base (`"base"`) and each fine-tune (by its dataset kind)."""

    family: str
    tokenizer: PreTrainedTokenizerBase
    pairs: dict[str, ModelPair]
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [BASE, *self.pairs]

    def traced(self, name: str) -> Traced:
        if name == BASE:
            return next(iter(self.pairs.values())).traced("base")
        if name not in self.pairs:
            raise ValueError(f"model {name!r} is not one of {self.names}")
        return self.pairs[name].traced("finetuned")

    @property
    def num_layers(self) -> int:
        return next(iter(self.pairs.values())).num_layers

    @property
    def hidden_size(self) -> int:
        return next(iter(self.pairs.values())).hidden_size


def load_family(source, kinds: list[str], backend) -> EmModels:
    """Every fine-tune of `kinds` on the source's base (built first if the source builds),
    placed as the backend wants them and checked against its service."""
    if not isinstance(source, OrganismSource):
        raise ConfigError(f"experiments.em builds its fine-tunes: model= must be a built-in organism (got {type(source).__name__})")
    organism_build.ensure_adapters(source.cache_root, source.spec, kinds)  # with model.processes=2, two at a time
    pairs = {kind: source.load(kind, backend.placement) for kind in kinds}
    for pair in pairs.values():
        backend.check_pair(pair)
    first = pairs[kinds[0]]
    identity = {
        "source": "organism",
        "family": first.family,
        "base": first.identity.get("base"),
        "base_sha256": first.identity.get("base_sha256"),
        "finetunes": {kind: pair.identity.get("finetuned") for kind, pair in pairs.items()},
    }
    # Every model's weight hashes (when the weights are here): a rebuilt base or
    # fine-tune (another CPU, changed training data) gets a store of its own.
    weights = {f"{kind}_adapter_sha256": pair.identity["adapter_sha256"] for kind, pair in pairs.items() if "adapter_sha256" in pair.identity}
    if first.identity.get("base_sha256"):
        weights["base_sha256"] = first.identity["base_sha256"]
    identity["weights"] = weights
    return EmModels(first.family, first.tokenizer, pairs, identity)
