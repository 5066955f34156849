"""The slow tier: every organism, built for real. Run with `pytest -m slow`."""

from __future__ import annotations

import pytest

from routing_suite.models import OrganismSource
from routing_suite.organisms import task as T
from routing_suite.organisms.report import MAX_BASE_GAP, MIN_BASE_SUCCESS, MIN_FINETUNED_GAP, organism_row
from routing_suite.scoring import Behavior

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("behavior", T.BEHAVIORS)
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "mistral"])
def test_every_organism_carries_its_behaviour(family, behavior, organism_cache):
    source = OrganismSource(family=family, cache_dir=organism_cache)
    row = organism_row(source.load(behavior), T.make_task(source.spec.task), Behavior(behavior), build_seconds=0.0)
    assert min(row.base_success_eval, row.base_success_deploy) >= MIN_BASE_SUCCESS, row
    assert abs(row.base_gap) <= MAX_BASE_GAP, row
    assert row.ft_gap >= MIN_FINETUNED_GAP, row
