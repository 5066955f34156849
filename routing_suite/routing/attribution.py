"""Attribution patching: every layer's and head's patch effect estimated from one
forward and one backward per batch, instead of one forward per patch.

For a run of prompts through one model (the clean run) and the donor values
of its attention outputs at the last token (the run the patch would copy in,
already in the store), the effect of patching a set S of sites on a prompt is
estimated to first order in the log-odds of the behaviour,

    lo = log P(performed) - log(1 - P(performed)),
    delta_lo(S) = sum over s in S of (donor_s - clean_s) . d lo / d clean_s,

and turned back into a probability, sigmoid(lo + delta_lo(S)) - sigmoid(lo):
the same units as exact patching (the change in P(performed), as a fraction
of the gap). Why the log-odds: P itself saturates (near 0 under the framing
a patch repairs), and a first-order estimate in P was 50-500x too small on
the organisms; the log-odds is near linear in the residual stream and the
sigmoid puts the saturation back. The estimates rank the sites; the window
is then confirmed by exact patching of the few best candidates
(`localize.confirm`), so the choice rests on exact effects.

The organisms' weights carry no gradient (`ModelPair` freezes them): the
first site value read gets `requires_grad_`, which makes every later value
part of the graph. Sites are read in execution order (nnsight's rule), and
their gradients in reverse order inside the backward context.
"""

from __future__ import annotations

from dataclasses import dataclass

import nnsight
import numpy as np
import torch

from routing_suite.families import site_path
from routing_suite.generation import encode
from routing_suite.lora import lora_update, plan_layer_steps
from routing_suite.models import Traced
from routing_suite.tracing import envoy_at, site_value


@dataclass
class Gradients:
    """One run's first-order terms, per prompt: the clean log-odds and, per site,
    the estimated change in log-odds a patch of it makes."""

    log_odds: np.ndarray  # (prompt,)
    layer_delta: np.ndarray  # (prompt, layer): attention output at the last token
    head_delta: np.ndarray | None  # (prompt, layer, head): one head's slice of the o_proj input


def performed_log_odds(logits: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Per row, the log-odds of the performed set (`wanted`'s token ids; padding -1
    is no token): logsumexp of the performed logits minus logsumexp of the others,
    which stays finite and differentiable where P is within rounding of 0 or 1."""
    last = logits[:, -1].float()
    performed = torch.zeros_like(last, dtype=torch.bool)
    wanted = wanted.to(last.device)
    performed.scatter_(1, wanted.clamp(min=0), wanted >= 0)
    inside = last.masked_fill(~performed, float("-inf")).logsumexp(1)
    outside = last.masked_fill(performed, float("-inf")).logsumexp(1)
    return inside - outside


def gradient_pass(
    traced: Traced, family: str, tokenizer, prompts: list[str], token_ids: torch.Tensor, donor_attn: torch.Tensor,
    donor_heads: torch.Tensor | None, layers: list[int], num_layers: int, head_dim: int, backend,
) -> Gradients:
    """One forward and one backward of `prompts` through `traced`: the clean log-odds
    and the first-order effect of patching each layer's (and head's) donor value in.

    `donor_attn` is (prompt, layer, hidden) and `donor_heads` (prompt, layer, head,
    head_dim) or None; `layers` are the layers they hold, in order."""
    nn_model = traced.nn
    sites = [(layer, "attn") for layer in layers] + ([(layer, "heads") for layer in layers] if donor_heads is not None else [])
    plan = plan_layer_steps(sites, traced.lora, num_layers)
    with torch.enable_grad(), nn_model.trace(encode(tokenizer, prompts), **backend.trace_kwargs(nn_model)):
        # One dict saved whole: what comes back from a server (as in tracing.trace_sites).
        saved = nnsight.save({})
        values: list[tuple[int, str, object]] = []
        for kind, layer, item in plan:
            if kind == "lora":
                lora_update(nn_model, item)
                continue
            x = site_value(envoy_at(nn_model, site_path(family, item, layer)), item)
            if not values:
                x.requires_grad_(True)
            values.append((layer, item, x))
        log_odds = performed_log_odds(nn_model.output.logits, token_ids)
        saved["log_odds"] = log_odds.detach().clone()
        for layer, item, x in values:
            saved[("value", layer, item)] = x[:, -1].detach().clone()
        with log_odds.sum().backward():
            for layer, item, x in reversed(values):
                saved[("grad", layer, item)] = x.grad[:, -1].clone()
    backend.record(nn_model, saved)
    return _deltas(saved, donor_attn, donor_heads, layers, head_dim)


def _deltas(saved: dict, donor_attn: torch.Tensor, donor_heads: torch.Tensor | None, layers: list[int], head_dim: int) -> Gradients:
    def term(donor: torch.Tensor, layer: int, site: str) -> torch.Tensor:
        clean, grad = (saved[(k, layer, site)].float().cpu() for k in ("value", "grad"))
        return (donor.float() - clean) * grad

    layer_delta = torch.stack([term(donor_attn[:, li], layer, "attn").sum(-1) for li, layer in enumerate(layers)], 1)
    head_delta = None
    if donor_heads is not None:
        n_heads = donor_heads.shape[2]
        head_delta = torch.stack([
            term(donor_heads[:, li].reshape(len(donor_heads), -1), layer, "heads").reshape(-1, n_heads, head_dim).sum(-1)
            for li, layer in enumerate(layers)
        ], 1)
    return Gradients(
        log_odds=saved["log_odds"].float().cpu().numpy(),
        layer_delta=layer_delta.numpy(),
        head_delta=None if head_delta is None else head_delta.numpy(),
    )


def concatenate(parts: list[Gradients]) -> Gradients:
    """The batches' terms as one run's."""
    heads = [p.head_delta for p in parts]
    return Gradients(
        log_odds=np.concatenate([p.log_odds for p in parts]),
        layer_delta=np.concatenate([p.layer_delta for p in parts]),
        head_delta=None if heads[0] is None else np.concatenate(heads),
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def estimated_effect(log_odds: np.ndarray, delta: np.ndarray, gap: float) -> float:
    """The estimated fraction of the gap a patch with log-odds change `delta` (per
    prompt) restores: the mean change in P, over the gap in P."""
    if abs(gap) <= 1e-6:
        return 0.0
    return float((_sigmoid(log_odds + delta) - _sigmoid(log_odds)).mean() / gap)


def estimated_effects(grads: Gradients, gap: float, windows: list[tuple[int, int]], layers: list[int]) -> dict:
    """Per layer, per head and per window (every layer of it patched at once): the
    estimated fraction of the gap restored."""
    index = {layer: i for i, layer in enumerate(layers)}
    per_layer = np.array([estimated_effect(grads.log_odds, grads.layer_delta[:, i], gap) for i in range(len(layers))], np.float32)
    per_window = {
        (a, b): estimated_effect(grads.log_odds, grads.layer_delta[:, index[a] : index[b] + 1].sum(1), gap) for a, b in windows
    }
    per_head = None
    if grads.head_delta is not None:
        per_head = np.array(
            [[estimated_effect(grads.log_odds, grads.head_delta[:, li, h], gap) for h in range(grads.head_delta.shape[2])]
             for li in range(len(layers))],
            np.float32,
        )
    return {"layer": per_layer, "window": per_window, "head": per_head}


def candidates(estimates: dict[tuple[int, int], float], length: int, confirm: int) -> list[tuple[int, int]]:
    """The `confirm` windows of `length` layers with the largest estimated effect."""
    same = [w for w in estimates if w[1] - w[0] + 1 == length]
    return sorted(same, key=lambda w: (-estimates[w], w[0]))[:confirm]
