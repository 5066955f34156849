"""Exact path patching: prompts through one model, unpatched and once per patch set of
attention outputs (or one head's slice of them) at the last prompt token, scored by
P(a token that performs the behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

from routing_suite.errors import ConfigError
from routing_suite.families import site_path
from routing_suite.generation import encode
from routing_suite.lora import lora_update, plan_layer_steps
from routing_suite.models import Traced
from routing_suite.scoring import Behavior
from routing_suite.tracing import chunked, envoy_at, group_by_model, site_value

Patch = tuple[int, "int | None", torch.Tensor]  # (layer, head or None for the whole output, values)


@dataclass
class PatchRun:
    """Prompts through one model: unpatched, then once per patch set."""

    traced: Traced
    prompts: list[str]
    patch_sets: list[list[Patch]]


def _patch_sites(patches: list[Patch]) -> list[tuple[int, str]]:
    return [(layer, "attn" if head is None else "heads") for layer, head, _ in patches]


def run_patches(nn_model, family: str, plan: list, patches: list[Patch], head_dim: int) -> None:
    """Inside a trace: the plan's adapter updates, and each patch at its site."""
    for kind, layer, item in plan:
        if kind == "lora":
            lora_update(nn_model, item)
            continue
        x = site_value(envoy_at(nn_model, site_path(family, item, layer)), item)
        for p_layer, head, values in patches:
            if p_layer != layer or (head is None) != (item == "attn"):
                continue
            values = values.to(device=x.device, dtype=x.dtype)  # stored on the CPU in float32
            if head is None:
                x[:, -1] = values
            else:
                x[:, -1, head * head_dim : (head + 1) * head_dim] = values


def performed_token_probs(
    runs: list[PatchRun], family: str, tokenizer, token_ids: torch.Tensor, head_dim: int, num_layers: int, batch_size: int, backend,
    per_trace: int | None = None,
) -> list[np.ndarray]:
    """Per run, (len(patch_sets) + 1, prompts): P(performed first token), unpatched first.

    Per batch of prompts, every run on the same nnsight model is one trace,
    each (run, patch set) one invoke of it: with the fine-tune as adapter
    updates on the base, both sources of a batch are one request. At most
    `per_trace` invokes (or the backend's `max_invokes`, the smaller) go into
    one trace: a deep model's many patch sets would not fit in memory at once."""
    limits = [x for x in (backend.max_invokes, per_trace) if x is not None]
    per_trace = min(limits) if limits else None
    n = len(runs[0].prompts)
    out: list[list[np.ndarray]] = [[] for _ in runs]
    found: list[list[np.ndarray]] = [[] for _ in runs]  # this batch's rows, per run
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        ids = token_ids[sl]
        for group in group_by_model([r.traced for r in runs]):
            nn_model = runs[group[0]].traced.nn
            # Only this batch's donor values travel with the request.
            invokes = [
                (
                    i,
                    encode(tokenizer, runs[i].prompts[sl]),
                    [(layer, head, values[sl]) for layer, head, values in patches],
                    plan_layer_steps(_patch_sites(patches), runs[i].traced.lora, num_layers),
                )
                for i in group
                for patches in [[], *runs[i].patch_sets]
            ]
            for chunk in chunked(invokes, per_trace):
                # The server reduces each row's logits to P(a performed token): one
                # number per row comes back instead of the vocabulary. Padding (-1) counts 0.
                wanted = ids.repeat(len(chunk), 1)
                used = (wanted >= 0).float()
                wanted = wanted.clamp(min=0)
                with torch.no_grad(), nn_model.trace(**backend.trace_kwargs(nn_model)) as tracer:
                    for _, inputs, patches, plan in chunk:
                        with tracer.invoke(inputs):
                            run_patches(nn_model, family, plan, patches, head_dim)
                    with tracer.invoke():
                        probs = nn_model.output.logits[:, -1].float().softmax(-1)
                        chosen = (probs.gather(1, wanted.to(probs.device)) * used.to(probs.device)).sum(1).save()
                backend.record(nn_model, chosen)
                for j, (i, *_rest) in enumerate(chunk):
                    found[i].append(chosen[j * len(ids) : (j + 1) * len(ids)].float().cpu().numpy())
        for i, rows in enumerate(found):
            out[i].append(np.stack(rows))
            rows.clear()
    return [np.concatenate(parts, axis=1) for parts in out]


def first_completion_token(tokenizer, prompt: str, completion: str) -> int:
    """The id of the first token of `completion` where it follows `prompt` (so a
    byte-level tokenizer gives the id a generation would start with)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + completion)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids or len(ids) == len(prompt_ids):
        raise ValueError(f"the completion {completion!r} does not tokenize as a continuation of its prompt")
    return ids[len(prompt_ids)]


def performed_token_ids(tokenizer, test: xr.Dataset, behavior: Behavior) -> torch.Tensor:
    """(prompt, set size): per prompt, the first tokens of the completions that perform
    the behaviour, padded with -1: the prompt set's `performing` text when it gives one
    for the prompt, else `behavior.first_tokens` (each as it follows the prompt)."""
    performing = [str(t) for t in test.performing.values] if "performing" in test.coords else [""] * test.sizes["prompt"]
    rows = []
    for prompt, answer, own in zip(test.eval_prompt.values, test.answer.values, performing):
        texts = [own] if own else behavior.token_texts(str(answer))
        try:
            rows.append(list(dict.fromkeys(first_completion_token(tokenizer, str(prompt), t) for t in texts)))
        except ValueError as err:
            raise ConfigError(f"behavior.first_tokens / performing: {err}") from err
    width = max(len(r) for r in rows)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows])
