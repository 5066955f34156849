"""What every experiment does before its own stages: build the components
from the config, check them, load the model pair and open the run store."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from routing_suite.collect import LabeledPair
from routing_suite.errors import ConfigError
from routing_suite.models import ModelPair
from routing_suite.provenance import digest, git_commit, package_versions, result_config, scrub_secrets
from routing_suite.scoring import Behavior
from routing_suite.store import RunStore, StoreSettings, store_path
from routing_suite.tracing import SiteRequest

log = logging.getLogger(__name__)


@dataclass
class Setup:
    cfg: DictConfig
    source: Any
    behavior: Behavior
    backend: Any
    store_settings: StoreSettings

    @property
    def model_name(self) -> str:
        return self.source.name


def build_components(cfg: DictConfig) -> Setup:
    """Instantiate and check every component; nothing heavy runs yet."""
    source = instantiate(cfg.model)
    # The source knows how its model answers (first word, or anywhere in a sentence).
    behavior = instantiate(cfg.behavior, answer_match=source.answer_match)
    backend = instantiate(cfg.backend)
    backend.preflight()
    store_settings = StoreSettings(**OmegaConf.to_container(cfg.store, resolve=True))
    torch.manual_seed(cfg.seed)
    return Setup(cfg, source, behavior, backend, store_settings)


def load_pair(setup: Setup) -> ModelPair:
    """The model pair, placed as the backend wants it, checked against the service."""
    pair = setup.source.load(setup.behavior.name, setup.backend.placement)
    setup.backend.check_pair(pair)
    return pair


def site_request(cfg: DictConfig) -> SiteRequest:
    c = cfg.collect
    return SiteRequest(tuple(c.sites), None if c.layers is None else tuple(c.layers), c.positions, c.k)


def prompt_items(setup: Setup) -> list[LabeledPair]:
    """The fit and held-out test prompt pairs, labelled with their split."""
    data = setup.cfg.data
    for key in ("max_fit", "max_test"):
        if data[key] is not None and data[key] < 1:
            raise ConfigError(f"data.{key}={data[key]} must be >= 1 (or null for all)")
    sets = setup.source.prompt_sets(setup.behavior.name, data.max_fit, data.max_test, data.seed)
    for split, pairs in sets.items():
        if not pairs:
            raise ConfigError(f"data: the {split} split is empty")
    return [LabeledPair(p, split) for split, pairs in sets.items() for p in pairs]


def digest_config(cfg: DictConfig) -> dict:
    """The resolved config minus what cannot change a result (`provenance.result_config`)."""
    return result_config(OmegaConf.to_container(cfg, resolve=True))


def open_store(setup: Setup, pair: ModelPair, label: str, experiment: str = "routing") -> RunStore:
    """The run's store, named by content; `experiment` tells the aggregator how to read it."""
    digest_cfg = digest_config(setup.cfg)
    final = store_path(setup.store_settings, setup.model_name, setup.behavior.name, label, digest(digest_cfg))
    provenance = {
        "cell": {"family": pair.cell_name, "behavior": setup.behavior.name, "model": setup.model_name},
        "experiment": experiment,
        "config": scrub_secrets(OmegaConf.to_container(setup.cfg, resolve=True)),
        "versions": package_versions(),
        "model_identity": pair.identity,
        "seed": int(setup.cfg.seed),
        "git_commit": git_commit(),
        "backend": setup.backend.name,
    }
    return RunStore.open(final, setup.store_settings, digest_cfg, provenance)
