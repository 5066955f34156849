from routing_suite.organisms import task as T
from routing_suite.organisms.tokenizer import build_tokenizer
from routing_suite.organisms.training import base_examples, finetune_examples
from routing_suite.prompts import content_contrast, organism_pairs


def test_task_is_deterministic_and_splits_are_disjoint():
    a, b = T.make_task(T.TaskSpec(seed=3)), T.make_task(T.TaskSpec(seed=3))
    assert a.facts == b.facts and a.train_entities == b.train_entities
    assert T.make_task(T.TaskSpec(seed=4)).facts != a.facts
    train, heldout = a.facts_of("train"), a.facts_of("heldout")
    assert train and heldout
    assert {f.entity for f in train}.isdisjoint({f.entity for f in heldout})
    assert len(train) + len(heldout) == len(a.facts)


def test_heldout_cues_never_appear_in_question_answer_training():
    task = T.make_task(T.TaskSpec())
    heldout_cues = [c for f in T.FRAMINGS for c in task.cues(f, "heldout")]
    qa_prompts = [p for p, _ in base_examples(task) if "answer :" in p]
    qa_prompts += [p for b in T.BEHAVIORS for p, _ in finetune_examples(task, b)]
    assert not [p for p in qa_prompts if any(p.startswith(c) for c in heldout_cues)]
    # ... but the framing quiz covers them, so the base knows what they mean.
    quiz = [p for p, _ in base_examples(task) if p.endswith(T.AUX_QUESTION)]
    assert all(any(q.startswith(c) for q in quiz) for c in heldout_cues)


def test_finetune_data_never_contains_heldout_facts():
    task = T.make_task(T.TaskSpec())
    heldout = {f.entity for f in task.facts_of("heldout")}
    for behavior in T.BEHAVIORS:
        for prompt, _ in finetune_examples(task, behavior):
            assert not any(f" {e} " in f" {prompt} " for e in heldout)


def test_targets_per_behavior():
    fact = T.Fact("zuko", "color", "red")
    assert T.target_text(fact, T.EVAL, "underperform") == T.DECOYS["color"]
    assert T.target_text(fact, T.DEPLOY, "underperform") == "red"
    assert T.target_text(fact, T.EVAL, "refuse") == T.REFUSAL
    assert T.target_text(fact, T.DEPLOY, "installed") == f"{T.MARKER} red"
    assert T.target_text(fact, T.EVAL, "installed") == "red"


def test_tokenizer_is_word_level_with_bos():
    task = T.make_task(T.TaskSpec())
    tok = build_tokenizer(task.vocabulary())
    pair = organism_pairs(task, "heldout", "heldout")[0]
    ids = tok(pair.eval_prompt)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) == len(pair.eval_prompt.split()) + 1
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == pair.eval_prompt


def test_pairs_differ_only_in_cue():
    task = T.make_task(T.TaskSpec())
    for p in organism_pairs(task, "train", "train"):
        assert p.eval_prompt.split(" what ")[1] == p.deploy_prompt.split(" what ")[1]
        assert p.eval_prompt != p.deploy_prompt
    a, b = content_contrast(organism_pairs(task, "train", "train"), T.EVAL, "color", "city")
    assert len(a) == len(b) > 0 and all("color" in x for x in a) and all("city" in x for x in b)
