"""Reading a vector in the residual stream out as tokens: logit lens and patchscope.

- logit lens: the fine-tune's final norm and unembedding applied to the vector;
- patchscope: the vector, scaled to `scale` x the fine-tune's mean residual
  norm at its layer and position, replaces the residual stream at the last
  token of an identity-style prompt (e.g. "cat cat . red red . ?") at its
  layer; the fine-tune's next-token distribution is averaged over every
  scale and prompt.

Both give (vector, vocab) probabilities; `top_tokens` keeps the top k. Both
run as traces through the backend (locally, or on a server), on the fine-tune
as the pair holds it: merged, or the base plus its adapter's updates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from routing_suite.families import family_paths, site_path
from routing_suite.generation import encode
from routing_suite.lora import lora_update, plan_layer_steps
from routing_suite.models import ModelPair
from routing_suite.tracing import envoy_at, site_value


@torch.no_grad()
def logit_lens(pair: ModelPair, vectors: Tensor, backend, batch_size: int = 256) -> Tensor:
    """(n, hidden) -> (n, vocab) next-token probabilities through the fine-tune's final norm and unembedding.

    The two modules are called inside a trace of the fine-tune (on a one-token
    input whose own output is not read), so they run where the model runs. An
    adapter only changes decoder-layer projections (`LoraAdapter.load` refuses
    anything else), so base-plus-adapter has the fine-tune's norm and unembedding."""
    paths = family_paths(pair.family)
    nn_model = pair.traced("finetuned").nn
    inputs = encode(pair.tokenizer, ["."])
    out = []
    for start in range(0, len(vectors), batch_size):
        chunk = vectors[start : start + batch_size].float()[:, None, :]
        # Inside the trace the first layer's output says where the model runs and in which dtype.
        with nn_model.trace(inputs, **backend.trace_kwargs(nn_model)):
            like = site_value(envoy_at(nn_model, site_path(pair.family, "resid", 0)), "resid")
            hidden = envoy_at(nn_model, paths.final_norm)(chunk.to(device=like.device, dtype=like.dtype))
            probs = envoy_at(nn_model, paths.unembed)(hidden)[:, 0].float().softmax(-1).cpu().save()
        backend.record(nn_model, probs)
        out.append(probs)
    return torch.cat(out)


@torch.no_grad()
def patchscope(
    pair: ModelPair, vectors: Tensor, layers: list[int], norms: Tensor, prompts: list[str], scales: list[float],
    batch_size: int, backend,
) -> Tensor:
    """(n, hidden) vectors, each injected at its own layer -> (n, vocab) mean probabilities.

    Every (vector, scale, prompt) is one row; a batch of rows is one forward
    (one request), and at each layer only the rows of that layer are written.
    A fine-tune run as the base plus its adapter gets the adapter's updates in
    execution order with the injections.
    """
    unit = vectors.float() / vectors.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    rows = [(i, s, p) for i in range(len(vectors)) for s in scales for p in range(len(prompts))]
    traced = pair.traced("finetuned")
    nn_model = traced.nn
    out = torch.zeros(len(vectors), pair.base.config.vocab_size, dtype=torch.float64)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        inputs = encode(pair.tokenizer, [prompts[p] for _, _, p in chunk])
        injected = torch.stack([s * float(norms[i]) * unit[i] for i, s, _ in chunk])
        row_layer = torch.tensor([layers[i] for i, _, _ in chunk])
        steps = plan_layer_steps([(layer, "resid") for layer in set(row_layer.tolist())], traced.lora, pair.num_layers)
        with nn_model.trace(inputs, **backend.trace_kwargs(nn_model)):
            for kind, layer, item in steps:
                if kind == "lora":
                    lora_update(nn_model, item)
                    continue
                which = (row_layer == layer).nonzero()[:, 0]
                x = site_value(envoy_at(nn_model, site_path(pair.family, "resid", layer)), "resid")
                x[which, -1] = injected[which].to(device=x.device, dtype=x.dtype)
            logits = nn_model.output.logits[:, -1].float().cpu().save()
        backend.record(nn_model, logits)
        probs = logits.softmax(-1).double()
        out.index_add_(0, torch.tensor([i for i, _, _ in chunk]), probs[:, : out.shape[1]])
    return (out / (len(scales) * len(prompts))).float()


def top_tokens(probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(n, vocab) -> ids and probabilities of the k most likely tokens, (n, k) each."""
    values, ids = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return ids, values
