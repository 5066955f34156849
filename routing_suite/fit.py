"""The fit stage: directions, probes and subspaces from the stored activations.

Everything is fit on the `fit` split at the last prompt token; probe
accuracies are measured on the held-out `test` split. Results go to the
store's `fit` group (layout in `routing_suite.schema`).
"""

from __future__ import annotations

import logging

import numpy as np
import xarray as xr

from routing_suite import analysis, schema
from routing_suite.errors import ConfigError

log = logging.getLogger(__name__)

TARGETS = ("eval_mean", "deploy_mean", "pooled_mean")
FIT_SITES = ("resid", "attn")
# The content contrast of the semantic control: two topics under the same
# framing. These two when the fit split has them (the organisms' task), else
# its first two topics in prompt order (a real model's prompt set).
SEMANTIC_TOPICS = ("color", "city")


def _split(acts: xr.Dataset, split: str) -> xr.Dataset:
    return acts.sel(prompt=acts.split.values == split)


def _last(values: xr.DataArray) -> np.ndarray:
    return values.sel(position="last").values if "last" in values.position.values else values.isel(position=-1).values


def semantic_topics(acts: xr.Dataset) -> tuple[str, str]:
    """SEMANTIC_TOPICS if the fit split has both, else its first two topics in prompt order."""
    topics = list(dict.fromkeys(str(t) for t in _split(acts, "fit").topic.values))
    if set(SEMANTIC_TOPICS) <= set(topics):
        return SEMANTIC_TOPICS
    if len(topics) < 2:
        raise ConfigError(f"the fit split has topics {topics}; the semantic control needs two")
    return topics[0], topics[1]


def semantic_pairs(acts: xr.Dataset, framing: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """Indices of fit prompts pairing topic A with topic B (same entity, same cue).

    Prompt ids read `<entity>-<topic>-<cue>`."""
    fit = _split(acts, "fit")
    ids = [str(p) for p in fit.prompt.values]
    topics = [str(t) for t in fit.topic.values]
    a_topic, b_topic = semantic_topics(acts)
    by_key = {}
    for i, (pid, topic) in enumerate(zip(ids, topics)):
        entity, _, cue = pid.split("-")
        by_key[(entity, cue, topic)] = i
    pairs = [(i, by_key[(e, c, b_topic)]) for (e, c, t), i in by_key.items() if t == a_topic and (e, c, b_topic) in by_key]
    if not pairs:
        raise ConfigError(f"the fit split has no {a_topic}/{b_topic} prompt pairs for the semantic control")
    a, b = zip(*pairs)
    return np.array(a), np.array(b)


def fit(acts: xr.Dataset, max_rank: int) -> xr.Dataset:
    """Per model, site and layer: mean paired difference, its norm, a held-out
    rank-one probe accuracy, a `max_rank` subspace and the clamp targets."""
    sites = [s for s in FIT_SITES if s in acts]
    if not sites:
        raise ConfigError(f"the store holds none of the sites the fit needs ({list(FIT_SITES)})")
    fit_set, test_set = _split(acts, "fit"), _split(acts, "test")
    n_fit = fit_set.sizes["prompt"]
    if n_fit < 2 or test_set.sizes["prompt"] < 1:
        raise ConfigError(f"too few prompts to fit and test (fit: {n_fit}, test: {test_set.sizes['prompt']})")
    if max_rank > n_fit:
        raise ConfigError(f"intervention.rank={max_rank} is larger than the number of fit pairs ({n_fit})")
    layers = acts.layer.values
    d = acts.sizes["hidden"]
    models = list(schema.MODELS)
    shape_dir = (len(models), len(sites), len(layers))
    direction = np.zeros((*shape_dir, d), np.float32)
    probe = np.zeros(shape_dir, np.float32)
    basis = np.zeros((*shape_dir, max_rank, d), np.float32)
    targets = np.zeros((*shape_dir, len(TARGETS), max_rank), np.float32)
    semantic = np.zeros((*shape_dir, max_rank, d), np.float32)
    semantic_targets = np.zeros((*shape_dir, max_rank), np.float32)
    a_idx, b_idx = semantic_pairs(acts)
    for m, model in enumerate(models):
        for s, site in enumerate(sites):
            fit_vals = _last(fit_set[site].sel(model=model))  # (framing, prompt, layer, hidden)
            test_vals = _last(test_set[site].sel(model=model))
            for li in range(len(layers)):
                ev, dp = fit_vals[0, :, li], fit_vals[1, :, li]
                diffs = analysis.paired_differences(ev, dp)
                direction[m, s, li] = diffs.mean(0)
                probe[m, s, li] = analysis.rank_one_probe_accuracy(direction[m, s, li], ev, dp, test_vals[0, :, li], test_vals[1, :, li])
                b = analysis.subspace(diffs, max_rank)
                basis[m, s, li] = b
                eval_coords, deploy_coords = (ev @ b.T).mean(0), (dp @ b.T).mean(0)
                targets[m, s, li] = [eval_coords, deploy_coords, 0.5 * (eval_coords + deploy_coords)]
                # The content contrast, with the routing subspace projected out: in a
                # fine-tune whose framing signal is large, topic differences also
                # differ in that signal's size, and the raw contrast's main
                # direction was the routing direction itself (|cos| 0.999).
                content = ev[a_idx] - ev[b_idx]
                content = content - (content @ b.T) @ b
                sb = analysis.subspace(content, min(max_rank, len(a_idx)))
                semantic[m, s, li, : sb.shape[0]] = sb
                semantic_targets[m, s, li, : sb.shape[0]] = (ev @ sb.T).mean(0)
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
            "cos_base_finetuned": (("site", "layer"), cos.astype(np.float32)),
            "diff_change_norm": (("site", "layer"), change.astype(np.float32)),
        },
        coords=coords,
        attrs={"n_fit": int(n_fit), "n_test": int(test_set.sizes["prompt"]), "semantic_topics": list(semantic_topics(acts))},
    )
