"""The causal check: projection replacement along the difference, and the change in loss.

At one layer at a time, the fine-tune's residual stream (every position) has
its component along u = unit(difference at that layer) replaced by the base
model's component on the same input:

    h_ft <- h_ft + ((h_base . u) - (h_ft . u)) u

and the cross-entropy of the fine-tune is measured on fine-tuning data (loss
on the completion and <eos>, as the fine-tune was trained) and on unrelated
text (loss on every token). delta_ce = CE(replaced) - CE(fine-tune). If the
difference carries what fine-tuning installed, removing it raises the loss on
the fine-tuning data (delta > 0) and lowers it on unrelated text (delta < 0).
A random direction replaced the same way is the control.
"""

from __future__ import annotations

import logging

import nnsight
import numpy as np
import torch
import xarray as xr
from torch import Tensor

from routing_suite.errors import ConfigError
from routing_suite.families import site_path
from routing_suite.lora import lora_update, plan_layer_steps
from routing_suite.models import ModelPair
from routing_suite.organisms.training import Example
from routing_suite.store import text
from routing_suite.tracing import envoy_at, site_value

log = logging.getLogger(__name__)

DATA = ("finetune", "unrelated")
CONDITIONS = ("difference", "random")


def encode_scored(tokenizer, examples: list[Example], max_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ids, attention mask and the mask of scored target tokens.

    An example with a completion is scored on the completion and <eos>; one
    with an empty prompt (plain text) on every token after the first.
    """
    rows = []
    for prompt, completion in examples:
        p = tokenizer(prompt)["input_ids"] if prompt else []
        c = tokenizer(completion, add_special_tokens=not prompt)["input_ids"]
        if prompt and tokenizer.eos_token_id is not None:
            c = [*c, tokenizer.eos_token_id]
        ids = (p + c)[:max_tokens]
        first_scored = max(len(p), 1)
        if len(ids) <= first_scored:
            # Scoring nothing would report a loss of 0 for this text, silently.
            raise ConfigError(
                f"adl.causal.max_tokens={max_tokens} leaves no token to score in a text whose prompt has {len(p)} tokens "
                f"({(prompt or completion)[:40]!r}...): raise adl.causal.max_tokens"
            )
        rows.append((ids, first_scored))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0)
    attention = torch.zeros_like(input_ids)
    scored = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (ids, first) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        scored[i, first : len(ids)] = True
    return input_ids, attention, scored


def token_loss(logits: Tensor, ids: Tensor, scored: Tensor) -> Tensor:
    """(batch,) mean cross-entropy over the scored tokens of each row."""
    logp = logits.float().log_softmax(-1)[:, :-1]
    ids, scored = ids.to(logp.device), scored.to(logp.device)
    nll = -logp.gather(2, ids[:, 1:, None])[..., 0]
    target = scored[:, 1:].float()
    return ((nll * target).sum(1) / target.sum(1).clamp(min=1)).cpu()


@torch.no_grad()
def _batch_deltas(pair: ModelPair, ids: Tensor, mask: Tensor, scored: Tensor, units: dict[str, Tensor], backend) -> dict:
    """CE of the fine-tune and of the base, and CE after replacement per (condition, layer).

    Every pass is a trace through the backend that sends back per-row losses
    (and, from the base, its (batch, seq) projections on each condition's
    (layer, hidden) units), never logits. No comments inside the trace blocks:
    nnsight ships them as unparsed source (see routing_suite.generation)."""
    family, layers = pair.family, list(range(pair.num_layers))
    inputs = {"input_ids": ids, "attention_mask": mask}
    base, ft = pair.traced("base"), pair.traced("finetuned")
    nn_base = base.nn
    with nn_base.trace(inputs, **backend.trace_kwargs(nn_base)):
        projections = nnsight.save({})
        for layer in layers:
            x = site_value(envoy_at(nn_base, site_path(family, "resid", layer)), "resid").float()
            for name, unit in units.items():
                projections[name, layer] = (x @ unit[layer].to(x.device)).cpu()
        base_ce = token_loss(nn_base.output.logits, ids, scored).save()
    backend.record(nn_base, projections)
    out = {"base": base_ce, "finetuned": _finetune_loss(pair, ft, inputs, ids, scored, None, None, backend)}
    for name, unit in units.items():
        for layer in layers:
            edit = (unit[layer], projections[name, layer])
            out[name, layer] = _finetune_loss(pair, ft, inputs, ids, scored, layer, edit, backend) - out["finetuned"]
    return out


def _finetune_loss(pair: ModelPair, ft, inputs: dict, ids: Tensor, scored: Tensor, layer: int | None, edit, backend) -> Tensor:
    """(batch,) CE of the fine-tune, with its component along `edit`'s unit at `layer`
    replaced by the base's projection (`edit` = (unit, base projection)), or unedited."""
    nn_model = ft.nn
    # The adapter's updates (a fine-tune run as the base plus adapter) and the replacement, in execution order.
    steps = plan_layer_steps([] if layer is None else [(layer, "resid")], ft.lora, pair.num_layers)
    with nn_model.trace(inputs, **backend.trace_kwargs(nn_model)):
        for kind, at, item in steps:
            if kind == "lora":
                lora_update(nn_model, item)
                continue
            x = site_value(envoy_at(nn_model, site_path(pair.family, "resid", at)), "resid")
            u, base_proj = edit[0].to(x.device), edit[1].to(x.device)
            x[:] = x + ((base_proj - x.float() @ u)[..., None] * u).to(x.dtype)
        ce = token_loss(nn_model.output.logits, ids, scored).save()
    backend.record(nn_model, ce)
    return ce


def causal_check(
    pair: ModelPair, directions: Tensor, data: dict[str, list[Example]], max_tokens: int, batch_size: int, seed: int,
    random_control: bool, backend,
) -> xr.Dataset:
    """delta_ce (data, condition, layer) with its standard error over texts, and the unedited losses."""
    unit = directions.float() / directions.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    units = {"difference": unit}
    if random_control:
        random = torch.randn(unit.shape, generator=torch.Generator().manual_seed(seed + 1))
        units["random"] = random / random.norm(dim=-1, keepdim=True)
    names = list(units)
    L = pair.num_layers
    delta = np.full((len(DATA), len(names), L), np.nan, np.float32)
    delta_se = np.full_like(delta, np.nan)
    ce = np.zeros((len(DATA), 2), np.float32)
    for d, kind in enumerate(DATA):
        per_text: dict = {}
        for start in range(0, len(data[kind]), batch_size):
            ids, mask, scored = encode_scored(pair.tokenizer, data[kind][start : start + batch_size], max_tokens)
            for key, values in _batch_deltas(pair, ids, mask, scored, units, backend).items():
                per_text.setdefault(key, []).append(values.numpy())
        values = {key: np.concatenate(v) for key, v in per_text.items()}
        ce[d] = [values["base"].mean(), values["finetuned"].mean()]
        for c, name in enumerate(names):
            for layer in range(L):
                v = values[name, layer]
                delta[d, c, layer] = v.mean()
                delta_se[d, c, layer] = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else np.nan
        log.info("causal %s: CE base %.3f, fine-tune %.3f; delta per layer %s", kind, *ce[d], np.round(delta[d, 0], 4))
    return xr.Dataset(
        {
            "delta_ce": (("data", "condition", "layer"), delta),
            "delta_ce_se": (("data", "condition", "layer"), delta_se),
            "ce": (("data", "model"), ce),
        },
        coords={"data": text(DATA), "condition": text(names), "layer": list(range(L)), "model": text(["base", "finetuned"]),
                "n_texts": ("data", [len(data[k]) for k in DATA])},
    )
