"""Batched nnsight traces that save exactly the sites and positions asked for.

One forward pass per batch reads every requested layer and site. Inside the
trace, reads follow execution order (per layer: per-head outputs, attention
output, MLP output, residual), and positions are selected there too, so only
what is kept leaves the model (this matters when the trace runs remotely).
A selection is cloned before it is kept: a slice is a view, and a saved
view carries its whole base tensor (every position) back from a server.
"""

from __future__ import annotations

from dataclasses import dataclass

import nnsight
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from routing_suite.errors import ConfigError
from routing_suite.families import SITES, site_path
from routing_suite.lora import lora_update, plan_layer_steps
from routing_suite.models import Traced

POSITION_KINDS = ("last", "first_k", "answer_mean")
# Not a collect setting: the last k prompt tokens, aligned at the prompt's end,
# which the aligned clamp's targets are read at (routing_suite.routing.targets).
LAST_K = "last_k"
# Execution order of the sites inside one decoder layer.
_ORDER = {"heads": 0, "attn": 1, "mlp": 2, "resid": 3}


@dataclass(frozen=True)
class SiteRequest:
    """What to save: sites x layers at one kind of positions."""

    sites: tuple[str, ...] = ("resid", "attn")
    layers: tuple[int, ...] | None = None  # None: every layer
    positions: str = "last"
    k: int = 5

    def validate(self, num_layers: int) -> SiteRequest:
        """A copy with `layers` filled in; ConfigError for anything that cannot run."""
        unknown = [s for s in self.sites if s not in SITES]
        if unknown or not self.sites:
            raise ConfigError(f"collect.sites={list(self.sites)} must be a non-empty subset of {list(SITES)}")
        if self.positions not in POSITION_KINDS:
            raise ConfigError(f"collect.positions={self.positions!r} is not one of {list(POSITION_KINDS)}")
        if self.positions == "first_k" and self.k < 1:
            raise ConfigError(f"collect.k={self.k} must be >= 1")
        layers = tuple(range(num_layers)) if self.layers is None else tuple(self.layers)
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad or not layers:
            raise ConfigError(f"collect.layers={list(layers)} must be non-empty layer indices in [0, {num_layers - 1}]")
        sites = tuple(sorted(set(self.sites), key=_ORDER.__getitem__))
        return SiteRequest(sites, tuple(sorted(set(layers))), self.positions, self.k)

    def position_labels(self) -> list[str]:
        if self.positions == "last":
            return ["last"]
        if self.positions == LAST_K:
            return [f"last{i}" for i in range(self.k - 1, -1, -1)]
        if self.positions == "first_k":
            return [f"first{i}" for i in range(self.k)]
        return ["answer_mean"]


@dataclass
class Batch:
    """A tokenized, left-padded batch and what selects its positions."""

    input_ids: Tensor
    attention_mask: Tensor
    # (batch, n_positions) token indices to keep, or None for the last token.
    index: Tensor | None = None
    # (batch, seq) weights averaging answer tokens, for positions="answer_mean".
    answer_weights: Tensor | None = None
    # (batch, n_positions) bool, for positions="first_k": False where a row has
    # fewer than k tokens and `index` repeats its last one; for "last_k": False
    # where a row has fewer than k tokens (padding, or a clamped index).
    valid: Tensor | None = None


def bos_named_not_added(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer names a BOS token but does not prepend it (SmolLM2): where the
    first-k positions were counted from the second token before that was fixed."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] != [bos]


def make_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    request: SiteRequest,
    answers: list[str] | None = None,
    truncate: bool = False,
) -> Batch:
    """Tokenize (left padding) and compute the positions to keep.

    For `first_k` the first k tokens after the beginning-of-sequence token are
    kept (rows shorter than k repeat their last token, and are marked in
    `Batch.valid`); for `last_k` the last k tokens (positions before a row's
    first token are marked in `Batch.valid`); for `answer_mean` the texts are prompt + answer and the
    answer's tokens are averaged. With `truncate` (first_k only) each text is
    cut to its first k tokens: in a causal model what follows them cannot
    change them, so long texts cost no more than short ones.
    """
    if not prompts:
        raise ConfigError("the prompt set is empty")
    tokenizer.padding_side = "left"
    if request.positions == "answer_mean":
        if answers is None or len(answers) != len(prompts):
            raise ConfigError("positions='answer_mean' needs one answer per prompt")
        texts = [f"{p} {a}" for p, a in zip(prompts, answers)]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        prompt_lengths = torch.tensor([len(tokenizer(p)["input_ids"]) for p in prompts])
        lengths = enc["attention_mask"].sum(1)
        width = enc["input_ids"].shape[1]
        pos = torch.arange(width)[None, :]
        start = width - lengths + prompt_lengths  # first answer token (left padding)
        weights = (pos >= start[:, None]).float()
        if (weights.sum(1) == 0).any():
            raise ConfigError("an answer tokenized to no tokens")
        return Batch(enc["input_ids"], enc["attention_mask"], answer_weights=weights / weights.sum(1, keepdim=True))
    cut = {}
    if truncate and request.positions == "first_k":
        tokenizer.truncation_side = "right"
        cut = {"truncation": True, "max_length": request.k + tokenizer.num_special_tokens_to_add()}
    enc = tokenizer(prompts, return_tensors="pt", padding=True, **cut)
    if request.positions == "last":
        return Batch(enc["input_ids"], enc["attention_mask"])
    lengths = enc["attention_mask"].sum(1)
    width = enc["input_ids"].shape[1]
    if request.positions == LAST_K:
        index = (width - request.k + torch.arange(request.k))[None, :].expand(len(prompts), -1)
        valid = index >= (width - lengths)[:, None]
        return Batch(enc["input_ids"], enc["attention_mask"], index=index.clamp(min=0), valid=valid)
    # Skip a row's first token only where it is the beginning-of-sequence token: a tokenizer
    # may name a BOS it never prepends (SmolLM2's is <|im_start|>), and skipping there
    # dropped a real token and, truncated to k, left the k-th position empty.
    starts = width - lengths
    first_ids = enc["input_ids"].gather(1, starts.clamp(max=width - 1)[:, None])[:, 0]
    bos = tokenizer.bos_token_id
    skip = torch.zeros_like(starts) if bos is None else (first_ids == bos).to(starts.dtype)
    first = starts + skip
    index = first[:, None] + torch.arange(request.k)[None, :]
    valid = index <= width - 1
    index = torch.minimum(index, torch.full_like(index, width - 1))
    return Batch(enc["input_ids"], enc["attention_mask"], index=index, valid=valid)


def select_positions(x: Tensor, batch: Batch) -> Tensor:
    """(batch, seq, ...) -> (batch, n_positions, ...)."""
    if batch.answer_weights is not None:
        w = batch.answer_weights.to(x.dtype)
        return torch.einsum("bs,bs...->b...", w, x)[:, None]
    if batch.index is None:
        return x[:, -1:]
    idx = batch.index.view(*batch.index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, idx)


def envoy_at(model, path: str):
    """The nnsight envoy (or torch module) at a dotted path such as 'model.layers.3.mlp'."""
    node = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def site_value(envoy, site: str):
    """Inside a trace: the value of `site` at its module's envoy."""
    return envoy.inputs[0][0] if site == "heads" else _first(envoy.output)


def chunked(items: list, size: int | None) -> list[list]:
    """`items` in consecutive chunks of at most `size` (all in one for None):
    the invokes each trace (each request) holds."""
    if size is None or size >= len(items):
        return [items]
    return [items[i : i + size] for i in range(0, len(items), size)]


def group_by_model(models: list[Traced]) -> list[list[int]]:
    """Indices of `models` that share an nnsight model, in first-seen order:
    each group runs as the invokes of one trace (one request remotely)."""
    groups: dict[int, list[int]] = {}
    for i, traced in enumerate(models):
        groups.setdefault(id(traced.nn), []).append(i)
    return list(groups.values())


def trace_sites(
    models: list[Traced], family: str, batch: Batch, request: SiteRequest, num_heads: int, backend, paired_sum: bool = False
) -> list[dict[str, Tensor]]:
    """The batch through each of `models`; per model, site -> (batch, layer,
    position, hidden) or, for heads, (batch, layer, position, head, head_dim),
    in float32 on the CPU.

    Models that share an nnsight model (a base and its fine-tune run as adapter
    updates) are invokes of one forward pass, so one request serves both.

    `paired_sum`: the batch's rows are n eval prompts then their n deploy
    prompts, and the trace itself reduces them to sum(deploy - eval) (a batch
    dimension of 1): what comes back no longer grows with the batch."""
    pairs = batch.input_ids.shape[0] // 2
    wanted = [(layer, site) for layer in request.layers for site in request.sites]
    through = max(request.layers) + 1
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    outputs: list[dict[str, Tensor]] = [{} for _ in models]
    for group in (chunk for g in group_by_model(models) for chunk in chunked(g, backend.max_invokes)):
        nn_model = models[group[0]].nn
        plans = [plan_layer_steps(wanted, models[i].lora, through) for i in group]
        with torch.no_grad(), nn_model.trace(**backend.trace_kwargs(nn_model)) as tracer:
            saved = nnsight.save({})
            for slot, plan in enumerate(plans):
                with tracer.invoke(inputs):
                    values = {}
                    for kind, layer, item in plan:
                        if kind == "lora":
                            lora_update(nn_model, item)
                        else:
                            envoy = envoy_at(nn_model, site_path(family, item, layer))
                            kept = select_positions(site_value(envoy, item), batch)
                            if paired_sum:
                                kept = (kept[pairs:].float() - kept[:pairs].float()).sum(0, keepdim=True)
                            values[layer, item] = kept.clone()
                    saved[slot] = values
        backend.record(nn_model, saved)
        for slot, i in enumerate(group):
            outputs[i] = _stack(saved[slot], request, num_heads)
    return outputs


def _stack(values: dict, request: SiteRequest, num_heads: int) -> dict[str, Tensor]:
    out = {}
    for site in request.sites:
        stacked = torch.stack([values[layer, site] for layer in request.layers], dim=1).float().cpu()
        if site == "heads":
            stacked = stacked.view(*stacked.shape[:3], num_heads, -1)
        out[site] = stacked
    return out
