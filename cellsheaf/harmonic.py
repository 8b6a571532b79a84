"""Harmonic extension: the minimiser of the discord with boundary values fixed.

Fixing coordinates ``U`` to values ``u`` and minimising ``½ xᵀLx`` over the free
coordinates ``Ω`` gives ``L[Ω,Ω] ω = −L[Ω,U] u`` (Thm 2.5). The solution is
unique exactly when the relative cohomology ``H⁰(G,U;F)`` vanishes.

The solve is differentiable: gradients with respect to the boundary values and
to the restriction maps come from implicit differentiation (one extra solve
with the same factorisation in the backward pass), not from unrolled iterations.

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf()
>>> for v in "abc": S.add_vertex(v, 1)
>>> I = torch.eye(1, dtype=torch.float64)
>>> _ = S.add_edge("a", "b", I, I); _ = S.add_edge("b", "c", I, I)
>>> b = cs.Boundary().fix("a", torch.tensor([0.0])).fix("c", torch.tensor([1.0]))
>>> cs.harmonic_extension(S, b)["b"]
tensor([0.5000], dtype=torch.float64)
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.linalg as sla
import scipy.sparse.linalg as spla
import torch
from torch import Tensor

from .boundary import Boundary
from .cochain import Cochain
from .linalg import cg
from .operators import _laplacian_csr, apply_laplacian, to_torch_sparse
from .results import SolveInfo

__all__ = ["harmonic_extension", "NonUniqueError"]

_DENSE_MAX = 1500  # free coordinates up to which a dense eigen-decomposition checks uniqueness
_DIRECT_MAX = 5_000  # free coordinates up to which "auto" uses a sparse LU (fill-in explodes on expanders)


class NonUniqueError(ValueError):
    """The harmonic extension is not unique: ``H⁰(G,U;F) ≠ 0``."""


class _ImplicitSolve(torch.autograd.Function):
    """``A⁻¹ rhs`` whose backward is ``A⁻¹ g`` (``A`` symmetric): implicit differentiation."""

    @staticmethod
    def forward(ctx, rhs: Tensor, solve: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.solve = solve
        return solve(rhs)

    @staticmethod
    def backward(ctx, g: Tensor):
        return ctx.solve(g), None


def _numpy_solver(solve_np: Callable[[np.ndarray], np.ndarray]) -> Callable[[Tensor], Tensor]:
    def solve(rhs: Tensor) -> Tensor:
        R = rhs.detach().reshape(-1, rhs.shape[-1]).double().cpu().numpy().T
        X = np.asarray(solve_np(R)).reshape(R.shape)
        return torch.as_tensor(X.T.copy()).to(dtype=rhs.dtype, device=rhs.device).reshape(rhs.shape)
    return solve


def _free_blocks(S, rb):
    L = _laplacian_csr(S)
    free, fixed = rb.free.numpy(), rb.fixed.numpy()
    return L[free][:, free], L[free][:, fixed]


def _nullspace_message(S, V: np.ndarray, free: np.ndarray) -> str:
    coords = free[np.abs(V).max(1) > 1e-8]
    owners = []
    for v in S.vertices:
        sl = S.vertex_slice(v)
        if ((coords >= sl.start) & (coords < sl.stop)).any():
            owners.append(v)
    return (f"the harmonic extension is not unique: H⁰(G,U;F) has dimension {V.shape[1]}, supported on vertices "
            f"{owners[:10]}{' ...' if len(owners) > 10 else ''}; fix more coordinates there, or pass "
            "allow_nonunique=True for a particular solution and a basis of the solution space")


def _dense_solver(A, S, free, allow_nonunique):
    """Eigen-decomposition of a small ``L[Ω,Ω]``: decides uniqueness with a documented tolerance."""
    Ad = A.toarray()
    lam, Q = np.linalg.eigh(Ad)
    tol = max(Ad.shape) * np.finfo(float).eps * max(abs(lam).max(initial=0.0), 1.0)
    null = lam <= tol
    if not null.any():
        factor = sla.cho_factor(Ad)
        return _numpy_solver(lambda R: sla.cho_solve(factor, R)), None, float(lam.min(initial=np.inf))
    V = Q[:, null]
    if not allow_nonunique:
        raise NonUniqueError(_nullspace_message(S, V, free))
    inv = np.where(null, 0.0, 1.0 / np.where(null, 1.0, lam))
    return _numpy_solver(lambda R: (Q * inv) @ (Q.T @ R)), V, float(lam[~null].min(initial=np.inf))


def _lu_solver(A, S, free):
    try:
        lu = spla.splu(A.tocsc())
    except RuntimeError as err:
        raise NonUniqueError(f"L[Ω,Ω] is singular ({err}): the harmonic extension is not unique; "
                             "fix more coordinates") from None
    return _numpy_solver(lu.solve)


def _cg_solver(S, rb, A, tol, maxiter, infos: list):
    d = A.diagonal().copy()
    if (d <= 0).any():
        k = int(rb.free[int(np.nonzero(d <= 0)[0][0])])
        v = next(v for v in S.vertices if S.vertex_slice(v).start <= k < S.vertex_slice(v).stop)
        raise NonUniqueError(f"free coordinate {k} of vertex {v!r} touches no edge: the harmonic extension is "
                             "not unique; fix it or connect the vertex")

    def solve(rhs: Tensor) -> Tensor:
        At = to_torch_sparse(A, rhs.dtype, rhs.device, layout=torch.sparse_csr)
        dinv = torch.as_tensor(1.0 / d, dtype=rhs.dtype, device=rhs.device)
        flat = rhs.detach().reshape(-1, rhs.shape[-1])
        with torch.no_grad():  # the gradient comes from implicit differentiation (_ImplicitSolve)
            x, info = cg(lambda w: (At @ w.T).T, flat, precond=lambda r: r * dinv, tol=tol, maxiter=maxiter)
        infos.append(info)
        return x.reshape(rhs.shape)
    return solve


def harmonic_extension(
    S,
    boundary: Boundary | None = None,
    method: str = "auto",
    tol: float = 1e-12,
    maxiter: int | None = None,
    allow_nonunique: bool = False,
) -> Cochain:
    """The harmonic extension of ``boundary`` on a linear sheaf ``S``.

    Parameters
    ----------
    S : Sheaf
        A linear sheaf (for nonlinear maps or potentials use `cellsheaf.minimize`).
    boundary : Boundary, optional
        Fixed coordinates and their values, ``(k,)`` or batched ``(B, k)``.
        Without one, every coordinate is free and the answer is 0 (plus ``H⁰``).
    method : {"auto", "direct", "cg"}
        ``"direct"`` factorises ``L[Ω,Ω]`` once (dense Cholesky with a uniqueness
        check up to 1500 free coordinates, sparse LU beyond) and reuses it for
        every right-hand side; ``"cg"`` runs batched Jacobi-preconditioned CG
        with the assembled ``L[Ω,Ω]``; ``"auto"`` picks direct up to 5 000 free coordinates
        (prefer ``"direct"`` on large paths, grids and other graphs with small separators).
    tol, maxiter : float, int
        Relative residual and iteration cap for ``"cg"``.
    allow_nonunique : bool
        If ``H⁰(G,U;F) ≠ 0`` the minimiser is not unique: by default a
        `NonUniqueError` names where. With ``True`` the minimum-norm
        particular solution is returned and ``info.extra["nullspace"]`` holds
        an orthonormal ``(C0, k)`` basis of the directions that can be added
        (zero on fixed coordinates; computed for the dense route).

    Returns
    -------
    Cochain
        ``(C0,)`` or ``(B, C0)``; ``.info`` is a `SolveInfo`
        with the method, iterations, the residual ``‖L[Ω,:] x‖ / ‖L[Ω,U] u‖`` and
        ``extra["lambda_min"]`` (smallest eigenvalue of ``L[Ω,Ω]``, dense route).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 2); S.add_vertex("b", 2)
    >>> _ = S.add_edge("a", "b", torch.eye(2, dtype=torch.float64), 2 * torch.eye(2, dtype=torch.float64))
    >>> x = cs.harmonic_extension(S, cs.Boundary().fix("a", torch.tensor([[2.0, 4.0]])))
    >>> x["b"]
    tensor([[1., 2.]], dtype=torch.float64)
    """
    if not S.linear:
        raise ValueError("harmonic_extension needs a linear sheaf with quadratic potentials; "
                         "use cellsheaf.minimize for nonlinear maps or potentials")
    if method not in ("auto", "direct", "cg"):
        raise ValueError(f"method must be 'auto', 'direct' or 'cg', got {method!r}")
    rb = (boundary or Boundary()).resolve(S)
    dtype = torch.promote_types(S.dtype, rb.values.dtype)
    u = rb.values.to(dtype)
    A, AU = _free_blocks(S, rb)
    n = A.shape[0]
    if n == 0:
        return Cochain(S, _assemble(S, rb, u.new_zeros(*u.shape[:-1], 0), u), info=SolveInfo("direct", True, 0, 0.0))
    method = ("direct" if n <= _DIRECT_MAX else "cg") if method == "auto" else method
    infos: list[SolveInfo] = []
    nullspace, lam_min = None, None
    if method == "direct" and n <= _DENSE_MAX:
        solve, nullspace, lam_min = _dense_solver(A, S, rb.free.numpy(), allow_nonunique)
    elif method == "direct":
        solve = _lu_solver(A, S, rb.free.numpy())
    else:
        solve = _cg_solver(S, rb, A, tol, maxiter, infos)

    batch = u.shape[:-1]
    rhs_np = -(AU @ u.detach().reshape(-1, u.shape[-1]).double().cpu().numpy().T).T
    rhs = torch.as_tensor(np.ascontiguousarray(rhs_np)).to(dtype).reshape(*batch, n)
    omega = solve(rhs)
    x = _assemble(S, rb, omega, u)

    needs_grad = torch.is_grad_enabled() and (u.requires_grad or any(
        t.requires_grad for e in S.edge_items() for t in e.Fu.tensors() + e.Fv.tensors()))
    if needs_grad:
        residual = apply_laplacian(S, _assemble(S, rb, omega.detach(), u))[..., rb.free]
        omega = omega.detach() - _ImplicitSolve.apply(residual, solve)
        x = _assemble(S, rb, omega, u)
    with torch.no_grad():
        res = apply_laplacian(S, x.detach())[..., rb.free]
    scale = rhs.norm(dim=-1).clamp_min(torch.finfo(dtype).tiny)
    rel = float((res.norm(dim=-1) / scale).max()) if res.numel() else 0.0
    info = SolveInfo(method, converged=all(i.converged for i in infos) if infos else True,
                     iterations=sum(i.iterations for i in infos), residual=rel,
                     message="; ".join(i.message for i in infos if i.message))
    if lam_min is not None:
        info.extra["lambda_min"] = lam_min
    if nullspace is not None:
        basis = np.zeros((S.C0, nullspace.shape[1]))
        basis[rb.free.numpy()] = nullspace
        info.extra["nullspace"] = torch.as_tensor(basis).to(dtype)
    return Cochain(S, x, info=info)


def _assemble(S, rb, omega: Tensor, u: Tensor) -> Tensor:
    """The full cochain with ``omega`` on the free and ``u`` on the fixed coordinates (out of place)."""
    batch = torch.broadcast_shapes(omega.shape[:-1], u.shape[:-1])
    idx = torch.cat([rb.free, rb.fixed])
    vals = torch.cat([omega.expand(*batch, -1), u.to(omega.dtype).expand(*batch, -1)], -1)
    return vals.new_zeros(*batch, S.C0).index_copy(-1, idx, vals)
