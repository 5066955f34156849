"""Find run stores under a folder or glob, check them, and pick one store per cell.

Nothing here reads an array: only the root attributes, so that a folder of
large stores is sorted out quickly. Every store that cannot be used becomes a
`Finding` that the report lists, never a silent drop.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import zarr

from routing_suite import store_format
from routing_suite.errors import ConfigError
from routing_suite.provenance import store_build

log = logging.getLogger(__name__)

Cell = tuple[str, str]  # (family, behavior): a position in the grid
# What one store stands for: its cell, the variant (settings that tell the cell's
# runs apart, store attribute cell.variant) and the build (cell.replicate). Two
# finished stores with the same key are duplicates; replicates of one variant pool.
RunKey = tuple[str, str, str, str]

# Finding kinds, in the order the report lists them.
UNREADABLE = "unreadable"
# A group of a readable store whose data cannot be read (a damaged chunk): the run
# writes what it can, lists the group, and ends with a non-zero exit code.
CORRUPT = "corrupt"
UNFINISHED = "unfinished"
SCHEMA = "schema"
MALFORMED = "malformed"
DUPLICATE = "duplicate"
DUPLICATE_RESOLVED = "duplicate_resolved"
DROPPED_PROMPTS = "dropped_prompts"
MISSING = "missing"
FINDING_KINDS = (CORRUPT, UNREADABLE, UNFINISHED, SCHEMA, MALFORMED, DUPLICATE, DUPLICATE_RESOLVED, DROPPED_PROMPTS, MISSING)


@dataclass(frozen=True)
class Finding:
    """Something the aggregator could not use as is, and why."""

    kind: str
    message: str
    cell: Cell | None = None
    paths: tuple[str, ...] = ()


@dataclass
class StoreInfo:
    """One store's root attributes, and whether they make it usable."""

    path: Path
    attrs: dict[str, Any] = field(default_factory=dict)
    cell: Cell | None = None
    problem: Finding | None = None

    @property
    def key(self) -> RunKey | None:
        if self.cell is None:
            return None
        cell = self.attrs.get("cell") or {}
        if self.experiment in ("em", "em_transfer"):
            # EM stores written before their cell named the build (2026-12-05) get it from their digested config.
            cell = store_build(self.attrs)
        return (*self.cell, str(cell.get("variant") or ""), str(cell.get("replicate") or ""))

    @property
    def experiment(self) -> str:
        """"adl" for an ADL store; anything else is read as a routing store."""
        return str(self.attrs.get("experiment", "routing"))

    @property
    def finished_at(self) -> datetime | None:
        text = self.attrs.get("finished_at")
        try:
            when = datetime.fromisoformat(str(text))
        except ValueError:
            return None
        return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _is_store_name(path: str) -> bool:
    return path.endswith(store_format.STORE_SUFFIX) or path.endswith(store_format.PARTIAL_SUFFIX)


def find_stores(root: str) -> list[Path]:
    """Every store folder (`*.zarr`, `*.zarr.partial`) under `root`, a folder or a glob; sorted."""
    if glob.has_magic(root):
        matches = sorted(glob.glob(root, recursive=True))
    elif os.path.exists(root):
        matches = [root]
    else:
        raise ConfigError(f"root={root!r} does not exist")
    found: set[Path] = set()
    for match in matches:
        if _is_store_name(match.rstrip("/")) and os.path.isdir(match):
            found.add(Path(match).resolve())
            continue
        for folder, subdirs, _ in os.walk(match):
            stores = [d for d in subdirs if _is_store_name(d)]
            found.update(Path(folder, d).resolve() for d in stores)
            # Never walk into a store: its chunk folders are not stores.
            subdirs[:] = sorted(d for d in subdirs if not _is_store_name(d))
    return sorted(found)


def _cell_of(attrs: dict[str, Any]) -> Cell | None:
    cell = attrs.get("cell")
    if isinstance(cell, dict) and isinstance(cell.get("family"), str) and isinstance(cell.get("behavior"), str):
        return cell["family"], cell["behavior"]
    return None


def inspect_store(path: Path) -> StoreInfo:
    """Read a store's root attributes and say whether the aggregator may use it."""
    info = StoreInfo(path=path)
    where = (str(path),)
    try:
        info.attrs = dict(zarr.open_group(str(path), mode="r").attrs.asdict())
    except Exception as err:  # any zarr/OS error means the same thing here
        if str(path).endswith(store_format.PARTIAL_SUFFIX):
            info.problem = Finding(UNFINISHED, "in progress or crashed (name ends .zarr.partial)", None, where)
        else:
            info.problem = Finding(UNREADABLE, f"not a readable zarr store ({type(err).__name__})", None, where)
        return info
    info.cell = _cell_of(info.attrs)
    version = info.attrs.get("schema_version")
    if str(path).endswith(store_format.PARTIAL_SUFFIX):
        info.problem = Finding(UNFINISHED, "in progress or crashed (name ends .zarr.partial)", info.cell, where)
    elif version != store_format.SCHEMA_VERSION:
        info.problem = Finding(
            SCHEMA, f"schema_version {version!r}, this aggregator reads {store_format.SCHEMA_VERSION}", info.cell, where
        )
    elif info.attrs.get("complete") is not True:
        state = "false" if "complete" in info.attrs else "absent"
        done = info.attrs.get("stages_done")
        info.problem = Finding(UNFINISHED, f"attribute complete is {state} (stages done: {done})", info.cell, where)
    elif info.cell is None:
        info.problem = Finding(MALFORMED, "root attribute cell lacks family/behavior", None, where)
    return info


def pick_one_per_cell(stores: list[StoreInfo], policy: str) -> tuple[dict[RunKey, StoreInfo], list[Finding]]:
    """One usable store per run key (cell, variant, build); keys claimed by several stores
    follow `policy` ("exclude" | "newest")."""
    by_key: dict[RunKey, list[StoreInfo]] = {}
    for info in stores:
        assert info.key is not None and info.problem is None
        by_key.setdefault(info.key, []).append(info)
    chosen: dict[RunKey, StoreInfo] = {}
    findings: list[Finding] = []
    for key in sorted(by_key):
        cell = key[:2]
        claims = sorted(by_key[key], key=lambda s: str(s.path))
        paths = tuple(str(s.path) for s in claims)
        if len(claims) == 1:
            chosen[key] = claims[0]
            continue
        if policy == "newest":
            dated = [s for s in claims if s.finished_at is not None]
            latest = max((s.finished_at for s in dated), default=None)
            newest = [s for s in dated if s.finished_at == latest]
            if len(newest) == 1:
                chosen[key] = newest[0]
                findings.append(
                    Finding(DUPLICATE_RESOLVED, f"{len(claims)} stores; took the newest, {newest[0].path}", cell, paths)
                )
                continue
            reason = "no finished_at to order them by" if not newest else "they share the latest finished_at"
            findings.append(Finding(DUPLICATE, f"{len(claims)} stores and {reason}; cell excluded", cell, paths))
        else:
            findings.append(
                Finding(
                    DUPLICATE,
                    f"{len(claims)} stores for one cell; cell excluded (duplicates=newest takes the latest)",
                    cell,
                    paths,
                )
            )
    return chosen, findings


def missing_cells(seen: set[Cell], used: set[Cell], findings: list[Finding]) -> list[Finding]:
    """Cells of the grid (every family x behaviour any store names) that have no usable store."""
    families = sorted({f for f, _ in seen})
    behaviors = sorted({b for _, b in seen})
    missing = []
    for cell in ((f, b) for f in families for b in behaviors if (f, b) not in used):
        reasons = sorted({f.kind for f in findings if f.cell == cell})
        why = f"no usable store ({', '.join(reasons)})" if reasons else "no store at all"
        missing.append(Finding(MISSING, why, cell))
    return missing
