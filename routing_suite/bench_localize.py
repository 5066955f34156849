"""Benchmark figures for the localize stage: exact patching against attribution.

Both run in this process on the same activations (the localize split of the
benchmark's routing config, collected once into a temporary store), with the
same prompts, the same rule and the same bounds, so the ratio of their seconds
is the cost of the method alone. Beside them, the floor of exact patching:
plain PyTorch forwards of the same prompts, one per patch set, with a forward
hook writing the same values (the model work exact patching cannot avoid).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from scipy.stats import spearmanr

from routing_suite import runs
from routing_suite.backends import LocalBackend
from routing_suite.families import site_path
from routing_suite.generation import encode
from routing_suite.models import ModelPair
from routing_suite.remote import RequestStats
from routing_suite.routing.collect import collect, prompt_items, site_request
from routing_suite.routing.localize import SOURCES, localize, localize_prompts, windows
from routing_suite.routing.settings import LocalizeSettings
from routing_suite.store import RunStore
from routing_suite.store_settings import StoreSettings


def _activations(cfg, pair: ModelPair, setup, root: Path):
    """The localize split's activations (attn and heads at every layer), collected once."""
    items = [item for item in prompt_items(setup) if item.split == "localize"]
    request = replace(site_request(cfg), sites=("attn", "heads")).validate(pair.num_layers)
    store = RunStore.open(root / "localize.zarr", StoreSettings(), {"bench": "localize"}, {})
    collect(pair, items, request, store, LocalBackend(batch_size=cfg.localize.batch_size), progress=False)
    return store.read("activations").load()


def exact_floor_seconds(pair: ModelPair, acts, settings: LocalizeSettings) -> tuple[float, int]:
    """Plain forwards of the fine-tune on the eval prompts, one per layer window of the
    exact method's deploy_to_eval source (and per head when it patches heads), each with
    a hook writing the deploy values at the last token; the same for the base. Seconds,
    and the number of patch sets per source."""
    test = localize_prompts(acts, settings)
    layers = [int(x) for x in acts.layer.values]
    spans = windows(layers, settings.max_window)
    heads = range(pair.num_heads) if settings.per_head else range(0)
    sets = [list(range(a, b + 1)) for a, b in spans] + [[layer] for layer in layers for _ in heads]
    donor = torch.from_numpy(np.ascontiguousarray(test["attn"].sel(model="finetuned", framing="deploy", position="last").values))
    prompts = [str(p) for p in test.eval_prompt.values]
    started = time.perf_counter()
    for which in ("finetuned", "base"):
        model = pair.model(which)
        modules = dict(model.named_modules())
        for patch in sets:
            handles = [modules[site_path(pair.family, "attn", layer)].register_forward_hook(_writer(donor[:, layer])) for layer in patch]
            try:
                for start in range(0, len(prompts), settings.batch_size):
                    batch = encode(pair.tokenizer, prompts[start : start + settings.batch_size])
                    with torch.no_grad():
                        model(**batch)
            finally:
                for handle in handles:
                    handle.remove()
    return time.perf_counter() - started, len(sets)


def _writer(values: torch.Tensor):
    def hook(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        x[:, -1] = values[: x.shape[0]].to(x.dtype)

    return hook


def method_settings(cfg) -> dict[str, LocalizeSettings]:
    """The config's localize settings as each method: exact patches heads only with
    `localize.per_head`; attribution estimates every head at no extra pass, always."""
    exact = replace(LocalizeSettings(**OmegaConf.to_container(cfg.localize, resolve=True)), method="exact")
    return {"exact": exact, "attribution": replace(exact, method="attribution", per_head=True)}


def request_counts(remote_cfg, acts) -> dict:
    """Requests and bytes sent back by localize with each method through the remote path
    (`remote_cfg`: the same routing config with a remote backend, e.g. nnsight's in-process
    serialization, `backend=ndif backend.simulate=true`), on the same activations; and the
    bytes the requests carried up (the serialized traces: 0 in the simulation, which sends
    nothing)."""
    setup = runs.build_components(remote_cfg)
    pair = runs.load_pair(setup)
    figures = {}
    for name, settings in method_settings(remote_cfg).items():
        setup.backend.stats = RequestStats()
        localize(pair, acts, setup.behavior, settings, setup.backend)
        figures[f"localize_remote_{name}_requests"] = setup.backend.stats.requests
        figures[f"localize_remote_{name}_bytes_down"] = setup.backend.stats.bytes_down
        figures[f"localize_remote_{name}_bytes_up"] = setup.backend.stats.bytes_up
    return figures


def localize_figures(cfg, repeats: int, remote_cfg=None) -> dict:
    """Seconds of localize with each method (best of `repeats`), their ratio, the
    windows they chose and the exact method's floor. Exact patching patches heads
    only with `localize.per_head`; attribution always estimates every head."""
    setup = runs.build_components(cfg)
    pair = runs.load_pair(setup)
    methods = method_settings(cfg)
    exact = methods["exact"]
    backend = LocalBackend(batch_size=exact.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        acts = _activations(cfg, pair, setup, Path(tmp))
    remote = request_counts(remote_cfg, acts) if remote_cfg is not None else {}
    best, found = {}, {}
    for _ in range(repeats):
        for name, settings in methods.items():
            started = time.perf_counter()
            found[name] = localize(pair, acts, setup.behavior, settings, backend)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
        floor, n_sets = exact_floor_seconds(pair, acts, exact)
        best["floor"] = min(best.get("floor", float("inf")), floor)
    return {
        "localize_layers": pair.num_layers,
        "localize_heads": pair.num_heads,
        "localize_exact_per_head": exact.per_head,
        "localize_prompts": int(found["exact"].attrs["n_prompts"]),
        "localize_max_window": str(exact.max_window),
        "localize_exact_patch_sets_per_source": n_sets,
        "localize_exact_seconds": round(best["exact"], 3),
        "localize_attribution_seconds": round(best["attribution"], 3),
        "localize_exact_floor_seconds": round(best["floor"], 3),
        "localize_speedup": round(best["exact"] / best["attribution"], 2),
        "localize_exact_floor_ratio": round(best["exact"] / best["floor"], 3),
        "localize_exact_window": str(list(found["exact"].attrs["window"])),
        "localize_attribution_window": str(list(found["attribution"].attrs["window"])),
        "localize_attribution_confirmed": len(found["attribution"].attrs["confirmed"]),
        **{f"localize_spearman_{source}": round(float(spearmanr(*(found[m].layer_effect.sel(source=source).values
                                                                 for m in ("exact", "attribution"))).statistic), 3)
           for source in SOURCES},
        **remote,
    }
