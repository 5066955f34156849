"""Sweeps: folders named by content, the checks before any job starts, threads per job,
and a sweep through submitit's local executor."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TEST_ORGANISM, TINY_OVERRIDES, run_entry_point
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from routing_suite import sweeps
from routing_suite.callbacks import job_threads
from routing_suite.config import compose_config, register_configs
from routing_suite.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def _hydra_cfg(primary: str, overrides: list[str]):
    return compose_config(primary, overrides, return_hydra_config=True)


# ---------------------------------------------------------------- folder names


def test_leaf_name_is_sorted_result_shaping_and_path_safe():
    assert sweeps.leaf_name(["seed=1", "intervention.rank=4"]) == "intervention.rank=4,seed=1"
    assert sweeps.leaf_name(["model=qwen2_organism", "behavior=refuse"]) == "defaults"
    # where things run and are kept does not name a folder, as it does not change a store's digest
    assert sweeps.leaf_name(["backend.batch_size=8", "store.root=/x", "model.cache_dir=/y", "progress=false"]) == "defaults"
    assert sweeps.leaf_name(["model.adapter=/data/adapters/a"]) == "model.adapter=_data_adapters_a"
    assert sweeps.leaf_name(["+extra=1", "experiment=smoke"], leave_out=["experiment"]) == "+extra=1"
    long = sweeps.leaf_name([f"data.max_fit={'9' * 200}"])
    assert len(long) == sweeps.MAX_LEAF and long != sweeps.leaf_name([f"data.max_fit={'9' * 199}8"])


def test_a_job_folder_is_model_behavior_and_its_other_overrides(tmp_path):
    overrides = ["model=qwen2_organism", "behavior=refuse", "seed=3", f"store.root={tmp_path}"]
    job = sweeps.as_job(0, overrides, _hydra_cfg("routing", [*overrides, f"hydra.sweep.dir={tmp_path}"]))
    assert Path(job.dir) == tmp_path / "qwen2_organism" / "refuse" / "seed=3"
    defaults = sweeps.as_job(1, [], _hydra_cfg("routing", [f"hydra.sweep.dir={tmp_path}"]))
    assert Path(defaults.dir) == tmp_path / "llama_organism" / "underperform" / "defaults"


def test_appendix_is_the_12_cell_grid_on_3_builds_in_one_folder(tmp_path):
    cfg = _hydra_cfg("routing", ["experiment=appendix"])
    assert cfg.hydra.mode.name == "MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert len(params.model.split(",")) * len(params.behavior.split(",")) == 12
    assert params["model.seed"].split(",") == ["0", "1", "2"]
    assert set(cfg.control) == {"random", "orthogonal", "non_routing", "semantic", "other_layer"}
    assert cfg.hydra.callbacks.tables._target_ == "routing_suite.callbacks.AggregateSweep"
    job = sweeps.as_job(0, ["experiment=appendix", "model.seed=0"], _hydra_cfg("routing", ["experiment=appendix", "model.seed=0"]))
    assert job.dir == "outputs/appendix/llama_organism/underperform/model.seed=0"


def test_jobs_sharing_a_folder_are_refused():
    jobs = [sweeps.Job(0, ["backend.batch_size=8"], "s/a"), sweeps.Job(1, ["backend.batch_size=16"], "s/a")]
    with pytest.raises(sweeps.SweepError, match="2 jobs of this sweep would write to the same folder 's/a'"):
        sweeps.check_distinct(jobs)
    sweeps.check_distinct([jobs[0], sweeps.Job(1, ["seed=2"], "s/b")])


# ---------------------------------------------------------------- launchers


@pytest.mark.parametrize("launcher", ["parallel", "slurm", "slurm_local"])
def test_launcher_configs_compose_onto_their_plugins(launcher):
    cfg = _hydra_cfg("routing", [f"hydra/launcher={launcher}"])
    sweeps.check_launcher(cfg.hydra.launcher, launcher)  # installed here: no error
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")


def test_a_launcher_that_is_not_installed_is_named_with_its_package():
    store = ConfigStore.instance()
    saved = dict(store.repo["hydra"]["launcher"])
    try:
        assert sweeps.register_launcher_stand_ins(installed=lambda _m: False) == list(sweeps._PLUGIN_CONFIGS)
        cfg = _hydra_cfg("routing", ["hydra/launcher=parallel"])  # composes onto the stand-in
        assert cfg.hydra.launcher.n_jobs == 2
        with pytest.raises(sweeps.SweepError, match=r"hydra/launcher=parallel: .* install hydra-joblib-launcher"):
            sweeps.check_launcher(cfg.hydra.launcher, "parallel", installed=lambda _m: False)
    finally:
        store.repo["hydra"]["launcher"] = saved


@pytest.mark.parametrize(
    "launcher,env,expected",
    [
        ({"n_jobs": 2}, {}, (1, "2 parallel jobs on 2 cores")),
        ({"n_jobs": -1}, {}, (1, "2 parallel jobs on 2 cores")),
        ({"n_jobs": 1}, {}, (2, "1 parallel jobs on 2 cores")),
        ({"n_jobs": 4}, {}, (1, "4 parallel jobs on 2 cores")),
        ({"cpus_per_task": 4}, {}, (4, "cpus_per_task")),
        ({}, {}, (None, "torch's default")),
        ({"n_jobs": 2}, {"ROUTING_SUITE_THREADS": "2"}, (2, "ROUTING_SUITE_THREADS")),
    ],
)
def test_torch_threads_per_job(launcher, env, expected):
    assert job_threads(launcher, env, cores=2) == expected


def test_a_bad_thread_count_is_refused():
    with pytest.raises(ConfigError, match="ROUTING_SUITE_THREADS='two' must be a positive integer"):
        job_threads({}, {"ROUTING_SUITE_THREADS": "two"}, cores=2)


# ---------------------------------------------------------------- bad sweeps fail before any job


@pytest.mark.parametrize(
    "args,expected",
    [
        (["backend.batch_size=16,32"], "2 jobs of this sweep would write to the same folder"),
        (["model=llama_organism,gpt9_organism"], "error: model=gpt9_organism: no such option"),
        (
            ["seed=1,2", "hydra.launcher._target_=hydra_plugins.hydra_no_such_launcher.Launcher"],
            "the launcher plugin hydra_plugins.hydra_no_such_launcher is not installed",
        ),
    ],
)
def test_a_bad_sweep_fails_before_any_job_starts(args, expected, tmp_path, monkeypatch, capsys):
    code, lines = run_entry_point("routing", ["-m", *args], tmp_path, monkeypatch, capsys)
    assert code == 2 and len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "outputs").exists(), "a job started"


def test_a_second_sweep_keeps_the_first_ones_records(tmp_path, monkeypatch, capsys):
    """Two sweeps into one folder (aggregations of synthetic stores: seconds): each keeps
    its own job list and config, says where in the log, and neither names the host."""
    import fake_stores as fake

    from experiments import aggregate
    from experiments._cli import cli

    fake.write_store(tmp_path / "stores", "llama", "refuse")
    monkeypatch.chdir(tmp_path)
    on_term = signal.getsignal(signal.SIGTERM)
    for seeds in ("1,2", "3,4"):
        monkeypatch.setattr(sys, "argv", ["aggregate", "-m", f"seed={seeds}", f"root={tmp_path / 'stores'}", "plots=false",
                                          f"hydra.sweep.dir={tmp_path / 'sweep'}", "+backend.host=http://hidden-host.example"])
        cli(aggregate.main)
    # the sweep's SIGTERM handling (callbacks.StopJobsOnTerm) ends with the sweep
    assert signal.getsignal(signal.SIGTERM) is on_term
    records = sorted((tmp_path / "sweep").glob("sweep-*.json"))
    configs = sorted((tmp_path / "sweep").glob("multirun-*.yaml"))
    assert len(records) == len(configs) == 2 and not (tmp_path / "sweep" / "multirun.yaml").exists()
    seeds = [sorted(Path(j["dir"]).name.rsplit("seed=", 1)[1] for j in json.loads(r.read_text())["jobs"]) for r in records]
    assert sorted(seeds) == [["1", "2"], ["3", "4"]]
    logged = capsys.readouterr().out  # Hydra's own log of the sweep goes to the console
    for record, config in zip(records, configs):
        assert f"this sweep's records: {record} (jobs and folders), {config} (config)" in logged
        assert "hidden-host" not in config.read_text()


# ---------------------------------------------------------------- stopping a parallel sweep


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    return children


def _descendants(pid: int) -> set[int]:
    children, found, todo = _children(), set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


@pytest.mark.slow  # a sweep's processes started and stopped (about a minute): the slow tier
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
def test_sigterm_to_a_parallel_sweep_stops_its_workers_too(tiny_cache, tmp_path):
    """`kill <pid>` of a sweep once left joblib's workers running cells on their own (parent 1)."""
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=parallel", "seed=0,1,2,3", "experiment=smoke", "progress=false",
            f"model.cache_dir={tiny_cache}", *TINY_OVERRIDES, f"store.root={tmp_path / 'stores'}", f"hydra.sweep.dir={sweep_dir}"]
    err_file = tmp_path / "stderr.txt"
    with open(err_file, "w") as err:  # a file, not a pipe: orphaned workers would hold a pipe open
        proc = subprocess.Popen([sys.executable, "-m", "experiments.routing", *args], cwd=tmp_path, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=err)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not list(sweep_dir.glob("*/*/*/routing.log")):
            time.sleep(0.2)
        workers = _descendants(proc.pid)
        assert proc.poll() is None and workers, "no job was running to stop"
        proc.send_signal(signal.SIGTERM)  # to the launching process only, as `kill <pid>` does
        proc.wait(timeout=60)
        err = err_file.read_text()
        assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in err, (proc.returncode, err[-2000:])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_running(pid) for pid in workers):
            time.sleep(0.2)
        assert not [pid for pid in workers if _running(pid)], "workers still running after the sweep stopped"
    finally:
        for pid in [proc.pid, *_descendants(proc.pid), *(pid for pid in workers if _running(pid))]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


# ---------------------------------------------------------------- a sweep through submitit


@pytest.mark.slow  # two cells through submitit processes: the slow tier
def test_sweep_through_submitit_local_executor(llama_underperform, organism_cache, tmp_path):
    sweep_dir = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "ROUTING_SUITE_THREADS"}
    args = [
        "-m", "hydra/launcher=slurm_local", "seed=0,1", "experiment=smoke", "progress=false",
        f"model.cache_dir={organism_cache}", *TEST_ORGANISM, f"store.root={tmp_path / 'stores'}", f"hydra.sweep.dir={sweep_dir}",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "experiments.routing", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = json.loads(next(sweep_dir.glob("sweep-*.json")).read_text())["jobs"]
    folders = {Path(j["dir"]).relative_to(sweep_dir).as_posix() for j in jobs}
    # Each job's folder is named by its task overrides (the sweep's value of seed among them; Hydra's own are not).
    per_job = [[f"seed={s}" if a == "seed=0,1" else a for a in args[1:] if not a.startswith("hydra")] for s in (0, 1)]
    assert folders == {f"llama_organism/underperform/{sweeps.leaf_name(o)}" for o in per_job} and len(folders) == 2
    stores = set()
    for folder in folders:
        record = json.loads((sweep_dir / folder / "table" / "cell.json").read_text())
        assert record["store"].endswith(".zarr") and Path(record["store"]).is_dir()
        stores.add(record["store"])
        log = (sweep_dir / folder / "routing.log").read_text()
        assert "torch threads: 1 (cpus_per_task)" in log
    assert len(stores) == 2
    assert list((sweep_dir / ".submitit").glob("*/*_result.pkl")), "the jobs did not run through submitit"
    assert OmegaConf.load(next(sweep_dir.glob("multirun-*.yaml"))).hydra.launcher._target_.endswith("LocalLauncher")
