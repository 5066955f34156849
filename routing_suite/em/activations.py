"""Residual-stream reads for the EM study, through the suite's batched traces.

- `answer_means`: per response, the mean residual over its answer tokens at
  every layer (prompt + response teacher-forced; `positions="answer_mean"`).
- `last_token_residuals`: the residual at each text's last token, every layer.
- `token_residuals`: every real token's residual after <bos> of given texts
  (`positions="first_k"` with k the longest text, padding dropped), for
  matching the magnitude of controls.
"""

from __future__ import annotations

import numpy as np

from routing_suite.em.models import EmModels
from routing_suite.tracing import SiteRequest, make_batch, trace_sites


def _batched_resid(models: EmModels, model: str, request: SiteRequest, texts: list[str], answers: list[str] | None, backend):
    """Per batch of `backend.batch_size` texts (with their answers, if any): (row slice, the
    traced batch, its "resid" reads). The one batching loop of the three reads below."""
    traced = models.traced(model)
    for start in range(0, len(texts), backend.batch_size):
        rows = slice(start, start + backend.batch_size)
        batch = make_batch(models.tokenizer, texts[rows], request, None if answers is None else answers[rows])
        yield rows, batch, trace_sites([traced], models.family, batch, request, 0, backend)[0]["resid"]


def answer_means(models: EmModels, model: str, prompts: list[str], answers: list[str], backend) -> np.ndarray:
    """(n, layer, hidden) answer-token means; NaN rows for empty answers."""
    request = SiteRequest(("resid",), None, "answer_mean").validate(models.num_layers)
    out = np.full((len(prompts), models.num_layers, models.hidden_size), np.nan, np.float32)
    keep = np.array([i for i, a in enumerate(answers) if a.strip()], dtype=np.int64)
    kept_prompts, kept_answers = [prompts[i] for i in keep], [answers[i] for i in keep]
    for rows, _, resid in _batched_resid(models, model, request, kept_prompts, kept_answers, backend):
        out[keep[rows]] = resid[:, :, 0].numpy()
    return out


def last_token_residuals(models: EmModels, model: str, texts: list[str], backend) -> np.ndarray:
    """(n, layer, hidden) residuals at the last token of each text."""
    request = SiteRequest(("resid",), None, "last").validate(models.num_layers)
    return np.concatenate([resid[:, :, 0].numpy() for _, _, resid in _batched_resid(models, model, request, texts, None, backend)])


def token_residuals(models: EmModels, model: str, texts: list[str], backend) -> np.ndarray:
    """(tokens, layer, hidden) residuals of every token after <bos> of `texts`."""
    longest = max(len(models.tokenizer(t)["input_ids"]) for t in texts)
    request = SiteRequest(("resid",), None, "first_k", k=longest).validate(models.num_layers)
    # (b, layer, k, hidden) -> the batch's real tokens
    return np.concatenate([resid.permute(0, 2, 1, 3)[batch.valid].numpy()
                           for _, batch, resid in _batched_resid(models, model, request, texts, None, backend)])
