"""Settings of the routing stages, as plain dataclasses (no torch), used as config schemas."""

from __future__ import annotations

import re
from dataclasses import dataclass

from routing_suite.errors import ConfigError

MODES = ("clamp", "ablate", "steer")
SITES = ("resid", "attn")
POSITIONS = ("last", "all", "aligned")
# At which generation steps edits apply: every step, or only the prompt's forward pass.
STEPS = ("all", "prompt")
CLAMP_TARGETS = ("eval_mean", "deploy_mean", "pooled_mean")
# "two_sided": every coordinate set to the target; "one_sided": only the coordinates
# on the other framing's side of it (the target of one framing's mean: the other
# framing's mean at the same position says which side that is).
BOUNDS = ("two_sided", "one_sided")
RULES = ("cumulative", "relative", "top")
METHODS = ("exact", "attribution")
# An intervention's name is part of its store's file name (file names end at 255 bytes).
MAX_NAME = 64
_NAME = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_NAME}}}")


def window_layers(window) -> list[int]:
    """Every layer of a [first_layer, last_layer] window; [] for none (an empty or unset window)."""
    return list(range(window[0], window[1] + 1)) if window is not None and len(window) == 2 else []


@dataclass
class InterventionSpec:
    """The `intervention` config: what to do to which site, where, with what subspace."""

    name: str = "clamp"
    mode: str = "clamp"
    site: str = "attn"
    # "aligned": every prompt position, a clamp's target being the fit prompts' mean
    # at the same position counted from the prompt's end (routing_suite.routing.targets);
    # "all": every prompt position, clamped to the last token's mean (later layers
    # read the cue positions too); "last": the last prompt token only.
    positions: str = "aligned"
    rank: int = 2
    window: list[int] | None = None  # null: the window path patching picks
    target: str = "deploy_mean"
    alpha: float = 1.0
    # "all": edit the prompt's forward pass and each newly generated token;
    # "prompt": the prompt's pass only, whose states every later step reads from
    # the cache. With positions="aligned" the k-th generated token is clamped to
    # the fit completions' mean at their k-th token, where both framings'
    # completions still run (routing_suite.routing.targets.step_means); with
    # "prompt" a refusal fine-tune clamped to answer went back to refusing at its
    # second token ("yellow , i can not help"). With positions "all" or "last" a
    # generated token gets the last prompt token's target (installed fine-tunes
    # looped on their marker: use steps=prompt there).
    steps: str = "all"
    # A clamp's bound (BOUNDS). One-sided leaves an activation that already reads
    # as the target framing as it is (its variation in the subspace kept).
    bound: str = "two_sided"
    # Subspaces are fit on this model's paired differences.
    fit_model: str = "finetuned"

    def __post_init__(self) -> None:
        checks = [
            ("mode", self.mode, MODES),
            ("site", self.site, SITES),
            ("positions", self.positions, POSITIONS),
            ("steps", self.steps, STEPS),
            ("target", self.target, CLAMP_TARGETS),
            ("bound", self.bound, BOUNDS),
            ("fit_model", self.fit_model, ("base", "finetuned")),
        ]
        for key, value, allowed in checks:
            if value not in allowed:
                raise ConfigError(f"intervention.{key}={value!r} is not one of {list(allowed)}")
        if not _NAME.fullmatch(self.name):
            shown = self.name if len(self.name) <= 40 else f"{self.name[:40]}... ({len(self.name)} characters)"
            raise ConfigError(
                f"intervention.name={shown!r} must be 1 to {MAX_NAME} letters, digits, '_', '-' or '.' (it names the store's file)"
            )
        if self.rank < 1:
            raise ConfigError(f"intervention.rank={self.rank} must be >= 1")
        if self.bound == "one_sided" and (self.mode != "clamp" or self.target == "pooled_mean"):
            raise ConfigError(
                f"intervention.bound=one_sided needs mode=clamp and a framing's mean as target "
                f"(got mode={self.mode!r}, target={self.target!r}): the other framing's mean decides the side"
            )
        if self.window is not None and (len(self.window) != 2 or self.window[0] > self.window[1]):
            raise ConfigError(f"intervention.window={list(self.window)} must be [first_layer, last_layer]")

    def check_window(self, num_layers: int) -> None:
        if self.window is not None and not (0 <= self.window[0] and self.window[1] < num_layers):
            raise ConfigError(f"intervention.window={list(self.window)} is outside the model's layers [0, {num_layers - 1}]")


@dataclass
class LocalizeSettings:
    """How the window is picked from the `deploy_to_eval` patching effects.

    `cumulative` (default): the shortest contiguous window whose joint patch
    (every layer of it at once) restores at least `threshold` of the gap, the
    strongest among equally short ones, or the strongest window of all when
    none reaches it; `relative`: every layer whose own effect is at least
    `threshold` x the largest, and the layers between; `top`: the `top_k`
    strongest single layers and those between. Single-layer effects alone
    mislead when routing is spread over layers (a Gemma2 organism restored
    at most 30% from any one layer).

    `check_windows` (default 8; 0: off): before the window is taken, the
    intervention is tried on the localize split (`routing.window_check`): the
    rule's window, then its sub-windows, up to this many clamped; the first
    whose clamp reduces the gap there without losing more than stats.MAX_DROP
    of the baseline's successes becomes the window. Path patching alone let
    the window grow above the planted layers into ones whose clamp broke the
    deploy side (qwen2/underperform seed 2: [3, 6]).
    """

    rule: str = "cumulative"
    # 0.7: at 0.8 a llama build whose planted layer 4 alone restored 0.72 got the
    # window [4, 6]; clamping layers 5-6 (the routing's consequences downstream)
    # broke its deploy side, where [4, 4] reduced the gap with the task intact.
    threshold: float = 0.7
    top_k: int = 2
    per_head: bool = True
    batch_size: int = 64
    # Bounds for deep models on a CPU (null: no bound). Every patch set is a
    # forward pass, and a model of L layers has L (L + 1) / 2 windows:
    # `max_window` caps the joint windows' length, `max_prompts` patches only
    # that many held-out prompts (evenly spaced), and `patches_per_trace`
    # splits the patch sets over several traces to bound memory.
    max_window: int | None = None
    max_prompts: int | None = None
    patches_per_trace: int | None = None
    # `exact`: every layer, window and head patched. `attribution`: every effect
    # estimated from one forward and one backward per batch, then `confirm`
    # windows of each length (shortest first, best estimated first) patched
    # exactly until one reaches the threshold; the rule sees exact effects only.
    method: str = "exact"
    confirm: int = 2
    check_windows: int = 8

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"localize.rule={self.rule!r} is not one of {list(RULES)}")
        if self.method not in METHODS:
            raise ConfigError(f"localize.method={self.method!r} is not one of {list(METHODS)}")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"localize.threshold={self.threshold} must be in (0, 1]")
        if self.check_windows < 0:
            raise ConfigError(f"localize.check_windows={self.check_windows} must be >= 0 (0: no check)")
        for key in ("max_window", "max_prompts", "patches_per_trace", "confirm"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"localize.{key}={value} must be >= 1 (or null)")


@dataclass
class FitSettings:
    """The fit stage: subspaces up to `max_rank` (interventions use a prefix)."""

    max_rank: int = 4

    def __post_init__(self) -> None:
        if self.max_rank < 1:
            raise ConfigError(f"fit.max_rank={self.max_rank} must be >= 1")
