"""Steering the fine-tune along the mean difference, with the strength searched.

alpha x (the fine-tune's mean residual norm at the layer and position) x
unit(difference) is added to the residual stream after `layer`, at every
position, at every generation step, while the fine-tune generates greedily
from the fixed chat prompts. Every strength of the grid (and, as a control, a
random direction at the same strengths) is one condition of a single batched
generation.

Coherence is measured offline: the mean log-perplexity of the completions
under the base model (each completion scored after its prompt, with <eos>
when it ended before `max_new_tokens`). A strength is coherent when that is at
most log(max_ppl_ratio) above the unsteered completions' and the completions'
mean share of distinct tokens is at least min_distinct_ratio x the unsteered
completions' (a repetition loop is cheap under the base: the perplexity alone
passes " I I I I ..."); the chosen alpha is the largest of the grid such that it
and every smaller one are coherent.
Similarity to the fine-tuning data is scored by the configured measure.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import xarray as xr
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from routing_suite.adl.causal import token_loss
from routing_suite.adl.settings import SteerSettings
from routing_suite.adl.similarity import Similarity
from routing_suite.generation import generate_under_conditions
from routing_suite.interventions import Condition, SubspaceEdit
from routing_suite.lora import lora_update, plan_layer_steps
from routing_suite.models import ModelPair, Traced
from routing_suite.store import text

log = logging.getLogger(__name__)


def chat_inputs(tokenizer: PreTrainedTokenizerBase, prompts: list[str], chat_template: bool) -> list[str]:
    """The prompts as the model sees them (through the chat template when asked)."""
    if not chat_template:
        return list(prompts)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


@torch.no_grad()
def completion_log_ppl(
    traced: Traced, tokenizer: PreTrainedTokenizerBase, prompts: list[str], completions: list[str], max_new_tokens: int,
    backend, batch_size: int = 64,
) -> np.ndarray:
    """Mean negative log-likelihood per completion token under `traced` (a trace
    through the backend that sends back one value per row), one value per completion."""
    rows = []
    for prompt, completion in zip(prompts, completions):
        p = tokenizer(prompt)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] if completion.strip() else []
        if len(c) < max_new_tokens and tokenizer.eos_token_id is not None:
            c = [*c, tokenizer.eos_token_id]
        rows.append((p, c))
    nn_model = traced.nn
    steps = plan_layer_steps([], traced.lora, 0 if traced.lora is None else max(traced.lora.deltas) + 1)
    out = np.zeros(len(rows))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id or 0)
        mask = torch.zeros_like(ids)
        scored = torch.zeros(len(chunk), width, dtype=torch.bool)
        for i, (p, c) in enumerate(chunk):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
            scored[i, len(p) : len(p) + len(c)] = True
        with nn_model.trace({"input_ids": ids, "attention_mask": mask}, **backend.trace_kwargs(nn_model)):
            for _, _, delta in steps:
                lora_update(nn_model, delta)
            nll = token_loss(nn_model.output.logits, ids, scored).save()
        backend.record(nn_model, nll)
        out[start : start + len(chunk)] = nll.numpy()
    return out


def distinct_share(tokenizer: PreTrainedTokenizerBase, completions: list[str]) -> np.ndarray:
    """Per completion, distinct token ids / token ids (1 for an empty completion: nothing repeats)."""
    out = np.ones(len(completions))
    for i, t in enumerate(completions):
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if ids:
            out[i] = len(set(ids)) / len(ids)
    return out


def _conditions(direction: Tensor, layer: int, norm: float, alphas: list[float], random: Tensor | None) -> list[Condition]:
    conditions = []
    for a in alphas:
        if a == 0:
            conditions.append(Condition("unsteered", "baseline"))
            continue
        edit = SubspaceEdit(layer, direction[None], "steer", alpha=a * norm)
        conditions.append(Condition(f"difference@{a:g}", "intervention", "resid", "all", [edit], steps="all"))
        if random is not None:
            edit = SubspaceEdit(layer, random[None], "steer", alpha=a * norm)
            conditions.append(Condition(f"random@{a:g}", "control", "resid", "all", [edit], steps="all"))
    return conditions


def best_alpha(alphas: list[float], coherent: np.ndarray) -> float:
    """The largest alpha such that it and every smaller one are coherent (alphas ascending, alphas[0] = 0)."""
    best = alphas[0]
    for a, ok in zip(alphas, coherent):
        if not ok:
            break
        best = a
    return best


def steer(
    pair: ModelPair, direction: Tensor, layer: int, norm: float, settings: SteerSettings, prompts: list[str], reference: list[str],
    similarity: Similarity, chat_template: bool, seed: int, backend,
) -> xr.Dataset:
    """Completions, base-model log-perplexity and similarity per strength; the chosen alpha in attrs."""
    unit = (direction / direction.norm().clamp(min=1e-12)).float()
    random = None
    if settings.random_control:
        generator = torch.Generator().manual_seed(seed)
        random = torch.randn(unit.shape, generator=generator)
        random = random / random.norm()
    alphas = [float(a) for a in settings.alphas]
    conditions = _conditions(unit, layer, norm, alphas, random)
    inputs = chat_inputs(pair.tokenizer, prompts, chat_template)
    texts = generate_under_conditions(
        pair.traced("finetuned"), pair.family, pair.tokenizer, inputs, conditions, settings.max_new_tokens, pair.num_layers, backend
    )
    kinds = ["difference", "random"] if random is not None else ["difference"]

    def completions(kind: str, a: float) -> list[str]:
        return texts["unsteered"] if a == 0 else texts[f"{kind}@{a:g}"]

    grid = {kind: [completions(kind, a) for a in alphas] for kind in kinds}
    flat = [t for kind in kinds for rows in grid[kind] for t in rows]
    log_ppl = completion_log_ppl(
        pair.traced("base"), pair.tokenizer, inputs * (len(flat) // len(inputs)), flat, settings.max_new_tokens, backend
    )
    sim = similarity.score(flat, reference)
    shape = (len(kinds), len(alphas), len(prompts))
    distinct = distinct_share(pair.tokenizer, flat).reshape(shape)
    log_ppl, sim = log_ppl.reshape(shape), sim.reshape(shape)
    bound = log_ppl[0, 0].mean() + math.log(settings.max_ppl_ratio)
    distinct_bound = settings.min_distinct_ratio * distinct[0, 0].mean()
    coherent = (log_ppl.mean(-1) <= bound) & (distinct.mean(-1) >= distinct_bound)
    chosen = best_alpha(alphas, coherent[0])
    i = alphas.index(chosen)
    gain = float(sim[0, i].mean() - sim[0, 0].mean())
    log.info("steer: alpha %g (of %s) keeps the base log-ppl within %.3f and the distinct-token share above %.3f; "
             "similarity %.3f -> %.3f", chosen, alphas, bound, distinct_bound, sim[0, 0].mean(), sim[0, i].mean())
    return xr.Dataset(
        {
            "completion": (("direction", "alpha", "prompt"), text(flat).reshape(shape)),
            "log_ppl": (("direction", "alpha", "prompt"), log_ppl.astype(np.float32)),
            "similarity": (("direction", "alpha", "prompt"), sim.astype(np.float32)),
            "distinct": (("direction", "alpha", "prompt"), distinct.astype(np.float32)),
            "coherent": (("direction", "alpha"), coherent),
        },
        coords={"direction": text(kinds), "alpha": alphas, "prompt": list(range(len(prompts))), "prompt_text": ("prompt", text(prompts))},
        attrs={
            "best_alpha": chosen,
            "similarity_unsteered": float(sim[0, 0].mean()),
            "similarity_steered": float(sim[0, i].mean()),
            "similarity_gain": gain,
            "similarity_random": float(sim[1, i].mean()) if random is not None else None,
            "log_ppl_bound": float(bound),
            "distinct_bound": float(distinct_bound),
            "layer": int(layer),
            "norm": float(norm),
            "similarity_measure": similarity.name,
        },
    )
