"""Response-level directions: misaligned minus aligned answer-token means, per fine-tune and layer.

Fit on the fit split's general prompts (training entities, outside the
fine-tune's narrow topics); each direction's separation accuracy is measured
on the held-out test split's responses. A fine-tune with fewer than
`min_per_class` fit responses of either class gets no direction (NaN,
`has_direction` false), and the reason is logged.

`balance` says how the two classes' means are taken:

- "prompt" (the default): within each prompt answered both ways, the misaligned
  responses' mean minus the aligned ones', averaged over those prompts; a
  fine-tune needs `min_per_class` such prompts.
- "none": the two classes pooled over prompts, as the seed paper writes it.

Pooled means carry which prompts were answered each way. On the persona
organisms a fine-tune lies more on one general topic than the other, and the
pooled direction held that topic's words: the two fine-tunes' directions
pointed apart (cosine -0.9 to 0.3) where the paired ones agree (0.6-0.9;
llama, qwen2, gemma2 and mistral builds, 2026-12-06, README).
"""

from __future__ import annotations

import logging

import numpy as np
import xarray as xr

from routing_suite import analysis
from routing_suite.em.judge import ALIGNED, MISALIGNED
from routing_suite.em.settings import BALANCES
from routing_suite.store import text

log = logging.getLogger(__name__)

SPLITS = ("fit", "test")
CLASSES = (ALIGNED, MISALIGNED)


def _class_masks(samples: xr.Dataset, finetune: str, values: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """(split, class) -> (prompt, sample) mask of that fine-tune's general responses with finite values."""
    labels = samples.label.sel(model=finetune).values  # (prompt, sample)
    general = samples.general.sel(model=finetune).values[:, None] & np.ones(labels.shape, bool)
    finite = np.isfinite(values).all(axis=(-1, -2))
    split = samples.split.values[:, None]
    return {(part, c): general & finite & (split == part) & (labels == c) for part in SPLITS for c in CLASSES}


def class_rows(samples: xr.Dataset, finetune: str, values: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """(split, class) -> (n, layer, hidden) answer means of that fine-tune's general responses."""
    return {key: values[mask] for key, mask in _class_masks(samples, finetune, values).items()}


def _paired_prompts(masks: dict[tuple[str, str], np.ndarray]) -> int:
    """Fit-split prompts with responses of both classes."""
    return int((masks["fit", ALIGNED].any(1) & masks["fit", MISALIGNED].any(1)).sum())


def fit_directions(samples: xr.Dataset, acts: xr.Dataset, min_per_class: int, balance: str = "prompt") -> xr.Dataset:
    """The `em_directions` group (layout in routing_suite/store_format.py)."""
    if balance not in BALANCES:
        raise ValueError(f"balance {balance!r} is not one of {list(BALANCES)}")
    finetunes = [str(f) for f in acts.finetune.values]
    layers = [int(x) for x in acts.layer.values]
    d = acts.sizes["hidden"]
    direction = np.full((len(finetunes), len(layers), d), np.nan, np.float32)
    accuracy = np.full((len(finetunes), len(layers)), np.nan, np.float32)
    counts = np.zeros((len(finetunes), len(SPLITS), len(CLASSES)), np.int32)
    paired = np.zeros(len(finetunes), np.int32)
    prompt_of = np.arange(samples.sizes["prompt"])[:, None] * np.ones((1, samples.sizes["sample"]), np.int64)
    for f, name in enumerate(finetunes):
        values = acts.resid.sel(finetune=name).values
        masks = _class_masks(samples, name, values)
        sets = {key: values[mask] for key, mask in masks.items()}
        counts[f] = [[len(sets[part, c]) for c in CLASSES] for part in SPLITS]
        paired[f] = _paired_prompts(masks)
        if counts[f, 0].min() < min_per_class or (balance == "prompt" and paired[f] < min_per_class):
            log.warning("%s: no direction (fit split: %d aligned and %d misaligned general responses, %d prompts answered "
                        "both ways; needs %d of each%s)", name, counts[f, 0, 0], counts[f, 0, 1], paired[f], min_per_class,
                        " and as many prompts" if balance == "prompt" else "")
            continue
        groups = {c: prompt_of[masks["fit", c]] for c in CLASSES}
        for li in range(len(layers)):
            neg, pos = sets["fit", ALIGNED][:, li], sets["fit", MISALIGNED][:, li]
            if balance == "prompt":
                direction[f, li] = analysis.paired_mean_difference(neg, pos, groups[ALIGNED], groups[MISALIGNED])[0]
            else:
                direction[f, li] = analysis.mean_difference(neg, pos)
            accuracy[f, li] = analysis.separation_accuracy(
                direction[f, li], neg, pos, sets["test", ALIGNED][:, li], sets["test", MISALIGNED][:, li]
            )
    has = np.isfinite(direction).all(axis=(1, 2))
    cosine = np.full((len(finetunes), len(finetunes), len(layers)), np.nan, np.float32)
    for li in range(len(layers)):
        cosine[np.ix_(has, has, [li])] = analysis.cosine_matrix(direction[has, li])[..., None]
    return xr.Dataset(
        {
            "direction": (("finetune", "layer", "hidden"), direction),
            "direction_norm": (("finetune", "layer"), np.linalg.norm(direction, axis=-1).astype(np.float32)),
            "separation_accuracy": (("finetune", "layer"), accuracy),
            "has_direction": (("finetune",), has),
            "n_responses": (("finetune", "split", "label"), counts),
            "paired_prompts": (("finetune",), paired),
            "cosine": (("finetune", "finetune_b", "layer"), cosine),
        },
        coords={"finetune": text(finetunes), "finetune_b": text(finetunes), "layer": layers, "split": text(SPLITS),
                "label": text(CLASSES)},
        attrs={"min_per_class": int(min_per_class), "balance": balance},
    )


def add_planted(directions: xr.Dataset, misaligned: dict[str, np.ndarray], aligned: dict[str, np.ndarray],
                unit: np.ndarray | None = None, layers: list[int] | None = None) -> xr.Dataset:
    """The persona base's planted variable next to the fine-tunes' directions: per layer,
    the base's misaligned - aligned context residual at the question's last token
    (`persona_task.persona_probes`; `misaligned`/`aligned`: split ("fit", "test") ->
    (n, layer, hidden)), fit on the fit split; its held-out separation of the test split's
    contexts; and each fine-tune direction's cosine with it. A direction method that found
    the persona has cosine far from 0 here. The separation says the earlier answer's
    persona is readable at the question, not that the base acts on it: the negative base
    reads it as well (llama: 0.98-1.00) and answers the other topic truthfully anyway.
    `unit`: the variable is known (a planted base's u, `organisms/planting`): it is the
    planted direction at every layer, the contexts only measure its separation.
    `layers`: where the base was trained to hold it (`planting.planted_layers`; None: every
    layer), as `planted_layer`: the planted edits act there only (`conditions.planted_per_layer`)."""
    n_layers = directions.sizes["layer"]
    if unit is not None:
        planted = np.repeat(np.asarray(unit, np.float32)[None], n_layers, axis=0)
    else:
        planted = np.stack([analysis.mean_difference(aligned["fit"][:, li], misaligned["fit"][:, li]) for li in range(n_layers)])
    separation = [analysis.separation_accuracy(planted[li], aligned["fit"][:, li], misaligned["fit"][:, li], aligned["test"][:, li],
                                               misaligned["test"][:, li]) for li in range(n_layers)]
    found = directions.direction.values  # (finetune, layer, hidden)
    cosine = np.einsum("fld,ld->fl", found, planted) / (np.linalg.norm(found, axis=-1) * np.linalg.norm(planted, axis=-1)[None])
    return directions.assign(
        planted=(("layer", "hidden"), planted.astype(np.float32)),
        planted_separation=(("layer",), np.asarray(separation, np.float32)),
        planted_cosine=(("finetune", "layer"), cosine.astype(np.float32)),
        planted_layer=(("layer",), np.ones(n_layers, bool) if layers is None else np.isin(directions.layer.values, list(layers))),
    )


def pick_layer(directions: xr.Dataset, requested: int | None) -> int:
    """The steering layer: `requested`, or the layer whose worst separation accuracy
    over the fine-tunes with a direction is highest (ties: the deeper one), never the
    last layer of a deeper stack than one: its output is read by no layer, only by the
    unembedding, so a vector added there biases each token's logits and sets no state
    that a later token reads. (Until em_code 12 it could be picked: where separation is
    flat, the tie went to it, and steering the base induced nothing in the two planted
    builds where it did, llama and gemma2 seed 2, at 0% with either direction.)"""
    layers = [int(x) for x in directions.layer.values]
    if requested is not None:
        return requested
    acc = directions.separation_accuracy.sel(finetune=directions.has_direction.values).values
    if acc.size == 0 or not np.isfinite(acc).any():
        return layers[len(layers) // 2]
    worst = np.nanmin(np.where(np.isfinite(acc), acc, -np.inf), axis=0)
    candidates = list(zip(layers, worst))[:-1] if len(layers) > 1 else list(zip(layers, worst))
    best = max(w for _, w in candidates)
    return max(layer for layer, w in candidates if w >= best - 1e-6)
