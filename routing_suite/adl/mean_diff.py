"""The mean-difference stage: per layer and position, the mean of h_ft - h_base over
the first k tokens of N unrelated texts, streamed.

Texts are traced in batches through both models (residual stream after every
layer, first k tokens after <bos>). Sums are accumulated in memory over one
part of `texts_per_part` texts, then the part's means and counts are written
to the store's `adl_sums` group and the part marked done; so memory holds one
batch of activations and one part's sums whatever N is, and a rerun after a
crash redoes at most one part (a part is overwritten, never added twice).
`finish` combines the parts into the small `adl_mean` group.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from routing_suite import store_format
from routing_suite.models import ModelPair
from routing_suite.store import RunStore, text
from routing_suite.tracing import SiteRequest, make_batch, trace_sites

log = logging.getLogger(__name__)

SUMS = "adl_sums"
MEAN = "adl_mean"
_VECTORS = ("diff", "mean_base", "mean_finetuned")


def _layout(n_parts: int, layers: list[int], k: int, hidden: int) -> tuple[dict, dict]:
    coords = {"part": list(range(n_parts)), "layer": layers, "position": text(f"first{i}" for i in range(k))}
    shape = (n_parts, len(layers), k)
    variables = {name: (("part", "layer", "position", "hidden"), (*shape, hidden)) for name in _VECTORS}
    variables["norm_finetuned"] = (("part", "layer", "position"), shape)
    variables["count"] = (("part", "position"), (n_parts, k))
    return coords, variables


def _part_sums(pair: ModelPair, texts: list[str], request: SiteRequest, batch_size: int, backend) -> dict[str, np.ndarray]:
    """One part's means over its texts (0 where a position has no text) and counts."""
    L, k, d = len(request.layers), request.k, pair.hidden_size
    sums = {name: torch.zeros(L, k, d, dtype=torch.float64) for name in _VECTORS}
    norm = torch.zeros(L, k, dtype=torch.float64)
    count = torch.zeros(k, dtype=torch.float64)
    models = [pair.traced(which) for which in store_format.MODELS]
    for start in range(0, len(texts), batch_size):
        batch = make_batch(pair.tokenizer, texts[start : start + batch_size], request, truncate=True)
        traced = trace_sites(models, pair.family, batch, request, pair.num_heads, backend)
        h = {w: t["resid"] for w, t in zip(store_format.MODELS, traced)}
        valid = batch.valid.to(torch.float64)[:, None, :, None]  # (batch, 1, k, 1)
        base, ft = h["base"].double() * valid, h["finetuned"].double() * valid
        sums["mean_base"] += base.sum(0)
        sums["mean_finetuned"] += ft.sum(0)
        sums["diff"] += (ft - base).sum(0)
        norm += ft.norm(dim=-1).sum(0)
        count += batch.valid.to(torch.float64).sum(0)
    safe = count.clamp(min=1)
    out = {name: (s / safe[None, :, None]).float().numpy() for name, s in sums.items()}
    out["norm_finetuned"] = (norm / safe[None, :]).float().numpy()
    out["count"] = count.float().numpy()
    return {name: v[None] for name, v in out.items()}  # a leading part axis of 1


def accumulate(
    pair: ModelPair, texts: list[str], k: int, texts_per_part: int, store: RunStore, batch_size: int, backend,
    progress: bool = True,
) -> None:
    """Fill `adl_sums` part by part; parts already written are skipped."""
    request = SiteRequest(("resid",), None, "first_k", k).validate(pair.num_layers)
    n_parts = math.ceil(len(texts) / texts_per_part)
    coords, variables = _layout(n_parts, list(request.layers), k, pair.hidden_size)
    if store.has_streamed(SUMS):
        store.repair(SUMS)
    store.create_streamed(SUMS, coords, variables, along="part")
    todo = [p for p, done in enumerate(store.done(SUMS)) if not done]
    log.info("mean difference: %d of %d parts to trace (%d texts, first %d tokens)", len(todo), n_parts, len(texts), k)
    for part in tqdm(todo, desc="adl mean", unit="part", disable=not progress):
        chunk = texts[part * texts_per_part : (part + 1) * texts_per_part]
        data = _part_sums(pair, chunk, request, batch_size, backend)
        store.write_entries(SUMS, slice(part, part + 1), data, {"layer": list(request.layers)}, along="part")


def finish(store: RunStore) -> xr.Dataset:
    """The parts combined, count-weighted: `adl_mean` (layer, position[, hidden])."""
    sums = store.read(SUMS).load()
    count = sums["count"].astype("float64")  # (part, position)
    total = count.sum("part")
    weights = count / total.where(total > 0)
    out = {name: (sums[name] * weights).sum("part").astype("float32") for name in (*_VECTORS, "norm_finetuned")}
    ds = xr.Dataset(out)
    ds["count"] = total.astype("int64")
    ds.attrs["n_texts"] = int(sums["count"].isel(position=0).sum())
    return ds.drop_vars("part", errors="ignore")
