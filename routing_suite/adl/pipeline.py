"""`experiments.adl`: the Activation Difference Lens on one model pair, end to end.

Stages (each recorded in the run store, skipped when a rerun finds it done):

1. `adl_mean`: the streamed mean difference h_ft - h_base over the first k
   tokens of N unrelated texts (`mean_diff`);
2. `adl_readout`: logit lens and patchscope of the difference and of the two
   baselines (the base's and the fine-tune's mean activation), top tokens and
   their relevance to the fine-tuning data (`readout`, `relevance`);
3. `adl_steer`: steering with the difference, strength searched under a
   coherence bound, similarity to the fine-tuning data (`steer`);
4. `adl_causal`: projection replacement per layer and the change in
   cross-entropy on fine-tuning data and unrelated text (`causal`).

Then, read from the finished store (never written to it): which of the
candidate fine-tuning goals (`goals`) the evidence points to (`identify`).
"""

from __future__ import annotations

import logging
import random
import time

import numpy as np
import torch
import xarray as xr
from hydra.utils import instantiate
from omegaconf import OmegaConf

from routing_suite import runs
from routing_suite.adl import causal, identify, mean_diff, readout, tables
from routing_suite.adl.relevance import StatisticGrader
from routing_suite.adl.settings import AdlSettings
from routing_suite.adl.steer import steer
from routing_suite.adl.texts import read_finetune_file
from routing_suite.errors import ConfigError
from routing_suite.models import ModelPair
from routing_suite.store import text

log = logging.getLogger(__name__)

READOUTS = ("logit_lens", "patchscope")
SOURCES = ("difference", "base_mean", "finetuned_mean")
_SOURCE_VARS = {"difference": "diff", "base_mean": "mean_base", "finetuned_mean": "mean_finetuned"}


def _sample(items: list, n: int, seed: int) -> list:
    if n >= len(items):
        return list(items)
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]


def readouts(pair: ModelPair, means: xr.Dataset, grader, identity_prompts: list[str], settings: AdlSettings, backend) -> xr.Dataset:
    """Top tokens of both readouts for the difference and both baselines, and their relevance."""
    layers = [int(v) for v in means.layer.values]
    positions = [str(v) for v in means.position.values]
    L, K, k = len(layers), len(positions), settings.readout.top_k
    vectors = torch.from_numpy(np.stack([means[_SOURCE_VARS[s]].values for s in SOURCES]))  # (source, L, K, d)
    flat = vectors.reshape(-1, vectors.shape[-1])
    norms = torch.from_numpy(means["norm_finetuned"].values).repeat(len(SOURCES), 1, 1).reshape(-1)
    row_layers = [layers[li] for _ in SOURCES for li in range(L) for _ in range(K)]
    probs = {
        "logit_lens": readout.logit_lens(pair, flat, backend),
        "patchscope": readout.patchscope(
            pair, flat, row_layers, norms, identity_prompts, list(settings.readout.scales), settings.readout.batch_size, backend
        ),
    }
    shape = (len(READOUTS), len(SOURCES), L, K, k)
    ids = np.zeros(shape, np.int64)
    top_p = np.zeros(shape, np.float32)
    for r, name in enumerate(READOUTS):
        i, p = readout.top_tokens(probs[name], k)
        ids[r], top_p[r] = i.reshape(shape[1:]).numpy(), p.reshape(shape[1:]).numpy()
    tokens = np.array([pair.tokenizer.decode([int(i)]) for i in ids.ravel()], dtype=object).reshape(shape)
    relevant = np.array(grader.relevant([int(i) for i in ids.ravel()], list(tokens.ravel())), bool).reshape(shape)
    dims = ("readout", "source", "layer", "position", "rank")
    ds = xr.Dataset(
        {
            "top_id": (dims, ids),
            "top_token": (dims, tokens),
            "top_prob": (dims, top_p),
            "relevant": (dims, relevant),
            "relevance": (dims[:-1], relevant.mean(-1).astype(np.float32)),
        },
        coords={"readout": text(READOUTS), "source": text(SOURCES), "layer": layers, "position": text(positions), "rank": list(range(k))},
    )
    if isinstance(grader, StatisticGrader):  # it can say which tokens it counts
        char = grader.characteristic()
        ds = ds.assign_coords(characteristic=("characteristic", text(pair.tokenizer.decode([int(i)]) for i in char)))
        ds["characteristic_z"] = ("characteristic", grader.z[char].astype(np.float32))
    ds.attrs.update({"grader": getattr(grader, "name", type(grader).__name__), "identity_prompts": list(identity_prompts),
                     "scales": list(settings.readout.scales)})
    return ds


def sink_positions(norms: np.ndarray, ratio: float) -> list[int]:
    """Positions whose mean residual norm (at one layer, one value per position) is over
    `ratio` x the median over positions: attention sinks, which hold a massive activation
    whatever the text (a model that prepends no BOS makes its first token one)."""
    median = float(np.median(norms))
    return [int(p) for p in np.flatnonzero(norms > ratio * median)]


def pick_position(relevance: xr.DataArray, layer: int, fixed: int | None, sinks: list[int] = ()) -> int:
    """The position whose difference reads out as most relevant at `layer` (both readouts
    averaged), never a sink; `fixed` (adl.position) is taken as it is."""
    if fixed is not None:
        if fixed in sinks:
            log.warning("adl.position=%d is an attention sink at layer %d (its norm is over adl.sink_ratio x the "
                        "median): steering there is scaled by that norm", fixed, layer)
        return fixed
    scores = relevance.sel(source="difference", layer=layer).mean("readout").values.astype(float)
    scores[list(sinks)] = -np.inf
    return int(np.argmax(scores))  # the first of equals


def finetune_data(setup: runs.Setup, settings: AdlSettings) -> list[tuple[str, str]]:
    """What the fine-tune was trained on: adl.finetune_file, else the completions of the
    prompt file's fit pairs, else the model source's own; refused when none of them has any."""
    if settings.finetune_file is not None:
        return read_finetune_file(settings.finetune_file)
    from_file = setup.prompt_file
    if from_file is not None and from_file.finetune_examples:
        return from_file.finetune_examples
    own = setup.source.finetune_examples(setup.behavior.name)
    if not own:
        raise ConfigError(
            f"the ADL needs the fine-tuning data of model {setup.source.name!r}: set adl.finetune_file (JSONL of "
            "prompt/completion) or give the fit pairs of data.prompts eval_completion/deploy_completion"
        )
    return own


def run(cfg) -> dict:
    """One model pair through every ADL stage; returns the store, the summary row and the table."""
    started = time.perf_counter()
    setup = runs.build_components(cfg, allowed="adl_behaviors")
    settings: AdlSettings = OmegaConf.to_object(cfg.adl)
    texts = instantiate(cfg.text)
    similarity = instantiate(cfg.similarity)
    grader = instantiate(cfg.grader)
    goals, goal_grader = identify.from_config(cfg)
    texts.check()
    similarity.check()
    seed = int(cfg.seed)
    behavior = setup.behavior.name
    examples = finetune_data(setup, settings)
    # Only the organisms have the word-level task the organisms' text is cut from.
    task_spec = getattr(setup.source, "task_spec", None)
    if task_spec is None and texts.name == "organism":
        raise ConfigError(
            f"text=organism needs an organism model; model {setup.source.name!r} needs text of its own "
            "(text=file text.path=<file>, or text=lee_corpus)"
        )
    unrelated = texts.unrelated(settings.n_texts, seed, task_spec)
    if not unrelated:
        raise ConfigError(f"text={texts.name}: no unrelated text")
    out = runs.report_folder(cfg, "adl")
    prompts = {e[0] for e in examples}
    if overlap := [t for t in unrelated if t in prompts]:
        raise ConfigError(f"{len(overlap)} unrelated texts are fine-tuning prompts, e.g. {overlap[0]!r}")
    pair = runs.load_pair(setup)
    steer_layer = pair.num_layers // 2 if settings.steer.layer is None else settings.steer.layer
    if not 0 <= steer_layer < pair.num_layers:
        raise ConfigError(f"adl.steer.layer={steer_layer} is outside the model's layers [0, {pair.num_layers - 1}]")
    store = runs.open_store(setup, pair, "adl", experiment="adl", first_k=True)
    ft_texts = [f"{p} {c}" for p, c in examples]
    grader.fit(ft_texts, unrelated, pair.tokenizer)

    if not store.stage_done("adl_mean"):
        mean_diff.accumulate(pair, unrelated, settings.k, settings.texts_per_part, store, setup.backend.batch_size, setup.backend, cfg.progress)
        store.write_group(mean_diff.MEAN, mean_diff.finish(store))
        store.mark_stage_done("adl_mean")
    means = store.read(mean_diff.MEAN).load()
    read = runs.run_stage(store, "adl_readout", lambda: readouts(pair, means, grader, list(texts.identity_prompts), settings, setup.backend))
    sinks = sink_positions(means["norm_finetuned"].values[steer_layer], settings.sink_ratio)
    position = pick_position(read.relevance, steer_layer, settings.position, sinks)
    diff = torch.from_numpy(means["diff"].values)  # (layer, position, hidden)
    norm = float(means["norm_finetuned"].values[steer_layer, position])
    reference = _sample(ft_texts, settings.steer.n_reference, seed)
    steered = runs.run_stage(store, "adl_steer", lambda: steer(
        pair, diff[steer_layer, position], steer_layer, norm, settings.steer, list(texts.chat_prompts), reference, similarity,
        texts.chat_template, seed, setup.backend,
    ))
    data = {
        "finetune": _sample(examples, settings.causal.n_texts, seed),
        "unrelated": [("", t) for t in _sample(unrelated, settings.causal.n_texts, seed)],
    }
    runs.run_stage(store, "adl_causal", lambda: causal.causal_check(
        pair, diff[:, position], data, settings.causal.max_tokens, settings.causal.batch_size, seed,
        settings.causal.random_control, setup.backend,
    ))
    if not store.complete:  # a finished store is never written to
        store.update_attrs(adl={"position": position, "sink_positions": sinks, "steer_layer": steer_layer, "n_texts": int(means.attrs["n_texts"]),
                                "n_finetune_examples": len(examples), "text_source": texts.name})
    final = store.finish()  # a no-op for a complete store but for letting go of its lock
    seconds = time.perf_counter() - started
    log.info("adl %s/%s done in %.1f s: %s", pair.cell_name, behavior, seconds, final)
    if goals.truth(behavior) is None:  # e.g. a fine-tune of your own: no goal to identify
        log.info("goal identification left out: no candidate of `goals` is behaviour %r (set goals.true_goal, or "
                 "goals=<a candidate file of yours>)", behavior)
    row = tables.read_cell(final, goals, goal_grader)
    written = tables.write([row], out)
    return {"store": str(final), "seconds": seconds, "row": row.__dict__, "table_markdown": written["adl_table.md"], "table_dir": str(out),
            "steered_examples": _examples(steered)}


def _examples(steered: xr.Dataset, n: int = 3) -> list[str]:
    """A few prompt -> unsteered / steered completions, for the log and the CLI."""
    alpha = steered.attrs["best_alpha"]
    lines = []
    for p in range(min(n, steered.sizes["prompt"])):
        prompt = str(steered.prompt_text.values[p])
        before = str(steered.completion.sel(direction="difference", alpha=0.0).values[p])
        after = str(steered.completion.sel(direction="difference", alpha=alpha).values[p])
        lines.append(f"{prompt!r}: {before!r} -> (alpha {alpha:g}) {after!r}")
    return lines
