"""Response-level directions: misaligned minus aligned answer-token means, per fine-tune and layer.

Fit on the fit split's general prompts (training entities, outside the
fine-tune's narrow topics); each direction's separation accuracy is measured
on the held-out test split's responses. A fine-tune with fewer than
`min_per_class` fit responses of either class gets no direction (NaN,
`has_direction` false), and the reason is logged.
"""

from __future__ import annotations

import logging

import numpy as np
import xarray as xr

from routing_suite import analysis
from routing_suite.em.judge import ALIGNED, MISALIGNED
from routing_suite.store import text

log = logging.getLogger(__name__)

SPLITS = ("fit", "test")
CLASSES = (ALIGNED, MISALIGNED)


def class_rows(samples: xr.Dataset, finetune: str, values: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """(split, class) -> (n, layer, hidden) answer means of that fine-tune's general responses."""
    labels = samples.label.sel(model=finetune).values  # (prompt, sample)
    general = samples.general.sel(model=finetune).values[:, None] & np.ones(labels.shape, bool)
    finite = np.isfinite(values).all(axis=(-1, -2))
    split = samples.split.values[:, None]
    return {(part, c): values[general & finite & (split == part) & (labels == c)] for part in SPLITS for c in CLASSES}


def fit_directions(samples: xr.Dataset, acts: xr.Dataset, min_per_class: int) -> xr.Dataset:
    """The `em_directions` group (layout in routing_suite/store_format.py)."""
    finetunes = [str(f) for f in acts.finetune.values]
    layers = [int(x) for x in acts.layer.values]
    d = acts.sizes["hidden"]
    direction = np.full((len(finetunes), len(layers), d), np.nan, np.float32)
    accuracy = np.full((len(finetunes), len(layers)), np.nan, np.float32)
    counts = np.zeros((len(finetunes), len(SPLITS), len(CLASSES)), np.int32)
    for f, name in enumerate(finetunes):
        sets = class_rows(samples, name, acts.resid.sel(finetune=name).values)
        counts[f] = [[len(sets[part, c]) for c in CLASSES] for part in SPLITS]
        if counts[f, 0].min() < min_per_class:
            log.warning("%s: no direction (fit split: %d aligned and %d misaligned general responses; needs %d of each)",
                        name, counts[f, 0, 0], counts[f, 0, 1], min_per_class)
            continue
        for li in range(len(layers)):
            neg, pos = sets["fit", ALIGNED][:, li], sets["fit", MISALIGNED][:, li]
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
            "cosine": (("finetune", "finetune_b", "layer"), cosine),
        },
        coords={"finetune": text(finetunes), "finetune_b": text(finetunes), "layer": layers, "split": text(SPLITS),
                "label": text(CLASSES)},
        attrs={"min_per_class": int(min_per_class)},
    )


def add_planted(directions: xr.Dataset, misaligned: dict[str, np.ndarray], aligned: dict[str, np.ndarray]) -> xr.Dataset:
    """The persona base's planted variable next to the fine-tunes' directions: per layer,
    the base's misaligned - aligned context residual at the question's last token
    (`persona_task.persona_probes`; `misaligned`/`aligned`: split ("fit", "test") ->
    (n, layer, hidden)), fit on the fit split; its held-out separation of the test split's
    contexts; and each fine-tune direction's cosine with it. A direction method that found
    the persona has cosine far from 0 here. The separation says the earlier answer's
    persona is readable at the question, not that the base acts on it: the negative base
    reads it as well (llama: 0.98-1.00) and answers the other topic truthfully anyway."""
    layers = directions.sizes["layer"]
    planted = np.stack([analysis.mean_difference(aligned["fit"][:, li], misaligned["fit"][:, li]) for li in range(layers)])
    separation = [analysis.separation_accuracy(planted[li], aligned["fit"][:, li], misaligned["fit"][:, li], aligned["test"][:, li],
                                               misaligned["test"][:, li]) for li in range(layers)]
    found = directions.direction.values  # (finetune, layer, hidden)
    cosine = np.einsum("fld,ld->fl", found, planted) / (np.linalg.norm(found, axis=-1) * np.linalg.norm(planted, axis=-1)[None])
    return directions.assign(
        planted=(("layer", "hidden"), planted.astype(np.float32)),
        planted_separation=(("layer",), np.asarray(separation, np.float32)),
        planted_cosine=(("finetune", "layer"), cosine.astype(np.float32)),
    )


def pick_layer(directions: xr.Dataset, requested: int | None) -> int:
    """The steering layer: `requested`, or the layer whose worst separation accuracy
    over the fine-tunes with a direction is highest (ties: the deeper one)."""
    layers = [int(x) for x in directions.layer.values]
    if requested is not None:
        return requested
    acc = directions.separation_accuracy.sel(finetune=directions.has_direction.values).values
    if acc.size == 0 or not np.isfinite(acc).any():
        return layers[len(layers) // 2]
    worst = np.nanmin(np.where(np.isfinite(acc), acc, -np.inf), axis=0)
    best = worst.max()
    return max(layer for layer, w in zip(layers, worst) if w >= best - 1e-6)
