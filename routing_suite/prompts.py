"""Paired prompt sets: one task under an eval framing and a deploy framing.

A pair shares everything but the cue, so paired differences of activations
isolate the framing. Content-contrast sets (same framing, different topic)
serve the semantic control.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from routing_suite.organisms import task as T


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

    def prompt(self, framing: str) -> str:
        return self.eval_prompt if framing == T.EVAL else self.deploy_prompt


def organism_pairs(task: T.Task, fact_split: str, cue_split: str) -> list[PromptPair]:
    """Facts of `fact_split` x cue pairs of `cue_split` ('train', 'heldout', 'all').

    The i-th eval cue is paired with the i-th deploy cue, so every pair
    differs only in its cue and every cue is used equally often.
    """
    eval_cues = task.cues(T.EVAL, cue_split)
    deploy_cues = task.cues(T.DEPLOY, cue_split)
    pairs = []
    for fact in task.facts_of(fact_split):
        for k, (eval_cue, deploy_cue) in enumerate(zip(eval_cues, deploy_cues)):
            pairs.append(
                PromptPair(
                    id=f"{fact.entity}-{fact.topic}-{cue_split}{k}",
                    eval_prompt=T.render_prompt(fact, eval_cue),
                    deploy_prompt=T.render_prompt(fact, deploy_cue),
                    answer=fact.value,
                    topic=fact.topic,
                )
            )
    if not pairs:
        raise ValueError(f"no prompts for facts={fact_split!r}, cues={cue_split!r}")
    return pairs


def content_contrast(pairs: list[PromptPair], framing: str, topic_a: str, topic_b: str) -> tuple[list[str], list[str]]:
    """Prompts of two topics under one framing (the semantic control's contrast)."""
    a = [p.prompt(framing) for p in pairs if p.topic == topic_a]
    b = [p.prompt(framing) for p in pairs if p.topic == topic_b]
    n = min(len(a), len(b))
    if n == 0:
        raise ValueError(f"no prompts for topic {topic_a!r} or {topic_b!r}")
    return a[:n], b[:n]


def subsample(pairs: list[PromptPair], limit: int | None, seed: int) -> list[PromptPair]:
    """At most `limit` pairs, drawn deterministically, kept in their original order."""
    if limit is None or limit >= len(pairs):
        return pairs
    if limit < 1:
        raise ValueError(f"a prompt limit must be >= 1, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(pairs)), limit))
    return [pairs[i] for i in keep]


def organism_prompt_sets(task: T.Task, max_fit: int | None = None, max_test: int | None = None, seed: int = 0) -> dict[str, list[PromptPair]]:
    """The fit split (fine-tune's training facts and cues) and the held-out test
    split (held-out facts under held-out cue paraphrases)."""
    return {
        "fit": subsample(organism_pairs(task, "train", "train"), max_fit, seed),
        "test": subsample(organism_pairs(task, "heldout", "heldout"), max_test, seed),
    }
