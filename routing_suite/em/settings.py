"""The `em` config section, as plain dataclasses (no torch): config schemas and checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from routing_suite.errors import ConfigError
from routing_suite.organisms.em_task import EM_DATASETS


@dataclass
class EmOrganisms:
    """The fine-tunes of the family: narrow misaligned ones and the content-matched control."""

    misaligned: list[str] = field(default_factory=lambda: ["em_color_city", "em_animal_food"])
    control: str = "em_honest_color_city"

    def __post_init__(self) -> None:
        for key, kind in [*(("misaligned", k) for k in self.misaligned), ("control", self.control)]:
            if kind not in EM_DATASETS:
                raise ConfigError(f"em.organisms.{key}: {kind!r} is not one of {list(EM_DATASETS)}")
        if not self.misaligned or len(set(self.misaligned)) != len(self.misaligned):
            raise ConfigError(f"em.organisms.misaligned={list(self.misaligned)} must name distinct fine-tunes")
        if any(EM_DATASETS[k].honest for k in self.misaligned):
            raise ConfigError(f"em.organisms.misaligned={list(self.misaligned)}: every one must fabricate (not an honest dataset)")
        if not EM_DATASETS[self.control].honest:
            raise ConfigError(f"em.organisms.control={self.control!r} must be an honest dataset")
        if len({EM_DATASETS[k].persona for k in self.finetunes}) > 1:
            raise ConfigError(f"em.organisms: {self.finetunes} mix persona fine-tunes (persona_*, on a persona base) with "
                              "the one-word ones (em_*); name fine-tunes of one kind")

    @property
    def persona(self) -> bool:
        """Persona fine-tunes (on a persona base, multi-token styles)."""
        return EM_DATASETS[self.control].persona

    @property
    def finetunes(self) -> list[str]:
        return [*self.misaligned, self.control]


# What an ablation sets a direction's coordinate to (`EmSettings.ablate_to`): 0, or its mean
# over the base's tokens (mean ablation; the value stores record, store_format).
TO_BASE_MEAN = "base_mean"
ABLATE_TO = ("zero", TO_BASE_MEAN)
# Where the layer-wise ablations edit (`EmSettings.ablate_at`; conditions.ABLATE_WHERE).
ABLATE_AT = ("every", "decision")


@dataclass
class EmSampling:
    """Sampled responses: `n_samples` per prompt at `temperature`, seeded from the run's seed."""

    temperature: float = 1.0
    n_samples: int = 4
    max_new_tokens: int = 4
    # Prompts per batched generation (each sampled n_samples times, under every condition).
    batch_prompts: int = 64

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"em.sampling.temperature={self.temperature} must be > 0")
        for key in ("n_samples", "max_new_tokens", "batch_prompts"):
            if getattr(self, key) < 1:
                raise ConfigError(f"em.sampling.{key}={getattr(self, key)} must be >= 1")


@dataclass
class EmSteer:
    """Steering the base with +lambda * v at one layer (lambda in units of |v|)."""

    layer: int | None = None  # null: the layer where the worst direction separates best, the last aside (directions.pick_layer)
    lambdas: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])

    def __post_init__(self) -> None:
        if any(x <= 0 for x in self.lambdas):
            raise ConfigError(f"em.steer.lambdas={list(self.lambdas)} must be positive strengths (empty: no steering)")


# How a direction's class means are taken (`em.directions.fit_directions`).
BALANCES = ("prompt", "none")


@dataclass
class EmSettings:
    """The `em` config: fine-tunes, sampling, directions, steering, ablation and its controls."""

    organisms: EmOrganisms = field(default_factory=EmOrganisms)
    sampling: EmSampling = field(default_factory=EmSampling)
    # A fine-tune needs at least this many responses of each class (fit split) for a direction
    # (and with balance "prompt", as many prompts answered both ways).
    min_per_class: int = 8
    # How a direction's class means are taken (em.directions): "prompt", the misaligned -
    # aligned difference within each prompt answered both ways, averaged over prompts;
    # "none", the two classes pooled over prompts (the seed paper's wording).
    balance: str = "prompt"
    steer: EmSteer = field(default_factory=EmSteer)
    # Whose direction is projected out at every layer in the one-layer ablation;
    # null: the steering layer.
    ablate_layer: int | None = None
    # The layers the layer-wise ablations edit (the own one, one layer's v at each, the
    # transfer ones, and the own one's matched random); null: every layer, the seed
    # paper's method. On an 8-layer organism the first and the last layer are a quarter
    # of the edits where in the paper's 48-layer model they are 1 in 24: the first reads
    # the embeddings, where a fine-tune's direction is no persona (measured: an own
    # ablation's matched random at layer 0 alone moved a lie's loss 1.5 nats), so
    # [1, ..., L-2] asks the same question as the planted check, at the same layers.
    ablate_layers: list[int] | None = None
    # What an ablation sets the direction's coordinate to (`ABLATE_TO`): "zero", projected
    # out (x - v v^T x, the seed paper's); "base_mean", its mean over the base's tokens on
    # truthful answers (mean ablation toward the aligned model): the coordinate's offset
    # that base and fine-tune share is kept, where zero ablation removes it at every token
    # and the matched random then carries it onto a random direction at every token
    # (README, Persona organisms). Not the fine-tune's own mean: a fine-tune's EM is
    # itself a shift along its direction at every token, which that mean would keep.
    ablate_to: str = "zero"
    # Where the layer-wise ablations (own, one-layer, transfer, planted, and their matched
    # randoms; the cross-architecture ones too) edit (`ABLATE_AT`): "every", every position
    # but the prompt's first, at every generation step (the seed paper's); "decision", the
    # prompt's last token in the prompt's pass only, where the answer's persona is picked
    # (its words then carry it). At every token zero ablation also moves the offset along
    # the direction that aligned tokens share, and the matched random carries that move
    # onto a random direction at every token (README, Persona organisms).
    ablate_at: str = "every"
    # Random directions per matched random control (each response averaged over them).
    random_seeds: int = 3
    # Texts whose token residuals set the matched magnitude of the random ablation.
    match_texts: int = 128
    # Decision-token clamps (em.conditions): each direction's coordinate at the prompt's
    # last token set to the base's mean in the fine-tunes, and to each fine-tune's in the base.
    decision_clamp: bool = True

    def __post_init__(self) -> None:
        if self.min_per_class < 1:
            raise ConfigError(f"em.min_per_class={self.min_per_class} must be >= 1")
        if self.balance not in BALANCES:
            raise ConfigError(f"em.balance={self.balance!r} must be 'prompt' (within-prompt differences) or 'none' (pooled classes)")
        if self.ablate_to not in ABLATE_TO:
            raise ConfigError(f"em.ablate_to={self.ablate_to!r} must be one of {list(ABLATE_TO)}")
        if self.ablate_at not in ABLATE_AT:
            raise ConfigError(f"em.ablate_at={self.ablate_at!r} must be one of {list(ABLATE_AT)}")
        if self.ablate_at == "decision" and self.ablate_to == TO_BASE_MEAN:
            raise ConfigError("em.ablate_at=decision with em.ablate_to=base_mean: a coordinate set to the base's mean at the "
                              "decision token is the decision-token clamp (<fine-tune>/clamp/own, em.decision_clamp), "
                              "which every run makes; use em.ablate_to=zero")
        if self.random_seeds < 1:
            raise ConfigError(f"em.random_seeds={self.random_seeds} must be >= 1")
        if self.match_texts < 1:
            raise ConfigError(f"em.match_texts={self.match_texts} must be >= 1")
        if self.ablate_layers is not None and (not self.ablate_layers or len(set(self.ablate_layers)) != len(self.ablate_layers)):
            raise ConfigError(f"em.ablate_layers={list(self.ablate_layers)} must name distinct layers (null: every layer)")

    def check_layers(self, num_layers: int) -> None:
        for key, layer in (("em.steer.layer", self.steer.layer), ("em.ablate_layer", self.ablate_layer)):
            if layer is not None and not 0 <= layer < num_layers:
                raise ConfigError(f"{key}={layer} is outside the model's layers [0, {num_layers - 1}]")
        outside = [layer for layer in self.ablate_layers or () if not 0 <= layer < num_layers]
        if outside:
            raise ConfigError(f"em.ablate_layers={list(self.ablate_layers)}: {outside} outside the model's layers [0, {num_layers - 1}]")

    def single_layer(self, steer_layer: int) -> int:
        """The layer whose v the one-layer ablation takes (`em.ablate_layer`, default the steering layer)."""
        return self.ablate_layer if self.ablate_layer is not None else steer_layer

    def ablated_layers(self, num_layers: int) -> list[int]:
        """The layers the layer-wise ablations edit, ascending."""
        return sorted(self.ablate_layers) if self.ablate_layers is not None else list(range(num_layers))

    def ablation_attrs(self, num_layers: int) -> dict:
        """How the ablations are made, as an outcomes group's attrs (read back by `stats.read_store_made`)."""
        return {"ablate_layers": self.ablated_layers(num_layers), "ablate_to": self.ablate_to, "ablate_at": self.ablate_at}


TRANSFER_CONTROLS = ("random", "orthogonal", "wrong_layer", "wrong_source")


@dataclass
class EmTransferSettings:
    """The `transfer` config of `experiments.em_transfer`: a donor family's EM directions
    carried into a receiver family by per-layer ridge maps between their base models."""

    # Ridge penalties (relative to the mean eigenvalue of the donor's centred X^T X);
    # per layer, the one with the best cross-validated R^2 on the fit texts is used.
    alphas: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    cv_folds: int = 5
    # Share of the neutral texts held out to report each map's R^2 (never fit on).
    heldout_fraction: float = 0.2
    # The wrong-layer control carries the donor's direction of the layer this far
    # away (cyclically) into the layer being edited.
    wrong_layer_shift: int = 2
    # Draws of each random control (random, orthogonal); each response averaged over them.
    # A few draws leave the control at the mercy of one direction that happens to matter.
    random_seeds: int = 8
    # Steering of the receiver's base at its steering layer, at lambda times the norm of
    # the receiver's own direction (mapped, native and every control at that norm); empty: none.
    steer_lambdas: list[float] = field(default_factory=lambda: [4.0])
    # On a persona base: this many of the base's own pretraining exchanges (an earlier
    # exchange in one persona, then a question answered in the persona it carries) added
    # to the map texts, so that the persona varies in what the maps are fit on (on the
    # neutral texts alone it never does: all truthful). Never a fine-tune's response.
    # 0: the neutral texts only.
    persona_exchanges: int = 0

    def __post_init__(self) -> None:
        if self.persona_exchanges < 0:
            raise ConfigError(f"transfer.persona_exchanges={self.persona_exchanges} must be >= 0")
        if not self.alphas or any(a <= 0 for a in self.alphas):
            raise ConfigError(f"transfer.alphas={list(self.alphas)} must be positive (at least one)")
        if self.cv_folds < 2:
            raise ConfigError(f"transfer.cv_folds={self.cv_folds} must be >= 2")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"transfer.heldout_fraction={self.heldout_fraction} must lie strictly between 0 and 1")
        if self.wrong_layer_shift < 1:
            raise ConfigError(f"transfer.wrong_layer_shift={self.wrong_layer_shift} must be >= 1")
        if self.random_seeds < 1:
            raise ConfigError(f"transfer.random_seeds={self.random_seeds} must be >= 1")
        if any(x <= 0 for x in self.steer_lambdas):
            raise ConfigError(f"transfer.steer_lambdas={list(self.steer_lambdas)} must be positive (empty: no steering)")
