"""The routing study on one cell, end to end: collect, fit, localize, intervene.

Every stage reads what the earlier ones wrote to the run store and records
itself as done there, so a rerun skips finished stages (and, inside
collect, finished batches), and a complete store is reused as it is.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import xarray as xr
from hydra.utils import instantiate
from omegaconf import OmegaConf

from routing_suite import runs, store_format
from routing_suite.errors import ConfigError
from routing_suite.routing.collect import collect, prompt_items, site_request
from routing_suite.routing.controls import SemanticControl, check_controls
from routing_suite.routing.fit import fit, fit_topics
from routing_suite.routing.intervene import build_conditions, clamp_condition, intervene
from routing_suite.routing.localize import LocalizeSettings, localize
from routing_suite.routing.settings import window_layers
from routing_suite.routing.summary import write_cell
from routing_suite.routing.targets import aligned_means, needs_aligned, needs_step_means, step_means
from routing_suite.routing.window_check import check_window

log = logging.getLogger(__name__)

# The cell's table goes to <run folder>/table unless report_dir says otherwise
# (`runs.report_folder`), with a record of the store it came from (runs.CELL_RECORD).
TABLE_DIR, CELL_RECORD = runs.TABLE_DIR, runs.CELL_RECORD


def check_topics(controls: dict, fit_topics_seen: list[str]) -> None:
    """The semantic control contrasts two topics of the fit split: refuse it before any
    work when the prompt set has fewer."""
    if any(isinstance(c, SemanticControl) for c in controls.values()) and fit_topics(fit_topics_seen) is None:
        found = sorted(set(fit_topics_seen))
        raise ConfigError(
            f"control=semantic needs two topics in the fit split for its content contrast, the prompt set has {found}: "
            "give the pairs a topic (data.prompts) or leave the control out (e.g. control=[random,orthogonal,non_routing,other_layer])"
        )


def never_performed(outcomes, behavior: str) -> str | None:
    """A warning when the baseline never performed the behaviour under either framing: the
    gap is then 0 by construction, which says more about the matcher than the model."""
    baseline = outcomes.performed.sel(condition="baseline")
    if float(baseline.max()) > 0:
        return None
    n = int(baseline.sizes["prompt"])
    return (f"behavior {behavior!r} was never performed by the baseline under either framing (0 of {n} test prompts each): "
            "the gap is 0 by construction; check behavior.performed against the stored completions (outcomes/completion)")


def run(cfg) -> dict:
    """`experiments.routing`: one cell end to end; returns the paths and the table."""
    started = time.perf_counter()
    setup = runs.build_components(cfg)
    spec = instantiate(cfg.intervention)
    controls = {key: instantiate(value) for key, value in cfg.control.items()}
    check_controls(controls)
    localize_settings = LocalizeSettings(**OmegaConf.to_container(cfg.localize, resolve=True))
    request = site_request(cfg)
    if cfg.collect.reduce != "none":
        raise ConfigError(f"collect.reduce={cfg.collect.reduce!r}: the routing cell needs every prompt's activations ('none')")
    if spec.site not in request.sites:
        raise ConfigError(f"intervention.site={spec.site!r} must be among collect.sites={list(request.sites)}")
    known_layers = setup.source.num_layers
    if known_layers is not None:  # an organism's depth is known from its config: check before building it
        request.validate(known_layers)
        spec.check_window(known_layers)
    if spec.window is not None and request.layers is not None and not set(window_layers(spec.window)) <= set(request.layers):
        raise ConfigError(f"intervention.window={list(spec.window)} must lie within collect.layers={list(request.layers)}")
    if spec.window is None and request.layers is not None and sorted(request.layers) != list(range(min(request.layers), max(request.layers) + 1)):
        raise ConfigError(
            f"collect.layers={list(request.layers)} has gaps: the window path patching picks (intervention.window=null) "
            "may span a layer not collected; collect contiguous layers or give intervention.window"
        )
    items = prompt_items(setup)
    check_topics(controls, [it.pair.topic for it in items if it.split == "fit"])
    n_fit = sum(it.split == "fit" for it in items)
    _check_rank(spec.rank, cfg.fit.max_rank, n_fit, setup.source.hidden_size)
    out = runs.report_folder(cfg, "routing")
    pair = runs.load_pair(setup)
    request = request.validate(pair.num_layers)
    spec.check_window(pair.num_layers)
    _check_rank(spec.rank, cfg.fit.max_rank, n_fit, pair.hidden_size)

    store = runs.open_store(setup, pair, spec.name)
    stats = setup.backend.stats
    ran = stages_to_run(store)
    if "collect" in ran:
        stats.stage = "collect"
        collect(pair, items, request, store, setup.backend, progress=cfg.progress)
        store.mark_stage_done("collect")
    acts = store.read("activations").load()
    if "fit" in ran:
        store.write_group("fit", fit(acts, cfg.fit.max_rank))
        store.mark_stage_done("fit")
    fitted = store.read("fit").load()
    targets = ClampTargets(pair, acts, spec, list(request.layers), setup.backend, setup.behavior.max_new_tokens)
    if "localize" in ran:
        stats.stage = "localize"
        localized = localize(pair, acts, setup.behavior, localize_settings, setup.backend)
        if localize_settings.check_windows and spec.window is None:
            stats.stage = "window_check"  # its generations, and the clamp targets they need
            localized = check_window(pair, acts, localized, lambda w: clamp_condition(spec, fitted, acts, w, targets.get()),
                                     setup.behavior, localize_settings, setup.backend, setup.backend.batch_size, cfg.progress)
        store.write_group("localize", localized)
        store.mark_stage_done("localize")
    localized = store.read("localize").load()
    window = list(spec.window) if spec.window is not None else [int(x) for x in localized.attrs["window"]]
    if "intervene" in ran:
        stats.stage = "intervene"
        aligned = targets.get()
        conditions = build_conditions(spec, controls, fitted, acts, window, int(cfg.seed), aligned)
        outcomes = intervene(pair, acts, conditions, setup.behavior, setup.backend, setup.backend.batch_size, cfg.progress)
        if aligned is not None:
            outcomes = xr.merge([outcomes, aligned], combine_attrs="override")
        outcomes.attrs.update(
            {"intervention": spec.name, "controls": [c.name for c in controls.values()], "window": window,
             "site": spec.site, "positions": spec.positions, "rank": spec.rank, "target": spec.target, "mode": spec.mode,
             "bound": spec.bound}
        )
        store.write_group("outcomes", outcomes)
        store.mark_stage_done("intervene")
    warnings = [w for w in [never_performed(store.read("outcomes"), setup.behavior.name)] if w]
    for warning in warnings:
        log.warning(warning)
    final = store.finish()  # a no-op for a complete store but for letting go of its lock
    seconds = time.perf_counter() - started
    log.info("routing cell %s/%s done in %.1f s: %s", pair.cell_name, setup.behavior.name, seconds, final)
    # The routing study's own table code, at the aggregator's defaults but the bootstrap's seed.
    summary = write_cell(final, out, int(cfg.seed))
    record = {"store": str(Path(final).resolve()), "family": pair.cell_name, "behavior": setup.behavior.name,
              "model": setup.model_name, "window": window}
    (out / CELL_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log.info("requests: %s", stats.as_dict())
    reduction = next((r["reduction"]["value"] for r in summary["rows"] if r["kind"] == "intervention"), float("nan"))
    return {"store": str(final), "reduction": reduction, "window": window, "seconds": seconds, "stages_run": ran, "requests": stats.as_dict(),
            "table_dir": str(out), "warnings": warnings, **summary}


class ClampTargets:
    """The per-position (and per-step) clamp targets the intervention needs (None for the
    last-token clamp), computed at most once: the window check and the intervene stage
    both clamp."""

    def __init__(self, pair, acts: xr.Dataset, spec, layers: list[int], backend, max_new_tokens: int) -> None:
        self.args = (pair, acts, spec, layers, backend, max_new_tokens)
        self.done, self.value = False, None

    def get(self) -> xr.Dataset | None:
        if not self.done:
            pair, acts, spec, layers, backend, max_new_tokens = self.args
            if needs_aligned(spec):
                self.value = aligned_means(pair, acts, layers, spec.site, backend, backend.batch_size)
            if needs_step_means(spec):
                self.value = xr.merge([self.value, step_means(pair, acts, layers, spec.site, backend, backend.batch_size, max_new_tokens)])
            self.done = True
        return self.value


def stages_to_run(store) -> list[str]:
    """The stages this run must do, decided once from the store. A store whose
    activations lack prompts its record calls done (a crash, a lost chunk, a store
    poisoned by an older version) collects them again and redoes every stage that
    read them."""
    if not store.complete and store.stage_done("collect") and store.repair("activations"):
        store.undo_stages(store_format.STAGES)
    return [stage for stage in store_format.STAGES if not store.stage_done(stage)]


def _check_rank(rank: int, max_rank: int, n_fit: int, hidden: int | None) -> None:
    """The subspace's rank fits what the fit can give: at most as many directions as
    fit pairs, and as the activations have dimensions (when the model's size is known)."""
    limit = n_fit if hidden is None else min(n_fit, hidden)
    if not rank <= max_rank <= limit:
        size = "" if hidden is None else f" and the hidden size ({hidden})"
        raise ConfigError(
            f"intervention.rank={rank} and fit.max_rank={max_rank} must satisfy rank <= max_rank <= fit pairs ({n_fit}){size}"
        )
