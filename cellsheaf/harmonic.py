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
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from torch import Tensor

from .boundary import Boundary
from .cochain import Cochain
from .cohomology import RelativeCohomology, relative_cohomology
from .linalg import _product, block_jacobi, cg
from .operators import _laplacian_csr, apply_laplacian, to_torch_sparse
from .results import SolveInfo
from .validation import check_number, overflow_message

__all__ = ["harmonic_extension", "NonUniqueError"]

_DENSE_MAX = 1500  # free coordinates up to which "direct" uses a dense Cholesky
_DIRECT_MAX = 5_000  # free coordinates up to which "auto" uses a sparse LU (fill-in explodes on expanders)
_DENSE_BASIS_MAX = 2 ** 25  # entries of a null-space basis returned dense; beyond, a torch sparse COO tensor


class NonUniqueError(ValueError):
    """The harmonic extension is not unique: ``H⁰(G,U;F) ≠ 0``."""


class _ImplicitSolve(torch.autograd.Function):
    """``A⁺ rhs`` whose backward is ``A⁺ g`` (``A`` symmetric): implicit differentiation."""

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


# ---------------------------------------------------------------------------- uniqueness


def _relative(S, rb) -> RelativeCohomology:
    """``H⁰(G,U;F)`` for the fixed coordinates of ``rb``, cached on the sheaf per boundary pattern."""
    fixed = rb.fixed.numpy()
    key = ("relative_H0", fixed.size, hash(fixed.tobytes()))
    hit = S._cache.get(key)
    if hit is not None and np.array_equal(hit[0], fixed):
        return hit[1]
    rel = relative_cohomology(S, rb)
    S._cache[key] = (fixed.copy(), rel)
    return rel


def _nonunique_message(S, rel: RelativeCohomology) -> str:
    """Name the vertices carrying the first direction of ``H⁰(G,U;F)`` (a free component touching no data)."""
    B = rel.basis_sparse().tocsc()
    first = B[:, 0]
    coords = first.indices[np.abs(first.data) > 1e-8 * np.abs(first.data).max()]
    owner = np.repeat(np.arange(len(S.vertices)), S._dim_array())
    names = [S.vertices[i] for i in np.unique(owner[coords])]
    shown = f"{names[:10]}{' ...' if len(names) > 10 else ''}"
    return (f"the harmonic extension is not unique: H⁰(G,U;F) has dimension {rel.dim} (certificate: "
            f"{rel.decision.certificate}); a free part with vertices {shown} can move without any discord. "
            "Fix more coordinates there, or pass allow_nonunique=True for the minimum-norm solution and a basis "
            "of the directions that can be added")


def _basis_tensor(B: sp.spmatrix, dtype) -> Tensor:
    """A ``(C0, k)`` basis as a dense tensor, or torch sparse COO when it would be huge."""
    if B.shape[0] * B.shape[1] <= _DENSE_BASIS_MAX:
        return torch.as_tensor(B.toarray()).to(dtype)
    coo = B.tocoo()
    idx = torch.as_tensor(np.vstack([coo.row, coo.col]).astype(np.int64))
    return torch.sparse_coo_tensor(idx, torch.as_tensor(coo.data).to(dtype), B.shape).coalesce()


# ---------------------------------------------------------------------------- solvers


def _dense_solver(A, V: sp.csr_matrix):
    """Dense Cholesky of ``A + VVᵀ``; ``A⁺ g = (A + VVᵀ)⁻¹ g − V Vᵀ g`` (``V``: orthonormal basis of ``ker A``)."""
    V = V.toarray()
    Ad = A.toarray() + V @ V.T
    factor = sla.cho_factor(Ad)
    lam_min = float(sla.eigh(Ad, eigvals_only=True, subset_by_index=[0, 0])[0]) if Ad.shape[0] else np.inf
    return _numpy_solver(lambda R: sla.cho_solve(factor, R) - V @ (V.T @ R)), lam_min


def _lu_solver(A, V: sp.csr_matrix):
    """Sparse LU of ``A`` or, when singular, of the bordered ``[[A, V], [Vᵀ, 0]]`` (solution ``⊥ V``)."""
    h = V.shape[1]
    M = A if h == 0 else sp.bmat([[A, V], [V.T, None]])
    lu = spla.splu(sp.csc_matrix(M))
    n = A.shape[0]

    def solve(R: np.ndarray) -> np.ndarray:
        if h == 0:
            return lu.solve(R)
        out = lu.solve(np.vstack([R, np.zeros((h, R.shape[1]))]))
        return out[:n]  # the multiplier VᵀR is dropped: A⁺R = ω with Aω = R − VVᵀR, ω ⊥ V

    return _numpy_solver(solve)


def _cg_solver(A, V: sp.csr_matrix, owner: np.ndarray, tol, maxiter, infos: list):
    """Preconditioned CG on ``A + VVᵀ`` (positive definite); ``A⁺ g = (A + VVᵀ)⁻¹ g − V Vᵀ g``.

    The preconditioner inverts the diagonal block of every vertex stalk (``owner``: the vertex of each free
    coordinate) when the extension is unique, else the diagonal of ``A + VVᵀ`` (Jacobi).
    """
    h = V.shape[1]
    block = None if h else block_jacobi(A, owner)
    d = A.diagonal() + (np.asarray(V.multiply(V).sum(axis=1)).ravel() if h else 0.0)

    def solve(rhs: Tensor) -> Tensor:
        dev, dt = rhs.device, rhs.dtype
        At = to_torch_sparse(A, dt, dev, layout=torch.sparse_csr)
        flat = rhs.detach().reshape(-1, rhs.shape[-1])
        apply = At  # the matrix itself: cg picks the product (column by column on the CPU for large batches)
        if h:
            Vs = to_torch_sparse(V, dt, dev, layout=torch.sparse_csr)
            VsT = to_torch_sparse(V.T.tocsr(), dt, dev, layout=torch.sparse_csr)
            project = lambda w: (Vs @ (VsT @ w.T)).T  # V Vᵀ w, row by row
            product = _product(At)
            apply = lambda w: product(w, None) + project(w)
        if block is not None and (dev.type, dt) == ("cpu", torch.float64):
            precond = block
        elif block is not None:
            precond = block_jacobi(A, owner, dt, dev)
        else:
            with np.errstate(divide="ignore", over="ignore"):  # subnormal diagonals: CG reports no convergence
                precond = torch.as_tensor(1.0 / d, dtype=dt, device=dev)
        with torch.no_grad():  # the gradient comes from implicit differentiation (_ImplicitSolve)
            x, info = cg(apply, flat, precond=precond, tol=tol, maxiter=maxiter)
            if h:
                x -= project(flat)
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

    Uniqueness is checked on every route before solving: the relative cohomology
    ``H⁰(G,U;F)`` is decided by [`cellsheaf.relative_cohomology`][cellsheaf.cohomology.relative_cohomology]: above 2048 free
    coordinates, vertices that the boundary determines through injective maps are set aside first
    (a random sheaf with a tenth of its vertices fixed needs nothing more: unique, exactly), then
    each remaining component gets a certified rank count.

    Parameters
    ----------
    S : Sheaf
        A linear sheaf (for nonlinear maps or potentials use [`cellsheaf.minimize`][cellsheaf.minimize.minimize]).
    boundary : Boundary, optional
        Fixed coordinates and their values, ``(k,)`` or batched ``(B, k)``.
        Without one, every coordinate is free and the answer is the zero section
        (with ``allow_nonunique=True``, plus a basis of ``H⁰`` in ``info.extra["nullspace"]``).
    method : {"auto", "direct", "cg"}
        ``"direct"`` factorises ``L[Ω,Ω]`` once (dense Cholesky up to 1500 free
        coordinates, sparse LU beyond) and reuses it for every right-hand side; ``"cg"``
        runs batched CG with the assembled ``L[Ω,Ω]``, preconditioned by the inverse of its vertex-stalk
        blocks (block Jacobi; Jacobi when the extension is not unique); ``"auto"``
        picks direct up to 5 000 free coordinates (prefer ``"direct"`` on large paths,
        grids and other graphs with small separators).
    tol, maxiter : float, int
        Relative residual and iteration cap for ``"cg"``. CG reports ``converged`` only
        after checking the true residual ``‖b − A x‖ <= tol · ‖b‖``.
    allow_nonunique : bool
        If ``H⁰(G,U;F) ≠ 0`` the minimiser is not unique: by default a
        [`NonUniqueError`][cellsheaf.harmonic.NonUniqueError] names a free part that can move. With ``True`` the minimum-norm
        solution is returned (on every route) and ``info.extra["nullspace"]`` holds an
        orthonormal ``(C0, k)`` basis of the directions that can be added (zero on the
        fixed coordinates; a torch sparse COO tensor when it would have more than 2²⁵ entries).

    Returns
    -------
    Cochain
        ``(C0,)`` or ``(B, C0)``; ``.info`` is a [`SolveInfo`][cellsheaf.results.SolveInfo] with the method, iterations,
        the residual ``‖L[Ω,:] x‖ / ‖L[Ω,U] u‖`` (float64, assembled blocks), and in ``extra``: ``"nullity"`` (``dim H⁰(G,U;F)``),
        ``"certificate"`` (how uniqueness was decided), ``"lambda_min"`` (smallest
        eigenvalue of ``L[Ω,Ω]``, dense route) and ``"nullspace"`` (see ``allow_nonunique``).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 2); S.add_vertex("b", 2)
    >>> _ = S.add_edge("a", "b", torch.eye(2, dtype=torch.float64), 2 * torch.eye(2, dtype=torch.float64))
    >>> x = cs.harmonic_extension(S, cs.Boundary().fix("a", torch.tensor([[2.0, 4.0]])))
    >>> x["b"]
    tensor([[1., 2.]], dtype=torch.float64)
    >>> x.info.extra["nullity"], x.info.converged
    (0, True)
    """
    if not S.linear:
        raise ValueError("harmonic_extension needs a linear sheaf with quadratic potentials; "
                         "use cellsheaf.minimize for nonlinear maps or potentials")
    if method not in ("auto", "direct", "cg"):
        raise ValueError(f"method must be 'auto', 'direct' or 'cg', got {method!r}")
    check_number(tol, "tol", none=False)
    check_number(maxiter, "maxiter", integer=True, positive=True)
    rb = (boundary or Boundary()).resolve(S)
    dtype = torch.promote_types(S.dtype, rb.values.dtype)
    u = rb.values.to(dtype)
    if rb.fixed.numel() == 0:
        return _no_boundary(S, rb, u, dtype, allow_nonunique)
    n = rb.free.numel()
    if n == 0:
        return Cochain(S, _assemble(S, rb, u.new_zeros(*u.shape[:-1], 0), u),
                       info=SolveInfo("direct", True, 0, 0.0, extra={"nullity": 0}))
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, naming the edge
        A, AU = _free_blocks(S, rb)
    if not (np.isfinite(A.data).all() and np.isfinite(AU.data).all()):
        raise FloatingPointError(overflow_message(S, dtype))
    tiny = np.finfo(np.float64).tiny
    subnormal = bool(((A.data != 0) & (np.abs(A.data) < tiny)).any() or ((AU.data != 0) & (np.abs(AU.data) < tiny)).any())
    rel = _relative(S, rb)
    if rel.dim and not allow_nonunique:
        raise NonUniqueError(_nonunique_message(S, rel))
    V = rel.basis_sparse()[rb.free.numpy()].tocsr()  # (n, dim): orthonormal basis of ker L[Ω,Ω]
    method = ("direct" if n <= _DIRECT_MAX else "cg") if method == "auto" else method
    infos: list[SolveInfo] = []
    lam_min = None
    if method == "direct" and n <= _DENSE_MAX:
        solve, lam_min = _dense_solver(A, V)
    elif method == "direct":
        solve = _lu_solver(A, V)
    else:
        owner = np.repeat(np.arange(len(S.vertices)), S._dim_array())[rb.free.numpy()]
        solve = _cg_solver(A, V, owner, tol, maxiter, infos)

    batch = u.shape[:-1]
    rhs_np = -(AU @ u.detach().reshape(-1, u.shape[-1]).double().cpu().numpy().T).T
    rhs = torch.as_tensor(np.ascontiguousarray(rhs_np)).to(dtype).reshape(*batch, n)
    omega = solve(rhs)
    x = _assemble(S, rb, omega, u)

    needs_grad = torch.is_grad_enabled() and (u.requires_grad or S.requires_grad)
    if needs_grad:
        residual = apply_laplacian(S, _assemble(S, rb, omega.detach(), u))[..., rb.free]
        omega = omega.detach() - _ImplicitSolve.apply(residual, solve)
        x = _assemble(S, rb, omega, u)
    rel_res = _residual(A, omega, rhs_np)
    cg_ok = all(i.converged for i in infos)
    floor = 1e3 * float(torch.finfo(dtype).eps)
    finite = np.isfinite(rel_res) and bool(torch.isfinite(omega).all())
    # a direct solve is backward stable: a residual above 1e3·√eps means subnormal or cancelled arithmetic
    bound = max(10 * tol, floor) if method == "cg" else 1e3 * float(torch.finfo(dtype).eps) ** 0.5
    converged = bool(finite) and not subnormal and cg_ok and rel_res <= bound
    message = "; ".join(i.message for i in infos if i.message)
    if not finite:
        message = overflow_message(S, dtype)
    elif subnormal:
        message = ("the Laplacian has subnormal entries (below 2.2e-308): its digits are lost, so the solve is not "
                   "certified; multiply every map by one constant (the harmonic extension does not change)")
    elif cg_ok and not converged and method != "cg":
        message = (f"the direct solve's relative residual is {rel_res:.3g} > {bound:.3g}: the Laplacian's entries "
                   "are too small or too large for this precision (subnormal arithmetic); rescale the maps")
    elif cg_ok and not converged:
        message = (f"CG met tol in {dtype} but the float64 residual of the assembled system is {rel_res:.3g}: "
                   "the problem is too ill-conditioned for CG in this precision; use method='direct'")
    info = SolveInfo(method, converged=converged, iterations=sum(i.iterations for i in infos), residual=rel_res,
                     message=message, extra={"nullity": rel.dim, "certificate": rel.decision.certificate})
    if lam_min is not None:
        info.extra["lambda_min"] = lam_min
    if rel.dim:
        info.extra["nullspace"] = _basis_tensor(rel.basis_sparse(), dtype)
    return Cochain(S, x, info=info)


def _residual(A, omega: Tensor, rhs: np.ndarray) -> float:
    """``max_b ‖L[Ω,Ω] ω + L[Ω,U] u‖ / ‖L[Ω,U] u‖`` in float64 with the assembled blocks (the data's scale)."""
    W = omega.detach().reshape(-1, omega.shape[-1]).double().cpu().numpy()
    with np.errstate(over="ignore", invalid="ignore"):  # Inf/NaN are reported by the caller
        R = (A @ W.T).T - rhs.reshape(-1, A.shape[0])
        rhs = rhs.reshape(-1, A.shape[0])
        size = np.maximum(np.abs(rhs).max(axis=1, initial=0.0), np.finfo(np.float64).tiny)[:, None]
        # norms of the rows divided by their largest entry first: no overflow for data near the float range
        scale = np.maximum(np.linalg.norm(rhs / size, axis=1), np.finfo(np.float64).tiny)
        return float((np.linalg.norm(R / size, axis=1) / scale).max()) if R.size else 0.0


def _no_boundary(S, rb, u: Tensor, dtype, allow_nonunique: bool) -> Cochain:
    """No data: the minimum-norm minimiser is the zero section (and ``H⁰`` the directions to add)."""
    x = torch.zeros(*u.shape[:-1], S.C0, dtype=dtype)
    info = SolveInfo("direct", True, 0, 0.0, message="no boundary: the zero section")
    if allow_nonunique:
        rel = _relative(S, rb)
        info.extra.update(nullity=rel.dim, certificate=rel.decision.certificate,
                          nullspace=_basis_tensor(rel.basis_sparse(), dtype))
    return Cochain(S, x, info=info)


def _assemble(S, rb, omega: Tensor, u: Tensor) -> Tensor:
    """The full cochain with ``omega`` on the free and ``u`` on the fixed coordinates (out of place)."""
    batch = np.broadcast_shapes(tuple(omega.shape[:-1]), tuple(u.shape[:-1]))  # torch's imports sympy on first use
    idx = torch.cat([rb.free, rb.fixed])
    vals = torch.cat([omega.expand(*batch, -1), u.to(omega.dtype).expand(*batch, -1)], -1)
    return vals.new_zeros(*batch, S.C0).index_copy(-1, idx, vals)
