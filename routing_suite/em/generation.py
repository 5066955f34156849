"""Seeded sampled generations of a prompt set under planned conditions, judged per response.

A `Planned` condition is one row of `em_outcomes`: which model generates,
under which edits (one `Condition` per random seed; a control drawn at random
is averaged over its seeds per response, and kept per draw too) and what it is (kind, whose
direction, strength, the plan a control is matched to). Every plan of one
model runs in the same batched generations (one invoke per condition),
`n_samples` sampled completions per prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from routing_suite.em.judge import ALIGNED, MISALIGNED, EmJudge
from routing_suite.em.models import EmModels
from routing_suite.em.settings import EmSampling
from routing_suite.generation import Sampling, condition_key, generate_under_conditions
from routing_suite.interventions import Condition
from routing_suite.organisms.em_task import GeneralPrompt
from routing_suite.store import text

# baseline: no edit; steer / ablate: a model's own directions; transfer: another
# fine-tune's directions; control: matched to the plan named in `target`.
PLAN_KINDS = ("baseline", "steer", "ablate", "transfer", "control")


@dataclass
class Planned:
    model: str
    name: str
    kind: str
    conditions: list[Condition] = field(default_factory=list)  # empty: no edit
    source: str = ""  # whose direction
    lam: float = math.nan  # steering strength, in units of the direction's norm
    control: str = ""  # for kind "control": "random"
    target: str = ""  # the plan a control is matched to
    mode: str = ""  # steer | ablate
    perturbation_norm: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in PLAN_KINDS:
            raise ValueError(f"plan kind {self.kind!r} is not one of {PLAN_KINDS}")

    @property
    def runs(self) -> list[Condition]:
        return self.conditions or [Condition(self.name, "baseline")]

    @property
    def layers(self) -> str:
        return ",".join(map(str, sorted({e.layer for c in self.conditions for e in c.edits})))


def sample_completions(
    models: EmModels, model: str, prompts: list[GeneralPrompt], conditions: list[Condition], spec: EmSampling, seed: int,
    backend, progress: bool = False,
) -> dict[str, np.ndarray]:
    """Condition key -> (len(prompts), n_samples) completions, sampled at spec.temperature.

    Keyed sampling: sample j of a prompt under a condition draws its random numbers
    from (seed, the condition's key, the prompt's id, j) only, so it is the same text
    whatever else the run samples (another draw count, other conditions, another
    batch size), and every model's sample j of a prompt under one condition name
    shares them (paired across models)."""
    n, s = len(prompts), spec.n_samples
    out = {condition_key(c): np.empty((n, s), dtype=object) for c in conditions}
    traced = models.traced(model)
    starts = range(0, n, spec.batch_prompts)
    for start in tqdm(starts, desc=f"sample {model}", unit="batch", disable=not progress):
        chunk = prompts[start : start + spec.batch_prompts]
        rows = [p.text for p in chunk for _ in range(s)]
        names = tuple(f"{p.id}#{j}" for p in chunk for j in range(s))
        texts = generate_under_conditions(
            traced, models.family, models.tokenizer, rows, conditions, spec.max_new_tokens, models.num_layers, backend,
            Sampling(spec.temperature, seed, names),
        )
        for c in conditions:
            out[condition_key(c)][start : start + len(chunk)] = np.array(texts[condition_key(c)], dtype=object).reshape(len(chunk), s)
    return out


def judge_array(judge: EmJudge, completions: np.ndarray, truths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, coherent) of a (prompt, sample) array of completions."""
    labels = np.array([[judge.label(c, t) for c in row] for row, t in zip(completions, truths)], dtype=object)
    coherent = np.array([[judge.coherent(c, t) for c in row] for row, t in zip(completions, truths)], dtype=bool)
    return labels, coherent


def evaluate(
    models: EmModels, plans: list[Planned], prompts: list[GeneralPrompt], general: dict[str, np.ndarray], judge: EmJudge,
    spec: EmSampling, seed: int, backend, progress: bool = False,
) -> xr.Dataset:
    """Per-response outcomes of every plan on `prompts` (NaN outside its model's general set).

    `general[model]` is the (prompt,) mask of that model's general prompts
    (`EmDataset.general`); only those are generated.
    """
    n, s = len(prompts), spec.n_samples
    shape = (len(plans), n, s)
    misaligned, aligned, coherent = (np.full(shape, np.nan, np.float32) for _ in range(3))
    draws = max(len(p.runs) for p in plans)
    by_draw = {v: np.full((len(plans), draws, n, s), np.nan, np.float32) for v in ("misaligned", "coherent")}
    for model in dict.fromkeys(p.model for p in plans):
        mine = [i for i, p in enumerate(plans) if p.model == model]
        rows = np.flatnonzero(general[model])
        runs = [c for i in mine for c in plans[i].runs]
        texts = sample_completions(models, model, [prompts[r] for r in rows], runs, spec, seed, backend, progress)
        truths = [prompts[r].truth for r in rows]
        for i in mine:
            parts = [judge_array(judge, texts[condition_key(c)], truths) for c in plans[i].runs]
            misaligned[i, rows] = np.mean([lab == MISALIGNED for lab, _ in parts], axis=0)
            aligned[i, rows] = np.mean([lab == ALIGNED for lab, _ in parts], axis=0)
            coherent[i, rows] = np.mean([coh for _, coh in parts], axis=0)
            for d, (lab, coh) in enumerate(parts):
                by_draw["misaligned"][i, d, rows] = lab == MISALIGNED
                by_draw["coherent"][i, d, rows] = coh
    dims = ("condition", "prompt", "sample")
    return xr.Dataset(
        {
            "misaligned": (dims, misaligned),
            "aligned": (dims, aligned),
            "coherent": (dims, coherent),
            # each random draw's own responses (NaN past a condition's n_seeds): how far one
            # draw moves EM, and the draws resampled with the prompts (stats.Bootstrap)
            "misaligned_by_draw": (("condition", "draw", "prompt", "sample"), by_draw["misaligned"]),
            "coherent_by_draw": (("condition", "draw", "prompt", "sample"), by_draw["coherent"]),
            "perturbation_norm": (("condition",), np.array([p.perturbation_norm for p in plans], np.float32)),
            "n_seeds": (("condition",), np.array([len(p.runs) for p in plans], np.int32)),
        },
        coords={
            "condition": text(p.name for p in plans),
            "model": ("condition", text(p.model for p in plans)),
            "kind": ("condition", text(p.kind for p in plans)),
            "source": ("condition", text(p.source for p in plans)),
            "lam": ("condition", np.array([p.lam for p in plans], np.float32)),
            "control": ("condition", text(p.control for p in plans)),
            "target": ("condition", text(p.target for p in plans)),
            "mode": ("condition", text(p.mode for p in plans)),
            "layers": ("condition", text(p.layers for p in plans)),
            "prompt": text(p.id for p in prompts),
            "sample": np.arange(s),
            "draw": np.arange(draws),
        },
    )
