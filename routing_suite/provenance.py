"""What a run store records about how it was made, and the config digest."""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import re
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# Config parts that cannot change a result (where things run and are kept, where
# tables go and how they are printed, what is read from a finished store but never
# written to it: the ADL's goal identification): left out of a store's digest and
# out of a sweep folder's name.
NOT_RESULT_SHAPING = ("backend", "store", "hydra", "progress", "report_dir", "n_resamples", "goals", "goal_grader")
# model.processes: how many processes train a planted base, the same bits either way
# (organisms/split_training; tests/test_split_training.py holds it to that).
NOT_RESULT_SHAPING_MODEL = ("cache_dir", "processes")
# Keys added after stores were written, each with the value that does what those
# stores did: at that value the key is left out of the digest, so a store written
# before the key existed keeps its digest and is reused.
ADDED_AT_DEFAULT = {
    ("localize", "method"): "exact", ("localize", "confirm"): 2, ("intervention", "bound"): "two_sided",
    ("model", "pretraining"): "routing", ("localize", "check_windows"): 0, ("transfer", "persona_exchanges"): 0,
    ("em", "ablate_layers"): None, ("em", "ablate_to"): "zero",
    ("em", "ablate_at"): "every",
}
# The suite's own classes are named in a digest by class name only, so that moving
# a module does not rename every cached store; a user's `_target_` stays whole.
_OWN_PACKAGE = "routing_suite."

PACKAGES = ("routing-suite", "torch", "transformers", "nnsight", "peft", "xarray", "zarr", "numpy", "hydra-core")
# Words that make a config key a secret when the key holds one of them as a whole
# word ("api_key", "NDIF_HOST", "hf_token"), never as part of a word
# ("max_new_tokens", "keyword"). "host": where a run sent its requests is kept out
# of stores like the key is.
_SECRET_WORDS = frozenset({"key", "token", "secret", "password", "host", "auth", "credentials"})
_KEY_WORDS = re.compile(r"[a-z0-9]+")


def package_versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    found["python"] = platform.python_version()
    return found


def cpu_capability() -> str:
    """The CPU instruction set torch's kernels use here (e.g. 'AVX512', 'AVX2'): builds on
    different ones train different weights, so every store and organism records it."""
    import torch  # the aggregator reads provenance without loading torch

    return str(torch.backends.cpu.get_cpu_capability())


def cpu_model() -> str:
    """The processor's model name ('unknown' where the OS does not say). Recorded beside
    `cpu_capability`, never keyed on: two AVX-512 machines of different vendors gave
    different appendix numbers from one commit and config (2026-12-03), so a build's
    machine is part of what a reader needs to compare two runs."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# Shapes for the kernel probe: (rows, inner, outer) of the products a training step
# runs, from the organisms' (hidden 64) to SmolLM2's (hidden 576), odd sizes included
# because BLAS libraries pick their code path by shape as well as by processor.
_PROBE_SHAPES = ((8 * 24, 64, 176), (8 * 24, 176, 64), (4 * 17, 576, 1536), (4 * 17, 1536, 576), (8 * 24, 64, 331))


@functools.cache
def kernel_fingerprint(num_threads: int) -> str:
    """A hash of the exact bits a small training step's kernels produce here at
    `num_threads` torch threads: products of several shapes, softmax attention, RMS
    norm, SiLU, log-softmax and their gradients. Two machines that train bitwise-equal
    weights give the same value; machines whose BLAS takes other paths (an Intel and an
    AMD processor both reporting "AVX512" did, 2026-12-03) give different ones, so an
    organism's cache key tells their builds apart where `cpu_capability` cannot.
    Costs a few tens of milliseconds, once per process and thread count."""
    import torch

    threads, was_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        generator = torch.Generator().manual_seed(0)
        digest = hashlib.sha256()
        for rows, inner, outer in _PROBE_SHAPES:
            # Uniform draws through torch.rand (one scalar path everywhere), scaled.
            x = ((torch.rand(rows, inner, generator=generator) - 0.5) * 2).requires_grad_()
            w = ((torch.rand(inner, outer, generator=generator) - 0.5) * (2 / inner**0.5)).requires_grad_()
            h = x @ w
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            h = torch.nn.functional.silu(h)
            q = h.reshape(-1, 8 if rows % 8 == 0 else 4, outer)
            attention = torch.softmax(q @ q.transpose(1, 2) / outer**0.5, dim=-1) @ q
            out = torch.log_softmax(attention, dim=-1)
            out.sum().backward()
            for tensor in (out.detach(), x.grad, w.grad):
                digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was_deterministic)


def git_commit() -> str:
    """The suite's commit, with '+dirty' when the work tree has changes; 'unknown' outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def is_secret_key(key: Any) -> bool:
    """True when one of the key's words (split at `_`, `-`, `.` and case) names a secret."""
    return not _SECRET_WORDS.isdisjoint(_KEY_WORDS.findall(str(key).lower()))


REMOVED = "<removed>"


def scrub_secrets(node: Any) -> Any:
    """A copy with every value under a key that names a secret replaced."""
    if isinstance(node, dict):
        return {k: (REMOVED if is_secret_key(k) else scrub_secrets(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [scrub_secrets(v) for v in node]
    return node


def _short_target(node: Any) -> Any:
    """`_target_: routing_suite.a.b.Cls` -> `Cls`, everywhere in the tree."""
    if isinstance(node, dict):
        return {
            k: (v.rsplit(".", 1)[-1] if k == "_target_" and isinstance(v, str) and v.startswith(_OWN_PACKAGE) else _short_target(v))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_short_target(v) for v in node]
    return node


def result_config(resolved: dict) -> dict:
    """What of a resolved config shapes a run's results: everything but where things
    run and are kept (NOT_RESULT_SHAPING, model.cache_dir) and keys added later at the
    value older stores had (ADDED_AT_DEFAULT), with the suite's own `_target_`s named
    by class only. A store's digest is a hash of this."""
    kept = {k: v for k, v in resolved.items() if k not in NOT_RESULT_SHAPING}
    for (group, key), default in ADDED_AT_DEFAULT.items():
        if isinstance(kept.get(group), dict) and kept[group].get(key, default) == default:
            kept[group] = {k: v for k, v in kept[group].items() if k != key}
    if isinstance(kept.get("model"), dict):
        kept["model"] = {k: v for k, v in kept["model"].items() if k not in NOT_RESULT_SHAPING_MODEL}
    return _short_target(kept)


# Config keys that name an input file: its content, not only its path, shapes a result.
INPUT_FILES = ("data.prompts", "adl.finetune_file", "text.path")


def file_digest(path: str | Path) -> str:
    """A hash of a file's bytes."""
    found = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            found.update(block)
    return found.hexdigest()[:16]


def input_file_digests(resolved: dict) -> dict[str, str]:
    """Per INPUT_FILES key set in the config to an existing file, the hash of its content."""
    found = {}
    for key in INPUT_FILES:
        node: Any = resolved
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, str) and Path(node).is_file():
            found[key] = file_digest(node)
    return found


def digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def variant_of(digest_cfg: dict) -> str:
    """What tells a cell's runs apart other than the build: a hash of the result-shaping
    config without the organism's seed (runs of one variant are replicates)."""
    model = {k: v for k, v in (digest_cfg.get("model") or {}).items() if k != "seed"}
    return digest({**digest_cfg, "model": model})[:10]


def build_of(digest_cfg: dict) -> dict:
    """A store's variant and build from its digested config, the models' weight hashes left
    out (every build has its own): for the EM studies' stores, whose cells are named by
    family alone, as `runs.cell_of` does for a routing cell."""
    kept = {k: v for k, v in digest_cfg.items() if k != "weights"}
    seed = (kept.get("model") or {}).get("seed")
    return {"variant": variant_of(kept), "replicate": "" if seed is None else str(seed)}


def store_build(attrs: dict) -> dict:
    """A store's variant and build: its cell's, or, for a store written before its cell named
    them (EM stores until 2026-12-05), `build_of` its digested config."""
    cell = attrs.get("cell") or {}
    if "variant" in cell:
        return {"variant": cell["variant"], "replicate": cell.get("replicate", "")}
    config = attrs.get("digest_config")
    return build_of(config) if isinstance(config, dict) else {"variant": "", "replicate": ""}


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def differing_keys(a: dict, b: dict) -> list[str]:
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k, "<absent>") != fb.get(k, "<absent>"))
