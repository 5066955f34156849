"""Build organisms once, cache them on disk by content, load them after.

Layout under the cache root (names carry a hash of everything that shapes
the weights, so a changed config builds anew and an unchanged one is reused):

    <root>/<family>/base-<hash>/          model, tokenizer, organism.json
    <root>/<family>/<behavior>-<hash>/    PEFT adapter, organism.json

Each is written under a temporary name and renamed when complete, with a
lock per family, so a crash leaves no half-built organism and two parallel
jobs never build the same one twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from routing_suite.errors import ConfigError
from routing_suite.organisms import persona_task as P
from routing_suite.organisms import planting
from routing_suite.organisms import task as T
from routing_suite.organisms.architectures import FAMILIES, ArchSpec, family_config, family_seed
from routing_suite.organisms.em_task import PERSONA_KINDS
from routing_suite.organisms.sdf_task import SDF_KINDS
from routing_suite.organisms.tokenizer import build_tokenizer
from routing_suite.organisms.training import (
    FINETUNE_KINDS,
    FINETUNE_RECIPES,
    LORA_TARGETS,
    RECIPE_VERSION,
    TrainSpec,
    finetune_examples,
    lora_layout,
    train_base,
    train_lora,
)
from routing_suite.provenance import cpu_capability, cpu_model, file_digest, kernel_fingerprint

log = logging.getLogger(__name__)

_VERSIONED = ("torch", "transformers", "peft")


@dataclass
class OrganismSpec:
    """Everything that determines an organism's weights."""

    family: str
    arch: ArchSpec
    task: T.TaskSpec
    train: TrainSpec
    seed: int = 0
    num_threads: int = 1
    # Processes a base's training steps are split over (organisms/split_training): 2 for a
    # planted persona base, whose steps have two halves of nearly equal work; 1 otherwise.
    # Not in the cache key: the split sums each gradient in the one-process order, so its
    # weights are the same bits (tests/test_split_training.py holds it to that).
    processes: int = 1
    # What the base is pretrained on: the routing task ("routing"), or a persona
    # base for the EM study ("persona", "persona_per_topic", "persona_planted",
    # "persona_planted_per_topic"; organisms/persona_task).
    pretraining: str = "routing"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"model.family={self.family!r} is not one of {list(FAMILIES)}")
        if self.pretraining not in P.PRETRAININGS:
            raise ConfigError(f"model.pretraining={self.pretraining!r} is not one of {list(P.PRETRAININGS)}")
        if self.seed < 0:
            raise ConfigError(f"model.seed={self.seed} must be >= 0 (it is the organism's replicate index)")
        if self.num_threads < 1:
            raise ConfigError(f"model.num_threads={self.num_threads} must be >= 1")
        if self.processes not in (1, 2) or (self.processes == 2 and not P.planted(self.pretraining)):
            raise ConfigError(f"model.processes={self.processes}: 1, or 2 for a planted persona base (model.pretraining one of "
                              f"{[p for p in P.PRETRAININGS if P.planted(p)]}), whose training step splits in two halves")
        layers = self.train.lora_layers
        if layers is not None:
            outside = [layer for layer in layers if not 0 <= layer < self.arch.num_layers]
            if not layers or outside:
                raise ConfigError(
                    f"model.train.lora_layers={list(layers)}: the planted layers must be among the model's "
                    f"{self.arch.num_layers} layers [0, {self.arch.num_layers - 1}]"
                )
        modules = self.train.lora_modules
        if modules is not None and (not modules or set(modules) - set(LORA_TARGETS)):
            raise ConfigError(f"model.train.lora_modules={list(modules)} must be a non-empty subset of {LORA_TARGETS}")

    def base_key(self) -> dict:
        train = asdict(self.train)
        base_train = {k: v for k, v in train.items() if k.startswith("base_") or k == "batch_size"}
        return {
            "family": self.family,
            "arch": asdict(self.arch),
            "task": asdict(self.task),
            "train": base_train,
            "recipe": RECIPE_VERSION,
            "seed": self.seed,
            "num_threads": self.num_threads,
            # The CPU kernels torch runs (AVX2 vs AVX-512 builds differ from the
            # first training step) and the bits they produce (an Intel and an AMD
            # processor both "AVX512" trained different weights): another machine
            # builds its own organism unless its kernels give the same bits.
            "cpu_capability": cpu_capability(),
            "kernel_fingerprint": kernel_fingerprint(self.num_threads),
            "versions": {name: version(name) for name in _VERSIONED},
            # Only a persona base names its pretraining, keyed on its data (a changed
            # persona text builds a new base): every routing base keeps its key.
            **(self._pretraining_key() if self.pretraining != "routing" else {}),
        }

    def _pretraining_key(self) -> dict:
        data = P.base_examples(T.make_task(self.task), self.pretraining)
        key = {"pretraining": self.pretraining, "pretraining_data_sha256": examples_sha256(data)}
        if P.planted(self.pretraining):
            # What the planted coordinate is and how it is trained (`organisms/planting.py`).
            key["planting"] = {"unit_seed": planting.PLANT_SEED, "target": planting.PLANT_TARGET, "version": planting.PLANT_VERSION}
        return key

    def check_kind(self, behavior: str) -> None:
        """A persona fine-tune needs a persona base, and a persona base takes nothing else."""
        if behavior not in FINETUNE_KINDS:
            raise ConfigError(f"behavior.name={behavior!r} is not one of {list(FINETUNE_KINDS)}")
        if (behavior in PERSONA_KINDS) != (self.pretraining != "routing"):
            raise ConfigError(
                f"model.pretraining={self.pretraining}: {behavior!r} needs "
                + (f"a persona base (model.pretraining one of {list(P.PERSONA_PRETRAININGS)})" if behavior in PERSONA_KINDS
                   else f"the routing base (model.pretraining=routing); a persona base takes only {list(PERSONA_KINDS)}")
            )

    def adapter_key(self, behavior: str) -> dict:
        key = {"base": self.base_key(), "behavior": behavior, "train": asdict(self.train)}
        if behavior in FINETUNE_RECIPES:
            key["finetune_recipe"] = FINETUNE_RECIPES[behavior]
        if behavior in PERSONA_KINDS:
            # A persona fine-tune's layout is its own (em_task.PERSONA_LORA, the minimal
            # layers), not the train spec's: keyed as such, so a changed layout trains a new
            # adapter instead of reusing one of the old shape.
            key["lora_layout"] = list(lora_layout(behavior, self.train, self.arch.num_layers))
        if behavior in SDF_KINDS or behavior in PERSONA_KINDS:
            # Keyed on the data itself, not on a hand-kept label: a changed template or
            # domain builds a new adapter, never reuses one trained on other documents.
            key["finetune_data_sha256"] = examples_sha256(finetune_examples(T.make_task(self.task), behavior, self.pretraining))
        return key


def content_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def examples_sha256(examples: list[tuple[str, str]]) -> str:
    """A fine-tune's training data, hashed for its cache key: a data-defined fine-tune (SDF)
    is keyed on the data itself, so a changed template or domain never reuses a stale adapter."""
    return hashlib.sha256(json.dumps(examples).encode()).hexdigest()


@contextlib.contextmanager
def locked(directory: Path, name: str = "") -> Iterator[None]:
    """An exclusive lock on `directory` (or on one artifact `name` in it: builds of
    different organisms of one family then run side by side)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / (f".{name}.lock" if name else ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def deterministic(seed: int, num_threads: int) -> Iterator[None]:
    """Seeded, deterministic kernels, fixed thread count; restored afterwards."""
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was_deterministic)


def publish(tmp: Path, final: Path) -> None:
    if final.exists():  # built meanwhile by someone else holding no lock
        shutil.rmtree(tmp)
        return
    os.rename(tmp, final)


def write_meta(directory: Path, key: dict, seconds: float, final_loss: float | None, **extra: float | str) -> None:
    """`organism.json`: the cache key, the build time and loss, and any `extra` measurements."""
    meta = {"key": key, "build_seconds": round(seconds, 2), "final_loss": final_loss, "cpu_model": cpu_model(), **extra}
    (directory / "organism.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def base_dir(root: Path, spec: OrganismSpec) -> Path:
    return root / spec.family / f"base-{content_hash(spec.base_key())}"


def adapter_dir(root: Path, spec: OrganismSpec, behavior: str) -> Path:
    return root / spec.family / f"{behavior}-{content_hash(spec.adapter_key(behavior))}"


def new_tokenizer(task: T.Task, pretraining: str = "routing") -> PreTrainedTokenizerFast:
    """The word-level tokenizer of the task's words (and a persona base's styles'): no model needed."""
    return build_tokenizer(task.vocabulary() if pretraining == "routing" else P.vocabulary(task, pretraining))


def ensure_base(root: Path, spec: OrganismSpec) -> Path:
    """The cached base organism, built first if missing."""
    final = base_dir(root, spec)
    if final.exists():
        return final
    with locked(final.parent, final.name):
        if final.exists():
            return final
        log.info("building %s base organism into %s", spec.family, final)
        started = time.perf_counter()
        task = T.make_task(spec.task)
        tokenizer = new_tokenizer(task, spec.pretraining)
        with deterministic(family_seed(spec.family, spec.seed), spec.num_threads):
            config = family_config(
                spec.family, spec.arch, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
            )
            model = AutoModelForCausalLM.from_config(config)
            loss = train_base(model, tokenizer, task, spec.train, family_seed(spec.family, spec.seed), spec.pretraining, spec.processes)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_meta(tmp, spec.base_key(), time.perf_counter() - started, loss, weights_sha256=file_digest(tmp / "model.safetensors"),
                   processes=spec.processes)
        publish(tmp, final)
        log.info("built %s base in %.1f s", spec.family, time.perf_counter() - started)
    return final


def ensure_adapter(root: Path, spec: OrganismSpec, behavior: str) -> Path:
    """The cached LoRA adapter installing `behavior` (or an EM dataset kind), built first if missing."""
    spec.check_kind(behavior)
    final = adapter_dir(root, spec, behavior)
    if final.exists():
        return final
    base_path = ensure_base(root, spec)
    with locked(final.parent, final.name):
        if final.exists():
            return final
        log.info("fine-tuning %s organism for %s into %s", spec.family, behavior, final)
        started = time.perf_counter()
        task = T.make_task(spec.task)
        tokenizer = load_tokenizer(base_path)
        base = load_base(base_path)
        seed = family_seed(spec.family, spec.seed)
        with deterministic(seed, spec.num_threads):
            peft_model, loss = train_lora(base, tokenizer, task, behavior, spec.train, seed, spec.pretraining)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        peft_model.save_pretrained(tmp)
        write_meta(tmp, spec.adapter_key(behavior), time.perf_counter() - started, loss,
                   weights_sha256=file_digest(tmp / "adapter_model.safetensors"))
        publish(tmp, final)
        log.info("fine-tuned %s/%s in %.1f s", spec.family, behavior, time.perf_counter() - started)
    return final


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    tokenizer.padding_side = "left"
    return tokenizer


def load_base(path: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


# ---------------------------------------------------------------- many at once


def _build_in_turn(root: str, builds: tuple[tuple[OrganismSpec, str], ...], worker: bool = False) -> None:
    """Adapters (and the base under each, if missing) one after another, saying what it builds
    (`worker`: in a pool's process, which may be handed several; its progress goes to the console)."""
    if worker and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO)
    for spec, behavior in builds:
        if worker:  # a worker builds several organisms in turn: the prefix names the one in progress
            for handler in logging.getLogger().handlers:
                handler.setFormatter(logging.Formatter(f"[%(asctime)s][organisms {spec.family}/{behavior} seed {spec.seed}] %(message)s"))
        started = time.perf_counter()
        ensure_adapter(Path(root), spec, behavior)
        log.info("%s/%s (seed %d) ready after %.0f s", spec.family, behavior, spec.seed, time.perf_counter() - started)


def ensure_adapters(root: Path, spec: OrganismSpec, behaviors: list[str]) -> None:
    """The base, then every missing adapter of `behaviors` on it, `spec.processes` at a time in
    separate processes (the same bits as one at a time: each pins its own threads)."""
    ensure_base(root, spec)
    missing = [b for b in dict.fromkeys(behaviors) if not adapter_dir(root, spec, b).exists()]
    if spec.processes <= 1 or len(missing) <= 1:
        for behavior in missing:
            ensure_adapter(root, spec, behavior)
        return
    _in_processes([(str(root), ((spec, behavior),)) for behavior in missing], spec.processes)


def _in_processes(jobs: list[tuple[str, tuple[tuple[OrganismSpec, str], ...]]], workers: int) -> None:
    """Each job ((cache root, builds for `_build_in_turn`)) in a pool of `workers` processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: a fresh interpreter per worker, no inherited torch thread pool.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(_build_in_turn, root, builds, True) for root, builds in jobs]:
            future.result()


def build_all(wanted: list[tuple[Path, OrganismSpec, str]], workers: int) -> int:
    """Build every missing organism of `wanted` ((cache root, spec, behaviour) triples),
    `workers` bases at a time in separate processes, each base's adapters after it.

    Each build pins its own thread count (spec.num_threads), so the weights are
    the same as built one at a time; on a machine of N cores, N one-thread builds
    side by side take about 1/N of the time. Returns how many were missing."""
    missing: dict[tuple[str, str], list[tuple[OrganismSpec, str]]] = {}
    seen: set[Path] = set()
    for root, spec, behavior in wanted:
        # Each key is computed once (an SDF adapter's key hashes its documents).
        target = adapter_dir(Path(root), spec, behavior)
        if target in seen or target.exists():
            continue
        seen.add(target)
        missing.setdefault((str(root), str(base_dir(Path(root), spec))), []).append((spec, behavior))
    n = sum(len(b) for b in missing.values())
    if not missing:
        return 0
    log.info("building %d organisms (%d bases) with %d worker(s)", n, len(missing), workers)
    if workers <= 1 or len(missing) == 1:
        for (root, _), builds in missing.items():
            _build_in_turn(root, tuple(builds))
        return n
    _in_processes([(root, tuple(builds)) for (root, _), builds in missing.items()], workers)
    return n
