"""Spectrum of the sheaf Laplacian: eigenpairs, spectral gap, Fiedler vector, ``λ_max``, block energy.

Every function works on the weighted Laplacian ``L = δᵀWδ`` or, given a
``boundary``, on the block ``L[Ω,Ω]`` of the free coordinates (the operator of
the heat equation with stubborn coordinates); ``at`` linearises a nonlinear
sheaf at a point; ``normalized=True`` uses ``D^{-1/2} L D^{-1/2}``
([`cellsheaf.operators.laplacian`][cellsheaf.operators.laplacian]). Computations run in float64; results come
back in the sheaf's dtype, on its device.

Routes (``method``): ``"lanczos"`` (torch, on the sheaf's device: thick-restart
Lanczos, [`cellsheaf.lanczos`][cellsheaf.lanczos], on a torch CSR matrix of the operator built from the
sheaf's cached blocks, or matrix-free through
[`cellsheaf.operators.apply_laplacian`][cellsheaf.operators.apply_laplacian]), ``"lobpcg"`` (torch, block
LOBPCG on the same operator, `cellsheaf.lobpcg`), ``"dense"`` (LAPACK ``eigh`` of
the assembled scipy matrix), ``"sparse"`` (scipy; smallest eigenvalues: Lanczos
(ARPACK) without any factorisation for operators above 4000 rows, with repeated
eigenvalues checked by deflation; block inverse iteration on one sparse LU of
``L + sI`` for smaller ones or when Lanczos does not converge; largest: ARPACK
Lanczos). ``"auto"``: on the CPU dense up to [`DENSE_LIMIT`][cellsheaf.spectral.DENSE_LIMIT] coordinates and
``"sparse"`` above (its LU route finds large kernels, e.g. of a batch of graphs, far faster than
single-vector Lanczos with deflation); on any other device ``"lanczos"``, so that nothing leaves the device (the scipy routes copy the operator to the CPU,
and say so once). [`eigenpairs`][cellsheaf.spectral.eigenpairs] results carry ``.info``
(route, iterations, residual) and are differentiable with respect to the maps
where the eigenvalues are simple (positional encodings for sheaf neural
networks); the backward pass is pure torch on every route.

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf()
>>> for v in range(3): S.add_vertex(v, 1)
>>> one = torch.ones(1, 1, dtype=torch.float64)
>>> _ = S.add_edge(0, 1, one, one); _ = S.add_edge(1, 2, one, one)
>>> [round(x, 6) for x in cs.eigenpairs(S, 3).values.tolist()]
[0.0, 1.0, 3.0]
>>> round(cs.spectral_gap(S), 6), round(cs.lambda_max(S), 6)
(1.0, 3.0)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import warnings

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from torch import Tensor

from .cochain import as_flat
from .lanczos import lanczos
from .lobpcg import deflated_solve, lobpcg
from .operators import _check_normalized, _csr_laplacian, _plan, apply_laplacian, fixed_indices, laplacian
from .results import SolveInfo

__all__ = ["Eigenpairs", "eigenpairs", "spectral_gap", "fiedler_vector", "lambda_max", "block_energy",
           "DENSE_LIMIT"]

DENSE_LIMIT = 2000
"""``method="auto"`` uses dense ``eigh`` when the operator has at most this many rows."""

_EPS = float(np.finfo(np.float64).eps)
_KRYLOV_MIN = 4000  # smaller operators take block inverse iteration on a sparse LU (cheap at this size)


class _Pairs(NamedTuple):
    values: Tensor
    vectors: Tensor


class Eigenpairs(_Pairs):
    """Eigenvalues ``(k,)`` and orthonormal eigenvectors ``(n, k)`` (one per column).

    ``n`` is ``C0``, or the number of free coordinates when a boundary was
    given (in the order of ``boundary.resolve(S).free``). It unpacks as
    ``values, vectors``; ``.info`` (a [`SolveInfo`][cellsheaf.results.SolveInfo]) says which route ran, how many
    iterations it took (``iterations``: block iterations of LOBPCG, operator
    applications of Lanczos (``"lanczos"`` in torch, ``"arpack"`` in scipy), 0 for a dense
    solve) and the largest residual ``‖A v − λ v‖`` relative to ``‖A‖`` (``residual``);
    ``info.extra`` holds ``"applications"`` (columns the operator was applied to) on the
    LOBPCG route and ``"restarts"`` on the torch Lanczos route.
    """

    info: SolveInfo | None

    def __new__(cls, values: Tensor, vectors: Tensor, info: SolveInfo | None = None):
        self = super().__new__(cls, values, vectors)
        self.info = info
        return self


# ---------------------------------------------------------------------------- helpers


def _operator(S, boundary, at, normalized: bool) -> sp.csr_matrix:
    """``L`` or ``L[Ω,Ω]`` as a float64 scipy CSR matrix (built without autograd: nothing here is
    differentiated through scipy; `eigenpairs` attaches its gradients in torch)."""
    with torch.no_grad():
        L = laplacian(S, at=at, normalized=normalized, format="scipy")
    if boundary is None:
        return L
    fixed = fixed_indices(S, boundary).cpu().numpy()
    free = np.setdiff1d(np.arange(S.C0), fixed)
    return L[free][:, free].tocsr()


def _route(n: int, method: str, device: torch.device | None = None) -> str:
    if method not in ("auto", "dense", "sparse", "lanczos", "lobpcg"):
        raise ValueError(f"method must be 'auto', 'dense', 'sparse', 'lanczos' or 'lobpcg', got {method!r}")
    if method == "auto":
        if device is not None and device.type != "cpu":
            return "lanczos"
        return "dense" if n <= DENSE_LIMIT else "sparse"
    return method


def _smallest(A: sp.spmatrix, k: int, rtol: float = 1e-12, maxiter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` smallest eigenpairs (ascending) of a sparse PSD matrix.

    Block inverse iteration with Rayleigh-Ritz: one sparse LU of ``A + sI``
    (``s = 1e-8 ·`` the Gershgorin bound, so the shifted matrix is positive definite
    even when ``A`` is singular), then ``k + 8`` vectors are iterated together.
    Unlike single-vector Lanczos (ARPACK) it finds eigenvalues of any
    multiplicity, such as a large kernel, reliably: components outside the
    ``k + 8`` smallest eigenvalues shrink by ``(λ_i + s)/(λ_{k+9} + s)`` per step,
    by ``~s/λ`` on a kernel. Converged when every residual
    ``‖A x − θ x‖ <= rtol · bound``.
    """
    n = A.shape[0]
    p = min(n, k + 8)
    if 3 * p >= n:  # as cheap densely
        lam, V = np.linalg.eigh(A.toarray())
        return lam[:k], V[:, :k]
    bound = float(abs(A).sum(axis=1).max())
    if bound == 0:
        return np.zeros(k), np.eye(n, k)
    lu = spla.splu((A + 1e-8 * bound * sp.identity(n, format="csc")).tocsc())
    X = np.linalg.qr(np.random.default_rng(0).standard_normal((n, p)))[0]
    for _ in range(maxiter):
        X = np.linalg.qr(lu.solve(X))[0]
        AX = A @ X
        theta, W = np.linalg.eigh(X.T @ AX)
        X, AX = X @ W, AX @ W
        if np.linalg.norm(AX[:, :k] - X[:, :k] * theta[:k], axis=0).max() <= rtol * bound:
            return theta[:k], X[:, :k]
    raise RuntimeError(f"the {k} smallest eigenpairs of the {n}x{n} operator did not converge in {maxiter} block "
                       "inverse iterations; try method='dense' if it fits in memory")


def _smallest_krylov(A: sp.spmatrix, k: int, rtol: float = 1e-10, rounds: int = 6):
    """The ``k`` smallest eigenpairs of a sparse symmetric PSD matrix by Lanczos (ARPACK), no factorisation.

    Single-vector Lanczos can miss copies of a repeated eigenvalue, so the result is checked
    by deflation: with the found vectors ``V`` pushed up (``A + c VVᵀ``, ``c`` the Gershgorin
    bound), a fresh Lanczos run from a new random vector must find nothing below the ``k``-th
    found value; a missed one is added and the check repeats. (A check, not a proof: a copy
    can still hide from every run; the LU route of `_smallest` is the robust one.) Returns ``(values, vectors, matvecs)``, or
    ``None`` when ARPACK does not converge (the caller then factorises).
    """
    n = A.shape[0]
    c = float(abs(A).sum(axis=1).max()) or 1.0
    count = [0]
    V = np.zeros((n, 0))
    lam = np.zeros(0)
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        v0 = rng.standard_normal(n)  # fresh each round: a missed copy is orthogonal to the previous Krylov space
        def matvec(x, V=V):
            count[0] += 1
            x = np.asarray(x).reshape(n, -1)
            return A @ x + c * (V @ (V.T @ x)) if V.shape[1] else A @ x
        op = spla.LinearOperator((n, n), matvec=matvec, matmat=matvec, dtype=np.float64)
        want = k - V.shape[1] if V.shape[1] < k else min(k, 3)
        try:
            ncv = max(2 * want + 1, 20 if V.shape[1] == 0 else 40)  # checks look wider: copies hide in clusters
            w, W = spla.eigsh(op, k=want, which="SA", tol=rtol, v0=v0, ncv=min(n - 1, ncv),
                              maxiter=max(300, 10 * n))
        except (spla.ArpackNoConvergence, spla.ArpackError):
            return None
        if V.shape[1] >= k and w.min() >= lam[k - 1] - rtol * c:
            return lam[:k], V[:, :k], count[0]  # verified: nothing below the k-th value was missed
        W = W - V @ (V.T @ W)  # keep the basis orthonormal
        V = np.linalg.qr(np.hstack([V, W]))[0]
        lam, Q = np.linalg.eigh(V.T @ (A @ V))  # Rayleigh-Ritz on everything found
        V = V @ Q
    return None


def _largest(A: sp.spmatrix, k: int, tol: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenpairs (descending) of a sparse symmetric matrix by Lanczos."""
    n = A.shape[0]
    if k >= n - 1:
        lam, V = np.linalg.eigh(A.toarray())
        return lam[::-1][:k], V[:, ::-1][:, :k]
    lam, V = spla.eigsh(A, k=k, which="LA", tol=tol)
    order = np.argsort(lam)[::-1]
    return lam[order], V[:, order]


def _out(a: np.ndarray, S) -> Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float64, order="C")).to(dtype=S.dtype, device=S.device)


# ---------------------------------------------------------------------------- public API


def eigenpairs(S, k: int, which: str = "smallest", boundary=None, at=None, normalized: bool | str = False,
               method: str = "auto", differentiable: bool | None = None) -> Eigenpairs:
    """The ``k`` smallest or largest eigenpairs of ``L`` (or ``L[Ω,Ω]`` with a boundary).

    Parameters
    ----------
    S : Sheaf
    k : int
        Number of eigenpairs, ``1 <= k <= n``.
    which : {"smallest", "largest"}
        ``"smallest"`` returns eigenvalues ascending, ``"largest"`` descending.
    boundary : Boundary, ResolvedBoundary or flat indices, optional
        Fixed coordinates ``U``; the operator is then ``L[Ω,Ω]``.
    at : cochain, optional
        Linearisation point (needed for nonlinear maps).
    normalized : bool or "augmented"
        Use ``D^{-1/2} L D^{-1/2}`` (``True``) or ``(D + I)^{-1/2} L (D + I)^{-1/2}`` (``"augmented"``).
    method : {"auto", "dense", "sparse", "lanczos", "lobpcg"}
        ``"lanczos"`` (``"auto"`` off the CPU): thick-restart Lanczos in torch on the sheaf's
        device ([`cellsheaf.lanczos`][cellsheaf.lanczos]; repeated eigenvalues searched for by
        deflation). ``"lobpcg"``: block LOBPCG in torch. ``"sparse"`` (``"auto"`` on the CPU
        above [`DENSE_LIMIT`][cellsheaf.spectral.DENSE_LIMIT]) finds the smallest
        eigenpairs by scipy's Lanczos (ARPACK, no factorisation; repeated eigenvalues verified
        by deflation), and falls back to block inverse iteration on a sparse LU when Lanczos does
        not converge. ``"dense"``: LAPACK.
    differentiable : bool, optional
        Attach gradients with respect to the maps and weights (default: when grad mode is on
        and a map requires grad): eigenvalues by ``dλ = vᵀ dA v``, eigenvectors by their
        first-order response ``dv = −(A − λ)⁺ dA v``, applied in the backward pass in torch on
        the sheaf's device (the other computed eigenvectors in closed form, the rest by
        conjugate gradients on the complement of their span, where ``A − λ`` is definite).
        Eigenvalues always have gradients; an eigenvector has one only where its eigenvalue is
        simple: the backward pass raises ``ValueError`` naming the eigenvalues and their gap
        when a gradient reaches a vector of a repeated eigenvalue. ``at`` (nonlinear maps) is
        not supported: with ``at`` and maps that require grad the result is detached, with a
        warning.

    Returns
    -------
    Eigenpairs
        ``(values (k,), vectors (n, k))`` and ``.info`` (route, iterations, residual).
        A route that does not converge raises ``RuntimeError``.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    >>> vals, vecs = cs.eigenpairs(S, 1, which="largest")
    >>> round(float(vals[0]), 12), tuple(vecs.shape)
    (2.0, (2, 1))
    """
    if which not in ("smallest", "largest"):
        raise ValueError(f"which must be 'smallest' or 'largest', got {which!r}")
    free = _free(S, boundary)
    n = S.C0 if free is None else int(free.numel())
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, {n}] (the operator is {n}x{n}), got {k!r}")
    k = int(k)
    wants_grad = torch.is_grad_enabled() and S.requires_grad
    if differentiable is None:
        differentiable = wants_grad and at is None
        if wants_grad and at is not None:
            warnings.warn("eigenpairs(at=...) is detached from the maps that require grad: gradients need a linear "
                          "sheaf (linearize it first, S.linearize(x))", stacklevel=2)
    elif differentiable and at is not None:
        raise ValueError("differentiable eigenpairs need a linear sheaf: linearize it first (S.linearize(x))")
    route = _route(n, method, S.device)
    if route in _SOLVERS:
        values, vectors, info, nxt = _torch_route(S, boundary, at, normalized, k, which, route)
    else:
        values, vectors, info, nxt = _scipy_route(S, boundary, at, normalized, k, which, route)
    if differentiable:
        values, vectors = _attach_gradients(S, boundary, normalized, values, vectors, which, nxt)
    return Eigenpairs(values, vectors, info)


_SOLVERS = {"lanczos": lanczos, "lobpcg": lobpcg}


def _torch_route(S, boundary, at, normalized, k: int, which: str, route: str):
    """The pure-torch routes: thick-restart Lanczos or LOBPCG in float64 on the sheaf's device."""
    out, n = _torch_solve(S, boundary, at, normalized, k, which == "largest", route)
    iterations = out.applications if route == "lanczos" else out.iterations
    extra = {"restarts": out.iterations} if route == "lanczos" else {"applications": out.applications}
    info = SolveInfo(route, True, iterations, out.residual, extra=extra)
    return out.values.to(S.dtype), out.vectors.to(S.dtype), info, out.next_value


def _torch_solve(S, boundary, at, normalized, k: int, largest: bool, route: str, copies: bool = True):
    """``(result, n)`` of `cellsheaf.lanczos.lanczos` or `cellsheaf.lobpcg.lobpcg` on the operator; raises
    ``RuntimeError`` when it does not converge. ``copies=False``: values only (Lanczos skips the search for
    missed copies of repeated eigenvalues, which changes no value)."""
    with torch.no_grad():
        op, n = _torch_operator(S, boundary, at, normalized)
        kwargs = {} if route == "lobpcg" or copies else {"rounds": 0}
        out = _SOLVERS[route](op, n, k, dtype=torch.float64, device=S.device, largest=largest, **kwargs)
    if not out.converged:
        which = "largest" if largest else "smallest"
        raise RuntimeError(f"{'Lanczos' if route == 'lanczos' else 'LOBPCG'}: the {k} {which} eigenpairs of the "
                           f"{n}x{n} operator did not converge in {out.iterations} iterations (relative residual "
                           f"{out.residual:.2e}); try method='sparse' (scipy, on the CPU) or method='dense' if it "
                           "fits in memory")
    return out, n


def _torch_operator(S, boundary, at, normalized) -> tuple[Callable[[Tensor], Tensor], int]:
    """``X (n, m) -> A X`` in float64 on the sheaf's device and ``n``: ``A = L`` (or its normalised form),
    restricted to the free coordinates of ``boundary``.

    A torch CSR matrix of ``A`` (assembled from the cached blocks, restricted once) when the edges are
    stacked or grouped and of one kind (all diagonal or all dense); the matrix-free
    [`apply_laplacian`][cellsheaf.operators.apply_laplacian] otherwise (nonlinear maps at ``at``, edges
    applied one by one)."""
    plan = _plan(S)
    free = _free(S, boundary)
    n = S.C0 if free is None else int(free.numel())
    kinds = {g.diagonal for g in plan.groups}
    if at is not None or plan.singles or len(kinds) != 1:
        return (lambda X: _apply(S, boundary, normalized, X, at)), n
    A = _csr_laplacian(S, plan, torch.float64, S.device, _check_normalized(normalized))
    A = _principal_submatrix(A, free, S.C0) if free is not None else A
    if A.shape[0] < 2 ** 31 and A._nnz() < 2 ** 31:  # 32-bit indices: about twice the speed of a product
        A = _csr(A.crow_indices().int(), A.col_indices().int(), A.values(), A.shape)

    def apply(X: Tensor) -> Tensor:
        return torch.mv(A, X[:, 0]).unsqueeze(1) if X.shape[1] == 1 else A @ X
    return apply, n


def _principal_submatrix(A: Tensor, keep: Tensor, n: int) -> Tensor:
    """Rows and columns ``keep`` (sorted) of the ``n × n`` torch CSR matrix ``A``, as CSR."""
    coo = A.to_sparse_coo().coalesce()
    r, c = coo.indices()
    pos = torch.full((n,), -1, dtype=torch.long, device=keep.device)
    pos[keep] = torch.arange(keep.numel(), device=keep.device)
    sel = (pos[r] >= 0) & (pos[c] >= 0)
    sub = torch.sparse_coo_tensor(torch.stack([pos[r][sel], pos[c][sel]]), coo.values()[sel],
                                  (keep.numel(), keep.numel()), check_invariants=False).coalesce()
    crow = torch.zeros(keep.numel() + 1, dtype=torch.long, device=keep.device)
    crow[1:] = torch.cumsum(torch.bincount(sub.indices()[0], minlength=keep.numel()), 0)
    return _csr(crow, sub.indices()[1], sub.values(), sub.shape)


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape) -> Tensor:
    with warnings.catch_warnings():  # torch calls its CSR support beta; products with dense blocks are solid
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, tuple(shape), check_invariants=False)


def _scipy_route(S, boundary, at, normalized, k: int, which: str, route: str):
    """The scipy routes (dense LAPACK, Lanczos, sparse LU), on the CPU in float64."""
    A = _operator(S, boundary, at, normalized)
    n = A.shape[0]
    matvecs, nxt = 0, None
    if route == "dense":
        extra = int(k < n)  # one more eigenvalue: the gap beyond the last one returned
        lo, hi = (0, k - 1 + extra) if which == "smallest" else (n - k - extra, n - 1)
        lam, V = sla.eigh(A.toarray(), subset_by_index=[lo, hi])
        if which == "largest":
            lam, V = lam[::-1], V[:, ::-1]
        nxt = float(lam[k]) if extra else None
        lam, V = lam[:k], V[:, :k]
    elif which == "largest":
        lam, V = _largest(A, k)
    else:
        got = _smallest_krylov(A, k) if n > _KRYLOV_MIN and k + 8 < n // 3 else None
        if got is not None:
            lam, V, matvecs = got
            route = "arpack"
        else:
            lam, V = _smallest(A, k)
            route = "inverse iteration"
    bound = float(abs(A).sum(axis=1).max()) or 1.0
    res = float(np.linalg.norm(A @ V - V * lam, axis=0).max() / bound) if k else 0.0
    return _out(lam, S), _out(V, S), SolveInfo(route, True, matvecs, res), nxt


def _free(S, boundary) -> Tensor | None:
    """Flat indices of the free coordinates (``None`` without a boundary), on the sheaf's device."""
    if boundary is None:
        return None
    fixed = fixed_indices(S, boundary).to(S.device)
    mask = torch.ones(S.C0, dtype=torch.bool, device=S.device)
    mask[fixed] = False
    return mask.nonzero().squeeze(1)


def _embed(S, boundary, X: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(n, k)`` columns on the free coordinates as ``(k, C0)`` cochains (zero on the fixed ones)."""
    free = _free(S, boundary)
    if free is None:
        return X.T, None
    free = free.to(X.device)
    return X.new_zeros(X.shape[1], S.C0).index_copy(1, free, X.T), free


def _apply(S, boundary, normalized, X: Tensor, at=None) -> Tensor:
    """``A X`` for ``X (n, k)`` through the differentiable matrix-free Laplacian (``A = L`` or ``L[Ω,Ω]``)."""
    Y, free = _embed(S, boundary, X)
    out = apply_laplacian(S, Y, at=at, normalized=normalized)
    return (out if free is None else out[:, free]).T


def _degenerate(lam: Tensor, nxt: float | None) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, gap)`` of numerically equal eigenvalues (``j = k`` for the first value not returned)."""
    vals = lam.detach().double().cpu().tolist()
    scale = max([abs(v) for v in vals] + [abs(nxt) if nxt is not None and nxt == nxt else 0.0, 1.0])
    tol = 1e-8 * scale
    out = [(i, j, abs(vals[i] - vals[j])) for i in range(len(vals)) for j in range(i + 1, len(vals))
           if abs(vals[i] - vals[j]) <= tol]
    if nxt is not None and nxt == nxt and abs(vals[-1] - nxt) <= tol:
        out.append((len(vals) - 1, len(vals), abs(vals[-1] - nxt)))
    return out


class _EigenvectorResponse(torch.autograd.Function):
    """Zero in the forward pass; backward maps ``g`` to ``−(A − λ_i I)⁺ P_i g`` column by column.

    With ``r_i = A(θ) v_i`` (``v_i`` held fixed) as input, ``v_i + response(r)`` has the first-order
    variation ``dv_i = −(A − λ_i)⁺ P_i dA v_i`` of a simple eigenvector (``P_i = I − v_i v_iᵀ``).
    Within the computed eigenvectors the pseudo-inverse is diagonal (``1/(λ_j − λ_i)``); on the
    complement of their span ``A − λ_i`` is definite and `deflated_solve` applies its inverse by CG.
    All in torch, on the device of the vectors.
    """

    @staticmethod
    def forward(ctx, R: Tensor, V: Tensor, lam: Tensor, apply, degenerate, largest: bool) -> Tensor:
        ctx.save_for_backward(V, lam)
        ctx.operator, ctx.degenerate, ctx.largest = apply, degenerate, largest
        return torch.zeros_like(R)

    @staticmethod
    def backward(ctx, G: Tensor):
        V, lam = ctx.saved_tensors
        V64, lam64, G64 = V.double(), lam.double(), G.double()
        k = V.shape[1]
        if ctx.degenerate:
            reached = (G64.abs().sum(0) > 0).tolist()
            bad = [(i, j, gap) for i, j, gap in ctx.degenerate if reached[i] or (j < k and reached[j])]
            if bad:
                i, j, gap = bad[0]
                other = f"eigenvalue {j}" if j < k else f"the next eigenvalue (number {j}, not returned)"
                raise ValueError(f"eigenpairs: eigenvalue {i} and {other} are repeated (gap {gap:.3g}): their "
                                 "eigenvectors are not unique and have no gradient; differentiate only functions "
                                 "of the eigenvalues or of the whole eigenspace, or ask for a k that does not split "
                                 "the repeated eigenvalue")
        C = V64.T @ G64  # (k, k): component of g_i along v_j
        diff = lam64[:, None] - lam64[None, :]  # λ_j − λ_i at (j, i)
        off = ~torch.eye(k, dtype=torch.bool, device=V.device)
        coef = torch.where(off & (diff != 0), C / torch.where(diff != 0, diff, torch.ones_like(diff)),
                           torch.zeros_like(C))
        inside = V64 @ coef
        outside, iters, rel = deflated_solve(ctx.operator, V64, lam64, G64, largest=ctx.largest)
        if not rel <= 1e-8:
            raise RuntimeError(f"eigenpairs backward: the deflated solve for the eigenvector gradient stopped at "
                               f"relative residual {rel:.2e} after {iters} CG iterations; the {k}-th eigenvalue is "
                               "probably (nearly) repeated just beyond the ones returned: ask for a larger k")
        return -(inside + outside).to(G.dtype), None, None, None, None, None


def _attach_gradients(S, boundary, normalized, values: Tensor, vectors: Tensor, which: str, nxt: float | None):
    """Values ``λ_i = v_iᵀ A(θ) v_i`` (Hellmann–Feynman) and vectors with their first-order response."""
    V = vectors.detach()
    R = _apply(S, boundary, normalized, V)  # differentiable in the maps
    lam = (V * R).sum(0)

    def apply(X: Tensor) -> Tensor:
        with torch.no_grad():
            return _apply(S, boundary, normalized, X)

    vecs = V + _EigenvectorResponse.apply(R, V, values.detach(), apply, _degenerate(values, nxt),
                                      which == "largest")
    return lam, vecs


def _first_positive(S, boundary, at, normalized, tol, method) -> tuple[float, Tensor]:
    """The smallest eigenvalue above ``tol`` and its eigenvector (on the sheaf's device, float64)."""
    free = _free(S, boundary)
    n = S.C0 if free is None else int(free.numel())
    route = _route(n, method, S.device)
    if n == 0:
        raise ValueError("the operator is empty (every coordinate is fixed): it has no spectral gap")
    lmax = lambda_max(S, boundary=boundary, at=at, normalized=normalized, method=method)
    if tol is None:
        tol = n * _EPS * max(lmax, 1.0)
    if route == "dense":
        lam, V = np.linalg.eigh(_operator(S, boundary, at, normalized).toarray())
        pos = np.nonzero(lam > tol)[0]
        if pos.size:
            return float(lam[pos[0]]), _out(V[:, pos[0]], S).double()
    else:
        A = _operator(S, boundary, at, normalized) if route == "sparse" else None
        k = min(8, n)
        while True:
            if A is not None:
                lam, V = _smallest(A, k)
                lam, V = torch.from_numpy(lam), torch.from_numpy(np.ascontiguousarray(V))
            else:
                out = _torch_solve(S, boundary, at, normalized, k, False, route, copies=False)[0]
                lam, V = out.values, out.vectors
            pos = torch.nonzero(lam > tol).flatten().tolist()
            if pos:
                return float(lam[pos[0]]), V[:, pos[0]].to(device=S.device)
            if k == n:
                break
            k = min(2 * k, n)
    raise ValueError(f"every eigenvalue is <= tol={tol:.3g}: the operator is zero up to tolerance and has no "
                     "spectral gap")


def spectral_gap(S, boundary=None, at=None, normalized: bool = False, tol: float | None = None,
                 method: str = "auto") -> float:
    """The smallest eigenvalue of ``L`` (or ``L[Ω,Ω]``) above ``tol``.

    Eigenvalues ``<= tol`` count as zero (the kernel, ``H⁰``). Default
    ``tol = n · eps · max(λ_max, 1)``. For a positive definite ``L[Ω,Ω]`` this is
    its smallest eigenvalue, which sets the convergence rate of diffusion.

    ``method`` is one of ``"auto"``, ``"dense"``, ``"sparse"`` (scipy, on the CPU),
    ``"lanczos"`` and ``"lobpcg"`` (pure torch, on the sheaf's device; ``"auto"`` off
    the CPU takes ``"lanczos"``), as in [`eigenpairs`][cellsheaf.spectral.eigenpairs].

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    >>> round(cs.spectral_gap(S), 6)
    2.0
    """
    return _first_positive(S, boundary, at, normalized, tol, method)[0]


def fiedler_vector(S, boundary=None, at=None, normalized: bool = False, tol: float | None = None,
                   method: str = "auto") -> Tensor:
    """The unit eigenvector of the spectral gap (see [`spectral_gap`][cellsheaf.spectral.spectral_gap]), shape ``(n,)``.

    Its sign is arbitrary; for a constant sheaf ``R¹`` on a connected graph it
    is the classical Fiedler vector. ``method`` as in [`spectral_gap`][cellsheaf.spectral.spectral_gap].

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    >>> v = cs.fiedler_vector(S)
    >>> bool(torch.allclose(v.abs(), torch.full((2,), 0.5 ** 0.5, dtype=torch.float64)))
    True
    """
    return _first_positive(S, boundary, at, normalized, tol, method)[1].to(S.dtype)


def lambda_max(S, boundary=None, at=None, normalized: bool = False, method: str = "auto") -> float:
    """The largest eigenvalue of ``L`` (or ``L[Ω,Ω]``), e.g. for the stable step of diffusion.

    Parameters
    ----------
    method : {"auto", "dense", "sparse", "lanczos", "lobpcg", "bound"}
        ``"dense"``/``"sparse"``: LAPACK to machine precision, or ARPACK Lanczos to
        relative accuracy ``1e-10`` (scipy, on the CPU; ``"auto"`` on the CPU: dense up to
        [`DENSE_LIMIT`][cellsheaf.spectral.DENSE_LIMIT] rows). ``"lanczos"``/``"lobpcg"``: pure torch on the
        sheaf's device ([`cellsheaf.lanczos`][cellsheaf.lanczos], `cellsheaf.lobpcg`), relative residual ``1e-10``
        (``"auto"`` off the CPU: ``"lanczos"``); a Ritz value, so never above the true ``λ_max``.
        ``"bound"``: the Gershgorin bound ``max_i Σ_j |L_ij|`` (scipy), a guaranteed upper
        bound at the cost of one pass over the matrix.

    Returns ``0.0`` for an empty operator.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    >>> round(cs.lambda_max(S), 12), cs.lambda_max(S, method="bound")
    (2.0, 2.0)
    """
    if method not in ("auto", "dense", "sparse", "lanczos", "lobpcg", "bound"):
        raise ValueError(f"method must be 'auto', 'dense', 'sparse', 'lanczos', 'lobpcg' or 'bound', got {method!r}")
    free = _free(S, boundary)
    n = S.C0 if free is None else int(free.numel())
    if n == 0:
        return 0.0
    route = "bound" if method == "bound" else _route(n, method, S.device)
    if route in _SOLVERS:
        return max(float(_torch_solve(S, boundary, at, normalized, 1, True, route, copies=False)[0].values[0]), 0.0)
    A = _operator(S, boundary, at, normalized)
    if A.count_nonzero() == 0:
        return 0.0
    if route == "bound":
        return float(abs(A).sum(axis=1).max())
    if route == "dense":
        return float(sla.eigh(A.toarray(), eigvals_only=True, subset_by_index=[n - 1, n - 1])[0])
    return float(_largest(A, 1, tol=1e-10)[0][0])


def block_energy(S, vec, boundary=None) -> Tensor:
    """Fraction of ``‖vec‖²`` on each vertex, ``(..., n_vertices)`` in the order of ``S.vertices``.

    ``vec`` is a 0-cochain ``(C0,)``/``(B, C0)``, or, with a ``boundary``, a
    vector on the free coordinates ``(n_free,)``/``(B, n_free)`` (as returned by
    [`eigenpairs`][cellsheaf.spectral.eigenpairs] with that boundary; pass ``vectors.T`` for all of them).
    Rows sum to 1 (a zero vector gives zeros).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 2)
    >>> cs.block_energy(S, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    vec = torch.as_tensor(vec)
    if boundary is not None:
        fixed = fixed_indices(S, boundary).cpu()
        free = torch.from_numpy(np.setdiff1d(np.arange(S.C0), fixed.numpy()))
        if vec.dim() not in (1, 2) or vec.shape[-1] != free.numel():
            raise ValueError(f"with this boundary the vector lives on the {free.numel()} free coordinates; "
                             f"got shape {tuple(vec.shape)}")
        full = vec.new_zeros(*vec.shape[:-1], S.C0)
        full[..., free.to(vec.device)] = vec
        vec = full
    x = as_flat(S, vec)
    owner = torch.repeat_interleave(torch.arange(len(S.vertices)), torch.tensor([S.dim(v) for v in S.vertices],
                                                                                 dtype=torch.long))
    sq = (x * x).reshape(-1, S.C0)
    per = sq.new_zeros(sq.shape[0], len(S.vertices)).index_add(1, owner.to(x.device), sq)
    total = per.sum(-1, keepdim=True)
    per = torch.where(total > 0, per / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(per))
    return per[0] if x.dim() == 1 else per
