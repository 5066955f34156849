"""A LoRA fine-tune run as the base plus the adapter's updates applied as nnsight
interventions equals the PeftModel, for every organism family."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import tiny_source
from peft import PeftModel
from safetensors.torch import save_file

from routing_suite.backends import register_suite
from routing_suite.errors import ConfigError
from routing_suite.generation import encode
from routing_suite.lora import LoraAdapter, lora_update, plan_layer_steps
from routing_suite.models import Placement
from routing_suite.organisms import task as T
from routing_suite.organisms.pairs import organism_pairs

FAMILIES = ["llama", "qwen2", "gemma2", "mistral"]

# An adapter on every linear layer of every decoder layer (not the organisms' planted
# window): the updates of every module kind are checked.
EVERY_MODULE = {"lora_layers": None, "lora_modules": None}



@pytest.fixture(scope="module")
def cache(tiny_cache):
    return tiny_cache


def _prompts(source, n: int = 6) -> list[str]:
    pairs = organism_pairs(T.make_task(source.spec.task), "train", "all")[:n]
    return [p.eval_prompt for p in pairs[: n // 2]] + [p.deploy_prompt for p in pairs[: n // 2]]


def _logits_through_updates(traced, inputs, num_layers: int, remote: bool | str = False) -> torch.Tensor:
    plan = plan_layer_steps([], traced.lora, num_layers)
    nn_model = traced.nn
    with torch.no_grad(), nn_model.trace(inputs, remote=remote):
        for _kind, _layer, delta in plan:
            lora_update(nn_model, delta)
        logits = nn_model.output.logits.save()
    return logits


@pytest.mark.parametrize("family", FAMILIES)
def test_updates_as_interventions_equal_the_peft_model(family, cache):
    source = tiny_source(cache, family=family, **EVERY_MODULE)
    pair = source.load("refuse", Placement(finetune="deltas"))
    assert pair.finetuned is None and pair.lora.num_modules == 7 * pair.num_layers
    inputs = encode(pair.tokenizer, _prompts(source))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(pair.base), pair.adapter_path).eval()
    mask = inputs["attention_mask"]
    with torch.no_grad():
        expected = peft_model(**inputs, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    got = _logits_through_updates(pair.traced("finetuned"), inputs, pair.num_layers)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-4
    # The updates matter: the base alone is far from the fine-tune.
    with torch.no_grad():
        base = pair.base(**inputs, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    assert (base[real] - expected[real]).abs().max() > 1e-2


def test_updates_survive_nnsight_serialization(cache):
    """The same trace through remote="local": the adapter's tensors travel in the request."""
    source = tiny_source(cache, family="llama", **EVERY_MODULE)
    pair = source.load("refuse", Placement(finetune="deltas"))
    inputs = encode(pair.tokenizer, _prompts(source))
    register_suite()
    local = _logits_through_updates(pair.traced("finetuned"), inputs, pair.num_layers)
    simulated = _logits_through_updates(pair.traced("finetuned"), inputs, pair.num_layers, remote="local")
    assert torch.equal(local, simulated)


def test_plan_interleaves_updates_in_execution_order(cache):
    source = tiny_source(cache, family="llama", **EVERY_MODULE)
    adapter = LoraAdapter.load(source.load("refuse", Placement(finetune="deltas")).adapter_path)
    steps = plan_layer_steps([(1, "heads"), (1, "attn"), (1, "resid")], adapter, 2)
    names = [item.module.split(".", 3)[3] if kind == "lora" else item for kind, layer, item in steps if layer == 1]
    assert names == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "heads", "self_attn.o_proj", "attn",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "resid",
    ]
    assert [k for k, layer, _ in steps if layer == 0] == ["lora"] * 7


def test_adapters_that_are_not_plain_lora_are_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match="use_dora=true"):
        LoraAdapter.load(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 16, "r": 8}))
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(8, 4)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match="lm_head.lora_A.weight.*not a LoRA factor of a decoder-layer projection"):
        LoraAdapter.load(tmp_path)
    with pytest.raises(ConfigError, match="holds no PEFT adapter"):
        LoraAdapter.load(tmp_path / "missing")
