"""What a run store records about how it was made, and the config digest."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# Config parts that cannot change a result (where things run and are kept): left
# out of a store's digest and out of a sweep folder's name.
NOT_RESULT_SHAPING = ("backend", "store", "hydra", "progress")
NOT_RESULT_SHAPING_MODEL = ("cache_dir",)

PACKAGES = ("routing-suite", "torch", "transformers", "nnsight", "peft", "xarray", "zarr", "numpy", "hydra-core")
# "host": where a run sent its requests is kept out of stores like the key is.
_SECRET_WORDS = ("key", "token", "secret", "password", "host")


def package_versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    found["python"] = platform.python_version()
    return found


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


def scrub_secrets(node: Any) -> Any:
    """A copy with every value under a key that names a secret replaced."""
    if isinstance(node, dict):
        return {
            k: ("<removed>" if any(w in str(k).lower() for w in _SECRET_WORDS) else scrub_secrets(v)) for k, v in node.items()
        }
    if isinstance(node, list):
        return [scrub_secrets(v) for v in node]
    return node


def digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


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
