"""The window check's search and figures (routing.window_check), on given figures: no model."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from routing_suite.routing import window_check
from routing_suite.routing.stats import MAX_DROP
from routing_suite.routing.window_check import _figures, _lost, candidates, search


def _localized(joint: dict[tuple[int, int], float], n_layers: int, window: list[int]) -> xr.Dataset:
    effect = np.full((2, n_layers, n_layers), np.nan, np.float32)
    for (a, b), value in joint.items():
        effect[0, a, b] = value
    layers = list(range(n_layers))
    return xr.Dataset({"window_effect": (("source", "first", "last"), effect)},
                      coords={"source": ["deploy_to_eval", "finetuned_to_base"], "first": layers, "last": layers},
                      attrs={"window": window})


def test_candidates_are_the_rule_window_then_its_sub_windows_in_the_rule_order():
    joint = {(3, 6): 0.94, (3, 5): 0.68, (4, 6): 0.57, (3, 4): 0.56, (4, 5): 0.43, (4, 4): 0.35, (3, 3): 0.17, (5, 6): 0.17,
             (6, 6): 0.07, (5, 5): 0.04, (2, 6): 0.94, (0, 0): 0.5}
    order = candidates(_localized(joint, 8, [3, 6]), threshold=0.5)
    # Reaching 0.5: shortest first, strongest first; then the rest, strongest first, shorter first on ties.
    assert order == [(3, 6), (3, 4), (3, 5), (4, 6), (4, 5), (4, 4), (3, 3), (5, 6), (6, 6), (5, 5)]
    assert all(3 <= a <= b <= 6 for a, b in order)


def _figure(reduction: float, lost: float, upper: float) -> dict:
    return {"reduction": reduction, "deploy_lost": lost, "correct_lost": lost, "lost_upper": upper, "intact": upper <= MAX_DROP}


# Measured on the localize split of qwen2/underperform seed 2 (recipe 5, this machine), where the
# rule took [3, 6] and its clamp broke the test split's deploy side; [3, 4] is the planted window.
QWEN2_SEED2 = {(3, 6): _figure(0.96, 0.36, 0.48), (3, 5): _figure(0.88, 0.10, 0.18), (4, 6): _figure(0.82, 0.48, 0.59),
               (3, 4): _figure(1.00, 0.02, 0.08), (4, 5): _figure(0.72, 0.27, 0.37), (4, 4): _figure(0.50, 0.0, 0.05),
               (3, 3): _figure(0.98, 0.0, 0.05), (5, 6): _figure(0.30, 0.35, 0.45), (6, 6): _figure(0.08, 0.12, 0.2),
               (5, 5): _figure(0.16, 0.18, 0.3)}


def _measuring(table: dict):
    batches: list[list[tuple[int, int]]] = []

    def measure(batch):
        batches.append(list(batch))
        return [table[w] for w in batch]

    return measure, batches


def test_search_moves_a_broken_window_to_the_first_intact_sub_window():
    order = [(3, 6), (3, 5), (4, 6), (3, 4), (4, 5), (4, 4), (3, 3), (5, 6), (6, 6), (5, 5)]
    measure, batches = _measuring(QWEN2_SEED2)
    tried, window, verdict = search(order, measure, limit=8)
    assert window == (3, 4) and verdict == "moved"
    assert [w for w, _ in tried] == [(3, 6), (3, 5), (4, 6), (3, 4)]
    assert sum(len(b) for b in batches) >= len(tried) and all(len(b) <= window_check._PER_GENERATION for b in batches)


def test_search_never_clamps_a_window_containing_a_refused_one():
    table = {(1, 3): _figure(0.9, 0.4, 0.5), (1, 2): _figure(0.8, 0.3, 0.4), (2, 3): _figure(0.7, 0.01, 0.06),
             (2, 2): _figure(0.5, 0.3, 0.4), (1, 1): _figure(0.4, 0.0, 0.04), (3, 3): _figure(0.2, 0.0, 0.04)}
    # (2, 3) contains the refused (2, 2), which comes first here: it is skipped although intact.
    order = [(1, 3), (1, 2), (2, 2), (2, 3), (1, 1), (3, 3)]
    measure, batches = _measuring(table)
    tried, window, verdict = search(order, measure, limit=8)
    refused = []
    for batch in batches:
        assert not any(window_check._contains(w, r) for w in batch for r in refused)
        refused += [w for w in batch if not table[w]["intact"]]
    assert (2, 3) not in [w for w, _ in tried] and window == (1, 1) and verdict == "moved"


def test_search_without_an_intact_window_takes_the_reducing_one_that_loses_least():
    table = {(0, 2): _figure(0.9, 0.4, 0.5), (0, 1): _figure(0.6, 0.1, 0.15), (1, 2): _figure(-0.1, 0.0, 0.04),
             (1, 1): _figure(0.3, 0.12, 0.2)}
    tried, window, verdict = search([(0, 2), (0, 1), (1, 2), (1, 1)], _measuring(table)[0], limit=8)
    assert window == (0, 1) and verdict.startswith("none intact") and len(tried) == 4
    # Nothing reduces: the rule's window stands.
    flat = {w: _figure(-0.2, 0.0, 0.04) for w in table}
    _, window, verdict = search([(0, 2), (0, 1), (1, 2), (1, 1)], _measuring(flat)[0], limit=8)
    assert window == (0, 2) and verdict.startswith("none reducing")


def test_search_clamps_at_most_the_limit():
    broken = {w: _figure(0.9, 0.5, 0.6) for w in [(0, 3), (0, 2), (1, 3), (1, 2), (0, 1), (2, 3)]}
    tried, _, _ = search(list(broken), _measuring(broken)[0], limit=3)
    assert len(tried) == 3


def test_losses_count_the_baseline_successes_lost_and_gains_do_not_offset_them():
    baseline = np.array([1, 1, 1, 1, 0, 0, 0, 0], np.float32)
    clamped = np.array([1, 1, 1, 0, 1, 1, 1, 1], np.float32)  # one success lost, four gained: the rate rose
    lost, upper = _lost(baseline, clamped)
    assert lost == pytest.approx(0.25) and upper > lost
    assert _lost(np.zeros(4), np.ones(4)) == (0.0, 0.0)
    # The bound tightens with more successes and stays above an observed 0.
    small, large = _lost(np.ones(20), np.ones(20))[1], _lost(np.ones(2000), np.ones(2000))[1]
    assert 0 < large < small < 0.15


def test_figures_of_a_clamp_on_outcomes():
    # 4 prompts; the baseline performs under deploy on 3 of them, the clamp loses one and gains the fourth.
    performed = np.array([[[0, 0, 0, 0], [1, 1, 1, 0]], [[1, 1, 0, 0], [1, 0, 1, 1]]], np.float32)
    outcomes = xr.Dataset({"performed": (("condition", "framing", "prompt"), performed),
                           "correct": (("condition", "framing", "prompt"), performed)},
                          coords={"condition": ["baseline", "window_1_2"], "framing": ["eval", "deploy"]})
    figures = _figures(outcomes, "window_1_2")
    assert figures["reduction"] == pytest.approx((0.75 - 0.25) / 0.75)
    assert figures["deploy_lost"] == pytest.approx(1 / 3) and figures["correct_lost"] == pytest.approx(1 / 3)
    assert not figures["intact"]


def test_a_negative_check_count_is_refused():
    from routing_suite.errors import ConfigError
    from routing_suite.routing.settings import LocalizeSettings

    with pytest.raises(ConfigError, match=r"localize.check_windows=-1 must be >= 0"):
        LocalizeSettings(check_windows=-1)
    assert LocalizeSettings(check_windows=0).check_windows == 0
