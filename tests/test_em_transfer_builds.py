"""The EM transfer over builds (`em.transfer_builds`): counts of the receiver fine-tunes a mapped direction moves."""

from __future__ import annotations

from routing_suite.em import transfer_builds as XB
from routing_suite.em.settings import TRANSFER_CONTROLS
from routing_suite.em.stats import Row
from routing_suite.em.transfer_tables import DIRECTIONS, TransferReport


def _edit(rep: TransferReport, kind: str, table: str, mapped: tuple[float, float], broken: bool = False,
          beaten: tuple[str, ...] = TRANSFER_CONTROLS) -> None:
    """One edit's rows as `transfer_tables` writes them: the mapped reduction (value, lower bound),
    whether it broke the answers, and which controls it beats; the other directions reduce by 10%."""
    for name in DIRECTIONS:
        value, lo = mapped if name == "mapped" else (0.1, -0.1)
        rep.rows += [Row(rep.pair, table, kind, name, "reduction", value, lo, value + 0.2),
                     Row(rep.pair, table, kind, name, "broken", float(broken and name == "mapped"))]
        if name in TRANSFER_CONTROLS:
            rep.rows.append(Row(rep.pair, table, kind, name, "beaten_by_mapped", float(name in beaten)))


def _store(donor: str, receiver: str, seed: str, pretraining: str = "persona", em: float = 0.5) -> TransferReport:
    rep = TransferReport(donor, receiver, f"{donor}-{receiver}-{pretraining}-{seed}.zarr", 4, variant="v1", replicate=seed,
                         pretraining=pretraining)
    for kind in ("minimal", "wide"):
        rep.rows.append(Row(rep.pair, "ablation", kind, "baseline", "misaligned_rate", em, em - 0.05, em + 0.05))
    return rep


def test_counts_go_per_base_and_build_over_the_fine_tunes_with_em():
    a = _store("gemma2", "llama", "0")
    _edit(a, "minimal", "clamp", (0.7, 0.5))  # lowers, >= 60%, beats every control: specific
    _edit(a, "minimal", "ablation", (0.3, 0.1), beaten=("random",))  # lowers, not specific
    _edit(a, "wide", "clamp", (0.8, 0.6), broken=True)  # broke the answers: does not lower
    _edit(a, "wide", "ablation", (0.2, -0.1))  # its interval reaches 0
    quiet = _store("qwen2", "llama", "0", em=0.05)  # no EM to remove: counted as a fine-tune only
    for kind in ("minimal", "wide"):
        _edit(quiet, kind, "clamp", (0.9, 0.8))
        _edit(quiet, kind, "ablation", (0.9, 0.8))
    b = _store("gemma2", "llama", "1")
    for kind in ("minimal", "wide"):
        _edit(b, kind, "ablation", (0.65, 0.2))  # a store of before the clamp: no clamp rows
    negative = _store("gemma2", "llama", "10", "persona_per_topic")
    for kind in ("minimal", "wide"):
        _edit(negative, kind, "clamp", (0.4, 0.2))
        _edit(negative, kind, "ablation", (0.0, -0.2))

    counts = XB.counts([negative, b, quiet, a])
    # each base's builds in seed order ("10" after "1"), then all of them
    assert list(counts) == [("persona", "0"), ("persona", "1"), ("persona", XB.ALL_BUILDS),
                            ("persona_per_topic", "10"), ("persona_per_topic", XB.ALL_BUILDS)]
    seed0 = counts["persona", "0"]
    assert seed0["receiver fine-tunes with EM >= 10%"].text == "2 of 4"
    assert seed0["decision clamp: mapped lowers EM, intact"].text == "1 of 2"
    assert seed0["decision clamp: mapped >= 60%, intact"].text == "1 of 2"
    assert seed0["decision clamp: mapped specific"].text == "1 of 2"
    assert seed0["ablation: mapped lowers EM, intact"].text == "1 of 2"
    assert seed0["ablation: mapped >= 60%, intact"].text == "0 of 2"
    assert seed0["ablation: mapped specific"].text == "0 of 2"
    both = counts["persona", XB.ALL_BUILDS]
    assert both["receiver fine-tunes with EM >= 10%"].text == "4 of 6"
    assert both["ablation: mapped >= 60%, intact"].text == "2 of 4"
    assert both["decision clamp: mapped specific"].text == "1 of 2"  # seed 1's store has no clamp
    assert "decision clamp: mapped specific" not in counts["persona", "1"]
    assert counts["persona_per_topic", "10"]["decision clamp: mapped specific"].text == "2 of 2"

    rows = XB.specific_rows([negative, b, quiet, a])
    # quiet's edits are specific in form but it has no EM to remove
    assert [r[:5] for r in rows] == [["gemma2->llama persona seed 0", "minimal", "50", "decision clamp", "70%"],
                                     ["gemma2->llama persona seed 1", "minimal", "50", "ablation", "65%"],
                                     ["gemma2->llama persona seed 1", "wide", "50", "ablation", "65%"],
                                     ["gemma2->llama persona_per_topic seed 10", "minimal", "50", "decision clamp", "40%"],
                                     ["gemma2->llama persona_per_topic seed 10", "wide", "50", "decision clamp", "40%"]]
    assert rows[0][6] == "random 10%, orthogonal 10%, wrong-layer 10%, wrong-source 10%"

    md = XB.markdown([negative, b, quiet, a])
    assert "| persona | 1 | 2 of 2 | 2 of 2 | 2 of 2 | 2 of 2 | – | – | – |" in md
    csv = XB.csv_counts([a])
    assert csv.splitlines()[0] == "base,build,figure,met,of"
    assert "persona,0,decision clamp: mapped specific,1,2" in csv.splitlines()


def test_no_specific_transfer_says_so():
    a = _store("gemma2", "llama", "0")
    for kind in ("minimal", "wide"):
        _edit(a, kind, "clamp", (0.3, -0.1))
        _edit(a, kind, "ablation", (0.3, -0.1))
    md = XB.markdown([a])
    assert md.endswith("## Specific transfers (reduction of the misaligned rate)\nNone.\n")
    assert "| persona | 0 | 2 of 2 | 0 of 2 | 0 of 2 | 0 of 2 | 0 of 2 | 0 of 2 | 0 of 2 |" in md


def test_the_builds_figure_has_a_panel_per_base_and_edit():
    from routing_suite.em import plots

    a, quiet = _store("gemma2", "llama", "0"), _store("qwen2", "llama", "0", em=0.05)
    negative = _store("gemma2", "llama", "1", "persona_per_topic")
    for rep in (a, quiet, negative):
        for kind in ("minimal", "wide"):
            _edit(rep, kind, "clamp", (0.7, 0.5))
            _edit(rep, kind, "ablation", (-30.0, -40.0), broken=True)  # far below the axis' floor
    fig = plots.builds_figure([a, quiet, negative])
    titles = [ax.get_title() for ax in fig.get_axes() if ax.get_title()]
    assert titles == ["persona base: ablation\n2 fine-tunes, 1 build; mapped specific in 0",
                      "persona base: decision clamp\n2 fine-tunes, 1 build; mapped specific in 2",
                      "persona_per_topic base: ablation\n2 fine-tunes, 1 build; mapped specific in 0",
                      "persona_per_topic base: decision clamp\n2 fine-tunes, 1 build; mapped specific in 2"]
    assert "axis cut at -100%" in fig.get_suptitle()
    one = plots.builds_figure([quiet])  # no fine-tune with EM: the panels say so
    assert [ax.get_title().split("\n")[1] for ax in one.get_axes() if ax.get_title()] == \
        ["0 fine-tunes, 1 build; mapped specific in 0"] * 2


def test_one_builds_stores_made_another_way_are_counted_apart():
    """A pair's store with its ablations at the decision token (em.ablate_at) is another
    method on the same build: counted under a base named so, not as a second store of it."""
    every, decision = _store("gemma2", "llama", "0"), _store("gemma2", "llama", "0")
    decision.path, decision.ablate_at = "decision.zarr", "decision"
    for rep, reduction in ((every, (0.3, 0.1)), (decision, (0.7, 0.5))):
        for kind in ("minimal", "wide"):
            _edit(rep, kind, "ablation", reduction)
    counts = XB.counts([every, decision])
    assert set(counts) == {("persona", "0"), ("persona", XB.ALL_BUILDS), ("persona (at the decision token only)", "0"),
                           ("persona (at the decision token only)", XB.ALL_BUILDS)}
    assert counts["persona", "0"]["ablation: mapped >= 60%, intact"].text == "0 of 2"
    assert counts["persona (at the decision token only)", "0"]["ablation: mapped >= 60%, intact"].text == "2 of 2"
