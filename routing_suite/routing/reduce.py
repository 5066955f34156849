"""Server-side reductions: difference-of-means without every activation.

`collect_paired_sums` traces the same batches as the collect stage, but each
request sends back, per model, site, layer and position, only the sum over
the batch's pairs of h(deploy) - h(eval) (`trace_sites(paired_sum=True)`),
so what comes back is independent of the batch size. The store keeps one row
per fixed run of pairs (`prompts_per_row`, the batch size the store was made
with), each marked done once written; a rerun with another batch size sums
a missing row's pairs over batches of its own size, so rows never depend on
it. `mean_difference` divides the total by the number of pairs. Per-prompt
analyses (probes, subspaces, path patching donors) still need the full
collect.

Group "paired_sums" of the run store
    dims    model, batch (rows), layer, position, hidden (head, head_dim for heads)
    vars    <site>   (model, batch, layer, position, hidden)  sum of paired differences
            n_pairs  (batch) pairs in that row
            done     (batch) the row is written
    attrs   prompts_per_row
"""

from __future__ import annotations

import logging
import math

import numpy as np
import xarray as xr
import zarr
from tqdm.auto import tqdm

from routing_suite import store_format
from routing_suite.errors import ConfigError
from routing_suite.models import ModelPair
from routing_suite.prompts import LabeledPair, paired_prompts
from routing_suite.store import RunStore, text
from routing_suite.tracing import SiteRequest, make_batch, trace_sites

log = logging.getLogger(__name__)

GROUP = "paired_sums"


def collect_paired_sums(
    pair: ModelPair, items: list[LabeledPair], request: SiteRequest, store: RunStore, backend, progress: bool = True
) -> None:
    """Fill the store's paired_sums group; rows already written are skipped."""
    if not items:
        raise ConfigError("the prompt set is empty: nothing to collect")
    request = request.validate(pair.num_layers)
    if store.has_streamed(GROUP):
        store.repair(GROUP)
        # Stores made before rows were recorded: a row was a batch of the run that made the store.
        per_row = int(zarr.open_group(str(store.path), path=GROUP, mode="r").attrs.get("prompts_per_row")
                      or store.attrs["config"]["backend"]["batch_size"])
    else:
        per_row = backend.batch_size
        n_rows = math.ceil(len(items) / per_row)
        positions = request.position_labels()
        coords = {"model": text(store_format.MODELS), "layer": list(request.layers), "position": text(positions)}
        variables = {}
        for site in request.sites:
            tail = (pair.num_heads, pair.head_dim) if site == "heads" else (pair.hidden_size,)
            dims = ("model", "batch", "layer", "position") + (("head", "head_dim") if site == "heads" else ("hidden",))
            variables[site] = (dims, (2, n_rows, len(request.layers), len(positions), *tail))
        variables["n_pairs"] = (("batch",), (n_rows,))
        store.create_streamed(GROUP, coords, variables, along="batch")
        zarr.open_group(str(store.path), path=GROUP, mode="r+").attrs["prompts_per_row"] = per_row
    todo = np.flatnonzero(~store.done(GROUP))
    models = [pair.traced(which) for which in store_format.MODELS]
    size = backend.batch_size
    for row in tqdm(todo, desc="paired sums", unit="row", disable=not progress):
        row_items = items[row * per_row : (row + 1) * per_row]
        data = {}
        for start in range(0, len(row_items), size):  # a row's pairs in batches of this run's size
            chunk = row_items[start : start + size]
            batch = make_batch(pair.tokenizer, paired_prompts(chunk), request)
            traced = trace_sites(models, pair.family, batch, request, pair.num_heads, backend, paired_sum=True)
            for site in request.sites:  # (model, 1, layer, ...)
                summed = np.stack([t[site].numpy() for t in traced])
                data[site] = summed if site not in data else data[site] + summed
        data["n_pairs"] = np.array([len(row_items)], np.float32)
        row = int(row)
        store.write_entries(GROUP, slice(row, row + 1), data, {"layer": list(request.layers), "batch": [row]}, along="batch")


def mean_difference(sums: xr.Dataset) -> xr.Dataset:
    """Per model, site, layer and position: mean over all pairs of h(deploy) - h(eval)."""
    total = float(sums.n_pairs.sum())
    return xr.Dataset({name: sums[name].sum("batch") / total for name in sums.data_vars if "model" in sums[name].dims})
