"""ADL mechanics on the default organism and pure functions: texts, streamed mean, readouts,
relevance statistic, similarity, projection replacement, each against a plain reference."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import xarray as xr

from routing_suite.adl import causal, mean_diff, readout
from routing_suite.adl.pipeline import pick_position, sink_positions
from routing_suite.adl.relevance import StatisticGrader, log_odds_z
from routing_suite.adl.similarity import LexicalSimilarity
from routing_suite.adl.steer import best_alpha, completion_log_ppl, distinct_share
from routing_suite.adl.texts import OrganismTexts, PackageTexts, organism_forbidden_phrases
from routing_suite.backends import LocalBackend, NdifBackend
from routing_suite.errors import ConfigError
from routing_suite.families import site_path
from routing_suite.models import ModelPair
from routing_suite.organisms import task as T
from routing_suite.organisms.source import OrganismSource
from routing_suite.store import RunStore
from routing_suite.store_settings import StoreSettings
from routing_suite.tracing import SiteRequest, make_batch

PROMPTS = dict(chat_prompts=["he said"], identity_prompts=["red red . ?"])


@pytest.fixture(scope="module")
def organism_pair(llama_source, llama_underperform):
    """The session's default organism: built once for the whole fast tier, so these tests add no build."""
    return llama_source, llama_underperform


@pytest.fixture(scope="module", params=["local", "simulated-ndif"])
def placed(request, llama_source, llama_underperform):
    """The default organism as each backend places it, with the merged pair as the plain reference:
    local (merged fine-tune) and NDIF simulated in-process (nnsight's serialization,
    remote="local"; the fine-tune as the base plus its adapter's updates)."""
    if request.param == "local":
        return llama_underperform, LocalBackend(), llama_underperform
    backend = NdifBackend(simulate=True)
    backend.preflight()
    return llama_source.load("underperform", backend.placement), backend, llama_underperform


def _layer_outputs(model, family: str, batch, layers: list[int]) -> dict[int, torch.Tensor]:
    """Decoder-layer outputs with plain forward hooks (positions as nnsight gives them under left padding)."""
    modules = dict(model.named_modules())
    seen, hooks = {}, []
    for layer in layers:
        def hook(module, args, output, layer=layer):
            seen[layer] = (output[0] if isinstance(output, tuple) else output).detach()
        hooks.append(modules[site_path(family, "resid", layer)].register_forward_hook(hook))
    position_ids = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids)
    for h in hooks:
        h.remove()
    return seen


def test_organism_unrelated_text_holds_no_finetuning_phrase(organism_pair):
    source, _ = organism_pair
    texts = OrganismTexts(**PROMPTS).unrelated(10_000, 0, source.spec.task)
    assert len(texts) == len(T.make_task(source.spec.task).facts)  # the plain fact statements
    for behavior in T.BEHAVIORS:
        examples = source.finetune_examples(behavior)
        prompts = {p for p, _ in examples}
        assert not prompts & set(texts)
        for text in texts:
            assert not any(f" {p} " in f" {text} " for p in organism_forbidden_phrases()), text
            assert not any(c in text for c in (*T.EVAL_CUES, *T.DEPLOY_CUES, T.REFUSAL, T.MARKER))
    assert OrganismTexts(**PROMPTS).unrelated(5, 1, source.spec.task) == OrganismTexts(**PROMPTS).unrelated(5, 1, source.spec.task)


def test_package_corpus_is_read_from_the_installed_package_folder(tmp_path, monkeypatch):
    package = tmp_path / "fakecorpus"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('the corpus is read without importing the package')\n")
    (package / "data" / "news.cor").write_text(
        "The first sentence has seven words in it. Short one. The third sentence follows here with words.\n"
        "Another line of text that is long enough to keep.\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    texts = PackageTexts(package="fakecorpus", resource="data/news.cor", min_words=5, **PROMPTS).unrelated(100, 0)
    assert sorted(texts) == sorted([
        "The first sentence has seven words in it.", "The third sentence follows here with words.",
        "Another line of text that is long enough to keep.",
    ])
    assert "fakecorpus" not in sys.modules
    with pytest.raises(ConfigError, match="text.package='no_such_corpus_pkg' is not installed .install it: pip x."):
        PackageTexts(package="no_such_corpus_pkg", resource="a.txt", install_hint="pip x", **PROMPTS).check()
    with pytest.raises(ConfigError, match="is not a file of package"):
        PackageTexts(package="fakecorpus", resource="data/missing.txt", **PROMPTS).check()


def test_first_k_batch_marks_short_rows_and_truncation_keeps_values(organism_pair):
    _, pair = organism_pair
    request = SiteRequest(("resid",), None, "first_k", 4).validate(pair.num_layers)
    texts = ["the color of x is red .", "he said", "nobody has the color gray ."]
    full, cut = make_batch(pair.tokenizer, texts, request), make_batch(pair.tokenizer, texts, request, truncate=True)
    assert cut.input_ids.shape[1] == 5 and full.valid.tolist() == cut.valid.tolist()
    assert cut.valid.tolist() == [[True] * 4, [True, True, False, False], [True] * 4]
    a = _layer_outputs(pair.finetuned, pair.family, full, [1])[1]
    b = _layer_outputs(pair.finetuned, pair.family, cut, [1])[1]
    pick = lambda h, batch: h.gather(1, batch.index[..., None].expand(-1, -1, h.shape[-1]))  # noqa: E731
    torch.testing.assert_close(pick(a, full)[full.valid], pick(b, cut)[cut.valid], atol=1e-5, rtol=0)


def test_first_k_counts_from_the_first_token_where_the_tokenizer_prepends_no_bos(organism_pair):
    """SmolLM2's tokenizer names <|im_start|> as its BOS but never prepends it: the first k
    positions are then the text's first k tokens (they were counted from the second, and
    truncated to k the last position was empty). Where the BOS is prepended, it is skipped."""
    import copy

    from tokenizers import processors

    from routing_suite.tracing import bos_named_not_added

    _, pair = organism_pair
    request = SiteRequest(("resid",), None, "first_k", 4).validate(pair.num_layers)
    texts = ["the color of x is red .", "he said"]
    no_bos = copy.deepcopy(pair.tokenizer)
    no_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    assert not bos_named_not_added(pair.tokenizer) and bos_named_not_added(no_bos)
    for tokenizer, skipped in ((pair.tokenizer, 1), (no_bos, 0)):
        batch = make_batch(tokenizer, texts, request, truncate=True)
        ids = [tokenizer(t)["input_ids"][skipped:] for t in texts]
        picked = batch.input_ids.gather(1, batch.index)
        for row, want in enumerate(ids):
            n = min(4, len(want))
            assert picked[row, :n].tolist() == want[:n] and batch.valid[row].tolist() == [True] * n + [False] * (4 - n)


def test_streamed_mean_difference_equals_the_in_memory_mean_and_resumes_a_part(organism_pair, tmp_path):
    source, pair = organism_pair
    texts = OrganismTexts(**PROMPTS).unrelated(23, 0, source.spec.task) + ["he said"]  # one short text
    store = RunStore.open(tmp_path / "adl.zarr", StoreSettings(), {"t": 1}, {"cell": {"family": "llama"}})
    mean_diff.accumulate(pair, texts, 4, 10, store, batch_size=4, backend=LocalBackend(), progress=False)
    first = mean_diff.finish(store)
    # The reference: every text at once, plain hooks, masked mean over texts that reach each position.
    request = SiteRequest(("resid",), None, "first_k", 4).validate(pair.num_layers)
    batch = make_batch(pair.tokenizer, texts, request)
    layers = list(range(pair.num_layers))
    h = {w: _layer_outputs(pair.model(w), pair.family, batch, layers) for w in ("base", "finetuned")}
    for layer in layers:
        for w, name in (("base", "mean_base"), ("finetuned", "mean_finetuned")):
            x = h[w][layer].gather(1, batch.index[..., None].expand(-1, -1, pair.hidden_size)).double()
            ref = (x * batch.valid[..., None]).sum(0) / batch.valid.sum(0)[:, None]
            np.testing.assert_allclose(first[name].sel(layer=layer).values, ref.numpy(), atol=2e-5)
    np.testing.assert_allclose(first["diff"].values, (first["mean_finetuned"] - first["mean_base"]).values, atol=2e-5)
    assert first["count"].values.tolist() == [24, 24, 23, 23] and first.attrs["n_texts"] == 24
    # A crash after writing part 1 but before marking it: garbage there, not marked done.
    sums = store._streamed_arrays(mean_diff.SUMS)
    sums["diff"][1] = 1e3
    sums["done"][1] = False
    mean_diff.accumulate(pair, texts, 4, 10, store, batch_size=4, backend=LocalBackend(), progress=False)
    np.testing.assert_array_equal(mean_diff.finish(store)["diff"].values, first["diff"].values)


def test_logit_lens_and_patchscope_match_plain_torch(placed):
    pair, backend, reference = placed
    torch.manual_seed(0)
    vectors = torch.randn(3, pair.hidden_size)
    lens = readout.logit_lens(pair, vectors, backend, batch_size=2)
    ref = reference.finetuned.lm_head(reference.finetuned.model.norm(vectors)).softmax(-1)
    torch.testing.assert_close(lens, ref, atol=1e-6, rtol=1e-5)
    prompts, scales, norms, layers = ["red red . ?", "cat cat . blue blue . ?"], [0.5, 2.0], torch.tensor([3.0, 5.0, 7.0]), [0, 2, 3]
    probs = readout.patchscope(pair, vectors, layers, norms, prompts, scales, 5, backend)
    unit = vectors / vectors.norm(dim=-1, keepdim=True)
    for i, layer in enumerate(layers):
        expected = torch.zeros_like(probs[i])
        for s in scales:
            for p in prompts:
                def hook(module, args, output, value=s * norms[i] * unit[i]):
                    x = output[0] if isinstance(output, tuple) else output
                    x[:, -1] = value
                handle = reference.finetuned.model.layers[layer].register_forward_hook(hook)
                with torch.no_grad():
                    logits = reference.finetuned(**reference.tokenizer([p], return_tensors="pt")).logits[0, -1]
                handle.remove()
                expected += logits.softmax(-1) / (len(scales) * len(prompts))
        torch.testing.assert_close(probs[i], expected, atol=1e-5, rtol=1e-4)


def test_projection_replacement_is_zero_for_identical_models_and_matches_hooks(organism_pair, placed):
    source, _ = organism_pair
    placed_pair, backend, pair = placed
    examples = source.finetune_examples("underperform")[:6]
    data = {"finetune": examples, "unrelated": [("", t) for t in OrganismTexts(**PROMPTS).unrelated(6, 0, source.spec.task)]}
    torch.manual_seed(1)
    directions = torch.randn(pair.num_layers, pair.hidden_size)
    same = ModelPair(pair.family, pair.tokenizer, pair.base, pair.base)
    zero = causal.causal_check(same, directions, data, 32, 4, 0, True, LocalBackend())
    assert np.abs(zero.delta_ce.values).max() < 1e-5
    result = causal.causal_check(placed_pair, directions, data, 32, 4, 0, False, backend)
    assert list(result.condition.values) == ["difference"]
    # Layer 1 on the fine-tuning data, with plain hooks.
    ids, mask, scored = causal.encode_scored(pair.tokenizer, examples, 32)
    u = directions[1] / directions[1].norm()
    base_h = {}
    hook = pair.base.model.layers[1].register_forward_hook(lambda m, a, o: base_h.setdefault("h", (o[0] if isinstance(o, tuple) else o).detach()))
    with torch.no_grad():
        pair.base(input_ids=ids, attention_mask=mask)
    hook.remove()

    def replace(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        x += ((base_h["h"] @ u) - (x @ u))[..., None] * u

    with torch.no_grad():
        clean = causal.token_loss(pair.finetuned(input_ids=ids, attention_mask=mask).logits, ids, scored)
        handle = pair.finetuned.model.layers[1].register_forward_hook(replace)
        edited = causal.token_loss(pair.finetuned(input_ids=ids, attention_mask=mask).logits, ids, scored)
        handle.remove()
    expected = float((edited - clean).mean())
    assert math.isclose(float(result.delta_ce.sel(data="finetune", condition="difference", layer=1)), expected, abs_tol=1e-5)
    assert np.isfinite(result.ce.values).all()


def test_log_odds_marks_only_over_represented_tokens():
    target = np.array([50.0, 10, 0, 30, 0])
    reference = np.array([50.0, 0, 10, 30, 0])
    z = log_odds_z(target, reference, prior_weight=10)
    assert z[1] > 1.96 and z[2] < -1.96 and abs(z[0]) < 1 and abs(z[3]) < 1 and z[4] == 0


def test_statistic_grader_on_organism_text():
    """On the default organism's text (no weights needed: its texts and word-level tokenizer)."""
    source = OrganismSource(family="llama")
    examples = source.finetune_examples("underperform")
    unrelated = OrganismTexts(**PROMPTS).unrelated(1000, 0, source.spec.task)
    tokenizer = source.tokenizer()
    grader = StatisticGrader()
    grader.fit([f"{p} {c}" for p, c in examples], unrelated, tokenizer)
    words = ("gray", "answer", "asks", "sorry", "is", "of", "red")
    ids = [tokenizer.convert_tokens_to_ids(w) for w in words]
    # Decoys, the question frame and cue words are over-represented in the fine-tuning
    # data of `underperform`; the refusal is not in it, fact words are in both.
    assert grader.relevant(ids, list(words)) == [True, True, True, False, False, False, False]
    top = [tokenizer.convert_ids_to_tokens(int(i)) for i in grader.characteristic()]
    assert set(top) >= {"gray", "berlin", "mouse", "egg", "what", "?"} and "is" not in top


def test_lexical_similarity_and_the_alpha_rule():
    sim = LexicalSimilarity().score(["sorry , i can not help .", "the color of x is red .", ""], ["sorry , i can not help ."] * 3)
    assert sim[0] == pytest.approx(1.0) and sim[1] < 0.2 and sim[2] == 0
    assert best_alpha([0, 0.5, 1, 2], np.array([True, True, False, True])) == 0.5
    assert best_alpha([0, 0.5], np.array([True, False])) == 0


def test_a_repetition_loop_has_a_low_distinct_share(organism_pair):
    _, pair = organism_pair
    share = distinct_share(pair.tokenizer, ["red red red red", "the color of x is red .", ""])
    assert share[0] == pytest.approx(0.25) and share[1] == 1.0 and share[2] == 1.0


def test_an_attention_sink_is_never_the_steering_position():
    # SmolLM2's norms at layer 15 (no BOS prepended: its first token is the sink)
    norms = np.array([23027.5, 303.9, 188.6, 183.0, 183.6])
    assert sink_positions(norms, 10.0) == [0] and sink_positions(norms[1:], 10.0) == []
    relevance = xr.DataArray(
        np.array([[[[0.4, 0.1, 0.3, 0.3, 0.0]]]] * 2).reshape(2, 1, 1, 5),
        dims=("readout", "source", "layer", "position"),
        coords={"readout": ["logit_lens", "patchscope"], "source": ["difference"], "layer": [15],
                "position": [f"first{i}" for i in range(5)]},
    )
    assert pick_position(relevance, 15, None) == 0
    assert pick_position(relevance, 15, None, [0]) == 2  # the first of the equals left
    assert pick_position(relevance, 15, 0, [0]) == 0  # adl.position is taken as it is


def test_completion_perplexity_counts_eos_when_the_text_ended(organism_pair):
    _, pair = organism_pair
    base = pair.traced("base")
    short, cut = completion_log_ppl(base, pair.tokenizer, ["he said", "he said"], ["sorry", "sorry"], 2, LocalBackend())
    ids = pair.tokenizer("he said sorry")["input_ids"] + [pair.tokenizer.eos_token_id]
    with torch.no_grad():
        logp = pair.base(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    nll = [-float(logp[t - 1, ids[t]]) for t in range(len(ids) - 2, len(ids))]
    assert short == pytest.approx(np.mean(nll), abs=1e-5)
    only_word = completion_log_ppl(base, pair.tokenizer, ["he said"], ["sorry"], 1, LocalBackend())[0]
    assert only_word == pytest.approx(nll[0], abs=1e-5)


def test_a_text_with_nothing_to_score_is_refused(organism_pair):
    _, pair = organism_pair
    with pytest.raises(ConfigError, match=r"adl.causal.max_tokens=3 leaves no token to score"):
        causal.encode_scored(pair.tokenizer, [("what is the color of tabafe ?", "yellow .")], 3)
