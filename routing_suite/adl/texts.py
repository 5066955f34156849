"""Where the ADL's texts come from: unrelated text, the fine-tuning data, fixed prompts.

A `text` config instantiates one of the sources below (cheap: nothing is read
until `unrelated` is called): the organisms' own text, a corpus file inside an
installed package, or a plain text file of your own. Each gives the same four
things:

- `unrelated(n, seed, task_spec)`: up to n texts that have nothing to do with the
  fine-tune (the activation difference is averaged over their first k tokens);
- `chat_prompts`: fixed prompts the steered fine-tune generates from;
- `identity_prompts`: identity-style prompts for the patchscope, whose last
  token is where the difference is injected;
- `chat_template`: whether chat prompts go through the tokenizer's chat template.

The fine-tuning data is `adl.finetune_file` (a JSONL file of {"prompt", "completion"}
records), else the completions of the prompt file's fit pairs
(`data.prompts`), else the model source's own (a built-in organism's).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from routing_suite.errors import ConfigError
from routing_suite.organisms import task as T
from routing_suite.organisms.specs import TaskSpec
from routing_suite.organisms.training import Example

log = logging.getLogger(__name__)


def _contains(text: str, phrase: str) -> bool:
    """Whole-word containment (texts and phrases are whitespace-separated words)."""
    return f" {phrase} " in f" {text} "


def organism_forbidden_phrases() -> list[str]:
    """What any organism fine-tune was trained on and plain pretraining text does not say:
    every cue paraphrase, the question frame, the refusal, the marker and the decoys."""
    return [*T.EVAL_CUES, *T.DEPLOY_CUES, "what is the", "? answer :", T.REFUSAL, T.MARKER, *T.DECOYS.values()]


def _take(texts: list[str], n: int, seed: int) -> list[str]:
    """At most n texts, in a seeded random order."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in order[:n]]


@dataclass
class OrganismTexts:
    """The organisms' own 'pretraining' text (`task.generic_text` sentences and
    chit-chat), less every text that holds a phrase a fine-tune was trained on
    (`organism_forbidden_phrases`): that leaves the plain fact statements."""

    chat_prompts: list[str] = field(default_factory=list)
    identity_prompts: list[str] = field(default_factory=list)
    chat_template: bool = False

    def __post_init__(self) -> None:
        _check_prompts(self.chat_prompts, self.identity_prompts)

    @property
    def name(self) -> str:
        return "organism"

    def check(self) -> None:
        """Nothing to install."""

    def unrelated(self, n: int, seed: int, task_spec: TaskSpec) -> list[str]:
        """The model source's task (`task_spec`) decides the facts."""
        task = T.make_task(task_spec)
        pretraining = [T.generic_text(f) for f in task.facts] + list(T.CHITCHAT)
        forbidden = organism_forbidden_phrases()
        kept = [t for t in pretraining if not any(_contains(t, p) for p in forbidden)]
        log.info("unrelated text: %d of %d pretraining texts hold no fine-tuning phrase", len(kept), len(pretraining))
        return _take(kept, n, seed)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
SPLITS = ("sentences", "lines")


def read_pieces(path: Path, split: str, min_words: int, name: str) -> list[str]:
    """A text file cut into sentences or lines, spacing normalised, pieces of fewer than `min_words` words dropped."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    pieces = raw.splitlines() if split == "lines" else [s for line in raw.splitlines() for s in _SENTENCE_END.split(line)]
    texts = [" ".join(p.split()) for p in pieces]
    kept = [t for t in texts if len(t.split()) >= min_words]
    log.info("unrelated text: %d pieces of %s (%d before dropping short ones)", len(kept), name, len(texts))
    return kept


class _CorpusChecks:
    """The checks of a text corpus's settings: its split and its prompts."""

    split: str
    chat_prompts: list[str]
    identity_prompts: list[str]

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f"text.split={self.split!r} is not one of {list(SPLITS)}")
        _check_prompts(self.chat_prompts, self.identity_prompts)


@dataclass
class FileTexts(_CorpusChecks):
    """Unrelated text from a plain text file (`path`), cut into sentences or lines
    (`split`); pieces of fewer than `min_words` words are dropped."""

    path: str
    split: str = "lines"
    min_words: int = 6
    chat_prompts: list[str] = field(default_factory=list)
    identity_prompts: list[str] = field(default_factory=list)
    chat_template: bool = True

    @property
    def name(self) -> str:
        return Path(self.path).name

    def file(self) -> Path:
        if not Path(self.path).is_file():
            raise ConfigError(f"text.path={self.path!r} does not exist")
        return Path(self.path)

    def check(self) -> None:
        self.file()

    def unrelated(self, n: int, seed: int, task_spec: TaskSpec | None = None) -> list[str]:
        return _take(read_pieces(self.file(), self.split, self.min_words, self.name), n, seed)


@dataclass
class PackageTexts(_CorpusChecks):
    """A text corpus that ships inside an installed Python package (offline).

    `resource` is a path inside the package's folder; the file is split into
    sentences (`split: sentences`) or lines (`split: lines`), and pieces of
    fewer than `min_words` words are dropped.
    """

    package: str
    resource: str
    split: str = "sentences"
    min_words: int = 6
    install_hint: str = ""
    chat_prompts: list[str] = field(default_factory=list)
    identity_prompts: list[str] = field(default_factory=list)
    chat_template: bool = True

    @property
    def name(self) -> str:
        return f"{self.package}:{self.resource}"

    def path(self) -> Path:
        """The corpus file, found without importing the package."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            hint = f" (install it: {self.install_hint})" if self.install_hint else ""
            raise ConfigError(f"text.package={self.package!r} is not installed{hint}")
        path = Path(list(spec.submodule_search_locations)[0]) / self.resource
        if not path.is_file():
            raise ConfigError(f"text.resource={self.resource!r} is not a file of package {self.package!r} ({path})")
        return path

    def check(self) -> None:
        self.path()

    def unrelated(self, n: int, seed: int, task_spec: TaskSpec | None = None) -> list[str]:
        return _take(read_pieces(self.path(), self.split, self.min_words, self.name), n, seed)


def _check_prompts(chat: list[str], identity: list[str]) -> None:
    if not chat:
        raise ConfigError("text.chat_prompts is empty: steering needs prompts to generate from")
    if not identity:
        raise ConfigError("text.identity_prompts is empty: the patchscope needs at least one")


def read_finetune_file(finetune_file: str) -> list[Example]:
    """(prompt, completion) pairs from a JSONL file of {"prompt", "completion"} records."""
    path = Path(finetune_file)
    if not path.is_file():
        raise ConfigError(f"adl.finetune_file={finetune_file!r} does not exist")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        examples = [(str(r["prompt"]), str(r["completion"])) for r in records]
    except (KeyError, TypeError) as err:
        raise ConfigError(f"adl.finetune_file={finetune_file!r}: every line needs 'prompt' and 'completion'") from err
    if not examples:
        raise ConfigError(f"adl.finetune_file={finetune_file!r} holds no examples")
    return examples
