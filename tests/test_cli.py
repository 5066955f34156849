"""Bad input through the entry points' guard: one clear line, exit code 2, nothing left in outputs/.

The messages are checked in this process (`experiments._cli.cli` around the real
entry point, as `python -m experiments.<name>` runs it); two cases go through a
real subprocess, to check the exit code and the whole of stderr as a user sees them.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_OVERRIDES, run_entry_point, tiny_source

from routing_suite.organisms import build as organism_build

ROOT = Path(__file__).resolve().parents[1]

def _errors(experiment: str, args: list[str], tmp_path: Path, monkeypatch, capsys) -> tuple[int, list[str]]:
    return run_entry_point(experiment, args, tmp_path, monkeypatch, capsys)


def _nothing_written(tmp_path: Path) -> bool:
    return not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.*"))


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
        (["model=peft_adapter"], "error: model.base is required and has no value (add model.base=...)"),
        # Hydra's own errors, shortened: no schema class or `*_schema` option named
        (["foo=1"], "error: foo: no such key (a key of your own needs a leading +, e.g. +foo=...)"),
        (["collect.sitez=[resid]"], "error: collect.sitez: no such key"),
        (["model=gpt9_organism"], "error: model=gpt9_organism: no such option (the options: checkpoint_pair, gemma2_2b_it,"),
        (["model.arch.hidden_size=wide"], "error: model.arch.hidden_size: Value 'wide' of type 'str' could not be converted to Integer"),
        (["seed=1.5"], "error: seed: Value '1.5' of type 'float' could not be converted to Integer"),
        (["a=b=c"], "error: cannot read the override 'a=b=c'"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(args, expected, tmp_path, monkeypatch, capsys):
    code, lines = _errors("collect", args, tmp_path, monkeypatch, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(expected), lines
    assert "_schema" not in lines[0] and "Config'" not in lines[0]
    assert _nothing_written(tmp_path), "half-written outputs left"


def _long_name() -> str:
    return "x" * 300


@pytest.mark.parametrize(
    "args,expected",
    [
        # before the organism is built: its hidden size is known from its config
        (["intervention.rank=65", "fit.max_rank=65", "data.max_fit=null"],
         "must satisfy rank <= max_rank <= fit pairs (896) and the hidden size (64)"),
        ([f"intervention.name={_long_name()}"], "error: intervention.name='xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... (300 characters)' must be"),
        (["intervention.name=a/b"], "error: intervention.name='a/b' must be 1 to 64 letters"),
        (["collect.layers=[1,3,5]"], "error: collect.layers=[1, 3, 5] has gaps"),
        (["report_dir=/proc/no/such/table"], "error: report_dir: cannot write to '/proc/no/such/table'"),
    ],
)
def test_routing_refuses_before_any_work(args, expected, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "organisms"
    code, lines = _errors("routing", [f"model.cache_dir={cache}", *args], tmp_path, monkeypatch, capsys)
    assert code == 2 and len(lines) == 1 and expected in lines[0], lines
    assert not cache.exists() and _nothing_written(tmp_path)


def test_a_report_dir_under_a_file_is_refused_naming_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("")
    code, lines = _errors("routing", [f"model.cache_dir={tmp_path / 'organisms'}", f"report_dir={tmp_path / 'a_file' / 'table'}"],
                          tmp_path, monkeypatch, capsys)
    assert code == 2 and lines == [f"error: report_dir: cannot write to '{tmp_path / 'a_file' / 'table'}' (Not a directory)"]


@pytest.fixture(scope="module")
def tiny_adapter(tiny_cache):
    """The tiny organism's base and adapter folders, built once."""
    source = tiny_source(tiny_cache)
    source.load("refuse")
    return organism_build.base_dir(Path(tiny_cache), source.spec), organism_build.ensure_adapter(Path(tiny_cache), source.spec, "refuse")


@pytest.mark.parametrize(
    "damage,expected",
    [
        ("adapter_config.json", "adapter_config.json' is not valid JSON"),
        ("adapter_model.safetensors", "adapter_model.safetensors' is cut short or padded"),
    ],
)
def test_a_truncated_adapter_is_refused_before_any_work(damage, expected, tiny_adapter, tmp_path, monkeypatch, capsys):
    base, adapter = tiny_adapter
    broken = tmp_path / "adapter"
    shutil.copytree(adapter, broken)
    data = (broken / damage).read_bytes()
    (broken / damage).write_bytes(data[: len(data) * 2 // 3])
    args = ["model=peft_adapter", "model.family=llama", f"model.base={base}", f"model.adapter={broken}"]
    code, lines = _errors("collect", args, tmp_path, monkeypatch, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: model.adapter: ") and expected in lines[0], lines
    assert _nothing_written(tmp_path)


def test_disk_full_in_the_writer_thread_is_one_line_and_a_rerun_completes(tiny_adapter, tiny_cache, tmp_path, monkeypatch, capsys):
    """ENOSPC raised where zarr writes a chunk file, in the store's writer thread (a stand-in
    for a full disk: the store layer's own write is made to fail, after a first chunk)."""
    from zarr.storage import LocalStore

    args = [f"model.cache_dir={tiny_cache}", *TINY_OVERRIDES, f"store.root={tmp_path / 'stores'}", "backend.batch_size=2",
            "store.chunk_prompts=2", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"]
    real_set, chunks = LocalStore.set, []

    async def full_after_one_chunk(self, key, value):
        if "/c/" in key and "activations/" in key:
            chunks.append(key)
            if len(chunks) > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{self.root}/{key}")
        return await real_set(self, key, value)

    with monkeypatch.context() as patch:
        patch.setattr(LocalStore, "set", full_after_one_chunk)
        code, lines = _errors("collect", args, tmp_path, monkeypatch, capsys)
    # (transformers' progress lines for the weights come first)
    assert code == 2 and [line for line in lines if line.startswith("error:")] == lines[-1:] and "Traceback" not in lines, lines
    assert lines[-1].startswith("error: no space left on the device while writing '") and "rerun the same command" in lines[-1]
    partial = next((tmp_path / "stores").rglob("*.zarr.partial"))
    code, lines = _errors("collect", args, tmp_path, monkeypatch, capsys)
    assert code == 0, lines
    assert not partial.exists() and next((tmp_path / "stores").rglob("*.zarr"))


def _subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "experiments.collect", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args,expected",
    [
        (["model.family=gpt9"], "error: model.family='gpt9' is not one of ['llama', 'qwen2', 'gemma2', 'mistral']"),
        (["model=gpt9_organism"], "error: model=gpt9_organism: no such option"),
    ],
)
def test_a_real_process_prints_only_the_line(args, expected, tmp_path):
    result = _subprocess(args, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith(expected) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert _nothing_written(tmp_path)


def test_unknown_family_in_the_organism_report(tmp_path, monkeypatch, capsys):
    code, lines = _errors("organisms", ["families=[gpt9]"], tmp_path, monkeypatch, capsys)
    assert code == 2 and lines == ["error: model.family='gpt9' is not one of ['llama', 'qwen2', 'gemma2', 'mistral']"]


def test_the_host_stays_out_of_saved_configs_logs_and_the_store(tiny_adapter, tiny_cache, tmp_path, monkeypatch, capsys):
    """`backend.host=` given on the command line: Hydra's saved configs (.hydra/), the job's
    log and the store name it nowhere (the simulated remote path: no server needed)."""
    host = "http://ndif-secret-host.example:8123"
    args = [f"model.cache_dir={tiny_cache}", *TINY_OVERRIDES, f"store.root={tmp_path / 'stores'}", "backend=ndif", "backend.simulate=true",
            f"backend.host={host}", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"]
    monkeypatch.setenv("NDIF_API_KEY", "secret-key-value")
    code, lines = _errors("collect", args, tmp_path, monkeypatch, capsys)
    assert code == 0, lines
    saved = sorted(p.name for p in (tmp_path / "run" / ".hydra").iterdir())
    assert saved == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert "backend.host=<removed>" in (tmp_path / "run" / ".hydra" / "overrides.yaml").read_text()
    for path in [*(tmp_path / "run").rglob("*"), *(tmp_path / "stores").rglob("zarr.json")]:
        if path.is_file():
            text = path.read_text(errors="replace")
            assert "ndif-secret-host" not in text and "secret-key-value" not in text, path
