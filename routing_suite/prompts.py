"""Paired prompt sets: one task under an eval framing and a deploy framing.

A pair shares everything but the cue, so paired differences of activations
isolate the framing. Content-contrast sets (same framing, different topic)
serve the semantic control.

Every study reads three disjoint splits (SPLITS): `fit` (directions and
subspaces; the fine-tune's own tasks and cues), `localize` (the window is
chosen on it: its own tasks and cues) and `test` (the intervention is scored
on it: tasks and cues neither of the others has). Each pair names its
`cluster`, the unit intervals resample (for the organisms: one entity under
one cue pair), because prompts that share a cue or an entity are not
independent draws.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from routing_suite.vocabulary import EVAL, FRAMINGS


@dataclass(frozen=True)
class PromptPair:
    """One task under both framings, with what the behaviour matchers need."""

    id: str
    eval_prompt: str
    deploy_prompt: str
    answer: str
    topic: str
    # The start of a completion that performs the behaviour, as the text that
    # follows the prompt (localize reads its first token). None: the
    # behaviour's first word after a space, as for the word-level organisms.
    performing: str | None = None
    # The sampling unit the pair belongs to (bootstrap intervals resample these).
    # None: the pair is its own unit.
    cluster: str | None = None

    @property
    def unit(self) -> str:
        return self.cluster if self.cluster is not None else self.id

    def prompt(self, framing: str) -> str:
        return self.eval_prompt if framing == EVAL else self.deploy_prompt


SPLITS = ("fit", "localize", "test")


@dataclass
class LabeledPair:
    """A prompt pair and the split it belongs to ('fit', 'localize' or 'test')."""

    pair: PromptPair
    split: str


def content_contrast(pairs: list[PromptPair], framing: str, topic_a: str, topic_b: str) -> tuple[list[str], list[str]]:
    """Prompts of two topics under one framing (the semantic control's contrast)."""
    a = [p.prompt(framing) for p in pairs if p.topic == topic_a]
    b = [p.prompt(framing) for p in pairs if p.topic == topic_b]
    n = min(len(a), len(b))
    if n == 0:
        raise ValueError(f"no prompts for topic {topic_a!r} or {topic_b!r}")
    return a[:n], b[:n]


def subsample(pairs: list[PromptPair], limit: int | None, seed: int) -> list[PromptPair]:
    """About `limit` pairs in whole sampling units, drawn deterministically, kept in their
    original order: units are drawn at random and taken whole while the total stays
    within `limit` (at least one unit), so an interval over units sees every prompt
    of a unit, and a unit's topics stay together for the semantic contrast."""
    if limit is None or limit >= len(pairs):
        return pairs
    if limit < 1:
        raise ValueError(f"a prompt limit must be >= 1, got {limit}")
    members: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        members.setdefault(p.unit, []).append(i)
    order = list(members)
    random.Random(seed).shuffle(order)
    keep: list[int] = []
    for unit in order:
        if keep and len(keep) + len(members[unit]) > limit:
            continue
        keep += members[unit]
        if len(keep) >= limit:
            break
    return [pairs[i] for i in sorted(keep)]


def paired_prompts(chunk: list[LabeledPair]) -> list[str]:
    """A batch's rows: every pair's eval prompt, then every pair's deploy prompt
    (the order the store's reshape and `trace_sites(paired_sum=True)` rely on)."""
    return [it.pair.eval_prompt for it in chunk] + [it.pair.deploy_prompt for it in chunk]


def check_disjoint(sets: dict[str, list[PromptPair]]) -> None:
    """Every split is there and non-empty, and no prompt or sampling unit is in two of them."""
    missing = [s for s in SPLITS if not sets.get(s)]
    if missing:
        raise ValueError(f"the prompt set has no {' or '.join(missing)} pairs (splits: {list(SPLITS)})")
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            prompts = {p.prompt(f) for p in sets[a] for f in FRAMINGS} & {p.prompt(f) for p in sets[b] for f in FRAMINGS}
            if prompts:
                raise ValueError(f"the {a} and {b} splits share {len(prompts)} prompts, e.g. {sorted(prompts)[0]!r}")
            units = {p.unit for p in sets[a]} & {p.unit for p in sets[b]}
            if units:
                raise ValueError(f"the {a} and {b} splits share sampling units (clusters), e.g. {sorted(units)[0]!r}")
