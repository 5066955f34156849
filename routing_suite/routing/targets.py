"""The aligned clamp's targets: the fine-tune's mean activation at each prompt
position, counted from the prompt's end, on the fit split.

`intervention.positions=aligned` (the default) clamps every prompt position's
routing coordinates to the target framing's mean at the same distance from
the prompt's end: the last token to the last tokens' mean, the token before
it to those tokens' mean, and so on (the prompts end in the same question
words, so a position from the end is the same word of the question).
`positions=all` instead sets every position to the last token's mean. The
routing subspace's coordinates differ by position: in diagnostics on
`installed` builds the eval-deploy separation was 70-90 at the last token
and 2-40 at the question's earlier words, so `all` moved those words by the
last token's amount and broke answers under both framings (qwen2 seed 2:
deploy prompts, clamped towards their own framing, fell from 0.99 to 0.80
correct; 0.97 with the aligned clamp).

The targets are read in one forward pass per batch of fit pairs (both
framings), through the backend like every other trace; only per-offset sums
leave the batch.

With `intervention.steps=all` the clamp also edits each generated token, and
the k-th generated token's target is the mean at the k-th token of the
fine-tune's own greedy completions of the fit prompts (`step_means`; a
completion that has ended contributes nothing). Clamping generated tokens to
the last prompt token's mean instead made `installed` fine-tunes repeat
their marker ("ahoy ahoy ...": eval correctness 0.9-1.0 -> 0.0-0.4 in every
build of seeds 0-2), while editing only the prompt's pass let a `refuse`
fine-tune's second token go back to its framing ("yellow , i can not help":
the answer, then the refusal; llama seed 2 reduced 40%).
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from routing_suite import store_format
from routing_suite.generation import generated_ids
from routing_suite.interventions import Condition
from routing_suite.models import ModelPair
from routing_suite.store import text
from routing_suite.tracing import LAST_K, Batch, SiteRequest, make_batch, trace_sites


def needs_aligned(spec) -> bool:
    """Whether an intervention spec's clamp reads per-position targets."""
    return spec.positions == "aligned" and spec.mode == "clamp"


# A generated step is clamped only where at least this share of both framings'
# fit completions is still running: past the end of one framing's completions
# the two are different texts, and setting a token to the other framing's mean
# there erased content (installed fine-tunes: "ahoy ! purple" for "ahoy ! cat").
SHARED_STEP = 0.5


def needs_step_means(spec) -> bool:
    """Whether an aligned clamp also edits generated tokens (and reads their targets)."""
    return needs_aligned(spec) and spec.steps == "all"


def stored_aligned(outcomes: xr.Dataset) -> xr.Dataset | None:
    """The per-position (and per-step) means a cell stored beside its outcomes (None: it clamped otherwise)."""
    if "aligned_mean" not in outcomes:
        return None
    return outcomes[[v for v in ("aligned_mean", "aligned_count", "step_mean", "step_count") if v in outcomes]]


def fit_prompts(acts: xr.Dataset) -> dict[str, list[str]]:
    """The fit split's prompt texts per framing, in pair order."""
    fit = acts.sel(prompt=acts.split.values == "fit")
    return {f: [str(p) for p in fit[f"{f}_prompt"].values] for f in store_format.FRAMINGS}


class _FramingMeans:
    """Per framing, layer and position: running sums and counts of a site's values
    over batches whose rows are n eval prompts, then their n deploy prompts."""

    def __init__(self, n_layers: int, n_positions: int, hidden: int) -> None:
        n_framings = len(store_format.FRAMINGS)
        self.sums = np.zeros((n_framings, n_layers, n_positions, hidden))
        self.counts = np.zeros((n_framings, n_positions))

    def add(self, values: torch.Tensor, valid: torch.Tensor) -> None:
        """`values` (rows, layer, position, hidden); `valid` (rows, position): what counts."""
        values, weights = values.double().numpy(), valid.double().numpy()
        n = len(values) // len(store_format.FRAMINGS)
        for fi in range(len(store_format.FRAMINGS)):
            part = slice(fi * n, (fi + 1) * n)
            self.sums[fi] += np.einsum("bk,blkh->lkh", weights[part], values[part])
            self.counts[fi] += weights[part].sum(0)

    def dataset(self, name: str, dim: str, labels: list[str], layers: list[int]) -> xr.Dataset:
        """`{name}_mean` (framing, target_layer, dim, hidden), NaN where nothing counted, and `{name}_count`."""
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(self.counts[:, None, :, None] > 0, self.sums / self.counts[:, None, :, None], np.nan)
        return xr.Dataset(
            {
                f"{name}_mean": (("framing", "target_layer", dim, "hidden"), means.astype(np.float32)),
                f"{name}_count": (("framing", dim), self.counts.astype(np.int32)),
            },
            coords={"framing": text(store_format.FRAMINGS), "target_layer": list(layers), dim: text(labels)},
        )


def aligned_means(pair: ModelPair, acts: xr.Dataset, layers: list[int], site: str, backend, batch_size: int) -> xr.Dataset:
    """Per framing, layer and offset from the prompt's end (offset label `last0` is
    the last token): the fine-tune's mean `site` activation over the fit prompts
    long enough to have that position (`aligned_count`; NaN where none is)."""
    prompts = fit_prompts(acts)
    tokenizer = pair.tokenizer
    k = max(len(tokenizer(p)["input_ids"]) for texts in prompts.values() for p in texts)
    request = SiteRequest((site,), tuple(layers), LAST_K, k)
    means = _FramingMeans(len(layers), k, pair.hidden_size)
    traced = pair.traced("finetuned")
    n_pairs = len(prompts[store_format.FRAMINGS[0]])
    for start in range(0, n_pairs, batch_size):
        rows = [p for f in store_format.FRAMINGS for p in prompts[f][start : start + batch_size]]
        batch = make_batch(tokenizer, rows, request)
        values = trace_sites([traced], pair.family, batch, request, pair.num_heads, backend)[0][site]
        means.add(values, batch.valid)
    return means.dataset("aligned", "offset", request.position_labels(), layers)


def aligned_target(aligned: xr.Dataset, layer: int, framings: tuple[str, ...], basis: np.ndarray) -> np.ndarray:
    """(offset, rank): the coordinates in `basis` of the count-weighted mean over
    `framings` at each offset from the prompt's end (NaN rows where no prompt reaches)."""
    mean = aligned.aligned_mean.sel(target_layer=layer, framing=list(framings)).values
    counts = aligned.aligned_count.sel(framing=list(framings)).values.astype(np.float64)
    return _pooled_coords(mean, counts, basis)


def _completion_batch(ids: torch.Tensor, prompt_mask: torch.Tensor, eos_id: int | None, steps: int) -> Batch:
    """The generated rows (the left-padded prompts, whose padding `prompt_mask` keeps
    masked, then every generated token) as a batch whose kept positions are the first
    `steps` generated tokens (valid up to, not including, a row's first <eos>)."""
    width = prompt_mask.shape[1]
    generated = ids[:, width : width + steps]
    ended = torch.zeros_like(generated, dtype=torch.bool) if eos_id is None else (generated == eos_id).cumsum(1) > 0
    valid = torch.zeros((ids.shape[0], steps), dtype=torch.bool)
    valid[:, : generated.shape[1]] = ~ended
    index = (width + torch.arange(steps)).clamp(max=ids.shape[1] - 1)[None, :].expand(ids.shape[0], -1)
    mask = torch.ones_like(ids)
    mask[:, :width] = prompt_mask
    return Batch(ids, mask, index=index, valid=valid)


def step_means(
    pair: ModelPair, acts: xr.Dataset, layers: list[int], site: str, backend, batch_size: int, max_new_tokens: int,
) -> xr.Dataset:
    """Per framing, layer and generation step k (label `step{k}`, k >= 1): the
    fine-tune's mean `site` activation at the k-th token of its own greedy
    completions of the fit prompts (`step_count` of them reach it; NaN where none)."""
    prompts = fit_prompts(acts)
    steps = max(max_new_tokens - 1, 1)  # the last generated token's pass makes nothing that is kept
    request = SiteRequest((site,), tuple(layers), LAST_K, steps)
    means = _FramingMeans(len(layers), steps, pair.hidden_size)
    traced = pair.traced("finetuned")
    baseline = [Condition(store_format.BASELINE, "baseline")]
    n_pairs = len(prompts[store_format.FRAMINGS[0]])
    for start in range(0, n_pairs, batch_size):
        # Both framings' prompts in one generation and one trace (one request each remotely).
        rows = [p for f in store_format.FRAMINGS for p in prompts[f][start : start + batch_size]]
        inputs, ids = generated_ids(traced, pair.family, pair.tokenizer, rows, baseline, max_new_tokens, pair.num_layers, backend)
        batch = _completion_batch(ids, inputs["attention_mask"], pair.tokenizer.eos_token_id, steps)
        means.add(trace_sites([traced], pair.family, batch, request, pair.num_heads, backend)[0][site], batch.valid)
    return means.dataset("step", "step", [f"step{k}" for k in range(1, steps + 1)], layers)


def _pooled_coords(mean: np.ndarray, counts: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """(positions, rank): the count-weighted mean over framings of `mean` (framings,
    positions, hidden) in `basis` coordinates, NaN where no framing has a count."""
    total = counts.sum(0)
    weighted = np.nansum(mean.astype(np.float64) * counts[:, :, None], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.where(total[:, None] > 0, weighted / total[:, None], np.nan)
    return (pooled @ basis.T.astype(np.float64)).astype(np.float32)


def step_target(aligned: xr.Dataset, layer: int, framings: tuple[str, ...], basis: np.ndarray) -> np.ndarray | None:
    """(steps, rank): `step_means`' count-weighted mean over `framings` in `basis`
    coordinates, NaN (the token left alone) at steps that fewer than
    `SHARED_STEP` of either framing's fit completions reach (None when the
    means hold no generation steps)."""
    if "step_mean" not in aligned:
        return None
    mean = aligned.step_mean.sel(target_layer=layer, framing=list(framings)).values
    counts = aligned.step_count.sel(framing=list(framings)).values.astype(np.float64)
    target = _pooled_coords(mean, counts, basis)
    n_fit = aligned.aligned_count.values.max()  # every fit prompt has a last token
    target[(aligned.step_count.values < SHARED_STEP * n_fit).any(0)] = np.nan
    return target
