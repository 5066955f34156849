"""Text tables every study writes: number formats, CSV and markdown text, and the
files they go to.

Fixed formats and no dates, so that the same stores give the same bytes.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def finite_mean(values: Sequence[float]) -> float:
    """The mean of the finite values (numpy's sum, as the tables always took it); NaN when there are none."""
    import numpy as np  # the table helpers import nothing heavy at module level

    kept = [v for v in values if finite(v)]
    return float(np.mean(kept)) if kept else math.nan


def replicate_key(replicate: str) -> tuple:
    """Builds in seed order ("2" before "10"), named ones after: one order for rows and counts."""
    return (not replicate.isdigit(), int(replicate) if replicate.isdigit() else 0, replicate)


def num(x: float, digits: int = 6, sign: bool = False) -> str:
    """Fixed-point; empty for NaN; never "-0.000"."""
    if not finite(x):
        return ""
    text = f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"
    if float(text) == 0:
        text = f"{0:+.{digits}f}" if sign else f"{0:.{digits}f}"
    return text


def pct(x: float) -> str:
    """A fraction as a whole percentage ("87%"); "n/a" for NaN."""
    return f"{num(100 * x, 0)}%" if finite(x) else "n/a"


def flag(x: bool | None) -> str:
    return "" if x is None else ("true" if x else "false")


def yes_no(x: bool | None) -> str:
    """A markdown table's flag: "yes", "no", or "–" where it does not apply."""
    return "–" if x is None else ("yes" if x else "no")


def csv_text(header: Sequence[str], records: Sequence[Sequence[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(records)
    return buffer.getvalue()


def markdown_text(header: Sequence[str], records: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> str:
    """A markdown table; `align`: one "---", "--:" or ":-:" per column (default "---")."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align or ["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in records]
    return "\n".join(lines) + "\n"


def write_files(out: Path, files: dict[str, str]) -> dict[str, str]:
    """Write each named text into `out`; returns `files`."""
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (out / name).write_text(content, encoding="utf-8")
    return files


@dataclass
class TableSettings:
    """How a study's tables and figures are computed and written (the aggregator's
    config extends it; a single run's own table uses the defaults)."""

    # Bootstrap over sampling units: the same seed and count for every condition of a
    # cell, so that all of a cell's intervals come from the same resamples.
    n_resamples: int = 2000
    seed: int = 0
    confidence: float = 0.95
    plots: bool = True
    # Fixed so that the same inputs give the same image bytes.
    dpi: int = 150
