"""The appendix rerun end to end (slow tier): the grid, the tables.

One family x three behaviours on one build (the full appendix is 4 x 3 x 3
builds; its figures are measured and written in the README). One run goes
through uninterrupted; a second, in another folder, is killed during the grid
and started again (through the parallel launcher), and must end with the
same table and plot bytes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Small prompt sets and one family on one build keep it to a few minutes on 2 cores
# (command-line sweep values replace the appendix's own).
ARGS = ["experiment=appendix", "model=llama_organism", "model.seed=0",
        "data.max_fit=80", "data.max_test=48", "progress=false"]
N_CELLS = 3
TABLES = ("table.md", "table.csv", "table.tex", "cells.csv", "headline.txt")


def _command(sweep_dir: Path, cache: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.routing", *ARGS, f"model.cache_dir={cache}",
            f"hydra.sweep.dir={sweep_dir}", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _appendix(sweep_dir: Path, cache: str, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(sweep_dir, cache, *extra), cwd=sweep_dir.parent, env=_env(), capture_output=True,
                            text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _outputs(sweep_dir: Path) -> dict[str, bytes]:
    """Every file of the tables folder; report.md with the folder's own path taken out."""
    files = {p.name: p.read_bytes() for p in sorted((sweep_dir / "tables").iterdir())}
    files["report.md"] = files["report.md"].replace(str(sweep_dir.resolve()).encode(), b"<sweep>")
    return files


def _cells_done(sweep_dir: Path) -> int:
    return len(list(sweep_dir.glob("*/*/*/table/cell.json")))


def test_appendix_killed_during_the_grid_resumes_to_the_same_bytes(organism_cache, tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    _appendix(whole, organism_cache)
    tables = _outputs(whole)
    assert set(TABLES) <= set(tables) and {"gaps.png", "gaps.pdf"} <= set(tables)
    assert tables["table.md"].count(b"\n| ") == N_CELLS, "not every cell"

    killed = tmp_path / "killed"
    killed.mkdir()
    proc = subprocess.Popen(_command(killed, organism_cache), cwd=tmp_path, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None:
            if _cells_done(killed) >= 2 and list((killed / "stores").rglob("*.zarr.partial")):
                break  # two cells done and the third one's store half written
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert 2 <= _cells_done(killed) < N_CELLS and not (killed / "tables").exists()
    _appendix(killed, organism_cache, "hydra/launcher=parallel")
    logs = "".join(p.read_text() for p in killed.glob("*/*/*/routing.log"))
    assert "resuming store" in logs and "reusing complete store" in logs
    assert _outputs(killed) == tables
