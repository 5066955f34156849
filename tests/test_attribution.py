"""Attribution patching's first-order terms against exact patches small enough to be linear."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from routing_suite.backends import LocalBackend
from routing_suite.families import site_path
from routing_suite.generation import encode
from routing_suite.lora import lora_update, plan_layer_steps
from routing_suite.routing.attribution import estimated_effect, gradient_pass, performed_log_odds
from routing_suite.tracing import envoy_at, site_value


def _forward(traced, family, tokenizer, prompts, ids, num_layers, layers, patch=None, site="attn"):
    """log-odds of `ids` per prompt, and the values of `site` at the last token, with
    `patch` ({layer: values}) written there first."""
    saved, nn_model = {}, traced.nn
    with torch.no_grad(), nn_model.trace(encode(tokenizer, prompts)):
        for kind, layer, item in plan_layer_steps([(layer, site) for layer in layers], traced.lora, num_layers):
            if kind == "lora":
                lora_update(nn_model, item)
                continue
            x = site_value(envoy_at(nn_model, site_path(family, item, layer)), item)
            if patch and layer in patch:
                x[:, -1] = patch[layer]
            saved[layer] = x[:, -1].save()
        saved["lo"] = performed_log_odds(nn_model.output.logits, ids).save()
    return saved


@pytest.mark.parametrize("model", ["finetuned", "base"])
def test_the_first_order_terms_are_the_derivative_of_the_patched_log_odds(llama_underperform, llama_source, model):
    """Patching a small change into one layer's attention output (or one head's slice of
    the o_proj input) moves the log-odds by the gradient term to first order: through
    the fine-tune as adapter updates and through the plain base alike."""
    pair, traced = llama_underperform, llama_underperform.traced(model)
    prompts = [p.eval_prompt for p in llama_source.prompt_sets("underperform")["localize"][:12]]
    layers = list(range(pair.num_layers))
    ids = torch.tensor([[1], [2]] * 6)  # any token ids: the terms hold for any metric target
    clean = _forward(traced, pair.family, pair.tokenizer, prompts, ids, pair.num_layers, layers)
    heads = _forward(traced, pair.family, pair.tokenizer, prompts, ids, pair.num_layers, layers, site="heads")
    gen = torch.Generator().manual_seed(0)
    # A change of 1% of each value's norm: second-order terms are ~1e-4 of the first.
    nudge = {layer: 0.01 * clean[layer].norm(dim=-1, keepdim=True) * torch.randn(clean[layer].shape, generator=gen) / clean[layer].shape[-1] ** 0.5
             for layer in layers}
    donor_attn = torch.stack([clean[layer] + nudge[layer] for layer in layers], 1)
    head_nudge = {layer: 0.01 * heads[layer].norm(dim=-1, keepdim=True) * torch.randn(heads[layer].shape, generator=gen) / heads[layer].shape[-1] ** 0.5
                  for layer in layers}
    donor_heads = torch.stack([heads[layer] + head_nudge[layer] for layer in layers], 1).reshape(len(prompts), len(layers), pair.num_heads, pair.head_dim)
    grads = gradient_pass(traced, pair.family, pair.tokenizer, prompts, ids, donor_attn, donor_heads, layers, pair.num_layers,
                          pair.head_dim, LocalBackend())
    np.testing.assert_allclose(grads.log_odds, clean["lo"].numpy(), atol=1e-5)
    for layer in layers:
        patched = _forward(traced, pair.family, pair.tokenizer, prompts, ids, pair.num_layers, [layer], {layer: donor_attn[:, layer]})
        exact = patched["lo"].numpy() - clean["lo"].numpy()
        assert np.abs(grads.layer_delta[:, layer] - exact).max() <= 0.05 * np.abs(exact).max() + 1e-5, (layer, exact, grads.layer_delta[:, layer])
        # One head: only its slice of the o_proj input changes.
        head, dh = 1, pair.head_dim
        one = heads[layer].clone()
        one[:, head * dh : (head + 1) * dh] = donor_heads[:, layer, head]
        patched = _forward(traced, pair.family, pair.tokenizer, prompts, ids, pair.num_layers, [layer], {layer: one}, site="heads")
        exact = patched["lo"].numpy() - clean["lo"].numpy()
        assert np.abs(grads.head_delta[:, layer, head] - exact).max() <= 0.05 * np.abs(exact).max() + 1e-5, (layer, exact)


def test_the_log_odds_are_finite_where_the_probability_rounds_to_one_and_an_estimate_is_a_probability_change():
    logits = torch.tensor([[[0.0, 0.0, 200.0, 0.0]]])
    lo = performed_log_odds(logits, torch.tensor([[2, -1]]))
    assert torch.isfinite(lo).all() and lo.item() == pytest.approx(200 - np.log(3), rel=1e-6)
    both = performed_log_odds(torch.tensor([[[1.0, 2.0, 3.0, 4.0]]]), torch.tensor([[2, 3]]))
    p = torch.tensor([1.0, 2.0, 3.0, 4.0]).softmax(0)[2:].sum()
    assert both.item() == pytest.approx(float(torch.log(p / (1 - p))), rel=1e-6)
    # From P = 0.5 (log-odds 0), a change of log 3 in the log-odds is P = 0.75: a quarter, over a gap of 0.5.
    assert estimated_effect(np.zeros(4), np.full(4, np.log(3.0)), 0.5) == pytest.approx(0.5)
    assert estimated_effect(np.zeros(4), np.ones(4), 0.0) == 0.0
