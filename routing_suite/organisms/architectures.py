"""Tiny transformers configs for the four organism families."""

from __future__ import annotations

from transformers import (
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

from routing_suite.errors import ConfigError
from routing_suite.organisms.specs import ArchSpec

FAMILY_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "gemma2": Gemma2Config,
    "mistral": MistralConfig,
}
FAMILIES = tuple(FAMILY_CONFIGS)


def family_seed(family: str, seed: int) -> int:
    """The seed an organism of `family` is built with. Distinct per family:
    at this size Mistral's architecture equals Llama's, and the same seed
    would give the same weights."""
    return 1000 * seed + FAMILIES.index(family)


def family_config(family: str, arch: ArchSpec, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> PretrainedConfig:
    if family not in FAMILY_CONFIGS:
        raise ConfigError(f"model.family={family!r} is not one of {list(FAMILIES)}")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        max_position_embeddings=arch.max_positions,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
    )
    if family == "gemma2":
        # Gemma2 keeps its distinctive parts (logit soft-capping, alternating
        # sliding-window layers, scaled embeddings); the window is larger than
        # any prompt so every layer sees the whole prompt.
        common.update(head_dim=arch.hidden_size // arch.num_heads, sliding_window=arch.max_positions)
    if family == "mistral":
        common.update(sliding_window=arch.max_positions)
    config = FAMILY_CONFIGS[family](**common)
    # Eager attention: deterministic on CPU, and the same path nnsight traces.
    config._attn_implementation = "eager"
    return config
