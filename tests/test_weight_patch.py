"""The weight patch: the base with the fine-tune's LoRA updates at one layer only."""

from __future__ import annotations

import copy

import numpy as np
import torch

from routing_suite.backends import LocalBackend
from routing_suite.generation import encode
from routing_suite.routing.localize import Localization, finetune_adapter
from routing_suite.routing.settings import LocalizeSettings


def _probs(model, tokenizer, prompts, token_ids) -> np.ndarray:
    with torch.no_grad():
        logits = model(**encode(tokenizer, prompts)).logits[:, -1].float().softmax(-1)
    return logits.gather(1, token_ids).sum(1).numpy()


def test_the_weight_patch_equals_the_base_with_one_layers_updates_merged_by_hand(llama_underperform, llama_source):
    """Per layer, the fraction of the base -> fine-tune gap restored by the adapter's
    updates at that layer alone equals a plain forward of a copy of the base with
    B A x scale added to that layer's weights; layers the fine-tune left alone give 0."""
    pair = llama_underperform
    prompts = [p.eval_prompt for p in llama_source.prompt_sets("underperform")["localize"][:8]]
    finetuned, base = pair.model("finetuned"), pair.model("base")
    with torch.no_grad():
        first = finetuned(**encode(pair.tokenizer, prompts)).logits[:, -1].argmax(-1, keepdim=True)
    reference = _probs(finetuned, pair.tokenizer, prompts, first)
    clean = _probs(base, pair.tokenizer, prompts, first)
    assert abs((reference - clean).mean()) > 0.05  # a gap to restore
    adapter = finetune_adapter(pair)
    planted = sorted(adapter.deltas)
    layers = list(range(pair.num_layers))
    job = Localization(pair, first, layers, LocalizeSettings(), LocalBackend())
    got = job.weight_effects(adapter, prompts, reference)
    for layer in layers:
        model = copy.deepcopy(base)
        with torch.no_grad():
            for delta in adapter.at(layer):
                model.get_submodule(delta.module).weight += delta.scale * delta.B @ delta.A
        expected = (_probs(model, pair.tokenizer, prompts, first) - clean).mean() / (reference - clean).mean()
        np.testing.assert_allclose(got[layer], expected, atol=1e-4, err_msg=f"layer {layer}")
        if layer not in planted:
            assert abs(got[layer]) < 1e-5
    assert np.abs(got[planted]).max() > 0.05  # the planted layers' updates do something alone
