"""Synthetic run stores, laid out exactly as routing_suite/store_format.py describes.

No model is involved: per-prompt outcomes are seeded 0/1 draws around rates
that look like a real routing study (a large fine-tuned gap that the clamp
closes, controls that leave it open), and the `fit` / `localize` groups hold
small but well-formed arrays for the plots.
"""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from routing_suite import store_format

FAMILIES = ("llama", "qwen2", "gemma2", "mistral")
BEHAVIORS = ("underperform", "refuse", "installed")
CONDITIONS = ("baseline", "clamp", "random", "orthogonal", "non_routing", "semantic", "other_layer")
KINDS = ("baseline", "intervention", "control", "control", "control", "control", "comparison")
SITES = ("attn", "resid")
N_LAYERS = {"llama": 6, "qwen2": 6, "gemma2": 8, "mistral": 6}
N_HEADS = 4
HIDDEN = 16

# (eval rate, deploy rate) per condition: the clamp raises the eval rate towards
# the deploy rate; the controls barely move anything.
RATES = {
    "baseline": (0.15, 0.9),
    "clamp": (0.8, 0.88),
    "random": (0.17, 0.9),
    "orthogonal": (0.15, 0.88),
    "non_routing": (0.2, 0.9),
    "semantic": (0.25, 0.88),
    "other_layer": (0.6, 0.85),
}
# Prompts per sampling unit (cluster): an entity under one cue pair.
UNIT_SIZE = 4


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def outcomes_dataset(
    family: str,
    behavior: str,
    n_prompts: int = 48,
    rates: dict[str, tuple[float, float]] | None = None,
    seed: int = 0,
) -> xr.Dataset:
    """The `outcomes` group: per-prompt 0/1 outcomes for every condition and framing."""
    rates = rates or RATES
    conditions = [c for c in CONDITIONS if c in rates]
    kinds = [KINDS[CONDITIONS.index(c)] for c in conditions]
    rng = np.random.default_rng(_seed(family, behavior, seed))
    # One latent propensity per prompt and framing, shared by all conditions (with
    # a little per-condition jitter): conditions are paired over prompts, as in a
    # real run where the same prompts go through every condition.
    # Prompts of one unit share part of their propensity: units, not prompts, are the draws.
    unit_effect = np.repeat(rng.random((2, -(-n_prompts // UNIT_SIZE))), UNIT_SIZE, axis=1)[:, :n_prompts]
    latent = 0.5 * rng.random((2, n_prompts)) + 0.5 * unit_effect
    performed = np.stack(
        [latent + 0.1 * rng.normal(size=latent.shape) < np.array(rates[c])[:, None] for c in conditions]
    ).astype("float32")
    for i, c in enumerate(conditions):  # rates of exactly 0 or 1 mean every prompt
        for f, p in enumerate(rates[c]):
            if p <= 0 or p >= 1:
                performed[i, f] = float(p >= 1)
    correct = np.where(performed == 1, rng.random(performed.shape) < 0.95, rng.random(performed.shape) < 0.1)
    norm = np.array([0.0 if k == "baseline" else 3.0 + 0.01 * i for i, k in enumerate(kinds)], dtype="float32")
    ds = xr.Dataset(
        {
            "performed": (("condition", "framing", "prompt"), performed),
            "correct": (("condition", "framing", "prompt"), correct.astype("float32")),
            "perturbation_norm": (("condition",), norm),
        },
        coords={
            "condition": list(conditions),
            "kind": ("condition", kinds),
            "framing": list(store_format.FRAMINGS),
            "prompt": [f"p{i:04d}" for i in range(n_prompts)],
            "cluster": ("prompt", [f"u{i // UNIT_SIZE:03d}" for i in range(n_prompts)]),
        },
        attrs={
            "intervention": "clamp",
            "controls": [c for c, k in zip(conditions, kinds) if k == "control"],
            "window": [2, 4],
        },
    )
    return ds


def fit_dataset(family: str, behavior: str, seed: int = 0, replicate: str = "0", n_layers: int | None = None) -> xr.Dataset:
    """The `fit` group: directions, their norms and held-out probe accuracies per layer (each build its own draw)."""
    n_layers = n_layers or N_LAYERS[family]
    rng = np.random.default_rng(_seed("fit", family, behavior, seed, replicate))
    layers = np.arange(n_layers)
    depth = layers / max(n_layers - 1, 1)
    direction = rng.normal(size=(2, len(SITES), n_layers, HIDDEN)).astype("float32")
    direction[1] *= (1 + 3 * np.exp(-((depth - 0.5) ** 2) / 0.05))[None, :, None]
    base_acc = 0.5 + 0.05 * rng.random((len(SITES), n_layers))
    ft_acc = np.clip(
        0.55 + 0.4 * np.exp(-((depth - 0.5) ** 2) / 0.08) + 0.03 * rng.random((len(SITES), n_layers)), 0, 1
    )
    return xr.Dataset(
        {
            "direction": (("model", "site", "layer", "hidden"), direction),
            "direction_norm": (("model", "site", "layer"), np.linalg.norm(direction, axis=-1)),
            "probe_accuracy": (("model", "site", "layer"), np.stack([base_acc, ft_acc]).astype("float32")),
            "cos_base_finetuned": (("site", "layer"), rng.uniform(-0.2, 0.3, (len(SITES), n_layers)).astype("float32")),
            "diff_change_norm": (("site", "layer"), rng.uniform(0, 2, (len(SITES), n_layers)).astype("float32")),
        },
        coords={"model": list(store_format.MODELS), "site": list(SITES), "layer": layers},
    )


def localize_dataset(
    family: str, behavior: str, seed: int = 0, replicate: str = "0", n_layers: int | None = None, per_head: bool = True
) -> xr.Dataset:
    """The `localize` group: fraction of the gap each layer (and head) restores (each build its own
    draw); without `per_head` head_effect is all NaN, as a run with localize.per_head=false writes it."""
    n_layers = n_layers or N_LAYERS[family]
    rng = np.random.default_rng(_seed("localize", family, behavior, seed, replicate))
    depth = np.arange(n_layers) / max(n_layers - 1, 1)
    bump = np.exp(-((depth - 0.45) ** 2) / 0.03)
    layer_effect = np.stack([bump, 0.6 * bump]) + 0.05 * rng.normal(size=(2, n_layers))
    head_effect = layer_effect[:, :, None] * rng.dirichlet(np.ones(N_HEADS), size=(2, n_layers))
    if not per_head:
        head_effect = np.full_like(head_effect, np.nan)
    peak = int(np.argmax(bump))
    return xr.Dataset(
        {
            "layer_effect": (("source", "layer"), layer_effect.astype("float32")),
            "head_effect": (("source", "layer", "head"), head_effect.astype("float32")),
            # the fine-tune's weights at one layer on the base's inputs (a LoRA fine-tune's third measure)
            "weight_effect": (("layer",), (0.8 * bump + 0.02 * rng.normal(size=n_layers)).astype("float32")),
        },
        coords={
            "source": ["deploy_to_eval", "finetuned_to_base"],
            "layer": np.arange(n_layers),
            "head": np.arange(N_HEADS),
        },
        attrs={
            "window": [max(peak - 1, 0), min(peak + 1, n_layers - 1)],
            "rule": "smallest window restoring 80% of the gap",
        },
    )


def write_store(
    root: Path,
    family: str,
    behavior: str,
    *,
    n_prompts: int = 48,
    rates: dict[str, tuple[float, float]] | None = None,
    seed: int = 0,
    complete: bool | None = True,
    partial: bool = False,
    schema_version: int = store_format.SCHEMA_VERSION,
    finished_at: str | None = "2025-06-01T12:00:00+00:00",
    name: str | None = None,
    groups: tuple[str, ...] = ("fit", "localize", "outcomes"),
    replicate: str = "0",
    variant: str = "v1",
    settings: dict | None = None,
    n_layers: int | None = None,
    per_head: bool = True,
    planted: list[int] | None = None,
) -> Path:
    """Write one store (`complete` None leaves the attribute out) under `<root>/<family>_organism/<behavior>/<name>.zarr[.partial]`.

    `n_layers`: the fit / localize groups' depth (default N_LAYERS); `per_head` false: head_effect
    all NaN; `planted`: the fine-tune's layers, stored as digest_config.model.train.lora_layers."""
    digest = name or f"{_seed(family, behavior, seed, n_prompts, replicate, variant):08x}"
    suffix = store_format.PARTIAL_SUFFIX if partial else store_format.STORE_SUFFIX
    path = Path(root) / f"{family}_organism" / behavior / f"{digest}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    makers = {
        "fit": lambda: fit_dataset(family, behavior, seed, replicate, n_layers),
        "localize": lambda: localize_dataset(family, behavior, seed, replicate, n_layers, per_head),
        "outcomes": lambda: outcomes_dataset(family, behavior, n_prompts, rates, _seed(seed, replicate, variant)),
    }
    for group in groups:
        ds = makers[group]()
        with warnings.catch_warnings():
            # xarray writes string coordinates as fixed-length UTF-32, which zarr
            # flags as not yet in the v3 spec; the stages write them the same way.
            warnings.filterwarnings("ignore", message="The data type .* does not have a Zarr V3 specification")
            ds.to_zarr(path, group=group, mode="a", zarr_format=3, consolidated=False)
    digest_config = settings or {"model": {"family": family, "seed": replicate}, "behavior": {"name": behavior}}
    if planted is not None:
        digest_config = {**digest_config, "model": {**digest_config.get("model", {}), "train": {"lora_layers": list(planted)}}}
    attrs = {
        "schema_version": schema_version,
        "cell": {"family": family, "behavior": behavior, "model": f"{family}_organism", "replicate": replicate, "variant": variant},
        "digest_config": digest_config,
        "config": {"model": {"family": family}, "behavior": {"name": behavior}, "seed": seed},
        "config_digest": digest,
        "versions": {"xarray": xr.__version__, "zarr": zarr.__version__},
        "model_identity": {"base": f"{family}-tiny", "adapter": f"{family}-{behavior}-lora"},
        "seed": seed,
        "git_commit": "unknown",
        "stages_done": list(store_format.STAGES) if complete else list(store_format.STAGES[:2]),
    }
    if complete is not None:  # None: a crashed run that never wrote the attribute
        attrs["complete"] = complete
    if complete and finished_at is not None:
        attrs["finished_at"] = finished_at
    zarr.open_group(str(path), mode="a", zarr_format=3).attrs.update(attrs)
    return path


def write_grid(root: Path, n_prompts: int = 48, replicates: tuple[str, ...] = ("0",), **kwargs) -> list[Path]:
    """The 12-cell grid: every family x behaviour, one finished store per build (replicate)."""
    return [
        write_store(root, f, b, n_prompts=n_prompts, replicate=r, **kwargs) for f in FAMILIES for b in BEHAVIORS for r in replicates
    ]


def write_adl_store(root: Path, family: str, behavior: str, *, n_layers: int | None = None, replicate: str = "0",
                    seed: int = 0) -> Path:
    """One finished ADL store with the groups the aggregator reads (adl_readout, adl_steer,
    adl_causal), seeded draws shaped like a real run: the difference reads out as relevant
    around mid-depth, steering helps up to a strength, replacing the difference raises the
    fine-tuning loss and lowers the unrelated one. No adl_sums / adl_mean: nothing reads them."""
    n_layers = n_layers or N_LAYERS[family]
    rng = np.random.default_rng(_seed("adl", family, behavior, seed, replicate))
    layers = np.arange(n_layers)
    depth = layers / max(n_layers - 1, 1)
    positions = [f"first{i}" for i in range(3)]
    bump = np.exp(-((depth - 0.5) ** 2) / 0.05)
    relevance = np.clip(
        np.stack([np.stack([s * bump[:, None] + 0.1 * rng.random((n_layers, len(positions))) for s in (0.8, 0.2, 0.3)])
                  for _ in ("logit_lens", "patchscope")]), 0, 1)
    alphas = np.array([0.0, 0.25, 0.5, 1.0, 2.0, 4.0])
    similarity = np.stack([0.1 + g * np.minimum(alphas, 1.0)[:, None] + 0.01 * rng.random((len(alphas), 4)) for g in (0.08, 0.01)])
    coherent = np.stack([alphas <= 1.0, alphas <= 2.0])
    delta = np.stack([np.stack([0.3 * bump, 0.02 * rng.normal(size=n_layers)]), np.stack([-0.1 * bump, 0.01 * rng.normal(size=n_layers)])])
    groups = {
        "adl_readout": xr.Dataset(
            {"relevance": (("readout", "source", "layer", "position"), relevance.astype("float32"))},
            coords={"readout": ["logit_lens", "patchscope"], "source": ["difference", "base_mean", "finetuned_mean"],
                    "layer": layers, "position": positions}),
        "adl_steer": xr.Dataset(
            {"similarity": (("direction", "alpha", "prompt"), similarity.astype("float32")),
             "coherent": (("direction", "alpha"), coherent)},
            coords={"direction": ["difference", "random"], "alpha": alphas, "prompt": np.arange(4)},
            attrs={"best_alpha": 1.0, "similarity_unsteered": float(similarity[0, 0].mean()),
                   "similarity_steered": float(similarity[0, 3].mean()),
                   "similarity_gain": float(similarity[0, 3].mean() - similarity[0, 0].mean()),
                   "similarity_random": float(similarity[1, 3].mean())}),
        "adl_causal": xr.Dataset(
            {"delta_ce": (("data", "condition", "layer"), delta.astype("float32")),
             "delta_ce_se": (("data", "condition", "layer"), np.full(delta.shape, 0.02, "float32"))},
            coords={"data": ["finetune", "unrelated"], "condition": ["difference", "random"], "layer": layers}),
    }
    path = Path(root) / f"{family}_organism" / behavior / f"adl-{_seed('adl', family, behavior, seed, replicate):08x}{store_format.STORE_SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    for group, ds in groups.items():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The data type .* does not have a Zarr V3 specification")
            ds.to_zarr(path, group=group, mode="a", zarr_format=3, consolidated=False)
    zarr.open_group(str(path), mode="a", zarr_format=3).attrs.update({
        "schema_version": store_format.SCHEMA_VERSION, "experiment": "adl", "complete": True, "stages_done": list(store_format.ADL_STAGES),
        "finished_at": "2025-06-01T12:00:00+00:00",
        "cell": {"family": family, "behavior": behavior, "model": f"{family}_organism", "variant": "v1", "replicate": replicate},
        "adl": {"steer_layer": int(n_layers // 2), "position": 1, "n_texts": 100, "text": "organism"},
    })
    return path
