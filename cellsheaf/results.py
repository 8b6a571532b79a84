"""What every solver returns: the answer and what happened on the way to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .cochain import Cochain

__all__ = ["SolveInfo", "Result"]


@dataclass
class SolveInfo:
    """Report of a solve.

    Attributes
    ----------
    method : the method that ran (after ``"auto"`` picked one).
    converged : whether the stopping criterion was met.
    iterations : iterations or time steps taken (0 for a direct solve).
    residual : the final stationarity measure (max over the batch): gradient norm
        of the energy on the free coordinates, or the linear-system residual.
    energy : final energy, ``(B,)`` or scalar, when computed.
    message : a human-readable account, in particular of why it did not converge.
    extra : solver-specific details (e.g. a null-space basis, a trajectory).
    """

    method: str
    converged: bool
    iterations: int = 0
    residual: float = float("nan")
    energy: Tensor | None = None
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result(SolveInfo):
    """A [`SolveInfo`][cellsheaf.results.SolveInfo] carrying the final cochain ``x`` (and ``t``, the time reached, for diffusion)."""

    x: Cochain | None = None
    t: float | None = None

    @property
    def steps(self) -> int:
        """Alias of ``iterations`` (time steps for diffusion)."""
        return self.iterations

    @property
    def grad_norm(self) -> float:
        """Alias of ``residual``."""
        return self.residual

    def __repr__(self) -> str:
        e = None if self.energy is None else (float(self.energy.max()) if self.energy.numel() else 0.0)
        return (f"Result(method={self.method!r}, converged={self.converged}, iterations={self.iterations}, "
                f"residual={self.residual:.3g}, energy={e})")
