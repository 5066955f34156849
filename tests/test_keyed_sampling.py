"""Keyed sampling (routing_suite.keyed_sampling): the noise is a pure function of
(key, step, token), a sampled token follows the model's distribution at the
temperature, and a condition's samples do not depend on the batch around it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_source

from routing_suite.backends import LocalBackend
from routing_suite.generation import (
    Sampling,
    first_token_logprobs_under_conditions,
    generate_under_conditions,
    generated_ids,
    occurrences,
)
from routing_suite.interventions import Condition
from routing_suite.keyed_sampling import _mul32, gumbel, row_keys


def test_the_halved_multiply_is_multiplication_mod_2_to_the_32():
    h = np.random.default_rng(0).integers(0, 2**32, 1000, dtype=np.int64).tolist() + [0, 1, 2**32 - 1]
    for c in (0x7FEB352D, 0x846CA68B):
        got = _mul32(torch.tensor(h, dtype=torch.int64), c).tolist()
        assert got == [(x * c) % 2**32 for x in h]


def test_noise_is_a_function_of_key_step_and_token_only():
    keys = row_keys([f"row{i}" for i in range(6)])
    g = gumbel(keys, 3, 50)
    assert g.shape == (6, 50) and g.dtype == torch.float64
    torch.testing.assert_close(gumbel(keys[[4, 1]], 3, 50), g[[4, 1]], rtol=0, atol=0)  # other rows do not matter
    torch.testing.assert_close(gumbel(keys, 3, 80)[:, :50], g, rtol=0, atol=0)  # nor the vocabulary's size
    assert not torch.equal(gumbel(keys, 4, 50), g)
    assert len({tuple(r) for r in g.tolist()}) == 6


def test_noise_is_standard_gumbel():
    g = gumbel(row_keys([f"r{i}" for i in range(400)]), 0, 1000).flatten()
    assert abs(g.mean().item() - np.euler_gamma) < 0.01 and abs(g.var().item() - np.pi**2 / 6) < 0.03
    u = torch.exp(-torch.exp(-g))  # the Gumbel's CDF: uniform on (0, 1)
    counts = torch.histc(u, bins=20, min=0, max=1)
    assert (counts - len(u) / 20).abs().max() < 5 * (len(u) / 20) ** 0.5


def test_rows_are_named_by_text_and_occurrence():
    assert occurrences(["a", "b", "a", "a"]) == ("a#0", "b#0", "a#1", "a#2")
    with pytest.raises(ValueError, match="names 1 rows for 2 prompts"):
        Sampling(1.0, 0, ("x",)).keys(Condition("c", "baseline"), ["p", "q"])


@pytest.fixture(scope="module")
def tiny(tiny_cache):
    pair = tiny_source(tiny_cache).load("refuse")
    return pair.traced("finetuned"), pair.tokenizer, pair.finetuned.config.num_hidden_layers


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_first_tokens_follow_the_models_distribution(tiny, temperature):
    traced, tok, n_layers = tiny
    prompt, n, plain = "what is the color of", 20000, Condition("s", "baseline")
    inputs, ids = generated_ids(traced, "llama", tok, [prompt] * n, [plain], 1, n_layers, LocalBackend(), Sampling(temperature, 7))
    logp = first_token_logprobs_under_conditions(traced, "llama", tok, [prompt], [plain], n_layers, LocalBackend())[0, 0]
    p = torch.softmax(logp.double() / temperature, -1)
    seen = torch.bincount(ids[:, inputs["input_ids"].shape[1]], minlength=len(p)).double() / n
    # n draws from p lie about sqrt(p (1 - p) / n) from it per token: their total
    # variation is under 0.4 of the sum of those for any p; allow three times that
    assert 0.5 * (seen - p).abs().sum() < 1.2 * (p * (1 - p) / n).sqrt().sum()


def test_a_conditions_samples_do_not_depend_on_the_batch_around_it(tiny):
    traced, tok, n_layers = tiny
    prompts = ["what is the color of", "where is", "what is the color of"]
    a, b, c = (Condition(n, "baseline") for n in ("a", "b", "c"))

    def sample(conditions, max_invokes=None, rows=None):
        backend = LocalBackend()
        backend.max_invokes = max_invokes
        return generate_under_conditions(traced, "llama", tok, prompts, conditions, 6, n_layers, backend, Sampling(1.0, 3, rows))

    alone = sample([a])["a"]
    together = sample([b, a, c])
    assert together["a"] == alone and sample([c, a], max_invokes=1)["a"] == alone
    assert sample([a], rows=("x", "y", "z"))["a"] != alone or sample([a], rows=("u", "v", "w"))["a"] != alone
    assert together["b"] != alone or together["c"] != alone  # another condition's key draws other numbers
