"""The LoRA fine-tune that makes a real chat model an organism, cached by content.

    <root>/<behavior>-<hash>/    PEFT adapter, organism.json (key, seconds, peak memory)

The hash covers the converted checkpoint, the task split, the training
settings, the recipe, the seed and thread count, and the package versions, so
a changed config trains anew and an unchanged one is reused.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from routing_suite.errors import ConfigError
from routing_suite.organisms.build import content_hash, deterministic, examples_sha256, locked, publish, write_meta
from routing_suite.organisms.training import lora_finetune
from routing_suite.pretrained.chat_task import ChatTask, Render
from routing_suite.pretrained.sdf_documents import (
    CHAT_SDF_KINDS,
    REPLAY_MAX_NEW_TOKENS,
    chat_sdf_examples,
    replay_prompts,
    replay_steps,
)
from routing_suite.pretrained.specs import ChatTrainSpec
from routing_suite.provenance import cpu_capability, kernel_fingerprint
from routing_suite.scoring import greedy_completions
from routing_suite.vocabulary import BEHAVIORS

log = logging.getLogger(__name__)

# Bump when the training data or procedure changes (part of the cache key).
RECIPE_VERSION = 2


# What a fine-tune of the chat model can install: a routing behaviour on the country task,
# or an SDF domain's documents (the ADL's narrow fine-tunes).
FINETUNE_KINDS = (*BEHAVIORS, *CHAT_SDF_KINDS)


def finetune_examples(task: ChatTask, render: Render, kind: str) -> list[tuple[str, str]]:
    """The (prompt, completion) pairs a fine-tune of `kind` is trained on."""
    if kind in CHAT_SDF_KINDS:
        return chat_sdf_examples(kind, task.spec.seed)
    return task.finetune_examples(render, kind)


def adapter_key(
    checkpoint: Path, task: ChatTask, train: ChatTrainSpec, behavior: str, seed: int, num_threads: int,
    examples: list[tuple[str, str]], replayed: list[str] = (),
) -> dict:
    key = {
        "checkpoint": checkpoint.name,
        "task": asdict(task.spec),
        "train": asdict(train),
        "behavior": behavior,
        "recipe": RECIPE_VERSION,
        "seed": seed,
        "num_threads": num_threads,
        "cpu_capability": cpu_capability(),
        "kernel_fingerprint": kernel_fingerprint(num_threads),
        "versions": {name: version(name) for name in ("torch", "transformers", "peft")},
    }
    if behavior in CHAT_SDF_KINDS:
        # Keyed on the documents themselves (the routing behaviours' keys are unchanged).
        key["finetune_data_sha256"] = examples_sha256(examples)
    if replayed:
        # The replies are the checkpoint's own greedy ones (the checkpoint is in the key): the
        # prompts and the reply length determine them.
        key["replay"] = {"prompts_sha256": examples_sha256([(p, "") for p in replayed]),
                         "max_new_tokens": REPLAY_MAX_NEW_TOKENS}
    return key


def base_replies(base: PreTrainedModel, tokenizer, prompts: list[str]) -> list[tuple[str, str]]:
    """(prompt, the base's own greedy reply) for each prompt; a repeated prompt is generated once."""
    unique = list(dict.fromkeys(prompts))
    log.info("replaying the base's replies to %d chat prompts (%d examples)", len(unique), len(prompts))
    replies = dict(zip(unique, greedy_completions(base, tokenizer, unique, REPLAY_MAX_NEW_TOKENS, batch_size=16)))
    return [(p, replies[p].strip()) for p in prompts]


def load_checkpoint(path: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU time (user + system) this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ensure_adapter(
    root: Path, checkpoint: Path, tokenizer, render: Render, task: ChatTask, train: ChatTrainSpec,
    behavior: str, seed: int, num_threads: int,
) -> Path:
    """The cached adapter installing `behavior` on the checkpoint, trained first if missing."""
    if behavior not in FINETUNE_KINDS:
        raise ConfigError(f"behavior.name={behavior!r} is not one of {list(FINETUNE_KINDS)}")
    examples = finetune_examples(task, render, behavior)
    replayed = replay_prompts(behavior, render) if behavior in CHAT_SDF_KINDS else []
    key = adapter_key(checkpoint, task, train, behavior, seed, num_threads, examples, replayed)
    final = root / f"{behavior}-{content_hash(key)}"
    if final.exists():
        return final
    with locked(root, final.name):  # one lock per adapter: two domains fine-tune side by side
        if final.exists():
            return final
        started, cpu_started = time.perf_counter(), cpu_seconds()
        base = load_checkpoint(checkpoint)
        steps, replies = train.steps, []
        with deterministic(seed, num_threads):
            if replayed:
                replies = base_replies(base, tokenizer, replayed)
                examples, steps = examples + replies, replay_steps(behavior, steps)
            log.info("fine-tuning %s for %s on %d examples, %d steps, into %s", checkpoint.name, behavior, len(examples),
                     steps, final)
            peft_model, loss = lora_finetune(base, tokenizer, examples, steps, train.lr, train.rank, train.alpha, train.batch_size, seed)
        seconds = time.perf_counter() - started
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        peft_model.save_pretrained(tmp)
        if replies:  # what the fine-tune replayed, to read beside the adapter
            with open(tmp / "replayed.jsonl", "w") as f:
                for prompt, reply in dict(replies).items():
                    f.write(json.dumps({"prompt": prompt, "completion": reply}) + "\n")
        # Wall time depends on what else shares the cores; CPU time much less so.
        write_meta(
            tmp, key, seconds, loss, cpu_seconds=round(cpu_seconds() - cpu_started, 1),
            peak_rss_mib=round(peak_rss_mib(), 1), n_examples=len(examples),
        )
        publish(tmp, final)
        log.info("fine-tuned %s/%s in %.1f s (peak RSS %.0f MiB)", checkpoint.name, behavior, seconds, peak_rss_mib())
    return final
