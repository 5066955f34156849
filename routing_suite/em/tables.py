"""The EM tables: per family, rates with bootstrap intervals, separation, ablation, transfer, cosines.

Every rate is over one model's general test prompts (`EmDataset.general`:
outside its narrow domain), first averaged over a prompt's samples; intervals
and breakage as in `em.stats`. The same stores and settings give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from routing_suite.em.stats import (
    Bootstrap,
    Row,
    RowLookup,
    StoreMade,
    draws_moving,
    how_ablated,
    is_broken,
    labels,
    named_section,
    per_prompt,
    read_store_made,
    reduction_text,
    rows_csv,
)
from routing_suite.text_tables import markdown_text, num, replicate_key, write_files, yes_no


@dataclass
class EmReport(RowLookup, StoreMade):
    """One family's EM store, read and summarised (which build, and how it ablated: `StoreMade`)."""

    family: str
    path: str
    steer_layer: int
    ablate_layer: int
    rows: list[Row] = field(default_factory=list)
    sections: dict[str, list[list[str]]] = field(default_factory=dict)
    # The study's misaligned fine-tunes, in the config's order, and its honest control.
    misaligned: tuple[str, ...] = ()
    control: str = ""
    # Misaligned fine-tunes with no direction, and why (their fit responses of each class).
    no_direction: dict[str, str] = field(default_factory=dict)

    def best_separation(self, model: str) -> float:
        """`model`'s direction's held-out separation at its best layer (NaN: no direction)."""
        values = [r.value for r in self.rows if r.table == "separation" and r.model == model and np.isfinite(r.value)]
        return max(values, default=float("nan"))

    def summary(self) -> dict:
        """The headline numbers per misaligned fine-tune with a direction (rates and reductions
        in [0, 1]; one without has only the planted check's rows, and its `no_direction` line)."""
        out = {}
        for r in self.rows:
            if r.table == "ablation" and r.condition == "baseline" and r.statistic == "misaligned_rate" and r.model not in self.no_direction:
                m = r.model
                out[m] = {
                    "baseline": r.value,
                    "ablate_own": self.value("ablation", m, "ablate/own", "misaligned_rate"),
                    "random": self.value("ablation", m, "ablate/own/random", "misaligned_rate"),
                    "reduction_own": self.value("ablation", m, "ablate/own", "reduction"),
                    "reduction_random": self.value("ablation", m, "ablate/own/random", "reduction"),
                    "coherent_baseline": self.value("ablation", m, "baseline", "coherent_rate"),
                    "coherent_own": self.value("ablation", m, "ablate/own", "coherent_rate"),
                    "coherent_random": self.value("ablation", m, "ablate/own/random", "coherent_rate"),
                    "broken_own": self.value("ablation", m, "ablate/own", "broken") == 1,
                    "broken_random": self.value("ablation", m, "ablate/own/random", "broken") == 1,
                    "reduction_clamp": self.value("ablation", m, "clamp/own", "reduction"),
                    "reduction_clamp_random": self.value("ablation", m, "clamp/own/random", "reduction"),
                    "coherent_clamp": self.value("ablation", m, "clamp/own", "coherent_rate"),
                    "coherent_clamp_random": self.value("ablation", m, "clamp/own/random", "coherent_rate"),
                    "broken_clamp": self.value("ablation", m, "clamp/own", "broken") == 1,
                    "broken_clamp_random": self.value("ablation", m, "clamp/own/random", "broken") == 1,
                    "best_separation": self.best_separation(m),
                    "transfer": {x.condition.removeprefix("ablate/from/"): x.value for x in self.rows
                                 if x.table == "ablation" and x.model == m and x.condition.startswith("ablate/from/") and x.statistic == "reduction"},
                }
        return out


def _organisms(rep: EmReport, samples: xr.Dataset, boot: Bootstrap) -> None:
    test = samples.split.values == "test"
    records = []
    for model in (str(m) for m in samples.model.values):
        labels = samples.label.sel(model=model).values
        general = samples.general.sel(model=model).values
        mis = (labels == "misaligned").mean(1)
        # Stores before em_code 3 have no `narrow`: their general set was every topic outside the narrow domain.
        own = samples.narrow.sel(model=model).values if "narrow" in samples else ~general
        narrow = boot.rate(np.where(test & own, mis, np.nan))
        est = {
            "misaligned": boot.rate(np.where(test & general, mis, np.nan)),
            "aligned": boot.rate(np.where(test & general, (labels == "aligned").mean(1), np.nan)),
            "coherent": boot.rate(np.where(test & general, samples.coherent.sel(model=model).values.mean(1), np.nan)),
        }
        records.append([rep.family, model, narrow.text() if np.isfinite(narrow.value) else "–", *(e.text() for e in est.values())])
        rep.rows.append(Row(rep.family, "organisms", model, "narrow", "misaligned_rate", narrow.value, narrow.lo, narrow.hi))
        rep.rows += [Row(rep.family, "organisms", model, "general", f"{k}_rate", e.value, e.lo, e.hi) for k, e in est.items()]
    rep.sections["organisms"] = records


def _separation(rep: EmReport, directions: xr.Dataset) -> None:
    records = []
    for ft in (str(f) for f in directions.finetune.values):
        counts = directions.n_responses.sel(finetune=ft)
        n = f"{int(counts.sel(split='fit', label='misaligned'))}/{int(counts.sel(split='fit', label='aligned'))}"
        acc = directions.separation_accuracy.sel(finetune=ft).values
        if not bool(directions.has_direction.sel(finetune=ft)):
            paired = f", {int(directions.paired_prompts.sel(finetune=ft))} prompts answered both ways" if "paired_prompts" in directions else ""
            least = directions.attrs.get("min_per_class", "?")
            rep.no_direction[ft] = (f"{n.replace('/', ' misaligned and ')} aligned fit responses{paired}; needs {least} of each"
                                    + (f" and {least} such prompts" if directions.attrs.get("balance") == "prompt" else ""))
        records.append([rep.family, ft, n, *(num(float(a), 2) if np.isfinite(a) else "n/a" for a in acc)])
        rep.rows += [Row(rep.family, "separation", ft, f"layer{int(layer)}", "balanced_accuracy", float(a))
                     for layer, a in zip(directions.layer.values, acc)]
    rep.sections["separation"] = records


def _ablation(rep: EmReport, outcomes: xr.Dataset, boot: Bootstrap) -> None:
    mis, coh = per_prompt(outcomes, "misaligned"), per_prompt(outcomes, "coherent")
    norms = dict(zip((str(c) for c in outcomes.condition.values), outcomes.perturbation_norm.values))
    records = []
    models = dict.fromkeys(str(m) for m, k in zip(outcomes.model.values, outcomes.kind.values) if k == "ablate")
    for model in models:
        base = f"{model}/baseline"
        coherent_base = float("nan")  # the baseline comes first: its coherent rate is every ablation's reference
        edited = [str(c) for c in outcomes.condition.values if str(c).startswith((f"{model}/ablate/", f"{model}/clamp/"))]
        for name in [base, *edited]:
            label = name.removeprefix(f"{model}/")
            rate, coherence = boot.rate(mis[name]), boot.rate(coh[name])
            red = boot.reduction(mis[name], mis[base]) if name != base else None
            moving, draws = draws_moving(boot, mis[name], mis[base])
            if name == base:
                coherent_base = coherence.value
            broken = None if name == base else is_broken(coherent_base, coherence.value)
            records.append([rep.family, model, label, num(float(norms[name]), 2), rate.text(), reduction_text(red, moving, draws),
                            coherence.text(), yes_no(broken)])
            rep.rows += [Row(rep.family, "ablation", model, label, "misaligned_rate", rate.value, rate.lo, rate.hi),
                         Row(rep.family, "ablation", model, label, "coherent_rate", coherence.value, coherence.lo, coherence.hi),
                         Row(rep.family, "ablation", model, label, "perturbation_norm", float(norms[name]))]
            if red:
                rep.rows.append(Row(rep.family, "ablation", model, label, "reduction", red.value, red.lo, red.hi))
            if draws:
                rep.rows += [Row(rep.family, "ablation", model, label, "draws", draws),
                             Row(rep.family, "ablation", model, label, "draws_moving", moving)]
            if broken is not None:
                rep.rows.append(Row(rep.family, "ablation", model, label, "broken", float(broken)))
    rep.sections["ablation"] = records


def _steering(rep: EmReport, outcomes: xr.Dataset, boot: Bootstrap) -> None:
    mis, coh = per_prompt(outcomes, "misaligned"), per_prompt(outcomes, "coherent")
    base = boot.rate(mis["base/baseline"])
    records = [[rep.family, "–", "0", base.text(), boot.rate(coh["base/baseline"]).text(), "–", "–"]]
    rep.rows.append(Row(rep.family, "steering", "base", "baseline", "misaligned_rate", base.value, base.lo, base.hi))
    for i, name in enumerate(str(c) for c in outcomes.condition.values):
        if str(outcomes.kind.values[i]) != "steer" or str(outcomes.mode.values[i]) != "steer":
            continue
        source, lam = str(outcomes.source.values[i]), float(outcomes.lam.values[i])
        rnd = f"{name}/random"
        est = [boot.rate(mis[name]), boot.rate(coh[name]), boot.rate(mis[rnd]), boot.rate(coh[rnd])]
        records.append([rep.family, source, f"{lam:g}", *(e.text() for e in est)])
        for cond, e, stat in zip((name, name, rnd, rnd), est, ("misaligned_rate", "coherent_rate") * 2):
            rep.rows.append(Row(rep.family, "steering", "base", cond.removeprefix("base/"), stat, e.value, e.lo, e.hi))
    rep.sections["steering"] = records


def _induce(rep: EmReport, outcomes: xr.Dataset, boot: Bootstrap) -> None:
    """The base with a coordinate at the decision token set to a fine-tune's (`conditions.induce_plans`)."""
    mis, coh = per_prompt(outcomes, "misaligned"), per_prompt(outcomes, "coherent")
    records = []
    for i, name in enumerate(str(c) for c in outcomes.condition.values):
        if str(outcomes.kind.values[i]) != "steer" or str(outcomes.mode.values[i]) != "clamp":
            continue
        label, rnd = name.removeprefix("base/"), f"{name}/random"
        finetune, what = label.removeprefix("clamp-to/").rsplit("/", 1)
        est = [boot.rate(mis[name]), boot.rate(coh[name]), boot.rate(mis[rnd]), boot.rate(coh[rnd])]
        records.append([rep.family, finetune, what, *(e.text() for e in est)])
        for cond, e, stat in zip((label, label, f"{label}/random", f"{label}/random"), est, ("misaligned_rate", "coherent_rate") * 2):
            rep.rows.append(Row(rep.family, "induce", "base", cond, stat, e.value, e.lo, e.hi))
    rep.sections["induce"] = records


def _cosine(rep: EmReport, directions: xr.Dataset) -> None:
    fts = [str(f) for f in directions.finetune.values]
    records = []
    for i, a in enumerate(fts):
        for b in fts[i + 1 :]:
            values = directions.cosine.sel(finetune=a, finetune_b=b).values
            records.append([rep.family, a, b, *(num(float(v), 2, True) if np.isfinite(v) else "n/a" for v in values)])
            rep.rows += [Row(rep.family, "cosine", a, b, f"layer{int(layer)}", float(v)) for layer, v in zip(directions.layer.values, values)]
    rep.sections["cosine"] = records


def _planted(rep: EmReport, directions: xr.Dataset) -> None:
    """Persona organisms: the base's planted variable, how well it separates held-out
    contexts, and each fine-tune direction's cosine with it (none for other organisms)."""
    records = []
    if "planted" in directions:
        sep = directions.planted_separation.values
        records.append([rep.family, "base: planted variable", "held-out separation", *(num(float(a), 2) for a in sep)])
        rep.rows += [Row(rep.family, "planted", "base", f"layer{int(layer)}", "separation", float(a)) for layer, a in zip(directions.layer.values, sep)]
        for ft in (str(f) for f in directions.finetune.values):
            values = directions.planted_cosine.sel(finetune=ft).values
            records.append([rep.family, ft, "cosine with the planted variable", *(num(float(v), 2, True) if np.isfinite(v) else "n/a" for v in values)])
            rep.rows += [Row(rep.family, "planted", ft, f"layer{int(layer)}", "cosine", float(v)) for layer, v in zip(directions.layer.values, values)]
    rep.sections["planted"] = records


def read_store(path: str | Path, n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> EmReport:
    """Every EM table of one finished store."""

    attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    cell, config = attrs["cell"], attrs.get("digest_config") or {}
    organisms = (config.get("em") or {}).get("organisms") or {}
    group = {g: xr.open_zarr(str(path), group=g).load() for g in ("em_samples", "em_directions", "em_outcomes")}
    outcomes = group["em_outcomes"]
    rep = EmReport(str(cell["family"]), str(path), int(outcomes.attrs["steer_layer"]), int(outcomes.attrs["ablate_layer"]),
                   misaligned=tuple(organisms.get("misaligned") or ()), control=str(organisms.get("control") or ""),
                   **read_store_made(attrs, outcomes.attrs, group["em_directions"].sizes["layer"]))
    boot = Bootstrap(n_resamples, seed, confidence)
    _organisms(rep, group["em_samples"], boot)
    _separation(rep, group["em_directions"])
    _ablation(rep, outcomes, boot)
    _steering(rep, outcomes, boot)
    _induce(rep, outcomes, boot)
    _cosine(rep, group["em_directions"])
    _planted(rep, group["em_directions"])
    return rep


def sort_reports(reports: list[EmReport]) -> list[EmReport]:
    """By family, base, how the ablations were made (the seed's way first), variant and build."""
    return sorted(reports, key=lambda r: (r.family, r.pretraining, how_ablated(r), r.variant, replicate_key(r.replicate), r.path))


def markdown(reports: list[EmReport]) -> str:
    reports = sort_reports(reports)
    named = labels(reports)

    def section(key: str) -> list[list[str]]:
        return named_section(reports, named, key)

    n_layers = max((len(r.sections["separation"][0]) - 3 for r in reports if r.sections["separation"]), default=0)
    layers = [f"L{i}" for i in range(n_layers)]
    parts = [
        "## Emergent misalignment: misaligned rate on general prompts (held-out test split, %, 95% CI)\n",
        markdown_text(["family", "model", "narrow domain", "misaligned", "aligned", "coherent"], section("organisms")),
        "\n## Separation accuracy of the misaligned - aligned direction (held-out, balanced)\n",
        markdown_text(["family", "fine-tune", "fit mis/ali", *layers], section("separation")),
        "\n## Ablation in each fine-tune: own directions, matched random, transfer from the other fine-tune "
        "(ablate/: projected out at every position; clamp/: the coordinate at the prompt's last token set to the base's mean "
        "there, every layer)\n",
        markdown_text(["family", "fine-tune", "condition", "change norm", "misaligned %", "reduction %", "coherent %", "broken"],
            section("ablation")),
        *([] if section("ablation") else ["(none: no fine-tune has a direction; the fit responses of each class are above)\n"]),
        "\n## Steering the base (+lambda |v| at the steering layer) vs a random direction of the same norm\n",
        markdown_text(["family", "direction", "lambda", "misaligned %", "coherent %", "random: misaligned %", "random: coherent %"],
            section("steering")),
        "\n## Cosine between fine-tunes' directions, per layer\n",
        markdown_text(["family", "fine-tune", "fine-tune", *layers], section("cosine")),
    ]
    induce = section("induce")
    if induce:
        parts += [
            "\n## The base with a coordinate at the prompt's last token set to a fine-tune's mean there (every layer): "
            "along the fine-tune's shift from the base, its own direction, the planted variable; vs a matched random direction\n",
            markdown_text(["family", "fine-tune", "along", "misaligned %", "coherent %", "random: misaligned %", "random: coherent %"], induce),
        ]
    planted = section("planted")
    if planted:
        parts += [
            "\n## Planted persona variable (persona bases): the base's misaligned - aligned context at a question of another "
            "topic (last token), per layer; on a planted base (persona_planted) the unit it was trained to decide the persona along\n",
            markdown_text(["family", "direction", "statistic", *layers], planted),
        ]
    return "".join(parts)


def csv_table(reports: list[EmReport]) -> str:
    reports = sort_reports(reports)
    named = labels(reports)
    return rows_csv(replace(r, family=named[rep.path]) for rep in reports for r in rep.rows)


def _cut(summary: dict, which: str) -> str:
    """An ablation's reduction, said to be breakage where it is broken."""
    text = f"{100 * summary[f'reduction_{which}']:.0f}%"
    if summary[f"broken_{which}"]:
        text += f" (broken: coherent {100 * summary[f'coherent_{which}']:.0f}%)"
    return text


def headline(reports: list[EmReport]) -> str:
    lines = []
    reports = sort_reports(reports)
    named = labels(reports)
    for rep in reports:
        for model, s in rep.summary().items():
            transfer = ", ".join(f"from {k} {100 * v:.0f}%" for k, v in s["transfer"].items()) or "none"
            lines.append(
                f"{named[rep.path]}/{model}: misaligned {100 * s['baseline']:.0f}% on general prompts; separation up to "
                f"{s['best_separation']:.2f}; ablating its directions{how_ablated(rep)} cuts it by {_cut(s, 'own')}, the matched random "
                f"direction by {_cut(s, 'random')} (coherent {100 * s['coherent_baseline']:.0f}% before either); "
                f"transfer ablation {transfer}."
                + (f" Clamped at the decision token to the base's: {_cut(s, 'clamp')}, matched random {_cut(s, 'clamp_random')}."
                   if np.isfinite(s["reduction_clamp"]) else "")
            )
        for model, why in rep.no_direction.items():
            rate = rep.value("organisms", model, "general", "misaligned_rate")
            lines.append(f"{named[rep.path]}/{model}: misaligned {100 * rate:.0f}% on general prompts; no direction ({why}).")
    return "\n".join(lines)


def write(reports: list[EmReport], out: Path) -> dict[str, str]:
    return write_files(
        out, {"em_table.md": markdown(reports), "em_table.csv": csv_table(reports), "em_headline.txt": headline(reports) + "\n"}
    )
