"""The built-in organisms' prompt pairs: their task's facts under its cue pairs."""

from __future__ import annotations

from routing_suite.organisms import task as T
from routing_suite.prompts import SPLITS, PromptPair


def organism_pairs(task: T.Task, fact_split: str, cue_split: str) -> list[PromptPair]:
    """Facts of `fact_split` x cue pairs of `cue_split` (`Task.facts_of`, `Task.cues`).

    The i-th eval cue is paired with the i-th deploy cue, so every pair
    differs only in its cue and every cue is used equally often. A pair's
    cluster is its entity under its cue pair (the topics of one entity under
    one cue share both).
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
                    cluster=f"{fact.entity}|{cue_split}{k}",
                )
            )
    if not pairs:
        raise ValueError(f"no prompts for facts={fact_split!r}, cues={cue_split!r}")
    return pairs


def organism_prompt_sets(task: T.Task) -> dict[str, list[PromptPair]]:
    """fit: the fine-tune's training facts under training cues; localize and test:
    facts and cue paraphrases of their own, never in any fine-tune."""
    return {split: organism_pairs(task, facts, facts) for split, facts in zip(SPLITS, ("train", "localize", "test"))}
