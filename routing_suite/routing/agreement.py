"""How far two localize methods agree, build by build: the stores of one grid run
with `localize.method=exact` against those of the same grid run with another
method (e.g. the appendix twice, in two sweep folders).

    python -m experiments.localize_agreement <exact sweep dir> <other sweep dir>

Stores are paired by cell, build and every result-shaping setting except the
localize method (so a folder holding variants pairs each with its own). Per
build: the Spearman correlation of the two methods' per-layer effects for each
source, whether they put the largest effect on the same layer, whether they
chose the same window, and how many windows the other method patched exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
import zarr
from scipy.stats import spearmanr

from routing_suite.routing.localize import SOURCES

METHOD_KEYS = ("method", "confirm")


def _key(store: Path) -> tuple | None:
    attrs = zarr.open_group(str(store), mode="r").attrs
    if attrs.get("experiment", "routing") != "routing" or "localize" not in attrs.get("stages_done", []):
        return None
    settings = dict(attrs["digest_config"])
    settings["localize"] = {k: v for k, v in settings.get("localize", {}).items() if k not in METHOD_KEYS}
    cell = attrs["cell"]
    return cell["family"], cell["behavior"], str(cell["replicate"]), json.dumps(settings, sort_keys=True)


def routing_stores(root: Path) -> dict[tuple, Path]:
    """The finished localize stages under `root`, by (family, behavior, build, settings)."""
    found = {}
    for store in sorted(Path(root).rglob("*.zarr")):
        key = _key(store)
        if key is not None:
            found[key] = store
    return found


@dataclass
class BuildAgreement:
    family: str
    behavior: str
    replicate: str
    spearman: dict[str, float]  # per source
    same_top_layer: dict[str, bool]
    exact_window: list[int]
    other_window: list[int]
    confirmed: int

    @property
    def same_window(self) -> bool:
        return self.exact_window == self.other_window


def compare(exact_root: Path, other_root: Path) -> list[BuildAgreement]:
    exact, other = routing_stores(exact_root), routing_stores(other_root)
    rows = []
    for key in sorted(set(exact) & set(other)):
        a = xr.open_zarr(exact[key], group="localize").load()
        b = xr.open_zarr(other[key], group="localize").load()
        if a.attrs.get("method", "exact") != "exact":
            raise ValueError(f"{exact[key]} was localized with {a.attrs['method']!r}, not 'exact'")
        rho, top = {}, {}
        for source in SOURCES:
            x, y = (ds.layer_effect.sel(source=source).values for ds in (a, b))
            rho[source] = float(spearmanr(x, y).statistic) if np.ptp(x) > 0 and np.ptp(y) > 0 else math.nan
            top[source] = int(np.argmax(np.abs(x))) == int(np.argmax(np.abs(y)))
        rows.append(BuildAgreement(*key[:3], rho, top, [int(v) for v in a.attrs["window"]], [int(v) for v in b.attrs["window"]],
                                   len(b.attrs.get("confirmed", []))))
    return rows


def build_lines(rows: list[BuildAgreement]) -> list[str]:
    return [
        f"{r.family}/{r.behavior} build {r.replicate}: Spearman "
        + " ".join(f"{s} {r.spearman[s]:+.3f}" for s in SOURCES)
        + f"; window {r.exact_window} vs {r.other_window}; {r.confirmed} confirmed"
        for r in rows
    ]


def summary(rows: list[BuildAgreement], threshold: float = 0.9) -> list[str]:
    """Counts over builds and cells (a cell agrees when all its builds do)."""
    cells: dict[tuple[str, str], list[BuildAgreement]] = {}
    for row in rows:
        cells.setdefault((row.family, row.behavior), []).append(row)
    lines = [f"{len(rows)} builds of {len(cells)} cells paired",
             f"same window: {sum(r.same_window for r in rows)} of {len(rows)} builds; "
             f"every build of a cell: {sum(all(r.same_window for r in c) for c in cells.values())} of {len(cells)} cells"]
    for source in SOURCES:
        rho = np.array([r.spearman[source] for r in rows], float)
        lines.append(
            f"{source}: Spearman >= {threshold} in {int((rho >= threshold).sum())} of {len(rows)} builds "
            f"(median {np.nanmedian(rho):.3f}, min {np.nanmin(rho):.3f}); largest effect on the same layer in "
            f"{sum(r.same_top_layer[source] for r in rows)}; every build of a cell >= {threshold}: "
            f"{sum(all(r.spearman[source] >= threshold for r in c) for c in cells.values())} of {len(cells)} cells")
    confirmed = [r.confirmed for r in rows]
    lines.append(f"windows patched exactly per build: median {np.median(confirmed):g}, max {max(confirmed)}")
    return lines
