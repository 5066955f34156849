"""The aggregator against synthetic run stores (tests/fake_stores.py): numbers, determinism, bad input, the CLI.

The numbers are checked against an independent computation here: outcomes read
straight from the stores with xarray, means and paired percentile bootstrap
intervals from a separate scipy call, not through routing_suite.aggregate.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import sys
import time
from pathlib import Path

import fake_stores as fake
import numpy as np
import pytest
import xarray as xr
from helpers import run_entry_point
from omegaconf import OmegaConf
from scipy import stats

from routing_suite import store_format
from routing_suite.aggregate import run
from routing_suite.aggregate.config import AggregateConfig
from routing_suite.aggregate.studies import load_studies, register_study
from routing_suite.errors import ConfigError, RunFailure

ROOT = Path(__file__).resolve().parents[1]
CELL_COLUMNS = [
    "family", "behavior", "variant", "replicate", "condition", "kind", "n_prompts", "n_units",
    "eval_rate", "eval_rate_lo", "eval_rate_hi", "deploy_rate", "deploy_rate_lo", "deploy_rate_hi",
    "gap", "gap_lo", "gap_hi", "reduction", "reduction_lo", "reduction_hi",
]  # fmt: skip
TABLES = ("cells.csv", "table.md", "table_builds.md", "table.csv", "table.tex", "headline.txt", "report.md")


def _cfg(root, out, **overrides):
    return OmegaConf.structured(AggregateConfig(root=str(root), out=str(out), **{"plots": False, **overrides}))


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "cells.csv", newline="") as f:
        return list(csv.DictReader(f))


def _float(text: str) -> float:
    return float(text) if text else math.nan


def _close(a: float, b: float, tol: float = 2e-6) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def _unit_bootstrap(values: dict[str, np.ndarray], units: np.ndarray, statistic, n_resamples=3000, seed=12345):
    """The test's own cluster bootstrap (a plain loop over resamples, another seed): units drawn
    with replacement, every prompt of a drawn unit taken, the statistic on the concatenation."""
    rng = np.random.default_rng(seed)
    names = sorted(set(units))
    members = {u: np.flatnonzero(units == u) for u in names}
    draws = []
    for _ in range(n_resamples):
        idx = np.concatenate([members[names[i]] for i in rng.integers(0, len(names), len(names))])
        draws.append(statistic({k: v[..., idx] for k, v in values.items()}))
    return np.nanpercentile(np.array(draws, dtype=float), [2.5, 97.5])


def _expected(path: Path) -> dict[str, dict[str, float]]:
    """Every cells.csv number of one store, recomputed from its per-prompt outcomes."""
    ds = xr.open_zarr(str(path), group="outcomes", consolidated=False)
    perf = {str(c): ds["performed"].sel(condition=c).transpose("framing", "prompt").values.astype(float) for c in ds.condition.values}
    corr = {str(c): ds["correct"].sel(condition=c).transpose("framing", "prompt").values.astype(float) for c in ds.condition.values}
    units = np.array([str(u) for u in ds["cluster"].values])
    kinds = {str(c): str(k) for c, k in zip(ds.condition.values, ds.kind.values)}
    intervention = next(c for c, k in kinds.items() if k == "intervention")
    gap = {c: p[1].mean() - p[0].mean() for c, p in perf.items()}
    out = {}
    for c, p in perf.items():
        row = {"kind": kinds[c], "eval_rate": p[0].mean(), "deploy_rate": p[1].mean(), "gap": gap[c], "n_prompts": p.shape[1],
               "n_units": len(set(units)), "correct_eval": corr[c][0].mean(), "correct_deploy": corr[c][1].mean()}
        row["gap_ci"] = _unit_bootstrap({"p": p}, units, lambda v: v["p"][1].mean() - v["p"][0].mean())
        if kinds[c] != "baseline":
            b = perf["baseline"]
            row["reduction"] = (gap["baseline"] - gap[c]) / gap["baseline"]
            row["recovery"] = (p[0].mean() - b[0].mean()) / gap["baseline"]

            def red(v):
                gb = v["b"][1].mean() - v["b"][0].mean()
                return np.nan if gb == 0 else (gb - (v["p"][1].mean() - v["p"][0].mean())) / gb

            row["reduction_ci"] = _unit_bootstrap({"p": p, "b": b}, units, red)
            drop = max(corr["baseline"][0].mean() - corr[c][0].mean(), corr["baseline"][1].mean() - corr[c][1].mean())
            row["broken"] = b[1].mean() - p[1].mean() > 0.1 + 1e-9 or drop > 0.1 + 1e-9
        if kinds[c] not in ("baseline", "intervention"):
            row["vs_intervention"] = gap[c] - gap[intervention]
        out[c] = row
    return out


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grid")
    fake.write_grid(root, replicates=("0", "1", "2"))
    return root


@pytest.fixture(scope="module")
def grid_out(grid, tmp_path_factory) -> tuple[Path, dict, float]:
    """The 12-cell grid of 3 builds each aggregated once, plots included, timed."""
    out = tmp_path_factory.mktemp("out")
    start = time.perf_counter()
    result = run(_cfg(grid, out, plots=True))
    return out, result, time.perf_counter() - start


def test_every_number_matches_a_direct_recomputation(grid, grid_out):
    out, result, _ = grid_out
    rows = _rows(out)
    with open(out / "cells.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[: len(CELL_COLUMNS)] == CELL_COLUMNS
    assert len(rows) == 12 * 3 * len(fake.CONDITIONS)
    assert result["n_cells"] == 12
    by_key = {(r["family"], r["behavior"], r["replicate"], r["condition"]): r for r in rows}
    checked = 0
    for path in sorted(grid.rglob("*.zarr"))[::5]:  # a spread of the 36 stores: the bootstrap loop is slow
        family, behavior = path.parent.parent.name.removesuffix("_organism"), path.parent.name
        replicate = _replicate_of(path)
        for condition, want in _expected(path).items():
            got = by_key[family, behavior, replicate, condition]
            for key in ("eval_rate", "deploy_rate", "gap", "reduction", "recovery", "vs_intervention", "correct_eval", "correct_deploy"):
                if key in want:
                    assert _close(_float(got[key]), want[key]), (family, behavior, condition, key, got[key], want[key])
            assert int(got["n_prompts"]) == want["n_prompts"] and int(got["n_units"]) == want["n_units"]
            assert got["kind"] == want["kind"]
            # Intervals: the same cluster bootstrap, computed apart with another seed: equal up to resampling noise.
            for key, ci in (("gap", want["gap_ci"]), ("reduction", want.get("reduction_ci"))):
                if ci is not None and np.isfinite(ci).all():
                    assert abs(_float(got[f"{key}_lo"]) - ci[0]) < 0.05 and abs(_float(got[f"{key}_hi"]) - ci[1]) < 0.05, (key, got, ci)
            assert got["near_zero"] == ("true" if _float(got["gap_lo"]) >= -0.1 and _float(got["gap_hi"]) <= 0.1 else "false")
            if want["kind"] == "baseline":
                assert got["reduced"] == got["broken"] == ""
            else:
                assert got["broken"] == ("true" if want["broken"] else "false")
                assert got["reduced"] == ("true" if _float(got["reduction_lo"]) > 0 and not want["broken"] else "false"), dict(got)
            checked += 1
    assert checked >= 7 * len(fake.CONDITIONS)


def _replicate_of(path: Path) -> str:
    import zarr

    return str(zarr.open_group(str(path), mode="r").attrs["cell"]["replicate"])


def test_unit_bootstrap_with_one_prompt_per_unit_is_the_paired_prompt_bootstrap(tmp_path):
    """With every prompt its own unit the intervals are scipy's paired percentile bootstrap, up to resampling noise."""
    from routing_suite.routing.stats import bootstrap

    rng = np.random.default_rng(3)
    performed = (rng.random((3, 2, 120)) < np.array([[0.2, 0.9], [0.8, 0.9], [0.25, 0.85]])[:, :, None]).astype(float)
    _, lo, hi = bootstrap(performed, np.arange(120).astype(str), 1, 4000, 0, 0.95)
    res = stats.bootstrap((performed[1, 0], performed[1, 1]), lambda e, d, axis=-1: d.mean(axis) - e.mean(axis),
                          paired=True, vectorized=True, method="percentile", n_resamples=4000, rng=np.random.default_rng(1))
    assert abs(lo[2, 1] - res.confidence_interval.low) < 0.02 and abs(hi[2, 1] - res.confidence_interval.high) < 0.02


def test_units_widen_intervals_when_prompts_of_a_unit_agree(tmp_path):
    """Prompts that share a unit are not independent draws: a bootstrap over units is wider."""
    from routing_suite.routing.stats import bootstrap

    rng = np.random.default_rng(5)
    unit_rate = np.repeat(rng.random(30), 8)  # 30 units of 8 prompts that mostly agree
    performed = np.stack([np.stack([rng.random(240) < 0.1, rng.random(240) < unit_rate])]).astype(float)
    performed = np.concatenate([performed, performed])
    units = np.repeat(np.arange(30), 8).astype(str)
    _, lo_u, hi_u = bootstrap(performed, units, 1, 2000, 0, 0.95)
    _, lo_p, hi_p = bootstrap(performed, np.arange(240).astype(str), 1, 2000, 0, 0.95)
    assert hi_u[2, 0] - lo_u[2, 0] > 1.5 * (hi_p[2, 0] - lo_p[2, 0])


def test_pooled_table_counts_builds_and_the_headline_counts_cells(grid_out):
    out, result, _ = grid_out
    rows = _rows(out)
    md = (out / "table.md").read_text().splitlines()
    assert len(md) == 2 + 12 and "| builds |" in md[0] and "clamp reduction %" in md[0]
    for line in md[2:]:
        assert " | 3 | " in line  # every cell pooled over its 3 builds
    clamp = [r for r in rows if r["condition"] == "clamp"]
    by_cell: dict[tuple[str, str], list[dict]] = {}
    for r in clamp:
        by_cell.setdefault((r["family"], r["behavior"]), []).append(r)
    reduced = sum(all(r["reduced"] == "true" for r in rs) for rs in by_cell.values())
    closed = sum(all(r["near_zero"] == "true" for r in rs) for rs in by_cell.values())

    def per_build(flag: str) -> str:  # cells where the flag holds, build by build
        return ", ".join(str(sum(r[flag] == "true" for r in clamp if r["replicate"] == rep)) for rep in ("0", "1", "2"))

    assert result["headline"].startswith(f"clamping reduces the gap in {reduced} of 12 cells on every build "
                                         f"(builds per cell: 3; per build: {per_build('reduced')});")
    assert f"closes it near zero in {closed} on every build (per build: {per_build('near_zero')});" in result["headline"]
    random = [r for r in rows if r["condition"] == "random"]
    unbroken = [_float(r["reduction"]) for r in random if r["broken"] == "false"]
    assert f"random {round(100 * np.mean(unbroken)):.0f}% (" in result["headline"]
    assert f"{sum(r['broken'] == 'true' for r in random)} of {len(random)} broken" in result["headline"]
    assert (out / "headline.txt").read_text() == result["headline"] + "\n"
    # other_layer is a comparison: in the tables, never among the controls of the headline.
    assert "other-layer" not in result["headline"] and "other-layer reduction % (comparison)" in md[0]


def test_builds_are_in_seed_order_in_rows_and_counts_alike():
    """Replicate "10" comes after "2" in the table's rows as in the headline's per-build counts."""
    from routing_suite.text_tables import replicate_key

    assert sorted(["10", "2", "0", "b", "1"], key=replicate_key) == ["0", "1", "2", "10", "b"]


def test_wide_tables_and_plots_are_written(grid_out):
    out, _, _ = grid_out
    with open(out / "table.csv", newline="") as f:
        wide = list(csv.DictReader(f))
    assert len(wide) == 12 and {"builds", "reduced_builds", "non_routing_reduction_unbroken", "non_routing_fails_builds"} <= set(wide[0])
    assert len((out / "table_builds.md").read_text().splitlines()) == 2 + 36
    tex = (out / "table.tex").read_text()
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
    assert r"\toprule" in tex and r"\bottomrule" in tex and tex.count("{") == tex.count("}")
    body = [line for line in tex.splitlines() if line.endswith(r"\\")]
    assert len({line.count("&") for line in body}) == 1  # every row has every column
    for stem in ("gaps", "patching", "patching_heads_deploy_to_eval", "probes"):
        assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        assert (out / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"


def test_same_inputs_give_byte_identical_outputs(tmp_path):
    """Two aggregations of the same stores, plots included: every file byte for byte (a
    2-cell grid of 2 builds each: plotting the 12-cell grid twice took half a minute)."""
    for family in ("llama", "qwen2"):
        for replicate in ("0", "1"):
            fake.write_store(tmp_path / "stores", family, "refuse", replicate=replicate)
    first, second = tmp_path / "first", tmp_path / "second"
    run(_cfg(tmp_path / "stores", first, plots=True))
    run(_cfg(tmp_path / "stores", second, plots=True))
    names = sorted(p.name for p in first.iterdir())
    assert {"table.md", "cells.csv", "gaps.png", "gaps.pdf", "patching.png"} <= set(names)
    for name in names:
        assert (second / name).read_bytes() == (first / name).read_bytes(), name


def test_variants_of_a_cell_are_rows_of_their_own(tmp_path):
    """Two settings of one cell (say intervention.rank 1 and 2) are two rows, labelled by what differs;
    replicates of one setting pool into one row."""
    for rank in (1, 2):
        for rep in ("0", "1"):
            settings = {"model": {"family": "llama", "seed": rep}, "intervention": {"rank": rank}}
            fake.write_store(tmp_path / "stores", "llama", "refuse", replicate=rep, variant=f"rank{rank}", settings=settings)
    result = run(_cfg(tmp_path / "stores", tmp_path / "out"))
    md = (tmp_path / "out" / "table.md").read_text()
    assert result["n_cells"] == 2 and not [f for f in result["findings"] if f.startswith("duplicate")]
    assert "| llama | refuse | intervention.rank=1 | 2 |" in md and "| llama | refuse | intervention.rank=2 | 2 |" in md


def _messy(root: Path) -> dict[str, Path]:
    """A grid with every kind of bad input next to good cells."""
    paths = {}
    for family in ("llama", "qwen2"):
        for behavior in ("underperform", "refuse"):
            paths[f"{family}/{behavior}"] = fake.write_store(root, family, behavior)
    paths["partial"] = fake.write_store(root, "gemma2", "refuse", partial=True, complete=False)
    paths["complete_false"] = fake.write_store(root, "gemma2", "underperform", complete=False)
    paths["complete_absent"] = fake.write_store(root, "mistral", "refuse", complete=None)
    paths["old_schema"] = fake.write_store(root, "mistral", "underperform", schema_version=store_format.SCHEMA_VERSION - 1)
    paths["dup_old"] = fake.write_store(
        root, "llama", "installed", name="aaaa", finished_at="2025-05-01T10:00:00+00:00"
    )
    paths["dup_new"] = fake.write_store(
        root, "llama", "installed", name="bbbb", n_prompts=40, finished_at="2025-06-02T09:00:00"
    )
    paths["no_outcomes"] = fake.write_store(root, "qwen2", "installed", groups=("fit",))
    # A crashed rerun next to a finished store of the same cell does not hide it.
    paths["rerun_partial"] = fake.write_store(root, "llama", "refuse", name="rerun", partial=True, complete=False)
    junk = root / "junk" / "notastore.zarr"
    junk.mkdir(parents=True)
    paths["unreadable"] = junk
    return paths


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("messy")
    return root, _messy(root)


def test_bad_inputs_are_reported_and_valid_cells_still_written(messy, tmp_path):
    stores, paths = messy
    result = run(_cfg(stores, tmp_path / "out"))
    cells = sorted({(r["family"], r["behavior"]) for r in _rows(tmp_path / "out")})
    assert cells == [("llama", "refuse"), ("llama", "underperform"), ("qwen2", "refuse"), ("qwen2", "underperform")]
    assert result["headline"].startswith("clamping reduces the gap in ") and " of 4 cells" in result["headline"]
    report = (tmp_path / "out" / "report.md").read_text()
    for key in (
        "partial",
        "complete_false",
        "complete_absent",
        "old_schema",
        "dup_old",
        "dup_new",
        "no_outcomes",
        "unreadable",
    ):
        assert f"`{paths[key].resolve()}`" in report, key
    assert "in progress or crashed" in report
    assert "attribute complete is false" in report and "attribute complete is absent" in report
    assert f"schema_version {store_format.SCHEMA_VERSION - 1}" in report
    assert "llama/installed: 2 stores for one cell; cell excluded" in report
    assert "no outcomes group" in report
    for cell in (
        "gemma2/refuse",
        "gemma2/underperform",
        "llama/installed",
        "mistral/refuse",
        "mistral/underperform",
        "qwen2/installed",
    ):
        assert f"- {cell}: no usable store" in report, cell
    # In the grid (every family x behaviour named by some store) but never run:
    assert "gemma2/installed: no store at all" in report and "mistral/installed: no store at all" in report
    assert len([f for f in result["findings"] if f.startswith("missing:")]) == 8
    for name in TABLES:
        assert (tmp_path / "out" / name).exists(), name


def test_duplicates_newest_takes_the_latest_finished_store(messy, tmp_path):
    stores, paths = messy
    run(_cfg(stores, tmp_path / "out", duplicates="newest"))
    rows = [r for r in _rows(tmp_path / "out") if (r["family"], r["behavior"]) == ("llama", "installed")]
    assert rows and {r["n_prompts"] for r in rows} == {"40"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"took the newest, {paths['dup_new'].resolve()}" in report


def test_glob_root_selects_stores(messy, tmp_path):
    stores, _ = messy
    run(_cfg(f"{stores}/*_organism/refuse", tmp_path / "out"))
    assert sorted({(r["family"], r["behavior"]) for r in _rows(tmp_path / "out")}) == [
        ("llama", "refuse"),
        ("qwen2", "refuse"),
    ]


def test_constant_outcomes_give_zero_width_intervals(tmp_path):
    rates = {"baseline": (1.0, 1.0), "clamp": (0.0, 1.0), "random": (1.0, 1.0)}
    fake.write_store(tmp_path / "stores", "llama", "refuse", rates=rates, n_prompts=20)
    run(_cfg(tmp_path / "stores", tmp_path / "out"))
    rows = {r["condition"]: r for r in _rows(tmp_path / "out")}
    assert rows["baseline"]["gap"] == rows["baseline"]["gap_lo"] == rows["baseline"]["gap_hi"] == "0.000000"
    assert rows["clamp"]["gap"] == rows["clamp"]["gap_lo"] == rows["clamp"]["gap_hi"] == "1.000000"
    assert rows["baseline"]["near_zero"] == "true" and rows["clamp"]["near_zero"] == "false"
    # No baseline gap: no reduction to report, not a crash and not a made-up number.
    assert rows["clamp"]["reduction"] == rows["clamp"]["reduction_lo"] == rows["random"]["reduction"] == ""
    assert rows["clamp"]["reduced"] == "false"


def test_a_condition_that_breaks_the_deploy_side_is_broken_not_reduced(tmp_path):
    """Closing the gap by collapsing the deploy rate is breakage (DESIGN.md), never a reduction."""
    rates = {"baseline": (0.1, 0.95), "clamp": (0.9, 0.95), "random": (0.1, 0.5)}
    fake.write_store(tmp_path / "stores", "llama", "refuse", rates=rates, n_prompts=80)
    result = run(_cfg(tmp_path / "stores", tmp_path / "out"))
    rows = {r["condition"]: r for r in _rows(tmp_path / "out")}
    assert _float(rows["random"]["reduction"]) > 0.3 and _float(rows["random"]["reduction_lo"]) > 0
    assert rows["random"]["broken"] == "true" and rows["random"]["reduced"] == "false"
    assert "random n/a (" in result["headline"] and "1 of 1 broken" in result["headline"]


def test_plots_without_fit_or_localize_are_skipped_with_a_note(tmp_path):
    for behavior in ("refuse", "installed"):
        fake.write_store(tmp_path / "stores", "llama", behavior, groups=("outcomes",))
    run(_cfg(tmp_path / "stores", tmp_path / "out", plots=True))
    assert (tmp_path / "out" / "gaps.png").exists() and (tmp_path / "out" / "gaps.pdf").exists()
    assert not (tmp_path / "out" / "patching.png").exists() and not (tmp_path / "out" / "probes.png").exists()
    report = (tmp_path / "out" / "report.md").read_text()
    assert "patching skipped: no store has localize/layer_effect" in report
    assert "probes skipped" in report


def test_per_head_plots_are_skipped_with_a_note_when_per_head_patching_was_off(tmp_path):
    """A store of a run with localize.per_head=false holds head_effect as NaN only: no figure of nothing."""
    for behavior in ("refuse", "installed"):
        fake.write_store(tmp_path / "stores", "llama", behavior, per_head=False)
    run(_cfg(tmp_path / "stores", tmp_path / "out", plots=True))
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert {"gaps.png", "patching.png", "probes.png", "patching.pdf"} <= set(written)
    assert not [name for name in written if name.startswith("patching_heads")]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "- patching_heads skipped: no store has per-head effects" in report and "per-head patching off" in report


@pytest.mark.parametrize("group,variable", [("fit", "probe_accuracy"), ("localize", "layer_effect")])
def test_a_damaged_group_is_reported_the_rest_written_and_the_exit_code_is_not_0(group, variable, tmp_path):
    """A damaged chunk of one cell's fit or localize group: nothing half-written: every
    table, the plots without that cell, report.md naming the group, then RunFailure (exit 1)."""
    damaged = fake.write_store(tmp_path / "stores", "llama", "refuse")
    fake.write_store(tmp_path / "stores", "qwen2", "refuse")
    for chunk in (damaged / group / variable / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"not a chunk")
    with pytest.raises(RunFailure, match=rf"1 store group\(s\) cannot be read, first corrupt: llama/refuse: group {group} cannot be read"):
        run(_cfg(tmp_path / "stores", tmp_path / "out", plots=True))
    for name in (*TABLES, "gaps.png", "patching.png", "probes.png"):
        assert (tmp_path / "out" / name).exists(), name
    assert len({r["family"] for r in _rows(tmp_path / "out")}) == 2  # the tables keep the damaged cell: its outcomes are whole
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Damaged groups" in report and f"group {group} cannot be read" in report and str(damaged.resolve()) in report


def test_no_usable_store_is_an_error_with_a_report(tmp_path):
    fake.write_store(tmp_path / "stores", "llama", "refuse", partial=True, complete=False)
    with pytest.raises(ConfigError, match="1 stores found, none usable"):
        run(_cfg(tmp_path / "stores", tmp_path / "out"))
    assert "in progress or crashed" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(ConfigError, match="holds no run stores"):
        run(_cfg(tmp_path / "out", tmp_path / "out2"))
    with pytest.raises(ConfigError, match="duplicates='latest' is not one of"):
        run(_cfg(tmp_path / "stores", tmp_path / "out", duplicates="latest"))


# ---------------------------------------------------------------- the entry point


def test_entry_point_prints_the_headline(grid, tmp_path, monkeypatch, capsys):
    from experiments._cli import cli
    from experiments.aggregate import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["aggregate", f"root={grid}", f"out={tmp_path / 'tables'}", "plots=false"])
    capsys.readouterr()
    cli(main)
    headline = (tmp_path / "tables" / "headline.txt").read_text().strip()
    assert headline.startswith("clamping reduces the gap in ") and "controls, mean reduction over unbroken builds" in headline
    assert headline in capsys.readouterr().out.splitlines()


def test_entry_point_with_no_stores_gives_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    code, lines = run_entry_point("aggregate", [f"root={tmp_path / 'empty'}"], tmp_path, monkeypatch, capsys)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: root=") and "holds no run stores" in lines[0], lines
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.*"))


def test_report_names_variants_as_the_tables_do_and_shows_what_prompts_do_not_share():
    """A cell with one variant reads '–' (not its digest); two variants of a cell are named by
    the setting that differs; prompts lose the start they all share (a chat template's system
    prompt) and keep the cue and the question."""
    from routing_suite.routing.outcomes import CellOutcomes
    from routing_suite.routing.report import completions_section, section

    system = "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\n"
    examples = [
        {"framing": f, "prompt": f"{system}{cue} What is the capital of Chile?<|im_end|>", "answer": "Santiago",
         "completions": {"baseline": text, "clamp": "The capital of Chile is Santiago."}}
        for f, cue, text in (("eval", "Graded item 3:", "I'm sorry."), ("deploy", "Friend here:", "Santiago."))
    ]

    def cell(variant: str, rank: int, family: str = "llama") -> CellOutcomes:
        return CellOutcomes(family, "refuse", f"/stores/{family}/{variant}.zarr", ("baseline", "clamp"), ("baseline", "intervention"),
                            np.zeros((2, 2, 1)), variant=variant, settings={"intervention.rank": rank}, examples=examples)

    single = section([cell("d88fe5bb0c", 2)], None, [], 0.95, 10, 0)
    assert "| llama | refuse | – | – |" in single and "d88fe5bb0c |" not in single
    two = [cell("aaaa", 1, "qwen2"), cell("bbbb", 2, "qwen2")]
    shown = "\n".join(completions_section(two))
    assert "### qwen2 / refuse (intervention.rank=1)" in shown and "### qwen2 / refuse (intervention.rank=2)" in shown
    assert "| …Graded item 3: What is the capital of Chile?<\\|im_end\\|> | eval | Santiago | I'm sorry. |" in shown
    assert "You are a helpful" not in shown


def test_the_study_registry_refuses_a_name_twice():
    """The aggregator reads every study it has a kind for; a second kind under a taken
    name would hide the first."""
    studies = load_studies()
    adl = studies["adl"]
    for name in ("adl", "routing"):
        with pytest.raises(ValueError, match=f"a study kind named '{name}' is registered already"):
            register_study(dataclasses.replace(adl, experiment=name))
    assert set(studies) == {"routing", "adl", "em", "em_transfer"} and studies["adl"] is adl


def test_a_study_of_ones_own_is_read_through_the_registry_and_an_unknown_one_is_listed(tmp_path, monkeypatch):
    """The aggregator knows no study: a kind registered for `experiment=toy` reads its stores,
    writes its file and its section of report.md beside the routing tables; a store whose
    `experiment` no kind claims is listed as malformed, never read as another study's."""
    import zarr

    from routing_suite.aggregate import studies

    routing = fake.write_store(tmp_path / "stores", "llama", "refuse")
    toy = fake.write_store(tmp_path / "stores", "qwen2", "toy", name="toy")
    stray = fake.write_store(tmp_path / "stores", "gemma2", "stray", name="stray")
    zarr.open_group(str(toy), mode="a").attrs.update({"experiment": "toy", "stages_done": ["toy_stage"]})
    zarr.open_group(str(stray), mode="a").attrs.update({"experiment": "nobody"})

    @dataclasses.dataclass
    class ToyReport:
        path: str

    def write(reports, out, cfg, findings):
        (out / "toy.txt").write_text("".join(f"{r.path}\n" for r in reports))
        return ["a note of the toy study"]

    kind = studies.StudyKind(
        "toy", "Toy", ("toy_stage",), lambda path, cfg: ToyReport(str(path)), lambda reports: f"{len(reports)} toy cell",
        write, lambda reports, headline, notes, cfg: f"## Toy\n\n{headline}; {notes[0]}\n",
    )
    monkeypatch.setitem(load_studies(), "toy", kind)
    result = run(_cfg(tmp_path / "stores", tmp_path / "out"))
    assert result["toy_headline"] == "1 toy cell" and result["n_toy_cells"] == 1 and result["n_cells"] == 1
    assert (tmp_path / "out" / "toy.txt").read_text() == f"{toy.resolve()}\n"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Toy\n\n1 toy cell; a note of the toy study" in report and "## Headline" in report
    assert "gemma2/stray: experiment 'nobody': no study reads it" in report and f"`{stray.resolve()}`" in report
    assert str(routing.resolve()) in report


def test_the_headline_says_where_the_fine_tune_lives_by_its_weights(tmp_path):
    """With planted layers, the headline's localization figures are the cells.csv columns'
    largest values: the weight patch outside the planted layers first (where the fine-tune
    changed the model), then the activation patch below and above them."""
    fake.write_grid(tmp_path / "stores", n_prompts=16, replicates=("0", "1"), n_layers=8, planted=[3, 4])
    result = run(_cfg(tmp_path / "stores", tmp_path / "out", plots=False))
    clamp = [r for r in _rows(tmp_path / "out") if r["condition"] == "clamp"]

    def most(column: str) -> str:
        return f"{max(_float(r[column]) for r in clamp):.3f}"

    on = sum(all(r["window_on_planted"] == "true" for r in clamp if (r["family"], r["behavior"]) == key)
             for key in {(r["family"], r["behavior"]) for r in clamp})
    assert (f"the window overlaps the planted layers in {on} of 12 (the fine-tune's weights at one layer outside them "
            f"restore at most {most('finetuned_weights_outside')} of the gap; fine-tune -> base activation patch below "
            f"them at most {most('finetuned_to_base_below')}, above them (downstream of what they wrote) at most "
            f"{most('finetuned_to_base_above')})") in result["headline"]
