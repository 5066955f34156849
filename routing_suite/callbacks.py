"""Hydra callbacks (configured under `hydra.callbacks`).

- `JobSetup` (every run and sweep job, conf/hydra/default.yaml): torch threads
  for the job, from the launcher, and deterministic kernels.
- `ScrubSavedConfig` (every run and sweep job): the configs Hydra saved in the
  job's `.hydra/` folder, with every value of a secret key (the NDIF host, a
  key, a token) removed wherever it appears.
- `StopJobsOnTerm` (every sweep): SIGTERM to the launching process stops the
  parallel launcher's worker processes too.
- `AggregateSweep` (conf/experiment/appendix.yaml): when a sweep ends,
  aggregate exactly the stores its jobs used into one folder.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from routing_suite import sweeps
from routing_suite.errors import ConfigError
from routing_suite.provenance import REMOVED, is_secret_key

log = logging.getLogger(__name__)

THREADS_ENV = "ROUTING_SUITE_THREADS"


def job_threads(launcher: Mapping[str, Any], env: Mapping[str, str], cores: int) -> tuple[int | None, str]:
    """Torch threads for one job, and why: ROUTING_SUITE_THREADS, else what the launcher implies.

    joblib runs `n_jobs` jobs at once on this machine: each gets cores // n_jobs
    (2 jobs x 2 threads on 2 cores would fight over them); submitit gives each
    job `cpus_per_task` cores; the basic launcher runs one job at a time and
    keeps torch's default (every core, or OMP_NUM_THREADS).
    """
    if env.get(THREADS_ENV):
        value = env[THREADS_ENV]
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"{THREADS_ENV}={value!r} must be a positive integer")
        return int(value), THREADS_ENV
    n_jobs = launcher.get("n_jobs")
    if n_jobs is not None:
        # joblib: -1 is every core, -2 all but one, and so on.
        parallel = max(1, cores + 1 + int(n_jobs)) if n_jobs < 0 else max(1, int(n_jobs))
        return max(1, cores // parallel), f"{parallel} parallel jobs on {cores} cores"
    cpus = launcher.get("cpus_per_task")
    if cpus:
        return int(cpus), "cpus_per_task"
    return None, "torch's default"


class JobSetup(Callback):
    """Set torch's thread count for the job and turn on deterministic algorithms."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        import torch

        threads, why = job_threads(config.hydra.launcher, os.environ, sweeps.usable_cores())
        if threads is not None:
            torch.set_num_threads(threads)
        # warn_only: on GPUs a few kernels have no deterministic version; they warn instead of failing.
        torch.use_deterministic_algorithms(True, warn_only=True)
        log.info("torch threads: %d (%s); deterministic algorithms on", torch.get_num_threads(), why)


def _exit_on_term(signum: int, frame: Any) -> None:
    sys.stderr.write("error: stopped by SIGTERM: the sweep's jobs are stopped; a rerun resumes them\n")
    raise SystemExit(128 + signum)


class StopJobsOnTerm(Callback):
    """A sweep stopped by SIGTERM (`kill <pid>`, a scheduler's limit) stops its jobs too.

    Python's default for SIGTERM ends the launching process at once, and the parallel
    launcher's workers (joblib's loky processes) ran on: they went on building organisms
    and running cells into a sweep folder that might be gone. Raised as SystemExit(143)
    in the launching process instead, joblib aborts the sweep and kills its workers
    before the exit; a cell cut short keeps what its store had finished, and a rerun
    resumes it. Ctrl-C reaches the whole process group and needs nothing of this."""

    def __init__(self) -> None:
        self._previous: Any = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Signal handlers belong to the main thread (a sweep started elsewhere keeps Python's).
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, _exit_on_term)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._previous is not None:  # a sweep run from Python leaves the caller's handler as it was
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def secret_values(config: DictConfig) -> set[str]:
    """The values under secret keys (`provenance.is_secret_key`) of a job's config and
    of its overrides, as text (none shorter than 4 characters: they are replaced
    wherever they appear)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if is_secret_key(key) and value is not None:
                    found.add(str(value))
                elif key != "hydra":
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(OmegaConf.to_container(config, resolve=False))
    for override in config.hydra.overrides.task:
        key, _, value = str(override).partition("=")
        if is_secret_key(key.lstrip("+~").split("@")[0]):
            found.add(value)
    return {value for value in found if len(value) >= 4}


def scrub_files(paths: list[Path], secrets: set[str]) -> None:
    """Replace every secret value in these files (longest first, so none is left in part)."""
    for path in paths:
        text = path.read_text(encoding="utf-8")
        scrubbed = text
        for value in sorted(secrets, key=len, reverse=True):
            scrubbed = scrubbed.replace(value, REMOVED)
        if scrubbed != text:
            path.write_text(scrubbed, encoding="utf-8")


class ScrubSavedConfig(Callback):
    """Hydra saves a job's config, its own config and the overrides (`.hydra/*.yaml`)
    just before the job starts, as given: a `backend.host=...` override would stay
    there (and in the overrides folded into `hydra.job.override_dirname`). This
    rewrites them without any secret value."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        subdir = config.hydra.output_subdir
        secrets = secret_values(config)
        if subdir is None or not secrets:
            return
        saved = Path(str(config.hydra.runtime.output_dir)) / str(subdir)
        scrub_files(sorted(saved.glob("*.yaml")), secrets)


def cell_store(job: sweeps.Job) -> str:
    """The store a finished routing job used, from the record it left in its folder."""
    from routing_suite.runs import CELL_RECORD, TABLE_DIR

    record = Path(job.dir) / TABLE_DIR / CELL_RECORD
    if not record.is_file():
        raise ConfigError(
            f"job {' '.join(job.overrides) or '(no overrides)'} left no {TABLE_DIR}/{CELL_RECORD} in {job.dir!r} "
            "(only routing jobs with report_dir=null leave one)"
        )
    return json.loads(record.read_text(encoding="utf-8"))["store"]


class AggregateSweep(Callback):
    """When a sweep ends, aggregate the stores its jobs used (and no other) into `out`.

    `settings` are further keys of the aggregate config (n_resamples, seed, ...).
    """

    def __init__(self, out: str, **settings: Any) -> None:
        self.out = out
        self.settings = settings

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from routing_suite import aggregate
        from routing_suite.aggregate.config import AggregateConfig

        sweep_dir = Path(str(config.hydra.sweep.dir))
        stores = [Path(cell_store(job)) for job in sweeps.read_manifest(sweep_dir)]
        try:
            cfg = OmegaConf.structured(AggregateConfig(root=str(sweep_dir), out=self.out, **self.settings))
        except TypeError as err:
            raise ConfigError(f"hydra.callbacks: AggregateSweep: {err}") from err
        result = aggregate.run(cfg, stores=stores)
        log.info("%s", result["headline"])
        log.info("%d cells from the %d stores of this sweep: tables, plots and report.md in %s", result["n_cells"], len(stores), result["out"])
