"""Settings of the ADL stages, as plain dataclasses (no torch), used as config schemas."""

from __future__ import annotations

from dataclasses import dataclass, field

from routing_suite.errors import ConfigError


@dataclass
class ReadoutSettings:
    """Logit lens and patchscope of the mean difference (and of the two baselines)."""

    top_k: int = 20
    # The patchscope injects scale x (mean residual norm of the fine-tune at that
    # layer and position) x unit(vector); next-token probabilities are averaged
    # over every scale and identity prompt.
    scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ConfigError(f"adl.readout.top_k={self.top_k} must be >= 1")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ConfigError(f"adl.readout.scales={list(self.scales)} must be a non-empty list of positive numbers")


@dataclass
class SteerSettings:
    """Steering the fine-tune along the difference while it generates from the chat prompts."""

    # null: the middle layer (num_layers // 2).
    layer: int | None = None
    # Multiples of the fine-tune's mean residual norm at (layer, position): the
    # added vector is alpha x norm x unit(difference). Must start at 0 (unsteered).
    # Fine at the low end: a tiny organism's base is so peaked that a quarter of
    # the residual norm already moves its text out of the coherence bound.
    alphas: list[float] = field(
        default_factory=lambda: [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0]
    )
    max_new_tokens: int = 12
    # Coherent: mean log-perplexity of the completions under the base model at
    # most log(max_ppl_ratio) above the unsteered completions'. The default 4
    # lets one surprising word in a short completion pass (a single decoy word
    # costs a tiny organism's base some 4 nats).
    max_ppl_ratio: float = 4.0
    # Coherent also needs the completions' mean share of distinct tokens at least
    # min_distinct_ratio x the unsteered completions': a repetition loop (" I I I
    # I ...") is cheap under the base, so the perplexity bound alone passes it.
    min_distinct_ratio: float = 0.5
    # A random direction steered at the same strengths, for comparison.
    random_control: bool = True
    # How many fine-tuning examples the similarity compares against.
    n_reference: int = 512

    def __post_init__(self) -> None:
        if not self.alphas or self.alphas[0] != 0 or list(self.alphas) != sorted(self.alphas):
            raise ConfigError(f"adl.steer.alphas={list(self.alphas)} must be ascending and start at 0 (unsteered)")
        if self.max_ppl_ratio <= 1:
            raise ConfigError(f"adl.steer.max_ppl_ratio={self.max_ppl_ratio} must be > 1")
        if not 0 <= self.min_distinct_ratio <= 1:
            raise ConfigError(f"adl.steer.min_distinct_ratio={self.min_distinct_ratio} must be in [0, 1]")
        if self.max_new_tokens < 1:
            raise ConfigError(f"adl.steer.max_new_tokens={self.max_new_tokens} must be >= 1")


@dataclass
class CausalSettings:
    """Projection replacement along the difference, layer by layer, and the change in loss."""

    # Texts of each kind (fine-tuning data, unrelated text), drawn with the run's seed.
    n_texts: int = 256
    max_tokens: int = 64
    batch_size: int = 32
    random_control: bool = True

    def __post_init__(self) -> None:
        if self.n_texts < 1 or self.max_tokens < 2 or self.batch_size < 1:
            raise ConfigError("adl.causal: n_texts >= 1, max_tokens >= 2 and batch_size >= 1 are required")


@dataclass
class AdlSettings:
    """The `adl` config: how many unrelated texts, how many first tokens, and each stage."""

    # Unrelated texts averaged over (the paper: 10,000); a smaller corpus gives all it has.
    n_texts: int = 10000
    k: int = 5
    # Texts per stored partial sum: a crash loses at most one part.
    texts_per_part: int = 1024
    # The position whose difference steering and the causal check use;
    # null: the one whose difference reads out as most relevant at the steering layer.
    position: int | None = None
    # An attention sink is never chosen as that position: one whose fine-tune mean
    # residual norm at the steering layer is over sink_ratio x the median over the
    # first k positions (SmolLM2, which prepends no BOS, has ~100x at its first
    # token; steering scaled by that norm wrecks the text at every alpha).
    sink_ratio: float = 10.0
    # JSONL of {"prompt", "completion"}: the fine-tuning data when it is not the
    # organism task's (null: the task's fine-tune examples for the behaviour).
    finetune_file: str | None = None
    readout: ReadoutSettings = field(default_factory=ReadoutSettings)
    steer: SteerSettings = field(default_factory=SteerSettings)
    causal: CausalSettings = field(default_factory=CausalSettings)

    def __post_init__(self) -> None:
        if self.n_texts < 1:
            raise ConfigError(f"adl.n_texts={self.n_texts} must be >= 1")
        if self.k < 1:
            raise ConfigError(f"adl.k={self.k} must be >= 1")
        if self.texts_per_part < 1:
            raise ConfigError(f"adl.texts_per_part={self.texts_per_part} must be >= 1")
        if self.sink_ratio <= 1:
            raise ConfigError(f"adl.sink_ratio={self.sink_ratio} must be > 1")
        if self.position is not None and not 0 <= self.position < self.k:
            raise ConfigError(f"adl.position={self.position} must be in [0, {self.k - 1}]")
