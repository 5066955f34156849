"""A planted base's training step split over two processes (organisms/split_training) is a
speed-up only: the same weights, bit for bit, as one process. Autograd adds a parameter's
gradients from the three passes latest first (read, then interchange, then the main batch);
the split adds the second process's read + interchange to the first's main batch, the same
additions in the same order. That is why the organism cache does not key on the split."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from helpers import TINY_ARCH, TINY_TASK
from transformers import AutoModelForCausalLM

from routing_suite.errors import ConfigError
from routing_suite.organisms import build as B
from routing_suite.organisms import task as T
from routing_suite.organisms.architectures import family_config, family_seed
from routing_suite.organisms.specs import ArchSpec, TaskSpec, TrainSpec
from routing_suite.organisms.training import train_base, train_on_examples


def _trained(family: str, processes: int, steps: int = 8) -> tuple[str, float]:
    spec = B.OrganismSpec(family, ArchSpec(**TINY_ARCH), TaskSpec(**TINY_TASK), TrainSpec(base_steps=steps, batch_size=16, lora_layers=[1, 2]),
                          pretraining="persona_planted", processes=processes)
    task = T.make_task(spec.task)
    tokenizer = B.new_tokenizer(task, spec.pretraining)
    seed = family_seed(family, 0)
    with B.deterministic(seed, 1):
        config = family_config(family, spec.arch, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
        model = AutoModelForCausalLM.from_config(config)
        loss = train_base(model, tokenizer, task, spec.train, seed, spec.pretraining, spec.processes)
    weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    return hashlib.sha256(weights).hexdigest(), loss


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_base_trained_over_two_processes_has_the_one_process_bits(family):
    one, loss_one = _trained(family, 1)
    two, loss_two = _trained(family, 2)
    assert two == one
    assert loss_two == pytest.approx(loss_one, rel=1e-5)  # the logged loss is summed in another order


def test_the_split_is_for_planted_bases_only():
    for pretraining, processes in (("routing", 2), ("persona", 2), ("persona_planted", 3)):
        with pytest.raises(ConfigError, match=f"model.processes={processes}: 1, or 2 for a planted persona base"):
            B.OrganismSpec("llama", ArchSpec(), TaskSpec(), TrainSpec(), pretraining=pretraining, processes=processes)
    spec = B.OrganismSpec("llama", ArchSpec(), TaskSpec(), TrainSpec(), pretraining="persona_planted", processes=2)
    assert spec.base_key() == B.OrganismSpec("llama", ArchSpec(), TaskSpec(), TrainSpec(), pretraining="persona_planted").base_key()
    with pytest.raises(ValueError, match="'main' and 'aux' split a planted base's step"):
        train_on_examples(torch.nn.Linear(2, 2), None, [], 1, 1e-3, 2, 0, part="main")


def test_a_family_built_with_two_processes_is_the_family_built_with_one(tmp_path):
    """Through the cache (`build.ensure_adapters`, as experiments.em builds a family): the split
    base, then the fine-tunes two at a time, land in the same cache entries with the same bits."""
    kinds = ["persona_color", "persona_animal"]
    digests = []
    for processes in (1, 2):
        spec = B.OrganismSpec("llama", ArchSpec(**TINY_ARCH), TaskSpec(**TINY_TASK),
                              TrainSpec(base_steps=6, lora_steps=3, batch_size=16, lora_layers=[1, 2]),
                              pretraining="persona_planted", processes=processes)
        root = tmp_path / str(processes)
        B.ensure_adapters(root, spec, kinds)
        built = [B.base_dir(root, spec), *(B.adapter_dir(root, spec, k) for k in kinds)]
        digests.append({p.name: json.loads((p / "organism.json").read_text())["weights_sha256"] for p in built})
        assert json.loads((built[0] / "organism.json").read_text())["processes"] == processes
    assert digests[0] == digests[1]


def test_the_split_leaves_a_stores_digest_alone():
    """A store made on a base built with two processes is the store made with one (the same bits)."""
    from routing_suite.provenance import result_config

    one = {"model": {"family": "llama", "pretraining": "persona_planted", "processes": 1}, "seed": 0}
    two = {"model": {"family": "llama", "pretraining": "persona_planted", "processes": 2}, "seed": 0}
    assert result_config(one) == result_config(two)
