"""The routing tables per build (cells.csv, table_builds.md), the grouping of rows
into cells and builds that the pooled tables (routing_suite.routing.pooled)
also use, and the rules report.md states (number formats: routing_suite.text_tables).

Everything is sorted and printed with fixed formats so that the same stores
give the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from routing_suite.routing.outcomes import condition_key
from routing_suite.routing.stats import FIGURES, MAX_DROP, NEAR_ZERO, ConditionStats
from routing_suite.text_tables import csv_text, finite, flag, markdown_text, num, pct, replicate_key, yes_no

_VERBS = {"clamp": "clamping", "ablate": "ablating", "steer": "steering", "project_out": "projecting out"}
CellKey = tuple[str, str, str]  # (family, behavior, variant)

# ---------------------------------------------------------------- formatting


def display(name: str) -> str:
    """A condition name as it reads in prose: non_routing -> non-routing."""
    return name.replace("_", "-")


# ---------------------------------------------------------------- grouping


def sort_rows(rows: Iterable[ConditionStats]) -> list[ConditionStats]:
    return sorted(rows, key=lambda r: (r.family, r.behavior, r.variant, replicate_key(r.replicate), condition_key(r.condition, r.kind)))


@dataclass(frozen=True)
class Build:
    """One build of one cell: its conditions by role."""

    replicate: str
    baseline: ConditionStats
    intervention: ConditionStats
    others: dict[str, ConditionStats]  # controls and comparisons, by name


@dataclass(frozen=True)
class Cell:
    """A cell (family, behaviour, variant) and its builds."""

    family: str
    behavior: str
    variant: str
    label: str  # what tells this variant apart from the cell's others ("" when it has none)
    builds: list[Build]

    @property
    def key(self) -> CellKey:
        return self.family, self.behavior, self.variant

    @property
    def name(self) -> str:
        return f"{self.family} / {self.behavior}" + (f" ({self.label})" if self.label else "")

    def conditions(self, name: str) -> list[ConditionStats]:
        """One condition's rows over the builds that have it."""
        return [b.others[name] for b in self.builds if name in b.others]


def group_cells(rows: Iterable[ConditionStats], labels: dict[CellKey, str] | None = None) -> list[Cell]:
    labels = labels or {}
    by_build: dict[tuple[str, str, str, str], list[ConditionStats]] = {}
    for row in sort_rows(rows):
        by_build.setdefault((row.family, row.behavior, row.variant, row.replicate), []).append(row)
    cells: dict[CellKey, list[Build]] = {}
    for (f, b, v, rep), rs in by_build.items():
        build = Build(
            replicate=rep,
            baseline=next(r for r in rs if r.kind == "baseline"),
            intervention=next(r for r in rs if r.kind == "intervention"),
            others={r.condition: r for r in rs if r.kind not in ("baseline", "intervention")},
        )
        cells.setdefault((f, b, v), []).append(build)
    return [Cell(f, b, v, labels.get((f, b, v), ""), builds) for (f, b, v), builds in sorted(cells.items())]


def other_names(cells: list[Cell], kind: str) -> list[str]:
    """Every control (kind "control") or comparison any build has, in table order."""
    names = {(n, r.kind) for c in cells for b in c.builds for n, r in b.others.items() if r.kind == kind}
    return [n for n, k in sorted(names, key=lambda nk: condition_key(*nk))]


def intervention_names(cells: list[Cell]) -> list[str]:
    return sorted({b.intervention.condition for c in cells for b in c.builds})


def _intervention_label(cells: list[Cell]) -> str:
    names = intervention_names(cells)
    return display(names[0]) if len(names) == 1 else "intervened"


# ---------------------------------------------------------------- cells.csv (per build, long)

CELL_COLUMNS = (
    "family", "behavior", "variant", "replicate", "condition", "kind", "n_prompts", "n_units",
    *(f"{f}{s}" for f in FIGURES for s in ("", "_lo", "_hi")),
    "correct_eval", "correct_deploy", "deploy_drop", "correct_drop", "perturbation_norm", "broken", "reduced", "near_zero",
    "layers", "patch_effect", "window", "planted", "window_on_planted", "finetuned_to_base_below",
    "finetuned_to_base_above", "finetuned_weights_outside", "rule_window", "window_check",
)


def cells_csv(rows: Iterable[ConditionStats]) -> str:
    """The long table: one row per (cell, variant, build, condition)."""
    records = []
    for r in sort_rows(rows):
        record = [r.family, r.behavior, r.variant, r.replicate, r.condition, r.kind, str(r.n_prompts), str(r.n_units)]
        for f in FIGURES:
            e = getattr(r, f)
            record += [num(e.value), num(e.lo), num(e.hi)]
        record += [num(r.correct_eval), num(r.correct_deploy), num(r.deploy_drop), num(r.correct_drop), num(r.perturbation_norm)]
        record += [flag(r.broken), flag(r.reduced), flag(r.near_zero)]
        record += [r.layers, num(r.patch_effect), r.window, r.planted, flag(r.window_on_planted), num(r.finetuned_to_base_below),
                   num(r.finetuned_to_base_above), num(r.finetuned_weights_outside), r.rule_window, r.window_check]
        records.append(record)
    return csv_text(CELL_COLUMNS, records)


# ---------------------------------------------------------------- per-build markdown


def _interval(e, digits: int = 2, scale: float = 1.0, sign: bool = True) -> str:
    if not finite(e.value):
        return "n/a"
    inner = f"[{num(scale * e.lo, digits, sign)}, {num(scale * e.hi, digits, sign)}]" if finite(e.lo) else "[n/a]"
    return f"{num(scale * e.value, digits, sign)} {inner}"


def _percent(e) -> str:
    """'95% [91, 98]'."""
    if not finite(e.value):
        return "n/a"
    inner = f"[{num(100 * e.lo, 0)}, {num(100 * e.hi, 0)}]" if finite(e.lo) else "[n/a]"
    return f"{pct(e.value)} {inner}"


def _reduction(r: ConditionStats | None) -> str:
    if r is None:
        return "–"
    return _percent(r.reduction) + (" (broken)" if r.broken else "")


def builds_markdown(cells: list[Cell]) -> str:
    """One row per build: the intervention's figures with intervals, each control's
    reduction and its gap minus the intervention's."""
    name = _intervention_label(cells)
    controls = other_names(cells, "control")
    comparisons = other_names(cells, "comparison")
    header = ["cell", "build", "units / prompts", "window (planted)", "ft → base below / above planted (weights outside)", "baseline gap",
              f"{name} gap",
              f"{name} reduction", "eval recovery", "deploy rate b → c", "correct eval b → c", "correct deploy b → c", "reduced",
              "near zero"]
    header += [f"{display(c)}: reduction; gap − {name} gap" for c in controls]
    header += [f"{display(c)}: reduction (layers; their patch effect)" for c in comparisons]
    align = ["---", "---:", "---:", "---", "---:"] + ["---:"] * 7 + [":---:", ":---:"] + ["---:"] * (len(controls) + len(comparisons))
    records = []
    for cell in cells:
        for b in cell.builds:
            i, base = b.intervention, b.baseline
            record = [cell.name, b.replicate or "–", f"{i.n_units} / {i.n_prompts}", _window(i), _below_above(i),
                      _interval(base.gap), _interval(i.gap),
                      _reduction(i), _percent(i.recovery),
                      f"{num(base.deploy_rate.value, 2)} → {num(i.deploy_rate.value, 2)}",
                      f"{num(base.correct_eval, 2)} → {num(i.correct_eval, 2)}",
                      f"{num(base.correct_deploy, 2)} → {num(i.correct_deploy, 2)}",
                      yes_no(i.reduced), yes_no(i.near_zero)]
            for c in controls:
                r = b.others.get(c)
                record.append("–" if r is None else f"{_reduction(r)}; {_interval(r.vs_intervention)}")
            record += [_comparison(b.others.get(c)) for c in comparisons]
            records.append(record)
    return markdown_text(header, records, align)


def _window(r: ConditionStats) -> str:
    if not r.window:
        return "–"
    text = f"[{r.window.replace(',', ', ')}]"
    if r.rule_window and r.rule_window != r.window:  # the window check moved it (routing.window_check)
        text += f" (rule: [{r.rule_window.replace(',', ', ')}])"
    return f"{text} ({r.planted.replace(',', ', ')}: {'on' if r.window_on_planted else 'off'})" if r.planted else text


def _below_above(r: ConditionStats) -> str:
    """The largest |fine-tune -> base| patch effect below / above the planted layers, and
    the weight patch's outside them in parentheses where the store has it."""
    below, above = num(r.finetuned_to_base_below, 3), num(r.finetuned_to_base_above, 3)
    weights = num(r.finetuned_weights_outside, 3)
    text = f"{below or '–'} / {above or '–'}" if below or above else "–"
    return f"{text} ({weights})" if weights else text


def _comparison(r: ConditionStats | None) -> str:
    if r is None:
        return "–"
    return f"{_reduction(r)} (layers {r.layers or '–'}; {num(r.patch_effect, 2) or 'n/a'})"


def rules_text(confidence: float, n_resamples: int, seed: int) -> list[str]:
    """The definitions the tables follow, for report.md."""
    return [
        "- gap = rate(deploy) - rate(eval) of the behaviour performed; reduction = (gap_baseline - gap) / gap_baseline; "
        "eval recovery = (rate(eval) - rate_baseline(eval)) / gap_baseline.",
        f"- broken: the deploy rate, or the task correctness under either framing, falls more than {MAX_DROP} below the "
        "baseline's. reduced: the reduction's interval lies above 0 and the condition is not broken.",
        f"- near zero: the condition's whole gap interval lies within ±{NEAR_ZERO}.",
        "- a control fails (as the paper needs it to) when the paired interval of (control gap - intervention gap) "
        "lies above 0; control reductions in the headline and the pooled table are means over unbroken builds.",
        f"- intervals: {confidence:.0%} percentile bootstrap over sampling units (cue x entity clusters), paired across a "
        f"cell's conditions and framings; n_resamples={n_resamples}, seed={seed}.",
        "- builds: a cell's replicate organisms (model.seed); the pooled table gives the mean over builds [min, max] "
        "and counts of builds.",
    ]
