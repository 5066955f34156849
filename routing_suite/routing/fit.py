"""The fit stage: directions, probes and subspaces from the stored activations.

Everything is fit on the `fit` split at the last prompt token; probe
accuracies are measured on the `localize` split (choices made from them, such
as the non-routing subspace, never see the `test` split the interventions are
scored on). Results go to the store's `fit` group (layout in
`routing_suite.store_format`).
"""

from __future__ import annotations

import logging

import numpy as np
import xarray as xr

from routing_suite import analysis, store_format
from routing_suite.errors import ConfigError

log = logging.getLogger(__name__)

TARGETS = ("eval_mean", "deploy_mean", "pooled_mean")
FIT_SITES = ("resid", "attn")
# The content contrast of the semantic control: two topics under the same
# framing. These two when the fit split has them (the organisms' task), else
# its first two topics in prompt order (a real model's or a prompt file's).
SEMANTIC_TOPICS = ("color", "city")
# A direction carries no framing signal (DESIGN: non-routing) when its held-out
# rank-one probe tells eval from deploy no better than this.
NON_ROUTING_MAX_PROBE = 0.6
# How many of the activations' main directions (routing subspace projected out)
# are tried, in order of variance, for the non-routing subspace.
NON_ROUTING_CANDIDATES = 32


def _split(acts: xr.Dataset, split: str) -> xr.Dataset:
    return acts.sel(prompt=acts.split.values == split)


def _last(values: xr.DataArray) -> np.ndarray:
    return values.sel(position="last").values if "last" in values.position.values else values.isel(position=-1).values


def fit_topics(topics: list[str]) -> tuple[str, str] | None:
    """The semantic control's two topics among the fit split's (in prompt order):
    SEMANTIC_TOPICS if it has both, else its first two; None when it has fewer than two."""
    found = list(dict.fromkeys(topics))
    if set(SEMANTIC_TOPICS) <= set(found):
        return SEMANTIC_TOPICS
    return (found[0], found[1]) if len(found) >= 2 else None


def semantic_pairs(acts: xr.Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """Indices of fit prompts pairing topic A with topic B under the eval framing; None
    when the fit split has fewer than two topics (no semantic control can be built).

    Prompt ids of the shape `<entity>-<topic>-<cue>` (the organisms' and the chat
    task's) pair the same entity under the same cue; other ids (a prompt file) pair
    the i-th prompt of topic A with the i-th of topic B, in file order."""
    fit = _split(acts, "fit")
    ids = [str(p) for p in fit.prompt.values]
    topics = [str(t) for t in fit.topic.values]
    chosen = fit_topics(topics)
    if chosen is None:
        return None
    a_topic, b_topic = chosen
    parts = [pid.split("-") for pid in ids]
    if all(len(p) == 3 and p[1] == t for p, t in zip(parts, topics)):
        by_key = {(entity, cue, topic): i for i, ((entity, _, cue), topic) in enumerate(zip(parts, topics))}
        pairs = [(i, by_key[(e, c, b_topic)]) for (e, c, t), i in by_key.items() if t == a_topic and (e, c, b_topic) in by_key]
    else:
        pairs = list(zip([i for i, t in enumerate(topics) if t == a_topic], [i for i, t in enumerate(topics) if t == b_topic]))
    if not pairs:
        raise ConfigError(f"the fit split has no {a_topic}/{b_topic} prompt pairs for the semantic control")
    a, b = zip(*pairs)
    return np.array(a), np.array(b)


def non_routing_subspace(
    fit_eval: np.ndarray, fit_deploy: np.ndarray, held_eval: np.ndarray, held_deploy: np.ndarray, routing: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rank, d) orthonormal rows that carry no framing signal, and each row's probe accuracy.

    The candidates are the main directions (by variance) of the fit activations
    of both framings with the routing subspace projected out; a candidate is
    kept when its rank-one probe (threshold from the fit split) tells the held
    out eval and deploy prompts apart no better than NON_ROUTING_MAX_PROBE.
    Rows that no candidate fills are zero (accuracy NaN): the control that
    needs them is then left out, saying why."""
    pooled = np.concatenate([fit_eval, fit_deploy]).astype(np.float64)
    pooled = pooled - pooled.mean(0)
    pooled = pooled - (pooled @ routing.T) @ routing
    _, singular, vt = np.linalg.svd(pooled, full_matrices=False)
    basis = np.zeros((rank, fit_eval.shape[1]), np.float32)
    accuracy = np.full(rank, np.nan, np.float32)
    kept = 0
    for row, value in zip(vt[:NON_ROUTING_CANDIDATES], singular[:NON_ROUTING_CANDIDATES]):
        if kept == rank or value <= 1e-6 * singular[0]:
            break
        # Sign-free: a probe along u or -u tells the framings apart equally well.
        acc = analysis.rank_one_probe_accuracy(row, fit_eval, fit_deploy, held_eval, held_deploy)
        acc = max(acc, 1 - acc)
        if acc <= NON_ROUTING_MAX_PROBE:
            basis[kept], accuracy[kept] = row, acc
            kept += 1
    return basis, accuracy


def fit(acts: xr.Dataset, max_rank: int) -> xr.Dataset:
    """Per model, site and layer: mean paired difference, its norm, a held-out
    rank-one probe accuracy, a `max_rank` subspace and the clamp targets, the
    semantic (content) subspace and the non-routing subspace."""
    sites = [s for s in FIT_SITES if s in acts]
    if not sites:
        raise ConfigError(f"the store holds none of the sites the fit needs ({list(FIT_SITES)})")
    fit_set, held_set = _split(acts, "fit"), _split(acts, "localize")
    n_fit = fit_set.sizes["prompt"]
    if n_fit < 2 or held_set.sizes["prompt"] < 1:
        raise ConfigError(f"too few prompts to fit and probe (fit: {n_fit}, localize: {held_set.sizes['prompt']})")
    if max_rank > n_fit:
        raise ConfigError(f"intervention.rank={max_rank} is larger than the number of fit pairs ({n_fit})")
    layers = acts.layer.values
    d = acts.sizes["hidden"]
    models = list(store_format.MODELS)
    shape_dir = (len(models), len(sites), len(layers))
    direction = np.zeros((*shape_dir, d), np.float32)
    probe = np.zeros(shape_dir, np.float32)
    basis = np.zeros((*shape_dir, max_rank, d), np.float32)
    targets = np.zeros((*shape_dir, len(TARGETS), max_rank), np.float32)
    semantic = np.zeros((*shape_dir, max_rank, d), np.float32)
    semantic_targets = np.zeros((*shape_dir, max_rank), np.float32)
    non_routing = np.zeros((*shape_dir, max_rank, d), np.float32)
    non_routing_probe = np.full((*shape_dir, max_rank), np.nan, np.float32)
    contrast = semantic_pairs(acts)
    for m, model in enumerate(models):
        for s, site in enumerate(sites):
            fit_vals = _last(fit_set[site].sel(model=model))  # (framing, prompt, layer, hidden)
            held_vals = _last(held_set[site].sel(model=model))
            for li in range(len(layers)):
                ev, dp = fit_vals[0, :, li], fit_vals[1, :, li]
                h_ev, h_dp = held_vals[0, :, li], held_vals[1, :, li]
                diffs = analysis.paired_differences(ev, dp)
                direction[m, s, li] = diffs.mean(0)
                probe[m, s, li] = analysis.rank_one_probe_accuracy(direction[m, s, li], ev, dp, h_ev, h_dp)
                b = analysis.subspace(diffs, max_rank)
                basis[m, s, li] = b
                eval_coords, deploy_coords = (ev @ b.T).mean(0), (dp @ b.T).mean(0)
                targets[m, s, li] = [eval_coords, deploy_coords, 0.5 * (eval_coords + deploy_coords)]
                # The content contrast, with the routing subspace projected out: in a
                # fine-tune whose framing signal is large, topic differences also
                # differ in that signal's size, and the raw contrast's main
                # direction was the routing direction itself (|cos| 0.999).
                if contrast is not None:
                    content = ev[contrast[0]] - ev[contrast[1]]
                    content = content - (content @ b.T) @ b
                    sb = analysis.subspace(content, min(max_rank, len(contrast[0])))
                    semantic[m, s, li, : sb.shape[0]] = sb
                    semantic_targets[m, s, li, : sb.shape[0]] = (ev @ sb.T).mean(0)
                non_routing[m, s, li], non_routing_probe[m, s, li] = non_routing_subspace(ev, dp, h_ev, h_dp, b, max_rank)
    norms = np.linalg.norm(direction, axis=-1)
    cos = np.array([[analysis.cosine(direction[0, s, li], direction[1, s, li]) for li in range(len(layers))] for s in range(len(sites))])
    change = np.linalg.norm(direction[1] - direction[0], axis=-1)
    coords = {"model": models, "site": sites, "layer": layers, "rank": np.arange(max_rank), "target": list(TARGETS)}
    dims = ("model", "site", "layer")
    return xr.Dataset(
        {
            "direction": (dims + ("hidden",), direction),
            "direction_norm": (dims, norms.astype(np.float32)),
            "probe_accuracy": (dims, probe),
            "subspace": (dims + ("rank", "hidden"), basis),
            "target_coords": (dims + ("target", "rank"), targets),
            "semantic_subspace": (dims + ("rank", "hidden"), semantic),
            "semantic_target": (dims + ("rank",), semantic_targets),
            "non_routing_subspace": (dims + ("rank", "hidden"), non_routing),
            "non_routing_probe": (dims + ("rank",), non_routing_probe),
            "cos_base_finetuned": (("site", "layer"), cos.astype(np.float32)),
            "diff_change_norm": (("site", "layer"), change.astype(np.float32)),
        },
        coords=coords,
        attrs={"n_fit": int(n_fit), "n_probe": int(held_set.sizes["prompt"]), "probe_split": "localize",
               "semantic_topics": list(fit_topics([str(t) for t in fit_set.topic.values]) or []), "non_routing_max_probe": NON_ROUTING_MAX_PROBE},
    )
