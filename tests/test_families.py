"""The module paths of routing_suite/families.py, checked against the real architectures.

Hub configs cannot be downloaded here, so HUB_CONFIGS below holds the values
of each model's config.json as written from knowledge of the published
models (not read from the Hub). The models are built from them on the meta
device: no weights, no download, a fraction of a second each.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from routing_suite.families import MODULE_PATHS, SITES, site_path
from routing_suite.models import ModelPair

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"

# conf/model/<name>.yaml -> (Hub id, config.json values that shape the modules).
HUB_CONFIGS = {
    "llama3_2_1b_instruct": (
        "meta-llama/Llama-3.2-1B-Instruct",
        dict(
            model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
            max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                          "original_max_position_embeddings": 8192},
        ),
    ),
    "qwen2_5_1_5b_instruct": (
        "Qwen/Qwen2.5-1.5B-Instruct",
        dict(
            model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
            num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
            rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
            sliding_window=32768, max_window_layers=21,
        ),
    ),
    "gemma2_2b_it": (
        "google/gemma-2-2b-it",
        dict(
            model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
            num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
            max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4096,
            query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
            hidden_activation="gelu_pytorch_tanh",
        ),
    ),
    "mistral_7b_instruct": (
        "mistralai/Mistral-7B-Instruct-v0.3",
        dict(
            model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32768,
            max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None,
            tie_word_embeddings=False,
        ),
    ),
}


def _config(values: dict, **changes):
    values = {**values, **changes}
    return AutoConfig.for_model(values.pop("model_type"), **values)


def _meta_model(values: dict):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(_config(values), attn_implementation="eager")


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def test_every_family_has_a_real_model_config():
    families = {yaml.safe_load((CONF / f"{name}.yaml").read_text())["family"] for name in HUB_CONFIGS}
    assert families == set(MODULE_PATHS)


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_model_config_names_the_hub_model_of_its_family(name):
    hub_id, values = HUB_CONFIGS[name]
    conf = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    assert conf["base"] == hub_id
    assert conf["family"] == values["model_type"]
    assert "adapter" not in conf, "the adapter stays a required value the user sets"


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_every_module_path_resolves_with_the_right_shapes(name):
    _, values = HUB_CONFIGS[name]
    family = values["model_type"]
    model = _meta_model(values)
    pair = ModelPair(family, tokenizer=None, base=model, finetuned=model)
    paths = MODULE_PATHS[family]
    assert len(model.get_submodule(paths.layers)) == pair.num_layers == values["num_hidden_layers"]
    for layer in range(pair.num_layers):
        for site in SITES:
            model.get_submodule(site_path(family, site, layer))  # raises when a path does not resolve
    o_proj = model.get_submodule(site_path(family, "heads", 0))
    assert o_proj.in_features == pair.num_heads * pair.head_dim
    assert model.get_submodule(paths.unembed).out_features == values["vocab_size"]

    # A forward pass on the meta device gives every site's shape without any compute.
    seen: dict[str, torch.Size] = {}
    last = pair.num_layers - 1
    hooks = [
        model.get_submodule(site_path(family, site, last)).register_forward_hook(
            lambda _m, _i, out, site=site: seen.__setitem__(site, _hidden(out).shape)
        )
        for site in ("resid", "attn", "mlp")
    ]
    hooks.append(
        o_proj.register_forward_pre_hook(
            lambda _m, args, kwargs: seen.__setitem__("heads", (args[0] if args else kwargs["input"]).shape),
            with_kwargs=True,
        )
    )
    hooks.append(model.get_submodule(paths.final_norm).register_forward_hook(
        lambda _m, _i, out: seen.__setitem__("final_norm", out.shape)))
    with torch.no_grad():
        logits = model(input_ids=torch.zeros(2, 5, dtype=torch.long, device="meta")).logits
    for hook in hooks:
        hook.remove()
    hidden = values["hidden_size"]
    assert {k: tuple(v) for k, v in seen.items()} == {
        "resid": (2, 5, hidden), "attn": (2, 5, hidden), "mlp": (2, 5, hidden),
        "heads": (2, 5, pair.num_heads * pair.head_dim), "final_norm": (2, 5, hidden),
    }
    assert tuple(logits.shape) == (2, 5, values["vocab_size"])


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_attn_and_mlp_sites_are_what_each_layer_adds_to_the_residual_stream(name):
    """resid(i) = resid(i-1) + attn(i) + mlp(i), computed on a shrunken copy of the architecture."""
    _, values = HUB_CONFIGS[name]
    family = values["model_type"]
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=50, max_position_embeddings=64)
    if family == "gemma2":
        small["query_pre_attn_scalar"] = 16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(values, **small), attn_implementation="eager").eval()
    seen: dict[str, torch.Tensor] = {}
    layer = 1
    hooks = [
        model.get_submodule(site_path(family, site, layer)).register_forward_hook(
            lambda _m, _i, out, site=site: seen.__setitem__(site, _hidden(out))
        )
        for site in ("resid", "attn", "mlp")
    ]
    hooks.append(model.get_submodule(site_path(family, "resid", layer - 1)).register_forward_hook(
        lambda _m, _i, out: seen.__setitem__("before", _hidden(out))))
    with torch.no_grad():
        model(input_ids=torch.arange(10).reshape(2, 5))
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(seen["resid"], seen["before"] + seen["attn"] + seen["mlp"], rtol=1e-5, atol=1e-5)
