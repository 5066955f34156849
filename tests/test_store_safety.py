"""A store's finish survives a stop at any step, and one store serves one live process at a time."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xarray as xr
import zarr

from routing_suite.store import RunStore
from routing_suite.store_lock import StoreBusy, StoreLock
from routing_suite.store_settings import StoreSettings

ROOT = Path(__file__).resolve().parents[1]


def _open(root: Path) -> RunStore:
    return RunStore.open(root / "run.zarr", StoreSettings(), {"a": 1}, {"cell": {"family": "llama"}})


def _filled(root: Path) -> RunStore:
    store = _open(root)
    store.write_group("fit", xr.Dataset({"x": ("i", [1.0, 2.0])}))
    store.mark_stage_done("fit")
    return store


class Stop(BaseException):
    """Stands in for a kill: raised at one step, nothing after it runs (finish has no cleanup)."""


def _stop(*args, **kwargs):
    raise Stop


@pytest.mark.parametrize("step", ["mark_complete", "consolidate", "rename"])
def test_a_finish_stopped_at_any_step_is_completed_by_the_next_open(step, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    store = _filled(tmp_path)
    with monkeypatch.context() as patch:
        if step == "mark_complete":
            patch.setattr(RunStore, "update_attrs", _stop)
        elif step == "consolidate":  # complete=True is written, the rest is not
            patch.setattr(zarr, "consolidate_metadata", _stop)
        else:
            patch.setattr(Path, "rename", _stop)
        with pytest.raises(Stop):
            store.finish()
    store.lock.release()  # what the kill would do
    assert (tmp_path / "run.zarr.partial").exists() and not (tmp_path / "run.zarr").exists()
    again = _open(tmp_path)
    if step == "mark_complete":  # not marked complete yet: an ordinary resume
        assert not again.complete and again.stage_done("fit")
        again.finish()
    else:
        assert "completing the finish a stop interrupted" in caplog.text
    assert again.path == tmp_path / "run.zarr" and again.complete
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.lock"))
    assert xr.open_zarr(again.path, group="fit").x.values.tolist() == [1.0, 2.0]  # consolidated: opens with no options
    assert again.finish() == again.path  # finishing twice changes nothing


PROVENANCE = {"cell": {"family": "llama", "behavior": "refuse"}, "experiment": "routing", "seed": 0}


def test_a_kill_at_any_write_of_the_root_metadata_leaves_all_of_it_or_none(tmp_path, monkeypatch, caplog):
    """Every state a kill can leave: the root metadata as each write leaves it (zarr writes a
    file whole, by rename). A partial store without its cell or provenance would be resumed
    and finished without them; one stopped before any write is started anew."""
    seen: list[dict] = []
    real_put = zarr.storage._local._put

    def put(path, value, **kwargs):
        written = real_put(path, value, **kwargs)
        if path == tmp_path / "run.zarr.partial" / "zarr.json":
            seen.append(json.loads(path.read_text())["attributes"])
        return written

    monkeypatch.setattr(zarr.storage._local, "_put", put)
    store = RunStore.open(tmp_path / "run.zarr", StoreSettings(), {"a": 1}, PROVENANCE)
    store.update_attrs(stages_done=["fit"], note="two keys")
    assert len(seen) == 2, "one write to create, one to update"
    for attrs in seen:
        assert {k: attrs[k] for k in PROVENANCE} == PROVENANCE and attrs["config_digest"] and "complete" in attrs
    assert seen[1]["stages_done"] == ["fit"] and seen[1]["note"] == "two keys"
    store.lock.release()

    caplog.set_level(logging.WARNING)
    (tmp_path / "run.zarr.partial" / "zarr.json").unlink()  # a kill after the folder, before its metadata
    again = RunStore.open(tmp_path / "run.zarr", StoreSettings(), {"a": 1}, PROVENANCE)
    assert "was stopped before its first write; starting it anew" in caplog.text
    assert {k: again.attrs[k] for k in PROVENANCE} == PROVENANCE and again.attrs["stages_done"] == []


def test_a_leftover_partial_beside_a_complete_store_is_removed(tmp_path):
    _filled(tmp_path).finish()
    (tmp_path / "run.zarr.partial").mkdir()
    again = _open(tmp_path)
    assert again.complete and not (tmp_path / "run.zarr.partial").exists()


def test_one_process_shares_its_lock_and_lets_go_when_finished(tmp_path):
    first = _open(tmp_path)
    second = _open(tmp_path)  # the same process: shared
    assert first.lock is second.lock and (tmp_path / "run.zarr.lock").exists()
    first.finish()
    assert not (tmp_path / "run.zarr.lock").exists()


_HOLD = """
import sys, time
from pathlib import Path
from routing_suite.store_lock import StoreLock
lock = StoreLock.acquire(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


def _holder(store: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(store)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_store_held_by_a_live_process_is_refused_naming_it_and_taken_over_once_it_died(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    holder = _holder(tmp_path / "run.zarr")
    try:
        with pytest.raises(StoreBusy) as refused:
            _open(tmp_path)
        message = str(refused.value)
        assert f"is in use by process {holder.pid} (" in message and "wait for that run to end, or stop it" in message
        assert "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    store = _open(tmp_path)  # the kernel dropped the dead process's lock
    assert f"taking over the lock left by process {holder.pid}" in caplog.text
    store.finish()


def test_a_complete_store_is_reused_while_another_process_holds_its_lock(tmp_path):
    """A finished store is only read: a run that reuses it does not wait for, or refuse,
    another run holding its lock (two EM transfers sharing a family's store)."""
    _filled(tmp_path).finish()
    holder = _holder(tmp_path / "run.zarr")
    try:
        store = _open(tmp_path)
        assert store.complete and store.lock is None and store.path == tmp_path / "run.zarr"
        assert float(store.read("fit").x.sum()) == 3.0
        assert store.finish() == tmp_path / "run.zarr"
        with pytest.raises(StoreBusy):  # another config's run still goes through the lock
            RunStore.open(tmp_path / "run.zarr", StoreSettings(), {"a": 2}, {})
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def _collect_cmd(tmp_path: Path, cache: Path) -> list[str]:
    return [
        sys.executable, "-m", "experiments.collect", f"model.cache_dir={cache}", "model.train.base_steps=20",
        "model.train.lora_steps=10", "model.task.n_entities=40", f"store.root={tmp_path / 'stores'}", "data.max_fit=100",
        "data.max_test=40", "progress=false",
    ]


@pytest.mark.slow  # two entry-point processes side by side: the slow tier
def test_two_identical_runs_at_once(tmp_path):
    """A double submission: the second run is refused with one line naming the first,
    while the first holds the store (it is paused, so the two surely overlap); the
    first completes; each had its own run folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = _collect_cmd(tmp_path, tmp_path / "organisms")
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not list((tmp_path / "stores").rglob("*.zarr.lock")):
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)
    try:
        assert first.poll() is None, "the first run ended before the second could start"
        second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    # (the model loads before its store is opened: transformers' progress lines come first)
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 2 and [line for line in lines if line.startswith("error:")] == lines[-1:], second.stderr
    assert lines[-1].startswith("error: store ") and f"is in use by process {first.pid} (experiments.collect, since" in lines[-1]
    assert len(list((tmp_path / "outputs" / "runs" / "collect").glob("*/*"))) == 2  # a run folder each
    assert len(list((tmp_path / "stores").rglob("*.zarr"))) == 1 and not list((tmp_path / "stores").rglob("*.partial"))
    assert not list((tmp_path / "stores").rglob("*.lock"))


def test_lock_files_name_no_command_line(tmp_path):
    """The lock says who holds the store, never how it was called (a command line can hold a host)."""
    lock = StoreLock.acquire(tmp_path / "run.zarr")
    text = (tmp_path / "run.zarr.lock").read_text()
    lock.release()
    assert set(json.loads(text)) == {"pid", "host", "entry", "since"}
