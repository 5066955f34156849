"""`experiments.em`: emergent-misalignment directions on one family, end to end.

Stages (each recorded in the run store, skipped when a rerun finds it done):

1. `em_samples`: the base, every narrow misaligned fine-tune and the control
   fine-tune sample `n_samples` responses to every general prompt (fit and
   test split); the judge labels each misaligned / aligned / other.
2. `em_activations`: the misaligned fine-tunes' answer-token mean residuals
   of their own responses, every layer.
3. `em_directions`: misaligned - aligned per fine-tune and layer, held-out
   separation accuracy, the cross-fine-tune cosine matrix; on persona
   organisms also the base's planted persona variable (`directions.add_planted`).
4. `em_outcomes`: on the test split, sampled responses under steering of the
   base, ablation of each fine-tune's own directions, transfer ablation of the
   other fine-tune's, and matched random controls; on persona organisms also
   the planted variable ablated, with its own matched random control; per response.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from routing_suite import runs
from routing_suite.em import builds as em_builds
from routing_suite.em import conditions as C
from routing_suite.em import tables as em_tables
from routing_suite.em.activations import answer_means, last_token_residuals, token_residuals
from routing_suite.em.directions import add_planted, fit_directions, pick_layer
from routing_suite.em.generation import Planned, evaluate, judge_array, sample_completions
from routing_suite.em.models import BASE, EmModels, load_family
from routing_suite.em.settings import TO_BASE_MEAN, EmSettings
from routing_suite.interventions import Condition
from routing_suite.organisms import persona_task as P
from routing_suite.organisms import task as T
from routing_suite.organisms.em_task import EM_DATASETS, GeneralPrompt, general_prompts
from routing_suite.organisms.planting import planted_direction, planted_layers
from routing_suite.provenance import build_of, digest
from routing_suite.runs import digest_config, report_folder, run_stage
from routing_suite.store import RunStore, text
from routing_suite.store_settings import StoreSettings, store_path

log = logging.getLogger(__name__)

BEHAVIOR = "em"
# The version of what the EM stages compute from a config (the judge, the directions,
# the planned conditions), digested into every EM and EM-transfer store's key: the
# config alone does not change when that code does, and a store of older code would
# be reused, its stale stages with it. Bump it with any change to what a stage writes
# (tests/test_em_code_version.py fails on any change to the stages' code until the
# version and a new digest are recorded there).
# 2: decision-token clamps in em_outcomes and xfer_outcomes (2026-12-05).
# 3: em_samples.narrow, each model's own topics (a general set is no longer "the rest") (2026-12-05).
# 4: directions paired within prompts (em.balance, default "prompt"); em_directions.paired_prompts (2026-12-06).
# 5: planted persona bases: their styles judged, their u as em_directions.planted (2026-12-06).
# 6: the planted edits at the layers u was planted at only (em_directions.planted_layer) (2026-12-06).
# 7: each random control drawn from its own generator (conditions.control_rng) (2026-12-06).
# 8: every edit at every position leaves the prompt's first token (<bos>) alone (conditions.condition) (2026-12-06).
# 9: planted bases answer value first (the judge reads either order; the reference answer in its base's style) (2026-12-07).
# 10: the planted checks for every misaligned fine-tune, a direction found or not (pipeline.plan_conditions) (2026-12-07).
# 11: a matched control on the residual stream is matched to the edit's change in the edit's own run
#     (interventions.ResidualCarry); perturbation_norm is that change too (interventions.own_run_changes) (2026-12-07).
# 12: the steering layer is never the last one (directions.pick_layer) (2026-12-07).
# 13: keyed sampling (generation.Sampling: a response's random numbers from its seed, condition
#     and prompt only, not its batch); em_outcomes keep each random draw (misaligned_by_draw) (2026-12-07).
EM_CODE_VERSION = 13


@dataclass
class Family:
    """One family's models, general prompts, store and the task they come from."""

    models: EmModels
    prompts: list[GeneralPrompt]
    store: RunStore
    task: T.Task
    # The base's pretraining ("routing", or a persona base's: `persona_task.PRETRAININGS`).
    pretraining: str = "routing"

    @property
    def name(self) -> str:
        return self.models.family

    def general(self, model: str) -> np.ndarray:
        """(prompt,) `model`'s general prompts (`EmDataset.general`; every prompt, for the base)."""
        if model == BASE:
            return np.ones(len(self.prompts), bool)
        return np.array([EM_DATASETS[model].general(p.topic) for p in self.prompts])

    def narrow(self, model: str) -> np.ndarray:
        """(prompt,) the prompts of `model`'s narrow domain, the topics it trained on (none, for the base)."""
        if model == BASE:
            return np.zeros(len(self.prompts), bool)
        return np.array([EM_DATASETS[model].in_domain(p.topic) for p in self.prompts])

    def split(self, split: str) -> list[int]:
        return [i for i, p in enumerate(self.prompts) if p.split == split]


def _prompt_coords(prompts: list[GeneralPrompt]) -> dict:
    return {
        "prompt": text(p.id for p in prompts),
        "prompt_text": ("prompt", text(p.text for p in prompts)),
        "truth": ("prompt", text(p.truth for p in prompts)),
        "topic": ("prompt", text(p.topic for p in prompts)),
        "form": ("prompt", text(p.form for p in prompts)),
        "split": ("prompt", text(p.split for p in prompts)),
    }


def stage_sample(fam: Family, settings: EmSettings, judge, seed: int, backend, progress: bool) -> xr.Dataset:
    names = fam.models.names
    n, s = len(fam.prompts), settings.sampling.n_samples
    completions = np.empty((len(names), n, s), dtype=object)
    for m, name in enumerate(names):
        out = sample_completions(fam.models, name, fam.prompts, [Condition("sample", "baseline")],
                                 settings.sampling, seed, backend, progress)
        completions[m] = out["sample"]
    truths = [p.truth for p in fam.prompts]
    judged = [judge_array(judge, completions[m], truths) for m in range(len(names))]
    dims = ("model", "prompt", "sample")
    return xr.Dataset(
        {
            "completion": (dims, completions),
            "label": (dims, np.stack([lab for lab, _ in judged])),
            "coherent": (dims, np.stack([coh for _, coh in judged])),
            "general": (("model", "prompt"), np.stack([fam.general(name) for name in names])),
            "narrow": (("model", "prompt"), np.stack([fam.narrow(name) for name in names])),
        },
        coords=_prompt_coords(fam.prompts) | {"model": text(names), "sample": np.arange(s)},
    )


def stage_activations(fam: Family, samples: xr.Dataset, settings: EmSettings, backend) -> xr.Dataset:
    misaligned = settings.organisms.misaligned
    n, s = len(fam.prompts), settings.sampling.n_samples
    layers, d = fam.models.num_layers, fam.models.hidden_size
    resid = np.full((len(misaligned), n, s, layers, d), np.nan, np.float32)
    for f, name in enumerate(misaligned):
        rows = np.flatnonzero(fam.general(name))
        prompts = [fam.prompts[r].text for r in rows for _ in range(s)]
        answers = [str(c) for c in samples.completion.sel(model=name).values[rows].ravel()]
        resid[f, rows] = answer_means(fam.models, name, prompts, answers, backend).reshape(len(rows), s, layers, d)
    return xr.Dataset(
        {"resid": (("finetune", "prompt", "sample", "layer", "hidden"), resid)},
        coords={"finetune": text(misaligned), "prompt": text(p.id for p in fam.prompts), "sample": np.arange(s), "layer": np.arange(layers)},
    )


def planted_contexts(fam: Family, backend) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The base's last-token residuals on the persona probes (`persona_task.persona_probes`),
    misaligned and aligned contexts, per split ("fit": training facts as questions, "test": held-out)."""
    misaligned, aligned = {}, {}
    for split, facts in (("fit", "train"), ("test", "test")):
        mis, ali = P.persona_probes(fam.task, facts, fam.pretraining)
        misaligned[split] = last_token_residuals(fam.models, BASE, mis, backend)
        aligned[split] = last_token_residuals(fam.models, BASE, ali, backend)
    return misaligned, aligned


def match_residuals(fam: Family, model: str, n_texts: int, backend) -> np.ndarray:
    """Token residuals of `model` on truthful answers to fit-split prompts (for matched magnitudes)."""
    fit = fam.split("fit")[:n_texts]
    return token_residuals(fam.models, model, [f"{fam.prompts[i].text} {fam.prompts[i].answer}" for i in fit], backend)


def mean_ablation_reference(fam: Family, settings: EmSettings, backend) -> np.ndarray | None:
    """The base's token residuals on truthful answers, which `em.ablate_to=base_mean` sets each
    ablated coordinate to the mean of (`conditions.ablate_edit`); None for zero ablation."""
    return match_residuals(fam, BASE, settings.match_texts, backend) if settings.ablate_to == TO_BASE_MEAN else None


def needs_decision_residuals(settings: EmSettings) -> bool:
    """Whether a run reads last-token residuals (`decision_residuals`): for its decision-token
    clamps, or for change norms where its ablations edit the decision token."""
    return settings.decision_clamp or settings.ablate_at == "decision"


def ablation_residuals(fam: Family, name: str, settings: EmSettings, backend, last: dict) -> np.ndarray:
    """The residuals `name`'s ablations' change norms are taken on, where they edit
    (`em.ablate_at`): its token residuals on truthful answers (every token), or its
    last-token ones on its general fit prompts (`last`: `decision_residuals`)."""
    return last[name][1] if settings.ablate_at == "decision" else match_residuals(fam, name, settings.match_texts, backend)


def decision_residuals(fam: Family, finetunes: list[str], backend) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per fine-tune of `finetunes`: the base's and its own last-token residuals on its
    general fit prompts (where the decision-token clamps take their targets)."""
    fit = np.array(fam.split("fit"))
    texts = [fam.prompts[i].text for i in fit]
    base = last_token_residuals(fam.models, BASE, texts, backend)
    out = {}
    for name in finetunes:
        rows = np.flatnonzero(fam.general(name)[fit])
        out[name] = (base[rows], last_token_residuals(fam.models, name, [texts[r] for r in rows], backend))
    return out


def plan_conditions(fam: Family, directions: xr.Dataset, settings: EmSettings, seed: int, backend) -> list[Planned]:
    sources = [str(f) for f in directions.finetune.values if bool(directions.has_direction.sel(finetune=f))]
    layer = int(directions.attrs["steer_layer"])
    one_layer = settings.single_layer(layer)
    aligned = mean_ablation_reference(fam, settings, backend)
    where = C.ABLATE_WHERE[settings.ablate_at]
    last = decision_residuals(fam, settings.organisms.finetunes, backend) if needs_decision_residuals(settings) else {}
    plans = [C.baseline(BASE), *(C.baseline(k) for k in settings.organisms.finetunes if k not in sources)]
    plans += C.steer_plans(directions, sources, layer, list(settings.steer.lambdas), settings.random_seeds, seed)
    for name in sources:
        residuals = ablation_residuals(fam, name, settings, backend, last)
        plans += C.ablation_plans(directions, name, sources, one_layer, residuals, settings.random_seeds, seed,
                                  settings.ablated_layers(directions.sizes["layer"]), aligned, where)
        if "planted" in directions:
            plans += C.planted_plans(directions, name, residuals, settings.random_seeds, seed, aligned, where)
    # The planted check asks the organism, not the method: it needs no found direction (a
    # fine-tune that lies on nearly every general question has too few aligned answers to fit one).
    unfit = [name for name in settings.organisms.misaligned if name not in sources] if "planted" in directions else []
    for name in unfit:
        residuals = ablation_residuals(fam, name, settings, backend, last)
        plans += C.planted_plans(directions, name, residuals, settings.random_seeds, seed, aligned, where)
    if settings.decision_clamp:
        for name in sources:
            plans += C.decision_plans(directions, name, sources, *last[name], settings.random_seeds, seed)
        for name in unfit:
            plans += C.decision_plans(directions, name, [], *last[name], settings.random_seeds, seed, own=False)
        for name in settings.organisms.finetunes:
            plans += C.induce_plans(directions, name, *last[name], settings.random_seeds, seed)
    return plans


def stage_intervene(fam: Family, directions: xr.Dataset, settings: EmSettings, judge, seed: int, backend, progress: bool) -> xr.Dataset:
    plans = plan_conditions(fam, directions, settings, seed, backend)
    test = fam.split("test")
    prompts = [fam.prompts[i] for i in test]
    general = {m: fam.general(m)[test] for m in fam.models.names}
    outcomes = evaluate(fam.models, plans, prompts, general, judge, settings.sampling, seed + 1, backend, progress)
    steer_layer = int(directions.attrs["steer_layer"])
    outcomes.attrs.update({"steer_layer": steer_layer, "ablate_layer": settings.single_layer(steer_layer),
                           **settings.ablation_attrs(directions.sizes["layer"])})
    return outcomes


def em_store_path(cfg: DictConfig, model_name: str, weights: dict | None = None) -> tuple[StoreSettings, Path, dict]:
    """Store settings, the final path and the digested config of a family's EM store.
    `weights` (the models' hashes, `EmModels.identity["weights"]`) are digested too,
    as the routing stores' are: a store is reused only on the weights it was made on."""
    store_settings = StoreSettings(**OmegaConf.to_container(cfg.store, resolve=True))
    digest_cfg = digest_config(cfg) | {"em_code": EM_CODE_VERSION}
    if weights:
        digest_cfg["weights"] = dict(weights)
    return store_settings, store_path(store_settings, model_name, BEHAVIOR, BEHAVIOR, digest(digest_cfg)), digest_cfg


def open_family(cfg: DictConfig, settings: EmSettings, backend) -> Family:
    source = instantiate(cfg.model)
    models = load_family(source, settings.organisms.finetunes, backend)
    settings.check_layers(models.num_layers)
    task = T.make_task(source.task_spec)
    persona, pretraining = settings.organisms.persona, getattr(source, "pretraining", "routing")
    prompts = [*general_prompts(task, "fit", persona, pretraining), *general_prompts(task, "test", persona, pretraining)]
    store_settings, final, digest_cfg = em_store_path(cfg, source.name, models.identity.get("weights"))
    cell = {"family": models.family, "behavior": BEHAVIOR, "model": source.name, **build_of(digest_cfg)}
    provenance = runs.provenance(cfg, "em", cell, models.identity, backend.name)
    return Family(models, prompts, RunStore.open(final, store_settings, digest_cfg, provenance), task, pretraining)


def ensure_family(cfg: DictConfig, settings: EmSettings, judge, backend) -> tuple[Family, Path]:
    """One family's store through every EM stage (each skipped when done); the family and the finished store."""
    seed, progress = int(cfg.seed), bool(cfg.progress)
    fam = open_family(cfg, settings, backend)
    store = fam.store
    samples = run_stage(store, "em_samples", lambda: stage_sample(fam, settings, judge, seed, backend, progress))
    acts = run_stage(store, "em_activations", lambda: stage_activations(fam, samples, settings, backend))

    def directions() -> xr.Dataset:
        ds = fit_directions(samples, acts, settings.min_per_class, settings.balance)
        if settings.organisms.persona:
            # A planted base's own u (`organisms/planting`), else the probes' mean difference.
            shared_unit = P.planted(fam.pretraining) and fam.pretraining in P.SHARED_PRETRAININGS
            unit = planted_direction(fam.models.hidden_size) if shared_unit else None
            layers = list(planted_layers(fam.models.num_layers)) if shared_unit else None
            ds = add_planted(ds, *planted_contexts(fam, backend), unit=unit, layers=layers)
        ds.attrs["steer_layer"] = pick_layer(ds, settings.steer.layer)
        return ds

    dirs = run_stage(store, "em_directions", directions)
    if not dirs.has_direction.values.any():
        # A finding, not an error: fine-tunes that barely misbehave off their domain (a negative
        # organism's) have nothing to fit. The store still gets every model's rates and the
        # base's decision-token edits; its tables say "no direction".
        log.warning("%s: no fine-tune has %d misaligned and aligned fit responses%s: nothing to ablate or steer with",
                    fam.name, settings.min_per_class, " (and prompts answered both ways)" if settings.balance == "prompt" else "")
    run_stage(store, "em_outcomes", lambda: stage_intervene(fam, dirs, settings, judge, seed, backend, progress))
    return fam, store.finish()


def run(cfg: DictConfig) -> dict:
    """One family through every EM stage; returns the store, its table and the headline numbers."""
    started = time.perf_counter()
    settings: EmSettings = OmegaConf.to_object(cfg.em)
    judge = instantiate(cfg.judge)
    backend = instantiate(cfg.backend)
    backend.preflight()
    out = report_folder(cfg, "em")
    fam, final = ensure_family(cfg, settings, judge, backend)
    seconds = time.perf_counter() - started
    log.info("em %s done in %.1f s: %s", fam.name, seconds, final)

    report = em_tables.read_store(final, n_resamples=int(cfg.n_resamples), seed=int(cfg.seed), confidence=0.95)
    written = em_tables.write([report], out)
    em_builds.write([report], out)
    return {"store": str(final), "seconds": seconds, "table_markdown": written["em_table.md"], "table_dir": str(out),
            "summary": report.summary()}
