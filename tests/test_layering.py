"""The layering of the library, checked by import-linter against the contracts in
pyproject.toml ([tool.importlinter]): the core knows no study and no model source,
the ADL and EM studies do not import each other, and the routing study imports neither."""

from __future__ import annotations

from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold(monkeypatch):
    monkeypatch.chdir(ROOT)  # lint-imports reads pyproject.toml from the working folder
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0
