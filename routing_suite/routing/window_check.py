"""The window check: the intervention tried on the localize split before its window is taken.

Path patching says which windows carry the framing to the last token; it
cannot say whether clamping a window's routing subspace leaves the task
intact. Above the planted layers the attention that carries the planted
signal onward also carries the answer: the cumulative rule grew the window
to [3, 6] in a qwen2/underperform build (planted [3, 4]) and the clamp there
broke the deploy side (deploy rate -0.31), where the planted window reduced
the gap by 101% with the task intact.

So, with `localize.check_windows` > 0, the localize stage tries the
intervention itself on the localize split (its own prompts, cues and
entities: the test split the clamp is scored on is never seen). The order:
the rule's window, then its sub-windows in the cumulative rule's order (those
whose joint patch reaches the threshold shortest first, then the rest
strongest first); a window that contains one whose clamp already broke the
task is skipped (clamping more of the same layers does not repair it). The
first window whose clamp reduces the gap (point estimate above 0) with the
task intact becomes the window; at most `check_windows` are clamped. When
none is intact, the reducing window that loses least is taken; when none
reduces, the rule's window stands (attribute `check` says which).

Intact, here, is counted in losses, not in rates: the fraction of the
baseline's successes (deploy prompts that performed the deploy behaviour;
prompts of either framing answered correctly) that the clamp loses, the
upper end of each one's one-sided 95% Wilson interval within MAX_DROP. A
fall in the deploy rate nets losses against gains: on a localize split whose
held-out cues put the baseline's deploy rate at 0.80, a clamp that pushed
weak deploy prompts into the deploy mode hid the ones it broke
(qwen2/underperform seed 2, [3, 5], in a diagnostic run that clamped each of
the build's 36 windows on both splits: deploy rate +0.03 on the localize
split, 0.16 of its successes lost; on the test split its deploy rate fell by
0.16). Over the 36 windows, a deploy loss
above MAX_DROP on the localize split marked all 31 windows whose clamp broke
the test split and none of the 5 that kept it intact; the fall in the deploy
rate marked 20 of the 31. The interval's margin is for the split's size (64
prompts in the organisms).

The tries are stored in the localize group (`check_*` variables over
`candidate`), with the rule's own window (`rule_window`), so a reader sees
which windows were refused and why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import xarray as xr

from routing_suite import store_format
from routing_suite.interventions import Condition
from routing_suite.models import ModelPair
from routing_suite.routing.intervene import intervene
from routing_suite.routing.localize import SOURCES, preference_order
from routing_suite.routing.settings import LocalizeSettings
from routing_suite.routing.stats import MAX_DROP
from routing_suite.scoring import Behavior

log = logging.getLogger(__name__)

# Windows clamped per batched generation (each is an invoke of it).
_PER_GENERATION = 4
# A window passes when the upper end of a one-sided 95% (Wilson) interval of each loss is
# within MAX_DROP: a localize split of 64 prompts is small, and point losses of 0.08 and
# 0.10 passed a qwen2 window ([3, 5], seed 2) whose clamp cut the test split's deploy rate by 0.16.
_Z = 1.645


def candidates(localized: xr.Dataset, threshold: float) -> list[tuple[int, int]]:
    """The rule's window, then its sub-windows in the cumulative rule's order, by their
    exact joint effect (deploy_to_eval), or the estimate where only that exists."""
    rule_window = tuple(int(x) for x in localized.attrs["window"])
    exact = localized.window_effect.sel(source=SOURCES[0])
    estimate = localized.window_estimate.sel(source=SOURCES[0]) if "window_estimate" in localized else None
    effects = {}
    for a in range(rule_window[0], rule_window[1] + 1):
        for b in range(a, rule_window[1] + 1):
            value = float(exact.sel(first=a, last=b))
            if not np.isfinite(value) and estimate is not None:
                value = float(estimate.sel(first=a, last=b))
            if np.isfinite(value) and (a, b) != rule_window:
                effects[(a, b)] = value
    return [rule_window] + preference_order(effects, threshold)


def _contains(outer: tuple[int, int], inner: tuple[int, int]) -> bool:
    return outer[0] <= inner[0] and inner[1] <= outer[1]


def _lost(baseline: np.ndarray, clamped: np.ndarray) -> tuple[float, float]:
    """The fraction of the baseline's successes (per-prompt outcomes above 0.5) the clamp
    loses, and its Wilson upper bound (0, 0 when the baseline has none)."""
    won = baseline > 0.5
    if not won.any():
        return 0.0, 0.0
    p, n, z2 = float((1 - clamped[won]).mean()), int(won.sum()), _Z**2
    upper = (p + z2 / (2 * n) + _Z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))) / (1 + z2 / n)
    return p, float(upper)


def _figures(outcomes: xr.Dataset, name: str) -> dict:
    """The condition's reduction (means over the localize prompts) and the baseline's successes it loses."""
    performed = outcomes.performed.mean("prompt")
    gap = lambda c: float(performed.sel(condition=c, framing="deploy") - performed.sel(condition=c, framing="eval"))  # noqa: E731
    base_gap = gap(store_format.BASELINE)
    reduction = (base_gap - gap(name)) / base_gap if abs(base_gap) > 1e-9 else float("nan")
    deploy = outcomes.performed.sel(framing="deploy")
    deploy_lost = _lost(deploy.sel(condition=store_format.BASELINE).values, deploy.sel(condition=name).values)
    correct = outcomes.correct
    correct_lost = _lost(correct.sel(condition=store_format.BASELINE).values.ravel(), correct.sel(condition=name).values.ravel())
    return {"reduction": reduction, "deploy_lost": deploy_lost[0], "correct_lost": correct_lost[0],
            "lost_upper": max(deploy_lost[1], correct_lost[1]), "intact": bool(max(deploy_lost[1], correct_lost[1]) <= MAX_DROP)}


def check_window(
    pair: ModelPair, acts: xr.Dataset, localized: xr.Dataset, clamp: Callable[[list[int]], Condition], behavior: Behavior,
    settings: LocalizeSettings, backend, batch_size: int, progress: bool = False,
) -> xr.Dataset:
    """`localized` with the window the check takes (attrs `window`, `rule_window`, `check`)
    and its tries (`check_*` over `candidate`). `clamp(window)` builds the intervention's
    condition at that window."""
    # Every localize prompt (not localize.max_prompts, which bounds patching's cost): the
    # check decides on losses, and a handful of prompts can never show one to be small.
    prompts = acts.sel(prompt=acts.split.values == "localize")
    baseline = Condition(store_format.BASELINE, "baseline")

    def measure(batch: list[tuple[int, int]]) -> list[dict]:
        conditions = [baseline] + [_named(clamp(list(w)), w) for w in batch]
        outcomes = intervene(pair, prompts, conditions, behavior, backend, batch_size, progress, split="localize")
        return [_figures(outcomes, _name(w)) for w in batch]

    rule_window = tuple(int(x) for x in localized.attrs["window"])
    tried, window, verdict = search(candidates(localized, settings.threshold), measure, settings.check_windows)
    if window != rule_window:
        log.info("window check: window %s instead of the rule's %s (%s)", list(window), list(rule_window), verdict)
    checked = localized.assign(
        check_first=("candidate", np.array([w[0] for w, _ in tried], np.int64)),
        check_last=("candidate", np.array([w[1] for w, _ in tried], np.int64)),
        **{f"check_{key}": ("candidate", np.array([f[key] for _, f in tried], dtype)) for key, dtype in
           (("reduction", np.float32), ("deploy_lost", np.float32), ("correct_lost", np.float32), ("lost_upper", np.float32),
            ("intact", bool))},
    )
    checked.attrs.update({"window": list(window), "rule_window": list(rule_window), "check": verdict,
                          "check_prompts": int(prompts.sizes["prompt"])})
    return checked


def search(
    order: list[tuple[int, int]], measure: Callable[[list[tuple[int, int]]], list[dict]], limit: int,
) -> tuple[list[tuple[tuple[int, int], dict]], tuple[int, int], str]:
    """The tries (window, figures) in order, the window taken and the verdict. `order[0]`
    is the rule's window; `measure(windows)` clamps them in one generation and gives
    their figures (`_figures`)."""
    tried: list[tuple[tuple[int, int], dict]] = []
    while len(tried) < limit:
        refused = [w for w, f in tried if not f["intact"]]
        queue = [w for w in order if w not in dict(tried) and not any(_contains(w, r) for r in refused)]
        batch = _batch(queue, min(_PER_GENERATION, limit - len(tried)))
        if not batch:
            break
        for w, figures in zip(batch, measure(batch)):
            tried.append((w, figures))
            log.info("window check %s on the localize split: reduction %.2f; loses %.2f of the baseline's deploy successes, "
                     "%.2f of its correct answers (upper bound %.2f)%s", list(w), figures["reduction"], figures["deploy_lost"],
                     figures["correct_lost"], figures["lost_upper"], "" if figures["intact"] else ": refused")
            if figures["intact"] and figures["reduction"] > 0:  # the batch's later windows shared its generation: not tries
                return tried, w, "kept" if w == order[0] else "moved"
    reducing = [(f["lost_upper"], i) for i, (_, f) in enumerate(tried) if f["reduction"] > 0]
    if reducing:
        chosen = tried[min(reducing)[1]][0]
        log.warning("window check: no window of the %d tried reduced the gap on the localize split with its losses surely "
                    "within %.2f; taking %s, the one that loses least", len(tried), MAX_DROP, list(chosen))
        return tried, chosen, "none intact: the reducing window that loses least"
    log.warning("window check: no window of the %d tried reduced the gap on the localize split; keeping the rule's window %s",
                len(tried), list(order[0]))
    return tried, order[0], "none reducing: the rule's window stands"


def _batch(queue: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The queue's next windows to clamp in one generation: at most `size`, ending before
    the first that contains an earlier one (whether it is tried depends on that one's verdict)."""
    batch: list[tuple[int, int]] = []
    for w in queue[:size]:
        if any(_contains(w, earlier) for earlier in batch):
            break
        batch.append(w)
    return batch


def _name(window: tuple[int, int]) -> str:
    return f"window_{window[0]}_{window[1]}"


def _named(condition: Condition, window: tuple[int, int]) -> Condition:
    return replace(condition, name=_name(window))
