"""The EM study over builds: one row per build and fine-tune, and how many builds meet the seed papers' figures.

Beside each store's own tables the EM study writes `em_builds.md` and
`em_builds.csv`: a row per store (family x base x build) and fine-tune with its
figures, the counts per base of the builds that meet each
(`em.build_figures`, beside the seed papers' figure of that kind), and, where
one family's build is there on two bases (a persona base and its negative),
each misaligned fine-tune's EM on the two side by side, with the base whose
interval lies wholly above the other's, counted.
"""

from __future__ import annotations

import math
from pathlib import Path

from routing_suite.em.build_figures import PAPER, Count, best_steering, cosine_layers, counts, effect, model_rate
from routing_suite.em.stats import Row, base_of, how_ablated, labels
from routing_suite.em.tables import EmReport, sort_reports
from routing_suite.text_tables import csv_text, markdown_text, num, write_files


def _interval(rep: EmReport, model: str) -> Row | None:
    return rep.row("organisms", model, "general", "misaligned_rate")


def base_pairs(reports: list[EmReport]) -> list[tuple[EmReport, EmReport]]:
    """Stores of one family and build on two bases (a persona base and its negative; their
    variants differ by the pretraining alone), (first base, second base) in the bases' sorted
    order, every store of one against every store of the other: where the fine-tunes can tell
    the bases apart."""
    by_build: dict[tuple[str, str, str], dict[str, list[EmReport]]] = {}
    for rep in sort_reports(reports):  # one ablation method's stores with each other only (`group_of`)
        by_build.setdefault((rep.family, rep.replicate, how_ablated(rep)), {}).setdefault(base_of(rep), []).append(rep)
    pairs = []
    for bases in by_build.values():
        names = sorted(bases)
        pairs += [(x, y) for i, a in enumerate(names) for b in names[i + 1:] for x in bases[a] for y in bases[b]]
    return pairs


def contrast(first: EmReport, second: EmReport, model: str) -> str:
    """Which base's fine-tune `model` misbehaves more: the base whose EM interval lies wholly
    above the other's, or "neither" where they overlap (or either is missing)."""
    a, b = _interval(first, model), _interval(second, model)
    if a is None or b is None:
        return "neither"
    if a.lo > b.hi:
        return base_of(first)
    if b.lo > a.hi:
        return base_of(second)
    return "neither"


def contrast_rows(reports: list[EmReport]) -> list[list[str]]:
    rows = []
    for first, second in base_pairs(reports):
        for ft in (m for m in first.misaligned if m in second.misaligned):
            rows.append([first.family, first.replicate or "no seed", ft, f"{base_of(first)} {_rate_text(_interval(first, ft))}",
                         f"{base_of(second)} {_rate_text(_interval(second, ft))}", contrast(first, second, ft)])
    return rows


def contrast_counts(reports: list[EmReport]) -> dict[str, dict[str, Count]]:
    """"base vs base" -> "fine-tune: which base's EM is higher" -> Count over the builds with both bases."""
    out: dict[str, dict[str, Count]] = {}
    for first, second in base_pairs(reports):
        group = out.setdefault(f"{base_of(first)} vs {base_of(second)}{how_ablated(first)}", {})
        for ft in (m for m in first.misaligned if m in second.misaligned):
            higher = contrast(first, second, ft)
            for base in (base_of(first), base_of(second)):
                group.setdefault(f"{ft}: EM interval on {base} wholly above the other's", Count(paper=PAPER["issue"])).add(True, higher == base)
    return out


BUILD_HEADER = ["store", "fine-tune", "EM %", "coherent %", "own topic EM %", "best separation", "own ablation vs random",
                "own decision clamp vs random", "transfer ablation", "steering: largest intact EM % (lambda; random %)",
                "planted variable: ablation vs random; own direction's cosine (max)"]


def _rate_text(rate: Row | None) -> str:
    """A rate and its interval, in percent: "20 [15, 25]"."""
    return f"{_pct(rate.value)} [{_pct(rate.lo)}, {_pct(rate.hi)}]" if rate else "–"


def _pct(x: float, digits: int = 0) -> str:
    return f"{100 * x:.{digits}f}" if math.isfinite(x) else "–"


def build_rows(reports: list[EmReport]) -> list[list[str]]:
    reports = sort_reports(reports)
    named = labels(reports)
    rows = []
    for rep in reports:
        # One decimal: the count's 2% bar must be readable off the row (2.3% is not quiet).
        store = f"{named[rep.path]} (base {_pct(model_rate(rep, 'base'), 1)}%" + (f", control {_pct(model_rate(rep, rep.control), 1)}%" if rep.control else "")
        above, layers = cosine_layers(rep)
        store += f"; cosine > 0.8 in {above} of {layers} layers)" if layers else ")"
        for ft in rep.misaligned:
            transfer = "; ".join(f"from {o}: {effect(rep, ft, f'ablate/from/{o}').text}" for o in rep.misaligned if o != ft) or "–"
            steered, random, lam = best_steering(rep, ft)
            rows.append([store, ft, _rate_text(_interval(rep, ft)), _pct(model_rate(rep, ft, "coherent_rate")), _pct(model_rate(rep, ft, condition="narrow")),
                         num(rep.best_separation(ft), 2) or "–", _versus(rep, ft, "ablate/own"), _versus(rep, ft, "clamp/own"), transfer,
                         f"{_pct(steered)} ({lam}; {_pct(random)})" if lam else "–", _planted_text(rep, ft)])
    return rows


def _planted_text(rep: EmReport, model: str) -> str:
    """On a persona base: the planted variable projected out of `model` against its matched
    random, and the largest cosine of `model`'s own direction with it over the layers."""
    if rep.row("ablation", model, "ablate/planted", "reduction") is None:
        return "–"
    cosines = [r.value for r in rep.rows if (r.table, r.model, r.statistic) == ("planted", model, "cosine") and math.isfinite(r.value)]
    return f"{_versus(rep, model, 'ablate/planted')}; {num(max(cosines), 2) if cosines else '–'}"


def _versus(rep: EmReport, model: str, condition: str) -> str:
    return f"{effect(rep, model, condition).text} vs {effect(rep, model, condition + '/random').text}"


def markdown(reports: list[EmReport]) -> str:
    parts = ["## EM over builds: each store against the seed papers' figures\n",
             markdown_text(BUILD_HEADER, build_rows(reports)),
             "\n## Builds that meet each figure, per base (ablation, clamp and transfer: over the builds where the fine-tune's EM is >= 10%)\n"]
    records = [[base, figure, c.paper, c.text] for base, figures in counts(reports).items() for figure, c in figures.items()]
    parts.append(markdown_text(["base", "figure", "the seed papers' figure", "builds"], records))
    rows = contrast_rows(reports)
    if rows:
        parts += ["\n## One build on two bases: each misaligned fine-tune's EM (general test prompts, %, 95% CI) and the base whose "
                  "interval lies wholly above the other's\n",
                  markdown_text(["family", "build", "fine-tune", "first base", "second base", "higher"], rows),
                  "\n## Builds where one base's fine-tune misbehaves more\n",
                  markdown_text(["bases", "figure", "builds"],
                                [[bases, figure, c.text] for bases, figures in contrast_counts(reports).items()
                                 for figure, c in figures.items()])]
    return "".join(parts)


def csv_counts(reports: list[EmReport]) -> str:
    groups = {**counts(reports), **contrast_counts(reports)}
    records = [[base, figure, str(c.met), str(c.of), c.paper] for base, figures in groups.items() for figure, c in figures.items()]
    return csv_text(["base", "figure", "met", "of", "paper"], records)


def write(reports: list[EmReport], out: Path) -> dict[str, str]:
    return write_files(out, {"em_builds.md": markdown(reports), "em_builds.csv": csv_counts(reports)})
