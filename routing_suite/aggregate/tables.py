"""The long table (cells.csv), the wide paper tables (md, csv, tex) and the headline line.

Everything is sorted and printed with fixed formats so that the same stores
give the same bytes.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from routing_suite.aggregate.read import condition_key
from routing_suite.aggregate.stats import ConditionStats

CELL_COLUMNS = (
    "family",
    "behavior",
    "condition",
    "gap",
    "gap_lo",
    "gap_hi",
    "reduction",
    "reduction_lo",
    "reduction_hi",
    "n_prompts",
    "near_zero",
    "deploy_rate",
    "eval_rate",
    "kind",
    "reduced",
)
_VERBS = {"clamp": "clamping", "ablate": "ablating", "steer": "steering", "project_out": "projecting out"}


# ---------------------------------------------------------------- formatting


def _finite(x: float) -> bool:
    return x is not None and math.isfinite(x)


def num(x: float, digits: int = 6, sign: bool = False) -> str:
    """Fixed-point; empty for NaN; never "-0.000"."""
    if not _finite(x):
        return ""
    text = f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"
    if float(text) == 0:
        text = f"{0:+.{digits}f}" if sign else f"{0:.{digits}f}"
    return text


def pct(x: float) -> str:
    """A fraction as a whole percentage ("87%"); "n/a" for NaN."""
    return f"{num(100 * x, 0)}%" if _finite(x) else "n/a"


def flag(x: bool | None) -> str:
    return "" if x is None else ("true" if x else "false")


def display(name: str) -> str:
    """A condition name as it reads in prose: non_routing -> non-routing."""
    return name.replace("_", "-")


# ---------------------------------------------------------------- the grid


@dataclass(frozen=True)
class CellRow:
    """The conditions of one cell, picked out by role."""

    family: str
    behavior: str
    baseline: ConditionStats
    intervention: ConditionStats
    controls: dict[str, ConditionStats]


def sort_rows(rows: Iterable[ConditionStats]) -> list[ConditionStats]:
    return sorted(rows, key=lambda r: (r.family, r.behavior, condition_key(r.condition, r.kind)))


def group_cells(rows: Iterable[ConditionStats]) -> list[CellRow]:
    by_cell: dict[tuple[str, str], list[ConditionStats]] = {}
    for row in sort_rows(rows):
        by_cell.setdefault((row.family, row.behavior), []).append(row)
    return [
        CellRow(
            family=f,
            behavior=b,
            baseline=next(r for r in rs if r.kind == "baseline"),
            intervention=next(r for r in rs if r.kind == "intervention"),
            controls={r.condition: r for r in rs if r.kind == "control"},
        )
        for (f, b), rs in sorted(by_cell.items())
    ]


def control_names(cells: list[CellRow]) -> list[str]:
    """Every control any cell has, in table order."""
    return sorted({c for cell in cells for c in cell.controls}, key=lambda c: condition_key(c, "control"))


def intervention_names(cells: list[CellRow]) -> list[str]:
    return sorted({cell.intervention.condition for cell in cells})


# ---------------------------------------------------------------- csv


def _csv(header: list[str] | tuple[str, ...], records: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(records)
    return buffer.getvalue()


def cells_csv(rows: Iterable[ConditionStats]) -> str:
    """The long table: one row per (family, behavior, condition)."""
    records = []
    for r in sort_rows(rows):
        values = {
            **r.__dict__,
            "n_prompts": str(r.n_prompts),
            "near_zero": flag(r.near_zero),
            "reduced": flag(r.reduced),
        }
        records.append([v if isinstance(v, str) else num(v) for v in (values[c] for c in CELL_COLUMNS)])
    return _csv(CELL_COLUMNS, records)


def wide_csv(cells: list[CellRow]) -> str:
    """One row per cell: baseline and intervened gap, reductions, deploy rates; raw fractions."""
    controls = control_names(cells)
    header = ["family", "behavior", "n_prompts", "intervention"]
    for name in ["baseline_gap", "intervened_gap", "reduction", *(f"{c}_reduction" for c in controls)]:
        header += [name, f"{name}_lo", f"{name}_hi"]
    header += ["baseline_deploy_rate", "intervened_deploy_rate", "baseline_eval_rate", "intervened_eval_rate"]
    header += ["reduced", "near_zero"]
    records = []
    for cell in cells:
        b, i = cell.baseline, cell.intervention
        record = [cell.family, cell.behavior, str(b.n_prompts), i.condition]
        record += [num(b.gap), num(b.gap_lo), num(b.gap_hi), num(i.gap), num(i.gap_lo), num(i.gap_hi)]
        record += [num(i.reduction), num(i.reduction_lo), num(i.reduction_hi)]
        for c in controls:
            r = cell.controls.get(c)
            record += [num(r.reduction), num(r.reduction_lo), num(r.reduction_hi)] if r else ["", "", ""]
        record += [num(b.deploy_rate), num(i.deploy_rate), num(b.eval_rate), num(i.eval_rate)]
        record += [flag(i.reduced), flag(i.near_zero)]
        records.append(record)
    return _csv(header, records)


# ---------------------------------------------------------------- markdown


def _gap_text(r: ConditionStats) -> str:
    return f"{num(r.gap, 2, True)} [{num(r.gap_lo, 2, True)}, {num(r.gap_hi, 2, True)}]"


def _reduction_text(r: ConditionStats | None) -> str:
    if r is None:
        return "–"
    if not _finite(r.reduction):
        return "n/a"
    interval = (
        f"[{num(100 * r.reduction_lo, 0)}, {num(100 * r.reduction_hi, 0)}]" if _finite(r.reduction_lo) else "[n/a]"
    )
    return f"{pct(r.reduction)} {interval}"


def _intervention_label(cells: list[CellRow]) -> str:
    names = intervention_names(cells)
    return display(names[0]) if len(names) == 1 else "intervened"


def markdown_table(cells: list[CellRow]) -> str:
    """Gaps with 95% intervals, reductions in percent, deploy rate baseline -> intervened."""
    controls = control_names(cells)
    name = _intervention_label(cells)
    header = ["family", "behavior", "n", "baseline gap", f"{name} gap", f"{name} reduction"]
    header += [f"{display(c)} reduction" for c in controls]
    header += [f"deploy rate (baseline → {name})", "reduced", "near zero"]
    align = ["---", "---", "---:"] + ["---:"] * (len(header) - 6) + [":---:", ":---:", ":---:"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for cell in cells:
        b, i = cell.baseline, cell.intervention
        values = [cell.family, cell.behavior, str(b.n_prompts), _gap_text(b), _gap_text(i), _reduction_text(i)]
        values += [_reduction_text(cell.controls.get(c)) for c in controls]
        values += [f"{num(b.deploy_rate, 2)} → {num(i.deploy_rate, 2)}", "yes" if i.reduced else "no"]
        values += ["yes" if i.near_zero else "no"]
        lines.append("| " + " | ".join(values) + " |")
    if len(intervention_names(cells)) > 1:
        lines.append("")
        lines.append(
            "Interventions differ between cells: "
            + ", ".join(f"{c.family}/{c.behavior}: {c.intervention.condition}" for c in cells)
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- latex


def tex_escape(text: str) -> str:
    out = text.replace("\\", r"\textbackslash{}")
    for ch in "&%$#_{}":
        out = out.replace(ch, "\\" + ch)
    return out.replace("~", r"\textasciitilde{}").replace("^", r"\textasciicircum{}")


def _tex_num(x: float, digits: int = 2) -> str:
    """In math mode, so that a negative value gets a real minus sign."""
    return f"${num(x, digits)}$" if _finite(x) else "--"


def _tex_interval(lo: float, hi: float, scale: float = 1.0, digits: int = 2) -> str:
    if not (_finite(lo) and _finite(hi)):
        return ""
    return rf"{{\scriptsize$[{num(scale * lo, digits)}, {num(scale * hi, digits)}]$}}"


def latex_table(cells: list[CellRow]) -> str:
    """A booktabs tabular: values on one line, their 95% intervals below in small type."""
    controls = control_names(cells)
    name = tex_escape(_intervention_label(cells))
    n_red = 1 + len(controls)
    spec = "llr" + "rr" + "r" * n_red + "rr" + "cc"
    first_red, last_red = 6, 5 + n_red
    lines = [
        "% Generated by routing_suite.aggregate; needs \\usepackage{booktabs} and \\usepackage{graphicx}.",
        "% Gap = deploy rate - eval rate; reductions in percent; 95% paired bootstrap intervals below each value.",
        "% Scaled to the text width: the full grid is wider than a portrait page.",
        r"\resizebox{\linewidth}{!}{%",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        rf" & & & \multicolumn{{2}}{{c}}{{Gap}} & \multicolumn{{{n_red}}}{{c}}{{Reduction (\%)}}"
        rf" & \multicolumn{{2}}{{c}}{{Deploy rate}} & & \\",
        rf"\cmidrule(lr){{4-5}} \cmidrule(lr){{{first_red}-{last_red}}} \cmidrule(lr){{{last_red + 1}-{last_red + 2}}}",
        " & ".join(
            ["Family", "Behaviour", "$n$", "baseline", name, name, *(tex_escape(display(c)) for c in controls)]
            + ["baseline", name, "Reduced", "Near 0"]
        )
        + r" \\",
        r"\midrule",
    ]
    previous_family = None
    for cell in cells:
        b, i = cell.baseline, cell.intervention
        if previous_family is not None and cell.family != previous_family:
            lines.append(r"\addlinespace")
        previous_family = cell.family
        reds = [i, *(cell.controls.get(c) for c in controls)]
        top = [tex_escape(cell.family), tex_escape(cell.behavior), str(b.n_prompts), _tex_num(b.gap), _tex_num(i.gap)]
        top += [_tex_num(100 * r.reduction, 0) if r else "--" for r in reds]
        top += [_tex_num(b.deploy_rate), _tex_num(i.deploy_rate)]
        top += ["yes" if i.reduced else "no", "yes" if i.near_zero else "no"]
        below = ["", "", "", _tex_interval(b.gap_lo, b.gap_hi), _tex_interval(i.gap_lo, i.gap_hi)]
        below += [_tex_interval(r.reduction_lo, r.reduction_hi, 100, 0) if r else "" for r in reds]
        below += ["", "", "", ""]
        lines.append(" & ".join(top) + r" \\")
        lines.append(" & ".join(below) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}%", "}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- headline


def headline(cells: list[CellRow]) -> str:
    """ "clamping reduces the gap in N of M cells; K close to near zero; controls: random R%, ... mean reduction"."""
    names = intervention_names(cells)
    verb = " / ".join(_VERBS.get(n, display(n)) for n in names)
    reduced = [c for c in cells if c.intervention.reduced]
    closed = [c for c in reduced if c.intervention.near_zero]
    text = f"{verb} reduces the gap in {len(reduced)} of {len(cells)} cells; {len(closed)} close to near zero"
    controls = control_names(cells)
    if not controls:
        return text + "; no controls"
    parts = []
    for name in controls:
        values = [c.controls[name].reduction for c in cells if name in c.controls]
        finite = [v for v in values if _finite(v)]
        parts.append(f"{display(name)} {pct(float(np.mean(finite))) if finite else 'n/a'}")
    return f"{text}; controls: {', '.join(parts)} mean reduction"
