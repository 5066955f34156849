"""Read what the aggregator needs from one store: outcomes per prompt, and the plotted fit/localize arrays."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from routing_suite import schema

log = logging.getLogger(__name__)

# The controls' column order in every table and plot; others follow alphabetically.
CONTROL_ORDER = ("random", "orthogonal", "non_routing", "semantic")
KIND_ORDER = {kind: i for i, kind in enumerate(schema.CONDITION_KINDS)}


class StoreFormatError(ValueError):
    """A finished store whose outcomes do not follow routing_suite/schema.py."""


def condition_key(name: str, kind: str) -> tuple[int, int, str]:
    """Sort key: baseline, the intervention, then the controls in CONTROL_ORDER, then the rest by name."""
    rank = CONTROL_ORDER.index(name) if name in CONTROL_ORDER else len(CONTROL_ORDER)
    return KIND_ORDER.get(kind, len(KIND_ORDER)), rank, name


@dataclass
class CellOutcomes:
    """One cell's per-prompt outcomes, conditions in table order."""

    family: str
    behavior: str
    path: str
    conditions: tuple[str, ...]
    kinds: tuple[str, ...]
    # (condition, framing, prompt), framing index 0 = eval, 1 = deploy; values in [0, 1]
    performed: np.ndarray
    dropped_prompts: int = 0

    @property
    def intervention(self) -> str:
        return self.conditions[self.kinds.index("intervention")]

    @property
    def controls(self) -> tuple[str, ...]:
        return tuple(c for c, k in zip(self.conditions, self.kinds) if k == "control")

    @property
    def n_prompts(self) -> int:
        return int(self.performed.shape[-1])


def _group_names(path: Path) -> set[str]:
    root = zarr.open_group(str(path), mode="r")
    return {name for name, _ in root.groups()}


def read_outcomes(path: Path, family: str, behavior: str) -> CellOutcomes:
    """The `outcomes` group of a finished store; StoreFormatError says what is wrong with it."""
    if "outcomes" not in _group_names(path):
        raise StoreFormatError("no outcomes group (the intervene stage never wrote)")
    ds = xr.open_zarr(str(path), group="outcomes", consolidated=False)
    if "performed" not in ds:
        raise StoreFormatError("outcomes has no variable performed")
    performed = ds["performed"]
    if set(performed.dims) != {"condition", "framing", "prompt"}:
        raise StoreFormatError(f"outcomes/performed has dims {performed.dims}, expected (condition, framing, prompt)")
    if "kind" not in ds.coords:
        raise StoreFormatError("outcomes has no kind coordinate on condition")
    names = [str(c) for c in ds["condition"].values]
    kinds = [str(k) for k in ds["kind"].values]
    framings = {str(f) for f in ds["framing"].values}
    if len(set(names)) != len(names):
        raise StoreFormatError(f"condition names repeat: {names}")
    if not set(schema.FRAMINGS) <= framings:
        raise StoreFormatError(f"framing holds {sorted(framings)}, needs {list(schema.FRAMINGS)}")
    if unknown := sorted(set(kinds) - set(schema.CONDITION_KINDS)):
        raise StoreFormatError(f"kind values {unknown} are not among {list(schema.CONDITION_KINDS)}")
    for kind in ("baseline", "intervention"):
        if kinds.count(kind) != 1:
            raise StoreFormatError(f"{kinds.count(kind)} conditions of kind {kind!r}, expected exactly 1")
    order = sorted(range(len(names)), key=lambda i: condition_key(names[i], kinds[i]))
    values = (
        performed.transpose("condition", "framing", "prompt")
        .sel(framing=list(schema.FRAMINGS))
        .isel(condition=order)
        .values.astype("float64")
    )
    finite = np.isfinite(values).all(axis=(0, 1))
    if not finite.any():
        raise StoreFormatError("no prompt has a finite outcome under every condition and framing")
    if ((values[..., finite] < 0) | (values[..., finite] > 1)).any():
        raise StoreFormatError("outcomes/performed holds values outside [0, 1]")
    return CellOutcomes(
        family=family,
        behavior=behavior,
        path=str(path),
        conditions=tuple(names[i] for i in order),
        kinds=tuple(kinds[i] for i in order),
        performed=values[..., finite],
        dropped_prompts=int((~finite).sum()),
    )


def read_group(path: str | Path, group: str, variables: tuple[str, ...]) -> xr.Dataset | None:
    """The named variables of one group, loaded; None when the group or all the variables are absent."""
    try:
        if group not in _group_names(Path(path)):
            return None
        ds = xr.open_zarr(str(path), group=group, consolidated=False)
    except Exception as err:  # a plot input that cannot be read is skipped, not fatal
        log.warning("%s: cannot read group %s (%s)", path, group, err)
        return None
    present = [v for v in variables if v in ds]
    return ds[present].load() if present else None
