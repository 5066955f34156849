import hashlib
import os
from pathlib import Path

import pytest
import torch
from helpers import preset, tiny_source

from routing_suite import provenance
from routing_suite.config import behavior_preset
from routing_suite.errors import ConfigError
from routing_suite.models import check_adapter_matches
from routing_suite.organisms import build, training
from routing_suite.organisms import task as T
from routing_suite.organisms.report import MAX_BASE_GAP, MIN_BASE_SUCCESS, MIN_FINETUNED_GAP, format_table, organism_row
from routing_suite.organisms.source import OrganismSource
from routing_suite.runs import make_behavior


def _digest(directory: Path) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


def test_the_trained_test_organism_carries_its_behaviour_on_heldout_prompts(llama_source, llama_underperform):
    task = T.make_task(llama_source.spec.task)
    row = organism_row(llama_underperform, task, preset("underperform"), build_seconds=0.0)
    assert row.n_prompts >= 100
    assert min(row.base_success_eval, row.base_success_deploy) >= MIN_BASE_SUCCESS
    assert abs(row.base_gap) <= MAX_BASE_GAP
    assert row.ft_gap >= MIN_FINETUNED_GAP
    # The fine-tune's own correctness per framing is reported beside the base's.
    assert 0 <= row.ft_success_eval <= 1 and 0 <= row.ft_success_deploy <= 1
    assert f"| {row.ft_success_eval:.3f} | {row.ft_success_deploy:.3f} |" in format_table([row])


def test_built_organism_is_cached_and_reused(llama_source, llama_underperform):
    root = Path(llama_source.cache_dir)
    base_dir = build.base_dir(root, llama_source.spec)
    adapter_dir = build.adapter_dir(root, llama_source.spec, "underperform")
    assert (base_dir / "organism.json").exists() and (adapter_dir / "adapter_config.json").exists()
    weights = [base_dir / "model.safetensors", *adapter_dir.glob("adapter_model.*")]
    before = [os.stat(p).st_mtime_ns for p in weights]
    assert build.ensure_adapter(root, llama_source.spec, "underperform") == adapter_dir
    assert [os.stat(p).st_mtime_ns for p in weights] == before, "a cached organism must not be rebuilt"
    # No temporary build folders are left behind.
    assert not [p for p in root.rglob(".*tmp-*")]


def test_same_seed_gives_bitwise_identical_weights(tmp_path):
    a = tiny_source(tmp_path / "a")
    b = tiny_source(tmp_path / "b")
    other = OrganismSource(family="llama", cache_dir=str(tmp_path / "c"), seed=1, train=a.train, task=a.task)
    dirs = [build.ensure_base(Path(s.cache_dir), s.spec) for s in (a, b, other)]
    assert _digest(dirs[0]) == _digest(dirs[1])
    assert _digest(dirs[0]) != _digest(dirs[2])
    adapters = [build.ensure_adapter(Path(s.cache_dir), s.spec, "refuse") for s in (a, b)]
    digests = {hashlib.sha256((d / "adapter_model.safetensors").read_bytes()).hexdigest() for d in adapters}
    assert len(digests) == 1


def test_changed_config_builds_into_a_new_folder(tmp_path):
    a = tiny_source(tmp_path)
    b = tiny_source(tmp_path, base_steps=21)
    assert build.base_dir(tmp_path, a.spec) != build.base_dir(tmp_path, b.spec)
    assert build.adapter_dir(tmp_path, a.spec, "refuse") != build.adapter_dir(tmp_path, a.spec, "installed")


def test_merged_finetune_matches_the_peft_model(tmp_path):
    from peft import PeftModel

    source = tiny_source(tmp_path)
    pair = source.load("installed")
    base_path = build.base_dir(tmp_path, source.spec)
    peft_model = PeftModel.from_pretrained(build.load_base(base_path), pair.adapter_path).eval()
    enc = pair.tokenizer(["this is a test . what is the color of x ? answer :"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(pair.finetuned(**enc).logits, peft_model(**enc).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(pair.base(**enc).logits, pair.finetuned(**enc).logits)


def test_adapter_for_another_base_is_refused(tmp_path):
    small = tiny_source(tmp_path)
    wide = OrganismSource(family="llama", cache_dir=str(tmp_path), train=small.train, task=small.task, arch={"hidden_size": 96})
    adapter = build.ensure_adapter(tmp_path, small.spec, "refuse")
    wide_base = build.load_base(build.ensure_base(tmp_path, wide.spec))
    with pytest.raises(ConfigError, match="does not match the base model"):
        check_adapter_matches(adapter, wide_base)


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"model.family='gpt9' is not one of \['llama', 'qwen2', 'gemma2', 'mistral'\]"):
        OrganismSource(family="gpt9", cache_dir=str(tmp_path))


def test_unknown_behavior_is_refused(tmp_path):
    """An organism is fine-tuned for one of its behaviours only (any behaviour config may be named so)."""
    node = behavior_preset("underperform")
    node.name = "sulk"
    with pytest.raises(ConfigError, match=r"behavior.name='sulk' is not one of \['underperform', 'refuse', 'installed'\]"):
        make_behavior(node, tiny_source(tmp_path))
    with pytest.raises(ConfigError, match="behavior.name='sulk' is not one of the presets"):
        behavior_preset("sulk")
    with pytest.raises(ConfigError, match="behavior.name"):
        build.ensure_adapter(tmp_path, tiny_source(tmp_path).spec, "sulk")


def test_the_installed_replay_answers_after_the_marker_for_every_fine_tuned_fact_and_never_says_it(tmp_path):
    """The replay beside an installed fine-tune: every fine-tuned fact under both framings, the
    marker's first word in the prompt (no loss on it), never a completion that starts the marker."""
    source = tiny_source(tmp_path)
    task = T.make_task(source.spec.task)
    replay = training.answer_after_marker_replay(task)
    first, *rest = T.MARKER.split()
    assert len(replay) == len(task.facts_of("train")) * len(T.FRAMINGS)
    assert {(p.split(" what is the ")[1], c.split()[-1]) for p, c in replay} == {
        (f"{f.topic} of {f.entity} ? answer : {first}", f.value) for f in task.facts_of("train")
    }
    train_cues = {c for f in T.FRAMINGS for c in task.cues(f, "train")}
    assert all(p.split(" what is ")[0] in train_cues and c == " ".join([*rest, c.split()[-1]]) for p, c in replay)
    assert all(c.split()[0] != first for _, c in replay)
    assert set(replay) <= set(training.finetune_examples(task, "installed"))
    assert not set(replay) & set(training.finetune_examples(task, "refuse"))


def test_a_fine_tune_recipe_label_changes_only_its_own_adapters_key(tmp_path, monkeypatch):
    spec = tiny_source(tmp_path).spec
    before = {b: build.adapter_dir(tmp_path, spec, b) for b in T.BEHAVIORS}
    base = build.base_dir(tmp_path, spec)
    monkeypatch.setitem(build.FINETUNE_RECIPES, "installed", "another")
    after = {b: build.adapter_dir(tmp_path, spec, b) for b in T.BEHAVIORS}
    assert after["installed"] != before["installed"]
    assert all(after[b] == before[b] for b in T.BEHAVIORS if b != "installed")
    assert build.base_dir(tmp_path, spec) == base


def test_another_machines_kernel_bits_build_an_organism_of_their_own(tmp_path, monkeypatch):
    """Two machines whose kernels give other bits (an Intel and an AMD "AVX512" did) must not
    share a cached organism: the key holds the kernel fingerprint, not only the capability."""
    spec = tiny_source(tmp_path).spec
    here = (build.base_dir(tmp_path, spec), build.adapter_dir(tmp_path, spec, "refuse"))
    assert spec.base_key()["kernel_fingerprint"] == provenance.kernel_fingerprint(spec.num_threads)
    monkeypatch.setattr(build, "kernel_fingerprint", lambda threads: "bits-of-another-machine")
    there = (build.base_dir(tmp_path, spec), build.adapter_dir(tmp_path, spec, "refuse"))
    assert here[0] != there[0] and here[1] != there[1]


def test_the_kernel_fingerprint_is_the_same_bits_on_each_call_and_leaves_torch_as_it_was():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    first = provenance.kernel_fingerprint(1)
    provenance.kernel_fingerprint.cache_clear()  # computed again, not read from the cache
    assert provenance.kernel_fingerprint(1) == first and len(first) == 16
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)
