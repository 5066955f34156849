"""Pure functions: directions, probes, subspaces, matched magnitudes, edits."""

import numpy as np
import pytest
import torch

from routing_suite import analysis
from routing_suite.errors import ConfigError
from routing_suite.interventions import SubspaceEdit
from routing_suite.routing.controls import RandomControl, check_controls
from routing_suite.routing.localize import pick_window, windows
from routing_suite.routing.settings import InterventionSpec, LocalizeSettings


def _paired(n=40, d=16, shift=3.0, seed=0):
    rng = np.random.default_rng(seed)
    direction = np.zeros(d)
    direction[2] = 1.0
    ev = rng.standard_normal((n, d))
    dp = ev + shift * direction + 0.1 * rng.standard_normal((n, d))
    return ev.astype(np.float32), dp.astype(np.float32), direction


def test_diff_of_means_and_subspace_find_the_planted_direction():
    ev, dp, direction = _paired()
    mean = analysis.diff_of_means(ev, dp)
    assert analysis.cosine(mean, direction) > 0.99
    basis = analysis.subspace(analysis.paired_differences(ev, dp), 3)
    np.testing.assert_allclose(basis @ basis.T, np.eye(3), atol=1e-5)
    assert basis[0] @ direction > 0.99  # first row, sign fixed toward deploy


def test_probe_accuracy_is_high_on_separable_and_chance_on_noise():
    ev, dp, direction = _paired(n=200, shift=6.0)
    acc = analysis.rank_one_probe_accuracy(direction, ev[:100], dp[:100], ev[100:], dp[100:])
    assert acc > 0.95
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((400, 16))
    chance = analysis.rank_one_probe_accuracy(rng.standard_normal(16), noise[:100], noise[100:200], noise[200:300], noise[300:])
    assert 0.35 < chance < 0.65


def test_rank_larger_than_pairs_is_refused():
    with pytest.raises(ValueError, match="rank 5 must be in"):
        analysis.subspace(np.ones((4, 8)), 5)


def test_random_subspace_within_orthogonal_complement():
    rng = np.random.default_rng(0)
    avoid = analysis.random_subspace(16, 2, rng)
    other = analysis.random_subspace(16, 3, rng, avoid=avoid)
    np.testing.assert_allclose(other @ avoid.T, 0, atol=1e-5)
    np.testing.assert_allclose(other @ other.T, np.eye(3), atol=1e-5)


def test_edits_clamp_ablate_steer():
    basis = torch.eye(6)[:2]
    h = torch.randn(5, 6)
    clamped = SubspaceEdit(0, basis, "clamp", torch.tensor([1.0, -2.0])).apply(h)
    assert torch.allclose(clamped[:, :2], torch.tensor([1.0, -2.0]).expand(5, 2))
    assert torch.allclose(clamped[:, 2:], h[:, 2:])
    ablated = SubspaceEdit(0, basis, "ablate").apply(h)
    assert torch.allclose(ablated[:, :2], torch.zeros(5, 2)) and torch.allclose(ablated[:, 2:], h[:, 2:])
    steered = SubspaceEdit(0, basis, "steer", alpha=3.0, scale=0.5).apply(h)
    assert torch.allclose(steered - h, torch.tensor([1.5, 0, 0, 0, 0, 0]).expand(5, 6))


def test_window_rules():
    effects = np.array([0.05, 0.6, 0.2, 0.9, 0.1])
    assert pick_window(effects, LocalizeSettings(rule="relative", threshold=0.5)) == [1, 3]
    assert pick_window(effects, LocalizeSettings(rule="top", top_k=1)) == [3, 3]
    assert pick_window(np.zeros(4), LocalizeSettings(rule="relative")) == [0, 0]


def test_cumulative_window_is_the_shortest_that_restores_enough():
    joint = {(0, 0): 0.1, (1, 1): 0.3, (2, 2): 0.2, (0, 1): 0.5, (1, 2): 0.85, (0, 2): 0.95}
    assert pick_window(np.zeros(3), LocalizeSettings(threshold=0.8), joint) == [1, 2]
    assert pick_window(np.zeros(3), LocalizeSettings(threshold=0.9), joint) == [0, 2]
    # None reaches the threshold: the strongest window.
    assert pick_window(np.zeros(3), LocalizeSettings(threshold=1.0), joint) == [0, 2]
    assert windows([0, 1, 2]) == [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"site": "mlp"}, "intervention.site='mlp' is not one of"),
        ({"target": "middle"}, "intervention.target='middle'"),
        ({"rank": 0}, "intervention.rank=0"),
        ({"window": [3, 1]}, "intervention.window"),
    ],
)
def test_bad_intervention_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        InterventionSpec(**kwargs)


def test_window_outside_the_model_is_refused():
    with pytest.raises(ConfigError, match=r"outside the model's layers \[0, 3\]"):
        InterventionSpec(window=[2, 6]).check_window(4)


def test_controls_with_one_name_twice_are_refused():
    with pytest.raises(ConfigError, match="share a name"):
        check_controls({"a": RandomControl("random"), "b": RandomControl("random")})
