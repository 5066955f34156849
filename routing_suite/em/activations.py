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


def answer_means(models: EmModels, model: str, prompts: list[str], answers: list[str], backend) -> np.ndarray:
    """(n, layer, hidden) answer-token means; NaN rows for empty answers."""
    request = SiteRequest(("resid",), None, "answer_mean").validate(models.num_layers)
    out = np.full((len(prompts), models.num_layers, models.hidden_size), np.nan, np.float32)
    keep = [i for i, a in enumerate(answers) if a.strip()]
    traced = models.traced(model)
    for start in range(0, len(keep), backend.batch_size):
        rows = keep[start : start + backend.batch_size]
        batch = make_batch(models.tokenizer, [prompts[i] for i in rows], request, [answers[i] for i in rows])
        resid = trace_sites([traced], models.family, batch, request, 0, backend)[0]["resid"]
        out[rows] = resid[:, :, 0].numpy()
    return out


def last_token_residuals(models: EmModels, model: str, texts: list[str], backend) -> np.ndarray:
    """(n, layer, hidden) residuals at the last token of each text."""
    request = SiteRequest(("resid",), None, "last").validate(models.num_layers)
    traced = models.traced(model)
    values = []
    for start in range(0, len(texts), backend.batch_size):
        batch = make_batch(models.tokenizer, texts[start : start + backend.batch_size], request)
        values.append(trace_sites([traced], models.family, batch, request, 0, backend)[0]["resid"][:, :, 0].numpy())
    return np.concatenate(values)


def token_residuals(models: EmModels, model: str, texts: list[str], backend) -> np.ndarray:
    """(tokens, layer, hidden) residuals of every token after <bos> of `texts`."""
    longest = max(len(models.tokenizer(t)["input_ids"]) for t in texts)
    request = SiteRequest(("resid",), None, "first_k", k=longest).validate(models.num_layers)
    traced = models.traced(model)
    values = []
    for start in range(0, len(texts), backend.batch_size):
        batch = make_batch(models.tokenizer, texts[start : start + backend.batch_size], request)
        resid = trace_sites([traced], models.family, batch, request, 0, backend)[0]["resid"]  # (b, layer, k, hidden)
        values.append(resid.permute(0, 2, 1, 3)[batch.valid].numpy())
    return np.concatenate(values)
