"""Edge potentials ``U_e``: how an edge turns its two expressed values into energy.

A *difference* potential depends only on the discrepancy ``r = F_v x_v − F_u x_u``
(quadratic, L1, Huber, ...). A two-argument potential depends on both values
separately (cross-entropy between predicted probabilities and a target).

Examples
--------
>>> import torch, cellsheaf as cs
>>> cs.potentials.Quadratic().value(torch.tensor([3.0, 4.0]))
tensor(12.5000)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Potential", "Quadratic"]


class Potential:
    """Base class. Difference potentials implement :meth:`value` and :meth:`grad` of ``r``.

    Two-argument potentials set ``difference = False`` and implement
    :meth:`pair_value` and :meth:`pair_grad` of ``(a_v, a_u)`` where
    ``a_v = F_v x_v`` and ``a_u = F_u x_u``.
    """

    difference: bool = True
    quadratic: bool = False

    def value(self, r: Tensor) -> Tensor:
        """Energy of discrepancies ``r`` of shape ``(..., d)``; returns shape ``(...)``."""
        raise NotImplementedError

    def grad(self, r: Tensor) -> Tensor:
        """Gradient of :meth:`value` with respect to ``r`` (same shape as ``r``)."""
        with torch.enable_grad():
            r = r.detach().requires_grad_(True)
            return torch.autograd.grad(self.value(r).sum(), r)[0]

    def pair_value(self, a_v: Tensor, a_u: Tensor) -> Tensor:
        """Energy of the two expressed values ``a_v = F_v x_v``, ``a_u = F_u x_u``."""
        return self.value(a_v - a_u)

    def pair_grad(self, a_v: Tensor, a_u: Tensor) -> tuple[Tensor, Tensor]:
        """Gradients ``(∂U/∂a_v, ∂U/∂a_u)``."""
        g = self.grad(a_v - a_u)
        return g, -g

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Quadratic(Potential):
    """``U(r) = ½‖r‖²``: the default, whose gradient flow is sheaf diffusion."""

    quadratic = True

    def value(self, r):
        return 0.5 * (r * r).sum(-1)

    def grad(self, r):
        return r
