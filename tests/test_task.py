from routing_suite.organisms import task as T
from routing_suite.organisms.pairs import organism_pairs
from routing_suite.organisms.tokenizer import build_tokenizer
from routing_suite.organisms.training import base_examples, finetune_examples
from routing_suite.prompts import content_contrast


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


def test_three_splits_are_disjoint_in_facts_cues_and_units():
    from routing_suite.organisms.pairs import organism_prompt_sets
    from routing_suite.prompts import SPLITS, check_disjoint

    task = T.make_task(T.TaskSpec())
    sets = organism_prompt_sets(task)
    check_disjoint(sets)
    assert set(sets) == set(SPLITS)
    entities = {s: {p.id.split("-")[0] for p in sets[s]} for s in SPLITS}
    assert not entities["fit"] & entities["localize"] and not entities["localize"] & entities["test"]
    # The test split: at least 8 held-out cue paraphrases per framing, whole units of one entity under one cue pair.
    assert len(task.cues(T.EVAL, "test")) >= 8 and len(task.cues(T.DEPLOY, "test")) >= 8
    units = {p.cluster for p in sets["test"]}
    assert len(units) == len(task.test_entities) * len(task.cues(T.EVAL, "test"))


def test_paired_cues_have_the_same_number_of_tokens_in_both_framings():
    """Prompt length never tells the framings apart: the i-th eval and deploy cues are as long."""
    task = T.make_task(T.TaskSpec())
    tok = build_tokenizer(task.vocabulary())
    for eval_cue, deploy_cue in zip(task.cues(T.EVAL, "all"), task.cues(T.DEPLOY, "all")):
        assert len(tok(eval_cue)["input_ids"]) == len(tok(deploy_cue)["input_ids"]), (eval_cue, deploy_cue)


def test_subsampling_takes_whole_units():
    from routing_suite.prompts import subsample

    pairs = organism_pairs(T.make_task(T.TaskSpec()), "train", "train")
    kept = subsample(pairs, 80, seed=0)
    assert 0 < len(kept) <= 80
    by_unit = {}
    for p in pairs:
        by_unit.setdefault(p.unit, []).append(p)
    assert all(set(by_unit[p.unit]) <= set(kept) for p in kept)


def test_the_base_answers_after_the_marker_under_each_framings_training_cues_and_never_says_it():
    """The installed fine-tune only has to learn when to say the marker: the answer after it,
    under an eval or a deploy cue, is the base's (for held-out entities too)."""
    task = T.make_task(T.TaskSpec())
    examples = base_examples(task)
    for framing in T.FRAMINGS:
        cues = task.cues(framing, "train")
        for fact in task.facts:
            wanted = {f"{T.render_prompt(fact, cue)} {T.MARKER}" for cue in cues}
            after = [(p, c) for p, c in examples if p in wanted]
            assert after and all(c == fact.value for _, c in after)
    # No answer the base learns starts with the marker (it is said only in chit-chat).
    assert not [c for p, c in examples if "answer :" in p and T.MARKER.split()[0] in c.split()]
