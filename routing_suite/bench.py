"""Benchmarks: each figure is a ratio against the best plain baseline for the
same work, measured in the same process on the same model and prompts.

- collection: `collect` (nnsight traces streamed into zarr) vs a plain
  PyTorch forward with `register_forward_hook` saving the same tensors and
  `numpy.save`-ing them;
- overlap: `collect` vs the same nnsight traces with nothing written;
- memory: peak RSS of a collect over N and over 8N prompts, each in a fresh
  process;
- fit: the stage as a cell runs it vs the same fit on activations in memory;
- interventions and remote: see `routing_suite.bench_conditions`;
- localize: exact patching vs attribution, see `routing_suite.bench_localize`.
"""

from __future__ import annotations

import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from routing_suite import bench_conditions as bc
from routing_suite import store_format
from routing_suite.backends import LocalBackend
from routing_suite.bench_conditions import routing_cfg
from routing_suite.bench_localize import localize_figures
from routing_suite.config import compose_config
from routing_suite.errors import ConfigError
from routing_suite.families import site_path
from routing_suite.models import ModelPair
from routing_suite.organisms import task as T
from routing_suite.organisms.pairs import organism_pairs
from routing_suite.organisms.source import OrganismSource
from routing_suite.prompts import LabeledPair, paired_prompts
from routing_suite.routing import cell
from routing_suite.routing.collect import collect
from routing_suite.routing.fit import fit
from routing_suite.store import RunStore, group_dataset
from routing_suite.store_settings import StoreSettings
from routing_suite.tracing import SiteRequest, make_batch, select_positions, trace_sites

log = logging.getLogger(__name__)


def _items(task: T.Task, n: int) -> list[LabeledPair]:
    pairs = organism_pairs(task, "train", "all") + organism_pairs(task, "heldout", "all")
    if n > len(pairs):
        raise ValueError(f"at most {len(pairs)} prompt pairs are available, asked for {n}")
    return [LabeledPair(p, "fit") for p in pairs[:n]]


def _batches(items: list[LabeledPair], size: int):
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        yield start // size, paired_prompts(chunk)


class _Capture:
    """Forward hooks at every requested site, registered once, keeping the chosen positions."""

    def __init__(self, model, family: str, request: SiteRequest) -> None:
        self.batch = None
        self.values: dict[tuple[int, str], torch.Tensor] = {}
        modules = dict(model.named_modules())
        self.handles = [
            modules[site_path(family, site, layer)].register_forward_hook(self._hook(layer, site))
            for layer in request.layers
            for site in request.sites
        ]

    def _hook(self, layer: int, site: str):
        def hook(module, args, output):
            value = args[0] if site == "heads" else (output[0] if isinstance(output, tuple) else output)
            self.values[layer, site] = select_positions(value.detach(), self.batch)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def hooks_and_numpy(pair: ModelPair, items: list[LabeledPair], request: SiteRequest, size: int, out: Path) -> float:
    """The baseline: plain forward passes with hooks, arrays saved with numpy. Seconds."""
    started = time.perf_counter()
    for which in store_format.MODELS:
        model = pair.model(which)
        capture = _Capture(model, pair.family, request)
        try:
            for b, prompts in _batches(items, size):
                capture.batch = make_batch(pair.tokenizer, prompts, request)
                mask = capture.batch.attention_mask
                with torch.no_grad():
                    model(input_ids=capture.batch.input_ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
                for site in request.sites:
                    stacked = torch.stack([capture.values[layer, site] for layer in request.layers], 1).float().numpy()
                    np.save(out / f"{which}-{site}-{b:05d}.npy", stacked)
        finally:
            capture.remove()
    return time.perf_counter() - started


def traces_only(pair: ModelPair, items: list[LabeledPair], request: SiteRequest, size: int) -> float:
    """The same nnsight traces as `collect`, with nothing written. Seconds."""
    models = [pair.traced(which) for which in store_format.MODELS]
    backend = LocalBackend(batch_size=size)
    started = time.perf_counter()
    for _, prompts in _batches(items, size):
        batch = make_batch(pair.tokenizer, prompts, request)
        trace_sites(models, pair.family, batch, request, pair.num_heads, backend)
    return time.perf_counter() - started


def collect_seconds(
    pair: ModelPair, items: list[LabeledPair], request: SiteRequest, size: int, root: Path, compressor: str | None = None
) -> float:
    """Seconds of one collect into a new store (the store's default compressor unless named)."""
    settings = StoreSettings() if compressor is None else StoreSettings(compressor=compressor)
    store = RunStore.open(root / "bench.zarr", settings, {"bench": time.time()}, {})
    started = time.perf_counter()
    collect(pair, items, request, store, LocalBackend(batch_size=size), progress=False)
    return time.perf_counter() - started


def peak_rss_mb(n: int, size: int, cache_dir: str, family: str) -> float:
    """Peak resident memory of a fresh process collecting `n` prompt pairs."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peak_rss_mb"
        code = f"from routing_suite.bench import _probe; _probe({n}, {size}, {cache_dir!r}, {family!r}, {str(out)!r})"
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return float(out.read_text())


def _probe(n: int, size: int, cache_dir: str, family: str, out: str) -> None:
    """In a child process: one collect, then write its peak RSS in MB to `out`."""
    source = OrganismSource(family=family, cache_dir=cache_dir)
    pair = source.load("underperform")
    items = _items(T.make_task(source.spec.task), n)
    request = SiteRequest(("resid", "attn", "heads", "mlp")).validate(pair.num_layers)
    with tempfile.TemporaryDirectory() as tmp:
        collect_seconds(pair, items, request, size, Path(tmp))
    Path(out).write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def _pair_and_items(cfg) -> tuple[ModelPair, list[LabeledPair], str]:
    """The benchmark's model pair and prompt pairs: an organism, or the real SmolLM2 model."""
    if cfg.pair == "organism":
        source = OrganismSource(family=cfg.family, cache_dir=cfg.cache_dir)
        pair = source.load("underperform")
        return pair, _items(T.make_task(source.spec.task), cfg.n_prompts), f"{cfg.family} organism"
    if cfg.pair != "smollm2":
        raise ConfigError(f"pair={cfg.pair!r} is not one of ['organism', 'smollm2']")
    if cfg.memory or cfg.remote:
        raise ConfigError("pair=smollm2 measures collection, localize and interventions: set memory=false remote=false")
    from routing_suite.pretrained.source import SmolLM2Source

    source = SmolLM2Source(cache_dir=cfg.pretrained_cache_dir)
    pair = source.load("refuse")  # converted and fine-tuned on first use (minutes), cached after
    sets = source.prompt_sets("refuse")
    pairs = sets["fit"] + sets["localize"] + sets["test"]
    if cfg.n_prompts > len(pairs):
        raise ConfigError(f"n_prompts={cfg.n_prompts}: the SmolLM2 task has {len(pairs)} prompt pairs")
    return pair, [LabeledPair(p, "fit") for p in pairs[: cfg.n_prompts]], "SmolLM2-135M-Instruct"


def run(cfg) -> dict:
    """`experiments.bench`: print one line per figure and write them to bench.json."""
    torch.set_num_threads(cfg.num_threads)
    pair, items, name = _pair_and_items(cfg)
    request = SiteRequest(tuple(cfg.sites)).validate(pair.num_layers)
    figures: dict[str, float | str | int] = {
        "model": f"{name} (hidden {pair.hidden_size}, {pair.num_layers} layers)",
        "n_prompt_pairs": len(items),
        "batch_size": cfg.batch_size,
        "sites": ",".join(request.sites),
        "threads": torch.get_num_threads(),
        "compressor": StoreSettings().compressor,
    }
    tokens = sum(len(pair.tokenizer(p)["input_ids"]) for _, prompts in _batches(items, cfg.batch_size) for p in prompts) * 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # One warm-up of each path, then alternate the measured repeats.
        hooks_and_numpy(pair, items[: cfg.batch_size], request, cfg.batch_size, root)
        collect_seconds(pair, items[: cfg.batch_size], request, cfg.batch_size, root / "warm")
        best = {"collect": float("inf"), "collect_uncompressed": float("inf"), "hooks_numpy": float("inf"), "traces_only": float("inf")}
        for r in range(cfg.repeats):
            (root / f"np{r}").mkdir()
            best["hooks_numpy"] = min(best["hooks_numpy"], hooks_and_numpy(pair, items, request, cfg.batch_size, root / f"np{r}"))
            best["collect"] = min(best["collect"], collect_seconds(pair, items, request, cfg.batch_size, root / f"c{r}"))
            best["traces_only"] = min(best["traces_only"], traces_only(pair, items, request, cfg.batch_size))
            best["collect_uncompressed"] = min(
                best["collect_uncompressed"], collect_seconds(pair, items, request, cfg.batch_size, root / f"u{r}", "none")
            )
    figures.update({f"{k}_seconds": round(v, 3) for k, v in best.items()})
    figures["collection_ratio"] = round(best["collect"] / best["hooks_numpy"], 3)
    # numpy.save does not compress: the uncompressed store is the same work.
    figures["collection_ratio_uncompressed"] = round(best["collect_uncompressed"] / best["hooks_numpy"], 3)
    figures["overlap_ratio"] = round(best["collect"] / best["traces_only"], 3)
    figures["overlap_ratio_uncompressed"] = round(best["collect_uncompressed"] / best["traces_only"], 3)
    figures["collect_tokens_per_s"] = round(tokens / best["collect"], 1)
    figures["hooks_numpy_tokens_per_s"] = round(tokens / best["hooks_numpy"], 1)
    if cfg.memory:
        small = peak_rss_mb(cfg.memory_prompts, cfg.batch_size, cfg.cache_dir, cfg.family)
        large = peak_rss_mb(8 * cfg.memory_prompts, cfg.batch_size, cfg.cache_dir, cfg.family)
        figures.update({"peak_rss_mb_N": round(small, 1), "peak_rss_mb_8N": round(large, 1), "memory_ratio": round(large / small, 3),
                        "memory_N": cfg.memory_prompts})
    if cfg.interventions or cfg.remote or cfg.fit:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            cell_cfg = _cell_cfg(cfg, Path(cfg.cell_store_root) if cfg.cell_store_root else root)
            # The cell both figures read, run (or reused) once.
            result = cell.run(cell_cfg) if cfg.interventions or cfg.fit else None
            if cfg.interventions:
                conditions, prompts, max_new = bc.cell_conditions(cell_cfg, result, cfg.interventions_pairs)
                figures.update(bc.intervention_figures(pair, conditions, prompts, max_new, cfg.repeats))
            if cfg.fit:
                figures.update(fit_figures(result["store"], int(cell_cfg.fit.max_rank), cfg.repeats))
            if cfg.remote:
                figures.update(bc.remote_figures(cfg.family, cfg.cache_dir, root / "remote", cfg.interventions_pairs))
        torch.set_num_threads(cfg.num_threads)  # a routing cell sets its own
    if cfg.localize:
        with tempfile.TemporaryDirectory() as tmp:
            remote_cfg = _localize_cfg(cfg, Path(tmp) / "remote", list(cfg.localize_remote_backend)) if cfg.localize_remote else None
            figures.update(localize_figures(_localize_cfg(cfg, Path(tmp)), cfg.repeats, remote_cfg))
    return figures


def fit_figures(source: str | Path, max_rank: int, repeats: int) -> dict:
    """The fit stage as a cell runs it (its activations read from the cell's store `source`,
    the fit, the group written to a store) against the same fit on activations already in
    memory. The fit does no model work, so its floor is its own arithmetic: the ratio is
    what reading and writing the store add."""
    acts = group_dataset(source, "activations").load()
    fit(acts, max_rank)  # warm-up
    best = {"fit_stage": float("inf"), "fit_compute": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            started = time.perf_counter()
            fit(acts, max_rank)
            best["fit_compute"] = min(best["fit_compute"], time.perf_counter() - started)
            started = time.perf_counter()
            out = RunStore.open(Path(tmp) / f"fit{r}.zarr", StoreSettings(), {"bench": "fit", "repeat": r}, {})
            out.write_group("fit", fit(group_dataset(source, "activations").load(), max_rank))
            best["fit_stage"] = min(best["fit_stage"], time.perf_counter() - started)
            out.finish()
    figures = {f"{k}_seconds": round(v, 3) for k, v in best.items()}
    figures["fit_ratio"] = round(best["fit_stage"] / best["fit_compute"], 3)
    return figures


def _smollm2_cfg(cfg, root: Path, extra: list[str]):
    """SmolLM2's routing cell (experiment=smollm2), its store and table under `root`."""
    return compose_config("routing", ["experiment=smollm2", f"model.cache_dir={cfg.pretrained_cache_dir}", f"store.root={root / 'stores'}",
                                      f"report_dir={root / 'table'}", "progress=false", *extra])


def _cell_cfg(cfg, root: Path):
    """The routing cell the intervention conditions come from: the organism's small one, or
    SmolLM2's (experiment=smollm2), with `cell_overrides`; its store under `root` (reused)."""
    if cfg.pair == "smollm2":
        return _smollm2_cfg(cfg, root, list(cfg.cell_overrides))
    return routing_cfg(cfg.family, cfg.cache_dir, root, cfg.interventions_pairs, list(cfg.cell_overrides))


def _localize_cfg(cfg, root: Path, extra: list[str] = ()):
    """The routing config whose localize stage is benchmarked, with the bench's bounds."""
    bounds = [f"localize.per_head={str(cfg.localize_per_head).lower()}",
              f"localize.max_window={'null' if cfg.localize_max_window is None else cfg.localize_max_window}",
              f"localize.max_prompts={'null' if cfg.localize_max_prompts is None else cfg.localize_max_prompts}", *extra]
    if cfg.pair == "smollm2":
        return _smollm2_cfg(cfg, root, bounds)
    return routing_cfg(cfg.family, cfg.cache_dir, root, 16, bounds)


def write(figures: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    return path
