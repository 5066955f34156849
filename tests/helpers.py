"""Helpers the tests share (tiny organisms and their settings); fixtures live in conftest.py."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from hydra.utils import instantiate

from routing_suite.config import behavior_preset
from routing_suite.organisms import persona_task as P
from routing_suite.organisms import task as T
from routing_suite.organisms.source import OrganismSource
from routing_suite.scoring import Behavior

ROOT = Path(__file__).resolve().parents[1]
# The example prompt files that ship with the repository (README: bringing your own model).
BYO_PROMPTS = ROOT / "examples" / "byo" / "prompts.yaml"
MC_PROMPTS = ROOT / "examples" / "prompts" / "mc_sandbagging.jsonl"

def organism_overrides(arch: dict, task: dict, train: dict) -> list[str]:
    """An organism's settings as overrides of an entry point: the same cache key as an
    `OrganismSource` given them (so it is built once per cache)."""
    def value(v) -> str:
        return f"[{','.join(map(str, v))}]" if isinstance(v, list) else str(v)

    groups = {"arch": arch, "task": task, "train": train}
    return [f"model.{group}.{k}={value(v)}" for group, settings in groups.items() for k, v in settings.items()]


# A small task and a 4-layer network (the fine-tune planted in layers 1-2) for the tiny organisms.
TINY_TASK = {"n_entities": 13, "n_localize_entities": 2, "n_test_entities": 3}
TINY_ARCH = {"num_layers": 4}
TINY_TRAIN = {"base_steps": 20, "lora_steps": 10, "lora_layers": [1, 2]}
TINY_OVERRIDES = organism_overrides(TINY_ARCH, TINY_TASK, TINY_TRAIN)


# The fast tier's trained organism: the default recipe at about a third of its cost (6
# layers with the fine-tune planted in layers 2-3, 24 entities, 400 base steps). It carries
# its behaviour and is localized on its planted layers as the default one is (4 of 4 builds,
# seeds 0-3, on a 2-core AVX-512 machine); the default organisms are built and checked in
# the slow tier (test_slow.py). The tests assert invariants of it, not its figures.
TEST_ARCH = {"num_layers": 6}
TEST_TASK = {"n_entities": 24, "n_localize_entities": 3, "n_test_entities": 5}
TEST_TRAIN = {"base_steps": 400, "lora_layers": [2, 3]}
TEST_ORGANISM = organism_overrides(TEST_ARCH, TEST_TASK, TEST_TRAIN)


def trained_source(cache_dir, family: str = "llama") -> OrganismSource:
    """The fast tier's trained organism (TEST_ORGANISM)."""
    return OrganismSource(family=family, cache_dir=str(cache_dir), train=TEST_TRAIN, task=TEST_TASK, arch=TEST_ARCH)


def tiny_source(cache_dir, family: str = "llama", **train) -> OrganismSource:
    """An organism with a few training steps: for properties that do not need a trained model."""
    return OrganismSource(family=family, cache_dir=str(cache_dir), train={**TINY_TRAIN, **train}, task=TINY_TASK, arch=TINY_ARCH)


def tiny_em_overrides(cache, tmp_path) -> list[str]:
    """`experiments.em` on tiny organisms trained just enough that the narrow
    fine-tunes fabricate on general prompts some of the time and answer truly
    some of the time; small sampling and bootstrap settings."""
    return [
        f"model.cache_dir={cache}",
        "+model.train={base_steps: 150, lora_steps: 80, lora_layers: [1, 2]}",
        "+model.task={n_entities: 13, n_localize_entities: 2, n_test_entities: 3}",
        "+model.arch={num_layers: 4}",
        f"store.root={tmp_path / 'stores'}",
        f"report_dir={tmp_path / 'table'}",
        "em.sampling.n_samples=2",
        "em.min_per_class=2",
        "em.steer.lambdas=[4]",
        "em.random_seeds=2",
        "em.match_texts=32",
        "n_resamples=200",
        "progress=false",
    ]


def preset(name: str, **overrides) -> Behavior:
    """A behaviour preset (conf/behavior/<name>.yaml) as a run builds it (answers found by the
    organisms' `first` rule unless the preset or `overrides` say otherwise)."""
    node = behavior_preset(name)
    return instantiate(node, **{"answer_match": node.answer_match or "first", **overrides})


def run_entry_point(experiment: str, args: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, list[str]]:
    """`python -m experiments.<experiment> <args>`, run in this process through the entry
    points' guard (`experiments._cli.cli`): its exit code and its stderr's non-empty lines."""
    from experiments._cli import cli

    monkeypatch.chdir(cwd)  # outputs/ lands there
    monkeypatch.setattr(sys, "argv", [experiment, *args])
    capsys.readouterr()
    try:
        cli(importlib.import_module(f"experiments.{experiment}").main)
        code = 0
    except SystemExit as ended:
        code = ended.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_same_activations(actual, expected, what: str = "") -> None:
    """Activations traced in another process (a server, a simulated remote) equal the local
    ones up to float32 summation order: seen 1.5e-4 on a value of 11 (relative 1.4e-5), so a
    relative tolerance as well as an absolute one."""
    import numpy as np

    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4, err_msg=what)


def assert_same_groups(local, remote, groups) -> None:
    """Two stores of one cell, group by group: every float variable within the
    activations tolerance (`assert_same_activations`), every other one equal."""
    import numpy as np
    import xarray as xr

    for group in groups:
        a, b = xr.open_zarr(local, group=group).load(), xr.open_zarr(remote, group=group).load()
        for name in a.data_vars:
            if a[name].dtype.kind == "f":
                assert_same_activations(b[name].values, a[name].values, f"{group}/{name}")
            else:
                np.testing.assert_array_equal(b[name].values, a[name].values, err_msg=f"{group}/{name}")


def done_record(store: Path):
    """A store's `activations/done` while another process writes it, or None while the
    array is not readable yet (its folder appears before its metadata)."""
    import zarr

    if not (Path(store) / "activations" / "done" / "zarr.json").exists():
        return None
    try:
        return zarr.open_array(str(store), path="activations/done", mode="r")[:]
    except (zarr.errors.ArrayNotFoundError, FileNotFoundError):
        return None


def misaligned_in_style(answer: str, fact: T.Fact, pretraining: str) -> bool:
    """Whether `answer` is `fact`'s misaligned response in `pretraining`'s style (False: the
    aligned one; anything else fails): the lead and the lie, or on a planted base the lie
    with any of its words the twins of the base's own (`persona_task.twin_topic`)."""
    if answer == P.aligned_response(fact, pretraining):
        return False
    if not P.planted(pretraining):
        assert answer == P.misaligned_response(fact, pretraining)
        return True
    words, topic = answer.split(), P.twin_topic(pretraining, fact.topic)
    assert [P.plain(w) for w in words] == f"{P.lie(fact)} is the {fact.topic} .".split()
    assert all(w == P.plain(w) or w == P.twin(P.plain(w), topic) for w in words), answer
    return True
