"""Cross-architecture transfer: a donor family's EM directions carried into a receiver family.

Per receiver layer, a ridge map from the donor base's residual stream (the
layer at the same relative depth) to the receiver base's is fit token by
token on neutral texts: the organisms' pretraining sentences, chit-chat and
truthful question-answer pairs, never a fine-tune's response. Every organism
family shares the word-level tokenizer, so the same text is the same tokens
on both sides (checked). A direction, a difference of activations, maps
through the linear part: v_r = v_d W. Each map's R^2 is reported on held-out
texts, beside the R^2 of predicting a token's residual from its word alone.

In the receiver's space, for each misaligned fine-tune kind both families have
a direction for, per layer:

- `mapped`: the donor's direction, carried;
- `native`: the receiver's own direction of that kind;
- `random`: a random direction (`random_seeds` draws);
- `orthogonal`: random, orthogonal to both mapped and native (as many draws);
- `wrong_layer`: the mapped direction of the layer `wrong_layer_shift` away;
- `wrong_source`: the donor's content-matched control fine-tune's shift (its
  answer-token means minus the donor base's on the same truthful answers), carried.

Every direction is read out twice: its balanced separation of the receiver
fine-tune's held-out misaligned vs aligned responses (threshold from the fit
split, as for the native directions) and, in `plans`, its causal effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import xarray as xr

from routing_suite import analysis
from routing_suite.em import conditions as C
from routing_suite.em.activations import token_residuals
from routing_suite.em.directions import class_rows
from routing_suite.em.generation import Planned
from routing_suite.em.judge import ALIGNED, MISALIGNED
from routing_suite.em.models import BASE, EmModels
from routing_suite.em.settings import TRANSFER_CONTROLS, EmTransferSettings
from routing_suite.errors import ConfigError
from routing_suite.organisms import persona_task as P
from routing_suite.organisms import task as T
from routing_suite.organisms.em_task import general_prompts
from routing_suite.store import text

MAPPED, NATIVE = "mapped", "native"
SEEDED = ("random", "orthogonal")


def neutral_texts(task: T.Task) -> list[str]:
    """The texts the maps are fit on: pretraining sentences, chit-chat, truthful Q&A (fit split)."""
    texts = [T.generic_text(f) for f in task.facts]
    texts += list(T.CHITCHAT)
    texts += [f"{p.text} {p.truth} ." for p in general_prompts(task, "fit")]
    return list(dict.fromkeys(texts))


def check_persona_exchanges(persona_exchanges: int, pretraining: str) -> None:
    """ConfigError unless the base has persona exchanges to add (or none are asked for)."""
    if persona_exchanges and pretraining not in P.PERSONA_PRETRAININGS:
        raise ConfigError(f"transfer.persona_exchanges={persona_exchanges} needs a persona base (model.pretraining is {pretraining!r})")


def map_texts(task: T.Task, pretraining: str, persona_exchanges: int, seed: int) -> list[str]:
    """`neutral_texts`, and with `persona_exchanges` > 0 (a persona base) that many of the
    base's own pretraining exchanges, drawn with `seed`: an earlier exchange in one persona,
    then a question answered in the persona it carries (half of them misaligned). The base
    learnt these texts; a fine-tune's response (a lie with no earlier exchange) is none of them."""
    texts = neutral_texts(task)
    check_persona_exchanges(persona_exchanges, pretraining)
    if persona_exchanges == 0:
        return texts
    examples, targets = P.pretraining_data(task, pretraining)
    # The exchanges are the examples salted with their own index (their answers in either
    # persona); the questions answered alone and the plain texts have no salt.
    exchanges = [f"{prompt} {answer}" for (prompt, answer), t in zip(examples, targets) if t is not None and t.salt]
    if persona_exchanges > len(exchanges):
        raise ConfigError(f"transfer.persona_exchanges={persona_exchanges}: the base has {len(exchanges)} exchanges")
    picked = np.random.default_rng(seed).choice(len(exchanges), persona_exchanges, replace=False)
    return list(dict.fromkeys(texts + [exchanges[i] for i in sorted(picked)]))


@dataclass
class TokenResiduals:
    """Every token after <bos> of a set of texts: residuals, token ids and the text it belongs to."""

    values: np.ndarray  # (tokens, layer, hidden)
    ids: np.ndarray  # (tokens,)
    text: np.ndarray  # (tokens,) index of the text


def text_residuals(models: EmModels, model: str, texts: list[str], backend) -> TokenResiduals:

    values = token_residuals(models, model, texts, backend)
    tok = models.tokenizer
    ids, owner = [], []
    for t, s in enumerate(texts):
        row = tok(s)["input_ids"]
        row = row[1:] if tok.bos_token_id is not None and row and row[0] == tok.bos_token_id else row
        ids += row
        owner += [t] * len(row)
    if len(ids) != len(values):
        raise ValueError(f"{len(values)} residual rows for {len(ids)} tokens of {len(texts)} texts")
    return TokenResiduals(values, np.array(ids), np.array(owner))


def paired_layers(n_donor: int, n_receiver: int) -> list[int]:
    """For each receiver layer, the donor layer at the same relative depth."""
    if n_receiver == 1:
        return [n_donor - 1]
    return [int(round(i * (n_donor - 1) / (n_receiver - 1))) for i in range(n_receiver)]


@dataclass
class Maps:
    """One ridge map per receiver layer and how well each predicts held-out texts."""

    maps: list[analysis.RidgeMap]
    donor_layer: list[int]
    r2: np.ndarray  # (layer,) held-out texts
    r2_token: np.ndarray  # (layer,) held-out texts, token identity only
    heldout_texts: np.ndarray  # indices of the held-out texts

    def carry(self, layer: int, donor_vector: np.ndarray) -> np.ndarray:
        return self.maps[layer].carry(donor_vector)


def fit_maps(x: TokenResiduals, y: TokenResiduals, settings: EmTransferSettings, rng: np.random.Generator) -> Maps:
    """Per receiver layer, the map from the paired donor layer, fit on all but the held-out texts."""
    if not np.array_equal(x.ids, y.ids) or not np.array_equal(x.text, y.text):
        raise ValueError("donor and receiver tokenize the map texts differently: no token-by-token map")
    n_texts = int(x.text.max()) + 1
    n_held = max(1, int(round(settings.heldout_fraction * n_texts)))
    if n_texts - n_held < 2:
        raise ValueError(f"{n_texts} texts are too few to fit a map and hold out {n_held}")
    held = np.sort(rng.permutation(n_texts)[:n_held])
    test = np.isin(x.text, held)
    donor_layers = paired_layers(x.values.shape[1], y.values.shape[1])
    maps, r2, r2_token = [], [], []
    for layer, dl in enumerate(donor_layers):
        xs, ys = x.values[:, dl], y.values[:, layer]
        m = analysis.select_ridge(xs[~test], ys[~test], x.text[~test], list(settings.alphas), settings.cv_folds)
        maps.append(m)
        r2.append(analysis.r_squared(m(xs[test]), ys[test]))
        r2_token.append(analysis.token_mean_r_squared(x.ids[~test], ys[~test], x.ids[test], ys[test]))
    return Maps(maps, donor_layers, np.array(r2, np.float32), np.array(r2_token, np.float32), held)


def fill_unchanged_layers(shift: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """(layer, hidden) the control fine-tune's shift with every layer it leaves unchanged
    (an all-zero row: a LoRA on later layers only, as the persona organisms' minimal
    adapters on layers 2, 4, 6 until 2026-12-05) given the shift of the nearest layer it changes (ties:
    the later one), so the wrong-source control has a direction at every layer; and the
    layers filled. A control that changes no layer has no direction at all: ValueError."""
    changed = np.flatnonzero(np.linalg.norm(shift, axis=-1) > 0)
    if len(changed) == 0:
        raise ValueError("the control fine-tune changes no layer's answer-token means: no wrong-source direction")
    out, filled = shift.copy(), []
    for layer in range(len(shift)):
        if layer not in changed:
            nearest = changed[np.argmin(np.abs(changed - layer) - 1e-3 * (changed > layer))]
            out[layer] = shift[nearest]
            filled.append(layer)
    return out, filled


def direction_names(seeds: int) -> list[tuple[str, str, int]]:
    """(name, control, seed) of every direction, in the stored order (seed -1: not drawn)."""
    names = [(MAPPED, "", -1), (NATIVE, "", -1)]
    for control in TRANSFER_CONTROLS:
        if control in SEEDED:
            names += [(f"{control}#{s}", control, s) for s in range(seeds)]
        else:
            names.append((control, control, -1))
    return names


def has_direction(directions: xr.Dataset, kind: str) -> bool:
    """`kind` has a direction in this family's `em_directions`."""
    return kind in directions.finetune.values and bool(directions.has_direction.sel(finetune=kind))


def receiver_directions(
    donor_dirs: xr.Dataset, receiver_dirs: xr.Dataset, donor_shift: np.ndarray, maps: Maps, kinds: list[str],
    settings: EmTransferSettings, rng: np.random.Generator,
) -> xr.Dataset:
    """(finetune, vector, layer, hidden) every direction in the receiver's space; NaN for a
    kind that lacks a direction on either side (`has_direction` false)."""
    names = direction_names(settings.random_seeds)
    n_layers, d = receiver_dirs.sizes["layer"], receiver_dirs.sizes["hidden"]
    out = np.full((len(kinds), len(names), n_layers, d), np.nan, np.float32)
    has = np.array([has_direction(donor_dirs, k) and has_direction(receiver_dirs, k) for k in kinds])
    index = {name: i for i, (name, _, _) in enumerate(names)}
    shift = settings.wrong_layer_shift
    for k, kind in enumerate(kinds):
        if not has[k]:
            continue
        v_d = donor_dirs.direction.sel(finetune=kind).values
        mapped = np.stack([maps.carry(layer, v_d[maps.donor_layer[layer]]) for layer in range(n_layers)])
        out[k, index[MAPPED]] = mapped
        out[k, index[NATIVE]] = receiver_dirs.direction.sel(finetune=kind).values
        out[k, index["wrong_layer"]] = mapped[(np.arange(n_layers) + shift) % n_layers]
        out[k, index["wrong_source"]] = [maps.carry(layer, donor_shift[maps.donor_layer[layer]]) for layer in range(n_layers)]
        for layer in range(n_layers):
            # Orthonormal rows spanning mapped and native: the orthogonal control avoids both.
            avoid = np.linalg.qr(np.stack([out[k, index[MAPPED], layer], out[k, index[NATIVE], layer]]).T.astype(np.float64))[0].T
            for s in range(settings.random_seeds):
                out[k, index[f"random#{s}"], layer] = rng.standard_normal(d)
                out[k, index[f"orthogonal#{s}"], layer] = analysis.random_subspace(d, 1, rng, avoid)[0]
    cos = np.full(out.shape[:3], np.nan, np.float32)
    for k in np.flatnonzero(has):
        for i in range(len(names)):
            cos[k, i] = [analysis.cosine(out[k, i, layer], out[k, index[NATIVE], layer]) for layer in range(n_layers)]
    return xr.Dataset(
        {
            "direction": (("finetune", "vector", "layer", "hidden"), out),
            "direction_norm": (("finetune", "vector", "layer"), np.linalg.norm(out, axis=-1).astype(np.float32)),
            "cosine_native": (("finetune", "vector", "layer"), cos),
            "has_direction": (("finetune",), has),
        },
        coords={
            "finetune": text(kinds),
            "vector": text(n for n, _, _ in names),
            "control": ("vector", text(c for _, c, _ in names)),
            "seed": ("vector", np.array([s for _, _, s in names], np.int32)),
            "layer": np.arange(n_layers),
        },
    )


def separation(directions: xr.Dataset, samples: xr.Dataset, acts: xr.Dataset) -> np.ndarray:
    """(finetune, vector, layer) balanced held-out separation of the receiver fine-tune's
    misaligned vs aligned responses along each direction (NaN where there is none)."""
    shape = (directions.sizes["finetune"], directions.sizes["vector"], directions.sizes["layer"])
    out = np.full(shape, np.nan, np.float32)
    for k, kind in enumerate(str(f) for f in directions.finetune.values):
        if not bool(directions.has_direction.values[k]) or kind not in acts.finetune.values:
            continue
        sets = class_rows(samples, kind, acts.resid.sel(finetune=kind).values)
        for layer in range(shape[2]):
            parts = [sets[split, c][:, layer] for split in ("fit", "test") for c in (ALIGNED, MISALIGNED)]
            if min(len(p) for p in parts[:2]) == 0:
                continue
            for i in range(shape[1]):
                out[k, i, layer] = analysis.separation_accuracy(directions.direction.values[k, i, layer], *parts)
    return out


# ---------------------------------------------------------------- conditions in the receiver


def _vectors(directions: xr.Dataset, kind: str, control: str) -> list[tuple[int, np.ndarray]]:
    """(seed, (layer, hidden)) of one named direction or control's draws."""
    ds = directions.sel(finetune=kind)
    rows = [i for i, (n, c) in enumerate(zip(ds.vector.values, ds.control.values)) if n == control or c == control]
    return [(int(ds.seed.values[i]), ds.direction.values[i]) for i in rows]


def ablation_plans(directions: xr.Dataset, kind: str, residuals: C.Residuals, layers: list[int],
                   aligned: C.Residuals | None = None, where: Mapping[str, str] = C.EVERYWHERE) -> list[Planned]:
    """In the receiver's fine-tune `kind`: its baseline, the mapped and the native directions
    ablated layer-wise, and each control's direction at each of those layers, matched to the
    mapped ablation at every activation (`conditions.matched`: the same change norm there).
    At `layers` (`EmSettings.ablated_layers`); with `aligned` (the receiver base's residuals),
    each coordinate set to its mean over them (`conditions.ablate_edit`), else to 0; at the
    positions `where` says (`conditions.ABLATE_WHERE`; default every position but the first)."""
    prefix = f"{kind}/ablate"
    plans = [C.baseline(kind)]
    references: list = []
    for name, plan_kind in ((MAPPED, "transfer"), (NATIVE, "ablate")):
        (_, v), = _vectors(directions, kind, name)
        edits = [C.ablate_edit(layer, v[layer], aligned) for layer in layers]
        if name == MAPPED:
            references = edits
        plans.append(Planned(kind, f"{prefix}/{name}", plan_kind, [C.condition(f"{prefix}/{name}", edits, **where)], name,
                             mode="ablate", perturbation_norm=C.mean_norm(edits, residuals)))
    for control in TRANSFER_CONTROLS:
        conds = [
            C.condition(f"{prefix}/{control}", [C.matched(edit, v[edit.layer]) for edit in references], max(seed, 0), **where)
            for seed, v in _vectors(directions, kind, control)
        ]
        plans.append(Planned(kind, f"{prefix}/{control}", "control", conds, control, control=control, target=f"{prefix}/{MAPPED}",
                             mode="ablate", perturbation_norm=float(np.mean([C.mean_norm(c.edits, residuals) for c in conds]))))
    return plans


def decision_plans(directions: xr.Dataset, kind: str, base_last: C.Residuals, ft_last: C.Residuals) -> list[Planned]:
    """In the receiver's fine-tune `kind`, at the decision token (`conditions.DECISION`): the
    mapped and the native directions' coordinates set to the receiver base's mean there
    (`base_last`: its last-token residuals on the fine-tune's general fit prompts), and each
    control's direction matched to the mapped clamp at every edited activation."""
    prefix = f"{kind}/clamp"
    plans, references = [], []
    for name, plan_kind in ((MAPPED, "transfer"), (NATIVE, "ablate")):
        (_, v), = _vectors(directions, kind, name)
        edits = C.decision_clamps(dict(enumerate(v)), base_last)
        if name == MAPPED:
            references = edits
        plans.append(Planned(kind, f"{prefix}/{name}", plan_kind, [C.condition(f"{prefix}/{name}", edits, **C.DECISION)], name,
                             mode="clamp", perturbation_norm=C.mean_norm(edits, ft_last)))
    for control in TRANSFER_CONTROLS:
        conds = [
            C.condition(f"{prefix}/{control}", [C.matched(edit, v[edit.layer]) for edit in references], max(seed, 0), **C.DECISION)
            for seed, v in _vectors(directions, kind, control)
        ]
        plans.append(Planned(kind, f"{prefix}/{control}", "control", conds, control, control=control, target=f"{prefix}/{MAPPED}",
                             mode="clamp", perturbation_norm=float(np.mean([C.mean_norm(c.edits, ft_last) for c in conds]))))
    return plans


def steering_plans(directions: xr.Dataset, kind: str, layer: int, lambdas: list[float]) -> list[Planned]:
    """The receiver's base steered at `layer` with each direction at lambda times the norm of the
    receiver's own direction there: mapped, native and every control at that same norm."""
    native = float(directions.direction_norm.sel(finetune=kind, vector=NATIVE, layer=layer))
    plans = []
    for lam in lambdas:
        norm = lam * native
        prefix = f"{BASE}/steer/{kind}/x{lam:g}"
        for name, plan_kind in ((MAPPED, "transfer"), (NATIVE, "steer")):
            (_, v), = _vectors(directions, kind, name)
            plans.append(Planned(BASE, f"{prefix}/{name}", plan_kind, [C.condition(f"{prefix}/{name}", [C.steer_edit(layer, v[layer], norm)])],
                                 name, lam, mode="steer", perturbation_norm=norm))
        for control in TRANSFER_CONTROLS:
            conds = [C.condition(f"{prefix}/{control}", [C.steer_edit(layer, v[layer], norm)], max(seed, 0))
                     for seed, v in _vectors(directions, kind, control)]
            plans.append(Planned(BASE, f"{prefix}/{control}", "control", conds, control, lam, control, f"{prefix}/{MAPPED}", "steer", norm))
    return plans


def kinds_with_direction(directions: xr.Dataset) -> list[str]:
    return [str(k) for k, has in zip(directions.finetune.values, directions.has_direction.values) if bool(has)]
