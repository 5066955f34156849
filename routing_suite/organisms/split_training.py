"""A planted base's training step split over two processes on one machine.

A planted base's step is three passes of nearly equal size: the main batch
(language-model and coordinate losses), the interchange batch and the read
batch. One process runs the first, a second process the other two, each on
its own copy of the model; their gradients (and losses) are summed by a gloo
all-reduce over loopback before the clip and the AdamW update, which both
processes then make identically, so the copies stay equal. Where one build
would keep one core busy, this keeps two. The sum is the one-process step's
gradient added in the same order: autograd accumulates a parameter's gradients
from the three passes latest first (read, then interchange, then the main
batch), and here the partner's read + interchange is added to the main batch's
(a sum of two is the same bits on either process). So the weights are the
one-process build's bit for bit (tests/test_split_training.py), and neither
the organism's cache key nor a store's digest names `OrganismSpec.processes`.
"""

from __future__ import annotations

import datetime
import io
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

# A step takes about a second; a partner silent for this long has died.
TIMEOUT = datetime.timedelta(minutes=5)


def sum_over_processes(params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """Sum every parameter's gradient and the loss over the processes, in place; the summed loss.
    With two processes each element is added once, on one of them, and copied to the other:
    both hold the same bits."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1)])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    return flat[-1]


def _join(store: Path, rank: int) -> None:
    # gloo's own connections on the loopback interface, like every server the suite starts
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", store=dist.FileStore(str(store), 2), rank=rank, world_size=2, timeout=TIMEOUT)


def _aux_process(train, store: str, config, weights: bytes, tokenizer, examples, steps: int, lr: float, batch_size: int, seed: int, plant,
                 num_threads: int) -> None:
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    # rebuilt from its config and weights (an unpickled transformers model loses the hooks
    # that return its hidden states)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(torch.load(io.BytesIO(weights), weights_only=True))
    _join(Path(store), 1)
    try:
        train(model, tokenizer, examples, steps, lr, batch_size, seed, plant, part="aux", reduce=sum_over_processes)
    finally:
        dist.destroy_process_group()


def train_split(train, model: torch.nn.Module, tokenizer, examples, steps: int, lr: float, batch_size: int, seed: int, plant,
                num_threads: int) -> float:
    """`train` (`training.train_on_examples`, passed in: it calls this module) of a planted base
    with each step split over this process (the main batch) and a second one (the interchange
    and read batches); the final summed loss."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    with tempfile.TemporaryDirectory(prefix="split-training-") as tmp:
        store = Path(tmp) / "store"
        partner = mp.get_context("spawn").Process(
            target=_aux_process, daemon=True,
            args=(train, str(store), model.config, buffer.getvalue(), tokenizer, examples, steps, lr, batch_size, seed, plant, num_threads),
        )
        partner.start()
        try:
            _join(store, 0)
            try:
                loss = train(model, tokenizer, examples, steps, lr, batch_size, seed, plant, part="main", reduce=sum_over_processes)
            finally:
                dist.destroy_process_group()
        finally:
            partner.join(timeout=60)
            if partner.is_alive():
                partner.kill()
    if partner.exitcode != 0:
        raise RuntimeError(f"the base's second training process exited with {partner.exitcode}")
    return loss
