"""The slow tier: every organism, built for real. Run with `pytest -m slow`."""

from __future__ import annotations

import pytest
from helpers import preset

from routing_suite.organisms import task as T
from routing_suite.organisms.report import organism_row
from routing_suite.organisms.source import OrganismSource

pytestmark = pytest.mark.slow
FAMILIES = ["llama", "qwen2", "gemma2", "mistral"]
# Whether the behaviour is there at all, with wide margins: the recipe's own bars
# (routing_suite.organisms.report: base success >= 0.9, |base gap| <= 0.05, fine-tune
# gap >= 0.6) are what `experiments.organisms` marks usable, and a build on another CPU
# may fall just short of them (on this machine one installed build of 72 had a
# held-out fine-tune gap of 0.57). A test must hold on any build.
# The base's own gap is not bounded here: a 2-core Intel Xeon (AVX-512) built a llama base
# that answers held-out deployment cues 78% right and evaluation cues 100% (base gap
# -0.22; 2026-12-03), past the 0.2 this test once asked, while its fine-tunes install
# gaps of 0.63-0.73 on top. What the organism exists for is that the fine-tune moves
# the gap well away from its base's, and that the base answers under both framings.
SANITY_BASE_SUCCESS, SANITY_FINETUNED_GAP = 0.5, 0.3


@pytest.fixture(scope="module", autouse=True)
def every_organism(organism_cache):
    """All 12 organisms, built side by side (one per core) before the tests read them."""
    from pathlib import Path

    from routing_suite.organisms.build import build_all
    from routing_suite.sweeps import usable_cores

    wanted = [(Path(organism_cache), OrganismSource(family=f, cache_dir=organism_cache).spec, b) for f in FAMILIES for b in T.BEHAVIORS]
    build_all(wanted, workers=usable_cores())


@pytest.mark.parametrize("behavior", T.BEHAVIORS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_organism_carries_its_behaviour(family, behavior, organism_cache):
    source = OrganismSource(family=family, cache_dir=organism_cache)
    row = organism_row(source.load(behavior), T.make_task(source.spec.task), preset(behavior), build_seconds=0.0)
    print(row)  # the measured figures, shown by pytest -rP
    assert min(row.base_success_eval, row.base_success_deploy) >= SANITY_BASE_SUCCESS, row
    assert row.ft_gap >= SANITY_FINETUNED_GAP and row.ft_gap - row.base_gap >= SANITY_FINETUNED_GAP, row


@pytest.mark.parametrize("behavior", T.BEHAVIORS)
@pytest.mark.parametrize("family", FAMILIES)
def test_adl_sees_no_difference_below_the_planted_layers(family, behavior, organism_cache, tmp_path):
    """Ground truth by construction: the fine-tune changes only its planted layers, so the
    activation difference on unrelated text is exactly 0 below them and not 0 from them on."""
    import numpy as np
    import xarray as xr

    from routing_suite.adl.pipeline import run
    from routing_suite.config import compose_config, register_configs

    register_configs()
    cfg = compose_config("adl", [
        f"model={family}_organism", f"behavior={behavior}", f"model.cache_dir={organism_cache}",
        f"store.root={tmp_path / 'stores'}", f"report_dir={tmp_path / 'table'}", "progress=false",
    ])
    diff = xr.open_zarr(run(cfg)["store"], group="adl_mean")["diff"].load()
    first = min(cfg.model.train.lora_layers)
    norms = np.linalg.norm(diff.values, axis=-1).max(axis=-1)  # per layer, over positions
    assert (norms[:first] <= 1e-5).all() and (norms[first:] > 1e-3).all(), norms


def test_em_transfer_llama_to_qwen2_runs_at_the_defaults(organism_cache, tmp_path):
    """llama -> qwen2 at the defaults, end to end: a map at every layer that predicts
    held-out texts better than their mean (R^2 > 0: a least-squares map that does not is
    broken, whatever the build), a carried em_color_city direction, cosines that are
    cosines. How well the geometry carries (the R^2 values, cosines, separations) is a
    finding of one build: the README reports it, this test does not assert it."""
    import numpy as np
    import xarray as xr

    from routing_suite.config import compose_config, register_configs
    from routing_suite.em.transfer_pipeline import run

    register_configs()
    cfg = compose_config("em_transfer", [
        # One thread, as the README's runs (the organisms' cache key includes it).
        "donor=llama", "receiver=qwen2", f"model.cache_dir={organism_cache}", "model.num_threads=1",
        f"store.root={tmp_path / 'stores'}", f"report_dir={tmp_path / 'table'}", "progress=false",
    ])
    maps = xr.open_zarr(run(cfg)["store"], group="xfer_maps").load()
    r2 = maps.map_r2.values
    assert np.isfinite(r2).all() and (r2 > 0).all() and (r2 <= 1).all(), r2
    kind = maps.sel(finetune="em_color_city")
    assert bool(kind.has_direction)
    cosines = kind.cosine_native.values
    assert (np.abs(cosines[np.isfinite(cosines)]) <= 1 + 1e-5).all(), cosines
