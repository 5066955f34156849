"""What the EM tables share: bootstrap intervals over prompts, the rows of a table's CSV,
breakage, and the names several stores' rows go by (`tables` for one family's EM stores,
`transfer_tables` for the donor -> receiver ones).

Intervals are percentile intervals of a seeded bootstrap over prompts (all samples of a
prompt move together); a comparison of two conditions on the same prompts resamples them
together (paired).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import xarray as xr

from routing_suite.provenance import store_build
from routing_suite.text_tables import csv_text, num

# An ablation is *broken* (DESIGN.md: it lowers the rate by breaking the model, it does
# not reduce it) when its coherent rate falls more than this below its fine-tune's baseline.
MAX_COHERENCE_DROP = 0.1


def is_broken(coherent_baseline: float, coherent: float) -> bool:
    return bool(coherent_baseline - coherent > MAX_COHERENCE_DROP + 1e-9)


@dataclass(frozen=True)
class Estimate:
    value: float
    lo: float
    hi: float

    def text(self, percent: bool = True, sign: bool = False) -> str:
        if not np.isfinite(self.value):
            return "n/a"
        k, digits = (100, 0) if percent else (1, 2)
        return f"{num(k * self.value, digits, sign)} [{num(k * self.lo, digits, sign)}, {num(k * self.hi, digits, sign)}]"


NAN = Estimate(float("nan"), float("nan"), float("nan"))


class Bootstrap:
    """Seeded resampling of prompts; one index set per number of prompts, shared by every statistic.

    A statistic's input is (prompt,) per-prompt values, or (draw, prompt) for a control
    drawn at random several times (`per_prompt`): its draws are resampled too, so its
    interval holds how far another draw of the same control could move it as well as
    other prompts."""

    def __init__(self, n_resamples: int, seed: int, confidence: float) -> None:
        self.n_resamples, self.seed, self.confidence = n_resamples, seed, confidence
        self._indices: dict[int, np.ndarray] = {}
        self._draws: dict[int, np.ndarray] = {}

    def indices(self, n: int) -> np.ndarray:
        if n not in self._indices:
            self._indices[n] = np.random.default_rng(self.seed).integers(0, n, (self.n_resamples, n))
        return self._indices[n]

    def draw_indices(self, k: int) -> np.ndarray:
        """(n_resamples, k) resampled draws of a k-draw control, from a generator of their own."""
        if k not in self._draws:
            self._draws[k] = np.random.default_rng([self.seed, k]).integers(0, k, (self.n_resamples, k))
        return self._draws[k]

    def _resampled(self, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """(n_resamples,) means of x over the resampled prompts `idx` (and its resampled draws)."""
        if x.ndim == 1:
            return x[idx].mean(1)
        per_draw = x[:, idx].mean(2)  # (draw, resample)
        return per_draw[self.draw_indices(len(x)), np.arange(self.n_resamples)[:, None]].mean(1)

    def _interval(self, point: float, resampled: np.ndarray) -> Estimate:
        tail = 100 * (1 - self.confidence) / 2
        finite = resampled[np.isfinite(resampled)]
        if not np.isfinite(point) or finite.size == 0:
            return Estimate(float(point), float("nan"), float("nan"))
        lo, hi = np.percentile(finite, [tail, 100 - tail])
        return Estimate(float(point), float(lo), float(hi))

    def rate(self, x: np.ndarray) -> Estimate:
        x = x[..., answered(x)]
        if x.size == 0:
            return NAN
        return self._interval(float(x.mean()), self._resampled(x, self.indices(x.shape[-1])))

    def reduction(self, condition: np.ndarray, baseline: np.ndarray) -> Estimate:
        """(mean(baseline) - mean(condition)) / mean(baseline), paired on the prompts both have."""
        keep = answered(condition) & answered(baseline)
        a, b = condition[..., keep], baseline[..., keep]
        if a.size == 0 or b.mean() == 0:
            return NAN
        idx = self.indices(keep.sum())
        ra, rb = self._resampled(a, idx), self._resampled(b, idx)
        with np.errstate(divide="ignore", invalid="ignore"):
            return self._interval(float((b.mean() - a.mean()) / b.mean()), np.where(rb > 0, (rb - ra) / rb, np.nan))

    def difference(self, a: np.ndarray, b: np.ndarray) -> Estimate:
        """mean(a) - mean(b) on the prompts both have, resampled together."""
        keep = answered(a) & answered(b)
        a, b = a[..., keep], b[..., keep]
        if a.size == 0:
            return NAN
        idx = self.indices(keep.sum())
        return self._interval(float(a.mean() - b.mean()), self._resampled(a, idx) - self._resampled(b, idx))


def answered(x: np.ndarray) -> np.ndarray:
    """(prompt,) the prompts with a value (in every draw, for a (draw, prompt) control)."""
    finite = np.isfinite(x)
    return finite if x.ndim == 1 else finite.all(0)


def draws_moving(boot: Bootstrap, condition: np.ndarray, baseline: np.ndarray) -> tuple[int, int]:
    """(how many of a control's draws move the rate on their own, each draw's reduction
    interval wholly on one side of 0; how many draws it has): (0, 0) for a single one."""
    if condition.ndim == 1:
        return 0, 0
    moving = [e.lo > 0 or e.hi < 0 for e in (boot.reduction(d, baseline) for d in condition)]
    return sum(moving), len(moving)


@dataclass(frozen=True)
class Row:
    """One line of em_table.csv."""

    family: str
    table: str
    model: str
    condition: str
    statistic: str
    value: float
    lo: float = float("nan")
    hi: float = float("nan")


class RowLookup:
    """A report's lookups in its `rows` (`tables.EmReport`, `transfer_tables.TransferReport`)."""

    def row(self, table: str, model: str, condition: str, statistic: str) -> Row | None:
        return next((r for r in self.rows if (r.table, r.model, r.condition, r.statistic) == (table, model, condition, statistic)), None)

    def value(self, table: str, model: str, condition: str, statistic: str) -> float:
        """The row's value; NaN where the report has no such row."""
        found = self.row(table, model, condition, statistic)
        return found.value if found else float("nan")


def reduction_text(red: Estimate | None, moving: int, draws: int) -> str:
    """A table cell: the reduction with its interval, and for a control of several draws how
    many of them move the rate on their own ("–" for a baseline)."""
    if red is None:
        return "–"
    return red.text() + (f"; {moving} of {draws} draws move it" if draws else "")


def per_prompt(outcomes: xr.Dataset, variable: str) -> dict[str, np.ndarray]:
    """Condition -> (prompt,) its mean over samples; for a control drawn at random several
    times in a store that keeps its draws (em_code 13 on), (draw, prompt)."""
    values = outcomes[variable].mean("sample").values
    out = {str(c): values[i] for i, c in enumerate(outcomes.condition.values)}
    if f"{variable}_by_draw" in outcomes:
        drawn = outcomes[f"{variable}_by_draw"].mean("sample").values
        for i, (c, k) in enumerate(zip(outcomes.condition.values, outcomes.n_seeds.values)):
            if k > 1:
                out[str(c)] = drawn[i, :k]
    return out


def rows_csv(rows: Iterable[Row], first_column: str = "family") -> str:
    """`rows` as CSV, one column per `Row` field (the first named `first_column`)."""
    names = [f.name for f in fields(Row)]
    records = [[num(v) if isinstance(v, float) else v for v in (getattr(r, n) for n in names)] for r in rows]
    return csv_text([first_column, *names[1:]], records)


def base_of(report) -> str:
    """A store's base: its pretraining ("persona", "persona_per_topic"), "routing" where it names none."""
    return report.pretraining or "routing"


def how_ablated(report) -> str:
    """How a store's ablations were made, where not the seed's way (to 0 at every layer and
    token): its `ablate_layers` (empty: every layer), `ablate_to` (`em.ablate_to`) and
    `ablate_at` (`em.ablate_at`); "" for the seed's way."""
    layers = report.ablate_layers
    parts = ([f"at layers {', '.join(map(str, layers))}"] if layers else []) + (
        ["to the base's mean"] if report.ablate_to == "base_mean" else []) + (
        ["at the decision token only"] if report.ablate_at == "decision" else [])
    return f" ({'; '.join(parts)})" if parts else ""


@dataclass(kw_only=True)
class StoreMade:
    """What tells apart stores of one study and models (`labels`, `how_ablated`): which build of
    which variant (`provenance.store_build`), the base's pretraining ("persona_planted", ...;
    empty: the routing task's), and how the ablations were made (`em.ablate_layers`, empty:
    every layer; `em.ablate_to`; `em.ablate_at`). Read from a store by `read_store_made`."""

    variant: str = ""
    replicate: str = ""
    pretraining: str = ""
    ablate_layers: tuple[int, ...] = ()
    ablate_to: str = "zero"
    ablate_at: str = "every"


def read_store_made(store_attrs: dict, outcomes_attrs: dict, n_layers: int) -> dict:
    """`StoreMade`'s fields of a store (its root attrs) and its outcomes group (their attrs,
    `EmSettings.ablation_attrs`): stores from before each outcomes attr made the ablations
    the seed's way (every layer, which reads as no layers named; to 0; at every token)."""
    build = store_build(store_attrs)
    model = (store_attrs.get("digest_config") or {}).get("model") or {}
    every, seed_way = list(range(n_layers)), StoreMade()
    layers = () if list(outcomes_attrs.get("ablate_layers", every)) == every else tuple(outcomes_attrs["ablate_layers"])
    return {"variant": str(build["variant"]), "replicate": str(build["replicate"]), "pretraining": str(model.get("pretraining") or ""),
            "ablate_layers": layers, "ablate_to": str(outcomes_attrs.get("ablate_to", seed_way.ablate_to)),
            "ablate_at": str(outcomes_attrs.get("ablate_at", seed_way.ablate_at))}


def labels(reports: list, first: Callable[[Any], str] = lambda r: r.family) -> dict[str, str]:
    """Store path -> the name its rows go by: `first` (the family; a transfer store's pair),
    where it has one store here; else that, the base's pretraining and the build, and how its
    ablations were made where not the seed's way (and the variant, where those still
    collide), so that several builds aggregated together stay apart. `reports`: anything
    with `path`, `pretraining`, `replicate`, `variant`, `ablate_layers`, `ablate_to`, `ablate_at`."""
    def name(r, level: int) -> str:
        parts = [first(r)]
        if level >= 1:
            parts += [base_of(r), f"seed {r.replicate}" if r.replicate else "no seed"]
            how = how_ablated(r)
            parts += [how.strip()] if how else []
        if level >= 2:
            parts.append(r.variant)
        return " ".join(parts)

    out = {}
    for level in (0, 1, 2):
        names = [name(r, level) for r in reports]
        for r, n in zip(reports, names):
            if r.path not in out and (level == 2 or names.count(n) == 1):
                out[r.path] = n
    return out


def named_section(reports: list, named: dict[str, str], key: str) -> list[list[str]]:
    """Every report's rows of one table section, each under its store's name (`labels`)."""
    return [[named[r.path], *x[1:]] for r in reports for x in r.sections.get(key, [])]
