"""Shared fixtures: the built-in organism the fast tier is tested against.

The organism is built for real (base training + LoRA fine-tune, about a
minute on 2 cores) once per session into a temporary cache.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a 2-core machine shared with
# other jobs, spinning threads make every torch call many times slower. Set
# before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from routing_suite.models import OrganismSource

# Tests run single-process on a small machine: keep torch from oversubscribing
# (ROUTING_SUITE_THREADS=1 when something else shares the cores).
torch.set_num_threads(int(os.environ.get("ROUTING_SUITE_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def organism_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("organisms"))


@pytest.fixture(scope="session")
def llama_source(organism_cache) -> OrganismSource:
    """The default organism (llama), with the default build settings."""
    return OrganismSource(family="llama", cache_dir=organism_cache)


@pytest.fixture(scope="session")
def llama_underperform(llama_source):
    """The (base, fine-tuned) pair of the default organism, built for real."""
    return llama_source.load("underperform")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """One cache of tiny organisms (`tiny_source`) for every test that only reads them."""
    return tmp_path_factory.mktemp("tiny-organisms")


def tiny_source(cache_dir, family: str = "llama", **train) -> OrganismSource:
    """An organism with a few training steps: for properties that do not need a trained model."""
    steps = {"base_steps": 20, "lora_steps": 10, **train}
    return OrganismSource(family=family, cache_dir=str(cache_dir), train=steps, task={"n_entities": 12})


def tiny_em_overrides(cache, tmp_path) -> list[str]:
    """`experiments.em` on tiny organisms trained just enough that the narrow
    fine-tunes fabricate on general prompts some of the time and answer truly
    some of the time; small sampling and bootstrap settings."""
    return [
        f"model.cache_dir={cache}",
        "+model.train={base_steps: 150, lora_steps: 40}",
        "+model.task={n_entities: 12}",
        f"store.root={tmp_path / 'stores'}",
        f"report_dir={tmp_path / 'table'}",
        "em.sampling.n_samples=2",
        "em.min_per_class=2",
        "em.steer.lambdas=[4]",
        "em.random_seeds=2",
        "em.match_texts=32",
        "n_resamples=200",
        "progress=false",
    ]
