"""Hydra sweeps: job folders named by content, and the checks made before any job starts.

A sweep job's folder is `<hydra.sweep.dir>/<model>/<behavior>/<overrides>`:
the chosen options of the `model` and `behavior` groups, then the job's other
overrides, sorted, without those that cannot change a result (the keys a
store's digest leaves out), or `defaults` when none is left. A rerun of a cell
therefore lands in the same folder, as it finds the same store.

The sweeper (`hydra_plugins/routing_suite_sweeper`) composes every job before
launching any, refuses a sweep in which two jobs would share a folder or whose
launcher is not installed, and writes the sweep's records, the job list
(`sweep-<time>-<pid>.json`, which `routing_suite.callbacks.AggregateSweep`
reads when the sweep ends) and its config (`multirun-<time>-<pid>.yaml`):
named per sweep, so a second sweep into the same folder keeps the first's.

This module stays light (no torch): the sweeper imports it during Hydra's
plugin discovery.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from routing_suite.errors import ConfigError
from routing_suite.provenance import NOT_RESULT_SHAPING, NOT_RESULT_SHAPING_MODEL

# Groups whose chosen option names a folder level of its own, in this order.
FOLDER_GROUPS = ("model", "behavior")
DEFAULT_LEAF = "defaults"
# Longer override lists are cut and end in a hash of the whole list.
MAX_LEAF = 120
# Each sweep's records: its job list and its config, named by when and by which process it started.
MANIFEST = "sweep-{stamp}.json"
SWEEP_CONFIG = "multirun-{stamp}.yaml"
# Sweeps made before records were kept apart wrote this one.
OLD_MANIFEST = "sweep.json"
RESOLVER = "rs.job_dir"
# The process id: single runs' folders end with it, so two runs started in the same
# second never share a folder and a log.
PID_RESOLVER = "rs.pid"

# Launchers the suite ships configs for (conf/hydra/launcher/): the plugin
# module each one's _target_ lives in -> the package that provides it.
LAUNCHER_PACKAGES = {
    "hydra_plugins.hydra_joblib_launcher": "hydra-joblib-launcher",
    "hydra_plugins.hydra_submitit_launcher": "hydra-submitit-launcher",
}
# The plugins' own launcher configs, by name: registered as bare stand-ins when
# a plugin is missing, so that `hydra/launcher=parallel` still composes and the
# sweeper can say which package to install instead of "Could not find".
_PLUGIN_CONFIGS = {
    "joblib": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    "submitit_slurm": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
}
INSTALL_HINT = "pip install 'routing-suite[launchers]'"


class SweepError(ConfigError, CompactHydraException):
    """A sweep that cannot run as asked; raised before any of its jobs starts.

    A CompactHydraException, so that Hydra prints the message alone.
    """


# ---------------------------------------------------------------- folder names


def _key(override: str) -> str:
    """The key an override sets: `+a.b=1` -> `a.b`, `~c` -> `c`, `x@pkg=y` -> `x`."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[0]


def shapes_results(key: str) -> bool:
    """False for keys a store's digest leaves out (where things run and are kept)."""
    top = key.split(".", 1)[0]
    if top in NOT_RESULT_SHAPING:
        return False
    return not (top == "model" and key.split(".", 1)[-1] in NOT_RESULT_SHAPING_MODEL)


def leaf_name(overrides: Sequence[str], leave_out: Sequence[str] = ()) -> str:
    """One folder name for a job's overrides: sorted, result-shaping only, safe in a path."""
    kept = sorted(
        o for o in overrides if shapes_results(_key(o)) and _key(o) not in (*FOLDER_GROUPS, *leave_out)
    )
    if not kept:
        return DEFAULT_LEAF
    name = ",".join(kept).replace("/", "_").replace("\\", "_")
    if name.startswith("."):
        name = "_" + name[1:]
    if len(name) > MAX_LEAF:
        name = f"{name[: MAX_LEAF - 13]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return name


def job_subdir(*leave_out: str, _root_: DictConfig) -> str:
    """The `rs.job_dir` resolver: `<model>/<behavior>/<overrides>` for the job config `_root_`.

    `leave_out` names further keys to keep out of the name (the appendix
    leaves out `experiment`: its whole sweep folder is that experiment's).
    """
    hydra = _root_.hydra
    choices = hydra.runtime.choices
    parts = [str(choices[g]) for g in FOLDER_GROUPS if g in choices and choices[g] is not None]
    parts.append(leaf_name(list(hydra.overrides.task), leave_out))
    return "/".join(parts)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, job_subdir)
    if not OmegaConf.has_resolver(PID_RESOLVER):
        OmegaConf.register_new_resolver(PID_RESOLVER, lambda: str(os.getpid()), use_cache=True)


# ---------------------------------------------------------------- checks before launch


@dataclass(frozen=True)
class Job:
    """One job of a sweep: its number, overrides and the folder it will write."""

    num: int
    overrides: list[str]
    dir: str


def check_distinct(jobs: Sequence[Job]) -> None:
    """Refuse a sweep in which two jobs would write to the same folder."""
    by_dir: dict[str, list[Job]] = {}
    for job in jobs:
        by_dir.setdefault(str(Path(job.dir)), []).append(job)
    clashes = {d: js for d, js in by_dir.items() if len(js) > 1}
    if not clashes:
        return
    folder, clash = sorted(clashes.items())[0]
    listed = "; ".join(" ".join(j.overrides) or "(no overrides)" for j in clash)
    raise SweepError(
        f"{len(clash)} jobs of this sweep would write to the same folder {folder!r}: {listed}. "
        f"They differ only in keys that cannot change a result ({', '.join(NOT_RESULT_SHAPING)}, model.cache_dir) "
        "or not at all; drop the repeated values, or name the folder by them with hydra.sweep.subdir"
        + (f" ({len(clashes) - 1} more shared folders)" if len(clashes) > 1 else "")
    )


def check_launcher(launcher: DictConfig, choice: str | None, installed: Callable[[str], bool] | None = None) -> None:
    """Refuse a launcher whose plugin is not installed, naming the package to install."""
    target = str(launcher.get("_target_", ""))
    module = target.rsplit(".", 1)[0]
    if not target.startswith("hydra_plugins.") or (installed or _importable)(module):
        return
    top = ".".join(module.split(".")[:2])
    package = LAUNCHER_PACKAGES.get(top)
    hint = f"install {package} ({INSTALL_HINT})" if package else f"install the package that provides {top}"
    raise SweepError(f"hydra/launcher={choice or target}: the launcher plugin {top} is not installed; {hint}")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def register_launcher_stand_ins(installed: Callable[[str], bool] | None = None) -> list[str]:
    """Bare stand-ins for the launcher configs of plugins that are not installed; returns their names."""
    missing = []
    for name, target in _PLUGIN_CONFIGS.items():
        if not (installed or _importable)(target.rsplit(".", 1)[0]):
            ConfigStore.instance().store(group="hydra/launcher", name=name, node={"_target_": target}, provider="routing_suite")
            missing.append(name)
    return missing


# ---------------------------------------------------------------- the job list


# The job list this process wrote, per sweep folder: a sweep's callbacks read their own,
# whatever another sweep into the same folder wrote meanwhile.
_written: dict[Path, Path] = {}


def sweep_stamp(sweep_dir: Path) -> str:
    """When and by which process a sweep started; a second sweep of this process in the same second gets a count."""
    stamp = f"{dt.datetime.now():%Y-%m-%d_%H-%M-%S}-{os.getpid()}"
    taken = {p.name for p in Path(sweep_dir).glob("*")} if Path(sweep_dir).is_dir() else set()
    count = 1
    while MANIFEST.format(stamp=stamp if count == 1 else f"{stamp}-{count}") in taken:
        count += 1
    return stamp if count == 1 else f"{stamp}-{count}"


def write_manifest(sweep_dir: Path, jobs: Sequence[Job], stamp: str) -> Path:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / MANIFEST.format(stamp=stamp)
    path.write_text(json.dumps({"jobs": [asdict(j) for j in jobs]}, indent=2) + "\n", encoding="utf-8")
    _written[sweep_dir.resolve()] = path
    return path


def read_manifest(sweep_dir: Path) -> list[Job]:
    """The job list of the sweep this process ran into `sweep_dir`, else the newest there."""
    path = _written.get(Path(sweep_dir).resolve())
    if path is None:
        found = sorted(Path(sweep_dir).glob(MANIFEST.format(stamp="*")), key=lambda p: p.stat().st_mtime)
        found = found or sorted(Path(sweep_dir).glob(OLD_MANIFEST))
        if not found:
            raise ConfigError(f"no job list ({MANIFEST.format(stamp='*')}) in {str(sweep_dir)!r}: no sweep ran there")
        path = found[-1]
    return [Job(**j) for j in json.loads(path.read_text(encoding="utf-8"))["jobs"]]


def as_job(num: int, overrides: Sequence[str], job_config: DictConfig) -> Job:
    """The folder a composed job config will write, resolved as Hydra's run_job does
    (with the job's number set; `job_config` is modified)."""
    from hydra.core.hydra_config import HydraConfig

    with read_write(job_config.hydra), open_dict(job_config.hydra):
        job_config.hydra.job.num = num
        job_config.hydra.job.id = f"{job_config.hydra.job.name}_{num}"
    hydra_config = HydraConfig.instance()
    previous: Any = hydra_config.cfg
    hydra_config.set_config(job_config)  # for ${hydra:...} in the folder names
    try:
        folder = Path(str(job_config.hydra.sweep.dir)) / str(job_config.hydra.sweep.subdir)
    finally:
        hydra_config.cfg = previous
    return Job(num, list(overrides), str(folder))


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which cgroups and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------- organisms first


def prebuild_organisms(job_configs: Sequence[DictConfig]) -> int:
    """Build the built-in organisms the jobs need (model x behaviour) that are not cached,
    one per usable core side by side (each build pins its own thread count, so the
    weights are those a job would build). Jobs with another model source are left alone."""
    from hydra.utils import instantiate

    from routing_suite.organisms.build import build_all
    from routing_suite.organisms.source import OrganismSource

    wanted = []
    for cfg in job_configs:
        behavior = cfg.get("behavior")
        model = cfg.get("model")
        if behavior is None or model is None or "OrganismSource" not in str(model.get("_target_", "")):
            continue
        source = instantiate(model)
        if isinstance(source, OrganismSource):
            wanted.append((source.cache_root, source.spec, str(behavior.name)))
    return build_all(wanted, workers=usable_cores())
