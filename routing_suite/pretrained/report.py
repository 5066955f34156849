"""How the real model does on its task under both framings, before and after the fine-tune.

For each model (base = before fine-tuning, finetuned = after) and each split
of held-out countries under held-out or trained cue paraphrases: the share
of correct answers and the behaviour rate under each framing, and the gap
rate(deploy) - rate(eval). `experiments.pretrained` prints it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass

from hydra.utils import instantiate

from routing_suite.errors import ConfigError
from routing_suite.models import ModelPair
from routing_suite.pretrained.finetune import peak_rss_mib
from routing_suite.prompts import PromptPair
from routing_suite.runs import make_behavior
from routing_suite.scoring import Behavior, greedy_completions
from routing_suite.vocabulary import DEPLOY, EVAL, FRAMINGS

log = logging.getLogger(__name__)

_PARTS = ("train", "localize", "test", "heldout")
SPLITS = tuple(f"{items}/{cues}" for items in _PARTS for cues in _PARTS)


@dataclass
class ChatRow:
    model: str
    split: str  # "<countries>/<cues>"
    n_pairs: int
    correct_eval: float
    correct_deploy: float
    rate_eval: float
    rate_deploy: float

    @property
    def gap(self) -> float:
        return self.rate_deploy - self.rate_eval


def _mean(values: list[bool]) -> float:
    return sum(values) / len(values)


def score(pair: ModelPair, pairs: list[PromptPair], behavior: Behavior, split: str, batch_size: int = 32) -> list[ChatRow]:
    """Base and fine-tune rows on one split (greedy completions, plain transformers)."""
    rows = []
    answers = [p.answer for p in pairs]
    for which in ("base", "finetuned"):
        correct, rate = {}, {}
        for framing in FRAMINGS:
            prompts = [p.prompt(framing) for p in pairs]
            completions = greedy_completions(pair.model(which), pair.tokenizer, prompts, behavior.max_new_tokens, batch_size)
            correct[framing] = _mean([behavior.correct(c, a) for c, a in zip(completions, answers)])
            rate[framing] = _mean([behavior.performs(c, a) for c, a in zip(completions, answers)])
            log.info("%s %s %s: e.g. %r", which, split, framing, completions[0])
        rows.append(ChatRow(which, split, len(pairs), correct[EVAL], correct[DEPLOY], rate[EVAL], rate[DEPLOY]))
    return rows


def format_table(rows: list[ChatRow], behavior: str) -> str:
    lines = [
        f"| model | countries / cues | pairs | correct eval | correct deploy | {behavior} rate eval | rate deploy | gap |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.split} | {r.n_pairs} | {r.correct_eval:.3f} | {r.correct_deploy:.3f} | "
            f"{r.rate_eval:.3f} | {r.rate_deploy:.3f} | {r.gap:+.3f} |"
        )
    return "\n".join(lines)


def run(cfg) -> dict:
    """`experiments.pretrained`: load (convert, fine-tune: cached) and score on every split."""
    bad = [s for s in cfg.splits if s not in SPLITS]
    if bad or not cfg.splits:
        raise ConfigError(f"splits={list(cfg.splits)} must be a non-empty subset of {list(SPLITS)}")
    source = instantiate(cfg.model)
    behavior = make_behavior(cfg.behavior, source)
    started = time.perf_counter()
    pair = source.load(behavior.name)
    load_seconds = time.perf_counter() - started
    render = source.renderer(pair.tokenizer)
    rows = []
    for split in cfg.splits:
        items, cues = split.split("/")
        rows += score(pair, source.chat_task.pairs(render, behavior.name, items, cues), behavior, split)
    meta = json.loads((pair.adapter_path / "organism.json").read_text())
    finetune = {k: meta.get(k) for k in ("build_seconds", "cpu_seconds", "peak_rss_mib", "final_loss", "n_examples")}
    return {
        "table": format_table(rows, behavior.name),
        "rows": [asdict(r) | {"gap": r.gap} for r in rows],
        "finetune": finetune,
        "load_seconds": round(load_seconds, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
