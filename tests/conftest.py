"""Shared fixtures: the built-in organism the fast tier is tested against.

The organism (helpers.TEST_ORGANISM, a smaller build of the default recipe) is
built for real (base training + LoRA fine-tune, under a minute on 2 cores) once
per session into a temporary cache.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a 2-core machine shared with
# other jobs, spinning threads make every torch call many times slower. Set
# before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import trained_source  # noqa: E402

from routing_suite.organisms.source import OrganismSource  # noqa: E402

# Tests run single-process on a small machine: keep torch from oversubscribing
# (ROUTING_SUITE_THREADS=1 when something else shares the cores).
torch.set_num_threads(int(os.environ.get("ROUTING_SUITE_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def organism_cache(tmp_path_factory) -> str:
    """A fresh folder, or ROUTING_SUITE_TEST_ORGANISMS to reuse builds across runs (an
    organism is reused only for the same key: recipe, seed, threads, CPU kernels)."""
    return os.environ.get("ROUTING_SUITE_TEST_ORGANISMS") or str(tmp_path_factory.mktemp("organisms"))


@pytest.fixture(scope="session")
def llama_source(organism_cache) -> OrganismSource:
    """The fast tier's trained organism (llama): helpers.TEST_ORGANISM."""
    return trained_source(organism_cache)


@pytest.fixture(scope="session")
def llama_underperform(llama_source):
    """The (base, fine-tuned) pair of the test organism, built for real."""
    return llama_source.load("underperform")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """One cache of tiny organisms (`tiny_source`) for every test that only reads them."""
    return tmp_path_factory.mktemp("tiny-organisms")
