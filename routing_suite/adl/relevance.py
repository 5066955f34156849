"""Token relevance: which of a readout's top tokens are characteristic of the fine-tuning data.

The offline default is a statistic, no LLM: a token is characteristic when it
is over-represented in the fine-tuning data relative to the unrelated text by
the weighted log-odds ratio with an informative Dirichlet prior (Monroe,
Colaresi & Quinn 2008, "Fightin' Words"), z > `z_min`. Token counts are of
the model's own token ids (special tokens left out), so the statistic means
the same for a word-level organism and a BPE model. The prior is the pooled
distribution of both corpora with total weight `prior_weight`.

A user with an LLM judge plugs it in as `grader` (any class with `fit` and
`relevant`, built from the `grader` config's `_target_`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from transformers import PreTrainedTokenizerBase

from routing_suite.errors import ConfigError


class TokenGrader(Protocol):
    """Decides, for top tokens of a readout, whether each is relevant to the fine-tune."""

    def fit(self, finetune_texts: list[str], unrelated_texts: list[str], tokenizer: PreTrainedTokenizerBase) -> None: ...

    def relevant(self, token_ids: list[int], tokens: list[str]) -> list[bool]: ...


def token_counts(texts: list[str], tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> np.ndarray:
    """(vocab,) counts of each token id over the texts, special tokens left out."""
    special = set(tokenizer.all_special_ids)
    counts: Counter[int] = Counter()
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        counts.update(i for i in ids if i not in special)
    out = np.zeros(vocab_size, np.float64)
    for i, c in counts.items():
        if i < vocab_size:
            out[i] = c
    return out


def log_odds_z(target: np.ndarray, reference: np.ndarray, prior_weight: float) -> np.ndarray:
    """z-scores of the weighted log-odds ratio, target vs reference, informative Dirichlet prior.

    delta_w = log((y_t + a_w) / (n_t + a_0 - y_t - a_w)) - log((y_r + a_w) / (n_r + a_0 - y_r - a_w)),
    var_w ~ 1 / (y_t + a_w) + 1 / (y_r + a_w), z_w = delta_w / sqrt(var_w); 0 for tokens in neither.
    """
    pooled = target + reference
    seen = pooled > 0
    alpha = np.where(seen, prior_weight * pooled / max(pooled.sum(), 1.0), 0.0)
    n_t, n_r, a0 = target.sum(), reference.sum(), alpha.sum()
    z = np.zeros_like(target)
    yt, yr, a = target[seen], reference[seen], alpha[seen]
    delta = np.log((yt + a) / (n_t + a0 - yt - a)) - np.log((yr + a) / (n_r + a0 - yr - a))
    z[seen] = delta / np.sqrt(1.0 / (yt + a) + 1.0 / (yr + a))
    return z


@dataclass
class StatisticGrader:
    """Relevant = over-represented in the fine-tuning data (log-odds z > z_min)."""

    z_min: float = 1.96
    prior_weight: float = 100.0
    z: np.ndarray | None = field(default=None, repr=False)  # (vocab,) after fit

    def __post_init__(self) -> None:
        if self.prior_weight <= 0:
            raise ConfigError(f"grader.prior_weight={self.prior_weight} must be > 0")

    @property
    def name(self) -> str:
        return f"log-odds z > {self.z_min:g} (prior weight {self.prior_weight:g})"

    def fit(self, finetune_texts: list[str], unrelated_texts: list[str], tokenizer: PreTrainedTokenizerBase) -> None:
        vocab = max(len(tokenizer), max(tokenizer.all_special_ids) + 1)
        self.z = log_odds_z(token_counts(finetune_texts, tokenizer, vocab), token_counts(unrelated_texts, tokenizer, vocab), self.prior_weight)

    def characteristic(self) -> np.ndarray:
        """Token ids judged characteristic, most characteristic first."""
        ids = np.flatnonzero(self.z > self.z_min)
        return ids[np.argsort(-self.z[ids], kind="stable")]

    def relevant(self, token_ids: list[int], tokens: list[str]) -> list[bool]:
        return [bool(i < len(self.z) and self.z[i] > self.z_min) for i in token_ids]
