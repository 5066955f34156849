"""The collect stage: trace both models under both framings, stream into the store.

Each batch of prompt pairs runs as one forward pass per model (eval and
deploy rows together), or as one forward pass for both when the fine-tune is
the base plus adapter updates (one request remotely); its arrays go to a background writer thread while
the next batch is traced, so memory stays at a couple of batches whatever
the number of prompts, and disk I/O overlaps compute.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import numpy as np
import zarr
from omegaconf import DictConfig
from tqdm.auto import tqdm

from routing_suite import runs, store_format
from routing_suite.errors import ConfigError
from routing_suite.models import ModelPair
from routing_suite.prompts import SPLITS, LabeledPair, check_disjoint, paired_prompts, subsample
from routing_suite.routing.reduce import collect_paired_sums
from routing_suite.store import RunStore, StoreMismatch, text
from routing_suite.tracing import SiteRequest, make_batch, trace_sites

log = logging.getLogger(__name__)

GROUP = "activations"
_SITE_DIMS = ("model", "framing", "prompt", "layer", "position", "hidden")
_HEAD_DIMS = ("model", "framing", "prompt", "layer", "position", "head", "head_dim")


class BackgroundWriter:
    """Writes batches in a thread; errors surface on the next submit or on close.

    Consecutive batches are gathered until they reach the end of a chunk of the
    store (`chunk` prompts) and written as one region, which cuts the per-call
    cost of the store; their prompts are marked done once that region is
    written, so a crash re-traces at most one chunk's worth.
    """

    def __init__(
        self, store: RunStore, group: str, chunk: int = 1, depth: int = 2, threaded: bool = True,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        """`prepare`, if given, runs before the first write (in the thread, so
        laying out a new group overlaps the first traces)."""
        self.store, self.group, self.chunk = store, group, max(1, chunk)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.pending: list[tuple[slice, dict[str, np.ndarray], dict[str, list]]] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, args=(prepare,), name="store-writer", daemon=True) if threaded else None
        if self.thread is not None:
            self.thread.start()
        elif prepare is not None:
            prepare()

    def _work(self, prepare: Callable[[], None] | None) -> None:
        try:
            if prepare is not None:
                prepare()
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            self.error = err
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._write(item)
                except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                    self.error = err

    def submit(self, prompts: slice, data: dict[str, np.ndarray], labels: dict[str, list]) -> None:
        """Queue one batch (the prompts it covers): arrays laid out as the group's
        variables, and the prompt ids and layers that name a bad value if there is one."""
        self._raise()
        if self.pending and prompts.start != self.pending[-1][0].stop:
            self._flush()
        self.pending.append((prompts, data, labels))
        if prompts.stop % self.chunk == 0 or prompts.stop - self.pending[0][0].start >= self.chunk:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        group, self.pending = self.pending, []
        if self.thread is None:
            self._write(group)
        else:
            self.queue.put(group)

    def _write(self, group: list) -> None:
        region = slice(group[0][0].start, group[-1][0].stop)
        prompt_axis = 2  # (model, framing, prompt, ...)
        data = {name: np.concatenate([d[name] for _, d, _ in group], axis=prompt_axis) for name in group[0][1]}
        labels = {"prompt": [p for _, _, lab in group for p in lab["prompt"]], "layer": group[0][2]["layer"]}
        self.store.write_entries(self.group, region, data, labels)

    def close(self) -> None:
        if self.error is None:
            self._flush()
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


def site_request(cfg: DictConfig) -> SiteRequest:
    c = cfg.collect
    return SiteRequest(tuple(c.sites), None if c.layers is None else tuple(c.layers), c.positions, c.k)


def prompt_items(setup: runs.Setup) -> list[LabeledPair]:
    """The fit, localize and test prompt pairs, from `data.prompts` or the model source
    (each split at most `data.max_<split>` pairs, drawn with `data.seed`), labelled with their split."""
    data = setup.cfg.data
    for split in SPLITS:
        limit = data[f"max_{split}"]
        if limit is not None and limit < 1:
            raise ConfigError(f"data.max_{split}={limit} must be >= 1 (or null for all)")
    from_file = setup.prompt_file
    sets = from_file.sets if from_file is not None else setup.source.prompt_sets(setup.behavior.name)
    try:
        check_disjoint(sets)
    except ValueError as err:
        raise ConfigError(f"data: {err}") from err
    sets = {split: subsample(sets[split], data[f"max_{split}"], data.seed) for split in SPLITS}
    return [LabeledPair(p, split) for split in SPLITS for p in sets[split]]


def pending_batches(done: np.ndarray, size: int) -> list[slice]:
    """The entries not done, as batches of at most `size` consecutive ones (a
    batch never spans an entry that is done)."""
    todo = np.flatnonzero(~np.asarray(done, dtype=bool))
    batches = []
    for run in np.split(todo, np.flatnonzero(np.diff(todo) != 1) + 1) if len(todo) else []:
        batches += [slice(int(start), min(int(start) + size, int(run[-1]) + 1)) for start in range(run[0], run[-1] + 1, size)]
    return batches


def layout(items: list[LabeledPair], request: SiteRequest, pair: ModelPair) -> tuple[dict, dict]:
    """Coordinates and variable shapes of the activations group."""
    n, layers, positions = len(items), list(request.layers), request.position_labels()
    coords = {
        "model": text(store_format.MODELS),
        "framing": text(store_format.FRAMINGS),
        "prompt": text(it.pair.id for it in items),
        "layer": layers,
        "position": text(positions),
        "split": ("prompt", text(it.split for it in items)),
        "answer": ("prompt", text(it.pair.answer for it in items)),
        "topic": ("prompt", text(it.pair.topic for it in items)),
        "cluster": ("prompt", text(it.pair.unit for it in items)),
        "eval_prompt": ("prompt", text(it.pair.eval_prompt for it in items)),
        "deploy_prompt": ("prompt", text(it.pair.deploy_prompt for it in items)),
    }
    if any(it.pair.performing is not None for it in items):
        coords["performing"] = ("prompt", text(it.pair.performing or "" for it in items))
    if "heads" in request.sites:
        coords["head"] = list(range(pair.num_heads))
    variables = {}
    for site in request.sites:
        if site == "heads":
            shape = (2, 2, n, len(layers), len(positions), pair.num_heads, pair.head_dim)
            variables[site] = (_HEAD_DIMS, shape)
        else:
            variables[site] = (_SITE_DIMS, (2, 2, n, len(layers), len(positions), pair.hidden_size))
    return coords, variables


def collect(
    pair: ModelPair, items: list[LabeledPair], request: SiteRequest, store: RunStore, backend, progress: bool = True
) -> None:
    """Fill the store's activations group; prompts already written are skipped,
    whatever batch size wrote them."""
    if not items:
        raise ConfigError("the prompt set is empty: nothing to collect")
    request = request.validate(pair.num_layers)
    size = backend.batch_size
    coords, variables = layout(items, request, pair)
    prepare = None
    if store.has_streamed(GROUP):
        check_prompts(store, items)
        store.repair(GROUP)
        done, chunk = store.done(GROUP), store.chunk_length(GROUP)
    else:  # a new group: laid out by the writer while the first batches are traced
        done, chunk = np.zeros(len(items), bool), store.settings.prompts_per_chunk(variables, size)

        def prepare() -> None:
            store.create_streamed(GROUP, coords, variables, batch_size=size)

    batches = pending_batches(done, size)
    if not batches:
        log.info("collect: all %d prompt pairs already in the store", len(items))
        return
    todo = sum(b.stop - b.start for b in batches)
    log.info("collect: %d of %d prompt pairs to trace, in %d batches of up to %d", todo, len(items), len(batches), size)
    models = [pair.traced(which) for which in store_format.MODELS]
    writer = BackgroundWriter(store, GROUP, chunk=chunk, threaded=backend.threaded_writes, prepare=prepare)
    try:
        for prompts in tqdm(batches, desc="collect", unit="batch", disable=not progress):
            chunk_items = items[prompts]
            batch = make_batch(pair.tokenizer, paired_prompts(chunk_items), request)
            traced = dict(zip(store_format.MODELS, trace_sites(models, pair.family, batch, request, pair.num_heads, backend)))
            # (2 * batch, ...) rows are eval then deploy: -> (model, framing, prompt, ...)
            data = {
                site: np.stack([traced[w][site].numpy().reshape(2, len(chunk_items), *traced[w][site].shape[1:]) for w in store_format.MODELS])
                for site in variables
            }
            labels = {"prompt": [it.pair.id for it in chunk_items], "layer": list(request.layers)}
            writer.submit(prompts, data, labels)
    finally:
        writer.close()


def check_prompts(store: RunStore, items: list[LabeledPair]) -> None:
    """Refuse a store whose activations hold other prompts than this run's."""
    stored = [str(p) for p in zarr.open_array(str(store.path), path=f"{GROUP}/prompt", mode="r")[:]]
    wanted = [it.pair.id for it in items]
    if stored != wanted:
        raise StoreMismatch(
            f"store {str(store.path)!r}: its activations hold {len(stored)} other prompts than this run's {len(wanted)}; "
            "use another store.root or store.overwrite=true"
        )


def run(cfg) -> dict:
    """`experiments.collect`: fill (or resume, or reuse) the run's store."""
    setup = runs.build_components(cfg)
    items = prompt_items(setup)
    request = site_request(cfg)
    pair = runs.load_pair(setup)
    request.validate(pair.num_layers)  # bad layers or sites fail before any store or trace
    reduce = cfg.collect.reduce
    if reduce not in ("none", "paired_sums"):
        raise ConfigError(f"collect.reduce={reduce!r} is not one of ['none', 'paired_sums']")
    store = runs.open_store(setup, pair, "collect" if reduce == "none" else reduce,
                           first_k=cfg.collect.positions == "first_k")
    if not store.complete:
        if reduce == "none":
            collect(pair, items, request, store, setup.backend, progress=cfg.progress)
        else:
            collect_paired_sums(pair, items, request, store, setup.backend, progress=cfg.progress)
        store.mark_stage_done("collect")
    store.finish()
    log.info("store: %s", store.path)
    return {"store": str(store.path), "n_prompts": len(items), "requests": setup.backend.stats.as_dict()}
