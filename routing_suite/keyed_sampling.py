"""Sampling keyed on what a response is, not on where it sits in a batch.

A sampled token is the argmax of logits / temperature plus Gumbel noise
(the Gumbel-max trick: an exact draw from softmax(logits / temperature)).
The noise of a row comes from a counter-based hash of the row's key and the
step, never from a generator's state, so a response's random numbers do not
depend on which other conditions, draws or prompts share its batch: two runs
that differ only in their other conditions sample the same texts wherever
their own conditions agree, and a comparison of two conditions is paired on
their random numbers as well as their prompts (common random numbers).

The hash is integer arithmetic on int64 tensors kept below 2**49 (no
overflow: the same bits on every CPU and GPU), so it runs unchanged inside an
nnsight trace, locally or on a server, where the logits are.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mul32(h: Tensor, c: int) -> Tensor:
    """(h * c) mod 2**32 for 0 <= h < 2**32, in halves so no product passes 2**49."""
    return ((h & 0xFFFF) * c + ((((h >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix32(h: Tensor) -> Tensor:
    """A 32-bit avalanche finalizer (xor-shift, multiply; constants of C. Wellons' lowbias32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _mul32(h, 0x846CA68B)
    return h ^ (h >> 16)


def row_keys(names: list[str]) -> Tensor:
    """(rows, 2) int64 keys, two 32-bit words of a row name's BLAKE2b digest."""
    words = [hashlib.blake2b(n.encode(), digest_size=8).digest() for n in names]
    return torch.tensor([[int.from_bytes(w[:4], "little"), int.from_bytes(w[4:], "little")] for w in words], dtype=torch.int64)


def gumbel(keys: Tensor, step: int, vocab: int) -> Tensor:
    """(rows, vocab) float64 standard Gumbel noise of step `step`, a function of (key, step, token) only."""
    token = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    at_step = _mix32(keys[:, 0] ^ _mix32(torch.full_like(keys[:, 0], step)))
    h = _mix32(_mix32(at_step[:, None] ^ token[None, :]) ^ keys[:, 1, None])
    u = (h.double() + 0.5) / 2.0**32
    return -torch.log(-torch.log(u))


def sample_in_place(logits: Tensor, keys: Tensor, step: int, temperature: float) -> None:
    """Replace (rows, vocab) next-token logits by 0 at the keyed sample and -inf elsewhere,
    so greedy decoding takes the sample (exact in any dtype: nothing is rounded but the argmax)."""
    z = logits.double() / temperature + gumbel(keys.to(logits.device), step, logits.shape[-1])
    chosen = z.argmax(-1, keepdim=True)
    logits.fill_(float("-inf"))
    logits.scatter_(-1, chosen, 0.0)
