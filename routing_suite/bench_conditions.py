"""Benchmark figures for the intervene stage and for remote requests.

- interventions: the routing stage's conditions (baseline, the clamp, its
  base-subspace comparison and every control) run on one batch of held-out
  prompts the suite's way, every condition an invoke of one batched nnsight
  generation, against the plain baseline: one `model.generate` per condition
  with forward hooks applying the same edits. Both must give the same
  completions; the figure is the ratio of their seconds.
- remote: the same routing cell through nnsight's in-process request
  serialization (`backend=ndif backend.simulate=true`), requests and bytes per
  stage, with invokes grouped into as few requests as possible and with no
  grouping (`backend.max_invokes=1`).

The conditions come from a real routing cell run on the benchmark's organism
(its store: fit, localize, activations), so they are exactly what the routing
stage runs.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from hydra.utils import instantiate

from routing_suite.backends import LocalBackend
from routing_suite.config import compose_config
from routing_suite.families import site_path
from routing_suite.generation import encode, generate_under_conditions, until_eos
from routing_suite.interventions import Condition, ResidualCarry
from routing_suite.models import ModelPair
from routing_suite.routing import cell
from routing_suite.routing.controls import check_controls
from routing_suite.routing.intervene import build_conditions
from routing_suite.routing.targets import stored_aligned
from routing_suite.store import group_dataset


def routing_cfg(family: str, cache_dir: str, root: Path, n_test: int, extra: list[str] = ()):
    """The routing config of the benchmark's cell (small fit and test sets, no progress bars)."""
    return compose_config(
        "routing",
        [
            f"model={family}_organism",
            f"model.cache_dir={cache_dir}",
            f"store.root={root / 'stores'}",
            f"report_dir={root / 'table'}",
            "data.max_fit=80",
            f"data.max_test={n_test}",
            "progress=false",
            *extra,
        ],
    )


def cell_conditions(cfg, result: dict, n_pairs: int | None = None) -> tuple[list[Condition], list[str], int]:
    """The conditions of the cell `cfg` ran into `result` (`cell.run`), its held-out
    eval+deploy prompts (the first `n_pairs` test pairs, all when None), and max_new_tokens."""
    store = result["store"]
    acts = group_dataset(store, "activations").load()
    fit = group_dataset(store, "fit").load()
    spec = instantiate(cfg.intervention)
    controls = {key: instantiate(value) for key, value in cfg.control.items()}
    check_controls(controls)
    aligned = stored_aligned(group_dataset(store, "outcomes").load())
    conditions = build_conditions(spec, controls, fit, acts, result["window"], int(cfg.seed), aligned)
    test = acts.sel(prompt=acts.split.values == "test").isel(prompt=slice(0, n_pairs))
    prompts = [str(p) for p in test.eval_prompt.values] + [str(p) for p in test.deploy_prompt.values]
    return conditions, prompts, int(cfg.behavior.max_new_tokens)


def suite_generate(pair: ModelPair, prompts: list[str], conditions: list[Condition], max_new_tokens: int) -> dict[str, list[str]]:
    return generate_under_conditions(
        pair.traced("finetuned"), pair.family, pair.tokenizer, prompts, conditions, max_new_tokens, pair.num_layers, LocalBackend()
    )


def _edit_hook(condition: Condition, edits: list, carries: dict[int, ResidualCarry]):
    """A forward hook for one `generate`: its k-th call is generation step k (0: the prompt's pass).
    `carries`: the condition's residual carry per step, shared by its layers' hooks (as `run_plan`'s)."""
    calls = [0]

    def hook(module, args, output):
        step, calls[0] = calls[0], calls[0] + 1
        x = output[0] if isinstance(output, tuple) else output
        if condition.steps == "prompt" and step > 0:
            return None  # a generated token's pass: "prompt" edits only touch the prompt's pass
        x = x.clone()
        carry = carries.setdefault(step, ResidualCarry()) if condition.site == "resid" else None
        for e in edits:
            if condition.positions == "last":
                x[:, -1] = e.apply(x[:, -1], step, carry)
            else:
                x = e.apply(x, step, carry)
        return (x, *output[1:]) if isinstance(output, tuple) else x

    return hook


def hooks_generate(pair: ModelPair, prompts: list[str], conditions: list[Condition], max_new_tokens: int) -> dict[str, list[str]]:
    """The baseline: one plain `generate` per condition, its edits as forward hooks."""
    model, tokenizer = pair.model("finetuned"), pair.tokenizer
    modules = dict(model.named_modules())
    inputs = encode(tokenizer, prompts)
    width = inputs["input_ids"].shape[1]
    out: dict[str, list[str]] = {}
    for condition in conditions:
        by_layer: dict[int, list] = {}
        for e in condition.edits:
            by_layer.setdefault(e.layer, []).append(e)
        carries: dict[int, ResidualCarry] = {}
        handles = [
            modules[site_path(pair.family, condition.site, layer)].register_forward_hook(_edit_hook(condition, edits, carries))
            for layer, edits in by_layer.items()
        ]
        try:
            with torch.no_grad():
                ids = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                )
        finally:
            for handle in handles:
                handle.remove()
        name = condition.name if condition.seed is None else f"{condition.name}#{condition.seed}"
        out[name] = [tokenizer.decode(until_eos(row, tokenizer.eos_token_id), skip_special_tokens=True) for row in ids[:, width:]]
    return out


def _best_seconds(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def intervention_figures(pair: ModelPair, conditions: list[Condition], prompts: list[str], max_new_tokens: int, repeats: int) -> dict:
    """Seconds of the suite's batched conditions and of one hooked generate per condition."""
    # One warm-up of each path, then the best of `repeats`.
    suite_generate(pair, prompts, conditions, max_new_tokens)
    hooks_generate(pair, prompts, conditions, max_new_tokens)
    suite_s, suite_texts = _best_seconds(lambda: suite_generate(pair, prompts, conditions, max_new_tokens), repeats)
    hooks_s, hooks_texts = _best_seconds(lambda: hooks_generate(pair, prompts, conditions, max_new_tokens), repeats)
    same = sum(a == b for k in suite_texts for a, b in zip(suite_texts[k], hooks_texts[k]))
    total = sum(len(v) for v in suite_texts.values())
    return {
        "interventions_conditions": len(conditions),
        "interventions_prompts": len(prompts),
        "interventions_suite_seconds": round(suite_s, 3),
        "interventions_hooks_seconds": round(hooks_s, 3),
        "interventions_ratio": round(suite_s / hooks_s, 3),
        "interventions_same_completions": f"{same}/{total}",
    }


def remote_figures(family: str, cache_dir: str, root: Path, n_test: int) -> dict:
    """Requests and bytes of one routing cell through the simulated remote path, grouped and not."""
    figures: dict = {}
    for label, extra in (("grouped", []), ("ungrouped", ["backend.max_invokes=1"])):
        cfg = routing_cfg(family, cache_dir, root / label, n_test, ["backend=ndif", "backend.simulate=true", *extra])
        stats = cell.run(cfg)["requests"]
        for key, value in _flatten(stats).items():
            figures[f"remote_{label}_{key}"] = value
    return figures


def _flatten(stats: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in stats.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}_"))
        else:
            flat[name] = value
    return flat
