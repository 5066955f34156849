"""The collect stage: trace both models under both framings, stream into the store.

Each batch of prompt pairs runs as one forward pass per model (eval and
deploy rows together), or as one forward pass for both when the fine-tune is
the base plus adapter updates (one request remotely); its arrays go to a background writer thread while
the next batch is traced, so memory stays at a couple of batches whatever
the number of prompts, and disk I/O overlaps compute.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from routing_suite import schema
from routing_suite.errors import ConfigError
from routing_suite.models import ModelPair
from routing_suite.prompts import PromptPair
from routing_suite.store import RunStore, text
from routing_suite.tracing import SiteRequest, make_batch, trace_sites

log = logging.getLogger(__name__)

GROUP = "activations"
_SITE_DIMS = ("model", "framing", "prompt", "layer", "position", "hidden")
_HEAD_DIMS = ("model", "framing", "prompt", "layer", "position", "head", "head_dim")


@dataclass
class LabeledPair:
    """A prompt pair and the split it belongs to ('fit', 'localize' or 'test')."""

    pair: PromptPair
    split: str


class BackgroundWriter:
    """Writes batches in a thread; errors surface on the next submit or on close.

    Consecutive batches are gathered up to `group_size` and written as one
    region, which cuts the per-call cost of the store (a batch is marked done
    only once its group is written, so a crash re-traces at most one group).
    """

    def __init__(
        self, store: RunStore, group: str, group_size: int = 1, depth: int = 2, threaded: bool = True,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        """`prepare`, if given, runs before the first write (in the thread, so
        laying out a new group overlaps the first traces)."""
        self.store, self.group, self.group_size = store, group, max(1, group_size)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.pending: list[tuple[int, slice, dict[str, np.ndarray], dict[str, list]]] = []
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

    def submit(self, batch: int, prompts: slice, data: dict[str, np.ndarray], labels: dict[str, list]) -> None:
        """Queue one batch: arrays laid out as the group's variables, and the
        prompt ids and layers that name a bad value if there is one."""
        self._raise()
        if self.pending and (batch != self.pending[-1][0] + 1 or len(self.pending) == self.group_size):
            self._flush()
        self.pending.append((batch, prompts, data, labels))

    def _flush(self) -> None:
        if not self.pending:
            return
        group, self.pending = self.pending, []
        if self.thread is None:
            self._write(group)
        else:
            self.queue.put(group)

    def _write(self, group: list) -> None:
        batches = [b for b, _, _, _ in group]
        region = slice(group[0][1].start, group[-1][1].stop)
        prompt_axis = 2  # (model, framing, prompt, ...)
        data = {name: np.concatenate([d[name] for _, _, d, _ in group], axis=prompt_axis) for name in group[0][2]}
        labels = {"prompt": [p for _, _, _, lab in group for p in lab["prompt"]], "layer": group[0][3]["layer"]}
        self.store.write_batch(self.group, batches, region, data, labels)

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


def layout(items: list[LabeledPair], request: SiteRequest, pair: ModelPair, batch_size: int) -> tuple[dict, dict, int]:
    """Coordinates, variable shapes and batch count of the activations group."""
    n, layers, positions = len(items), list(request.layers), request.position_labels()
    coords = {
        "model": text(schema.MODELS),
        "framing": text(schema.FRAMINGS),
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
    return coords, variables, math.ceil(n / batch_size)


def paired_prompts(chunk: list[LabeledPair]) -> list[str]:
    """A batch's rows: every pair's eval prompt, then every pair's deploy prompt
    (the order the store's reshape and `trace_sites(paired_sum=True)` rely on)."""
    return [it.pair.eval_prompt for it in chunk] + [it.pair.deploy_prompt for it in chunk]


def collect(
    pair: ModelPair, items: list[LabeledPair], request: SiteRequest, store: RunStore, backend, progress: bool = True
) -> None:
    """Fill the store's activations group; batches already written are skipped."""
    if not items:
        raise ConfigError("the prompt set is empty: nothing to collect")
    request = request.validate(pair.num_layers)
    size = backend.batch_size
    coords, variables, n_batches = layout(items, request, pair, size)
    prepare = None
    if store.has_streamed(GROUP):
        todo = [b for b, done in enumerate(store.batches_done(GROUP)) if not done]
    else:  # a new group: laid out by the writer while the first batches are traced
        todo = list(range(n_batches))

        def prepare() -> None:
            store.create_streamed(GROUP, coords, variables, n_batches, batch_size=size)

    if not todo:
        log.info("collect: all %d batches already in the store", n_batches)
        return
    log.info("collect: %d of %d batches to trace (%d prompt pairs)", len(todo), n_batches, len(items))
    models = [pair.traced(which) for which in schema.MODELS]
    writer = BackgroundWriter(
        store, GROUP, group_size=store.settings.prompts_per_chunk(variables, size) // size, threaded=backend.threaded_writes, prepare=prepare
    )
    try:
        for b in tqdm(todo, desc="collect", unit="batch", disable=not progress):
            chunk = items[b * size : (b + 1) * size]
            batch = make_batch(pair.tokenizer, paired_prompts(chunk), request)
            traced = dict(zip(schema.MODELS, trace_sites(models, pair.family, batch, request, pair.num_heads, backend)))
            # (2 * batch, ...) rows are eval then deploy: -> (model, framing, prompt, ...)
            data = {
                site: np.stack([traced[w][site].numpy().reshape(2, len(chunk), *traced[w][site].shape[1:]) for w in schema.MODELS])
                for site in variables
            }
            labels = {"prompt": [it.pair.id for it in chunk], "layer": list(request.layers)}
            writer.submit(b, slice(b * size, b * size + len(chunk)), data, labels)
    finally:
        writer.close()


def run(cfg) -> dict:
    """`experiments.collect`: fill (or resume, or reuse) the run's store."""
    from routing_suite import pipeline

    setup = pipeline.build_components(cfg)
    items = pipeline.prompt_items(setup)
    request = pipeline.site_request(cfg)
    pair = pipeline.load_pair(setup)
    request.validate(pair.num_layers)  # bad layers or sites fail before any store or trace
    reduce = cfg.collect.reduce
    if reduce not in ("none", "paired_sums"):
        raise ConfigError(f"collect.reduce={reduce!r} is not one of ['none', 'paired_sums']")
    store = pipeline.open_store(setup, pair, "collect" if reduce == "none" else reduce)
    if not store.complete:
        if reduce == "none":
            collect(pair, items, request, store, setup.backend, progress=cfg.progress)
        else:
            from routing_suite.reduce import collect_paired_sums

            collect_paired_sums(pair, items, request, store, setup.backend, progress=cfg.progress)
        store.mark_stage_done("collect")
        store.finish()
    log.info("store: %s", store.path)
    return {"store": str(store.path), "n_prompts": len(items), "requests": setup.backend.stats.as_dict()}
