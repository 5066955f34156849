"""What every experiment does before its own stages: build the components
from the config, check them, load the model pair and open the run store."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xarray as xr
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from routing_suite import prompt_files
from routing_suite.backends import Backend
from routing_suite.errors import ConfigError
from routing_suite.models import ModelPair
from routing_suite.prompt_files import PromptFile
from routing_suite.provenance import (
    cpu_capability,
    cpu_model,
    digest,
    git_commit,
    input_file_digests,
    kernel_fingerprint,
    package_versions,
    result_config,
    scrub_secrets,
    variant_of,
)
from routing_suite.scoring import Behavior
from routing_suite.store import RunStore
from routing_suite.store_settings import StoreSettings, check_writable, store_path
from routing_suite.tracing import bos_named_not_added

log = logging.getLogger(__name__)

# Tables go here in the run's folder unless report_dir says otherwise; a routing cell
# leaves beside them a record of the store it used (a sweep's aggregation reads it).
TABLE_DIR = "table"
CELL_RECORD = "cell.json"


@dataclass
class Setup:
    cfg: DictConfig
    source: Any
    behavior: Behavior
    backend: Backend
    store_settings: StoreSettings

    @property
    def model_name(self) -> str:
        return self.source.name

    @functools.cached_property
    def prompt_file(self) -> PromptFile | None:
        """`data.prompts`, read, checked and rendered as `data.chat_template` says (once); None when not set."""
        data = self.cfg.data
        if data.prompts is None:
            return None
        prompt_files.check_path(data.prompts)  # before any tokenizer is read
        render = prompt_files.chat_renderer(data.chat_template, self.source.tokenizer, self.model_name)
        return prompt_files.load(data.prompts, render)


def make_behavior(node: DictConfig, source, allowed: str = "behaviors") -> Behavior:
    """The behaviour of a `behavior` config node, for a model source: its name must be
    one the source can be loaded for in this study (`allowed`: the source's attribute
    that lists them, its `behaviors` where it has no such attribute), and the source
    knows how its model answers (first word, or anywhere in a sentence) unless the
    behaviour says."""
    names = getattr(source, allowed, source.behaviors)
    if names is not None and node.name not in names:
        raise ConfigError(f"behavior.name={node.name!r} is not one of {list(names)}")
    return instantiate(node, answer_match=node.answer_match or source.answer_match)


def build_components(cfg: DictConfig, allowed: str = "behaviors") -> Setup:
    """Instantiate and check every component; nothing heavy runs yet (`allowed`: see make_behavior)."""
    source = instantiate(cfg.model)
    behavior = make_behavior(cfg.behavior, source, allowed)
    backend = instantiate(cfg.backend)
    backend.preflight()
    store_settings = StoreSettings(**OmegaConf.to_container(cfg.store, resolve=True))
    torch.manual_seed(cfg.seed)
    return Setup(cfg, source, behavior, backend, store_settings)


def report_folder(cfg: DictConfig, job: str) -> Path:
    """Where a run writes its tables: `report_dir`, else `table/` in the run's folder;
    checked writable before any work (and left as it was)."""
    if cfg.report_dir:
        out = Path(cfg.report_dir)
    else:
        from hydra.core.hydra_config import HydraConfig

        try:
            out = Path(HydraConfig.get().runtime.output_dir) / TABLE_DIR
        except ValueError:  # run() called without Hydra
            out = Path("outputs/runs") / job / TABLE_DIR
    check_writable(out, "report_dir", keep=False)
    return out


def load_pair(setup: Setup) -> ModelPair:
    """The model pair, placed as the backend wants it, checked against the service."""
    pair = setup.source.load(setup.behavior.name, setup.backend.placement)
    setup.backend.check_pair(pair)
    if setup.backend.placement.weights == "local" and setup.backend.device != "cpu":
        pair.to(setup.backend.device)
    return pair


def digest_config(cfg: DictConfig) -> dict:
    """The resolved config minus what cannot change a result (`provenance.result_config`),
    plus the content hash of every input file it names (a prompt file edited in place
    is another prompt set)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    kept = result_config(resolved)
    if files := input_file_digests(resolved):
        kept["input_files"] = files
    return kept


def replicate_of(cfg: DictConfig) -> str:
    """The build a run studies: the organism's seed (model.seed), '' for a model that has none."""
    seed = cfg.model.get("seed") if isinstance(cfg.model, DictConfig) else None
    return "" if seed is None else str(seed)


def cell_of(setup: Setup, cell_name: str, digest_cfg: dict) -> dict:
    """What a store stands for in the tables: the cell (named by the pair: an organism's
    family, or your model's name), the variant of its settings and the build."""
    return {"family": cell_name, "behavior": setup.behavior.name, "model": setup.model_name,
            "variant": variant_of(digest_cfg), "replicate": replicate_of(setup.cfg)}


def store_digest_config(cfg: DictConfig, experiment: str = "routing", first_k_after_unadded_bos: bool = False) -> dict:
    """`digest_config`, and a mark on the stores a fix changed, so that none made before it
    is reused: a run reading the first k tokens of a model whose tokenizer names a BOS it
    does not prepend (those stores counted from the second token), and a routing cell that
    edits the residual stream (before 2026-12-07 its controls were matched to the clamp's
    change on the control's own run's state, not the clamp's: interventions.ResidualCarry).
    Every other store keeps its digest."""
    digest_cfg = digest_config(cfg)
    if first_k_after_unadded_bos:
        digest_cfg["first_k_from"] = "the first token"
    if experiment == "routing" and cfg.get("intervention", {}).get("site") == "resid":
        digest_cfg["resid_controls"] = "matched in the intervention's own run"
    return digest_cfg


def open_store(setup: Setup, pair: ModelPair, label: str, experiment: str = "routing", first_k: bool = False) -> RunStore:
    """The run's store, named by content; `experiment` tells the aggregator how to read it.

    The digest also holds the weights' hashes (when they are here): an organism
    rebuilt on another CPU has other weights and gets a store of its own. A run that
    reads the first k tokens (`first_k`) of a model whose tokenizer names a BOS it does
    not prepend is marked too (`store_digest_config`)."""
    digest_cfg = store_digest_config(setup.cfg, experiment, first_k and bos_named_not_added(pair.tokenizer))
    cell = cell_of(setup, pair.cell_name, digest_cfg)
    weights = {k: v for k, v in pair.identity.items() if k.endswith("sha256")}
    if weights:
        digest_cfg["weights"] = weights
    final = store_path(setup.store_settings, setup.model_name, setup.behavior.name, label, digest(digest_cfg))
    return RunStore.open(final, setup.store_settings, digest_cfg,
                         provenance(setup.cfg, experiment, cell, pair.identity, setup.backend.name))


def provenance(cfg: DictConfig, experiment: str, cell: dict, identity: dict, backend: str, **extra: Any) -> dict:
    """What every study's store records about how it was made (beside its digest): the
    machine's CPU kernels and torch threads (both change trained weights), the config
    without secrets, versions, commit, seed and backend."""
    return {
        "cell": cell,
        "cpu_capability": cpu_capability(),
        "cpu_model": cpu_model(),
        "kernel_fingerprint": kernel_fingerprint(torch.get_num_threads()),
        "torch_threads": torch.get_num_threads(),
        "experiment": experiment,
        "config": scrub_secrets(OmegaConf.to_container(cfg, resolve=True)),
        "versions": package_versions(),
        "model_identity": identity,
        "seed": int(cfg.seed),
        "git_commit": git_commit(),
        "backend": backend,
        **extra,
    }


def run_stage(store: RunStore, name: str, compute: Callable[[], xr.Dataset]) -> xr.Dataset:
    """A small group computed once: `compute()` written as group `name` unless the store
    has done that stage already; the group as stored, loaded."""
    if not store.stage_done(name):
        store.write_group(name, compute())
        store.mark_stage_done(name)
    return store.read(name).load()
