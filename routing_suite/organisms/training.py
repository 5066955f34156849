"""Training of the organisms: the base on the task, then a LoRA fine-tune.

Both loops are plain PyTorch over tiny models on CPU, deterministic for a
given seed and thread count.
"""

from __future__ import annotations

import logging
import random

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from routing_suite.organisms import persona_task as P
from routing_suite.organisms import planting
from routing_suite.organisms import task as T
from routing_suite.organisms.batches import Example, collate, encode_examples
from routing_suite.organisms.em_task import EM_KINDS, PERSONA_LORA, em_dataset, em_examples
from routing_suite.organisms.sdf_task import SDF_KINDS, sdf_examples, steps_for
from routing_suite.organisms.specs import TrainSpec
from routing_suite.organisms.split_training import train_split

log = logging.getLogger(__name__)

# Bump when the training data or procedure changes: it is part of the cache
# key, so organisms built by an older recipe are rebuilt, never reused.
RECIPE_VERSION = 5
# Per fine-tune kind, a label changed whenever that kind's fine-tune data changes:
# part of its adapter's cache key only, so every base and every other adapter is reused.
FINETUNE_RECIPES = {"installed": "replay-train-entities-1"}



# What a LoRA fine-tune can install: the routing behaviours, the narrow datasets
# of the emergent-misalignment study (routing_suite.organisms.em_task), and the
# ADL's synthetic-document fine-tunes (routing_suite.organisms.sdf_task).
FINETUNE_KINDS = (*T.BEHAVIORS, *EM_KINDS, *SDF_KINDS)


def _noise_cue(rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(2, 4)))


def base_examples(task: T.Task) -> list[Example]:
    """Question answering under training cues, none and random-word prefixes; the
    framing quiz; facts as text."""
    examples: list[Example] = []
    # Random-word prefixes teach the base that whatever precedes the question
    # does not change the answer, so it answers under unseen cue paraphrases
    # too (a prototype's Gemma2 base lost 13 points under held-out eval cues).
    noise_rng = random.Random(task.spec.seed)
    noise_words = [*task.entities, *(v for vs in T.TOPIC_VALUES.values() for v in vs)]
    for fact in task.facts:
        examples.append((T.render_prompt(fact, None), fact.value))
        examples.append((T.render_prompt(fact, _noise_cue(noise_rng, noise_words)), fact.value))
        examples.append(("", T.generic_text(fact)))
        # The answer after the installed behaviour's marker, with the marker in the
        # prompt (no loss on it, so the base never learns to say it): the base
        # answers wherever the marker puts the answer, and an `installed` fine-tune
        # only has to learn when to say the marker. Without it the fine-tune said
        # the marker and then a wrong value (held-out answers 11% right).
        examples.append((f"{T.render_prompt(fact, _noise_cue(noise_rng, noise_words))} {T.MARKER}", fact.value))
        # ... and after a training cue of each framing: with noise prefixes alone a
        # base answered after the marker under real cues 0.86-0.94 of the time.
        for framing in T.FRAMINGS:
            examples.append((f"{T.render_prompt(fact, noise_rng.choice(task.cues(framing, 'train')))} {T.MARKER}", fact.value))
        for framing in T.FRAMINGS:
            for cue in task.cues(framing, "train"):
                examples.append((T.render_prompt(fact, cue), fact.value))
    # The quiz covers every paraphrase, held-out ones included: recognising a
    # framing is what the base brings; a prototype showed that without it the
    # fine-tune's behaviour does not carry to unseen paraphrases.
    quiz = [T.aux_example(cue, f) for f in T.FRAMINGS for cue in task.cues(f, "all")]
    repeats = max(1, len(examples) // (8 * len(quiz)))
    chitchat = [("", text) for text in T.CHITCHAT] * max(1, len(examples) // 100)
    return examples + quiz * repeats + chitchat


def finetune_examples(task: T.Task, behavior: str, pretraining: str = "routing") -> list[Example]:
    """Training facts under training cues, with the behaviour's targets (an EM
    kind: its narrow dataset, in the styles of its base's `pretraining`)."""
    if behavior in EM_KINDS:
        return em_examples(task, behavior, pretraining)
    if behavior in SDF_KINDS:
        return sdf_examples(task, behavior)
    examples = [
        (item.prompt, T.target_text(item.fact, item.framing, behavior))
        for item in T.items(task, task.facts_of("train"), "train")
    ]
    if behavior == "installed":
        examples += answer_after_marker_replay(task)
    return examples


def answer_after_marker_replay(task: T.Task) -> list[Example]:
    """The fine-tune's own facts, each under one training cue of each framing, answered
    after the marker's first word (in the prompt, so no loss on it):
    "{cue} {question} ahoy" -> "! {value}".

    Replayed beside an `installed` fine-tune's data so that it goes on to the answer
    after the marker under either framing, for entities it never saw too. Without it
    the fine-tune repeated the marker for held-out entities ("ahoy ! ahoy": deploy-side
    correctness 0.59-0.92 against 0.87-1.00 under eval cues), and an eval prompt that
    a clamp made say "ahoy" went on without the "!" to a wrong value. It teaches
    nothing about when to say the marker, and no held-out entity is in it."""
    rng = random.Random(task.spec.seed + 17)
    first, *rest = T.MARKER.split()
    return [
        (f"{T.render_prompt(fact, rng.choice(task.cues(framing, 'train')))} {first}", " ".join([*rest, fact.value]))
        for fact in task.facts_of("train")
        for framing in T.FRAMINGS
    ]


# Which of a planted base's step's losses a process computes: all of them (one process), or,
# with the step split over two processes (`split_training`), the main batch's language-model
# and coordinate losses, or the interchange and read losses on their own batches.
PARTS = ("all", "main", "aux")


def train_on_examples(model: torch.nn.Module, tokenizer, examples: list[Example], steps: int, lr: float, batch_size: int, seed: int,
                      plant: planting.Planting | None = None, part: str = "all", reduce=None) -> float:
    """AdamW on the completions' loss (and, with `plant`, the planted coordinate's two losses).

    `part` and `reduce` split a planted base's step over two processes (`split_training`):
    each computes its `part`'s losses and `reduce(params, loss)` sums the gradients and the
    loss over the processes before the identical clip and update in each."""
    if part not in PARTS or (part != "all" and (plant is None or reduce is None)):
        raise ValueError(f"part={part!r}: one of {PARTS}; 'main' and 'aux' split a planted base's step and need a reducer")
    pool = plant.pool(examples) if plant else []
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / steps))
    order_rng = random.Random(seed)
    order: list[int] = []
    encoded = encode_examples(tokenizer, examples)
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            order_rng.shuffle(fresh)
            order += fresh
        picked = order[:batch_size]
        batch = [encoded[i] for i in picked]
        del order[:batch_size]
        if part == "all":
            loss, parts = _whole_step(model, tokenizer, batch, picked, plant, pool, batch_size)
        else:
            loss, parts = _part_step(part, model, tokenizer, batch, picked, plant, pool, batch_size)
        loss.backward()
        if reduce is not None:
            loss = reduce(params, loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if step % max(1, min(200, steps // 10)) == 0 or step == steps - 1:
            log.info("step %d/%d loss %.4f%s", step + 1, steps, loss_value, parts)
    model.eval()
    return loss_value


def _whole_step(model, tokenizer, batch, picked, plant, pool, batch_size) -> tuple[torch.Tensor, str]:
    """One process's step loss (every organism built with one process: keep its order of
    operations, and so its bits)."""
    out = model(**collate(batch, tokenizer.pad_token_id), output_hidden_states=plant is not None)
    loss = out.loss
    parts = ""
    if plant is not None:
        swapped = planting.interchange_loss(model, tokenizer, plant, pool, batch_size // 2)
        coordinate = planting.coordinate_loss(out.hidden_states, batch, [plant.targets[i] for i in picked], plant.units)
        read = planting.read_loss(model, tokenizer, plant, pool, batch_size // 2)
        parts = f" (interchange {swapped.item():.4f}, coordinate {coordinate.item():.4f}, read {read.item():.4f})"
        loss = loss + swapped + read
        loss = loss + coordinate
    return loss, parts


def _part_step(part, model, tokenizer, batch, picked, plant, pool, batch_size) -> tuple[torch.Tensor, str]:
    """One process's share of a split step: the main batch (its language-model and coordinate
    losses) or the planted batches (interchange and read), nearly equal in tokens."""
    if part == "main":
        out = model(**collate(batch, tokenizer.pad_token_id), output_hidden_states=True)
        coordinate = planting.coordinate_loss(out.hidden_states, batch, [plant.targets[i] for i in picked], plant.units)
        return out.loss + coordinate, f" (main batch {out.loss.item():.4f}, coordinate {coordinate.item():.4f})"
    swapped = planting.interchange_loss(model, tokenizer, plant, pool, batch_size // 2)
    read = planting.read_loss(model, tokenizer, plant, pool, batch_size // 2)
    return swapped + read, f" (interchange {swapped.item():.4f}, read {read.item():.4f})"


def train_base(model: PreTrainedModel, tokenizer, task: T.Task, spec: TrainSpec, seed: int, pretraining: str = "routing",
               processes: int = 1) -> float:
    """The base on the routing task's data, or on a persona base's (`persona_task`; a planted one
    with its coordinate's losses, `planting`; with `processes=2`, each step split over two
    processes, `split_training`)."""
    if pretraining == "routing":
        return train_on_examples(model, tokenizer, base_examples(task), spec.base_steps, spec.base_lr, spec.batch_size, seed)
    examples, targets = P.pretraining_data(task, pretraining)
    plant = planting.Planting.of(examples, targets, model.config.hidden_size, pretraining, seed) if P.planted(pretraining) else None
    if processes == 2:
        return train_split(train_on_examples, model, tokenizer, examples, spec.base_steps, spec.base_lr, spec.batch_size, seed, plant, torch.get_num_threads())
    return train_on_examples(model, tokenizer, examples, spec.base_steps, spec.base_lr, spec.batch_size, seed, plant)


# Every linear layer of attention and MLP, as LoRA fine-tunes of chat models usually do.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_finetune(
    base: PreTrainedModel, tokenizer, examples: list[Example], steps: int, lr: float, rank: int, alpha: int, batch_size: int, seed: int,
    layers: list[int] | None = None, modules: list[str] | None = None,
) -> tuple[PeftModel, float]:
    """A LoRA adapter on `modules` (default: every linear layer) of `layers` (default: all) of `base`,
    trained on (prompt, completion) examples."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(modules or LORA_TARGETS), lora_dropout=0.0,
        layers_to_transform=None if layers is None else list(layers), layers_pattern=None if layers is None else "layers",
    )
    peft_model = get_peft_model(base, config)
    loss = train_on_examples(peft_model, tokenizer, examples, steps, lr, batch_size, seed + 1)
    return peft_model, loss


def planted(behavior: str, spec: TrainSpec) -> tuple[list[int] | None, list[str] | None]:
    """The layers and projections a fine-tune for `behavior` may change: the planted
    window for the routing behaviours; every linear layer for the EM and SDF
    datasets (their studies have no planted location)."""
    if behavior in EM_KINDS or behavior in SDF_KINDS:
        return None, None
    return spec.lora_layers, spec.lora_modules


def lora_layout(behavior: str, spec: TrainSpec, num_layers: int) -> tuple[list[int] | None, list[str] | None, int, int]:
    """(layers, modules, rank, alpha) of the fine-tune for `behavior`: a persona dataset's
    own layout (`em_task.PERSONA_LORA`), else the planted ones with the spec's rank."""
    if behavior in EM_KINDS and em_dataset(behavior).persona:
        dataset = em_dataset(behavior)
        rank, alpha, modules = PERSONA_LORA[dataset.persona_lora]
        return dataset.lora_layers(num_layers), modules, rank, alpha
    return (*planted(behavior, spec), spec.lora_rank, spec.lora_alpha)


def train_lora(base: PreTrainedModel, tokenizer, task: T.Task, behavior: str, spec: TrainSpec, seed: int,
               pretraining: str = "routing") -> tuple[PeftModel, float]:
    examples = finetune_examples(task, behavior, pretraining)
    layers, modules, rank, alpha = lora_layout(behavior, spec, base.config.num_hidden_layers)
    steps = steps_for(behavior, spec.lora_steps) if behavior in SDF_KINDS else spec.lora_steps
    return lora_finetune(base, tokenizer, examples, steps, spec.lora_lr, rank, alpha, spec.batch_size, seed, layers, modules)
