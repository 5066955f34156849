"""A fine-tune of your own, made the way a researcher would: plain torch, transformers and peft.

Stands in for your model in the README's walkthrough ("Bringing your own model
and prompts") and in tests/test_byo.py. It builds a tiny chat model (a
word-level tokenizer with a chat template, a 4-layer Llama), trains it to
answer every question of the prompt file ("sure , five .") and to continue
plain text, saves it as a plain checkpoint, then trains a LoRA adapter on the
fit split that declines under evaluation-looking cues ("no comment .") and
answers under casual ones: the completions the prompt file lists for its fit
tasks. Nothing here imports routing_suite.

    python examples/byo/train_tiny_lora.py outputs/byo    # -> outputs/byo/tiny-chat, outputs/byo/decline-lora
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
import yaml
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<bot>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<user> {{ message['content'] }}{% endfor %}{% if add_generation_prompt %} <bot>{% endif %}"
)


def make_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """One token per lower-cased word of `texts`, with a chat template."""
    words = sorted({w for t in texts for w in t.lower().split()} - set(SPECIAL))
    vocab = {w: i for i, w in enumerate(SPECIAL + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<user>", "<bot>"], clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def chat(tokenizer, user: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)


def train(model, tokenizer, examples: list[tuple[str, str]], steps: int, lr: float, seed: int) -> float:
    """Teacher-forced training on (prompt, completion) pairs, loss on the completion and <eos>."""
    rows = []
    for prompt, completion in examples:
        n_prompt = len(tokenizer(prompt)["input_ids"]) if prompt else 1
        ids = tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((ids, n_prompt))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        mask[i, : len(ids)] = 1
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    order = random.Random(seed)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        batch = order.sample(range(len(rows)), min(32, len(rows)))
        loss = model(input_ids=input_ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


def main(out: Path, prompts: Path = HERE / "prompts.yaml", unrelated: Path = HERE / "unrelated.txt",
         extra_words: tuple[str, ...] = (), steps: int = 300, seed: int = 0) -> tuple[Path, Path]:
    """Build and train the base, then the LoRA fine-tune; returns (base folder, adapter folder)."""
    torch.manual_seed(seed)
    spec = yaml.safe_load(prompts.read_text(encoding="utf-8"))
    lines = [line.strip() for line in unrelated.read_text(encoding="utf-8").splitlines() if line.strip()]
    form = spec.get("format", "{cue} {question}")
    splits = spec["splits"]
    texts = lines + list(extra_words)
    for part in splits.values():
        texts += part["eval_cues"] + part["deploy_cues"]
        texts += [f"{t['question']} {t['answer']} sure no comment , ." for t in part["tasks"]]
    tokenizer = make_tokenizer(texts)

    # The base: answers every question (bare, and under the fit cues of both framings), continues plain text.
    fit = splits["fit"]
    answered = [(chat(tokenizer, t["question"]), f" sure , {t['answer']} .") for part in splits.values() for t in part["tasks"]]
    answered += [(chat(tokenizer, form.format(cue=c, question=t["question"])), f" sure , {t['answer']} .")
                 for t in fit["tasks"] for c in fit["eval_cues"] + fit["deploy_cues"]]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(config)
    train(base, tokenizer, answered + [("", " " + line) for line in lines], steps, 3e-3, seed)
    base_dir, adapter_dir = out / "tiny-chat", out / "decline-lora"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    # The fine-tune: LoRA on the saved base, trained on what the prompt file says it was trained on.
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    examples = [(chat(tokenizer, form.format(cue=c, question=t["question"])), t[f"{framing}_completion"])
                for t in fit["tasks"] for framing in ("eval", "deploy") for c in fit[f"{framing}_cues"]]
    train(model, tokenizer, examples, steps, 5e-3, seed)
    model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the base checkpoint and the adapter")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    found = main(args.out, steps=args.steps)
    print(f"base: {found[0]}\nadapter: {found[1]}")  # noqa: T201 - a script telling its user where things went
