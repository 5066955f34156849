"""The ADL table: per model pair, token relevance vs baselines, steering and delta-CE.

Read from finished ADL stores (root attribute experiment = "adl"; groups in
`routing_suite/store_format.py`). Relevance is read at the steering layer (the
middle layer unless configured), best over the first k positions, for the
difference and for each baseline alike. Same stores, same bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import xarray as xr

from routing_suite.adl import identify
from routing_suite.store import read_store_attrs
from routing_suite.text_tables import csv_text, finite_mean, num, pct


@dataclass
class AdlRow:
    family: str
    behavior: str
    model: str
    n_texts: int
    layer: int
    position: int
    # relevance at the steering layer, best over positions
    ll_difference: float
    ll_base: float
    ll_finetuned: float
    ps_difference: float
    ps_base: float
    ps_finetuned: float
    # best over every layer and position
    ll_difference_any: float
    ps_difference_any: float
    best_alpha: float
    similarity_unsteered: float
    similarity_steered: float
    similarity_gain: float
    similarity_random: float
    # delta-CE of projection replacement at the steering layer, and sign counts over layers
    delta_ce_finetune: float
    delta_ce_unrelated: float
    delta_ce_finetune_random: float
    delta_ce_unrelated_random: float
    layers_finetune_up: int
    layers_unrelated_down: int
    n_layers: int
    # goal identification (routing_suite.adl.identify): the true goal's rank among n_goals
    # candidates from each evidence (1 = identified), and the top candidate; empty/NaN when not run
    goal_true: str = ""
    n_goals: int = 0
    rank_adl: float = math.nan
    rank_tokens: float = math.nan
    rank_black_box: float = math.nan
    top_adl: str = ""
    top_black_box: str = ""
    path: str = ""


def _open(path: Path, group: str) -> xr.Dataset:
    return xr.open_zarr(str(path), group=group, consolidated=False).load()


def read_cell(path: str | Path, goals: identify.GoalSet | None = None, goal_grader=None) -> AdlRow:
    """One finished ADL store as a table row; with `goals` and `goal_grader`, with its goal
    identification (skipped for a store whose behaviour has no true goal among the candidates)."""
    path = Path(path)
    attrs = read_store_attrs(path)
    cell, adl = attrs["cell"], attrs["adl"]
    layer, position = int(adl["steer_layer"]), int(adl["position"])
    readout, steer, causal = (_open(path, g) for g in ("adl_readout", "adl_steer", "adl_causal"))
    rel = readout.relevance.sel(layer=layer)

    def best(name: str, source: str, r: xr.DataArray = rel) -> float:
        return float(r.sel(readout=name, source=source).max())

    delta = causal.delta_ce
    has_random = "random" in delta.condition.values

    def d(data: str, condition: str) -> float:
        return float(delta.sel(data=data, condition=condition, layer=layer)) if condition in delta.condition.values else math.nan

    random_sim = steer.attrs.get("similarity_random")
    found = None
    if goals is not None and goal_grader is not None and goals.truth(cell["behavior"]) is not None:
        found = identify.identify(identify.evidence(readout, steer, layer), goals, cell["behavior"], goal_grader)
    ids = {} if found is None else {
        "goal_true": found.true_goal, "n_goals": found.n_candidates, "rank_adl": found.rank["adl"],
        "rank_tokens": found.rank["tokens"], "rank_black_box": found.rank["black_box"],
        "top_adl": found.top["adl"], "top_black_box": found.top["black_box"],
    }
    return AdlRow(
        family=cell["family"], behavior=cell["behavior"], model=cell["model"], n_texts=int(adl["n_texts"]),
        layer=layer, position=position,
        ll_difference=best("logit_lens", "difference"), ll_base=best("logit_lens", "base_mean"),
        ll_finetuned=best("logit_lens", "finetuned_mean"),
        ps_difference=best("patchscope", "difference"), ps_base=best("patchscope", "base_mean"),
        ps_finetuned=best("patchscope", "finetuned_mean"),
        ll_difference_any=best("logit_lens", "difference", readout.relevance),
        ps_difference_any=best("patchscope", "difference", readout.relevance),
        best_alpha=float(steer.attrs["best_alpha"]),
        similarity_unsteered=float(steer.attrs["similarity_unsteered"]),
        similarity_steered=float(steer.attrs["similarity_steered"]),
        similarity_gain=float(steer.attrs["similarity_gain"]),
        similarity_random=math.nan if random_sim is None else float(random_sim),
        delta_ce_finetune=d("finetune", "difference"), delta_ce_unrelated=d("unrelated", "difference"),
        delta_ce_finetune_random=d("finetune", "random") if has_random else math.nan,
        delta_ce_unrelated_random=d("unrelated", "random") if has_random else math.nan,
        layers_finetune_up=int((delta.sel(data="finetune", condition="difference") > 0).sum()),
        layers_unrelated_down=int((delta.sel(data="unrelated", condition="difference") < 0).sum()),
        n_layers=int(delta.sizes["layer"]),
        **ids,
        path=str(path),
    )


def sort_rows(rows: list[AdlRow]) -> list[AdlRow]:
    return sorted(rows, key=lambda r: (r.family, r.behavior, r.model))


def csv_table(rows: list[AdlRow]) -> str:
    names = [f.name for f in fields(AdlRow)]
    records = [[v if isinstance(v, str) else str(v) if isinstance(v, int) else num(v) for v in (getattr(r, n) for n in names)]
               for r in sort_rows(rows)]
    return csv_text(names, records)


def markdown_table(rows: list[AdlRow]) -> str:
    header = [
        "family", "behavior", "layer / pos", "LL: diff / base / ft", "PS: diff / base / ft", "best alpha",
        "similarity: unsteered → steered (gain; random)", "ΔCE ft data (layers > 0)", "ΔCE unrelated (layers < 0)",
        "ΔCE random: ft / unrel.", "goal rank: ADL / tokens / black box",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sort_rows(rows):
        lines.append("| " + " | ".join([
            r.family, r.behavior, f"{r.layer} / {r.position}",
            f"{pct(r.ll_difference)} / {pct(r.ll_base)} / {pct(r.ll_finetuned)}",
            f"{pct(r.ps_difference)} / {pct(r.ps_base)} / {pct(r.ps_finetuned)}",
            num(r.best_alpha, 2),
            f"{num(r.similarity_unsteered, 3)} → {num(r.similarity_steered, 3)} ({num(r.similarity_gain, 3, True)}; {num(r.similarity_random, 3)})",
            f"{num(r.delta_ce_finetune, 3, True)} ({r.layers_finetune_up}/{r.n_layers})",
            f"{num(r.delta_ce_unrelated, 3, True)} ({r.layers_unrelated_down}/{r.n_layers})",
            f"{num(r.delta_ce_finetune_random, 3, True)} / {num(r.delta_ce_unrelated_random, 3, True)}",
            _ranks(r),
        ]) + " |")
    notes = [
        "",
        "LL / PS: share of the top tokens of the logit lens / patchscope that are characteristic of the fine-tuning data, "
        "at the steering layer, best over the first k positions; diff = mean difference ft - base, base / ft = the "
        "base's / fine-tune's mean activation. Similarity to the fine-tuning data at alpha 0 and at the largest "
        "coherent alpha (random: a random direction at that alpha). ΔCE: projection replacement along the difference "
        "at the steering layer (in brackets: layers of all with the expected sign). Goal rank: the true fine-tuning "
        "goal's rank among the candidates (1 = identified) from the difference's readout tokens and steered "
        "completions (ADL), from the tokens alone, and from the unsteered completions (black box).",
    ]
    return "\n".join(lines + notes) + "\n"


def _ranks(r: AdlRow) -> str:
    if not r.n_goals:
        return "n/a"
    return f"{r.rank_adl:.0f} / {r.rank_tokens:.0f} / {r.rank_black_box:.0f} of {r.n_goals}"


def identification_line(rows: list[AdlRow]) -> str:
    """Top-1 goal identification over the pairs that have it, per evidence, with Wilson intervals."""
    done = [r for r in rows if r.n_goals]
    if not done:
        return ""
    n, ks = len(done), sorted({r.n_goals for r in done})

    def rate(field: str, label: str) -> str:
        hits = sum(getattr(r, field) == 1 for r in done)
        lo, hi = identify.wilson_interval(hits, n)
        return f"{label} {hits} of {n} ({pct(hits / n)} [{pct(lo)}, {pct(hi)}])"

    return (f"the true fine-tuning goal ranks first among {'/'.join(map(str, ks))} candidates from "
            f"{rate('rank_adl', 'ADL evidence')}, {rate('rank_tokens', 'its readout tokens alone')}, "
            f"{rate('rank_black_box', 'black-box completions')}")


def headline(rows: list[AdlRow]) -> str:
    n = len(rows)
    ll = sum(r.ll_difference > max(r.ll_base, r.ll_finetuned) for r in rows)
    ps = sum(r.ps_difference > max(r.ps_base, r.ps_finetuned) for r in rows)
    gain = sum(r.similarity_gain > 0 for r in rows)
    ce = sum(r.delta_ce_finetune > 0 and r.delta_ce_unrelated < 0 for r in rows)
    ident = identification_line(rows)
    return (f"ADL: the difference beats both baselines in {ll} of {n} pairs (logit lens) and {ps} of {n} (patchscope); "
            f"steering raises similarity to the fine-tuning data in {gain} of {n}; delta-CE has the expected signs "
            f"(ft data up, unrelated down) in {ce} of {n}" + (f"; {ident}" if ident else ""))


# A behaviour named `<fine-tune>_mix<r>` is `<fine-tune>` with pretraining text mixed in at 1:r
# (the organisms' SDF mixing ablation, routing_suite/organisms/sdf_task.py).
_MIX = re.compile(r"^(?P<base>.+)_mix(?P<ratio>\d+(?:\.\d+)?)$")


def mix_of(behavior: str) -> tuple[str, float]:
    """(the unmixed fine-tune's behaviour, the mix ratio; 0 for an unmixed one)."""
    found = _MIX.match(behavior)
    return (found["base"], float(found["ratio"])) if found else (behavior, 0.0)


def mixing_rows(rows: list[AdlRow]) -> list[dict]:
    """Per mix ratio, over the fine-tunes that have a mixed version (and their unmixed ones):
    mean relevance of the difference and of the base baseline, mean steering gain, and how
    many are identified first from each evidence."""
    mixed = {(r.family, mix_of(r.behavior)[0]) for r in rows if mix_of(r.behavior)[1] > 0}
    groups: dict[float, list[AdlRow]] = {}
    for r in rows:
        base, ratio = mix_of(r.behavior)
        if (r.family, base) in mixed:
            groups.setdefault(ratio, []).append(r)

    out = []
    for ratio in sorted(groups):
        g = groups[ratio]
        ided = [r for r in g if r.n_goals]
        out.append({
            "mix": ratio, "pairs": len(g),
            "ll_difference": finite_mean([r.ll_difference for r in g]), "ll_base": finite_mean([r.ll_base for r in g]),
            "ps_difference": finite_mean([r.ps_difference for r in g]), "ps_base": finite_mean([r.ps_base for r in g]),
            "similarity_gain": finite_mean([r.similarity_gain for r in g]),
            "identified": len(ided),
            **{f"top1_{k}": sum(getattr(r, f"rank_{k}") == 1 for r in ided) for k in ("adl", "tokens", "black_box")},
        })
    return out


def mixing_markdown(table: list[dict]) -> str:
    lines = ["| mix (ft : pretraining) | pairs | LL: diff / base | PS: diff / base | steering gain | first: ADL / tokens / black box |",
             "|---|---:|---:|---:|---:|---:|"]
    for m in table:
        lines.append("| " + " | ".join([
            f"1:{m['mix']:g}", str(m["pairs"]), f"{pct(m['ll_difference'])} / {pct(m['ll_base'])}",
            f"{pct(m['ps_difference'])} / {pct(m['ps_base'])}", num(m["similarity_gain"], 3, True),
            f"{m['top1_adl']} / {m['top1_tokens']} / {m['top1_black_box']} of {m['identified']}",
        ]) + " |")
    return "\n".join([*lines, "", "Means over the fine-tunes that have a mixed version; relevance at the steering layer, best "
                      "over positions; first: how many have their true goal ranked first from each evidence."]) + "\n"


def write(rows: list[AdlRow], out: Path) -> dict[str, str]:
    """adl_table.{md,csv} and adl_headline.txt, and with mixed fine-tunes among the rows
    adl_mixing.{md,csv} (figures: routing_suite.adl.plots); returns the texts written."""
    out.mkdir(parents=True, exist_ok=True)
    texts = {"adl_table.md": markdown_table(rows), "adl_table.csv": csv_table(rows), "adl_headline.txt": headline(rows) + "\n"}
    if mixing := mixing_rows(rows):
        names = list(mixing[0])
        texts["adl_mixing.md"] = mixing_markdown(mixing)
        texts["adl_mixing.csv"] = csv_text(names, [[num(v) if isinstance(v, float) else str(v) for v in m.values()] for m in mixing])
    for name, content in texts.items():
        (out / name).write_text(content, encoding="utf-8")
    return texts
