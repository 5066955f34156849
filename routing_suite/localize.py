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


def pick_window(effects: np.ndarray, settings: LocalizeSettings) -> list[int]:
    """[first_layer, last_layer] from per-layer effects."""
    if settings.rule == "relative":
        top = effects.max()
        chosen = np.flatnonzero(effects >= settings.threshold * top) if top > 0 else np.array([int(effects.argmax())])
    else:
        chosen = np.argsort(-effects, kind="stable")[: settings.top_k]
    return [int(chosen.min()), int(chosen.max())]


def _patch(nn_model, family: str, layer: int, head: int | None, head_dim: int, value: torch.Tensor) -> None:
    """Inside a trace: set the last token's attention output (or one head's) to `value`."""
    if head is None:
        out = envoy_at(nn_model, site_path(family, "attn", layer)).output
        x = out[0] if isinstance(out, tuple) else out
        x[:, -1] = value
    else:
        x = envoy_at(nn_model, site_path(family, "heads", layer)).inputs[0][0]
        x[:, -1, head * head_dim : (head + 1) * head_dim] = value


def _performed_token_probs(nn_model, family, tokenizer, prompts, token_ids, patches, head_dim, batch_size) -> np.ndarray:
    """(len(patches) + 1, prompts): P(performed first token), unpatched first."""
    rows = []
    for start in range(0, len(prompts), batch_size):
        sl = slice(start, start + batch_size)
        inputs = encode(tokenizer, prompts[sl])
        ids = token_ids[sl]
        with torch.no_grad(), nn_model.trace() as tracer:
            with tracer.invoke(inputs):
                pass
            for layer, head, values in patches:
                with tracer.invoke(inputs):
                    _patch(nn_model, family, layer, head, head_dim, values[sl])
            with tracer.invoke():
                logits = nn_model.output.logits[:, -1].save()
        probs = logits.float().softmax(-1).view(len(patches) + 1, len(ids), -1)
        rows.append(probs.gather(2, ids[None, :, None].expand(len(patches) + 1, -1, 1))[..., 0].numpy())
    return np.concatenate(rows, axis=1)


def localize(pair: ModelPair, acts: xr.Dataset, behavior: Behavior, settings: LocalizeSettings, trace_kwargs: dict) -> xr.Dataset:
    """Layer and head effects for both sources, and the window they give."""
    if "attn" not in acts:
        raise ConfigError("localize needs the 'attn' site in collect.sites")
    per_head = settings.per_head and "heads" in acts
    test = acts.sel(prompt=acts.split.values == "test")
    prompts_eval = [str(p) for p in test.eval_prompt.values]
    prompts_deploy = [str(p) for p in test.deploy_prompt.values]
    tokens = [behavior.performed_first_token(str(a)) for a in test.answer.values]
    token_ids = torch.tensor([pair.tokenizer(" " + t, add_special_tokens=False)["input_ids"][0] for t in tokens])
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
    full_gap = np.zeros(len(SOURCES), np.float32)
    for si, source in enumerate(SOURCES):
        model_name, prompts, (donor_model, donor_framing), (ref_model, ref_prompts) = sources[source]
        attn = last("attn", donor_model, donor_framing)
        patches = [(layer, None, attn[:, li]) for li, layer in enumerate(layers)]
        if per_head:
            head_values = last("heads", donor_model, donor_framing)  # (prompt, layer, head, head_dim)
            patches += [(layer, h, head_values[:, li, h]) for li, layer in enumerate(layers) for h in heads]
        nn = pair.traced(model_name)
        probs = _performed_token_probs(nn, pair.family, pair.tokenizer, prompts, token_ids, patches, dh, settings.batch_size)
        ref_nn = pair.traced(ref_model)
        ref = _performed_token_probs(ref_nn, pair.family, pair.tokenizer, ref_prompts, token_ids, [], dh, settings.batch_size)[0]
        clean = probs[0]
        gap = float((ref - clean).mean())
        full_gap[si] = gap
        effects = (probs[1:] - clean).mean(axis=1) / gap if abs(gap) > 1e-6 else np.zeros(len(patches))
        layer_effect[si] = effects[: len(layers)]
        if per_head:
            head_effect[si] = effects[len(layers) :].reshape(len(layers), len(heads))
        log.info("localize %s: gap in P(performed token) %.3f, layer effects %s", source, gap, np.round(layer_effect[si], 3))
    window = pick_window(layer_effect[0], settings)
    log.info("localize: window %s (rule %s)", window, settings.rule)
    return xr.Dataset(
        {
            "layer_effect": (("source", "layer"), layer_effect),
            "head_effect": (("source", "layer", "head"), head_effect),
            "token_prob_gap": (("source",), full_gap),
        },
        coords={"source": list(SOURCES), "layer": layers, "head": heads},
        attrs={"window": window, "rule": settings.rule, "threshold": settings.threshold, "top_k": settings.top_k},
    )
