"""The aggregator against synthetic run stores (tests/fake_stores.py): numbers, determinism, bad input, the CLI.

The numbers are checked against an independent computation here: outcomes read
straight from the stores with xarray, means and paired percentile bootstrap
intervals from a separate scipy call, not through routing_suite.aggregate.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import fake_stores as fake
import numpy as np
import pytest
import xarray as xr
from omegaconf import OmegaConf
from scipy import stats

from routing_suite import schema
from routing_suite.aggregate import run
from routing_suite.aggregate.config import AggregateConfig
from routing_suite.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CELL_COLUMNS = [
    "family", "behavior", "condition", "gap", "gap_lo", "gap_hi",
    "reduction", "reduction_lo", "reduction_hi", "n_prompts", "near_zero",
]  # fmt: skip
TABLES = ("cells.csv", "table.md", "table.csv", "table.tex", "headline.txt", "report.md")


def _cfg(root, out, **overrides):
    return OmegaConf.structured(AggregateConfig(root=str(root), out=str(out), **{"plots": False, **overrides}))


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "cells.csv", newline="") as f:
        return list(csv.DictReader(f))


def _float(text: str) -> float:
    return float(text) if text else math.nan


def _close(a: float, b: float, tol: float = 2e-6) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def _interval(samples, statistic, n_resamples=2000, seed=0):
    """The test's own paired percentile bootstrap: same seed and count as the aggregator's defaults."""
    res = stats.bootstrap(
        samples,
        statistic,
        n_resamples=n_resamples,
        confidence_level=0.95,
        method="percentile",
        paired=True,
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _gap(e, d, axis=-1):
    return np.mean(d, axis=axis) - np.mean(e, axis=axis)


def _reduction(eb, db, ec, dc, axis=-1):
    gb, gc = _gap(eb, db, axis), _gap(ec, dc, axis)
    return np.where(gb == 0, np.nan, (gb - gc) / np.where(gb == 0, 1, gb))


def _expected(path: Path) -> dict[str, dict[str, float]]:
    """Every cells.csv number of one store, recomputed from its per-prompt outcomes."""
    ds = xr.open_zarr(str(path), group="outcomes", consolidated=False)
    performed = ds["performed"].transpose("condition", "framing", "prompt")
    base = performed.sel(condition="baseline")
    eb, db = base.sel(framing="eval").values.astype(float), base.sel(framing="deploy").values.astype(float)
    gap_b = db.mean() - eb.mean()
    out = {}
    for condition in ds["condition"].values:
        kind = str(ds["kind"].sel(condition=condition).values)
        p = performed.sel(condition=condition)
        e, d = p.sel(framing="eval").values.astype(float), p.sel(framing="deploy").values.astype(float)
        gap = d.mean() - e.mean()
        lo, hi = _interval((e, d), _gap)
        row = {
            "gap": gap,
            "gap_lo": lo,
            "gap_hi": hi,
            "n_prompts": e.size,
            "deploy_rate": d.mean(),
            "eval_rate": e.mean(),
        }
        row["near_zero"] = abs(gap) < schema.NEAR_ZERO or lo <= 0 <= hi
        if kind == "baseline":
            row |= {"reduction": math.nan, "reduction_lo": math.nan, "reduction_hi": math.nan, "reduced": None}
        else:
            red = (gap_b - gap) / gap_b if gap_b != 0 else math.nan
            red_lo, red_hi = _interval((eb, db, e, d), _reduction)
            kept = db.mean() - d.mean() <= schema.MAX_DEPLOY_DROP + 1e-9
            row |= {"reduction": red, "reduction_lo": red_lo, "reduction_hi": red_hi, "reduced": red > 0 and kept}
        out[str(condition)] = row | {"kind": kind}
    return out


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grid")
    fake.write_grid(root)
    return root


@pytest.fixture(scope="module")
def grid_out(grid, tmp_path_factory) -> tuple[Path, dict, float]:
    """The 12-cell grid aggregated once, plots included, timed."""
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
    assert len(rows) == 12 * len(fake.CONDITIONS)
    assert result["n_cells"] == 12
    by_cell = {(r["family"], r["behavior"], r["condition"]): r for r in rows}
    for path in sorted(grid.rglob("*.zarr")):
        family, behavior = path.parent.parent.name.removesuffix("_organism"), path.parent.name
        for condition, want in _expected(path).items():
            got = by_cell[family, behavior, condition]
            for key in (
                "gap",
                "gap_lo",
                "gap_hi",
                "reduction",
                "reduction_lo",
                "reduction_hi",
                "deploy_rate",
                "eval_rate",
            ):
                assert _close(_float(got[key]), want[key]), (family, behavior, condition, key, got[key], want[key])
            assert int(got["n_prompts"]) == want["n_prompts"]
            assert got["near_zero"] == ("true" if want["near_zero"] else "false")
            assert got["kind"] == want["kind"]
            assert got["reduced"] == ("" if want["reduced"] is None else "true" if want["reduced"] else "false")


def test_headline_counts_the_intervention_rows(grid_out):
    out, result, _ = grid_out
    clamp = [r for r in _rows(out) if r["condition"] == "clamp"]
    reduced = [r for r in clamp if r["reduced"] == "true"]
    closed = [r for r in reduced if r["near_zero"] == "true"]
    means = {
        c: np.mean([_float(r["reduction"]) for r in _rows(out) if r["condition"] == c])
        for c in ("random", "orthogonal", "non_routing", "semantic")
    }
    pcts = ", ".join(f"{c.replace('_', '-')} {round(100 * m):.0f}%" for c, m in means.items())
    want = f"clamping reduces the gap in {len(reduced)} of 12 cells; {len(closed)} close to near zero; controls: {pcts} mean reduction"
    assert result["headline"] == want
    assert (out / "headline.txt").read_text() == want + "\n"


def test_wide_tables_and_plots_are_written(grid_out):
    out, _, _ = grid_out
    md = (out / "table.md").read_text().splitlines()
    assert len(md) == 2 + 12 and "clamp reduction" in md[0] and "semantic reduction" in md[0]
    with open(out / "table.csv", newline="") as f:
        wide = list(csv.DictReader(f))
    assert len(wide) == 12 and {"baseline_deploy_rate", "intervened_deploy_rate", "non_routing_reduction_lo"} <= set(
        wide[0]
    )
    tex = (out / "table.tex").read_text()
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
    assert r"\toprule" in tex and r"\bottomrule" in tex and tex.count("{") == tex.count("}")
    body = [line for line in tex.splitlines() if line.endswith(r"\\") and "multicolumn" not in line]
    assert {line.count("&") for line in body} == {13}  # every row has all 14 columns
    for stem in ("gaps", "patching", "patching_heads_deploy_to_eval", "probes"):
        assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        assert (out / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"


def test_same_inputs_give_byte_identical_outputs(grid, grid_out, tmp_path):
    out, _, _ = grid_out
    run(_cfg(grid, tmp_path, plots=True))
    for name in sorted(p.name for p in out.iterdir()):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def _messy(root: Path) -> dict[str, Path]:
    """A grid with every kind of bad input next to good cells."""
    paths = {}
    for family in ("llama", "qwen2"):
        for behavior in ("underperform", "refuse"):
            paths[f"{family}/{behavior}"] = fake.write_store(root, family, behavior)
    paths["partial"] = fake.write_store(root, "gemma2", "refuse", partial=True, complete=False)
    paths["complete_false"] = fake.write_store(root, "gemma2", "underperform", complete=False)
    paths["complete_absent"] = fake.write_store(root, "mistral", "refuse", complete=None)
    paths["old_schema"] = fake.write_store(root, "mistral", "underperform", schema_version=schema.SCHEMA_VERSION - 1)
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
    assert f"schema_version {schema.SCHEMA_VERSION - 1}" in report
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


def test_plots_without_fit_or_localize_are_skipped_with_a_note(tmp_path):
    for behavior in ("refuse", "installed"):
        fake.write_store(tmp_path / "stores", "llama", behavior, groups=("outcomes",))
    run(_cfg(tmp_path / "stores", tmp_path / "out", plots=True))
    assert (tmp_path / "out" / "gaps.png").exists() and (tmp_path / "out" / "gaps.pdf").exists()
    assert not (tmp_path / "out" / "patching.png").exists() and not (tmp_path / "out" / "probes.png").exists()
    report = (tmp_path / "out" / "report.md").read_text()
    assert "patching skipped: no store has localize/layer_effect" in report
    assert "probes skipped" in report


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


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.aggregate", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_entry_point_prints_the_headline(grid, tmp_path):
    result = _cli([f"root={grid}", f"out={tmp_path / 'tables'}", "plots=false"], tmp_path)
    assert result.returncode == 0, result.stderr
    headline = (tmp_path / "tables" / "headline.txt").read_text().strip()
    assert headline.startswith("clamping reduces the gap in ") and headline.endswith("mean reduction")
    assert headline in result.stdout.splitlines()


def test_entry_point_with_no_stores_gives_one_line_and_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _cli([f"root={tmp_path / 'empty'}"], tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: root=") and "holds no run stores" in lines[0], result.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.*"))
