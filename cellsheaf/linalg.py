"""Batched linear algebra shared by the solvers: preconditioned conjugate gradients.

Examples
--------
>>> import torch
>>> from cellsheaf.linalg import cg
>>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
>>> x, info = cg(lambda v: v @ A, torch.tensor([[1.0, 2.0]], dtype=torch.float64))
>>> info.converged, torch.allclose(x @ A, torch.tensor([[1.0, 2.0]], dtype=torch.float64))
(True, True)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .results import SolveInfo

__all__ = ["cg"]


def cg(
    apply_A: Callable[[Tensor], Tensor],
    b: Tensor,
    precond: Callable[[Tensor], Tensor] | None = None,
    x0: Tensor | None = None,
    tol: float = 1e-12,
    maxiter: int | None = None,
) -> tuple[Tensor, SolveInfo]:
    """Solve ``A x = b`` for a batch of right-hand sides ``b`` of shape ``(B, n)`` by preconditioned CG.

    ``apply_A`` maps ``(B, n) -> (B, n)`` and must be symmetric positive
    (semi)definite on each row; ``precond`` applies an SPD approximation of
    ``A⁻¹``. Each row stops when ``‖b − A x‖ <= tol · ‖b‖``; the report's
    ``residual`` is the largest relative residual over the batch. Under
    ``torch.no_grad()`` the iterates are updated in place (no fresh ``(B, n)``
    block per step); with grad mode on, autograd can differentiate through the
    iterations.

    Returns
    -------
    x : tensor ``(B, n)``
    info : `SolveInfo` (``converged`` is True only if every row met ``tol``)
    """
    squeeze = b.dim() == 1
    b = b.unsqueeze(0) if squeeze else b
    n = b.shape[-1]
    maxiter = maxiter or max(10 * n, 100)
    x = torch.zeros_like(b) if x0 is None else (x0.unsqueeze(0) if x0.dim() == 1 else x0).clone()
    r = b - apply_A(x) if x0 is not None else b.clone()
    bnorm = b.norm(dim=-1).clamp_min(torch.finfo(b.dtype).tiny)
    z = precond(r) if precond else r
    p, rz = z.clone(), (r * z).sum(-1)
    rel = (r.norm(dim=-1) / bnorm).detach()
    it, message = 0, ""
    inplace = not torch.is_grad_enabled()  # in place saves a fresh (B, n) block per update; autograd needs copies
    while it < maxiter and bool((rel > tol).any()):
        Ap = apply_A(p)
        pAp = (p * Ap).sum(-1)
        active = rel > tol
        if bool((pAp[active] <= 0).any()):
            message = "the operator is not positive definite along a search direction (singular system?)"
            break
        step = torch.where(active, rz / torch.where(active, pAp, torch.ones_like(pAp)), torch.zeros_like(rz))
        x = _axpy(x, step.unsqueeze(-1), p, inplace)
        r = _axpy(r, -step.unsqueeze(-1), Ap, inplace)
        z = precond(r) if precond else r
        rz_new = torch.linalg.vecdot(r, z)
        beta = torch.where(active, rz_new / torch.where(rz == 0, torch.ones_like(rz), rz), torch.zeros_like(rz))
        p = p.mul_(beta.unsqueeze(-1)).add_(z) if inplace else torch.addcmul(z, beta.unsqueeze(-1), p)
        rz = rz_new
        rel = (r.norm(dim=-1) / bnorm).detach()
        it += 1
    worst = float(rel.max()) if rel.numel() else 0.0
    converged = worst <= tol
    if not converged and not message:
        message = f"CG stopped after {it} iterations with relative residual {worst:.3g} > tol {tol:.3g}"
    info = SolveInfo("cg", converged, it, worst, message=message)
    return (x[0] if squeeze else x), info


def _axpy(y: Tensor, a: Tensor, v: Tensor, inplace: bool) -> Tensor:
    """``y + a v`` (``a`` broadcast over the rows), overwriting ``y`` when ``inplace``."""
    return y.addcmul_(a, v) if inplace else torch.addcmul(y, a, v)
