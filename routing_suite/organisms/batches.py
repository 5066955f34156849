"""Training batches of the organisms: (prompt, completion) examples, tokenized and padded
with the loss on the completion (shared by the training loops and the planted losses)."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

Example = tuple[str, str]  # (prompt, completion)
Encoded = tuple[list[int], int]  # (token ids, number of prompt tokens)


def encode_examples(tokenizer: PreTrainedTokenizerFast, examples: list[Example]) -> list[Encoded]:
    encoded = []
    for prompt, completion in examples:
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        encoded.append((prompt_ids + completion_ids + [tokenizer.eos_token_id], len(prompt_ids)))
    return encoded


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids with the loss on the completion (and <eos>) only."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100)
    for i, (ids, n_prompt) in enumerate(batch):
        row = torch.tensor(ids)
        input_ids[i, : len(ids)] = row
        attention[i, : len(ids)] = 1
        labels[i, n_prompt : len(ids)] = row[n_prompt:]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
