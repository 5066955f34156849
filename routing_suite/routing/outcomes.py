"""One routing store's outcomes per prompt and its plotted fit/localize arrays, as its study's tables read them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from routing_suite import store_format
from routing_suite.store import group_dataset

log = logging.getLogger(__name__)

# The controls' column order in every table and plot; others follow alphabetically.
CONTROL_ORDER = ("random", "orthogonal", "non_routing", "semantic", "other_layer")
KIND_ORDER = {kind: i for i, kind in enumerate(store_format.CONDITION_KINDS)}


class StoreFormatError(ValueError):
    """A finished store whose outcomes do not follow routing_suite/store_format.py."""


def condition_key(name: str, kind: str) -> tuple[int, int, str]:
    """Sort key: baseline, the intervention, then the controls in CONTROL_ORDER, then the rest by name."""
    rank = CONTROL_ORDER.index(name) if name in CONTROL_ORDER else len(CONTROL_ORDER)
    return KIND_ORDER.get(kind, len(KIND_ORDER)), rank, name


@dataclass
class CellOutcomes:
    """One cell's (one build's) per-prompt outcomes, conditions in table order."""

    family: str
    behavior: str
    path: str
    conditions: tuple[str, ...]
    kinds: tuple[str, ...]
    # (condition, framing, prompt), framing index 0 = eval, 1 = deploy; values in [0, 1]
    performed: np.ndarray
    dropped_prompts: int = 0
    # (condition, framing, prompt): the task answer correct
    correct: np.ndarray | None = None
    # (prompt,): each prompt's sampling unit (stores without one: the prompt itself)
    units: np.ndarray | None = None
    # (condition,): the mean L2 change each condition makes
    perturbation_norm: np.ndarray | None = None
    # Settings that tell this cell's runs apart (store attribute cell.variant), and the build.
    variant: str = ""
    replicate: str = ""
    # The store's result-shaping config, flattened (tells a cell's variants apart in the tables).
    settings: dict = field(default_factory=dict)
    # (condition,): the layers each condition edits ("3,4")
    condition_layers: tuple[str, ...] = ()
    # Localization: the chosen window, and each source's per-layer patch effect (layer -> fraction of the gap).
    window: tuple[int, ...] = ()
    layer_effect: dict[str, dict[int, float]] = field(default_factory=dict)
    # The localize rule's own window and the window check's verdict (routing.window_check;
    # () and "" for a store without the check).
    rule_window: tuple[int, ...] = ()
    window_check: str = ""
    # A few test prompts with what each condition generated (report.md shows them).
    examples: list[dict] = field(default_factory=list)

    @property
    def planted(self) -> tuple[int, ...]:
        """The layers the fine-tune was allowed to change (organisms: model.train.lora_layers); () if unknown."""
        value = self.settings.get("model.train.lora_layers")
        return tuple(int(x) for x in value) if isinstance(value, list) else ()

    def __post_init__(self) -> None:
        n_cond, _, n_prompts = self.performed.shape
        if self.correct is None:
            self.correct = np.full_like(self.performed, np.nan)
        if self.units is None:
            self.units = np.arange(n_prompts).astype(str)
        if self.perturbation_norm is None:
            self.perturbation_norm = np.full(n_cond, np.nan)

    @property
    def intervention(self) -> str:
        return self.conditions[self.kinds.index("intervention")]

    @property
    def controls(self) -> tuple[str, ...]:
        return tuple(c for c, k in zip(self.conditions, self.kinds) if k == "control")

    @property
    def n_prompts(self) -> int:
        return int(self.performed.shape[-1])


def _group_names(path: Path) -> set[str]:
    root = zarr.open_group(str(path), mode="r")
    return {name for name, _ in root.groups()}


def _checked_conditions(ds: xr.Dataset) -> tuple[list[str], list[str]]:
    """The outcomes group's condition names and kinds, once its layout is checked."""
    if "performed" not in ds:
        raise StoreFormatError("outcomes has no variable performed")
    if set(ds["performed"].dims) != {"condition", "framing", "prompt"}:
        raise StoreFormatError(f"outcomes/performed has dims {ds['performed'].dims}, expected (condition, framing, prompt)")
    if "kind" not in ds.coords:
        raise StoreFormatError("outcomes has no kind coordinate on condition")
    names = [str(c) for c in ds["condition"].values]
    kinds = [str(k) for k in ds["kind"].values]
    framings = {str(f) for f in ds["framing"].values}
    if len(set(names)) != len(names):
        raise StoreFormatError(f"condition names repeat: {names}")
    if not set(store_format.FRAMINGS) <= framings:
        raise StoreFormatError(f"framing holds {sorted(framings)}, needs {list(store_format.FRAMINGS)}")
    if unknown := sorted(set(kinds) - set(store_format.CONDITION_KINDS)):
        raise StoreFormatError(f"kind values {unknown} are not among {list(store_format.CONDITION_KINDS)}")
    for kind in ("baseline", "intervention"):
        if kinds.count(kind) != 1:
            raise StoreFormatError(f"{kinds.count(kind)} conditions of kind {kind!r}, expected exactly 1")
    return names, kinds


# The key `_layer_effects` gives the localize group's `weight_effect` (the fine-tune's
# LoRA updates at one layer only, in the base).
WEIGHT_SOURCE = "finetuned_weights_to_base"


def _layer_effects(path: Path) -> dict[str, dict[int, float]]:
    """Per patching source, each layer's effect from the localize group ({} when absent)."""
    try:
        localize = read_group(path, "localize", ("layer_effect", "weight_effect"))
    except CorruptGroup:  # the plots' reading reports it; the outcomes are whole and still count
        return {}
    if localize is None or "layer_effect" not in localize:
        return {}
    effects = {}
    for source in localize["source"].values:
        row = localize["layer_effect"].sel(source=source)
        effects[str(source)] = {int(layer): float(v) for layer, v in zip(row["layer"].values, row.values)}
    if "weight_effect" in localize:  # stores written before it existed have none
        row = localize["weight_effect"]
        effects[WEIGHT_SOURCE] = {int(layer): float(v) for layer, v in zip(row["layer"].values, row.values)}
    return effects


def _window_check(path: Path) -> tuple[tuple[int, ...], str]:
    """The localize rule's window and the window check's verdict (() and "" without the check)."""
    try:
        localize = read_group(path, "localize", ("layer_effect",))
    except CorruptGroup:
        return (), ""
    if localize is None or "check" not in localize.attrs:
        return (), ""
    return tuple(int(w) for w in localize.attrs.get("rule_window", ())), str(localize.attrs["check"])


def read_outcomes(path: Path, family: str, behavior: str, variant: str = "", replicate: str = "") -> CellOutcomes:
    """The `outcomes` group of a finished store; StoreFormatError says what is wrong with it."""
    if "outcomes" not in _group_names(path):
        raise StoreFormatError("no outcomes group (the intervene stage never wrote)")
    ds = xr.open_zarr(str(path), group="outcomes", consolidated=False)
    names, kinds = _checked_conditions(ds)
    performed = ds["performed"]
    order = sorted(range(len(names)), key=lambda i: condition_key(names[i], kinds[i]))
    values = (
        performed.transpose("condition", "framing", "prompt")
        .sel(framing=list(store_format.FRAMINGS))
        .isel(condition=order)
        .values.astype("float64")
    )
    finite = np.isfinite(values).all(axis=(0, 1))
    if not finite.any():
        raise StoreFormatError("no prompt has a finite outcome under every condition and framing")
    if ((values[..., finite] < 0) | (values[..., finite] > 1)).any():
        raise StoreFormatError("outcomes/performed holds values outside [0, 1]")
    def ordered(name: str) -> np.ndarray | None:
        if name not in ds:
            return None
        return ds[name].transpose("condition", "framing", "prompt").sel(framing=list(store_format.FRAMINGS)).isel(condition=order).values

    correct = ordered("correct")
    norms = ds["perturbation_norm"].isel(condition=order).values.astype("float64") if "perturbation_norm" in ds else None
    units = np.array([str(u) for u in ds["cluster"].values]) if "cluster" in ds.coords else None
    layers = tuple(str(x) for x in ds["layers"].isel(condition=order).values) if "layers" in ds.coords else ()
    window = tuple(int(w) for w in ds.attrs.get("window", ()))
    effects = _layer_effects(path)
    rule_window, window_check = _window_check(path)
    return CellOutcomes(
        family=family,
        behavior=behavior,
        path=str(path),
        conditions=tuple(names[i] for i in order),
        kinds=tuple(kinds[i] for i in order),
        performed=values[..., finite],
        dropped_prompts=int((~finite).sum()),
        correct=None if correct is None else correct.astype("float64")[..., finite],
        units=None if units is None else units[finite],
        perturbation_norm=norms,
        variant=variant,
        replicate=replicate,
        condition_layers=layers,
        window=window,
        layer_effect=effects,
        rule_window=rule_window,
        window_check=window_check,
        examples=read_examples(path, ds, [names[i] for i in order]),
    )


N_EXAMPLES = 3


def read_examples(path: Path, outcomes: xr.Dataset, conditions: list[str], n: int = N_EXAMPLES) -> list[dict]:
    """The first `n` test prompts of a store: their texts, the expected answer, and each
    condition's first draw of a completion under each framing ([] for stores without completions)."""
    if "completion" not in outcomes:
        return []
    ids = [str(p) for p in outcomes.prompt.values[:n]]
    acts = xr.open_zarr(str(path), group="activations", consolidated=False)
    index = {str(p): i for i, p in enumerate(acts.prompt.values)}
    examples = []
    for pid in ids:
        i = index.get(pid)
        if i is None:
            continue
        for framing in store_format.FRAMINGS:
            texts = outcomes["completion"].sel(prompt=pid, framing=framing).isel(draw=0)
            examples.append({
                "prompt_id": pid, "framing": framing, "prompt": str(acts[f"{framing}_prompt"].values[i]),
                "answer": str(acts["answer"].values[i]),
                "completions": {c: str(texts.sel(condition=c).values) for c in conditions},
            })
    return examples


class CorruptGroup(RuntimeError):
    """A group of a store whose data cannot be read; the message names the group and why."""


def read_group(path: str | Path, group: str, variables: tuple[str, ...]) -> xr.Dataset | None:
    """The named variables of one group, loaded; None when the group or all the variables
    are absent; `CorruptGroup` when they are there but cannot be read."""
    try:
        if group not in _group_names(Path(path)):
            return None
        ds = group_dataset(path, group)
        present = [v for v in variables if v in ds]
        return ds[present].load() if present else None
    except Exception as err:  # noqa: BLE001 - any decode or read failure
        raise CorruptGroup(f"group {group} cannot be read ({type(err).__name__}: {err})") from err


def variant_labels(cells: list[CellOutcomes]) -> dict[tuple[str, str, str], str]:
    """Per (family, behavior, variant): the settings that tell it apart from the cell's
    other variants ("intervention.rank=2"); "" for a cell with one variant."""
    by_cell: dict[tuple[str, str], dict[str, dict]] = {}
    for c in cells:
        by_cell.setdefault((c.family, c.behavior), {}).setdefault(c.variant, c.settings)
    labels = {}
    for (family, behavior), variants in by_cell.items():
        keys = sorted({k for s in variants.values() for k in s if len({repr(v.get(k)) for v in variants.values()}) > 1})
        keys = [k for k in keys if k not in ("model.seed", "weights") and not k.startswith("weights.")]
        for variant, settings in variants.items():
            label = ", ".join(f"{k}={settings.get(k, '–')}" for k in keys)
            labels[family, behavior, variant] = label or (variant if len(variants) > 1 else "")
    return labels
