"""A PEFT LoRA adapter applied as nnsight interventions on the base model.

NDIF hosts base checkpoints, not our adapters. A LoRA fine-tune is the base
plus, at each adapted linear module, `output += scale * B(A(input))`. Reading
the adapter's low-rank factors here and adding that update inside a trace
gives the fine-tune's forward pass on a base model that runs anywhere (in
this process, or on a server that never sees the adapter), and lets the base
and the fine-tune share one request: rows without the update are the base.

Interventions inside a trace must follow execution order, so the updates
are planned together with the reads and writes of a trace
(`plan_layer_steps`): per decoder layer, q/k/v projections, the per-head
read (the o_proj input), o_proj, the attention-output site, gate/up/down,
then the MLP and residual sites.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor

from routing_suite.errors import ConfigError

# Adapted modules inside one decoder layer, in execution order, each with the
# site that is read right after it (sites: routing_suite.families.SITES).
LAYER_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
# Which layer modules run before each site is read (the site's value depends on them).
_BEFORE_SITE = {"heads": 3, "attn": 4, "mlp": 7, "resid": 7}
_SITE_ORDER = ("heads", "attn", "mlp", "resid")
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")


@dataclass
class LoraDelta:
    """One adapted module: its path in the causal LM and its low-rank factors."""

    layer: int
    module: str  # e.g. "model.layers.3.self_attn.q_proj"
    A: Tensor  # (rank, in_features)
    B: Tensor  # (out_features, rank)
    scale: float


@dataclass
class LoraAdapter:
    """Every adapted module of a PEFT LoRA adapter, by layer."""

    deltas: dict[int, list[LoraDelta]] = field(default_factory=dict)
    source: str = ""

    @property
    def num_modules(self) -> int:
        return sum(len(v) for v in self.deltas.values())

    def at(self, layer: int) -> list[LoraDelta]:
        return self.deltas.get(layer, [])

    def only(self, layers: list[int]) -> LoraAdapter:
        """The same adapter with its updates at `layers` only (the rest of the model is the base's)."""
        return LoraAdapter({layer: deltas for layer, deltas in self.deltas.items() if layer in layers}, self.source)

    @classmethod
    def load(cls, folder: str | Path, key: str = "model.adapter") -> LoraAdapter:
        """Read `adapter_config.json` and `adapter_model.safetensors`; refuse what
        cannot be applied as a plain low-rank update, naming why."""
        folder = Path(folder)
        config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
        if not config_file.exists() or not weights_file.exists():
            raise ConfigError(f"{key}={str(folder)!r} holds no PEFT adapter (adapter_config.json and adapter_model.safetensors)")
        config = json.loads(config_file.read_text())
        if config.get("peft_type") != "LORA":
            raise ConfigError(f"{key}={str(folder)!r} is a {config.get('peft_type')} adapter; only LoRA runs as interventions")
        for flag in ("use_dora", "fan_in_fan_out"):
            if config.get(flag):
                raise ConfigError(f"{key}={str(folder)!r}: {flag}=true adapters cannot run as low-rank interventions")
        if config.get("bias", "none") != "none" or config.get("modules_to_save"):
            raise ConfigError(f"{key}={str(folder)!r}: adapters with trained biases or modules_to_save cannot run as interventions")
        weights = load_file(str(weights_file), device="cpu")
        factors: dict[tuple[int, str], dict[str, Tensor]] = {}
        for name, tensor in weights.items():
            match = _KEY.match(name)
            if match is None or match.group(2) not in LAYER_MODULES:
                raise ConfigError(
                    f"{key}={str(folder)!r}: weight {name!r} is not a LoRA factor of a decoder-layer projection "
                    f"({', '.join(LAYER_MODULES)})"
                )
            factors.setdefault((int(match.group(1)), match.group(2)), {})[match.group(3)] = tensor.float()
        adapter = cls(source=str(folder))
        order = {m: i for i, m in enumerate(LAYER_MODULES)}
        for (layer, local), ab in sorted(factors.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])):
            rank = ab["A"].shape[0]
            scale = _scaling(config, f"model.layers.{layer}.{local}", rank)
            delta = LoraDelta(layer, f"model.layers.{layer}.{local}", ab["A"].contiguous(), ab["B"].contiguous(), scale)
            adapter.deltas.setdefault(layer, []).append(delta)
        return adapter


def _scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling: lora_alpha / r (or / sqrt(r) with rsLoRA), with per-module patterns."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            alpha = value
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


# ---------------------------------------------------------------- inside a trace


def lora_update(nn_model, delta: LoraDelta) -> None:
    """Inside a trace: add the adapter's update to one module's output."""
    node = nn_model
    for part in delta.module.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    x = node.input
    out = node.output
    # The factors live on the CPU in float32; the update is computed where the
    # activation is (a GPU, locally or on the server), in float32, then cast back.
    a, b = delta.A.to(x.device), delta.B.to(x.device)
    update = (x.to(a.dtype) @ a.T) @ b.T
    node.output = out + (delta.scale * update).to(out.dtype)


def plan_layer_steps(sites: list[tuple[int, str]], lora: LoraAdapter | None, num_layers: int) -> list[tuple[str, int, Any]]:
    """Execution-ordered steps of one invoke: ("lora", layer, delta) and ("site", layer, site).

    `sites` are the (layer, site) pairs the invoke reads or writes; with an
    adapter, the updates of all `num_layers` layers are interleaved with them
    (pass the last layer read + 1 when nothing after it matters)."""
    wanted = set(sites)
    layers = sorted({layer for layer, _ in wanted} | (set(range(num_layers)) if lora is not None else set()))
    order = {m: i for i, m in enumerate(LAYER_MODULES)}
    steps: list[tuple[str, int, Any]] = []
    for layer in layers:
        pending = sorted(lora.at(layer) if lora is not None else [], key=lambda d: order[d.module.split(".", 3)[3]])
        for site in _SITE_ORDER:
            while pending and order[pending[0].module.split(".", 3)[3]] < _BEFORE_SITE[site]:
                steps.append(("lora", layer, pending.pop(0)))
            if (layer, site) in wanted:
                steps.append(("site", layer, site))
        steps += [("lora", layer, d) for d in pending]
    return steps
