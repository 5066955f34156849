"""A control drawn at random several times keeps its draws (em_outcomes.misaligned_by_draw):
the bootstrap resamples them with the prompts, and a table says how many move EM alone."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from routing_suite.em.stats import Bootstrap, draws_moving, per_prompt, reduction_text


def test_identical_draws_give_the_prompt_bootstrap_exactly():
    boot = Bootstrap(400, 0, 0.95)
    x = np.random.default_rng(1).random(30)
    base = np.random.default_rng(2).random(30) + 0.5
    for one, drawn in ((boot.rate(x), boot.rate(np.stack([x] * 3))),
                       (boot.reduction(x, base), boot.reduction(np.stack([x] * 3), base)),
                       (boot.difference(x, base), boot.difference(np.stack([x] * 3), base))):
        assert drawn.value == pytest.approx(one.value) and drawn.lo == pytest.approx(one.lo) and drawn.hi == pytest.approx(one.hi)


def test_the_draws_are_resampled_with_the_prompts():
    boot = Bootstrap(400, 0, 0.95)
    two = np.stack([np.zeros(25), np.ones(25)])  # one draw never misaligned, the other always
    rate = boot.rate(two)
    # resampled pairs of draws: both the first (0), one of each (0.5) or both the second (1)
    assert rate.value == 0.5 and rate.lo == 0 and rate.hi == 1
    assert boot.rate(two.mean(0)).lo == 0.5  # averaged first, the draws' disagreement is gone


def test_prompts_are_kept_where_every_draw_has_them():
    boot = Bootstrap(200, 0, 0.95)
    x = np.array([[0.0, 1.0, np.nan, 1.0], [0.0, 1.0, 0.0, 1.0]])
    assert boot.rate(x).value == pytest.approx(2 / 3)  # prompt 2 left out: one draw has no answer there
    assert np.isnan(boot.rate(np.full((2, 3), np.nan)).value)


def test_draws_moving_counts_the_draws_whose_own_interval_leaves_zero():
    boot = Bootstrap(400, 0, 0.95)
    base = np.tile([1.0, 0.0], 20)
    drawn = np.stack([base, np.zeros(40), base])  # only the second draw removes the EM
    assert draws_moving(boot, drawn, base) == (1, 3)
    assert draws_moving(boot, base, base) == (0, 0)  # a single direction has no draws to count
    assert reduction_text(boot.reduction(drawn, base), 1, 3).endswith("; 1 of 3 draws move it")
    assert reduction_text(None, 0, 0) == "–"


def test_per_prompt_takes_a_controls_draws_where_the_store_keeps_them():
    rng = np.random.default_rng(0)
    by_draw = rng.random((2, 3, 4, 2)).astype(np.float32)
    by_draw[0, 1:] = np.nan  # the intervention has one run: draws past it are empty
    outcomes = xr.Dataset(
        {"misaligned": (("condition", "prompt", "sample"), np.nanmean(by_draw, 1)),
         "misaligned_by_draw": (("condition", "draw", "prompt", "sample"), by_draw),
         "n_seeds": (("condition",), np.array([1, 3], np.int32))},
        coords={"condition": ["ft/ablate/own", "ft/ablate/own/random"]},
    )
    got = per_prompt(outcomes, "misaligned")
    assert got["ft/ablate/own"].shape == (4,) and got["ft/ablate/own/random"].shape == (3, 4)
    np.testing.assert_allclose(got["ft/ablate/own/random"], by_draw[1].mean(-1))
    old = per_prompt(outcomes.drop_vars("misaligned_by_draw"), "misaligned")  # a store before em_code 13
    assert old["ft/ablate/own/random"].shape == (4,)
