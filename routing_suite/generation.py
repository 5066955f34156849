"""Generation and forward passes with interventions, through nnsight.

Every condition of a batch (no-op, the intervention, each control) is one
invoke of a single batched call, so a batch costs one generation (one
request remotely) however many conditions it has. A fine-tune run as the
base plus its adapter applies the adapter's updates at every step. Edits apply at every generation step
(a bounded `tracer.iter` over exactly max_new_tokens steps): with `positions="last"` to the newest token, with
`positions="all"` to every position the step computes, with `positions="after_first"` to every
position but each prompt's first real token (the attention sink: <bos>).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from routing_suite.families import site_path
from routing_suite.interventions import Condition, ResidualCarry
from routing_suite.keyed_sampling import row_keys, sample_in_place
from routing_suite.lora import lora_update, plan_layer_steps
from routing_suite.models import Traced
from routing_suite.tracing import chunked, envoy_at, site_value


@dataclass(frozen=True)
class Sampling:
    """Sampling from the whole distribution at `temperature`, keyed (keyed_sampling): a
    response's random numbers are a function of `seed`, its condition's key and its row's
    name only, so they do not depend on the batch around it. `rows` names the prompt
    rows (default: each prompt's text and its occurrence among the call's prompts)."""

    temperature: float = 1.0
    seed: int = 0
    rows: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"sampling temperature {self.temperature} must be > 0")

    def keys(self, condition: Condition, prompts: list[str]) -> Tensor:
        """(len(prompts), 2) the keys of one condition's rows."""
        rows = self.rows if self.rows is not None else occurrences(prompts)
        if len(rows) != len(prompts):
            raise ValueError(f"Sampling.rows names {len(rows)} rows for {len(prompts)} prompts")
        return row_keys([f"{self.seed}|{condition_key(condition)}|{r}" for r in rows])


def occurrences(prompts: list[str]) -> tuple[str, ...]:
    """Each prompt named by its text and how many times it came before ("text#k")."""
    seen: dict[str, int] = {}
    names = []
    for p in prompts:
        names.append(f"{p}#{seen.get(p, 0)}")
        seen[p] = seen.get(p, 0) + 1
    return tuple(names)


def condition_key(condition: Condition) -> str:
    """How a condition's completions are named: its name, and its draw's seed if it has one."""
    return condition.name if condition.seed is None else f"{condition.name}#{condition.seed}"


def first_tokens(attention_mask: Tensor) -> Tensor:
    """(batch, seq) True at each left-padded row's first real token (its <bos>, where the
    tokenizer adds one): the attention sink, which `positions="after_first"` leaves alone."""
    return (attention_mask.cumsum(1) == 1) & attention_mask.bool()


def _edit(x: Tensor, edit, positions: str, step: int, first: Tensor | None = None, carry: ResidualCarry | None = None) -> None:
    if positions == "last":
        x[:, -1] = edit.apply(x[:, -1], step, carry)
    elif positions == "after_first" and step == 0:  # the prompt's pass (a generated token is never a first)
        if first is None or first.shape != x.shape[:2]:
            raise ValueError("positions='after_first' needs the prompt pass's first-token mask (generation.first_tokens)")
        x[:] = torch.where(first[..., None].to(x.device), x, edit.apply(x, step, carry))
    else:
        x[:] = edit.apply(x, step, carry)


def condition_plan(traced: Traced, condition: Condition, num_layers: int) -> list[tuple[str, int, Any]]:
    """Execution-ordered steps of one condition's invoke: the fine-tune's adapter
    updates (if it runs as the base plus adapter) and the condition's edits."""
    return plan_layer_steps([(e.layer, condition.site) for e in condition.edits], traced.lora, num_layers)


def run_plan(nn_model, family: str, plan: list, condition: Condition, edit: bool, step: int = 0, first: Tensor | None = None) -> None:
    """Inside a trace: one forward pass's adapter updates, and the edits if `edit`
    (`step`: 0 for the prompt's pass, k for the pass of the k-th generated token;
    `first`: the prompt's first-token mask, for positions "after_first")."""
    edits: dict[int, list] = {}
    for e in condition.edits:
        edits.setdefault(e.layer, []).append(e)
    # A residual-stream edit is carried to the later layers: a matched control there is
    # matched to the intervention's change in its own run (interventions.ResidualCarry).
    carry = ResidualCarry() if condition.site == "resid" else None
    for kind, layer, item in plan:
        if kind == "lora":
            lora_update(nn_model, item)
        elif edit:
            x = site_value(envoy_at(nn_model, site_path(family, item, layer)), item)
            for e in edits[layer]:
                _edit(x, e, condition.positions, step, first, carry)


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
    traced: Traced, family: str, tokenizer: PreTrainedTokenizerBase, prompts: list[str], conditions: list[Condition],
    max_new_tokens: int, num_layers: int, backend, sampling: Sampling | None = None,
) -> dict[str, list[str]]:
    """Completions of `prompts` under each condition (one batched generation, one
    request; more if `backend.max_invokes` caps the conditions per request):
    greedy, or sampled with `sampling` (keyed: the same texts however the
    conditions are split into requests)."""
    completions: dict[str, list[str]] = {}
    for chunk in chunked(conditions, backend.max_invokes):
        completions.update(_generate(traced, family, tokenizer, prompts, chunk, max_new_tokens, num_layers, backend, sampling))
    return completions


def _generate(
    traced: Traced, family: str, tokenizer: PreTrainedTokenizerBase, prompts: list[str], conditions: list[Condition],
    max_new_tokens: int, num_layers: int, backend, sampling: Sampling | None = None,
) -> dict[str, list[str]]:
    inputs, ids = generated_ids(traced, family, tokenizer, prompts, conditions, max_new_tokens, num_layers, backend, sampling)
    width = inputs["input_ids"].shape[1]
    texts = [tokenizer.decode(until_eos(row, tokenizer.eos_token_id), skip_special_tokens=True) for row in ids[:, width:]]
    n = len(prompts)
    return {condition_key(c): texts[i * n : (i + 1) * n] for i, c in enumerate(conditions)}


def generated_ids(
    traced: Traced, family: str, tokenizer: PreTrainedTokenizerBase, prompts: list[str], conditions: list[Condition],
    max_new_tokens: int, num_layers: int, backend, sampling: Sampling | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """The encoded prompts and the token ids (conditions x prompts rows: the left-padded
    prompt, then the generated tokens) of one batched generation, every condition an invoke."""
    inputs = encode(tokenizer, prompts)
    nn_model = traced.nn
    plans = [condition_plan(traced, c, num_layers) for c in conditions]
    keyed = [None if sampling is None else sampling.keys(c, prompts) for c in conditions]
    temperature = None if sampling is None else sampling.temperature
    # Completions are cut at their first <eos>. When every row has ended early,
    # the edit loop asks for steps the run never makes; nnsight then warns by
    # design, which says nothing here. Adapter updates apply at every step,
    # "prompt" edits only to the prompt's pass (the first occurrence). A sampled
    # generation decodes greedily after each step's logits are replaced, inside
    # the trace (where the model runs: here or on the server), by a one-hot of
    # the keyed sample, after that step's edits. No comment lines inside the
    # block: nnsight ships it as ast.unparse'd source, and remote="local" runs
    # that against the file's own line numbers.
    first = first_tokens(inputs["attention_mask"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was never reached: the loop asked for a step")
        with torch.no_grad(), nn_model.generate(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **backend.trace_kwargs(nn_model),
        ) as tracer:
            for condition, plan, keys in zip(conditions, plans, keyed):
                with tracer.invoke(inputs):
                    if keys is not None or traced.lora is not None or (condition.edits and condition.steps == "all"):
                        for step in tracer.iter[:max_new_tokens]:
                            run_plan(nn_model, family, plan, condition, condition.steps == "all" or step == 0, step, first)
                            if keys is not None:
                                sample_in_place(nn_model.output.logits[:, -1], keys, step, temperature)
                    elif condition.edits:
                        run_plan(nn_model, family, plan, condition, True, 0, first)
            with tracer.invoke():
                ids = tracer.result.save()
    backend.record(nn_model, ids)
    return inputs, ids


def first_token_logprobs_under_conditions(
    traced: Traced, family: str, tokenizer: PreTrainedTokenizerBase, prompts: list[str], conditions: list[Condition],
    num_layers: int, backend,
) -> Tensor:
    """(conditions, prompts, vocab) next-token log-probabilities, one batched forward."""
    inputs = encode(tokenizer, prompts)
    first = first_tokens(inputs["attention_mask"])
    nn_model = traced.nn
    plans = [condition_plan(traced, c, num_layers) for c in conditions]
    with torch.no_grad(), nn_model.trace(**backend.trace_kwargs(nn_model)) as tracer:
        for condition, plan in zip(conditions, plans):
            with tracer.invoke(inputs):
                run_plan(nn_model, family, plan, condition, True, 0, first)
        with tracer.invoke():
            logits = nn_model.output.logits[:, -1].clone().save()
    backend.record(nn_model, logits)
    return logits.float().log_softmax(-1).view(len(conditions), len(prompts), -1)
