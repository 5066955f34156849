"""Generation and forward passes with interventions, through nnsight.

Every condition of a batch (no-op, the intervention, each control) is one
invoke of a single batched call, so a batch costs one generation however
many conditions it has. Edits apply at every generation step
(a bounded `tracer.iter` over exactly max_new_tokens steps): with `positions="last"` to the newest token, with
`positions="all"` to every position the step computes.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from routing_suite.families import site_path
from routing_suite.interventions import Condition
from routing_suite.tracing import envoy_at


def _site_tensor(envoy) -> Tensor:
    out = envoy.output
    return out[0] if isinstance(out, tuple) else out


def _apply_edits(nn_model, family: str, condition: Condition) -> None:
    """Inside a trace: change the condition's site at each edited layer, in place."""
    for edit in sorted(condition.edits, key=lambda e: e.layer):
        x = _site_tensor(envoy_at(nn_model, site_path(family, condition.site, edit.layer)))
        if condition.positions == "last":
            x[:, -1] = edit.apply(x[:, -1])
        else:
            x[:] = edit.apply(x)


def until_eos(ids: Tensor, eos_id: int | None) -> Tensor:
    """The tokens before the first <eos> (all of them if there is none)."""
    if eos_id is None:
        return ids
    hits = (ids == eos_id).nonzero()
    return ids[: int(hits[0, 0])] if len(hits) else ids


def encode(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> dict[str, Tensor]:
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def generate_under_conditions(
    nn_model, family: str, tokenizer: PreTrainedTokenizerBase, prompts: list[str], conditions: list[Condition],
    max_new_tokens: int, **trace_kwargs,
) -> dict[str, list[str]]:
    """Greedy completions of `prompts` under each condition (one batched generation)."""
    inputs = encode(tokenizer, prompts)
    width = inputs["input_ids"].shape[1]
    # Completions are cut at their first <eos>. When every row has ended early,
    # the edit loop asks for steps the run never makes; nnsight then warns by
    # design, which says nothing here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was never reached: the loop asked for a step")
        with torch.no_grad(), nn_model.generate(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **trace_kwargs,
        ) as tracer:
            for condition in conditions:
                with tracer.invoke(inputs):
                    if condition.edits and condition.steps == "prompt":
                        _apply_edits(nn_model, family, condition)  # the first occurrence: the prompt's pass
                    elif condition.edits:
                        for _ in tracer.iter[:max_new_tokens]:
                            _apply_edits(nn_model, family, condition)
            with tracer.invoke():  # an empty invoke sees every row
                ids = tracer.result.save()
    texts = [tokenizer.decode(until_eos(row, tokenizer.eos_token_id), skip_special_tokens=True) for row in ids[:, width:]]
    n = len(prompts)
    return {c.name if c.seed is None else f"{c.name}#{c.seed}": texts[i * n : (i + 1) * n] for i, c in enumerate(conditions)}


def first_token_logprobs_under_conditions(
    nn_model, family: str, tokenizer: PreTrainedTokenizerBase, prompts: list[str], conditions: list[Condition], **trace_kwargs
) -> Tensor:
    """(conditions, prompts, vocab) next-token log-probabilities, one batched forward."""
    inputs = encode(tokenizer, prompts)
    with torch.no_grad(), nn_model.trace(**trace_kwargs) as tracer:
        for condition in conditions:
            with tracer.invoke(inputs):
                _apply_edits(nn_model, family, condition)
        with tracer.invoke():  # an empty invoke sees every row
            logits = nn_model.output.logits[:, -1].save()
    return logits.float().log_softmax(-1).view(len(conditions), len(prompts), -1)
