"""Reading a vector in the residual stream out as tokens: logit lens and patchscope.

- logit lens: the fine-tune's final norm and unembedding applied to the vector;
- patchscope: the vector, scaled to `scale` x the fine-tune's mean residual
  norm at its layer and position, replaces the residual stream at the last
  token of an identity-style prompt (e.g. "cat cat . red red . ?") at its
  layer; the fine-tune's next-token distribution is averaged over every
  scale and prompt.

Both give (vector, vocab) probabilities; `top_tokens` keeps the top k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from routing_suite.families import family_paths, site_path
from routing_suite.models import ModelPair
from routing_suite.steering import encode
from routing_suite.tracing import envoy_at


@torch.no_grad()
def logit_lens(pair: ModelPair, vectors: Tensor) -> Tensor:
    """(n, hidden) -> (n, vocab) next-token probabilities through the fine-tune's final norm and unembedding."""
    paths = family_paths(pair.family)
    norm = envoy_at(pair.finetuned, paths.final_norm)
    unembed = envoy_at(pair.finetuned, paths.unembed)
    return unembed(norm(vectors.float()[:, None, :]))[:, 0].float().softmax(-1)


@torch.no_grad()
def patchscope(
    pair: ModelPair, vectors: Tensor, layers: list[int], norms: Tensor, prompts: list[str], scales: list[float],
    batch_size: int, **trace_kwargs,
) -> Tensor:
    """(n, hidden) vectors, each injected at its own layer -> (n, vocab) mean probabilities.

    Every (vector, scale, prompt) is one row; a batch of rows is one forward,
    and at each layer only the rows of that layer are written.
    """
    unit = vectors.float() / vectors.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    rows = [(i, s, p) for i in range(len(vectors)) for s in scales for p in range(len(prompts))]
    nn_model = pair.traced("finetuned").nn
    out = torch.zeros(len(vectors), pair.finetuned.config.vocab_size, dtype=torch.float64)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        inputs = encode(pair.tokenizer, [prompts[p] for _, _, p in chunk])
        injected = torch.stack([s * float(norms[i]) * unit[i] for i, s, _ in chunk])
        row_layer = torch.tensor([layers[i] for i, _, _ in chunk])
        with nn_model.trace(inputs, **trace_kwargs):
            for layer in sorted(set(row_layer.tolist())):
                which = (row_layer == layer).nonzero()[:, 0]
                output = envoy_at(nn_model, site_path(pair.family, "resid", layer)).output
                x = output[0] if isinstance(output, tuple) else output
                x[which, -1] = injected[which].to(x.dtype)
            logits = nn_model.output.logits[:, -1].save()
        probs = logits.float().softmax(-1).double()
        out.index_add_(0, torch.tensor([i for i, _, _ in chunk]), probs[:, : out.shape[1]])
    return (out / (len(scales) * len(prompts))).float()


def top_tokens(probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(n, vocab) -> ids and probabilities of the k most likely tokens, (n, k) each."""
    values, ids = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return ids, values
