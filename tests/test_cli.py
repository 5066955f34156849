"""Bad input through the real entry point: one clear line, non-zero exit, nothing left in outputs/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, experiment: str = "collect") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", f"experiments.{experiment}", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args,expected",
    [
        (["model.family=gpt9"], "error: model.family='gpt9' is not one of ['llama', 'qwen2', 'gemma2', 'mistral']"),
        (["behavior.name=sulk"], "error: behavior.name='sulk' is not one of ['underperform', 'refuse', 'installed']"),
        (["backend.batch_size=0"], "error: backend.batch_size=0 must be >= 1"),
        (["store.dtype=int8"], "error: store.dtype='int8' is not one of ['float32', 'float16', 'bfloat16']"),
        (
            ["model=peft_adapter", "model.family=llama", "model.base=./no/such/model", "model.adapter=./no/such/adapter"],
            "error: model.base='./no/such/model' does not exist",
        ),
    ],
)
def test_bad_value_gives_one_line_and_exit_2(args, expected, tmp_path):
    result = _run(args, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.*")), "half-written outputs left"


@pytest.mark.parametrize(
    "args,expected",
    [
        (["model=gpt9_organism"], "Could not find 'model/gpt9_organism'"),
        (["model.arch.hidden_size=wide"], "model.arch.hidden_size"),
        (["seed=1.5"], "seed"),
    ],
)
def test_bad_override_is_refused_before_any_work(args, expected, tmp_path):
    result = _run(args, tmp_path)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_unknown_family_in_the_organism_report(tmp_path):
    result = _run(["families=[gpt9]"], tmp_path, "organisms")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: model.family='gpt9' is not one of ['llama', 'qwen2', 'gemma2', 'mistral']"
