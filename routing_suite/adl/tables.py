"""The ADL table: per model pair, token relevance vs baselines, steering and delta-CE.

Read from finished ADL stores (root attribute experiment = "adl"; groups in
`routing_suite/store_format.py`). Relevance is read at the steering layer (the
middle layer unless configured), best over the first k positions, for the
difference and for each baseline alike. Same stores, same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import xarray as xr

from routing_suite.store import read_store_attrs
from routing_suite.text_tables import csv_text, num


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
    path: str = ""


def _open(path: Path, group: str) -> xr.Dataset:
    return xr.open_zarr(str(path), group=group, consolidated=False).load()


def read_cell(path: str | Path) -> AdlRow:
    """One finished ADL store as a table row."""
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
        path=str(path),
    )


def sort_rows(rows: list[AdlRow]) -> list[AdlRow]:
    return sorted(rows, key=lambda r: (r.family, r.behavior, r.model))


def csv_table(rows: list[AdlRow]) -> str:
    names = [f.name for f in fields(AdlRow)]
    records = [[v if isinstance(v, str) else str(v) if isinstance(v, int) else num(v) for v in (getattr(r, n) for n in names)]
               for r in sort_rows(rows)]
    return csv_text(names, records)


def _pct(x: float) -> str:
    return f"{num(100 * x, 0)}%" if math.isfinite(x) else "n/a"


def markdown_table(rows: list[AdlRow]) -> str:
    header = [
        "family", "behavior", "layer / pos", "LL: diff / base / ft", "PS: diff / base / ft", "best alpha",
        "similarity: unsteered → steered (gain; random)", "ΔCE ft data (layers > 0)", "ΔCE unrelated (layers < 0)",
        "ΔCE random: ft / unrel.",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sort_rows(rows):
        lines.append("| " + " | ".join([
            r.family, r.behavior, f"{r.layer} / {r.position}",
            f"{_pct(r.ll_difference)} / {_pct(r.ll_base)} / {_pct(r.ll_finetuned)}",
            f"{_pct(r.ps_difference)} / {_pct(r.ps_base)} / {_pct(r.ps_finetuned)}",
            num(r.best_alpha, 2),
            f"{num(r.similarity_unsteered, 3)} → {num(r.similarity_steered, 3)} ({num(r.similarity_gain, 3, True)}; {num(r.similarity_random, 3)})",
            f"{num(r.delta_ce_finetune, 3, True)} ({r.layers_finetune_up}/{r.n_layers})",
            f"{num(r.delta_ce_unrelated, 3, True)} ({r.layers_unrelated_down}/{r.n_layers})",
            f"{num(r.delta_ce_finetune_random, 3, True)} / {num(r.delta_ce_unrelated_random, 3, True)}",
        ]) + " |")
    notes = [
        "",
        "LL / PS: share of the top tokens of the logit lens / patchscope that are characteristic of the fine-tuning data, "
        "at the steering layer, best over the first k positions; diff = mean difference ft - base, base / ft = the "
        "base's / fine-tune's mean activation. Similarity to the fine-tuning data at alpha 0 and at the largest "
        "coherent alpha (random: a random direction at that alpha). ΔCE: projection replacement along the difference "
        "at the steering layer (in brackets: layers of all with the expected sign).",
    ]
    return "\n".join(lines + notes) + "\n"


def headline(rows: list[AdlRow]) -> str:
    n = len(rows)
    ll = sum(r.ll_difference > max(r.ll_base, r.ll_finetuned) for r in rows)
    ps = sum(r.ps_difference > max(r.ps_base, r.ps_finetuned) for r in rows)
    gain = sum(r.similarity_gain > 0 for r in rows)
    ce = sum(r.delta_ce_finetune > 0 and r.delta_ce_unrelated < 0 for r in rows)
    return (f"ADL: the difference beats both baselines in {ll} of {n} pairs (logit lens) and {ps} of {n} (patchscope); "
            f"steering raises similarity to the fine-tuning data in {gain} of {n}; delta-CE has the expected signs "
            f"(ft data up, unrelated down) in {ce} of {n}")


def write(rows: list[AdlRow], out: Path) -> dict[str, str]:
    """adl_table.{md,csv} and adl_headline.txt (figures: routing_suite.adl.plots); returns the texts written."""
    out.mkdir(parents=True, exist_ok=True)
    texts = {"adl_table.md": markdown_table(rows), "adl_table.csv": csv_table(rows), "adl_headline.txt": headline(rows) + "\n"}
    for name, content in texts.items():
        (out / name).write_text(content, encoding="utf-8")
    return texts
