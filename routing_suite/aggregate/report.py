"""report.md: what was read, what was left out and why, and the rules the numbers follow."""

from __future__ import annotations

import os

from routing_suite import schema
from routing_suite.aggregate.discover import (
    CORRUPT,
    DROPPED_PROMPTS,
    DUPLICATE,
    DUPLICATE_RESOLVED,
    FINDING_KINDS,
    MALFORMED,
    MISSING,
    SCHEMA,
    UNFINISHED,
    UNREADABLE,
    Finding,
)
from routing_suite.aggregate.read import CellOutcomes, variant_labels
from routing_suite.aggregate.tables import rules_text

TITLES = {
    CORRUPT: "Damaged groups (data that cannot be read; this run's exit code is not 0)",
    UNREADABLE: "Unreadable stores",
    UNFINISHED: "Unfinished stores (in progress or crashed)",
    SCHEMA: "Stores of another schema version",
    MALFORMED: "Malformed stores",
    DUPLICATE: "Cells with several stores (excluded)",
    DUPLICATE_RESOLVED: "Cells with several stores (newest taken)",
    DROPPED_PROMPTS: "Prompts left out (non-finite outcomes)",
    MISSING: "Missing cells (no row in the tables)",
}


# Findings about one store that do not keep its cell out of the tables if another store serves it.
OTHER_STORE_KINDS = (CORRUPT, UNREADABLE, UNFINISHED, SCHEMA, MALFORMED)


def _cell(finding: Finding) -> str:
    return f"{finding.cell[0]}/{finding.cell[1]}" if finding.cell else "cell unknown"


def finding_line(finding: Finding) -> str:
    """One line per finding, for the log and the report."""
    where = f" [{', '.join(finding.paths)}]" if finding.paths else ""
    return f"{finding.kind}: {_cell(finding)}: {finding.message}{where}"


def _finding_key(finding: Finding) -> tuple:
    return (finding.cell or ("", ""), finding.paths, finding.message)


def _cell_text(text: str, limit: int = 80) -> str:
    """A completion or prompt as one markdown table cell, at most `limit` characters."""
    return (text.replace("|", "\\|").replace("\n", " ⏎ ").strip() or "(empty)")[:limit]


def _shared_prefix(texts: list[str]) -> int:
    """Length of the prefix every text shares (a chat template's system prompt and
    the user turn's marker), never the whole of the shortest text."""
    if len(texts) < 2:
        return 0
    return min(len(os.path.commonprefix(texts)), min(len(t) for t in texts) - 1)


def completions_section(cells: list[CellOutcomes]) -> list[str]:
    """What the conditions generated on the first test prompts of each cell's first build.
    Prompts are shown without the start all of them share (a chat template's system
    prompt), "…" where it was cut."""
    shown, lines = set(), []
    labels = variant_labels(cells)
    for c in cells:
        if not c.examples or (c.family, c.behavior, c.variant) in shown:
            continue
        shown.add((c.family, c.behavior, c.variant))
        conditions = list(c.examples[0]["completions"])
        label = labels.get((c.family, c.behavior, c.variant), "")
        which = [label] if label else []
        which += [f"build {c.replicate}"] if c.replicate else []
        lines += [f"### {c.family} / {c.behavior}" + (f" ({', '.join(which)})" if which else ""), ""]
        lines += ["| prompt | framing | answer | " + " | ".join(conditions) + " |", "|---|---|---|" + "---|" * len(conditions)]
        head = _shared_prefix([e["prompt"] for e in c.examples])
        for e in c.examples:
            row = [_cell_text(("…" if head else "") + e["prompt"][head:], 120), e["framing"], _cell_text(e["answer"])]
            lines.append("| " + " | ".join(row + [_cell_text(e["completions"][k]) for k in conditions]) + " |")
        lines.append("")
    return (["## Completions", "", "The first test prompts of each cell's first build and what every condition generated "
             "(a control with several draws: its first).", ""] + lines) if lines else []


def render(
    root: str,
    settings: dict[str, object],
    n_found: int,
    cells: list[CellOutcomes],
    findings: list[Finding],
    headline: str | None,
    notes: list[str],
) -> str:
    lines = [
        "# Aggregation report",
        "",
        f"- root: `{root}`",
        f"- stores found: {n_found}",
        f"- cells in the tables: {len(cells)}",
    ]
    left_out = {p for f in findings if f.kind not in (DUPLICATE_RESOLVED, DROPPED_PROMPTS, MISSING) for p in f.paths}
    if resolved := [f for f in findings if f.kind == DUPLICATE_RESOLVED]:
        left_out |= {p for f in resolved for p in f.paths} - {c.path for c in cells}
    n_missing = len([f for f in findings if f.kind == MISSING])
    lines.append(f"- stores left out: {len(left_out)}" + (" (see below)" if left_out else ""))
    lines.append(f"- cells of the grid without a row: {n_missing}" + (" (see below)" if n_missing else ""))
    lines += ["", "## Headline", "", headline or "nothing to report: no usable store", ""]
    lines += [
        "## Stores in the tables",
        "",
        "| family | behavior | variant | build | prompts | intervention | controls | store |",
        "|---|---|---|---:|---:|---|---|---|",
    ]
    labels = variant_labels(cells)
    for c in cells:
        lines.append(
            f"| {c.family} | {c.behavior} | {labels.get((c.family, c.behavior, c.variant)) or '–'} | {c.replicate or '–'} "
            f"| {c.n_prompts} | {c.intervention} "
            f"| {', '.join(c.controls) or '–'} | `{c.path}` |"
        )
    lines.append("")
    used = {(c.family, c.behavior) for c in cells}
    for kind in FINDING_KINDS:
        found = sorted((f for f in findings if f.kind == kind), key=_finding_key)
        if not found:
            continue
        lines += [f"## {TITLES[kind]}", ""]
        for f in found:
            also = "; the cell's row comes from another store" if f.cell in used and kind in OTHER_STORE_KINDS else ""
            lines.append(f"- {_cell(f)}: {f.message}{also}")
            lines += [f"  - `{p}`" for p in f.paths]
        lines.append("")
    if notes:
        lines += ["## Plots", ""] + [f"- {n}" for n in notes] + [""]
    lines += completions_section(cells)
    lines += ["## Rules", ""]
    lines += rules_text(float(settings["confidence"]), int(settings["n_resamples"]), int(settings["seed"]))
    lines += [f"- duplicates={settings['duplicates']} (two stores are duplicates when cell, variant and build agree); "
              f"schema_version read: {schema.SCHEMA_VERSION}.", ""]
    return "\n".join(lines)
