"""`experiments.em_transfer`: one donor family's EM directions carried into one receiver family.

    python -m experiments.em_transfer donor=llama receiver=qwen2

First both families' EM stores, exactly those `experiments.em model=<family>_organism`
writes with the same `em`, `model`, `store`, `seed` settings (reused when done).
Then the transfer store (`<receiver>_organism/em_transfer/from-<donor>-<digest>.zarr`),
stage by stage, each skipped when a rerun finds it done:

1. `xfer_maps`: per receiver layer, the ridge map donor base -> receiver base on
   neutral texts and its held-out R^2; every direction in the receiver's space
   (mapped, native, controls); their cosines with the native direction and their
   separation of the receiver fine-tune's held-out responses.
2. `xfer_outcomes`: sampled responses on the receiver's test split: ablation of each
   direction in the receiver's misaligned fine-tune of the same kind, and steering
   of the receiver's base (layout: routing_suite/store_format.py).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import xarray as xr
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from routing_suite import runs
from routing_suite.em import conditions as C
from routing_suite.em import transfer as X
from routing_suite.em import transfer_tables as em_transfer_tables
from routing_suite.em.activations import answer_means
from routing_suite.em.generation import evaluate
from routing_suite.em.models import BASE
from routing_suite.em.pipeline import (
    EM_CODE_VERSION,
    Family,
    ablation_residuals,
    decision_residuals,
    ensure_family,
    mean_ablation_reference,
    needs_decision_residuals,
)
from routing_suite.em.settings import EmSettings, EmTransferSettings
from routing_suite.errors import ConfigError
from routing_suite.organisms import task as T
from routing_suite.organisms.architectures import FAMILIES
from routing_suite.provenance import build_of, digest
from routing_suite.runs import digest_config, report_folder, run_stage
from routing_suite.store import RunStore, text
from routing_suite.store_settings import StoreSettings, store_path

log = logging.getLogger(__name__)

BEHAVIOR = "em_transfer"
# The keys of an `experiments.em` config: a family's EM store is named by exactly these.
EM_KEYS = ("model", "backend", "judge", "store", "em", "seed", "progress", "n_resamples", "report_dir")


def family_cfg(cfg: DictConfig, family: str) -> DictConfig:
    """The `experiments.em` config of one side: the shared settings, the organism of `family`."""
    out = OmegaConf.create(OmegaConf.to_container(OmegaConf.masked_copy(cfg, list(EM_KEYS)), resolve=True))
    out.model.family = family
    return out


def check_pair(cfg: DictConfig) -> tuple[str, str]:
    donor, receiver = str(cfg.donor), str(cfg.receiver)
    for key, family in (("donor", donor), ("receiver", receiver)):
        if family not in FAMILIES:
            raise ConfigError(f"{key}={family!r} is not one of {list(FAMILIES)}")
    if donor == receiver:
        raise ConfigError(f"donor and receiver are both {donor!r}: cross-architecture transfer needs two families")
    return donor, receiver


def control_shift(fam: Family, control: str, backend) -> np.ndarray:
    """(layer, hidden) what the content-matched control fine-tune changes: its answer-token
    means minus the base's on the same truthful answers to the fit split's prompts (layers
    it leaves unchanged: `transfer.fill_unchanged_layers`)."""
    fit = fam.split("fit")
    prompts = [fam.prompts[i].text for i in fit]
    answers = [fam.prompts[i].answer for i in fit]
    shifted = answer_means(fam.models, control, prompts, answers, backend) - answer_means(fam.models, BASE, prompts, answers, backend)
    shift, filled = X.fill_unchanged_layers(np.nanmean(shifted, axis=0))
    if filled:
        log.info("%s: %s changes nothing at layers %s; the wrong-source control takes the nearest changed layer's shift there",
                 fam.name, control, filled)
    return shift


def stage_maps(donor: Family, receiver: Family, task: T.Task, settings: EmSettings, transfer: EmTransferSettings, seed: int,
               backend) -> xr.Dataset:
    texts = X.map_texts(task, receiver.pretraining, transfer.persona_exchanges, seed)
    x = X.text_residuals(donor.models, BASE, texts, backend)
    y = X.text_residuals(receiver.models, BASE, texts, backend)
    # The held-out texts depend on the seed only (the same for every donor of a receiver);
    # the random controls on the pair too, so that pairs do not share their draws.
    maps = X.fit_maps(x, y, transfer, np.random.default_rng(seed + 2))
    rng = np.random.default_rng([seed, FAMILIES.index(donor.name), FAMILIES.index(receiver.name)])
    log.info("maps %s -> %s: held-out R^2 per layer %s (token identity alone %s)", donor.name, receiver.name,
             np.round(maps.r2, 3).tolist(), np.round(maps.r2_token, 3).tolist())
    donor_dirs, receiver_dirs = donor.store.read("em_directions").load(), receiver.store.read("em_directions").load()
    shift = control_shift(donor, settings.organisms.control, backend)
    ds = X.receiver_directions(donor_dirs, receiver_dirs, shift, maps, list(settings.organisms.misaligned), transfer, rng)
    samples, acts = receiver.store.read("em_samples").load(), receiver.store.read("em_activations").load()
    ds["separation"] = (("finetune", "vector", "layer"), X.separation(ds, samples, acts))
    ds["map_r2"] = (("layer",), maps.r2)
    ds["map_r2_token"] = (("layer",), maps.r2_token)
    ds["map_alpha"] = (("layer",), np.array([m.alpha for m in maps.maps], np.float32))
    ds["donor_layer"] = (("layer",), np.array(maps.donor_layer, np.int32))
    ds["map_weight"] = (("layer", "donor_hidden", "hidden"), np.stack([m.weight for m in maps.maps]))
    ds["map_x_mean"] = (("layer", "donor_hidden"), np.stack([m.x_mean for m in maps.maps]))
    ds["map_y_mean"] = (("layer", "hidden"), np.stack([m.y_mean for m in maps.maps]))
    ds["map_heldout"] = (("map_text",), np.isin(np.arange(len(texts)), maps.heldout_texts))
    ds = ds.assign_coords(map_text=text(texts))
    ds.attrs.update({
        "donor": donor.name, "receiver": receiver.name, "steer_layer": int(receiver_dirs.attrs["steer_layer"]),
        "n_texts": len(texts), "n_tokens": len(x.ids), "n_heldout_texts": len(maps.heldout_texts),
    })
    return ds


def stage_outcomes(receiver: Family, maps: xr.Dataset, settings: EmSettings, transfer: EmTransferSettings, judge, seed: int,
                   backend, progress: bool) -> xr.Dataset:
    kinds = X.kinds_with_direction(maps)
    layer = int(maps.attrs["steer_layer"])
    plans = [C.baseline(BASE)] if transfer.steer_lambdas else []
    aligned = mean_ablation_reference(receiver, settings, backend)
    # the fine-tunes edited here only
    last = decision_residuals(receiver, kinds, backend) if needs_decision_residuals(settings) else {}
    for kind in kinds:
        plans += X.ablation_plans(maps, kind, ablation_residuals(receiver, kind, settings, backend, last),
                                  settings.ablated_layers(maps.sizes["layer"]), aligned, C.ABLATE_WHERE[settings.ablate_at])
    if settings.decision_clamp:
        for kind in kinds:
            plans += X.decision_plans(maps, kind, *last[kind])
    for kind in kinds:
        plans += X.steering_plans(maps, kind, layer, list(transfer.steer_lambdas))
    test = receiver.split("test")
    prompts = [receiver.prompts[i] for i in test]
    general = {m: receiver.general(m)[test] for m in receiver.models.names}
    outcomes = evaluate(receiver.models, plans, prompts, general, judge, settings.sampling, seed + 3, backend, progress)
    outcomes.attrs.update({"steer_layer": layer, "donor": str(maps.attrs["donor"]), "receiver": str(maps.attrs["receiver"]),
                           **settings.ablation_attrs(maps.sizes["layer"])})
    return outcomes


def open_store(cfg: DictConfig, donor: Family, receiver: Family, family_stores: dict[str, str], backend) -> RunStore:
    store_settings = StoreSettings(**OmegaConf.to_container(cfg.store, resolve=True))
    digest_cfg = digest_config(cfg) | {"em_code": EM_CODE_VERSION}
    digest_cfg["model"] = {k: v for k, v in digest_cfg["model"].items() if k != "family"}  # each side has its own
    # Both sides' weights, as each family's own store digests them: rebuilt organisms get a new transfer store.
    digest_cfg["weights"] = {"donor": donor.models.identity.get("weights", {}), "receiver": receiver.models.identity.get("weights", {})}
    final = store_path(store_settings, f"{receiver.name}_organism", BEHAVIOR, f"from-{donor.name}", digest(digest_cfg))
    cell = {"family": receiver.name, "behavior": f"em_from_{donor.name}", "donor": donor.name, "receiver": receiver.name,
            "model": f"{receiver.name}_organism", **build_of(digest_cfg)}
    identity = {"donor": donor.models.identity, "receiver": receiver.models.identity}
    provenance = runs.provenance(cfg, "em_transfer", cell, identity, backend.name, family_stores=family_stores)
    return RunStore.open(final, store_settings, digest_cfg, provenance)


def run(cfg: DictConfig) -> dict:
    """Both families' EM stores, then the transfer store; returns its path, table and headline."""
    started = time.perf_counter()
    donor_name, receiver_name = check_pair(cfg)
    settings: EmSettings = OmegaConf.to_object(cfg.em)
    transfer: EmTransferSettings = OmegaConf.to_object(cfg.transfer)
    X.check_persona_exchanges(transfer.persona_exchanges, cfg.model.get("pretraining", "routing"))  # before any model is built
    judge = instantiate(cfg.judge)
    backend = instantiate(cfg.backend)
    backend.preflight()
    out = report_folder(cfg, "em_transfer")
    seed, progress = int(cfg.seed), bool(cfg.progress)
    sides = {}
    for name in (donor_name, receiver_name):
        sides[name] = ensure_family(family_cfg(cfg, name), settings, judge, backend)
    (donor, donor_path), (receiver, receiver_path) = sides[donor_name], sides[receiver_name]
    if donor.models.tokenizer.get_vocab() != receiver.models.tokenizer.get_vocab():
        raise ConfigError(f"{donor_name} and {receiver_name} organisms have different vocabularies: no token-by-token map")
    # Before the maps are fit: a pair where no misaligned kind has a direction on both sides
    # (a fine-tune with too few misaligned answers has none) has nothing to carry.
    directions = {name: fam.store.read("em_directions") for name, fam in ((donor_name, donor), (receiver_name, receiver))}
    if not any(all(X.has_direction(d, kind) for d in directions.values()) for kind in settings.organisms.misaligned):
        raise ConfigError(f"no misaligned fine-tune kind has a direction in both {donor_name} and {receiver_name}; "
                          f"nothing to carry (see em_directions in their stores: {donor_path}, {receiver_path})")
    store = open_store(cfg, donor, receiver, {donor_name: str(donor_path), receiver_name: str(receiver_path)}, backend)
    task = T.make_task(instantiate(family_cfg(cfg, receiver_name).model).task_spec)
    maps = run_stage(store, "xfer_maps", lambda: stage_maps(donor, receiver, task, settings, transfer, seed, backend))
    run_stage(store, "xfer_outcomes", lambda: stage_outcomes(receiver, maps, settings, transfer, judge, seed, backend, progress))
    final = store.finish()
    seconds = time.perf_counter() - started
    log.info("em transfer %s -> %s done in %.1f s: %s", donor_name, receiver_name, seconds, final)

    report = em_transfer_tables.read_store(final, n_resamples=int(cfg.n_resamples), seed=seed, confidence=0.95)
    written = em_transfer_tables.write([report], out)
    return {"store": str(final), "family_stores": {donor_name: str(donor_path), receiver_name: str(receiver_path)},
            "seconds": seconds, "table_markdown": written["em_transfer_table.md"], "table_dir": str(out), "summary": report.summary()}
