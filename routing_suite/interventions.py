"""Interventions: small objects that each transform a residual-stream tensor.

A `SubspaceEdit` changes one layer's site activations h (..., hidden)
through a subspace with orthonormal rows B (rank, hidden):

- clamp:  h + s * (t - h B^T) B      the coordinates in B set to a target t
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

A `Condition` is what one row group of a batched generation runs under: a
name, its kind (baseline, intervention or control) and its edits.
`InterventionSpec` (routing_suite.routing.settings) is the `intervention` config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class SubspaceEdit:
    layer: int
    basis: Tensor  # (rank, hidden), orthonormal rows
    mode: str = "clamp"
    target: Tensor | None = None  # (rank,), for clamp
    scale: float = 1.0
    alpha: float = 1.0  # for steer
    # A matched control: the intervention's edit at this layer (see the module doc).
    matched: SubspaceEdit | None = None

    def change(self, h: Tensor) -> Tensor:
        basis = self.basis.to(device=h.device, dtype=h.dtype)
        if self.matched is not None:
            reference = self.matched.basis.to(device=h.device, dtype=h.dtype)
            return (self.matched.change(h) @ reference.T) @ basis
        if self.mode == "clamp":
            delta = (self.target.to(device=h.device, dtype=h.dtype) - h @ basis.T) @ basis
        elif self.mode == "ablate":
            delta = -(h @ basis.T) @ basis
        else:
            delta = (self.alpha * basis[0]).expand_as(h)
        return self.scale * delta

    def apply(self, h: Tensor) -> Tensor:
        return h + self.change(h)


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
