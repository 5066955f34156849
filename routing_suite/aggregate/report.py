"""report.md's frame: what was read, what was left out and why; each study adds its section."""

from __future__ import annotations

from routing_suite import store_format
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


def render(
    root: str,
    n_found: int,
    counts: dict[str, int],
    findings: list[Finding],
    used: dict[str, tuple[str, str]],
    sections: list[str],
    duplicates: str,
) -> str:
    """`counts`: cells in the tables per study title; `used`: each store in the tables
    (path -> cell); `sections`: the studies' own sections, in registry order."""
    lines = ["# Aggregation report", "", f"- root: `{root}`", f"- stores found: {n_found}"]
    lines += [f"- cells in the tables ({title}): {n}" for title, n in counts.items() if n]
    if not any(counts.values()):
        lines.append("- cells in the tables: 0")
    left_out = {p for f in findings if f.kind not in (DUPLICATE_RESOLVED, DROPPED_PROMPTS, MISSING) for p in f.paths}
    left_out |= {p for f in findings if f.kind == DUPLICATE_RESOLVED for p in f.paths} - set(used)
    n_missing = len([f for f in findings if f.kind == MISSING])
    lines.append(f"- stores left out: {len(left_out)}" + (" (see below)" if left_out else ""))
    lines.append(f"- cells of the grid without a row: {n_missing}" + (" (see below)" if n_missing else ""))
    lines.append("")
    used_cells = set(used.values())
    for kind in FINDING_KINDS:
        found = sorted((f for f in findings if f.kind == kind), key=_finding_key)
        if not found:
            continue
        lines += [f"## {TITLES[kind]}", ""]
        for f in found:
            also = "; the cell's row comes from another store" if f.cell in used_cells and kind in OTHER_STORE_KINDS else ""
            lines.append(f"- {_cell(f)}: {f.message}{also}")
            lines += [f"  - `{p}`" for p in f.paths]
        lines.append("")
    text = "\n".join(lines) + "\n" + "".join(sections)
    return text + (f"\nduplicates={duplicates} (two stores are duplicates when cell, variant and build agree); "
                   f"schema_version read: {store_format.SCHEMA_VERSION}.\n")
