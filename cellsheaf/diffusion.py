"""Sheaf diffusion: the heat equation ``dx/dt = −α ∇E(x)`` on the free coordinates.

For a linear sheaf ``∇E(x) = Lx`` and the flow converges to the orthogonal
projection onto ``H⁰`` (Thm 2.4), or with boundary data to the harmonic
extension (Thm 2.5). For nonlinear maps and potentials the same flow is the
gradient flow of the energy (Sec. 4.2).

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
>>> I = torch.eye(1, dtype=torch.float64)
>>> _ = S.add_edge("a", "b", I, I)
>>> res = cs.diffuse(S, torch.tensor([1.0, 0.0], dtype=torch.float64), tol=1e-12)
>>> res.converged, res.x.flat
(True, tensor([0.5000, 0.5000], dtype=torch.float64))
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from . import edgewise
from .boundary import Boundary
from .cochain import Cochain, as_flat, check_finite
from .validation import check_laplacian_finite, check_number, tolerance_scale
from .energy import edge_energies, gradient
from .operators import _laplacian_csr, to_torch_sparse
from .results import Result
from .syncs import check_every

__all__ = ["diffuse", "stable_step"]

_STABILITY = {"euler": 2.0, "rk4": 2.785}  # |dt·α·λ| bound on the negative real axis


def stable_step(S, boundary: Boundary | None = None, at=None, alpha: float = 1.0, method: str = "euler") -> float:
    """The largest stable time step ``c / (α λ_max)`` of ``method`` (Euler ``c = 2``, RK4 ``c ≈ 2.785``),
    with ``λ_max`` of ``L[Ω,Ω]`` at ``at`` (the linearisation point for nonlinear sheaves).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.eye(1), torch.eye(1))
    >>> round(cs.stable_step(S), 6)
    1.0
    """
    from .spectral import lambda_max

    lam = float(lambda_max(S, boundary=boundary, at=at))
    return math.inf if lam <= 0 else _STABILITY[method] / (alpha * lam)


def _gradient_on(S, free: Tensor, like: Tensor):
    """``x -> ∇E(x)`` with the fixed coordinates zeroed: one sparse product with the assembled
    ``L[Ω,:]`` for a linear sheaf, the matrix-free nonlinear Laplacian otherwise (edge by edge for a
    sheaf of few, large edges, `cellsheaf.edgewise`, with nothing pulled back into fixed vertices)."""
    mask = torch.zeros(S.C0, dtype=like.dtype, device=like.device)
    mask[free] = 1.0
    if not S.linear:
        if len(S.edges) <= edgewise.EDGEWISE_MAX:
            moving = mask.cpu().numpy() != 0
            compiled = edgewise.plan(S, skip=[v for v in S.vertices if not moving[S.vertex_slice(v)].any()])
            return lambda x: compiled.run(x)[0].mul_(mask)
        return lambda x: gradient(S, x) * mask
    L = to_torch_sparse(_laplacian_csr(S), like.dtype, like.device, layout=torch.sparse_csr)
    return lambda x: (L @ x.reshape(-1, S.C0).T).T.reshape(x.shape) * mask


def _exact(S, x: Tensor, rb, alpha: float, t: float | None) -> Tensor:
    """Closed form ``ω(t) = ω_p + V e^{−αΛt} Vᵀ (ω₀ − ω_p)`` from the eigen-decomposition of ``L[Ω,Ω]``."""
    L = _laplacian_csr(S)
    free, fixed = rb.free.numpy(), rb.fixed.numpy()
    if len(free) > 5000:
        raise ValueError(f"method='exact' decomposes L[Ω,Ω] densely; {len(free)} free coordinates is too many — "
                         "use 'euler' or 'rk4'")
    A = L[free][:, free].toarray()
    lam, Q = np.linalg.eigh(A)
    # relative to the largest eigenvalue (no absolute floor: a sheaf with small maps has small eigenvalues)
    tol = max(A.shape + (1,)) * np.finfo(float).eps * max(abs(lam).max(initial=0.0), np.finfo(float).tiny)
    pos = lam > tol
    X = x.detach().double().cpu().numpy().reshape(-1, S.C0)
    c = (L[free][:, fixed] @ X[:, fixed].T)  # (n, B)
    coef = Q.T @ c
    wp = -Q @ (np.where(pos, 1.0, 0.0)[:, None] * coef / np.where(pos, lam, 1.0)[:, None])
    decay = np.where(pos, np.exp(-alpha * lam * t) if t is not None else 0.0, 1.0)
    w = wp + Q @ (decay[:, None] * (Q.T @ (X[:, free].T - wp)))
    X[:, free] = w.T
    return torch.as_tensor(X).to(dtype=x.dtype, device=x.device).reshape(x.shape)


def diffuse(
    S,
    x0,
    boundary: Boundary | None = None,
    method: str = "euler",
    t: float | None = None,
    dt: float | None = None,
    tol: float | None = None,
    alpha: float = 1.0,
    max_steps: int = 100_000,
    record: bool | int = False,
    estimate_error: bool = True,
) -> Result:
    """Integrate the heat equation ``dω/dt = −α ∇_Ω E(ω ⊕ u)`` from ``x0``.

    Parameters
    ----------
    S : Sheaf
        Any sheaf; for a linear one ``∇E = Lx``, for a nonlinear one the local-adjoint flow.
    x0 : Cochain or tensor ``(C0,)`` / ``(B, C0)``
        Initial state; its fixed coordinates are overwritten by the boundary values.
    boundary : Boundary, optional
        Stubborn coordinates (Eq. 9). Without one every coordinate evolves.
    method : {"euler", "rk4", "exact"}
        Forward Euler (the paper's), classical Runge–Kutta, or the closed form
        through the eigen-decomposition of ``L[Ω,Ω]`` (linear sheaves; at
        ``t=None`` it returns the limit ``t → ∞``).
    t : float, optional
        Final time ``t >= 0``. Without it, integrate until ``tol``.
    dt : float, optional
        Step ``> 0``; defaults to ``1 / (α λ_max)`` (``1 / (2 α λ_max)`` for Euler to a given ``t``). A step above the
        stability bound ``2 / (α λ_max)`` (Euler; ``2.785 / (α λ_max)`` for RK4) raises ``ValueError``.
        With ``t`` given the interval is cut into equal steps no longer than ``dt``.
    tol : float, optional
        Stop when the largest gradient norm on the free coordinates is ``<= tol`` (times the largest
        diagonal entry of the Laplacian when that is below 1: `cellsheaf.validation.tolerance_scale`). Default when ``t``
        is not given: ``1e-10``, raised to ``50 · eps · α λ_max · max(1, max|x0|)`` where the working
        precision cannot reach it (float32).
    alpha : float
        Diffusion rate ``α > 0``.
    max_steps : int
        Step cap, honoured with or without ``t``; the result then says ``converged=False``.
    record : bool or int
        Record the energy of every edge every ``record`` steps (``True`` = every
        step) into ``result.extra["trajectory"]``: ``{"step": (K,), "edge_energy": (K, ..., E)}``.
    estimate_error : bool
        With ``t`` given: also integrate with half the step (twice the work) to estimate the error.

    Returns
    -------
    Result
        ``x`` (final Cochain), ``converged``, ``steps``, ``t``, ``energy`` and
        ``residual`` (final gradient norm on the free coordinates). With ``t`` given (Euler or RK4),
        ``extra["error_estimate"]`` estimates the largest distance to the exact flow at ``t`` (step
        doubling, `estimate_error`); a small ``dt`` makes it small.

    Raises
    ------
    ValueError
        Naming the argument: an unknown method, ``t`` negative or not finite, ``dt``, ``alpha`` or
        ``tol`` not positive and finite, ``max_steps`` not a non-negative int, a step above the
        stability bound.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.eye(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64))
    >>> b = cs.Boundary().fix("a", torch.tensor([3.0], dtype=torch.float64))
    >>> cs.diffuse(S, torch.zeros(2, dtype=torch.float64), boundary=b, method="rk4", tol=1e-12).x["b"]
    tensor([3.0000], dtype=torch.float64)
    """
    _check_arguments(method, t, dt, tol, alpha, max_steps, record)
    x = as_flat(S, x0)
    x = x.to(torch.promote_types(x.dtype, S.dtype)) if x.is_floating_point() else x.to(S.dtype)
    check_finite(x, "the initial state x0")
    rb = (boundary or Boundary()).resolve(S, dtype=x.dtype, device=x.device)
    x = rb.fill(x)
    if x.dim() == 2 and len(x) == 0 or t == 0:  # nothing to integrate
        g = x.new_zeros(x.shape) if x.numel() == 0 else _gradient_on(S, rb.free, x)(x)
        return _result(S, x, g, method, True, 0, 0.0 if t is not None else math.inf, None)
    if S.linear:
        check_laplacian_finite(S, x.dtype)
    tscale = tolerance_scale(S, x.dtype)  # also refuses maps so small that gradient norms underflow
    if method == "exact":
        if not S.linear:
            raise ValueError("method='exact' needs a linear sheaf; use 'euler' or 'rk4'")
        x = _exact(S, x, rb, alpha, t)
        g = _gradient_on(S, rb.free, x)(x)
        return _result(S, x, g, "exact", True, 0, t if t is not None else math.inf, None)
    bound = stable_step(S, rb, at=x if x.dim() == 1 else x[0], alpha=alpha, method=method)
    if dt is None:
        dt = bound / _STABILITY[method]
        if t is not None:  # a quarter of Euler's stability bound: the error estimate is then meaningful
            dt = min(dt / 2 if method == "euler" else dt, t)
    elif dt > bound * (1 + 1e-12):
        raise ValueError(f"dt={dt:g} is above the stability bound {bound:.6g} of {method} (= {_STABILITY[method]} / "
                         f"(α λ_max)); use dt <= {bound:.6g}")
    if t is not None:
        steps_needed = max(1, math.ceil(t / dt - 1e-9))
        dt, max_steps = t / steps_needed, min(max_steps, steps_needed)
    elif tol is None:
        scale = max(1.0, float(x.abs().max())) if x.numel() else 1.0
        reachable = 50 * torch.finfo(x.dtype).eps * _STABILITY[method] / bound * scale
        tol = max(1e-10 * tscale, reachable)
    else:
        tol = tol * tscale
    grad = _gradient_on(S, rb.free, x)
    x0 = x
    x, g, step, converged, traj = _integrate(S, grad, x, dt * alpha, method, max_steps, tol,
                                             int(record) if record else 0)
    if not converged and t is not None:
        converged = step * dt >= t * (1 - 1e-12)
    res = _result(S, x, g, method, converged, step, step * dt, traj, tol,
                  None if converged or t is None else f"stopped at t = {step * dt:.6g} < {t:g} after max_steps = "
                  f"{max_steps} steps")
    if t is not None and converged and step == max_steps and estimate_error:
        res.extra["error_estimate"] = _error_estimate(S, grad, x0, x, t, step, alpha, method)
    return res


def _integrate(S, grad, x: Tensor, h: float, method: str, max_steps: int, tol: float | None, every: int = 0):
    """Up to ``max_steps`` steps of size ``h`` (= α dt), stopping early when the gradient norm is ``<= tol``."""
    trace_steps, trace = [], []
    g = grad(x)
    step = 0
    check = check_every(x.device)
    while True:
        if every and step % every == 0:
            trace_steps.append(step)
            trace.append(edge_energies(S, x).detach())
        if step % check == 0 or step >= max_steps:
            # one fused host read: is the state finite, and the largest gradient norm (a sync on a GPU)
            gmax = g.norm(dim=-1).max() if g.numel() else g.new_zeros(())
            total, gnorm = torch.stack([x.sum(), gmax]).tolist()
            if not math.isfinite(total) and not bool(torch.isfinite(x).all()):  # the sum screens, all() decides
                raise FloatingPointError(f"diffusion diverged at step {step} (non-finite state); use a smaller dt "
                                         f"(now {h:g}/alpha) or check the maps")
            if tol is not None and gnorm <= tol:
                converged = True
                break
        if step >= max_steps:
            converged = False
            break
        x = _step(grad, x, g, h, method)
        step += 1
        g = grad(x)
    traj = {"step": torch.tensor(trace_steps), "edge_energy": torch.stack(trace)} if every else None
    return x, g, step, converged, traj


def _error_estimate(S, grad, x0: Tensor, x: Tensor, t: float, n: int, alpha: float, method: str) -> float:
    """Richardson estimate of the distance from the ``n``-step solution ``x`` at ``t`` to the exact flow.

    A second run with ``2n`` steps gives, for a method of order ``p``,
    ``|e_n| ≈ |x_n − x_2n| / (1 − 2^{−p})`` (largest entry).
    """
    p = 1 if method == "euler" else 4
    fine = _integrate(S, grad, x0, alpha * t / (2 * n), method, 2 * n, None)[0]
    return float((x - fine).abs().max()) / (1 - 2.0 ** -p)


def _check_arguments(method, t, dt, tol, alpha, max_steps, record) -> None:
    """Refuse bad solver arguments with a message naming the argument."""
    if method not in ("euler", "rk4", "exact"):
        raise ValueError(f"method must be 'euler', 'rk4' or 'exact', got {method!r}")
    for name, value, positive in (("t", t, False), ("dt", dt, True), ("tol", tol, False), ("alpha", alpha, True)):
        check_number(value, name, positive=positive, none=name != "alpha")
    check_number(max_steps, "max_steps", integer=True, none=False)
    if not isinstance(record, (bool, int, np.integer)) or record < 0:
        raise ValueError(f"record must be a bool or a non-negative int, got {record!r}")


def _step(grad, x: Tensor, g: Tensor, h: float, method: str) -> Tensor:
    if method == "euler":
        return torch.add(x, g, alpha=-h)
    k1 = g
    k2 = grad(x - 0.5 * h * k1)
    k3 = grad(x - 0.5 * h * k2)
    k4 = grad(x - h * k3)
    return x - (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)


def _result(S, x, g, method, converged, steps, t, traj, tol=None, why: str | None = None) -> Result:
    gnorm = float(g.norm(dim=-1).max()) if g.numel() else 0.0
    msg = "" if converged else why or f"stopped after {steps} steps with gradient norm {gnorm:.3g} > tol {tol:.3g}"
    energy = edge_energies(S, x).sum(-1) if x.numel() else torch.zeros(x.shape[:-1], dtype=x.dtype)
    res = Result(method, converged, steps, gnorm, energy=energy, message=msg,
                 x=Cochain(S, x), t=t)
    if traj is not None:
        res.extra["trajectory"] = traj
    return res
