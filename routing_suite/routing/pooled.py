"""The routing tables pooled over builds: table.{md,csv,tex} and the headline.

A finding is a count over builds (DESIGN.md): each cell's (and variant's)
figures are the mean over its builds with their [min, max], and the counts of
builds that were reduced, near zero, broken, whose window overlapped the
planted layers, and in which each control failed (its gap stayed above the
intervention's). Control reductions are means over the builds the control
did not break.
"""

from __future__ import annotations

import numpy as np

from routing_suite.routing.stats import ConditionStats
from routing_suite.routing.tables import (
    _VERBS,
    Cell,
    _intervention_label,
    display,
    intervention_names,
    other_names,
)
from routing_suite.text_tables import csv_text, finite_mean, markdown_text, num, pct, replicate_key
from routing_suite.text_tables import finite as _finite

# ---------------------------------------------------------------- pooled figures


def _spread(values: list[float], digits: int, scale: float = 1.0, sign: bool = False) -> str:
    """'mean [min, max]' over builds ('value' alone for one build)."""
    finite = [scale * v for v in values if _finite(v)]
    if not finite:
        return "n/a"
    mean = num(float(np.mean(finite)), digits, sign)
    if len(finite) == 1:
        return mean
    return f"{mean} [{num(min(finite), digits, sign)}, {num(max(finite), digits, sign)}]"


def _count(flags: list[bool | None]) -> str:
    return f"{sum(bool(f) for f in flags)}/{len(flags)}"


def control_fails(row: ConditionStats) -> bool:
    """DESIGN.md: a control fails (as the paper needs it to) when its gap stays above the
    intervention's: the paired interval of (control gap - intervention gap) lies above 0."""
    return row.vs_intervention.above_zero


def unbroken_mean_reduction(rows: list[ConditionStats]) -> tuple[float, int]:
    """The mean reduction over the builds where the condition did not break the model, and
    how many builds it broke."""
    return finite_mean([r.reduction.value for r in rows if not r.broken]), sum(bool(r.broken) for r in rows)


# ---------------------------------------------------------------- pooled tables


def _pooled_record(cell: Cell, controls: list[str], comparisons: list[str], csv_form: bool) -> list[str]:
    ivs = [b.intervention for b in cell.builds]
    bases = [b.baseline for b in cell.builds]
    n = len(cell.builds)
    record = [cell.family, cell.behavior, cell.label, str(n)]
    if csv_form:
        record += [num(finite_mean([r.gap.value for r in bases])), num(finite_mean([r.gap.value for r in ivs])),
                   num(finite_mean([r.reduction.value for r in ivs])), num(finite_mean([r.recovery.value for r in ivs]))]
    else:
        record += [_spread([r.gap.value for r in bases], 2, sign=True), _spread([r.gap.value for r in ivs], 2, sign=True),
                   _spread([r.reduction.value for r in ivs], 0, 100), _spread([r.recovery.value for r in ivs], 0, 100)]
    record += [_count([r.reduced for r in ivs]), _count([r.near_zero for r in ivs]), _count([r.broken for r in ivs])]
    on = [r.window_on_planted for r in ivs if r.window_on_planted is not None]
    record.append(_count(on) if on else ("" if csv_form else "–"))
    for key in ("finetuned_to_base_below", "finetuned_to_base_above", "finetuned_weights_outside"):
        values = [getattr(r, key) for r in ivs]
        values = [v for v in values if _finite(v)]
        record.append(num(max(values), 3 if not csv_form else 6) if values else ("" if csv_form else "–"))
    for c in controls:
        rows = cell.conditions(c)
        if not rows:
            record += ["", "", ""] if csv_form else ["–"]
            continue
        mean, broken = unbroken_mean_reduction(rows)
        fails = _count([control_fails(r) for r in rows])
        if csv_form:
            record += [num(mean), str(broken), fails]
        else:
            record.append(f"{pct(mean)}; fails {fails}" + (f"; broken {broken}" if broken else ""))
    for c in comparisons:
        rows = cell.conditions(c)
        record.append(num(finite_mean([r.reduction.value for r in rows])) if csv_form else (_spread([r.reduction.value for r in rows], 0, 100) + "%" if rows else "–"))
    return record


def markdown_table(cells: list[Cell]) -> str:
    """Pooled over builds: means with [min, max] over builds, and counts of builds."""
    name = _intervention_label(cells)
    controls, comparisons = other_names(cells, "control"), other_names(cells, "comparison")
    header = ["family", "behavior", "variant", "builds", "baseline gap", f"{name} gap", f"{name} reduction %",
              "eval recovery %", "reduced", "near zero", "broken", "window on planted",
              "ft → base below planted (max)", "ft → base above planted (max)", "ft weights → base outside planted (max)"]
    header += [f"{display(c)}: reduction (unbroken builds)" for c in controls]
    header += [f"{display(c)} reduction % (comparison)" for c in comparisons]
    align = ["---", "---", "---", "---:"] + ["---:"] * 4 + [":---:"] * 4 + ["---:"] * 3 + ["---:"] * (len(controls) + len(comparisons))
    records = [_pooled_record(c, controls, comparisons, csv_form=False) for c in cells]
    for r in records:
        r[2] = r[2] or "–"
    return markdown_text(header, records, align)


def wide_csv(cells: list[Cell]) -> str:
    """The pooled table as raw fractions: means over builds, counts of builds."""
    controls, comparisons = other_names(cells, "control"), other_names(cells, "comparison")
    header = ["family", "behavior", "variant", "builds", "baseline_gap", "intervened_gap", "reduction", "eval_recovery",
              "reduced_builds", "near_zero_builds", "broken_builds", "window_on_planted_builds",
              "finetuned_to_base_below_max", "finetuned_to_base_above_max", "finetuned_weights_outside_max"]
    for c in controls:
        header += [f"{c}_reduction_unbroken", f"{c}_broken_builds", f"{c}_fails_builds"]
    header += [f"{c}_reduction" for c in comparisons]
    return csv_text(header, [_pooled_record(c, controls, comparisons, csv_form=True) for c in cells])


def tex_escape(text: str) -> str:
    out = text.replace("\\", r"\textbackslash{}")
    for ch in "&%$#_{}":
        out = out.replace(ch, "\\" + ch)
    return out.replace("~", r"\textasciitilde{}").replace("^", r"\textasciicircum{}")


def latex_table(cells: list[Cell]) -> str:
    """A booktabs tabular of the pooled table (means over builds; counts of builds)."""
    name = tex_escape(_intervention_label(cells))
    controls = other_names(cells, "control")
    spec = "ll" + "r" * 4 + "ccc" + "r" * len(controls)
    lines = [
        "% Generated by routing_suite.aggregate; needs \\usepackage{booktabs} and \\usepackage{graphicx}.",
        "% Means over builds; reduced / near zero / broken: builds of all; controls: mean reduction over unbroken builds.",
        r"\resizebox{\linewidth}{!}{%",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(["Family", "Behaviour", "Builds", "Gap", f"{name} gap", r"Reduction (\%)", "Reduced", "Near 0", "Broken"]
                   + [tex_escape(display(c)) + r" (\%)" for c in controls]) + r" \\",
        r"\midrule",
    ]
    for cell in cells:
        ivs = [b.intervention for b in cell.builds]
        top = [tex_escape(cell.family), tex_escape(cell.behavior + (f" ({cell.label})" if cell.label else "")), str(len(ivs)),
               f"${num(finite_mean([b.baseline.gap.value for b in cell.builds]), 2)}$", f"${num(finite_mean([r.gap.value for r in ivs]), 2)}$",
               f"${num(100 * finite_mean([r.reduction.value for r in ivs]), 0)}$",
               _count([r.reduced for r in ivs]), _count([r.near_zero for r in ivs]), _count([r.broken for r in ivs])]
        for c in controls:
            rows = cell.conditions(c)
            top.append(f"${num(100 * unbroken_mean_reduction(rows)[0], 0)}$" if rows else "--")
        lines.append(" & ".join(top) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}%", "}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- headline


def per_build(cells: list[Cell], flag: str) -> str:
    """How many cells the intervention's `flag` (reduced, near_zero) holds in, build by build
    ("11, 12, 11"): the issue's "in >= K cells on every build" is the least of these, where
    "on every build" of the headline's first count asks it of each cell's every build at once."""
    replicates = sorted({b.replicate for c in cells for b in c.builds}, key=replicate_key)
    return ", ".join(str(sum(any(b.replicate == r and bool(getattr(b.intervention, flag)) for b in c.builds) for c in cells))
                     for r in replicates)


def headline(cells: list[Cell]) -> str:
    """Counts over cells and builds, e.g. "clamping reduces the gap in 12 of 12 cells on every
    build (builds per cell: 3; per build: 12, 12, 12); closes it near zero in 7 on every build
    (per build: 11, 8, 10); ...; controls ..."."""
    names = intervention_names(cells)
    verb = " / ".join(_VERBS.get(n, display(n)) for n in names)
    n_builds = sorted({len(c.builds) for c in cells})
    every = "on every build" if n_builds != [1] else "on its build"
    reduced = sum(all(b.intervention.reduced for b in c.builds) for c in cells)
    closed = sum(all(b.intervention.near_zero for b in c.builds) for c in cells)
    broken = sum(any(b.intervention.broken for b in c.builds) for c in cells)
    several = n_builds != [1]
    builds = f" (builds per cell: {', '.join(map(str, n_builds))}; per build: {per_build(cells, 'reduced')})" if several else ""
    closed_builds = f" {every} (per build: {per_build(cells, 'near_zero')})" if several else ""
    text = (f"{verb} reduces the gap in {reduced} of {len(cells)} cells {every}{builds}; closes it near zero in {closed}"
            f"{closed_builds}; breaks the model in {broken}")
    planted = [c for c in cells if all(b.intervention.window_on_planted is not None for b in c.builds)]
    if planted:
        on = sum(all(b.intervention.window_on_planted for b in c.builds) for c in planted)
        text += f"; the window overlaps the planted layers in {on} of {len(planted)}"
        # Where the fine-tune changed the model is said by the weight patch (a layer's fine-tuned
        # weights on the base's own inputs); the activation patch above the planted layers carries
        # what they wrote downstream, so it is reported beside it, not as the localization's test.
        def measured(figure: str) -> list[float]:
            return [v for v in (getattr(b.intervention, figure) for c in planted for b in c.builds) if _finite(v)]

        weights, below, above = (measured(f) for f in ("finetuned_weights_outside", "finetuned_to_base_below", "finetuned_to_base_above"))
        notes = [f"the fine-tune's weights at one layer outside them restore at most {max(weights):.3f} of the gap"] if weights else []
        if below:  # 0 by construction; anything else says the layers were not where they were planted
            notes.append(f"fine-tune -> base activation patch below them at most {max(below):.3f}"
                         + (f", above them (downstream of what they wrote) at most {max(above):.3f}" if above else ""))
        text += f" ({'; '.join(notes)})" if notes else ""
    checked = [b.intervention for c in cells for b in c.builds if b.intervention.window_check]
    if checked:
        moved = sum(r.window != r.rule_window for r in checked)
        none = sum(r.window_check.startswith("none") for r in checked)
        text += f"; the window check moved the rule's window in {moved} of {len(checked)} builds ({none} with no window intact)"
    controls = other_names(cells, "control")
    if not controls:
        return text + "; no controls"
    iv = _intervention_label(cells)
    parts = []
    for name in controls:
        rows = [r for c in cells for r in c.conditions(name)]
        mean, n_broken = unbroken_mean_reduction(rows)
        fails = sum(bool(c.conditions(name)) and all(control_fails(r) for r in c.conditions(name)) for c in cells)
        have = sum(bool(c.conditions(name)) for c in cells)
        parts.append(f"{display(name)} {pct(mean)} (gap above the {iv}'s in {fails}/{have} cells; "
                     f"{n_broken} of {len(rows)} broken)")
    return f"{text}; controls, mean reduction over unbroken builds: {', '.join(parts)}"


