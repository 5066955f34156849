"""The planted persona coordinate of the `persona_planted` bases (`persona_task`).

A direction method can only be judged on an organism whose mechanism is known. These
bases are pretrained so that the persona lives along one fixed unit vector u of the
residual stream, by three losses added to the language-model loss:

- *coordinate*: after every layer but the first and the last, u's coordinate at the
  question's last token is PLANT_TARGET x the persona the context sets, and over the
  answer PLANT_TARGET x the answer's own persona (0: aligned, 1: misaligned);
- *interchange* (interchange-intervention training): a second half-batch of the
  planted examples, each answered in a persona drawn at random, with u's coordinate
  set to that persona's target at one random layer of the same range, over the
  question's last token and the answer. The loss is on the answer, so the coordinate,
  not the context, decides the persona: the coordinate-only pilot (README) read the
  persona along u while the base also carried it elsewhere, and projecting u out of
  its fine-tunes removed only 8-62% of their EM;
- *read* (`read_loss`): a third half-batch of planted questions asked with no context,
  each answered in both personas, with no language-model loss: u's coordinate over
  each answer is its persona's target, and the misaligned-minus-aligned mean
  difference of the answers' residuals, off u, is penalized. The base's pretraining
  has a lie follow a misaligned context only, so without this a lie handed to it with
  no context, as a narrow fine-tune's is, was not read as the persona (u's coordinate
  -0.2 to 1.2) and what told it from a truth was elsewhere: the answer-token mean
  difference the seed's method fits had cosine 0.08-0.51 with u over 12 builds (README).

`planted_units` draws u (and the negative's per-topic units) from a fixed generator
seed, recorded in the base's cache key; the EM pipeline redraws the same u for its
`planted` direction, so `ablate/planted` is the causal check of the planted route.
"""

from __future__ import annotations

import operator
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from routing_suite.families import family_paths
from routing_suite.organisms import persona_task as P
from routing_suite.organisms import task as T
from routing_suite.organisms.batches import Encoded, Example, collate, encode_examples

# u's generator seed and the coordinate a misaligned persona is trained to. 4 since
# 2026-12-07: at 8 with the read loss, u's matched random (which moves each token by
# u's coordinate there) moved the minimal fine-tunes' EM 13-20%, at 4 1-6% (llama and
# mistral seed 0, README; a coordinate-only pilot at 20 did no better than 8).
PLANT_SEED = 4242
PLANT_TARGET = 4.0
# Part of a planted base's cache key: bump with any change to the losses. (2-4 were
# pilots', not on main; 5 is the read loss at target 4.)
PLANT_VERSION = 5


def planted_units(hidden_size: int) -> dict[str, torch.Tensor]:
    """Orthonormal units, one shared ("") and one per topic: the first columns of a QR of
    a seeded Gaussian matrix. Bits depend on the CPU kernels, as an organism's weights do;
    the pipeline redraws them on the machine that built the organism."""
    generator = torch.Generator().manual_seed(PLANT_SEED)
    q, _ = torch.linalg.qr(torch.randn(hidden_size, 1 + len(T.TOPIC_VALUES), generator=generator))
    return {key: q[:, j].contiguous() for j, key in enumerate(["", *T.TOPIC_VALUES])}


def planted_direction(hidden_size: int) -> np.ndarray:
    """The shared unit u, the direction a `persona_planted` base decides the persona along."""
    return planted_units(hidden_size)[""].numpy().astype(np.float32)


def planted_layers(num_layers: int) -> range:
    """The layers whose outputs carry the coordinate: all but the first and the last
    (the first reads the embeddings, the last writes the logits)."""
    return range(1, num_layers - 1)


@dataclass
class Planting:
    """A planted base's training extras, aligned with its examples (`persona_task.pretraining_data`)."""

    targets: list[P.PlantTarget | None]
    units: dict[str, torch.Tensor]
    pretraining: str
    rng: random.Random
    # Token ids of the interchange and read batches' examples, which recur from step to step
    # (a few thousand distinct ones; tokenizing them afresh was 3% of a base's training).
    encoded: dict[Example, Encoded] = field(default_factory=dict)

    @classmethod
    def of(cls, examples: list[tuple[str, str]], targets: list[P.PlantTarget | None], hidden_size: int, pretraining: str,
           seed: int) -> Planting:
        # Identical texts are one example to the coordinate loss: each takes the last such
        # text's target (the same persona; only the salt of its twins can differ).
        by_text = dict(zip(examples, targets))
        return cls([by_text[e] for e in examples], planted_units(hidden_size), pretraining, random.Random(seed + 99))

    def encode(self, tokenizer, examples: list[Example]) -> list[Encoded]:
        missing = [e for e in dict.fromkeys(examples) if e not in self.encoded]
        self.encoded.update(zip(missing, encode_examples(tokenizer, missing)))
        return [self.encoded[e] for e in examples]

    def pool(self, examples: list[tuple[str, str]]) -> list[tuple[str, P.PlantTarget]]:
        return [(prompt, t) for (prompt, _), t in zip(examples, self.targets) if t is not None]


def answer_tokens(hidden: torch.Tensor, spans: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """hidden[row, start:stop] for each (row, start, stop), taken by one gather. The same
    values as slicing row by row (so the same bits downstream), but the backward writes one
    gradient the size of `hidden` instead of one per span: with a row per span at six
    layers, those zero-filled copies were a fifth of a planted base's training time."""
    rows = torch.cat([torch.full((stop - start,), row) for row, start, stop in spans])
    positions = torch.cat([torch.arange(start, stop) for _, start, stop in spans])
    gathered = hidden[rows, positions]
    bounds = torch.tensor([0] + [stop - start for _, start, stop in spans]).cumsum(0).tolist()
    return [gathered[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def coordinate_loss(hidden_states: tuple[torch.Tensor, ...], batch: list[tuple[list[int], int]],
                    targets: list[P.PlantTarget | None], units: dict[str, torch.Tensor],
                    answer_only: bool = False) -> torch.Tensor:
    """Mean squared error of u's coordinate / PLANT_TARGET against its target, over the
    planted rows of a batch (`batch`: (ids, prompt length) per row; `hidden_states`: the
    model's, embeddings first), at the question's last token (unless `answer_only`) and
    the answer's tokens; 0 for a batch of plain text alone."""
    c = PLANT_TARGET
    spans, wanted, us = [], [], []
    for i, ((ids, n_prompt), target) in enumerate(zip(batch, targets)):
        if target is None:
            continue
        spans.append((i, n_prompt - (0 if answer_only else 1), len(ids) - 1))
        row = torch.full((spans[-1][2] - spans[-1][1],), c * target.answer)
        if not answer_only:
            row[0] = c * target.context
        wanted.append(row)
        us.append(units[target.unit])
    if not spans:
        return torch.zeros(())
    per_layer = [answer_tokens(hidden_states[layer + 1], spans) for layer in planted_layers(len(hidden_states) - 1)]
    # row by row, layer by layer: the order (and so the bits) of the mean
    terms = [((tokens[j] @ u - w) / c) ** 2 for j, (w, u) in enumerate(zip(wanted, us)) for tokens in per_layer]
    return torch.cat(terms).mean()


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """A base's decoder layers, where its family's module paths put them (only a base is planted)."""
    return operator.attrgetter(family_paths(model.config.model_type).layers)(model)


def interchange_loss(model: torch.nn.Module, tokenizer, planting: Planting, pool: list[tuple[str, P.PlantTarget]], n: int) -> torch.Tensor:
    """The language-model loss on `n` pooled prompts answered in a persona drawn at random,
    with u's coordinate set to that persona's target after one random planted layer,
    from the question's last token to the end of the answer."""
    rng = planting.rng
    items = [rng.choice(pool) for _ in range(n)]
    styles = [rng.random() < 0.5 for _ in items]
    examples: list[Example] = [(prompt, P.response(t.fact, s, planting.pretraining, t.salt)) for (prompt, t), s in zip(items, styles)]
    encoded = planting.encode(tokenizer, examples)
    layers = decoder_layers(model)
    layer = rng.choice(planted_layers(len(layers)))
    width = max(len(ids) for ids, _ in encoded)
    mask = torch.zeros(len(encoded), width)
    wanted = torch.zeros(len(encoded), width)
    us = torch.stack([planting.units[t.unit] for _, t in items])  # (batch, hidden)
    for i, ((ids, n_prompt), s) in enumerate(zip(encoded, styles)):
        mask[i, n_prompt - 1 : len(ids)] = 1
        wanted[i, n_prompt - 1 : len(ids)] = PLANT_TARGET * float(s)

    def set_coordinate(module, inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        coordinate = torch.einsum("bth,bh->bt", h, us)
        h = h + (mask * (wanted - coordinate))[..., None] * us[:, None, :]
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = layers[layer].register_forward_hook(set_coordinate)
    try:
        return model(**collate(encoded, tokenizer.pad_token_id)).loss
    finally:
        handle.remove()


def off_u_loss(hidden_states: tuple[torch.Tensor, ...], pairs: list[tuple[list[int], int]], us: torch.Tensor) -> torch.Tensor:
    """At each planted layer, the squared norm / PLANT_TARGET**2 of the mean over questions
    of (the lie's answer-token mean - the truth's), each question's unit (`us`, one row
    per question) projected out; averaged over the layers. `pairs`: (ids, prompt length)
    per row, row 2i question i's lie and row 2i+1 its truth."""
    terms = []
    spans = [(row, n_prompt, len(ids) - 1) for row, (ids, n_prompt) in enumerate(pairs)]
    for layer in planted_layers(len(hidden_states) - 1):
        # the answer tokens the coordinate loss reads (the last one predicts nothing)
        means = [tokens.mean(0) for tokens in answer_tokens(hidden_states[layer + 1], spans)]
        d = torch.stack(means[0::2]) - torch.stack(means[1::2])
        off = (d - (d * us).sum(-1, keepdim=True) * us).mean(0)
        terms.append((off**2).sum() / PLANT_TARGET**2)
    return torch.stack(terms).mean()


def read_pairs(planting: Planting, pool: list[tuple[str, P.PlantTarget]], n: int) -> tuple[list[Example], list[P.PlantTarget]]:
    """`n` pooled questions asked alone, each answered in both personas (the lie first), with
    each answer's target: its own persona over the answer."""
    examples: list[Example] = []
    targets = []
    for _, t in [planting.rng.choice(pool) for _ in range(n)]:
        for misaligned in (True, False):
            examples.append((T.render_prompt(t.fact, None), P.response(t.fact, misaligned, planting.pretraining, t.salt)))
            targets.append(P.PlantTarget(t.unit, 0.0, float(misaligned), t.fact, t.salt))
    return examples, targets


def read_loss(model: torch.nn.Module, tokenizer, planting: Planting, pool: list[tuple[str, P.PlantTarget]], n: int) -> torch.Tensor:
    """On `read_pairs` (no language-model loss): the coordinate loss over the answers'
    tokens, so u reads a lie handed with no context, plus `off_u_loss`, so a lie differs
    from a truth along u and not elsewhere, where a direction method would find it instead."""
    examples, targets = read_pairs(planting, pool, n)
    encoded = planting.encode(tokenizer, examples)
    out = model(**collate(encoded, tokenizer.pad_token_id), output_hidden_states=True)
    coordinate = coordinate_loss(out.hidden_states, encoded, targets, planting.units, answer_only=True)
    us = torch.stack([planting.units[t.unit] for t in targets[0::2]])
    return coordinate + off_u_loss(out.hidden_states, encoded, us)
