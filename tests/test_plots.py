"""The aggregator's figures, checked where no eyes are needed: every text is drawn inside
the figure and overlaps no other text (titles, legends, tick labels at 30+ layers), at one
cell and on the 12-cell grid; the marks a reader needs are there (builds, planted layers,
the chosen window); per-head figures only with per-head data. Inputs: tests/fake_stores.py.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import fake_stores as fake
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from omegaconf import OmegaConf

from routing_suite.adl import plots as adl_plots
from routing_suite.aggregate import discover, pipeline
from routing_suite.aggregate.config import AggregateConfig
from routing_suite.aggregate.studies import load_studies
from routing_suite.em import plots as em_plots
from routing_suite.em.stats import Row
from routing_suite.em.tables import EmReport
from routing_suite.em.transfer_tables import DIRECTIONS, TransferReport
from routing_suite.organisms import sdf_task as S
from routing_suite.routing import summary

DEEP = 30  # layers of the deep stores: a real model's depth, where tick labels used to collide
PLANTED = [13, 14]


def _drawn_tick_labels(fig: Figure) -> tuple[set[Text], set[Text]]:
    """(tick labels matplotlib draws, every tick label): labels of ticks outside an axis'
    view interval, or of an axis turned off, keep stale positions but are never drawn."""
    drawn, every = set(), set()
    for ax in fig.get_axes():
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            eps = 1e-9 * max(1.0, hi - lo)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                labels = {tick.label1, tick.label2}
                every |= labels
                if ax.axison and lo - eps <= tick.get_loc() <= hi + eps:
                    drawn |= {t for t in labels if t.get_visible()}
    return drawn, every


def layout_problems(fig: Figure) -> list[str]:
    """Texts drawn (partly) outside the figure, and pairs of texts that overlap."""
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks, every_tick = _drawn_tick_labels(fig)

    def drawn(t: Text) -> bool:
        if t in every_tick:
            return t in ticks
        ax = t.axes
        return t.get_visible() and (ax is None or ax.axison or t in (ax.title, *ax.texts))

    texts = [(t, t.get_window_extent(renderer)) for t in fig.findobj(Text) if t.get_text().strip() and drawn(t)]
    box = fig.bbox
    problems = [f"clipped: {t.get_text()!r}" for t, e in texts
                if e.x0 < box.x0 - 1 or e.y0 < box.y0 - 1 or e.x1 > box.x1 + 1 or e.y1 > box.y1 + 1]
    for i, (a, ea) in enumerate(texts):
        for b, eb in texts[i + 1 :]:
            if not ea.overlaps(eb):
                continue
            if a in ticks and b in ticks and a.get_rotation() % 180 and b.get_rotation() % 180:
                # Slanted labels' boxes always overlap: their baselines must lie a line apart.
                if abs(ea.x0 - eb.x0) * math.sin(math.radians(a.get_rotation())) >= a.get_fontsize() * fig.dpi / 72:
                    continue
            problems.append(f"overlap: {a.get_text()!r} / {b.get_text()!r}")
    return problems


def _texts(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text)]



# ---------------------------------------------------------------- ADL


@pytest.fixture(scope="module")
def adl_rows(tmp_path_factory):
    """The 12-cell grid of ADL stores at 30 layers, 2 builds each, and one cell alone."""
    root = tmp_path_factory.mktemp("adl")
    for family in fake.FAMILIES:
        for behavior in fake.BEHAVIORS:
            for rep in ("0", "1"):
                fake.write_adl_store(root / "grid", family, behavior, n_layers=DEEP, replicate=rep)
    fake.write_adl_store(root / "one", "qwen2", "refuse", n_layers=DEEP)
    # Too many behaviours for a readable grid (SDF domains and their mixes): 15 pairs, one missing.
    for family in ("llama", "qwen2"):
        for behavior in S.SDF_KINDS[:8]:
            if (family, behavior) != ("qwen2", S.SDF_KINDS[7]):
                fake.write_adl_store(root / "wide", family, behavior, n_layers=DEEP)
    infos = {name: [discover.inspect_store(p) for p in discover.find_stores(str(root / name))]
             for name in ("grid", "one", "wide")}
    cfg = OmegaConf.structured(AggregateConfig(root=str(root), duplicates="exclude"))
    rows = {name: pipeline.collect_study(load_studies()["adl"], found, cfg) for name, found in infos.items()}
    assert not any(problems for _, problems in rows.values())
    return {name: r for name, (r, _) in rows.items()}


@pytest.mark.parametrize("make", [adl_plots.relevance_figure, adl_plots.steering_figure, adl_plots.delta_ce_figure])
@pytest.mark.parametrize("which", ["one", "grid", "wide"])
def test_adl_figures_draw_every_text_inside_and_apart(adl_rows, make, which):
    fig = make(adl_rows[which])
    assert layout_problems(fig) == []
    panels = [ax for ax in fig.get_axes() if ax.axison]
    assert len(panels) == {"one": 1, "grid": 12, "wide": 15}[which]  # no empty panels beside a single cell
    if which == "wide":  # the pairs present, at most MAX_GRID_COLUMNS across, each titled with its pair
        assert fig.get_size_inches()[0] <= adl_plots.MAX_GRID_COLUMNS * 3.1 + 1.0
        assert {ax.get_title() for ax in panels} == {f"{f} / {b}" for f in ("llama", "qwen2") for b in S.SDF_KINDS[:8]} - {
            f"qwen2 / {S.SDF_KINDS[7]}"}
    if which == "grid":
        assert any("mean over builds" in t for t in _texts(fig))


# ---------------------------------------------------------------- EM


def _em_report(family: str, n_layers: int, finetunes=("em_color_city", "em_animal_food")) -> EmReport:
    rep = EmReport(family, f"{family}.zarr", 1, 1)
    for i, a in enumerate(finetunes):
        for b in finetunes[i + 1 :]:
            rep.rows += [Row(family, "cosine", a, b, f"layer{layer}", 0.5 - layer / n_layers) for layer in range(n_layers)]
    return rep


def _transfer_report(donor: str, receiver: str, n_layers: int) -> TransferReport:
    rep = TransferReport(donor, receiver, f"{donor}-{receiver}.zarr", 1)
    for kind in ("em_color_city", "em_animal_food"):
        rep.rows += [Row(rep.pair, "ablation", kind, d, "reduction", 0.1 * i, 0.1 * i - 0.05, 0.1 * i + 0.05)
                     for i, d in enumerate(DIRECTIONS)]
    for layer in range(n_layers):
        rep.rows += [Row(rep.pair, "maps", receiver, f"layer{layer}", "r2", 0.6),
                     Row(rep.pair, "maps", receiver, f"layer{layer}", "r2_token_identity", 0.3)]
    return rep


@pytest.mark.parametrize("n_layers", [8, DEEP])
def test_em_figures_draw_every_text_inside_and_apart(n_layers):
    families = [_em_report(f, n_layers) for f in fake.FAMILIES]
    pairs = [_transfer_report("llama", "qwen2", n_layers), _transfer_report("qwen2", "llama", n_layers)]
    for fig in (em_plots.cosine_figure(families), em_plots.cosine_figure(families[:1]),
                em_plots.transfer_figure(pairs), em_plots.transfer_figure(pairs[:1]), em_plots.maps_figure(pairs),
                em_plots.builds_figure(pairs)):
        assert layout_problems(fig) == []
    transfer = em_plots.transfer_figure(pairs[:1])
    assert [t.get_text() for t in transfer.get_axes()[0].get_xticklabels()] == [d.replace("_", " ") for d in DIRECTIONS]


def test_one_builds_stores_made_two_ways_are_one_build_in_the_cosine_panel_and_two_methods_in_the_transfer_one():
    """A store of one build whose ablations were made another way (em.ablate_at) holds the same
    directions: the cosine panel still says one build; the transfer-over-builds figure gives
    the other method panels of their own, named so, every text inside and apart."""
    llama = _em_report("llama", 8)
    again = dataclasses.replace(llama, path="llama-decision.zarr", ablate_at="decision")
    fig = em_plots.cosine_figure([llama, again])
    assert [ax.get_title() for ax in fig.get_axes() if ax.get_title()] == ["llama"]
    # stores of one build with no direction to compare: told apart by their sampled rates
    samples = [Row("gemma2", "organisms", m, "general", "misaligned_rate", v, v - 0.02, v + 0.02) for m, v in (("base", 0.0), ("ft", 0.97))]
    nothing = [Row("gemma2", "cosine", "ft", "ft2", "layer0", math.nan)]
    gemma = [dataclasses.replace(llama, family="gemma2", path=f"g{i}.zarr", replicate=r, rows=samples + nothing)
             for i, r in enumerate(("0", "0", "1"))]
    assert em_plots._one_per_build(gemma) == [gemma[0], gemma[2]]  # seed 0 made two ways is one build; seed 1 another
    other = dataclasses.replace(gemma[1], rows=[dataclasses.replace(samples[1], value=0.5)] + nothing)
    assert em_plots._one_per_build([gemma[0], other]) == [gemma[0], other]  # other responses: not the same build
    # stores with neither directions nor rates are never taken for one build: nothing says they are
    blank = [dataclasses.replace(llama, path=f"{i}.zarr", rows=[dataclasses.replace(r, value=math.nan) for r in llama.rows]) for i in (1, 2)]
    assert em_plots._one_per_build(blank) == blank
    pairs = [_transfer_report("llama", "qwen2", 8), _transfer_report("llama", "qwen2", 8)]
    pairs[1] = dataclasses.replace(pairs[1], path="decision.zarr", ablate_at="decision")
    fig = em_plots.builds_figure(pairs)
    titles = [ax.get_title() for ax in fig.get_axes() if ax.get_title()]
    assert len(titles) == 4 and [t.split("\n")[1] for t in titles[2:]] == ["ablations (at the decision token only)"] * 2
    assert all(t.endswith("1 build; mapped specific in 0") for t in titles)
    assert layout_problems(fig) == []


def test_em_transfer_axis_stops_at_minus_100_percent_and_marks_what_goes_below():
    """A fine-tune that barely misbehaves has "reductions" of -8000% (a ratio of rates near 0):
    on the shared axis it flattened every other panel. The axis stops at -100%; a mark says a bar goes on."""
    pairs = [_transfer_report("llama", "qwen2", 8), _transfer_report("qwen2", "llama", 8)]
    fig = em_plots.transfer_figure(pairs)
    assert fig.get_axes()[0].get_ylim()[0] > -0.2 and "axis cut" not in fig.texts[0].get_text()
    pairs[1].rows = [dataclasses.replace(r, value=-80.0, lo=-120.0, hi=-40.0) if r.condition == "random" else r for r in pairs[1].rows]
    fig = em_plots.transfer_figure(pairs)
    low = fig.get_axes()[0].get_ylim()[0]
    assert em_plots.REDUCTION_FLOOR - 0.3 < low < em_plots.REDUCTION_FLOOR and "axis cut at -100%" in fig.texts[0].get_text()
    marks = [line for ax in fig.get_axes() for line in ax.get_lines() if line.get_marker() == "v"]
    assert len(marks) == 2 and all(len(m.get_xdata()) == 1 for m in marks)  # the random bar of each of qwen2->llama's panels
    assert layout_problems(fig) == []


def test_em_transfer_bars_that_broke_the_answers_are_hatched():
    """The table's `broken` column shows in the figure: those bars hatched, the title saying so."""
    pairs = [_transfer_report("llama", "qwen2", 8)]
    fig = em_plots.transfer_figure(pairs)
    assert all(not bar.get_hatch() for bar in fig.get_axes()[0].patches) and "hatched" not in fig.texts[0].get_text()
    pairs[0].rows.append(Row(pairs[0].pair, "ablation", "em_color_city", "random", "broken", 1.0))  # the first panel's
    fig = em_plots.transfer_figure(pairs)
    assert [bool(bar.get_hatch()) for bar in fig.get_axes()[0].patches] == [d == "random" for d in DIRECTIONS]
    assert not any(bar.get_hatch() for bar in fig.get_axes()[1].patches)
    assert "hatched: answers broken" in fig.texts[0].get_text() and layout_problems(fig) == []


def test_em_transfer_maps_pool_builds_of_a_receiver_and_keep_its_bases_apart():
    """Three builds of a receiver: one curve per donor (their mean) with a band, not three lines of
    one colour; a negative base's stores get a panel of their own."""
    reports = []
    for seed, base in (("0", "persona"), ("1", "persona"), ("2", "persona"), ("0", "persona_per_topic")):
        rep = _transfer_report("llama", "qwen2", 8)
        rep.path, rep.replicate, rep.pretraining = f"{seed}-{base}.zarr", seed, base
        rep.rows = [dataclasses.replace(r, value=r.value + 0.01 * int(seed)) for r in rep.rows]
        reports.append(rep)
    fig = em_plots.maps_figure(reports)
    axes = [ax for ax in fig.get_axes() if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["receiver qwen2 (3 builds)\npersona base", "receiver qwen2\npersona_per_topic base"]
    assert [len(ax.get_lines()) for ax in axes] == [2, 2]  # the donor's mean and token identity's
    assert [len(ax.collections) for ax in axes] == [2, 0]  # bands where there are several builds
    assert np.allclose(axes[0].get_lines()[0].get_ydata(), 0.61) and "band: lowest to highest" in fig.get_suptitle()
    assert layout_problems(fig) == []


def test_em_cosine_keeps_a_familys_bases_apart():
    """A persona base and its negative are different organisms: a panel each, never pooled."""
    reports = []
    for base in ("persona", "persona_per_topic"):
        for seed in ("0", "1"):
            rep = _em_report("llama", 8)
            rep.path, rep.pretraining, rep.replicate = f"llama-{base}-{seed}.zarr", base, seed
            reports.append(rep)
    fig = em_plots.cosine_figure(reports)
    titles = [ax.get_title() for ax in fig.get_axes() if ax.get_title()]
    assert titles == ["llama (2 builds)\npersona base", "llama (2 builds)\npersona_per_topic base"]
    assert layout_problems(fig) == []
    # A build whose fine-tunes have no directions (NaN cosines) draws nothing: the title says how many drew.
    reports[3].rows = [dataclasses.replace(r, value=float("nan")) if r.table == "cosine" else r for r in reports[3].rows]
    fig = em_plots.cosine_figure(reports)
    titles = [ax.get_title() for ax in fig.get_axes() if ax.get_title()]
    assert titles == ["llama (2 builds)\npersona base", "llama (2 builds)\npersona_per_topic base, 1 with directions"]
    assert layout_problems(fig) == []


def test_adl_and_em_figures_are_byte_deterministic(adl_rows, tmp_path):
    """The routing figures' bytes: test_aggregate.py; these are not written there."""
    from routing_suite.figures import save

    families = [_em_report(f, DEEP) for f in fake.FAMILIES]
    makers = {"adl": lambda: adl_plots.steering_figure(adl_rows["grid"]), "em": lambda: em_plots.cosine_figure(families)}
    for stem, make in makers.items():
        runs = []
        for attempt in ("a", "b"):
            (tmp_path / attempt).mkdir(exist_ok=True)
            runs.append([p.read_bytes() for p in save(make(), tmp_path / attempt, stem, 40)])
        assert runs[0] == runs[1], stem


# ---------------------------------------------------------------- routing


def _routing_figures(root: Path) -> tuple[dict[str, Figure], list[str]]:
    cfg = OmegaConf.structured(AggregateConfig(root=str(root), out=str(root / "unused"), n_resamples=50))
    found = pipeline.collect(cfg)
    cells = found.reports["routing"]
    grid = sorted({c.cell for c in cells} | {f.cell for f in found.findings if f.kind == discover.MISSING})
    return summary.figures(cells, grid)


def _legend(fig: Figure) -> list[str]:
    return [t.get_text() for lg in fig.legends for t in lg.get_texts()]


@pytest.fixture(scope="module")
def one_cell(tmp_path_factory) -> dict[str, Figure]:
    root = tmp_path_factory.mktemp("one")
    fake.write_store(root, "llama", "underperform", n_prompts=16, n_layers=8, planted=[3, 4])
    figures, notes = _routing_figures(root)
    assert not notes
    return figures


@pytest.fixture(scope="module")
def deep_grid(tmp_path_factory) -> dict[str, Figure]:
    """12 cells x 2 builds at 30 layers, the fine-tune planted in layers 13-14."""
    root = tmp_path_factory.mktemp("deep")
    fake.write_grid(root, n_prompts=16, replicates=("0", "1"), n_layers=DEEP, planted=PLANTED)
    figures, notes = _routing_figures(root)
    assert not notes
    return figures


STEMS = ("gaps", "patching", "patching_heads_deploy_to_eval", "patching_heads_finetuned_to_base", "probes")


@pytest.mark.parametrize("stem", STEMS)
def test_one_cell_figures_draw_every_text_inside_and_apart(one_cell, stem):
    assert layout_problems(one_cell[stem]) == []


@pytest.mark.parametrize("stem", STEMS)
def test_grid_figures_at_30_layers_draw_every_text_inside_and_apart(deep_grid, stem):
    assert layout_problems(deep_grid[stem]) == []


def test_bars_are_named_on_the_axis(one_cell):
    ax = one_cell["gaps"].get_axes()[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [c.replace("_", "-") for c in fake.CONDITIONS]


def test_per_layer_figures_say_they_pool_builds_and_mark_the_planted_layers(deep_grid, one_cell):
    for stem in ("patching", "patching_heads_deploy_to_eval", "probes"):
        texts = _texts(deep_grid[stem])
        assert any("mean over builds" in t for t in texts), stem
        assert sum("(2 builds)" in t for t in texts) >= 12, stem
        assert not any("builds" in t for t in _texts(one_cell[stem])), stem  # one build: nothing to pool
    for figures in (deep_grid, one_cell):
        legend = _legend(figures["patching"])
        assert "layers the fine-tune was planted in" in legend and "window the localization chose" in legend
    # Planted layers: hatched, one patch per run of consecutive layers, in every panel with data.
    hatched = [p for ax in deep_grid["patching"].get_axes() for p in ax.patches if p.get_hatch()]
    assert len(hatched) == 12 and all(p.get_width() == len(PLANTED) for p in hatched)
    assert all(p.get_x() == PLANTED[0] - 0.5 for p in hatched)


def test_layer_ticks_are_few_and_round_at_30_layers(deep_grid):
    ax = next(ax for ax in deep_grid["patching"].get_axes() if ax.images)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "5", "10", "15", "20", "25"]


def test_the_patching_mean_is_the_mean_over_builds(tmp_path):
    for rep in ("0", "1"):
        fake.write_store(tmp_path, "qwen2", "refuse", n_prompts=16, replicate=rep)
    figures, _ = _routing_figures(tmp_path)
    ax = next(ax for ax in figures["patching"].get_axes() if ax.images)
    want = np.mean([fake.localize_dataset("qwen2", "refuse", 0, rep)["layer_effect"].values for rep in ("0", "1")], axis=0)
    np.testing.assert_allclose(ax.images[0].get_array(), want, rtol=1e-6)


def test_no_per_head_figure_without_per_head_data(tmp_path):
    fake.write_store(tmp_path, "llama", "refuse", n_prompts=16, per_head=False)
    figures, notes = _routing_figures(tmp_path)
    assert set(figures) == {"gaps", "patching", "probes"}
    assert any(n.startswith("patching_heads skipped") and "per-head patching off" in n for n in notes)


def test_a_cell_without_per_head_data_says_so_in_its_panel(tmp_path):
    fake.write_store(tmp_path, "llama", "refuse", n_prompts=16, per_head=False)
    fake.write_store(tmp_path, "llama", "underperform", n_prompts=16)
    figures, _ = _routing_figures(tmp_path)
    assert any("per-head patching off" in t for t in _texts(figures["patching_heads_deploy_to_eval"]))
