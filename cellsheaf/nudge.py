"""Equilibria of a determined sheaf nudged by soft edges, by sweeps along its propagation order.

Split the edges into a *determined part* ``D`` (a propagation schedule: ``δ_Ω``
square and triangular, [`cellsheaf.propagation.determined_part`][cellsheaf.propagation.determined_part]) and the *rest*
``R``: soft edges such as a loss edge of small weight ``γ`` or penalty edges.
The equilibrium of ``D`` alone is its propagation ``x*`` (zero discord on ``D``).
The rest moves it by ``Δ`` solving

    ``M Δ + ∇E_R(x* + Δ) = 0``,   ``M = J_Ωᵀ W J_Ω``,

where ``M`` is the Hessian of ``E_D`` at ``x*`` (exact there: the discord is zero,
so the second derivatives of the maps drop out; for ReLU-type maps it is exact in
the whole activation region). ``M⁻¹`` is two triangular sweeps along the schedule
(a transposed one, the adjoint, and a forward one), so the fixed point

    ``Δ_{k+1} = −M⁻¹ ∇E_R(x* + Δ_k)``,   ``Δ_0 = 0``

costs two sweeps per iteration (for a rest that is not soft the contraction is slow:
use Newton, [`cellsheaf.minimize`][cellsheaf.minimize.minimize], warm-started from the result). ``Δ_1`` is the linear response (exact as ``γ → 0``);
each further iteration corrects the error by a factor ``O(γ ‖M⁻¹‖ ‖∇²E_R‖)``.
In the model, the gradient of the energy on the free coordinates at ``x_k = x* + Δ_k``
is ``∇E_R(x_k) − ∇E_R(x_{k−1})`` (the determined part contributes ``M Δ_k``), so the
iteration stops when that norm is below ``tol`` for every item, without a line search
or energy evaluations. A coordinate that crosses a ReLU kink between ``x*`` and
``x_k`` (possible only within ``O(|Δ|)`` of the kink) makes the model wrong there, so
the result's gradient is then measured by one pass over the edges (``verify``), and
an item that fails is reported as not converged (continue with Newton).

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf(); S.add_vertex("x", 1); S.add_vertex("y", 1); S.add_vertex("t", 1)
>>> _ = S.add_edge("x", "y", 2 * torch.eye(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64))
>>> _ = S.add_edge("y", "t", torch.eye(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64), weight=0.01)
>>> p = cs.propagation.plan(S, torch.tensor([0, 2]), determined=True)
>>> x = torch.tensor([[1.0, 0.0, 5.0]], dtype=torch.float64)
>>> out, report = cs.nudge.nudged_equilibrium(S, p, p.run(x))
>>> round(out[0, 1].item(), 9), round((2 + 0.01 * 5) / 1.01, 9), report["iterations"]
(2.02970297, 2.02970297, 5)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .energy import edge_forces
from .gauss_newton import determined_solve
from .propagation import PropagationPlan

__all__ = ["rest_gradient", "nudged_equilibrium", "free_gradient"]


def rest_gradient(S, x: Tensor, edges) -> Tensor:
    """``∇E_R(x)`` (``(B, C0)``): the energy gradient of the edges ``edges`` only, on every coordinate.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.eye(1), torch.eye(1), name="e", weight=2.0)
    >>> cs.nudge.rest_gradient(S, torch.tensor([[1.0, 3.0]]), ["e"])
    tensor([[-4.,  4.]])
    """
    g = torch.zeros_like(x)
    for name in edges:
        e = S.edge(name)
        su, sv = S.vertex_slice(e.u), S.vertex_slice(e.v)
        pv, pu = edge_forces(S, name, x)
        g[:, sv] += e.Fv.vjp(x[:, sv], pv)
        g[:, su] += e.Fu.vjp(x[:, su], pu)
    return g


def nudged_equilibrium(S, plan: PropagationPlan, x: Tensor, tol: float = 1e-10, max_iter: int = 10,
                       verify: bool = True) -> tuple[Tensor, dict]:
    """The equilibrium of ``S`` near the propagation ``x`` of its determined part (see the module notes).

    Parameters
    ----------
    S : Sheaf
    plan : PropagationPlan
        The plan of the determined part ([`cellsheaf.propagation.plan`][cellsheaf.propagation.plan] with ``determined=True``);
        its steps' edges are ``D``, every other edge of ``S`` is the rest ``R``.
    x : tensor ``(B, C0)``
        ``x*``: the boundary values set and the plan run (zero discord on ``D``).
    tol : float
        Stop when the free gradient norm of every item is ``<= tol``.
    max_iter : int
        Fixed-point iterations (two sweeps each) at most.
    verify : bool
        Measure the free gradient at the result by a full pass over the edges (the
        iteration's own estimate misses a coordinate that crossed a ReLU kink). With
        ``False`` the report holds the estimate, and the caller must verify.

    Returns
    -------
    x : tensor ``(B, C0)``, the nudged equilibrium (a new tensor).
    report : dict with ``iterations``, ``grad_norm`` (``(B,)``) and ``converged`` (``(B,)`` bool).
        When the iteration stops contracting (a rest too stiff for the fixed point) the best
        iterate is returned, not converged: continue with Newton from it.
    """
    used = {s.edge for s in plan.steps}
    rest = [name for name in S.edges if name not in used]
    free = torch.zeros(S.C0, dtype=x.dtype, device=x.device)
    free[plan.free.to(x.device)] = 1.0
    gk = rest_gradient(S, x, rest) * free  # the gradient on the free coordinates only
    xk, k = x, 0
    grad_norm = gk.norm(dim=-1)
    worst = float("inf")
    for k in range(1, max_iter + 1):
        x_new = x - determined_solve(S, x, plan.steps, gk)
        g_new = rest_gradient(S, x_new, rest) * free
        norm = (g_new - gk).norm(dim=-1)
        peak = float(norm.max()) if norm.numel() else 0.0
        if not peak < worst:  # not contracting (the rest is too stiff): keep the best iterate
            k -= 1
            break
        xk, gk, grad_norm, worst = x_new, g_new, norm, peak
        if peak <= tol:
            break
    if verify:
        grad_norm = free_gradient(S, xk, free).norm(dim=-1)
    return xk, {"iterations": k, "grad_norm": grad_norm, "converged": grad_norm <= tol}


def free_gradient(S, x: Tensor, free: Tensor) -> Tensor:
    """``∇E(x)`` times the 0/1 mask ``free`` (``(C0,)``), edge by edge (one pass over the edges)."""
    from .learning import _edgewise

    return _edgewise(S, x, {})[0] * free
