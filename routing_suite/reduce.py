"""Server-side reductions: difference-of-means without every activation.

`collect_paired_sums` traces the same batches as the collect stage, but each
request sends back, per model, site, layer and position, only the sum over
the batch's pairs of h(deploy) - h(eval) (`trace_sites(paired_sum=True)`),
so what comes back is independent of the batch size. The store keeps one row
per batch (resumable like the activations); `mean_difference` divides the
total by the number of pairs. Per-prompt analyses (probes, subspaces, path
patching donors) still need the full collect.

Group "paired_sums" of the run store
    dims    model, batch, layer, position, hidden (head, head_dim for heads)
    vars    <site>   (model, batch, layer, position, hidden)  sum of paired differences
            n_pairs  (batch) pairs in that batch
            batch_done (batch)
"""

from __future__ import annotations

import logging
import math

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from routing_suite import schema
from routing_suite.collect import LabeledPair, paired_prompts
from routing_suite.errors import ConfigError
from routing_suite.models import ModelPair
from routing_suite.store import RunStore, text
from routing_suite.tracing import SiteRequest, make_batch, trace_sites

log = logging.getLogger(__name__)

GROUP = "paired_sums"


def collect_paired_sums(
    pair: ModelPair, items: list[LabeledPair], request: SiteRequest, store: RunStore, backend, progress: bool = True
) -> None:
    """Fill the store's paired_sums group; batches already written are skipped."""
    if not items:
        raise ConfigError("the prompt set is empty: nothing to collect")
    request = request.validate(pair.num_layers)
    size = backend.batch_size
    n_batches = math.ceil(len(items) / size)
    positions = request.position_labels()
    coords = {"model": text(schema.MODELS), "layer": list(request.layers), "position": text(positions)}
    variables = {}
    for site in request.sites:
        tail = (pair.num_heads, pair.head_dim) if site == "heads" else (pair.hidden_size,)
        dims = ("model", "batch", "layer", "position") + (("head", "head_dim") if site == "heads" else ("hidden",))
        variables[site] = (dims, (2, n_batches, len(request.layers), len(positions), *tail))
    variables["n_pairs"] = (("batch",), (n_batches,))
    store.create_streamed(GROUP, coords, variables, n_batches, along="batch")
    todo = [b for b, done in enumerate(store.batches_done(GROUP)) if not done]
    models = [pair.traced(which) for which in schema.MODELS]
    for b in tqdm(todo, desc="paired sums", unit="batch", disable=not progress):
        chunk = items[b * size : (b + 1) * size]
        batch = make_batch(pair.tokenizer, paired_prompts(chunk), request)
        traced = trace_sites(models, pair.family, batch, request, pair.num_heads, backend, paired_sum=True)
        data = {site: np.stack([t[site].numpy() for t in traced]) for site in request.sites}  # (model, 1, layer, ...)
        data["n_pairs"] = np.array([len(chunk)], np.float32)
        store.write_batch(GROUP, b, slice(b, b + 1), data, {"layer": list(request.layers), "batch": [b]}, along="batch")


def mean_difference(sums: xr.Dataset) -> xr.Dataset:
    """Per model, site, layer and position: mean over all pairs of h(deploy) - h(eval)."""
    total = float(sums.n_pairs.sum())
    return xr.Dataset({name: sums[name].sum("batch") / total for name in sums.data_vars if "model" in sums[name].dims})
