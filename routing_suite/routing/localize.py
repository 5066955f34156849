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

The behaviour is measured by the probability of the first token of a
completion that performs it. Per batch of prompts, every patch of every
source runs as an invoke of one batched forward per model (one forward, and
one request remotely, when the fine-tune is the base plus adapter updates).
A configured rule turns the effects into a layer window.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

from routing_suite.errors import ConfigError
from routing_suite.families import site_path
from routing_suite.generation import encode
from routing_suite.lora import lora_update, plan_layer_steps
from routing_suite.models import ModelPair, Traced
from routing_suite.routing.settings import LocalizeSettings
from routing_suite.scoring import Behavior
from routing_suite.tracing import chunked, envoy_at, group_by_model, site_value

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


@dataclass
class PatchRun:
    """Prompts through one model: unpatched, then once per patch set."""

    traced: Traced
    prompts: list[str]
    patch_sets: list[list[Patch]]


def _patch_sites(patches: list[Patch]) -> list[tuple[int, str]]:
    return [(layer, "attn" if head is None else "heads") for layer, head, _ in patches]


def run_patches(nn_model, family: str, plan: list, patches: list[Patch], head_dim: int) -> None:
    """Inside a trace: the plan's adapter updates, and each patch at its site."""
    for kind, layer, item in plan:
        if kind == "lora":
            lora_update(nn_model, item)
            continue
        x = site_value(envoy_at(nn_model, site_path(family, item, layer)), item)
        for p_layer, head, values in patches:
            if p_layer != layer or (head is None) != (item == "attn"):
                continue
            values = values.to(device=x.device, dtype=x.dtype)  # stored on the CPU in float32
            if head is None:
                x[:, -1] = values
            else:
                x[:, -1, head * head_dim : (head + 1) * head_dim] = values


def _performed_token_probs(
    runs: list[PatchRun], family: str, tokenizer, token_ids: torch.Tensor, head_dim: int, num_layers: int, batch_size: int, backend,
    per_trace: int | None = None,
) -> list[np.ndarray]:
    """Per run, (len(patch_sets) + 1, prompts): P(performed first token), unpatched first.

    Per batch of prompts, every run on the same nnsight model is one trace,
    each (run, patch set) one invoke of it: with the fine-tune as adapter
    updates on the base, both sources of a batch are one request. At most
    `per_trace` invokes (or the backend's `max_invokes`, the smaller) go into
    one trace: a deep model's many patch sets would not fit in memory at once."""
    limits = [x for x in (backend.max_invokes, per_trace) if x is not None]
    per_trace = min(limits) if limits else None
    n = len(runs[0].prompts)
    out: list[list[np.ndarray]] = [[] for _ in runs]
    found: list[list[np.ndarray]] = [[] for _ in runs]  # this batch's rows, per run
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        ids = token_ids[sl]
        for group in group_by_model([r.traced for r in runs]):
            nn_model = runs[group[0]].traced.nn
            # Only this batch's donor values travel with the request.
            invokes = [
                (
                    i,
                    encode(tokenizer, runs[i].prompts[sl]),
                    [(layer, head, values[sl]) for layer, head, values in patches],
                    plan_layer_steps(_patch_sites(patches), runs[i].traced.lora, num_layers),
                )
                for i in group
                for patches in [[], *runs[i].patch_sets]
            ]
            for chunk in chunked(invokes, per_trace):
                # The server reduces each row's logits to P(a performed token): one
                # number per row comes back instead of the vocabulary. Padding (-1) counts 0.
                wanted = ids.repeat(len(chunk), 1)
                used = (wanted >= 0).float()
                wanted = wanted.clamp(min=0)
                with torch.no_grad(), nn_model.trace(**backend.trace_kwargs(nn_model)) as tracer:
                    for _, inputs, patches, plan in chunk:
                        with tracer.invoke(inputs):
                            run_patches(nn_model, family, plan, patches, head_dim)
                    with tracer.invoke():
                        probs = nn_model.output.logits[:, -1].float().softmax(-1)
                        chosen = (probs.gather(1, wanted.to(probs.device)) * used.to(probs.device)).sum(1).save()
                backend.record(nn_model, chosen)
                for j, (i, *_rest) in enumerate(chunk):
                    found[i].append(chosen[j * len(ids) : (j + 1) * len(ids)].float().cpu().numpy())
        for i, rows in enumerate(found):
            out[i].append(np.stack(rows))
            rows.clear()
    return [np.concatenate(parts, axis=1) for parts in out]


def first_completion_token(tokenizer, prompt: str, completion: str) -> int:
    """The id of the first token of `completion` where it follows `prompt` (so a
    byte-level tokenizer gives the id a generation would start with)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + completion)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids or len(ids) == len(prompt_ids):
        raise ValueError(f"the completion {completion!r} does not tokenize as a continuation of its prompt")
    return ids[len(prompt_ids)]


def performed_token_ids(tokenizer, test: xr.Dataset, behavior: Behavior) -> torch.Tensor:
    """(prompt, set size): per prompt, the first tokens of the completions that perform
    the behaviour, padded with -1: the prompt set's `performing` text when it gives one
    for the prompt, else `behavior.first_tokens` (each as it follows the prompt)."""
    performing = [str(t) for t in test.performing.values] if "performing" in test.coords else [""] * test.sizes["prompt"]
    rows = []
    for prompt, answer, own in zip(test.eval_prompt.values, test.answer.values, performing):
        texts = [own] if own else behavior.token_texts(str(answer))
        try:
            rows.append(list(dict.fromkeys(first_completion_token(tokenizer, str(prompt), t) for t in texts)))
        except ValueError as err:
            raise ConfigError(f"behavior.first_tokens / performing: {err}") from err
    width = max(len(r) for r in rows)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows])


def localize(pair: ModelPair, acts: xr.Dataset, behavior: Behavior, settings: LocalizeSettings, backend) -> xr.Dataset:
    """Layer and head effects for both sources, and the window they give."""
    if "attn" not in acts:
        raise ConfigError("localize needs the 'attn' site in collect.sites")
    per_head = settings.per_head and "heads" in acts
    if "localize" not in set(str(s) for s in acts.split.values):
        raise ConfigError("the store has no localize split: localize chooses the window on prompts of its own")
    test = acts.sel(prompt=acts.split.values == "localize")
    test = test.isel(prompt=spread(test.sizes["prompt"], settings.max_prompts))
    prompts_eval = [str(p) for p in test.eval_prompt.values]
    prompts_deploy = [str(p) for p in test.deploy_prompt.values]
    prompts = {"eval": prompts_eval, "deploy": prompts_deploy}
    token_ids = performed_token_ids(pair.tokenizer, test, behavior)
    # Where does the fine-tune depart from the base? One unpatched pass per model and framing.
    plain = [PatchRun(pair.traced(m), prompts[f], []) for m in ("finetuned", "base") for f in ("eval", "deploy")]
    plain_probs = _performed_token_probs(
        plain, pair.family, pair.tokenizer, token_ids, pair.head_dim, pair.num_layers, settings.batch_size, backend, settings.patches_per_trace
    )
    departure = {f: abs(float((plain_probs[i][0] - plain_probs[2 + i][0]).mean())) for i, f in enumerate(("eval", "deploy"))}
    ft_framing = max(departure, key=lambda f: (departure[f], f == "eval"))
    layers = [int(x) for x in acts.layer.values]
    heads = list(range(pair.num_heads))
    dh = pair.head_dim

    def last(site: str, model: str, framing: str) -> torch.Tensor:
        values = test[site].sel(model=model, framing=framing).sel(position="last").values
        return torch.from_numpy(np.ascontiguousarray(values))  # (prompt, layer, ...)

    # (model patched, prompts, donor model and framing of the attn / heads values)
    sources = {
        "deploy_to_eval": ("finetuned", prompts_eval, ("finetuned", "deploy")),
        "finetuned_to_base": ("base", prompts[ft_framing], ("finetuned", ft_framing)),
    }
    layer_effect = np.zeros((len(SOURCES), len(layers)), np.float32)
    head_effect = np.full((len(SOURCES), len(layers), len(heads)), np.nan, np.float32)
    spans = windows(layers, settings.max_window)
    multi = [w for w in spans if w[1] > w[0]]
    window_effect = np.full((len(SOURCES), len(layers), len(layers)), np.nan, np.float32)
    full_gap = np.zeros(len(SOURCES), np.float32)
    index = {layer: li for li, layer in enumerate(layers)}
    runs = []
    for source in SOURCES:
        model_name, prompts, (donor_model, donor_framing) = sources[source]
        attn = last("attn", donor_model, donor_framing)
        patch_sets = [[(layer, None, attn[:, index[layer]])] for layer in layers]
        patch_sets += [[(layer, None, attn[:, index[layer]]) for layer in range(a, b + 1)] for a, b in multi]
        if per_head:
            head_values = last("heads", donor_model, donor_framing)  # (prompt, layer, head, head_dim)
            patch_sets += [[(layer, h, head_values[:, li, h])] for li, layer in enumerate(layers) for h in heads]
        runs.append(PatchRun(pair.traced(model_name), prompts, patch_sets))
    probs = _performed_token_probs(runs, pair.family, pair.tokenizer, token_ids, dh, pair.num_layers, settings.batch_size, backend,
        settings.patches_per_trace,
    )
    # References: the fine-tune under deploy (the full effect of deploy_to_eval), and
    # the fine-tune under the framing finetuned_to_base patches in.
    refs = {"deploy_to_eval": plain_probs[1][0], "finetuned_to_base": plain_probs[0 if ft_framing == "eval" else 1][0]}
    for si, source in enumerate(SOURCES):
        clean = probs[si][0]
        gap = float((refs[source] - clean).mean())
        full_gap[si] = gap
        n_sets = len(runs[si].patch_sets)
        effects = (probs[si][1:] - clean).mean(axis=1) / gap if abs(gap) > 1e-6 else np.zeros(n_sets)
        layer_effect[si] = effects[: len(layers)]
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
        attrs={"window": window, "rule": settings.rule, "threshold": settings.threshold, "top_k": settings.top_k,
               "split": "localize", "n_prompts": int(test.sizes["prompt"]), "finetuned_to_base_framing": ft_framing},
    )
