"""The localize stage: path patching of attention outputs at the last prompt token.

Two sources, each as the fraction of the behaviour gap a patch restores:

- `deploy_to_eval`: in the fine-tune, the eval run's attention output at one
  layer (or one head) is replaced by the deploy run's, at the last token;
- `finetuned_to_base`: in the base, under the eval framing, the base's
  attention output is replaced by the fine-tune's.

The behaviour is measured by the probability of the first token of a
completion that performs it. All patches of a source run as invokes of one
batched forward. A configured rule turns the effects into a layer window.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import xarray as xr

from routing_suite.errors import ConfigError
from routing_suite.families import site_path
from routing_suite.models import ModelPair
from routing_suite.scoring import Behavior
from routing_suite.settings import LocalizeSettings
from routing_suite.steering import encode
from routing_suite.tracing import envoy_at

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


def pick_window(effects: np.ndarray, settings: LocalizeSettings, window_effects: dict[tuple[int, int], float] | None = None) -> list[int]:
    """[first_layer, last_layer] from per-layer effects (and, for `cumulative`, joint-window effects)."""
    if settings.rule == "cumulative":
        if not window_effects:
            raise ValueError("the cumulative rule needs the joint-window effects")
        reaching = [w for w in window_effects if window_effects[w] >= settings.threshold]
        if reaching:
            shortest = min(b - a for a, b in reaching)
            best = max((w for w in reaching if w[1] - w[0] == shortest), key=lambda w: (window_effects[w], -w[0]))
        else:
            best = max(window_effects, key=lambda w: (window_effects[w], -(w[1] - w[0]), -w[0]))
        return [int(best[0]), int(best[1])]
    if settings.rule == "relative":
        top = effects.max()
        chosen = np.flatnonzero(effects >= settings.threshold * top) if top > 0 else np.array([int(effects.argmax())])
    else:
        chosen = np.argsort(-effects, kind="stable")[: settings.top_k]
    return [int(chosen.min()), int(chosen.max())]


Patch = tuple[int, "int | None", torch.Tensor]  # (layer, head or None for the whole output, values)


def _patch(nn_model, family: str, layer: int, head: int | None, head_dim: int, value: torch.Tensor) -> None:
    """Inside a trace: set the last token's attention output (or one head's) to `value`."""
    if head is None:
        out = envoy_at(nn_model, site_path(family, "attn", layer)).output
        x = out[0] if isinstance(out, tuple) else out
        x[:, -1] = value
    else:
        x = envoy_at(nn_model, site_path(family, "heads", layer)).inputs[0][0]
        x[:, -1, head * head_dim : (head + 1) * head_dim] = value


def _performed_token_probs(
    nn_model, family, tokenizer, prompts, token_ids, patch_sets: list[list[Patch]], head_dim, batch_size, per_trace: int | None = None
) -> np.ndarray:
    """(len(patch_sets) + 1, prompts): P(performed first token), unpatched first.

    Each patch set runs as one invoke, at most `per_trace` of them per trace
    (the first trace also runs the unpatched prompts); its patches go in
    layer order (reads and writes inside a trace follow execution order)."""
    step = len(patch_sets) if per_trace is None else per_trace
    groups = [patch_sets[i : i + step] for i in range(0, len(patch_sets), max(1, step))] or [[]]
    rows = []
    for start in range(0, len(prompts), batch_size):
        sl = slice(start, start + batch_size)
        inputs = encode(tokenizer, prompts[sl])
        ids = token_ids[sl]
        parts = []
        for g, group in enumerate(groups):
            with torch.no_grad(), nn_model.trace() as tracer:
                if g == 0:
                    with tracer.invoke(inputs):
                        pass
                for patches in group:
                    with tracer.invoke(inputs):
                        for layer, head, values in sorted(patches, key=lambda p: (p[0], -1 if p[1] is None else p[1])):
                            _patch(nn_model, family, layer, head, head_dim, values[sl])
                with tracer.invoke():
                    logits = nn_model.output.logits[:, -1].save()
            n_runs = len(group) + (g == 0)
            probs = logits.float().softmax(-1).view(n_runs, len(ids), -1)
            parts.append(probs.gather(2, ids[None, :, None].expand(n_runs, -1, 1))[..., 0].numpy())
        rows.append(np.concatenate(parts, axis=0))
    return np.concatenate(rows, axis=1)


def first_completion_token(tokenizer, prompt: str, completion: str) -> int:
    """The id of the first token of `completion` where it follows `prompt` (so a
    byte-level tokenizer gives the id a generation would start with)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + completion)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids or len(ids) == len(prompt_ids):
        raise ValueError(f"the completion {completion!r} does not tokenize as a continuation of its prompt")
    return ids[len(prompt_ids)]


def performed_token_ids(tokenizer, test: xr.Dataset, behavior: Behavior) -> torch.Tensor:
    """Per test prompt, the first token of a completion that performs the behaviour:
    from the prompt set's `performing` texts when the store has them, else the
    behaviour's first word after a space (the word-level organisms)."""
    if "performing" in test.coords:
        pairs = zip(test.eval_prompt.values, test.performing.values)
        return torch.tensor([first_completion_token(tokenizer, str(p), str(t)) for p, t in pairs])
    tokens = [behavior.performed_first_token(str(a)) for a in test.answer.values]
    return torch.tensor([tokenizer(" " + t, add_special_tokens=False)["input_ids"][0] for t in tokens])


def localize(pair: ModelPair, acts: xr.Dataset, behavior: Behavior, settings: LocalizeSettings, trace_kwargs: dict) -> xr.Dataset:
    """Layer and head effects for both sources, and the window they give."""
    if "attn" not in acts:
        raise ConfigError("localize needs the 'attn' site in collect.sites")
    per_head = settings.per_head and "heads" in acts
    test = acts.sel(prompt=acts.split.values == "test")
    test = test.isel(prompt=spread(test.sizes["prompt"], settings.max_prompts))
    prompts_eval = [str(p) for p in test.eval_prompt.values]
    prompts_deploy = [str(p) for p in test.deploy_prompt.values]
    token_ids = performed_token_ids(pair.tokenizer, test, behavior)
    layers = [int(x) for x in acts.layer.values]
    heads = list(range(pair.num_heads))
    dh = pair.head_dim

    def last(site: str, model: str, framing: str) -> torch.Tensor:
        values = test[site].sel(model=model, framing=framing).sel(position="last").values
        return torch.from_numpy(np.ascontiguousarray(values))  # (prompt, layer, ...)

    sources = {
        # (model patched, prompts, donor values of attn / heads, reference prompts for the full effect)
        "deploy_to_eval": ("finetuned", prompts_eval, ("finetuned", "deploy"), ("finetuned", prompts_deploy)),
        "finetuned_to_base": ("base", prompts_eval, ("finetuned", "eval"), ("finetuned", prompts_eval)),
    }
    layer_effect = np.zeros((len(SOURCES), len(layers)), np.float32)
    head_effect = np.full((len(SOURCES), len(layers), len(heads)), np.nan, np.float32)
    spans = windows(layers, settings.max_window)
    window_effect = np.full((len(SOURCES), len(layers), len(layers)), np.nan, np.float32)
    full_gap = np.zeros(len(SOURCES), np.float32)
    for si, source in enumerate(SOURCES):
        model_name, prompts, (donor_model, donor_framing), (ref_model, ref_prompts) = sources[source]
        attn = last("attn", donor_model, donor_framing)
        index = {layer: li for li, layer in enumerate(layers)}
        patch_sets = [[(layer, None, attn[:, index[layer]])] for layer in layers]
        patch_sets += [[(layer, None, attn[:, index[layer]]) for layer in range(a, b + 1)] for a, b in spans if b > a]
        if per_head:
            head_values = last("heads", donor_model, donor_framing)  # (prompt, layer, head, head_dim)
            patch_sets += [[(layer, h, head_values[:, li, h])] for li, layer in enumerate(layers) for h in heads]
        probs = _performed_token_probs(
            pair.traced(model_name), pair.family, pair.tokenizer, prompts, token_ids, patch_sets, dh, settings.batch_size,
            settings.patches_per_trace,
        )
        ref = _performed_token_probs(pair.traced(ref_model), pair.family, pair.tokenizer, ref_prompts, token_ids, [], dh, settings.batch_size)[0]
        clean = probs[0]
        gap = float((ref - clean).mean())
        full_gap[si] = gap
        effects = (probs[1:] - clean).mean(axis=1) / gap if abs(gap) > 1e-6 else np.zeros(len(patch_sets))
        layer_effect[si] = effects[: len(layers)]
        multi = [w for w in spans if w[1] > w[0]]
        for (a, b), e in zip([(layer, layer) for layer in layers] + multi, effects[: len(layers) + len(multi)]):
            window_effect[si, index[a], index[b]] = e
        if per_head:
            head_effect[si] = effects[len(layers) + len(multi) :].reshape(len(layers), len(heads))
        log.info("localize %s: gap in P(performed token) %.3f, layer effects %s", source, gap, np.round(layer_effect[si], 3))
    joint = {(a, b): float(window_effect[0, index[a], index[b]]) for a, b in spans}
    window = pick_window(layer_effect[0], settings, joint)
    log.info("localize: window %s (rule %s, joint effect %.3f)", window, settings.rule, joint.get(tuple(window), float("nan")))
    return xr.Dataset(
        {
            "layer_effect": (("source", "layer"), layer_effect),
            "head_effect": (("source", "layer", "head"), head_effect),
            "window_effect": (("source", "first", "last"), window_effect),
            "token_prob_gap": (("source",), full_gap),
        },
        coords={"source": list(SOURCES), "layer": layers, "head": heads, "first": layers, "last": layers},
        attrs={"window": window, "rule": settings.rule, "threshold": settings.threshold, "top_k": settings.top_k},
    )
