"""Where each model family keeps the modules the suite reads and writes.

One table for every family, so no other module needs to know an
architecture's attribute names. Paths are relative to the causal-LM module
(the object `AutoModelForCausalLM` returns); `{i}` is the layer index.

Sites:
- `resid`: the decoder layer's output, the residual stream after layer i;
- `attn`: what attention adds to the residual stream at layer i (for Gemma2
  that is after its post-attention norm);
- `heads`: the input of the attention output projection, which is the
  concatenation of the per-head outputs, split by head;
- `mlp`: what the MLP adds to the residual stream at layer i.
"""

from __future__ import annotations

from dataclasses import dataclass

from routing_suite.errors import ConfigError


@dataclass(frozen=True)
class FamilyPaths:
    layers: str
    resid: str
    attn: str
    heads: str
    mlp: str
    final_norm: str
    unembed: str


_DECODER = dict(
    layers="model.layers",
    resid="model.layers.{i}",
    attn="model.layers.{i}.self_attn",
    heads="model.layers.{i}.self_attn.o_proj",
    mlp="model.layers.{i}.mlp",
    final_norm="model.norm",
    unembed="lm_head",
)

MODULE_PATHS: dict[str, FamilyPaths] = {
    "llama": FamilyPaths(**_DECODER),
    "qwen2": FamilyPaths(**_DECODER),
    "mistral": FamilyPaths(**_DECODER),
    "gemma2": FamilyPaths(
        **{
            **_DECODER,
            "attn": "model.layers.{i}.post_attention_layernorm",
            "mlp": "model.layers.{i}.post_feedforward_layernorm",
        }
    ),
}
SITES = ("resid", "attn", "heads", "mlp")


def family_paths(family: str) -> FamilyPaths:
    if family not in MODULE_PATHS:
        raise ConfigError(f"model.family={family!r} is not one of {sorted(MODULE_PATHS)}")
    return MODULE_PATHS[family]


def site_path(family: str, site: str, layer: int) -> str:
    if site not in SITES:
        raise ConfigError(f"site={site!r} is not one of {list(SITES)}")
    return getattr(family_paths(family), site).format(i=layer)
