"""The routing study's section of report.md: the headline, the stores in the tables,
plots skipped, what each condition generated, and the rules the numbers follow."""

from __future__ import annotations

import os

from routing_suite.routing.outcomes import CellOutcomes, variant_labels
from routing_suite.routing.tables import rules_text


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


def section(cells: list[CellOutcomes], headline: str | None, notes: list[str], confidence: float, n_resamples: int,
            seed: int) -> str:
    lines = ["## Headline", "", headline or "nothing to report: no usable store", ""]
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
    if notes:
        lines += ["## Plots", ""] + [f"- {n}" for n in notes] + [""]
    lines += completions_section(cells)
    lines += ["## Rules", ""] + rules_text(confidence, n_resamples, seed) + [""]
    return "\n".join(lines)
