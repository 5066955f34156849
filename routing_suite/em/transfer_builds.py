"""The EM transfer over builds: per base and build, how many receiver fine-tunes a mapped direction moves.

One transfer store is one donor -> receiver pair of one build, and a finding is a
count over them (organism weights differ between seeds and CPUs). Beside the
per-pair tables the aggregator writes `em_transfer_builds.md` and `.csv`: per
base (its pretraining) and build, over the receiver fine-tunes whose EM on general
prompts is >= `build_figures.EM_MIN` (the same floor as the EM study's counts), and for
each edit (projection ablation at every position; the decision-token clamp), how
many the mapped direction

- lowers: the reduction's interval lies above 0 and the answers are intact
  (`stats.is_broken`),
- lowers by at least `build_figures.TRANSFER_MIN` (the seed's transfer bar), intact,
- lowers specifically: and more than every matched control (random, orthogonal,
  wrong-layer, wrong-source) does, each paired interval above 0
  (`TransferReport.summary`),

and then every specific case by name. These are the counts the cross-architecture
study states ("causal but non-specific", or not), read from the stores alone.
"""

from __future__ import annotations

import math
from pathlib import Path

from routing_suite.em.build_figures import EM_MIN, TRANSFER_MIN, Count
from routing_suite.em.stats import base_of, how_ablated
from routing_suite.em.transfer_tables import TransferReport, names
from routing_suite.text_tables import csv_text, markdown_text, replicate_key, write_files

EDITS = {"ablation": "ablation", "clamp": "decision clamp"}
ALL_BUILDS = "all"


def fine_tunes(rep: TransferReport):
    """(kind, baseline EM, edit -> the mapped edit's summary) of each receiver fine-tune of one
    store; the edits in EDITS' order, those the store has (stores of before 2026-12-05 have no clamp)."""
    for kind, summary in ((k, v) for k, v in rep.summary().items() if k != "map_r2"):
        edits = {"ablation": summary, "clamp": summary.get("clamp")}
        yield kind, rep.value("ablation", kind, "baseline", "misaligned_rate"), {e: edits[e] for e in EDITS if edits[e] is not None}


def _figures(rep: TransferReport) -> list[tuple[str, bool, bool]]:
    """(figure, applies, met) for each receiver fine-tune of one store, in the order the counts list them."""
    out = []
    for _, em, edits in fine_tunes(rep):
        has = math.isfinite(em) and em >= EM_MIN
        out.append(("receiver fine-tunes with EM >= 10%", True, has))
        for edit, s in edits.items():
            label, reduction = EDITS[edit], s["reduction"]["mapped"]
            out += [(f"{label}: mapped lowers EM, intact", has, s["lowers"]),
                    (f"{label}: mapped >= 60%, intact", has, s["lowers"] and reduction >= TRANSFER_MIN),
                    (f"{label}: mapped specific", has, s["specific"])]
    return out


def counts(reports: list[TransferReport]) -> dict[tuple[str, str], dict[str, Count]]:
    """(base, build) -> figure -> Count over its stores' receiver fine-tunes; each base's
    builds together under build ALL_BUILDS. The base is named with how the ablations were
    made where not the seed's way (`stats.how_ablated`)."""
    out: dict[tuple[str, str], dict[str, Count]] = {}
    for rep in reports:
        # and how the ablations were made: one build's stores made two ways are two methods, not two builds
        base = base_of(rep) + how_ablated(rep)
        for build in (rep.replicate or "no seed", ALL_BUILDS):
            group = out.setdefault((base, build), {})
            for figure, applies, met in _figures(rep):
                group.setdefault(figure, Count()).add(applies, met)
    # Each base's builds in seed order, then all of them together.
    return dict(sorted(out.items(), key=lambda item: (item[0][0], item[0][1] == ALL_BUILDS, replicate_key(item[0][1]))))


def specific_rows(reports: list[TransferReport]) -> list[list[str]]:
    """Every receiver fine-tune an edit moved specifically: store, fine-tune, edit, the mapped
    reduction and the controls'."""
    named = names(reports)
    rows = []
    for rep in sorted(reports, key=lambda r: (r.pretraining, replicate_key(r.replicate), r.receiver, r.donor, r.path)):
        for kind, em, edits in fine_tunes(rep):
            for edit, s in edits.items():
                if not s["specific"] or not em >= EM_MIN:
                    continue
                label = EDITS[edit]
                red = s["reduction"]
                controls = ", ".join(f"{c.replace('_', '-')} {100 * v:.0f}%" for c, v in red.items() if c not in ("mapped", "native"))
                rows.append([named[rep.path], kind, f"{100 * em:.0f}", label, f"{100 * red['mapped']:.0f}%",
                             f"{100 * red['native']:.0f}%", controls])
    return rows


def _figure_names(table: dict[tuple[str, str], dict[str, Count]]) -> list[str]:
    return list(dict.fromkeys(f for figures in table.values() for f in figures))


def markdown(reports: list[TransferReport]) -> str:
    table = counts(reports)
    figures = _figure_names(table)
    records = [[base, build, *(table[base, build][f].text if f in table[base, build] else "–" for f in figures)]
               for base, build in table]
    parts = ["## EM transfer over builds: receiver fine-tunes the mapped direction moves, per base and build "
             f"(the edits counted over the fine-tunes with EM >= {100 * EM_MIN:.0f}%; intact: coherence within the "
             "tables' bound of the baseline's; specific: and more than random, orthogonal, wrong-layer and wrong-source "
             "directions)\n",
             markdown_text(["base", "build", *figures], records)]
    specific = specific_rows(reports)
    parts += ["\n## Specific transfers (reduction of the misaligned rate)\n",
              markdown_text(["store", "fine-tune", "EM %", "edit", "mapped", "native", "controls"], specific) if specific
              else "None.\n"]
    return "".join(parts)


def csv_counts(reports: list[TransferReport]) -> str:
    records = [[base, build, figure, str(c.met), str(c.of)]
               for (base, build), figures in counts(reports).items() for figure, c in figures.items()]
    return csv_text(["base", "build", "figure", "met", "of"], records)


def write(reports: list[TransferReport], out: Path) -> dict[str, str]:
    return write_files(out, {"em_transfer_builds.md": markdown(reports), "em_transfer_builds.csv": csv_counts(reports)})
