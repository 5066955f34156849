"""The EM transfer tables: per donor -> receiver pair, maps, directions, ablation and steering.

- maps: each receiver layer's held-out R^2 of the ridge map, beside the R^2 of
  the token's identity alone;
- directions: cosine with the receiver's native direction, and the balanced
  held-out separation of the receiver fine-tune's responses, per direction and
  layer (random and orthogonal: the mean over their draws);
- ablation: in the receiver's misaligned fine-tune, each direction's misaligned
  rate, reduction and coherence, and the paired difference control - mapped
  (the same for the decision-token clamps, `clamp`: each direction's coordinate
  at the prompt's last token set to the receiver base's mean there)
  (positive: the mapped direction lowers the rate more). An ablation is *broken*
  when its coherent rate falls more than 0.1 below the baseline's (em_tables).
  The mapped direction is *specific* when its reduction's interval lies above 0,
  it is not broken, and that difference's interval lies above 0 for every control;
- steering: the receiver's base under each direction at the same norm.

Intervals: seeded percentile bootstrap over prompts, paired where two
conditions are compared (as em_tables). The same stores give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from routing_suite.em.settings import TRANSFER_CONTROLS
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

DIRECTIONS = ("mapped", "native", *TRANSFER_CONTROLS)


@dataclass
class TransferReport(RowLookup, StoreMade):
    """One donor -> receiver store, read and summarised (which build of the pair's families, and
    how it ablated: `StoreMade`, as in `tables.EmReport`)."""

    donor: str
    receiver: str
    path: str
    steer_layer: int
    rows: list[Row] = field(default_factory=list)
    sections: dict[str, list[list[str]]] = field(default_factory=dict)

    @property
    def pair(self) -> str:
        return f"{self.donor}->{self.receiver}"

    def summary(self) -> dict:
        """Per kind: reductions of the mapped, native and control ablations, whether the mapped
        one beats every control, and cos(mapped, native) at the steering layer."""
        out: dict = {"map_r2": [r.value for r in self.rows if r.table == "maps" and r.statistic == "r2"]}
        kinds = dict.fromkeys(r.model for r in self.rows if r.table == "ablation")
        for kind in kinds:
            out[kind] = {**self._edit_summary(kind, "ablation"),
                         "cosine_mapped_native": self.value("directions", kind, "mapped", f"cosine_layer{self.steer_layer}")}
            if any(r.table == "clamp" and r.model == kind for r in self.rows):
                out[kind]["clamp"] = self._edit_summary(kind, "clamp")
        return out

    def _edit_summary(self, kind: str, table: str) -> dict:
        """Reductions, breakage and the controls beaten by the mapped direction, of one kind
        of edit ("ablation" or "clamp") in the receiver fine-tune `kind`."""
        out = {
            "reduction": {d: self.value(table, kind, d, "reduction") for d in DIRECTIONS},
            "beats": {c: self.value(table, kind, c, "beaten_by_mapped") == 1.0 for c in TRANSFER_CONTROLS},
            "broken": {d: self.value(table, kind, d, "broken") == 1.0 for d in DIRECTIONS},
        }
        reduction = self.row(table, kind, "mapped", "reduction")
        # Lowers: the mapped edit lowers the rate (interval above 0) without breaking the
        # model; specific: it does, and more than every control does.
        out["lowers"] = bool(reduction and reduction.lo > 0) and not out["broken"]["mapped"]
        out["specific"] = out["lowers"] and all(out["beats"].values())
        return out


def _by_name(ds: xr.Dataset, variable: str, kind: str, name: str) -> np.ndarray:
    """(layer,) one direction's values; the mean over draws for a seeded control."""
    sel = ds[variable].sel(finetune=kind)
    rows = [i for i, (n, c) in enumerate(zip(ds.vector.values, ds.control.values)) if n == name or c == name]
    return sel.values[rows].mean(0)


def _maps(rep: TransferReport, maps: xr.Dataset) -> None:
    r2, token, alpha = maps.map_r2.values, maps.map_r2_token.values, maps.map_alpha.values
    cells = [f"{num(float(a), 2)} ({num(float(b), 2)})" for a, b in zip(r2, token)]
    rep.sections["maps"] = [[rep.pair, str(int(maps.attrs["n_tokens"])), *cells]]
    for layer, a, b, al, dl in zip(maps.layer.values, r2, token, alpha, maps.donor_layer.values):
        rep.rows += [Row(rep.pair, "maps", rep.receiver, f"layer{int(layer)}", "r2", float(a)),
                     Row(rep.pair, "maps", rep.receiver, f"layer{int(layer)}", "r2_token_identity", float(b)),
                     Row(rep.pair, "maps", rep.receiver, f"layer{int(layer)}", "alpha", float(al)),
                     Row(rep.pair, "maps", rep.receiver, f"layer{int(layer)}", "donor_layer", float(dl))]


def _directions(rep: TransferReport, maps: xr.Dataset) -> None:
    cos_records, sep_records = [], []
    for k, kind in enumerate(str(f) for f in maps.finetune.values):
        if not bool(maps.has_direction.values[k]):
            continue
        for name in DIRECTIONS:
            cos, sep = _by_name(maps, "cosine_native", kind, name), _by_name(maps, "separation", kind, name)
            if name != "native":
                cos_records.append([rep.pair, kind, name, *(num(float(v), 2, True) for v in cos)])
            sep_records.append([rep.pair, kind, name, *(num(float(v), 2) if np.isfinite(v) else "n/a" for v in sep)])
            for layer, c, s in zip(maps.layer.values, cos, sep):
                rep.rows += [Row(rep.pair, "directions", kind, name, f"cosine_layer{int(layer)}", float(c)),
                             Row(rep.pair, "directions", kind, name, f"separation_layer{int(layer)}", float(s))]
    rep.sections["cosine"], rep.sections["separation"] = cos_records, sep_records


def _ablation(rep: TransferReport, outcomes: xr.Dataset, boot: Bootstrap, mode: str = "ablate") -> None:
    """The ablations (`mode` "ablate": table and section "ablation") or the decision-token
    clamps ("clamp": table and section "clamp") in each receiver fine-tune."""
    mis, coh = per_prompt(outcomes, "misaligned"), per_prompt(outcomes, "coherent")
    norms = dict(zip((str(c) for c in outcomes.condition.values), outcomes.perturbation_norm.values))
    table = "ablation" if mode == "ablate" else mode
    records = []
    kinds = dict.fromkeys(str(m) for m, plan_mode in zip(outcomes.model.values, outcomes.mode.values) if plan_mode == mode)
    for kind in kinds:
        base, mapped = f"{kind}/baseline", f"{kind}/{mode}/mapped"
        coherent_base = float("nan")  # the baseline comes first: its coherent rate is every ablation's reference
        for name in ("baseline", *DIRECTIONS):
            cond = base if name == "baseline" else f"{kind}/{mode}/{name}"
            rate, coherence = boot.rate(mis[cond]), boot.rate(coh[cond])
            if name == "baseline":
                coherent_base = coherence.value
            red = boot.reduction(mis[cond], mis[base]) if name != "baseline" else None
            moving, draws = draws_moving(boot, mis[cond], mis[base])
            diff = boot.difference(mis[cond], mis[mapped]) if name not in ("baseline", "mapped") else None
            beaten = bool(diff is not None and np.isfinite(diff.lo) and diff.lo > 0)
            broken = None if name == "baseline" else is_broken(coherent_base, coherence.value)
            records.append([rep.pair, kind, name, num(float(norms[cond]), 2), rate.text(), reduction_text(red, moving, draws),
                            coherence.text(), yes_no(broken), diff.text(sign=True) if diff else "–",
                            yes_no(beaten if name in TRANSFER_CONTROLS else None)])
            rep.rows += [Row(rep.pair, table, kind, name, "misaligned_rate", rate.value, rate.lo, rate.hi),
                         Row(rep.pair, table, kind, name, "coherent_rate", coherence.value, coherence.lo, coherence.hi),
                         Row(rep.pair, table, kind, name, "perturbation_norm", float(norms[cond]))]
            if red:
                rep.rows.append(Row(rep.pair, table, kind, name, "reduction", red.value, red.lo, red.hi))
            if draws:
                rep.rows += [Row(rep.pair, table, kind, name, "draws", draws), Row(rep.pair, table, kind, name, "draws_moving", moving)]
            if diff:
                rep.rows.append(Row(rep.pair, table, kind, name, "minus_mapped", diff.value, diff.lo, diff.hi))
            if broken is not None:
                rep.rows.append(Row(rep.pair, table, kind, name, "broken", float(broken)))
            if name in TRANSFER_CONTROLS:
                rep.rows.append(Row(rep.pair, table, kind, name, "beaten_by_mapped", float(beaten)))
    rep.sections[table] = records


def _steering(rep: TransferReport, outcomes: xr.Dataset, boot: Bootstrap) -> None:
    mis, coh = per_prompt(outcomes, "misaligned"), per_prompt(outcomes, "coherent")
    records = []
    if "base/baseline" in mis:
        base = boot.rate(mis["base/baseline"])
        records.append([rep.pair, "–", "0", "baseline", base.text(), boot.rate(coh["base/baseline"]).text()])
        rep.rows.append(Row(rep.pair, "steering", "base", "baseline", "misaligned_rate", base.value, base.lo, base.hi))
    for i, cond in enumerate(str(c) for c in outcomes.condition.values):
        if str(outcomes.mode.values[i]) != "steer":
            continue
        _, _, kind, lam, name = cond.split("/")
        rate, coherence = boot.rate(mis[cond]), boot.rate(coh[cond])
        records.append([rep.pair, kind, lam.removeprefix("x"), name, rate.text(), coherence.text()])
        rep.rows += [Row(rep.pair, "steering", kind, f"{lam}/{name}", "misaligned_rate", rate.value, rate.lo, rate.hi),
                     Row(rep.pair, "steering", kind, f"{lam}/{name}", "coherent_rate", coherence.value, coherence.lo, coherence.hi)]
    rep.sections["steering"] = records


def read_store(path: str | Path, n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> TransferReport:
    """Every transfer table of one finished store."""
    maps = xr.open_zarr(str(path), group="xfer_maps").load()
    outcomes = xr.open_zarr(str(path), group="xfer_outcomes").load()
    attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    rep = TransferReport(str(maps.attrs["donor"]), str(maps.attrs["receiver"]), str(path), int(maps.attrs["steer_layer"]),
                         **read_store_made(attrs, outcomes.attrs, maps.sizes["layer"]))
    boot = Bootstrap(n_resamples, seed, confidence)
    _maps(rep, maps)
    _directions(rep, maps)
    _ablation(rep, outcomes, boot)
    _ablation(rep, outcomes, boot, "clamp")
    _steering(rep, outcomes, boot)
    return rep


def _sorted(reports: list[TransferReport]) -> list[TransferReport]:
    return sorted(reports, key=lambda r: (r.receiver, r.donor, r.pretraining, r.variant, replicate_key(r.replicate), r.path))


def names(reports: list[TransferReport]) -> dict[str, str]:
    """Store path -> its rows' name: the pair, and where a pair has several stores here its
    bases' pretraining and build too (`tables.labels`)."""
    return labels(reports, first=lambda r: r.pair)


def markdown(reports: list[TransferReport]) -> str:
    reports = _sorted(reports)
    named = names(reports)

    def section(key: str) -> list[list[str]]:
        return named_section(reports, named, key)

    n_layers = max((len(r.sections["maps"][0]) - 2 for r in reports), default=0)
    layers = [f"L{i}" for i in range(n_layers)]
    parts = [
        "## Cross-architecture ridge maps: held-out R^2 per receiver layer (token identity alone in parentheses)\n",
        markdown_text(["donor->receiver", "tokens", *layers], section("maps")),
        "\n## Ablation in the receiver's misaligned fine-tune: mapped vs native vs matched controls "
        "(misaligned on general test prompts, %, 95% CI; control - mapped in points; broken: coherence more than 0.1 below the "
        "baseline's; the mapped direction is specific when its reduction's interval and every control's interval are > 0 and it is not broken)\n",
        markdown_text(["donor->receiver", "fine-tune", "direction", "change norm", "misaligned %", "reduction %", "coherent %", "broken", "control - mapped",
             "mapped beats it"], section("ablation")),
        *_clamp_section(section("clamp")),
        "\n## Separation of the receiver fine-tune's held-out misaligned vs aligned responses along each direction (balanced)\n",
        markdown_text(["donor->receiver", "fine-tune", "direction", *layers], section("separation")),
        "\n## Cosine with the receiver's native direction, per layer\n",
        markdown_text(["donor->receiver", "fine-tune", "direction", *layers], section("cosine")),
        "\n## Steering the receiver's base at its steering layer (every direction at lambda x |native|)\n",
        markdown_text(["donor->receiver", "fine-tune", "lambda", "direction", "misaligned %", "coherent %"],
            section("steering")),
    ]
    return "".join(parts)


def _clamp_section(rows: list[list[str]]) -> list[str]:
    """The decision-token clamp table, when the stores have one (stores of before 2026-12-05 do not)."""
    if not rows:
        return []
    return [
        "\n## Decision-token clamp in the receiver's misaligned fine-tune: each direction's coordinate at the prompt's last "
        "token set to the receiver base's mean there (every layer; controls matched to the mapped clamp at each edited activation)\n",
        markdown_text(["donor->receiver", "fine-tune", "direction", "change norm", "misaligned %", "reduction %", "coherent %", "broken",
                       "control - mapped", "mapped beats it"], rows),
    ]


def csv_table(reports: list[TransferReport]) -> str:
    reports = _sorted(reports)
    named = names(reports)
    return rows_csv((replace(r, family=named[rep.path]) for rep in reports for r in rep.rows), first_column="pair")


def headline(reports: list[TransferReport]) -> str:
    lines = []
    reports = _sorted(reports)
    named = names(reports)
    for rep in reports:
        s = rep.summary()
        r2 = ", ".join(f"{v:.2f}" for v in s["map_r2"])
        for kind, k in ((k, v) for k, v in s.items() if k != "map_r2"):
            red = k["reduction"]
            mark = {d: " (broken)" if k["broken"][d] else "" for d in DIRECTIONS}
            controls = ", ".join(f"{c} {100 * red[c]:.0f}%{mark[c]}" for c in TRANSFER_CONTROLS)
            lines.append(
                f"{named[rep.path]}/{kind}: map R^2 per layer {r2}; cos(mapped, native) {k['cosine_mapped_native']:+.2f} at layer "
                f"{rep.steer_layer}; reduction of the misaligned rate by ablating the mapped direction"
                f"{how_ablated(rep)} {100 * red['mapped']:.0f}%{mark['mapped']} "
                f"(native {100 * red['native']:.0f}%{mark['native']}; {controls}): {'specific' if k['specific'] else 'not specific'}."
                + (_clamp_line(k["clamp"]) if "clamp" in k else "")
            )
    return "\n".join(lines)


def _clamp_line(k: dict) -> str:
    red, broken = k["reduction"], k["broken"]
    mark = {d: " (broken)" if broken[d] else "" for d in DIRECTIONS}
    controls = ", ".join(f"{c} {100 * red[c]:.0f}%{mark[c]}" for c in TRANSFER_CONTROLS)
    return (f" Decision-token clamp: mapped {100 * red['mapped']:.0f}%{mark['mapped']} (native {100 * red['native']:.0f}%{mark['native']}; "
            f"{controls}): {'specific' if k['specific'] else 'not specific'}.")


def write(reports: list[TransferReport], out: Path) -> dict[str, str]:
    return write_files(out, {"em_transfer_table.md": markdown(reports), "em_transfer_table.csv": csv_table(reports),
                             "em_transfer_headline.txt": headline(reports) + "\n"})
