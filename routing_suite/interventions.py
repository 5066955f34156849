"""Interventions: small objects that each transform a residual-stream tensor.

A `SubspaceEdit` changes one layer's site activations h (..., hidden)
through a subspace with orthonormal rows B (rank, hidden):

- clamp:  h + s * (t - h B^T) B      the coordinates in B set to a target t
  (t one target for every position, or one per prompt position counted
  from the prompt's end and one per generation step: `SubspaceEdit.target_for`);
  with `side` (one-sided, `SubspaceEdit.side`) only the coordinates that lie
  on the other framing's side of t are set to it, the others are kept
- ablate: h - s * (h B^T) B          the subspace projected out
- steer:  h + s * alpha * B[0]       a step along the first direction

s is 1 for the intervention itself. A matched control (DESIGN.md) is an
edit with `matched` set to the intervention's edit at its layer: it makes
the change that edit would make to the same activation, carried into its
own subspace coordinate by coordinate,

- matched: ((change of `matched` on h) M^T) C    (M: matched's basis, C: own)

so it moves every activation it edits (every prompt, position and
generation step) by exactly the L2 amount the intervention moves that
activation, with no scale factor at all (a pooled mean rescaled by 13-231x
was the previous design's failure).

On the residual stream an edit is carried to every later layer, so "the
amount the intervention moves that activation" is its change in its own run,
where its earlier layers' edits have already been made: a direction projected
out at layer 1 is mostly gone at layer 2, and layer 2's ablation changes
little. A `ResidualCarry`, shared by one condition's edits within one forward
pass, holds how far the intervention's run would be from the control's at
each position (the intervention's changes so far minus the control's, to
first order: later layers' writes taken as unchanged), and a matched edit
takes the intervention's change on that state. Without it, a control matched
to an ablation at six layers pushed each token by the full coordinate at
every one of them, in six random directions: on a planted organism 7.8 away
from the clean run at the last edited layer, against the ablation's 3.9
(until 2026-12-07).

A `Condition` is what one row group of a batched generation runs under: a
name, its kind (baseline, intervention or control) and its edits.
`InterventionSpec` (routing_suite.routing.settings) is the `intervention` config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SubspaceEdit:
    layer: int
    basis: Tensor  # (rank, hidden), orthonormal rows
    mode: str = "clamp"
    # For clamp: (rank,), or (offsets, rank) with row -1 the last prompt token's,
    # row -2 the one before it, ... (NaN rows: no target there; see target_for).
    target: Tensor | None = None
    # For clamp: (steps, rank), row k-1 the target of the k-th generated token's
    # pass (NaN rows: none), or None (a generated token gets the last prompt row).
    step_target: Tensor | None = None
    # A one-sided clamp: the sign, per row of `target` (and of `step_target` in
    # `step_side`) and coordinate, of (other framing's mean - target). A
    # coordinate on the target's own side of the target is kept, not set to it:
    # an activation that already reads as the target framing keeps its
    # variation (NaN or 0: that coordinate is clamped either way). None: two-sided.
    side: Tensor | None = None
    step_side: Tensor | None = None
    scale: float = 1.0
    alpha: float = 1.0  # for steer
    # A matched control: the intervention's edit at this layer (see the module doc).
    matched: SubspaceEdit | None = None

    def change(self, h: Tensor, step: int = 0, carry: ResidualCarry | None = None) -> Tensor:
        """The edit's change to `h` (`step`: 0 for a prompt's pass, k for the k-th generated token's;
        `carry`: the residual stream's, for a matched edit there, updated here)."""
        basis = self.basis.to(device=h.device, dtype=h.dtype)
        if self.matched is not None:
            reference = self.matched.basis.to(device=h.device, dtype=h.dtype)
            seen = h if carry is None else carry.reference_state(h)
            wanted = self.matched.change(seen, step)
            own = (wanted @ reference.T) @ basis
            if carry is not None:
                carry.add(wanted - own)
            return own
        if self.mode == "clamp":
            coords = h @ basis.T
            target = self.target_for(coords, step)
            if self.side is not None:
                side = self._rows(self.side, self.step_side, torch.zeros_like(coords), step)
                target = torch.where((coords - target) * torch.nan_to_num(side) < 0, coords, target)
            delta = (target - coords) @ basis
        elif self.mode == "ablate":
            delta = -(h @ basis.T) @ basis
        else:
            delta = (self.alpha * basis[0]).expand_as(h)
        return self.scale * delta

    def target_for(self, coords: Tensor, step: int = 0) -> Tensor:
        """The clamp's target for activations whose coordinates are `coords`.

        A per-position target (offsets, rank) is aligned with a prompt's end:
        for a prompt's pass (batch, seq > 1, rank), left padded so that every
        row ends at the last column, position -j gets row -j; positions before
        the first row, and rows that are NaN (no fit prompt reached that far
        back), keep their own coordinates. The k-th generated token's pass
        (`step` k > 0) gets `step_target` row k - 1, and keeps its coordinates
        where that row is NaN or missing; without `step_target`, one position
        (a generated token, or last-token activations (n, rank)) gets the last row."""
        return self._rows(self.target, self.step_target, coords, step)

    @staticmethod
    def _rows(table: Tensor, step_table: Tensor | None, coords: Tensor, step: int) -> Tensor:
        """`table`'s rows placed against `coords` as `target_for` describes, `coords`'
        own values where a row is NaN or missing (the target's or the side's table)."""
        table = table.to(device=coords.device, dtype=coords.dtype)
        if table.dim() == 1:
            return table.expand_as(coords)
        if step > 0 and step_table is not None:
            if step > step_table.shape[0]:
                return coords
            row = step_table[step - 1].to(device=coords.device, dtype=coords.dtype)
            return torch.where(torch.isnan(row), coords, row)
        if coords.dim() < 3 or coords.shape[-2] == 1:
            return torch.where(torch.isnan(table[-1]), coords, table[-1])
        n = min(table.shape[0], coords.shape[-2])
        aligned = coords.clone()
        aligned[..., -n:, :] = table[-n:]
        return torch.where(torch.isnan(aligned), coords, aligned)

    def apply(self, h: Tensor, step: int = 0, carry: ResidualCarry | None = None) -> Tensor:
        return h + self.change(h, step, carry)


def own_run_changes(edits: list[SubspaceEdit], states: dict[int, Tensor], residual: bool) -> list[Tensor]:
    """Each edit's change to the clean activations `states` (layer -> (n, hidden), the same
    rows at every layer), in layer order. On the residual stream (`residual`) in the edits'
    own run to first order, as generation makes them: the state at a layer is the clean one
    plus the changes made at the layers before, and a matched edit sees its reference's run
    through a `ResidualCarry`. At any other site each layer's activation is edited alone."""
    carry, made, changes = ResidualCarry(), None, []
    for edit in sorted(edits, key=lambda e: e.layer):
        h = states[edit.layer]
        if not residual:
            changes.append(edit.change(h))
            continue
        change = edit.change(h if made is None else h + made, carry=carry)
        made = change if made is None else made + change
        changes.append(change)
    return changes


class ResidualCarry:
    """Within one forward pass, at each edited position of the residual stream: the
    intervention's changes so far minus the matched control's (see the module doc).
    Edits of one condition share one, applied in layer order; a new pass starts a new one."""

    def __init__(self) -> None:
        self.offset: Tensor | None = None

    def reference_state(self, h: Tensor) -> Tensor:
        """The activation the intervention's run would have where the control's has `h`."""
        return h if self.offset is None else h + self.offset

    def add(self, difference: Tensor) -> None:
        self.offset = difference if self.offset is None else self.offset + difference


@dataclass
class Condition:
    name: str
    kind: str  # baseline | intervention | control | comparison
    site: str = "attn"
    positions: str = "last"
    edits: list[SubspaceEdit] = field(default_factory=list)
    steps: str = "all"  # all | prompt
    seed: int | None = None  # for controls drawn at random

    @property
    def layers(self) -> list[int]:
        return sorted({e.layer for e in self.edits})
