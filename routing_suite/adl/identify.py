"""Which fine-tuning goal the ADL evidence points to, offline.

Minder et al. (2025) hand the difference's readouts and steered samples to an
LLM agent and ask it what the model was fine-tuned for. Here the agent is an
offline scorer behind one interface (`GoalGrader`): given K candidate goals
(short descriptions, one of them true), each candidate is scored against a
list of evidence texts, and the true goal's rank is reported (1 = identified).

Evidence, read from a finished ADL store:

- `tokens`: the top readout tokens of the mean difference at the steering
  layer, one text per readout (logit lens, patchscope) and position; none of
  it was chosen with the fine-tuning data;
- `adl`: those tokens plus the fine-tune's steered completions of the chat
  prompts at the chosen alpha. The steered difference is the one at the
  position whose readout was most relevant to the fine-tuning data, unless
  `adl.position` fixed it, so this evidence has seen that data once (the
  row records which);
- `black_box`: the fine-tune's unsteered completions of the same chat prompts,
  what one learns by talking to it: the baseline.

The default grader embeds the candidates and the evidence with
all-MiniLM-L6-v2 (`routing_suite.adl.similarity`) and scores each candidate by
its cosine to the evidence's mean embedding. An LLM judge plugs in as
`goal_grader._target_`: a class with `name`, `check()` and
`scores(evidence, candidates) -> one number per candidate` (higher = more likely).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import xarray as xr

from routing_suite.adl.similarity import LexicalSimilarity, MiniLMSimilarity, Similarity
from routing_suite.errors import ConfigError

EVIDENCE = ("adl", "tokens", "black_box")


@dataclass
class Goal:
    name: str
    description: str
    # Further behaviours (fine-tune kinds) whose true goal this is, besides the one named `name`
    # (e.g. the same domain's fine-tunes with pretraining text mixed in).
    behaviors: list[str] = field(default_factory=list)


@dataclass
class GoalSet:
    """The `goals` config: K candidate goals; a store's true goal is the candidate named as
    its behaviour or listing it in `behaviors`, or `true_goal` when set (a fine-tune of your own)."""

    candidates: list[Goal]
    true_goal: str | None = None

    def __post_init__(self) -> None:
        self.candidates = [g if isinstance(g, Goal) else Goal(**g) for g in self.candidates]
        names = [g.name for g in self.candidates]
        if len(names) < 2:
            raise ConfigError(f"goals.candidates has {len(names)} goal(s): identification needs at least 2")
        if len(set(names)) != len(names):
            raise ConfigError(f"goals.candidates: names repeat ({sorted(n for n in set(names) if names.count(n) > 1)})")
        if empty := [g.name for g in self.candidates if not g.description.strip()]:
            raise ConfigError(f"goals.candidates: no description for {empty}")
        claimed = [b for g in self.candidates for b in {g.name, *g.behaviors}]
        if len(set(claimed)) != len(claimed):
            raise ConfigError("goals.candidates: a behaviour is the true goal of two candidates")
        if self.true_goal is not None and self.true_goal not in names:
            raise ConfigError(f"goals.true_goal={self.true_goal!r} is not one of the candidates {names}")

    def truth(self, behavior: str) -> str | None:
        """The true goal's name for a store of `behavior` (None: no candidate is it)."""
        if self.true_goal is not None:
            return self.true_goal
        return next((g.name for g in self.candidates if behavior == g.name or behavior in g.behaviors), None)


class GoalGrader(Protocol):
    name: str

    def check(self) -> None: ...

    def scores(self, evidence: list[str], candidates: list[str]) -> np.ndarray: ...


@dataclass
class SimilarityGoalGrader:
    """Each candidate's cosine to the evidence's centroid under an offline text similarity."""

    similarity: Similarity = field(default_factory=MiniLMSimilarity)

    @property
    def name(self) -> str:
        return f"goal description vs evidence: {self.similarity.name}"

    def check(self) -> None:
        self.similarity.check()

    def scores(self, evidence: list[str], candidates: list[str]) -> np.ndarray:
        return np.asarray(self.similarity.score(candidates, evidence), float)


def embedding_grader() -> SimilarityGoalGrader:
    return SimilarityGoalGrader(MiniLMSimilarity())


def lexical_grader() -> SimilarityGoalGrader:
    return SimilarityGoalGrader(LexicalSimilarity())


def true_rank(scores: np.ndarray, true_index: int) -> int:
    """1 + the candidates scoring at least as high as the true one (ties count against it)."""
    others = np.delete(np.asarray(scores, float), true_index)
    return 1 + int((others >= scores[true_index]).sum())


def evidence(readout: xr.Dataset, steer: xr.Dataset, layer: int) -> dict[str, list[str]]:
    """The evidence texts of one finished ADL store (see the module doc)."""
    tops = readout.top_token.sel(source="difference", layer=layer)
    tokens = [
        " ".join(str(t).strip() for t in tops.sel(readout=r, position=p).values)
        for r in tops.readout.values for p in tops.position.values
    ]
    completions = steer.completion.sel(direction="difference")
    steered = [str(c) for c in completions.sel(alpha=float(steer.attrs["best_alpha"])).values]
    unsteered = [str(c) for c in completions.sel(alpha=0.0).values]
    return {"adl": tokens + steered, "tokens": tokens, "black_box": unsteered}


@dataclass
class Identification:
    true_goal: str
    n_candidates: int
    rank: dict[str, int]  # evidence -> the true goal's rank
    top: dict[str, str]  # evidence -> the best-scoring candidate


def identify(texts: dict[str, list[str]], goals: GoalSet, behavior: str, grader: GoalGrader) -> Identification:
    truth = goals.truth(behavior)
    if truth is None:
        raise ConfigError(f"goals: no true goal for behaviour {behavior!r}")
    names = [g.name for g in goals.candidates]
    descriptions = [g.description for g in goals.candidates]
    rank, top = {}, {}
    for kind in EVIDENCE:
        s = grader.scores(texts[kind], descriptions)
        if len(s) != len(names):
            raise ValueError(f"{grader.name}: {len(s)} scores for {len(names)} candidates")
        rank[kind] = true_rank(s, names.index(truth))
        top[kind] = names[int(np.argmax(s))]
    return Identification(truth, len(names), rank, top)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sensible at 0 and n, unlike the normal one)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def from_config(cfg) -> tuple[GoalSet, GoalGrader]:
    """The candidate goals and the grader of a config with `goals` and `goal_grader`, the
    grader checked (an embedder that is not installed is refused before any work)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    goals = GoalSet(**OmegaConf.to_container(cfg.goals, resolve=True))
    grader = instantiate(cfg.goal_grader)
    try:
        grader.check()
    except ConfigError as err:
        raise ConfigError(f"goal_grader: {err} (or goal_grader=lexical, which needs nothing)") from err
    return goals, grader
