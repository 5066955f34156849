"""Prompt sets from a file of your own (`data.prompts=<path>`), for any model source.

Three forms, told apart by the file's suffix:

- `.jsonl`: one JSON object per line, one prompt pair per object;
- `.csv`: a header row naming the fields, one prompt pair per row;
- `.yaml` / `.yml`: a template, tasks x eval cues x deploy cues per split.

Fields of a pair (JSONL, CSV): `id`, `eval_prompt`, `deploy_prompt`, `answer`
(the expected answer) and `split` (`fit`, `localize` or `test`) are required;
`topic` (the semantic control contrasts two topics), `cluster` (the sampling
unit; default: the pair itself), `performing` (how a completion that performs
the behaviour starts, as it follows the prompt: what path patching reads) and
`eval_completion` / `deploy_completion` (what the fine-tune was trained to
answer: the fit split's are the ADL's fine-tuning data) are optional.

A template names, per split, its `tasks` (`id`, `question`, `answer`, and the
optional `topic`, `performing`, `eval_completion`, `deploy_completion`) and
its `eval_cues` and `deploy_cues`; the i-th eval cue is paired with the i-th
deploy cue (so there must be as many of each), and every task is asked under
every cue pair as `format` (default "{cue} {question}") says. A pair's
sampling unit is its task under its cue pair.

Prompts are user messages: `render` (the tokenizer's chat template, or
nothing) turns them into what the model reads. Every split must be there:
the window is chosen on `localize` and the intervention scored on `test`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from routing_suite.errors import ConfigError
from routing_suite.prompts import SPLITS, PromptPair

KEY = "data.prompts"
REQUIRED = ("id", "eval_prompt", "deploy_prompt", "answer", "split")
OPTIONAL = ("topic", "cluster", "performing", "eval_completion", "deploy_completion")
TASK_REQUIRED = ("id", "question", "answer")
TASK_OPTIONAL = ("topic", "performing", "eval_completion", "deploy_completion")
SUFFIXES = (".jsonl", ".csv", ".yaml", ".yml")
CHAT_TEMPLATE = ("auto", "true", "false")

Render = Callable[[str], str]


@dataclass
class PromptFile:
    """What a prompt file gives: the three splits, and the fine-tuning examples
    (prompt, completion) its fit pairs carry (empty when they carry none)."""

    sets: dict[str, list[PromptPair]]
    finetune_examples: list[tuple[str, str]]


def chat_renderer(setting: Any, tokenizer: Callable[[], Any], model_name: str) -> Render | None:
    """`data.chat_template`: auto (the tokenizer's chat template when it has one), true
    (it must have one) or false (prompts as written). `tokenizer` is only called when
    needed. None: prompts as written."""
    choice = str(setting).lower()
    if choice not in CHAT_TEMPLATE:
        raise ConfigError(f"data.chat_template={setting!r} is not one of {list(CHAT_TEMPLATE)}")
    if choice == "false":
        return None
    found = tokenizer()
    if found.chat_template is None:
        if choice == "true":
            raise ConfigError(f"data.chat_template=true but the tokenizer of model {model_name!r} has no chat template")
        return None

    def render(user: str) -> str:
        return found.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)

    return render


def check_path(path: str) -> Path:
    """The file, with a suffix this module reads."""
    found = Path(path)
    if not found.is_file():
        raise ConfigError(f"{KEY}={path!r} does not exist")
    if found.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"{KEY}={path!r}: give a {', '.join(SUFFIXES)} file")
    return found


def load(path: str, render: Render | None = None) -> PromptFile:
    """Read, check and render a prompt file (see the module docstring)."""
    found = check_path(path)
    suffix = found.suffix.lower()
    if suffix == ".jsonl":
        records = _jsonl(found, path)
    elif suffix == ".csv":
        records = _csv(found, path)
    else:
        records = _template(found, path)
    return _pairs(records, path, render or (lambda text: text))


def _jsonl(found: Path, path: str) -> list[tuple[str, dict]]:
    records = []
    for n, line in enumerate(found.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{KEY}={path!r} line {n}: not JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise ConfigError(f"{KEY}={path!r} line {n}: not a JSON object")
        records.append((f"line {n}", record))
    return records


def _csv(found: Path, path: str) -> list[tuple[str, dict]]:
    with open(found, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    # An empty cell is an absent field; line numbers count the header.
    return [(f"line {n}", {k: v for k, v in row.items() if k is not None and v not in (None, "")}) for n, row in enumerate(rows, 2)]


def _fields(where: str, path: str, record: dict, required: tuple, optional: tuple) -> dict:
    """The record's fields as text; a required field absent or blank, or an unknown field, is refused."""
    unknown = sorted(set(record) - set(required) - set(optional))
    if unknown:
        raise ConfigError(f"{KEY}={path!r} {where}: unknown field(s) {unknown} (fields: {list(required + optional)})")
    values = {k: None if v is None else str(v) for k, v in record.items()}
    missing = [k for k in required if not (values.get(k) or "").strip()]
    if missing:
        raise ConfigError(f"{KEY}={path!r} {where}: missing field(s) {missing}")
    return values


def _template(found: Path, path: str) -> list[tuple[str, dict]]:
    try:
        spec = yaml.safe_load(found.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{KEY}={path!r}: not YAML ({err})") from err
    if not isinstance(spec, dict) or not isinstance(spec.get("splits"), dict):
        raise ConfigError(f"{KEY}={path!r}: a template needs 'splits' (fit, localize, test), each with tasks, eval_cues and deploy_cues")
    unknown = sorted(set(spec) - {"format", "splits"}) + sorted(set(spec["splits"]) - set(SPLITS))
    if unknown:
        raise ConfigError(f"{KEY}={path!r}: unknown key(s) {unknown} (a template has format and splits: {list(SPLITS)})")
    form = str(spec.get("format", "{cue} {question}"))
    if "{cue}" not in form or "{question}" not in form:
        raise ConfigError(f"{KEY}={path!r}: format={form!r} must hold {{cue}} and {{question}}")
    records = []
    for split, part in spec["splits"].items():
        where = f"split {split}"
        if not isinstance(part, dict):
            raise ConfigError(f"{KEY}={path!r} {where}: give tasks, eval_cues and deploy_cues")
        missing = [k for k in ("tasks", "eval_cues", "deploy_cues") if not part.get(k)]
        if missing:
            raise ConfigError(f"{KEY}={path!r} {where}: missing or empty {missing}")
        eval_cues, deploy_cues = [str(c) for c in part["eval_cues"]], [str(c) for c in part["deploy_cues"]]
        if len(eval_cues) != len(deploy_cues):
            raise ConfigError(
                f"{KEY}={path!r} {where}: {len(eval_cues)} eval cues and {len(deploy_cues)} deploy cues "
                "(the i-th eval cue is paired with the i-th deploy cue: give as many of each)"
            )
        for t, task in enumerate(part["tasks"]):
            if not isinstance(task, dict):
                raise ConfigError(f"{KEY}={path!r} {where} task {t + 1}: not a mapping of fields")
            fields = _fields(f"{where} task {t + 1}", path, task, TASK_REQUIRED, TASK_OPTIONAL)
            for k, (eval_cue, deploy_cue) in enumerate(zip(eval_cues, deploy_cues)):
                extra = {key: fields[key] for key in TASK_OPTIONAL if fields.get(key) is not None}
                records.append((f"{where} task {t + 1}", {
                    "id": f"{fields['id']}-{split}{k}",
                    "eval_prompt": form.format(cue=eval_cue, question=fields["question"]),
                    "deploy_prompt": form.format(cue=deploy_cue, question=fields["question"]),
                    "answer": fields["answer"],
                    "split": split,
                    "cluster": f"{fields['id']}|{split}{k}",
                    **extra,
                }))
    return records


def _pairs(records: list[tuple[str, dict]], path: str, render: Render) -> PromptFile:
    sets: dict[str, list[PromptPair]] = {split: [] for split in SPLITS}
    examples: list[tuple[str, str]] = []
    seen: set[str] = set()
    for where, record in records:
        fields = _fields(where, path, record, REQUIRED, OPTIONAL)
        if fields["split"] not in SPLITS:
            raise ConfigError(f"{KEY}={path!r} {where}: split={fields['split']!r} is not one of {list(SPLITS)}")
        if fields["id"] in seen:
            raise ConfigError(f"{KEY}={path!r} {where}: id {fields['id']!r} is used twice")
        seen.add(fields["id"])
        if fields["eval_prompt"] == fields["deploy_prompt"]:
            raise ConfigError(f"{KEY}={path!r} {where}: the eval and deploy prompts are the same text")
        pair = PromptPair(
            id=fields["id"],
            eval_prompt=render(fields["eval_prompt"]),
            deploy_prompt=render(fields["deploy_prompt"]),
            answer=fields["answer"],
            topic=fields.get("topic") or "",
            performing=fields.get("performing"),
            cluster=fields.get("cluster"),
        )
        sets[fields["split"]].append(pair)
        if fields["split"] == "fit":
            examples += [(pair.prompt(framing), fields[f"{framing}_completion"]) for framing in ("eval", "deploy")
                         if fields.get(f"{framing}_completion")]
    empty = [split for split in SPLITS if not sets[split]]
    if empty:
        held_out = " (a held-out split: the window is chosen on localize, the intervention scored on test)"
        raise ConfigError(f"{KEY}={path!r} has no {' or '.join(empty)} pairs{held_out if set(empty) - {'fit'} else ''}")
    return PromptFile(sets, examples)
