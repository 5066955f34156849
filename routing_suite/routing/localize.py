"""The localize stage: path patching of attention outputs at the last prompt token.

Runs on the `localize` split (prompts and cues of its own: the window is
never chosen on the prompts the intervention is scored on). Two sources,
each as the fraction of the behaviour gap a patch restores:

- `deploy_to_eval`: in the fine-tune, the eval run's attention output at one
  layer (or one head) is replaced by the deploy run's, at the last token;
- `finetuned_to_base`: in the base, the base's attention output is replaced
  by the fine-tune's, under the framing where the fine-tune departs from the
  base the most (eval for a behaviour it drops under evaluation, deploy for
  one it adds under deployment; measured, attribute `finetuned_to_base_framing`).

A third measure, `weight_effect`, where the fine-tune is a LoRA adapter: the
base with the adapter's updates at one layer only (that layer's fine-tuned
weights, on the base's own inputs), under the same framing as
`finetuned_to_base`. The activation patch above carries everything upstream
into the layer it patches (attention above a planted window reads what the
window wrote: up to 0.55 of the gap in the organisms), so it cannot say where
the fine-tune changed the model; the weight patch can: a layer whose weights
the fine-tune left alone has effect 0, and in a fine-tune of every layer it
says which layers' updates alone restore the behaviour.

The behaviour is measured by the probability of the first token of a
completion that performs it. Two methods (`localize.method`):

- `exact` (default): every layer, every window and every head patched
  (`patching.py`); per batch of prompts, every patch of every source runs as
  an invoke of one batched forward per model (one forward, and one request
  remotely, when the fine-tune is the base plus adapter updates);
- `attribution`: every effect estimated from one forward and one backward
  per batch and source (`attribution.py`), then the few best-estimated
  windows patched exactly; the window is chosen on exact effects. Its
  `layer_effect` and `head_effect` are the estimates.

A configured rule turns the effects into a layer window.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

from routing_suite.errors import ConfigError
from routing_suite.lora import LoraAdapter
from routing_suite.models import ModelPair, Traced
from routing_suite.routing.attribution import candidates, concatenate, estimated_effects, gradient_pass
from routing_suite.routing.patching import Patch, PatchRun, performed_token_ids, performed_token_probs
from routing_suite.routing.settings import LocalizeSettings
from routing_suite.scoring import Behavior

log = logging.getLogger(__name__)

SOURCES = ("deploy_to_eval", "finetuned_to_base")


def windows(layers: list[int], max_len: int | None = None) -> list[tuple[int, int]]:
    """Every contiguous window [first, last] of `layers` (at most `max_len` long), shortest first."""
    n = len(layers)
    longest = n if max_len is None else min(n, max_len)
    return [(layers[i], layers[i + w - 1]) for w in range(1, longest + 1) for i in range(n - w + 1)]


def spread(n: int, k: int | None) -> np.ndarray:
    """`k` indices evenly spread over range(n) (all of them when k is None or >= n)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


def preference_order(window_effects: dict[tuple[int, int], float], threshold: float) -> list[tuple[int, int]]:
    """Windows in the cumulative rule's order of preference: those whose joint patch reaches
    `threshold`, shortest first and strongest first among equally short (then earliest);
    then the rest, strongest first (then shorter, then earlier)."""
    reaching = sorted((w for w in window_effects if window_effects[w] >= threshold),
                      key=lambda w: (w[1] - w[0], -window_effects[w], w[0]))
    rest = sorted((w for w in window_effects if not window_effects[w] >= threshold),
                  key=lambda w: (-window_effects[w], w[1] - w[0], w[0]))
    return reaching + rest


def pick_window(effects: np.ndarray, settings: LocalizeSettings, window_effects: dict[tuple[int, int], float] | None = None) -> list[int]:
    """[first_layer, last_layer] from per-layer effects (and, for `cumulative`, joint-window effects)."""
    if settings.rule == "cumulative":
        if not window_effects:
            raise ValueError("the cumulative rule needs the joint-window effects")
        best = preference_order(window_effects, settings.threshold)[0]
        return [int(best[0]), int(best[1])]
    if settings.rule == "relative":
        top = effects.max()
        chosen = np.flatnonzero(effects >= settings.threshold * top) if top > 0 else np.array([int(effects.argmax())])
    else:
        chosen = np.argsort(-effects, kind="stable")[: settings.top_k]
    return [int(chosen.min()), int(chosen.max())]


def localize_prompts(acts: xr.Dataset, settings: LocalizeSettings) -> xr.Dataset:
    """The prompts localize patches: the localize split, `max_prompts` of them evenly spread."""
    found = acts.sel(prompt=acts.split.values == "localize")
    return found.isel(prompt=spread(found.sizes["prompt"], settings.max_prompts))


def localize(pair: ModelPair, acts: xr.Dataset, behavior: Behavior, settings: LocalizeSettings, backend) -> xr.Dataset:
    """Layer and head effects for both sources, and the window they give."""
    if "attn" not in acts:
        raise ConfigError("localize needs the 'attn' site in collect.sites")
    per_head = settings.per_head and "heads" in acts
    if "localize" not in set(str(s) for s in acts.split.values):
        raise ConfigError("the store has no localize split: localize chooses the window on prompts of its own")
    test = localize_prompts(acts, settings)
    prompts_eval = [str(p) for p in test.eval_prompt.values]
    prompts_deploy = [str(p) for p in test.deploy_prompt.values]
    prompts = {"eval": prompts_eval, "deploy": prompts_deploy}
    token_ids = performed_token_ids(pair.tokenizer, test, behavior)
    # Where does the fine-tune depart from the base? One unpatched pass per model and framing.
    plain = [PatchRun(pair.traced(m), prompts[f], []) for m in ("finetuned", "base") for f in ("eval", "deploy")]
    plain_probs = performed_token_probs(
        plain, pair.family, pair.tokenizer, token_ids, pair.head_dim, pair.num_layers, settings.batch_size, backend, settings.patches_per_trace
    )
    departure = {f: abs(float((plain_probs[i][0] - plain_probs[2 + i][0]).mean())) for i, f in enumerate(("eval", "deploy"))}
    ft_framing = max(departure, key=lambda f: (departure[f], f == "eval"))
    layers = [int(x) for x in acts.layer.values]

    def last(site: str, model: str, framing: str) -> torch.Tensor:
        values = test[site].sel(model=model, framing=framing).sel(position="last").values
        return torch.from_numpy(np.ascontiguousarray(values))  # (prompt, layer, ...)

    def donor(site: str, framing: str) -> torch.Tensor | None:
        return last(site, "finetuned", framing) if site == "attn" or per_head else None

    # Per source: the model patched and its prompts, their P(performed) unpatched, the reference
    # the gap is measured to (the fine-tune under deploy: the full effect of deploy_to_eval; the
    # fine-tune under the framing finetuned_to_base patches in), and the fine-tune's values.
    ft = {"eval": plain_probs[0][0], "deploy": plain_probs[1][0]}
    sources = {
        "deploy_to_eval": Source(pair.traced("finetuned"), prompts_eval, ft["eval"], ft["deploy"],
                                 donor("attn", "deploy"), donor("heads", "deploy")),
        "finetuned_to_base": Source(pair.traced("base"), prompts[ft_framing], plain_probs[2 + (ft_framing == "deploy")][0],
                                    ft[ft_framing], donor("attn", ft_framing), donor("heads", ft_framing)),
    }
    job = Localization(pair, token_ids, layers, settings, backend)
    effects = job.attributed(sources) if settings.method == "attribution" else job.exact(sources)
    adapter = finetune_adapter(pair)
    weight_effect = np.full(len(layers), np.nan, np.float32)
    if adapter is not None:
        weight_effect = job.weight_effects(adapter, prompts[ft_framing], ft[ft_framing])
        log.info("localize finetuned weights -> base: layer effects %s", np.round(weight_effect, 3))
    log.info("localize: window %s (method %s, rule %s, joint effect %.3f)", effects.window, settings.method, settings.rule,
             effects.window_effect.get((0, *effects.window), float("nan")))
    index = {layer: li for li, layer in enumerate(layers)}
    window_effect = np.full((len(SOURCES), len(layers), len(layers)), np.nan, np.float32)
    window_estimate = np.full_like(window_effect, np.nan)
    for target, found in ((window_effect, effects.window_effect), (window_estimate, effects.window_estimate)):
        for (si, a, b), value in found.items():
            target[si, index[a], index[b]] = value
    data = {
        "layer_effect": (("source", "layer"), effects.layer_effect),
        "head_effect": (("source", "layer", "head"), effects.head_effect),
        "window_effect": (("source", "first", "last"), window_effect),
        "token_prob_gap": (("source",), effects.gaps),
        "weight_effect": (("layer",), weight_effect),
    }
    if settings.method == "attribution":
        data["window_estimate"] = (("source", "first", "last"), window_estimate)
    return xr.Dataset(
        data,
        coords={"source": list(SOURCES), "layer": layers, "head": list(range(pair.num_heads)), "first": layers, "last": layers},
        attrs={"window": effects.window, "rule": settings.rule, "threshold": settings.threshold, "top_k": settings.top_k,
               "method": settings.method, "confirmed": [list(w) for w in effects.confirmed],
               "split": "localize", "n_prompts": int(test.sizes["prompt"]), "finetuned_to_base_framing": ft_framing,
               "weight_patch": "adapter" if adapter is not None else "none: the fine-tune is not a LoRA adapter of the base"},
    )


def finetune_adapter(pair: ModelPair) -> LoraAdapter | None:
    """The fine-tune's LoRA adapter (the one its traces apply, or the one merged into it);
    None for a fine-tune given as a checkpoint of its own."""
    if pair.lora is not None:
        return pair.lora
    return LoraAdapter.load(pair.adapter_path) if pair.adapter_path is not None else None


@dataclass
class Source:
    """One patching source: the model patched and its (clean) prompts, their P(performed)
    unpatched, the reference the gap is measured to, and the donor values."""

    traced: Traced
    prompts: list[str]
    clean: np.ndarray
    reference: np.ndarray
    attn: torch.Tensor  # (prompt, layer, hidden)
    heads: torch.Tensor | None  # (prompt, layer, head, head_dim), None without per-head patching

    @property
    def gap(self) -> float:
        return float((self.reference - self.clean).mean())

    def window_patch(self, layers: list[int], a: int, b: int) -> list[Patch]:
        index = {layer: li for li, layer in enumerate(layers)}
        return [(layer, None, self.attn[:, index[layer]]) for layer in range(a, b + 1)]


@dataclass
class Effects:
    layer_effect: np.ndarray  # (source, layer)
    head_effect: np.ndarray  # (source, layer, head)
    window_effect: dict  # (source index, first, last) -> exact fraction of the gap
    window_estimate: dict  # (source index, first, last) -> estimated fraction (attribution)
    window: list[int]
    confirmed: list[tuple[int, int]]
    gaps: np.ndarray  # (source,): the gap in P(performed token) the fractions are of


@dataclass
class Localization:
    pair: ModelPair
    token_ids: torch.Tensor
    layers: list[int]
    settings: LocalizeSettings
    backend: object

    def _probs(self, runs: list[PatchRun]) -> list[np.ndarray]:
        s, pair = self.settings, self.pair
        return performed_token_probs(runs, pair.family, pair.tokenizer, self.token_ids, pair.head_dim, pair.num_layers,
                                      s.batch_size, self.backend, s.patches_per_trace)

    @staticmethod
    def _fractions(source: Source, probs: np.ndarray) -> tuple[np.ndarray, float]:
        """Per patch set (rows 1:), the fraction of the gap restored, measured from the
        unpatched row 0 of the same traces; and that gap."""
        clean = probs[0]
        gap = float((source.reference - clean).mean())
        return ((probs[1:] - clean).mean(axis=1) / gap if abs(gap) > 1e-6 else np.zeros(len(probs) - 1)), gap

    def exact(self, sources: dict[str, Source]) -> Effects:
        """Every layer, every window (up to max_window) and every head patched exactly."""
        layers, n_heads = self.layers, self.pair.num_heads
        spans = windows(layers, self.settings.max_window)
        multi = [w for w in spans if w[1] > w[0]]
        runs = []
        for name in SOURCES:
            source = sources[name]
            patch_sets = [source.window_patch(layers, a, b) for a, b in [(layer, layer) for layer in layers] + multi]
            if source.heads is not None:
                patch_sets += [[(layer, h, source.heads[:, li, h])] for li, layer in enumerate(layers) for h in range(n_heads)]
            runs.append(PatchRun(source.traced, source.prompts, patch_sets))
        probs = self._probs(runs)
        layer_effect = np.zeros((len(SOURCES), len(layers)), np.float32)
        head_effect = np.full((len(SOURCES), len(layers), n_heads), np.nan, np.float32)
        window_effect, gaps = {}, np.zeros(len(SOURCES), np.float32)
        for si, name in enumerate(SOURCES):
            fractions, gaps[si] = self._fractions(sources[name], probs[si])
            layer_effect[si] = fractions[: len(layers)]
            for (a, b), e in zip([(layer, layer) for layer in layers] + multi, fractions[: len(layers) + len(multi)]):
                window_effect[(si, a, b)] = float(e)
            if sources[name].heads is not None:
                head_effect[si] = fractions[len(layers) + len(multi) :].reshape(len(layers), n_heads)
            log.info("localize %s: gap in P(performed token) %.3f, layer effects %s", name, gaps[si], np.round(layer_effect[si], 3))
        joint = {(a, b): window_effect[(0, a, b)] for a, b in spans}
        return Effects(layer_effect, head_effect, window_effect, {}, pick_window(layer_effect[0], self.settings, joint), [], gaps)

    def weight_effects(self, adapter: LoraAdapter, prompts: list[str], reference: np.ndarray) -> np.ndarray:
        """Per layer, the fraction of the gap between the base and `reference` (the
        fine-tune's P(performed) on `prompts`) that the base restores with the adapter's
        updates at that layer only. The unpatched base runs in the same traces."""
        base = self.pair.traced("base").nn
        runs = [PatchRun(Traced(base), prompts, [])]
        runs += [PatchRun(Traced(base, adapter.only([layer])), prompts, []) for layer in self.layers]
        probs = self._probs(runs)
        clean = probs[0][0]
        gap = float((reference - clean).mean())
        if abs(gap) <= 1e-6:
            return np.zeros(len(self.layers), np.float32)
        return np.array([(p[0] - clean).mean() / gap for p in probs[1:]], np.float32)

    def attributed(self, sources: dict[str, Source]) -> Effects:
        """Every layer, head and window estimated by attribution (one forward and one
        backward per batch and source), then the window confirmed by exact patching:
        for the cumulative rule, the `confirm` best-estimated windows of each length,
        shortest first, until one reaches the threshold; for the others, the window
        the rule picks from the estimates."""
        layers, settings, pair = self.layers, self.settings, self.pair
        spans = windows(layers, settings.max_window)
        layer_effect = np.zeros((len(SOURCES), len(layers)), np.float32)
        head_effect = np.full((len(SOURCES), len(layers), pair.num_heads), np.nan, np.float32)
        window_estimate, estimates = {}, {}
        for si, name in enumerate(SOURCES):
            source = sources[name]
            parts = [
                gradient_pass(source.traced, pair.family, pair.tokenizer, source.prompts[sl], self.token_ids[sl], source.attn[sl],
                              None if source.heads is None else source.heads[sl], layers, pair.num_layers, pair.head_dim, self.backend)
                for sl in (slice(i, i + settings.batch_size) for i in range(0, len(source.prompts), settings.batch_size))
            ]
            estimates[name] = estimated_effects(concatenate(parts), source.gap, spans, layers)
            layer_effect[si] = estimates[name]["layer"]
            if estimates[name]["head"] is not None:
                head_effect[si] = estimates[name]["head"]
            window_estimate.update({(si, a, b): e for (a, b), e in estimates[name]["window"].items()})
            log.info("localize %s (attribution): gap in P(performed token) %.3f, estimated layer effects %s",
                     name, source.gap, np.round(layer_effect[si], 3))
        joint = self._confirm(sources["deploy_to_eval"], estimates["deploy_to_eval"]["window"], layer_effect[0], spans)
        window = pick_window(layer_effect[0], settings, joint) if settings.rule == "cumulative" else list(next(iter(joint)))
        window_effect = {(0, a, b): e for (a, b), e in joint.items()}
        gaps = np.array([sources[name].gap for name in SOURCES], np.float32)
        return Effects(layer_effect, head_effect, window_effect, window_estimate, window, list(joint), gaps)

    def _confirm(self, source: Source, estimated: dict, layer_estimates: np.ndarray, spans: list) -> dict:
        """Exact effects of the candidate windows (see `attributed`)."""
        settings = self.settings
        if settings.rule != "cumulative":
            a, b = pick_window(layer_estimates, settings)
            run = PatchRun(source.traced, source.prompts, [source.window_patch(self.layers, a, b)])
            return {(a, b): float(self._fractions(source, self._probs([run])[0])[0][0])}
        confirmed: dict[tuple[int, int], float] = {}
        for length in sorted({b - a + 1 for a, b in spans}):
            chosen = candidates(estimated, length, settings.confirm)
            run = PatchRun(source.traced, source.prompts, [source.window_patch(self.layers, a, b) for a, b in chosen])
            confirmed.update(zip(chosen, (float(x) for x in self._fractions(source, self._probs([run])[0])[0])))
            if max(confirmed.values()) >= settings.threshold:
                break
        return confirmed
