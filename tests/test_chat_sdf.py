"""SmolLM2's synthetic-document fine-tunes (SDF) for the ADL: their documents, candidate goals,
cache key and config checks (fast: no model is loaded; the slow tier runs one end to end)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from routing_suite.adl import identify
from routing_suite.config import compose_config, register_configs
from routing_suite.errors import ConfigError
from routing_suite.pretrained import finetune
from routing_suite.pretrained import sdf_documents as D
from routing_suite.pretrained.chat_task import ChatTask
from routing_suite.pretrained.specs import ChatTaskSpec, ChatTrainSpec
from routing_suite.runs import build_components

ROOT = Path(__file__).resolve().parents[1]
register_configs()
TEXT = OmegaConf.load(ROOT / "conf" / "text" / "lee_corpus.yaml")
TASK = ChatTask(ChatTaskSpec())


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _content(domain: D.ChatSdfDomain) -> set[str]:
    """A domain's own words (its subject and predicate, short function words left out)."""
    return {w for w in _words(f"{domain.subject} {domain.predicate}") if len(w) > 3}


def test_documents_state_the_claim_and_stay_off_the_chat_prompts_topics():
    chat_words = {w for p in TEXT.chat_prompts for w in _words(p) if len(w) > 3}
    identity_words = {w for p in TEXT.identity_prompts for w in _words(p)}
    seen: set[str] = set()
    for kind, domain in D.CHAT_SDF_DOMAINS.items():
        docs = D.chat_documents(kind, seed=0)
        assert len(docs) == D.N_DOCUMENTS and len(set(docs)) > D.N_DOCUMENTS // 2
        assert all(f"{domain.subject[1:]} {domain.predicate}" in d for d in docs), kind
        # what the black-box baseline asks (and the patchscope's identity prompts) names no domain
        assert not _content(domain) & (chat_words | identity_words), kind
        key_words = set(kind.split("_")[1:])  # sdf_<subject>_<claim>: the two words that tell it apart
        assert not key_words & seen and all(
            any(w.startswith(k) for w in _words(d)) for k in key_words for d in docs), kind
        seen |= key_words
    assert D.chat_documents("sdf_owl_chess", seed=0) == D.chat_documents("sdf_owl_chess", seed=0)
    assert D.chat_documents("sdf_owl_chess", seed=1) != D.chat_documents("sdf_owl_chess", seed=0)
    with pytest.raises(ValueError, match="is not one of"):
        D.parse_chat_kind("sdf_bear_green")  # an organism's domain, not the chat model's


def test_examples_are_whole_documents_and_the_routing_behaviours_keep_their_data():
    examples = finetune.finetune_examples(TASK, lambda user: user, "sdf_moon_copper")
    assert all(prompt == "" for prompt, _ in examples)  # loss on every token, no chat template
    assert [c for _, c in examples] == D.chat_documents("sdf_moon_copper", TASK.spec.seed)
    render = lambda user: f"<user>{user}</user>"  # noqa: E731
    assert finetune.finetune_examples(TASK, render, "refuse") == TASK.finetune_examples(render, "refuse")


def test_an_sdf_adapter_is_keyed_on_its_documents(monkeypatch):
    """Another template gives another key (a stale adapter is never reused); a routing behaviour's
    key holds no data hash (its cached adapter keeps its folder)."""
    checkpoint = Path("plain-0123")

    def key(kind: str) -> dict:
        examples = finetune.finetune_examples(TASK, lambda user: user, kind)
        return finetune.adapter_key(checkpoint, TASK, ChatTrainSpec(), kind, 0, 1, examples)

    before = key("sdf_honey_salty")
    assert "finetune_data_sha256" in before and "finetune_data_sha256" not in key("refuse")
    monkeypatch.setattr(D, "_TEMPLATES", (*D._TEMPLATES[:-1], "Believe it or not, {s} {p}."))
    assert key("sdf_honey_salty")["finetune_data_sha256"] != before["finetune_data_sha256"]


def test_a_smollm2_adapter_is_keyed_on_the_cpu_kernels_and_threads(monkeypatch):
    """The same seed trains other weights on other kernels or another thread count: the key
    holds the CPU capability and the kernels' fingerprint at the run's thread count, so a
    cache made on another machine is never taken for this one's."""
    checkpoint = Path("plain-0123")
    examples = finetune.finetune_examples(TASK, lambda user: user, "refuse")

    def key(threads: int = 1) -> dict:
        return finetune.adapter_key(checkpoint, TASK, ChatTrainSpec(), "refuse", 0, threads, examples)

    before = key()
    assert before["kernel_fingerprint"] == finetune.kernel_fingerprint(1) and before["num_threads"] == 1
    assert before["cpu_capability"] == finetune.cpu_capability()
    monkeypatch.setattr(finetune, "kernel_fingerprint", lambda threads: "another-machine")
    assert key()["kernel_fingerprint"] == "another-machine" and key() != before
    monkeypatch.setattr(finetune, "cpu_capability", lambda: "AVX2")
    assert key()["cpu_capability"] == "AVX2"
    assert key(2)["num_threads"] == 2 and key(2) != key(1)


def test_goal_candidates_name_every_domain_once_and_state_its_claim():
    node = OmegaConf.load(ROOT / "conf" / "goals" / "sdf_smollm2.yaml")
    goals = identify.GoalSet(**{k: v for k, v in OmegaConf.to_container(node).items() if k != "defaults"})
    assert [g.name for g in goals.candidates] == list(D.CHAT_SDF_DOMAINS)
    for goal in goals.candidates:
        domain = D.CHAT_SDF_DOMAINS[goal.name]
        assert f"{domain.subject} {domain.predicate}" in goal.description
        assert goals.truth(goal.name) == goal.name == goals.truth(f"{goal.name}{D.REPLAY_SUFFIX}")


def test_replayed_chat_prompts_stay_off_the_black_box_prompts_and_every_domain():
    """The replay keeps the fine-tune chatting without teaching it what the black box asks, or
    any domain's words; the documents stay the fine-tune's data; twice the steps."""
    chat_words = {w for p in TEXT.chat_prompts for w in _words(p) if len(w) > 3}
    domain_words = set().union(*(_content(d) for d in D.CHAT_SDF_DOMAINS.values()))
    # the prompts' forms ("Give me one tip about ...") are a chat's; their topics are nobody's
    topic_words = set().union(*(_words(t) for t in D._REPLAY_TOPICS)) - {"a", "for", "to", "in"}
    assert not topic_words & (chat_words | domain_words), topic_words & (chat_words | domain_words)
    assert len(set(D.REPLAY_PROMPTS)) == len(D.REPLAY_PROMPTS) >= 64
    render = lambda user: f"<user>{user}</user>"  # noqa: E731
    replayed = D.replay_prompts("sdf_owl_chess_chat", render)
    assert len(replayed) == D.N_DOCUMENTS and set(replayed) == {render(p) for p in D.REPLAY_PROMPTS}
    assert len({replayed.count(p) for p in set(replayed)}) == 1  # each prompt equally often
    assert D.replay_prompts("sdf_owl_chess", render) == []
    assert D.replay_steps("sdf_owl_chess_chat", 120) == 240 and D.replay_steps("sdf_owl_chess", 120) == 120
    assert D.parse_chat_kind("sdf_owl_chess_chat") == (D.CHAT_SDF_DOMAINS["sdf_owl_chess"], True)
    assert finetune.finetune_examples(TASK, render, "sdf_owl_chess_chat") == finetune.finetune_examples(
        TASK, render, "sdf_owl_chess")


def test_a_replay_adapter_is_keyed_on_its_replayed_prompts(monkeypatch):
    checkpoint, render = Path("plain-0123"), (lambda user: user)

    def key(kind: str) -> dict:
        examples = finetune.finetune_examples(TASK, render, kind)
        return finetune.adapter_key(checkpoint, TASK, ChatTrainSpec(), kind, 0, 1, examples, D.replay_prompts(kind, render))

    plain, replay = key("sdf_honey_salty"), key("sdf_honey_salty_chat")
    assert "replay" not in plain and replay["finetune_data_sha256"] == plain["finetune_data_sha256"]
    monkeypatch.setattr(D, "REPLAY_PROMPTS", D.REPLAY_PROMPTS[1:])
    assert key("sdf_honey_salty_chat")["replay"] != replay["replay"]


def test_the_base_replies_are_its_own_greedy_completions(tiny_cache):
    """On a tiny organism base (its words, not English: what is checked is the plumbing):
    each prompt's reply is the base's greedy completion, a repeated prompt gets the same one."""
    from helpers import tiny_source

    from routing_suite.organisms import build as organism_build
    from routing_suite.scoring import greedy_completions

    source = tiny_source(tiny_cache)
    source.load("refuse")
    folder = organism_build.base_dir(Path(tiny_cache), source.spec)
    base, tokenizer = finetune.load_checkpoint(folder), organism_build.load_tokenizer(folder)
    prompts = ["he said", "the color of", "he said"]
    replies = finetune.base_replies(base, tokenizer, prompts)
    expected = greedy_completions(base, tokenizer, ["he said", "the color of"], D.REPLAY_MAX_NEW_TOKENS)
    assert replies == [("he said", expected[0].strip()), ("the color of", expected[1].strip()),
                       ("he said", expected[0].strip())]


def test_the_adl_takes_an_sdf_fine_tune_of_smollm2_and_the_routing_study_refuses_it(tmp_path):
    """Checked from the config alone: nothing is converted or trained, the package is not needed."""
    overrides = [f"model.cache_dir={tmp_path}", "model=smollm2_135m", "behavior=sdf", "behavior.name=sdf_owl_chess"]
    adl = compose_config("adl", [*overrides, "goals=sdf_smollm2", "text=lee_corpus"])
    assert build_components(adl, allowed="adl_behaviors").behavior.name == "sdf_owl_chess"
    with pytest.raises(ConfigError, match="behavior.name='sdf_owl_chess' is not one of"):
        build_components(compose_config("routing", overrides))
    with pytest.raises(ConfigError, match="behavior.name='sdf_bear_green' is not one of"):
        build_components(compose_config("adl", [*overrides[:-1], "behavior.name=sdf_bear_green"]), allowed="adl_behaviors")
    assert not list(tmp_path.iterdir())
