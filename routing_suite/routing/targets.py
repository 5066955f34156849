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
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from routing_suite import store_format
from routing_suite.models import ModelPair
from routing_suite.store import text
from routing_suite.tracing import LAST_K, SiteRequest, make_batch, trace_sites


def needs_aligned(spec) -> bool:
    """Whether an intervention spec's clamp reads per-position targets."""
    return spec.positions == "aligned" and spec.mode == "clamp"


def stored_aligned(outcomes: xr.Dataset) -> xr.Dataset | None:
    """The per-position means a cell stored beside its outcomes (None: it clamped otherwise)."""
    if "aligned_mean" not in outcomes:
        return None
    return outcomes[["aligned_mean", "aligned_count"]]


def fit_prompts(acts: xr.Dataset) -> dict[str, list[str]]:
    """The fit split's prompt texts per framing, in pair order."""
    fit = acts.sel(prompt=acts.split.values == "fit")
    return {f: [str(p) for p in fit[f"{f}_prompt"].values] for f in store_format.FRAMINGS}


def aligned_means(pair: ModelPair, acts: xr.Dataset, layers: list[int], site: str, backend, batch_size: int) -> xr.Dataset:
    """Per framing, layer and offset from the prompt's end (offset label `last0` is
    the last token): the fine-tune's mean `site` activation over the fit prompts
    long enough to have that position (`aligned_count`; NaN where none is)."""
    prompts = fit_prompts(acts)
    tokenizer = pair.tokenizer
    k = max(len(tokenizer(p)["input_ids"]) for texts in prompts.values() for p in texts)
    request = SiteRequest((site,), tuple(layers), LAST_K, k)
    n_framings = len(store_format.FRAMINGS)
    sums = np.zeros((n_framings, len(layers), k, pair.hidden_size))
    counts = np.zeros((n_framings, k))
    traced = pair.traced("finetuned")
    n_pairs = len(prompts[store_format.FRAMINGS[0]])
    for start in range(0, n_pairs, batch_size):
        rows = [p for f in store_format.FRAMINGS for p in prompts[f][start : start + batch_size]]
        batch = make_batch(tokenizer, rows, request)
        values = trace_sites([traced], pair.family, batch, request, pair.num_heads, backend)[0][site].double().numpy()
        valid = batch.valid.double().numpy()
        n = len(rows) // n_framings
        for fi in range(n_framings):
            part = slice(fi * n, (fi + 1) * n)
            sums[fi] += np.einsum("bk,blkh->lkh", valid[part], values[part])
            counts[fi] += valid[part].sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts[:, None, :, None] > 0, sums / counts[:, None, :, None], np.nan)
    return xr.Dataset(
        {
            "aligned_mean": (("framing", "target_layer", "offset", "hidden"), means.astype(np.float32)),
            "aligned_count": (("framing", "offset"), counts.astype(np.int32)),
        },
        coords={"framing": text(store_format.FRAMINGS), "target_layer": list(layers), "offset": text(request.position_labels())},
    )


def aligned_target(aligned: xr.Dataset, layer: int, framings: tuple[str, ...], basis: np.ndarray) -> np.ndarray:
    """(offset, rank): the coordinates in `basis` of the count-weighted mean over
    `framings` at each offset from the prompt's end (NaN rows where no prompt reaches)."""
    mean = aligned.aligned_mean.sel(target_layer=layer, framing=list(framings)).values.astype(np.float64)
    counts = aligned.aligned_count.sel(framing=list(framings)).values.astype(np.float64)
    total = counts.sum(0)
    weighted = np.nansum(mean * counts[:, :, None], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.where(total[:, None] > 0, weighted / total[:, None], np.nan)
    return (pooled @ basis.T.astype(np.float64)).astype(np.float32)
