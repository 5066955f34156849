"""Interventions: small objects that each transform a residual-stream tensor.

A `SubspaceEdit` changes one layer's site activations h (..., hidden)
through a subspace with orthonormal rows B (rank, hidden):

- clamp:  h + s * (t - h B^T) B      the coordinates in B set to a target t
- ablate: h - s * (h B^T) B          the subspace projected out
- steer:  h + s * alpha * B[0]       a step along the first direction

s is 1 for the intervention itself; matched controls set it so that the
mean L2 norm of their change equals the intervention's (DESIGN.md).

A `Condition` is what one row group of a batched generation runs under: a
name, its kind (baseline, intervention or control) and its edits.
`InterventionSpec` (routing_suite.settings) is the `intervention` config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from routing_suite.settings import InterventionSpec  # noqa: F401  (the config side of an intervention)


@dataclass
class SubspaceEdit:
    layer: int
    basis: Tensor  # (rank, hidden), orthonormal rows
    mode: str = "clamp"
    target: Tensor | None = None  # (rank,), for clamp
    scale: float = 1.0
    alpha: float = 1.0  # for steer

    def change(self, h: Tensor) -> Tensor:
        basis = self.basis.to(h.dtype)
        if self.mode == "clamp":
            delta = (self.target.to(h.dtype) - h @ basis.T) @ basis
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
    kind: str  # baseline | intervention | control
    site: str = "attn"
    positions: str = "last"
    edits: list[SubspaceEdit] = field(default_factory=list)
    steps: str = "all"  # all | prompt
    seed: int | None = None  # for controls drawn at random

    @property
    def layers(self) -> list[int]:
        return sorted({e.layer for e in self.edits})


def mean_change_norm(edit: SubspaceEdit, h: Tensor) -> float:
    """Mean L2 norm over vectors of the change `edit` makes to h (n, hidden)."""
    return edit.change(h).norm(dim=-1).mean().item()
