"""The layering of the library, checked by import-linter against the contracts in
pyproject.toml ([tool.importlinter]): the core knows no study and no model source, the
aggregator knows no study, a routing cell runs without the aggregator, the studies are
independent; and no module of the library imports itself through others (no cycle,
function-level imports included)."""

from __future__ import annotations

from pathlib import Path

import grimp
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold(monkeypatch):
    monkeypatch.chdir(ROOT)  # lint-imports reads pyproject.toml from the working folder
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_no_import_cycle():
    graph = grimp.build_graph("routing_suite", cache_dir=None)
    cycles = sorted(
        graph.find_shortest_chain(importer=imported, imported=module)
        for module in graph.modules
        for imported in graph.find_modules_directly_imported_by(module)
        if graph.chain_exists(importer=imported, imported=module)
    )
    assert not cycles, f"import cycles (each: a chain back to the module that imports its head): {cycles}"
