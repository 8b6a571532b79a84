"""Rank decisions for coboundaries that scale and can be trusted.

The rank of ``δ`` (or of ``δ_Ω``, its free columns) decides ``H⁰``, ``H¹`` and the
uniqueness of harmonic extensions. A numerical rank is a decision, and this
module makes it in four steps, each of which keeps the exact rank unchanged:

1. **Edge-wise equilibration.** The rows of every edge are divided by the edge's
   Frobenius norm, so rescaling an edge (both maps by the same factor) never changes
   a decision.
2. **Stalk-wise equilibration.** For every vertex, the column block ``δ̃_v`` of its
   incident rows is decomposed, ``δ̃_v = U_v Σ_v V_vᵀ``. Directions with singular
   value ``<= tol`` are killed by every incident edge: they are global sections
   supported on one vertex (local kernels) and are decided here, vertex by vertex.
   The other directions are scaled to unit degree, ``R_v = V_v Σ_v^{-1}`` (so
   ``R_vᵀ D_v R_v = I`` for the degree block ``D_v = δ̃_vᵀ δ̃_v``). The equilibrated coboundary
   ``δ' = δ̃ R`` has singular values in ``[0, sqrt(2)]`` (``δ'ᵀδ' <= 2I``), and a vertex
   whose maps are badly conditioned no longer spoils the conditioning of the whole.
3. **Connected components** of ``δ'`` (rows and columns linked by nonzeros) are
   decided separately: the rank is the sum.
4. **Per component**, a certified count of the singular values of ``δ'`` above
   ``tol``: a dense SVD (up to [`DENSE_LIMIT`][cellsheaf.rank.DENSE_LIMIT] rows and columns), else a sparse count on
   ``N = δ'ᵀδ'`` with threshold ``tol²``: first a Lanczos bound (no eigenvalue of ``N``
   below ``μ``, with failure probability at most [`FAILURE_PROBABILITY`][cellsheaf.rank.FAILURE_PROBABILITY] over the
   random start, Kuczyński–Woźniakowski); if Lanczos cannot certify, the inertia of
   ``N − tol²·I`` from a symmetric sparse ``LDLᵀ`` (Sylvester's law: the number of
   negative pivots is the number of eigenvalues below ``tol²``), with the kernel from
   inverse iteration on the same factorisation. When a factorisation could fill in beyond
   memory (the envelope of a reverse Cuthill–McKee ordering exceeds `_FILL_MAX` entries, as on
   expanders), the kernel comes from projected CG on random vectors and the count from
   Courant–Fischer twice: the Rayleigh quotients on the kernel found bound that many eigenvalues
   from above, and a Lanczos bound on ``N`` compressed to its orthogonal complement bounds the
   next one from below. A count that no route certifies is reported with ``certified=False``.

A direction counts as zero when its discord is at most ``tol`` times its degree
norm (``‖δ̃x‖ <= tol·‖D^{1/2}x‖``). The default tolerance follows the precision of
the maps: ``sqrt(2) · max(max(m, n) · eps64, 32 · eps_maps)``, and on the sparse
route at least ``sqrt(2 · 64 · sqrt(n) · eps64)`` (eigenvalues of ``N`` are resolved to
about ``eps64``, so singular values below ``~1e-6`` are not). float32 maps are
decided in float64 with float32's epsilon.

Examples
--------
>>> import numpy as np, scipy.sparse as sp
>>> from cellsheaf.rank import decide
>>> D = sp.csr_matrix(np.array([[-1.0, 1.0, 0.0], [0.0, -1e9, 1e9]]))  # a path; the second edge scaled
>>> r = decide(D, np.array([0, 1]), np.array([0, 1, 2]), eps=np.finfo(np.float64).eps)
>>> r.decision.rank, r.decision.certified, r.right().shape
(2, True, (3, 1))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.csgraph as csgraph
import scipy.sparse.linalg as spla
import torch
from torch import Tensor

__all__ = ["RankDecision", "NullSpaces", "decide", "default_tol", "DENSE_LIMIT", "FAILURE_PROBABILITY"]

DENSE_LIMIT = 2048
"""Components with at most this many rows and columns are decided by a dense SVD (``method="auto"``)."""

FAILURE_PROBABILITY = 1e-10
"""Bound on the probability that a Lanczos certificate is wrong (over its seeded random start vector)."""

_EPS64 = float(np.finfo(np.float64).eps)
_LANCZOS_MAX = 3000  # Lanczos steps before the sparse count falls back to an LDLᵀ inertia count
_FILL_MAX = 2 * 10 ** 8  # RCM envelope (entries) beyond which a component with a kernel is decided without LDLᵀ
_DEFLATED_MAX = 10_000  # CG and Lanczos steps on that route
_DEFLATED_BLOCK_MAX = 256  # random vectors projected onto the kernel at most
_SPARSE_MIN = 64  # with method="sparse", smaller components still take the (exact) dense route
_BLOCK_MAX = 64  # vertex stalks up to this width are equilibrated by an SVD of their column block


@dataclass(frozen=True)
class RankDecision:
    """How the rank of a matrix was decided.

    Attributes
    ----------
    rank : the numerical (or exact) rank.
    method : ``"dense"`` (every component by SVD), ``"sparse"`` (some by a sparse count) or ``"exact"``.
    tol : singular values of the equilibrated matrix ``> tol`` count (``None`` for exact).
    singular_values : the singular values the decision saw, descending, float64: those of the
        dense components and of the local vertex blocks, and for sparse components the bounds
        below (``None`` for ``"exact"``).
    smallest_kept : the smallest singular value counted, or a certified lower bound on it
        (``None`` if the rank is 0).
    largest_dropped : the largest singular value treated as zero, or a certified upper bound
        on it (``None`` if none was).
    certified : whether the count is proved: by a dense SVD, an exact computation, an
        ``LDLᵀ`` inertia count, or a Lanczos bound (wrong with probability at most
        [`FAILURE_PROBABILITY`][cellsheaf.rank.FAILURE_PROBABILITY]). ``False`` means the sparse route could not certify the count
        (the rank is then a best estimate, and ``gap`` is ``None``).
    certificate : how the count was certified, in words.
    """

    rank: int
    method: str
    tol: float | None = None
    singular_values: Tensor | None = None
    smallest_kept: float | None = None
    largest_dropped: float | None = None
    certified: bool = True
    certificate: str = ""

    @property
    def gap(self) -> float | None:
        """``smallest_kept / largest_dropped``: how clear the cut was (large is clear, near 1 is not).

        A missing side is replaced by ``tol``: with nothing dropped the gap is
        ``smallest_kept / tol``, with nothing kept it is ``tol / largest_dropped``.
        ``inf`` when the dropped values are exactly zero or no numerical decision was needed
        (structural zeros only); ``None`` for exact ranks and for uncertified decisions. On sparse components the two sides are certified bounds, so
        the gap is a lower bound on the true one.
        """
        if self.method == "exact" or not self.certified:
            return None
        if self.smallest_kept is None and self.largest_dropped is None:
            return math.inf
        top = self.smallest_kept if self.smallest_kept is not None else self.tol
        bottom = self.largest_dropped if self.largest_dropped is not None else self.tol
        if bottom == 0:
            return math.inf
        return top / bottom


class NullSpaces:
    """The outcome of [`decide`][cellsheaf.rank.decide]: the decision and, on request, orthonormal null-space bases.

    ``right()`` is an ``(n, n − rank)`` basis of ``ker D``, ``left()`` an ``(m, m − rank)`` basis
    of ``ker Dᵀ`` or ``None`` when the sparse route did not compute it (more than ``k``
    vectors on a sparse component). Both are scipy sparse matrices when ``sparse=True``.
    ``components`` lists, for each group of columns that carries kernel directions, the column
    indices involved (to name where a harmonic extension is not unique).
    """

    def __init__(self, decision: RankDecision, right: Callable[[], sp.csr_matrix],
                 left: Callable[[], sp.csr_matrix | None], free_columns: np.ndarray):
        self.decision = decision
        self._right, self._left = right, left
        self._cache: dict[str, object] = {}
        self.free_columns = free_columns

    def right(self, sparse: bool = False):
        """Orthonormal basis of the right null space (dense ``ndarray`` unless ``sparse``)."""
        if "right" not in self._cache:
            self._cache["right"] = self._right()
        R = self._cache["right"]
        return R if sparse else R.toarray()

    def left(self, sparse: bool = False):
        """Orthonormal basis of the left null space, or ``None`` if it was not computed."""
        if "left" not in self._cache:
            self._cache["left"] = self._left()
        L = self._cache["left"]
        return L if (L is None or sparse) else L.toarray()


# ---------------------------------------------------------------------------- tolerance


def default_tol(shape: tuple[int, int], eps: float, sparse_size: int = 0) -> float:
    """The default tolerance on singular values of the equilibrated matrix (see the module docstring).

    ``sparse_size`` is the size of the largest component decided on the sparse route (0 if none).
    """
    tol = math.sqrt(2.0) * max(max(shape) * _EPS64, 32.0 * eps)
    if sparse_size:
        tol = max(tol, math.sqrt(2.0 * 64.0 * math.sqrt(sparse_size) * _EPS64))
    return tol


# ---------------------------------------------------------------------------- equilibration


def _edge_scales(D: sp.csr_matrix, row_owner: np.ndarray) -> np.ndarray:
    """Per-row factor ``1 / ‖edge block‖_F`` (1 for zero edges)."""
    sq = np.asarray(D.multiply(D).sum(axis=1)).ravel()
    per_edge = np.bincount(row_owner, weights=sq, minlength=int(row_owner.max(initial=-1)) + 1)
    s = np.where(per_edge > 0, 1.0 / np.sqrt(np.where(per_edge > 0, per_edge, 1.0)), 1.0)
    return s[row_owner]


def _vertex_blocks(Dt: sp.csr_matrix, col_owner: np.ndarray, tol: float):
    """SVD of the column block of every vertex in ``δ̃`` (its incident rows only).

    Returns ``R`` (n × n') scaling the kept directions to unit degree (``R_v = V_v Σ_v^{-1}``),
    ``K`` (n × k) the local kernel (orthonormal, one vertex each), and the local singular values
    kept and dropped (all-zero blocks, structural zeros, are left out), and whether every block was scaled
    to unit degree. SVDs of equal shape run batched. Stalks wider than `_BLOCK_MAX` are only scaled column by
    column (their local kernel is then their zero columns; the rest is left to the component decision).
    """
    m, n = Dt.shape
    if n == 0:
        return sp.csr_matrix((0, 0)), sp.csr_matrix((0, 0)), np.zeros(0), np.zeros(0), True
    starts = np.flatnonzero(np.r_[True, col_owner[1:] != col_owner[:-1]])
    n_blocks = starts.size
    block_of_col = np.repeat(np.arange(n_blocks), np.diff(np.r_[starts, n]))
    width = np.diff(np.r_[starts, n])
    coo = Dt.tocoo()
    b = block_of_col[coo.col]
    keys = b.astype(np.int64) * max(m, 1) + coo.row  # the (block, row) pairs of the nonzeros
    order = np.argsort(keys, kind="stable")
    ks = keys[order]
    first = np.r_[True, ks[1:] != ks[:-1]] if ks.size else np.zeros(0, bool)
    pair = np.empty(ks.size, np.int64)
    pair[order] = np.cumsum(first) - 1  # index of each nonzero's (block, row) pair, in sorted order
    height = np.bincount(ks[first] // max(m, 1), minlength=n_blocks)
    kstart = np.r_[0, np.cumsum(height)][:-1]
    local_row = pair - kstart[b]
    local_col = coo.col - starts[b]
    R_parts, K_parts, kept_s, dropped_s = [], [], [], []
    block_scaled = True  # every vertex block scaled to unit degree (then δ'ᵀδ' <= 2I)
    shapes = height * (n + 1) + width
    keys_u, group = np.unique(shapes, return_inverse=True)
    nz_group = group[b]
    nz_order = np.argsort(nz_group, kind="stable")  # the nonzeros of each shape group, contiguous
    nz_bounds = np.searchsorted(nz_group[nz_order], np.arange(keys_u.size + 1))
    block_order = np.argsort(group, kind="stable")
    block_bounds = np.searchsorted(group[block_order], np.arange(keys_u.size + 1))
    pos = np.full(n_blocks, -1)
    for g in range(keys_u.size):
        sel = block_order[block_bounds[g]:block_bounds[g + 1]]
        nz = nz_order[nz_bounds[g]:nz_bounds[g + 1]]
        h, d = int(height[sel[0]]), int(width[sel[0]])
        pos[sel] = np.arange(sel.size)
        if d > _BLOCK_MAX:  # a wide stalk: column scaling only, structural zeros as its local kernel
            for i in sel:
                here = nz[b[nz] == i]
                norms = np.sqrt(np.bincount(local_col[here], weights=coo.data[here] ** 2, minlength=d))
                keep1 = norms > 0
                cols1 = starts[i] + np.arange(d)
                if keep1.any():
                    R_parts.append((cols1[keep1], np.arange(int(keep1.sum())), 1.0 / norms[keep1]))
                if (~keep1).any():
                    K_parts.append((cols1[~keep1], np.arange(int((~keep1).sum())), np.ones(int((~keep1).sum()))))
                kept_s.append(norms[keep1])
            block_scaled = False
            continue
        blocks = np.zeros((sel.size, h, d))
        blocks[pos[b[nz]], local_row[nz], local_col[nz]] = coo.data[nz]
        if h:
            _, sig, Vt = np.linalg.svd(blocks, full_matrices=h < d)  # U is only needed square when small
            sig = np.concatenate([sig, np.zeros((sel.size, d - sig.shape[1]))], 1)
        else:
            sig, Vt = np.zeros((sel.size, d)), np.broadcast_to(np.eye(d), (sel.size, d, d))
        keep = sig > tol
        numeric = (blocks != 0).any(axis=(1, 2))[:, None]  # all-zero blocks are structural zeros, not decisions
        kept_s.append(sig[keep]); dropped_s.append(sig[~keep & numeric])
        cols = starts[sel][:, None] + np.arange(d)  # (B, d) columns of each block
        for mask, parts, scale in ((keep, R_parts, True), (~keep, K_parts, False)):
            bi, j = np.nonzero(mask)
            if bi.size == 0:
                continue
            vecs = Vt[bi, j, :]  # (k, d): right singular vectors
            if scale:
                vecs = vecs / sig[bi, j][:, None]
            parts.append((cols[bi].ravel(), np.repeat(np.arange(bi.size), d), vecs.ravel()))

    def assemble(parts):
        r, c, v, off = [], [], [], 0
        for pr, pc, pv in parts:
            r.append(pr); c.append(pc + off); v.append(pv); off += int(pc.max()) + 1
        if not r:
            return sp.csr_matrix((n, 0))
        return sp.csr_matrix((np.concatenate(v), (np.concatenate(r), np.concatenate(c))), shape=(n, off))

    cat = lambda a: np.concatenate(a) if a else np.zeros(0)
    return assemble(R_parts), assemble(K_parts), cat(kept_s), cat(dropped_s), block_scaled


# ---------------------------------------------------------------------------- per component


@dataclass
class _Piece:
    """The decision on one component: rank, bounds, kernel and left kernel (local coordinates)."""

    rank: int
    sv: np.ndarray  # singular values or bounds seen
    kept_lb: float | None
    dropped_ub: float | None
    null: Callable[[], np.ndarray]  # (n_c, n_c - rank), on demand
    left: Callable[[], np.ndarray | None]  # (m_c, m_c - rank) or None, on demand
    certified: bool = True
    certificate: str = "dense SVD"
    sparse: bool = False


def _dense_piece(A: np.ndarray, tol: float) -> _Piece:
    """SVD route: the singular values decide; the null spaces come from a full SVD when asked for."""
    m, n = A.shape
    if min(m, n) == 0:
        return _Piece(0, np.zeros(0), None, None, lambda: np.eye(n), lambda: np.eye(m))
    try:
        s = sla.svdvals(A)
    except np.linalg.LinAlgError:  # gesdd can fail to converge; gesvd is slower but robust
        s = sla.svd(A, compute_uv=False, lapack_driver="gesvd")
    r = int((s > tol).sum())
    full: list = []

    def svd():
        if not full:
            try:
                full.extend(sla.svd(A, full_matrices=True))
            except np.linalg.LinAlgError:
                full.extend(sla.svd(A, full_matrices=True, lapack_driver="gesvd"))
        return full

    return _Piece(r, s, float(s[r - 1]) if r else None, float(s[r]) if r < s.size else None,
                  lambda: svd()[2][r:].T, lambda: svd()[0][:, r:])


def _lanczos_bound(N, tau: float, maxiter: int, c: float = 2.0, seed: int = 0, patient: bool = False):
    """A lower bound ``μ`` on ``λ_min(N)`` for ``0 <= N <= cI``, or an upper bound showing ``λ_min <= 100·tau``.

    Lanczos on ``M = cI − N`` (PSD) from a seeded random start. Its largest Ritz
    value ``θ`` never exceeds ``λ_max(M)``, and by Kuczyński & Woźniakowski (1992, Thm 4.2)
    ``λ_max(M) <= θ / (1 − ε_k)`` except with probability ``1.648 sqrt(n) exp(−sqrt(ε_k)(2k − 1))``,
    which sets ``ε_k`` for the target `FAILURE_PROBABILITY`. Returns ``(mu, estimate, steps)``:
    ``mu`` is ``None`` when no certificate was reached (then ``estimate = c − θ``, an upper bound
    on ``λ_min``, says why). ``N`` is anything with ``N @ q``. A ``patient`` run never hands over early
    (there is no factorisation to hand over to): it runs to ``maxiter`` steps unless certified first.
    """
    n = N.shape[0]
    c = c * (1 + 1e-12)
    log_term = math.log(1.648 * math.sqrt(n) / FAILURE_PROBABILITY)
    q = np.random.default_rng(seed).standard_normal(n)
    q /= np.linalg.norm(q)
    q_prev, b = np.zeros(n), 0.0
    alpha, beta = [], []
    est = c
    for k in range(1, maxiter + 1):
        w = c * q - N @ q - b * q_prev
        a = float(q @ w)
        w -= a * q
        alpha.append(a)
        b = float(np.linalg.norm(w))
        done = b <= 1e-13 * c or k == n  # invariant subspace: the Ritz values are eigenvalues
        if done or k % 10 == 0 or k == maxiter:
            theta = float(sla.eigvalsh_tridiagonal(np.array(alpha), np.array(beta), select="i",
                                                   select_range=(k - 1, k - 1))[0])
            est = c - theta
            if done:
                return (est if est > tau else None), est, k
            eps_k = (log_term / (2 * k - 1)) ** 2
            mu = c - theta / (1 - eps_k) if eps_k < 1 else -math.inf
            if est <= 100 * tau:  # a (near-)kernel: Lanczos cannot certify a count here
                return None, est, k
            if mu >= 0.5 * est:  # certified to within a factor 2 of the estimate
                return mu, est, k
            needed = log_term / (2 * math.sqrt(est / (2 * c))) if est > 0 else math.inf
            if needed > maxiter and not patient:  # hopeless within the budget: hand over to the factorisation
                return (mu if mu > tau else None), est, k
        beta.append(b)
        q_prev, q = q, w / b
    return (mu if mu > tau else None), est, maxiter


def _inertia(N: sp.spmatrix, sigma: float):
    """``(number of eigenvalues of N below sigma, LU of N − sigma·I)`` by a symmetric ``LDLᵀ``.

    SuperLU in symmetric mode with diagonal pivots computes ``P(N − σI)Pᵀ = L D Lᵀ`` (``U = D Lᵀ``);
    by Sylvester's law of inertia ``N − σI`` has as many negative eigenvalues as ``D`` has negative
    pivots. Returns ``None`` when SuperLU had to leave the diagonal (then the count is not valid).
    """
    A = (N - sigma * sp.identity(N.shape[0], format="csc")).tocsc()
    try:
        lu = spla.splu(A, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                       options=dict(SymmetricMode=True))
    except RuntimeError:  # an exactly singular pivot
        return None
    if not np.array_equal(lu.perm_r, lu.perm_c):
        return None
    return int((lu.U.diagonal() < 0).sum()), lu


def _inverse_iteration(N, lu, nu: int, maxiter: int = 60):
    """The ``nu`` eigenpairs of ``N`` nearest the factorised shift, plus a few more Ritz values."""
    n = N.shape[0]
    p = min(n, nu + 6)
    X = np.linalg.qr(np.random.default_rng(1).standard_normal((n, p)))[0]
    theta = np.zeros(p)
    for _ in range(maxiter):
        X = np.linalg.qr(lu.solve(X))[0]
        NX = N @ X
        theta, W = np.linalg.eigh(X.T @ NX)
        X, NX = X @ W, NX @ W
        res = np.linalg.norm(NX[:, :nu] - X[:, :nu] * theta[:nu], axis=0)
        if nu == 0 or res.max() <= 1e-12:
            break
    return theta, X[:, :nu]


def _kernel_by_projection(N: sp.csr_matrix, p: int, seed: int = 2) -> np.ndarray:
    """Orthonormal ``(n, j)`` approximations of kernel directions of ``N``, from ``p`` random vectors.

    For a random ``x``, CG on the consistent system ``N z = N x`` from ``z = 0`` stays in the range of
    ``N``, so ``x − z`` converges to the projection of ``x`` onto ``ker N``; the block of ``p`` such
    projections is orthonormalised and its directions with Rayleigh quotient below the others kept (the
    caller certifies them). Batched CG, no factorisation: memory ``O(p · n)``.
    """
    from .linalg import cg  # linalg is light, but keep the import local to the one route that needs it

    n = N.shape[0]
    X = np.random.default_rng(seed).standard_normal((p, n))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    apply = lambda W: torch.from_numpy(np.ascontiguousarray((N @ W.numpy().T).T))
    with torch.no_grad():
        Z, _ = cg(apply, apply(torch.from_numpy(X)), tol=1e-10, maxiter=_DEFLATED_MAX, restarts=1)
    Y = X - Z.numpy()
    U, sv, _ = np.linalg.svd(Y.T, full_matrices=False)
    Q = U[:, sv > 1e-8 * sv.max(initial=0)]
    theta, W = np.linalg.eigh(Q.T @ (N @ Q))
    return Q @ W, theta


def _deflated_piece(N: sp.csr_matrix, tau: float, c: float) -> _Piece:
    """A certified count on a large component with a kernel, without a factorisation.

    An orthonormal ``Y`` (``n × j``) with ``λ_max(YᵀNY) <= τ`` proves ``j`` eigenvalues of ``N`` at most
    ``λ_max(YᵀNY)`` (Courant–Fischer: ``λ_j(N) <= max`` of the Rayleigh quotient on ``span Y``), and a
    Lanczos lower bound ``μ > τ`` on ``N`` compressed to ``Y⊥`` (the operator ``PNP + c·YYᵀ``,
    ``P = I − YYᵀ``) proves ``λ_{j+1}(N) >= μ`` (Courant–Fischer again: ``Y⊥`` has codimension ``j``).
    The block of random vectors doubles while every one of them lands in the kernel or the
    compressed operator still has a near-kernel. Without a certificate the count is a best estimate
    (``certified=False``).
    """
    n = N.shape[0]
    p, j, Y = 8, 0, np.zeros((n, 0))
    while p <= min(n, _DEFLATED_BLOCK_MAX):
        Q, theta = _kernel_by_projection(N, p)
        Y = Q[:, theta <= tau]
        j = Y.shape[1]
        if j == p and p < n:  # every random vector hit the kernel: it may be larger
            p *= 2
            continue
        if j:
            Yt = Y.T.copy()
            deflated = spla.LinearOperator((n, n), dtype=np.float64, matvec=lambda x: _compress(N, Y, Yt, x, c))
            mu, est, steps = _lanczos_bound(deflated, tau, _DEFLATED_MAX, c, patient=True)
        else:
            mu, est, steps = _lanczos_bound(N, tau, _DEFLATED_MAX, c, patient=True)
        if mu is None and est <= 100 * tau and p < n:  # a near-kernel the block missed
            p *= 2
            continue
        top = float(theta[theta <= tau].max(initial=0.0))
        dropped = math.sqrt(max(top, 0.0) + 2 * c * math.sqrt(n) * _EPS64) if j else None  # + rounding of YᵀNY
        if mu is None or (dropped is not None and dropped * dropped > tau):
            break
        return _Piece(n - j, np.array([v for v in (math.sqrt(mu), dropped) if v is not None]), math.sqrt(mu),
                      dropped, lambda: Y, lambda: None, sparse=True,
                      certificate=f"kernel of {j} by projected CG, deflated Lanczos bound after {steps} steps "
                                  f"(failure probability <= {FAILURE_PROBABILITY:g})")
    return _Piece(n - j, np.zeros(0), None, None, lambda: Y, lambda: None, certified=False, sparse=True,
                  certificate=f"not certified: no Lanczos bound separated the {j} kernel directions found by "
                              "projected CG from the rest")


def _envelope(N: sp.csr_matrix) -> int:
    """Entries in the envelope of ``N`` after a reverse Cuthill–McKee ordering: a bound on the fill of a factorisation.

    Small on grids and other graphs with small separators (``~ n^1.5`` on a square grid); ``~ n²/2`` on expanders.
    """
    n = N.shape[0]
    perm = csgraph.reverse_cuthill_mckee(N, symmetric_mode=True)
    P = N[perm][:, perm].tocsr()
    P.sort_indices()
    rows = np.flatnonzero(np.diff(P.indptr))
    first = np.arange(n)
    first[rows] = np.minimum(P.indices[P.indptr[rows]], rows)
    return int((np.arange(n) - first).sum())


def _compress(N, Y: np.ndarray, Yt: np.ndarray, x: np.ndarray, c: float) -> np.ndarray:
    """``(PNP + c·YYᵀ) x`` with ``P = I − YYᵀ``."""
    a = Yt @ x
    z = N @ (x - Y @ a)
    return z - Y @ (Yt @ z) + c * (Y @ a)


def _sparse_piece(A: sp.csr_matrix, tol: float, k: int, bounded: bool) -> _Piece:
    """Certified count on a large component ``A = δ'_c`` (``AᵀA <= 2I`` when ``bounded``)."""
    m, n = A.shape
    N = (A.T @ A).tocsr()
    tau = tol * tol
    c = 2.0 if bounded else float(abs(N).sum(axis=1).max())  # an upper bound on λ_max(N)
    mu, est, steps = _lanczos_bound(N, tau, min(_LANCZOS_MAX, n), c)
    if mu is not None and mu > tau:
        piece = _Piece(n, np.array([math.sqrt(mu)]), math.sqrt(mu), None, lambda: np.zeros((n, 0)), lambda: None,
                       certificate=f"Lanczos bound after {steps} steps (failure probability <= "
                                   f"{FAILURE_PROBABILITY:g})", sparse=True)
    elif _envelope(N) > _FILL_MAX:  # an LDLᵀ could fill in beyond memory (an expander): certify iteratively
        piece = _deflated_piece(N, tau, c)
    else:
        got = _inertia(N, tau)
        if got is None:  # the symmetric factorisation failed: move the shift a little and retry once
            got = _inertia(N, 0.5 * tau)
        if got is None:
            return _Piece(n, np.zeros(0), None, None, lambda: np.zeros((n, 0)), lambda: None, certified=False,
                          certificate="not certified: the LDLᵀ inertia count failed", sparse=True)
        nu, lu = got
        theta, V = _inverse_iteration(N, lu, nu)
        # Ritz values bound eigenvalues from above; eps64 · ‖N‖ covers the rounding of N itself
        dropped = math.sqrt(max(float(theta[nu - 1]), 0.0) + 2 * _EPS64) if nu else None
        kept = math.sqrt(tau) if nu < n else None
        if nu < n and theta.size > nu and theta[nu] / 4 > tau:  # a second count proves a larger margin
            again = _inertia(N, float(theta[nu] / 4))
            if again is not None and again[0] == nu:
                kept = math.sqrt(theta[nu] / 4)
        certified = dropped is None or dropped <= tol
        piece = _Piece(n - nu, np.array([v for v in (kept, dropped) if v is not None]), kept, dropped,
                       lambda: V, lambda: None,
                       certified=certified, sparse=True,
                       certificate="LDLᵀ inertia count (Sylvester)" if certified else
                       "not certified: inverse iteration did not confirm the kernel below tol")
    h1 = m - piece.rank
    if h1 <= k:
        piece.left = lambda: np.zeros((m, 0)) if h1 == 0 else _left_kernel(A, h1)
    return piece


def _left_kernel(A: sp.csr_matrix, h: int) -> np.ndarray | None:
    from .spectral import _smallest  # the spectral module imports this one

    try:
        return _smallest((A @ A.T).tocsr(), h)[1]
    except RuntimeError:
        return None


# ---------------------------------------------------------------------------- the engine


def decide(D: sp.spmatrix, row_owner: np.ndarray, col_owner: np.ndarray, eps: float, tol: float | None = None,
           method: str = "auto", k: int = 16) -> NullSpaces:
    """Decide the rank of ``D`` (rows grouped by edge, columns by vertex) and describe its null spaces.

    Parameters
    ----------
    D : scipy sparse ``(m, n)``, float64
    row_owner : ``(m,)`` edge index of every row.
    col_owner : ``(n,)`` vertex index of every column, non-decreasing.
    eps : machine epsilon of the data (float32 maps: float32's).
    tol
        Tolerance on singular values of the equilibrated matrix (default: [`default_tol`][cellsheaf.rank.default_tol]).
    method
        ``"auto"`` (dense SVD per component up to [`DENSE_LIMIT`][cellsheaf.rank.DENSE_LIMIT]), ``"dense"`` or ``"sparse"``.
    k : on sparse components the left null space is computed only when it has at most ``k`` vectors.
    """
    D = sp.csr_matrix(D, dtype=np.float64, copy=True)  # D may be a cached operator: never touch it
    D.sum_duplicates()
    m, n = D.shape
    row_owner = np.asarray(row_owner, dtype=np.int64)
    col_owner = np.asarray(col_owner, dtype=np.int64)
    Dt = sp.diags(_edge_scales(D, row_owner) if m else np.zeros(0)) @ D
    Dt = sp.csr_matrix(Dt)
    Dt.eliminate_zeros()
    limit = DENSE_LIMIT if method == "auto" else _SPARSE_MIN
    if tol is None:
        big = 0  # columns of the largest component of δ̃ that may take the sparse route
        if method != "dense" and max(m, n) > limit:
            n_c, lab = _components(Dt)
            rows_c, cols_c = np.bincount(lab[:m], minlength=n_c), np.bincount(lab[m:], minlength=n_c)
            sizes = np.where(np.maximum(rows_c, cols_c) > limit, cols_c, 0)
            big = int(sizes.max(initial=0))
        tol = default_tol((m, n), eps, big)
    R, K, kept_local, dropped_local, bounded = _vertex_blocks(Dt, col_owner, tol)
    Dp = (Dt @ R).tocsr()
    Dp.eliminate_zeros()
    n2 = Dp.shape[1]
    n_comp, labels = _components(Dp)
    rlab, clab = labels[:m], labels[m:]
    row_order, col_order = np.argsort(rlab, kind="stable"), np.argsort(clab, kind="stable")
    rcount, ccount = np.bincount(rlab, minlength=n_comp), np.bincount(clab, minlength=n_comp)
    rstart, cstart = np.r_[0, np.cumsum(rcount)], np.r_[0, np.cumsum(ccount)]
    route_sparse = (method != "dense") & (ccount > 0) & (rcount > 0) & (np.maximum(rcount, ccount) > limit)
    Pm = Dp[row_order][:, col_order].tocsr()
    pieces: list[tuple[int, _Piece]] = []
    empty = ccount == 0  # rows touching no remaining column: all of them lie in the left kernel
    zero_rows = np.flatnonzero(empty[rlab]) if m else np.zeros(0, int)
    for c in np.flatnonzero(~empty):
        block = Pm[rstart[c]:rstart[c + 1], cstart[c]:cstart[c + 1]]
        if route_sparse[c]:
            pieces.append((c, _sparse_piece(block.tocsr(), tol, k, bounded)))
        else:
            pieces.append((c, _dense_piece(block.toarray(), tol)))
    rank = sum(p.rank for _, p in pieces)
    kept = [p.kept_lb for _, p in pieces if p.kept_lb is not None] + ([float(kept_local.min())]
                                                                      if kept_local.size else [])
    dropped = [p.dropped_ub for _, p in pieces if p.dropped_ub is not None] + ([float(dropped_local.max())]
                                                                               if dropped_local.size else [])
    certified = all(p.certified for _, p in pieces)
    sv = np.sort(np.concatenate([p.sv for _, p in pieces] + [kept_local, dropped_local]))[::-1]
    any_sparse = any(p.sparse for _, p in pieces)
    certs = sorted({p.certificate for _, p in pieces} - {""})
    decision = RankDecision(
        rank=rank, method="sparse" if any_sparse else "dense", tol=float(tol),
        singular_values=torch.as_tensor(sv.copy()), smallest_kept=min(kept) if kept else None,
        largest_dropped=max(dropped) if dropped else None, certified=certified,
        certificate="; ".join(certs) if certs else "dense SVD",
    )
    row_scale = _edge_scales(D, row_owner) if m else np.zeros(0)

    def right() -> sp.csr_matrix:
        cols = []
        for c, p in pieces:
            Y = p.null()
            if Y.shape[1]:
                idx = col_order[cstart[c]:cstart[c + 1]]
                cols.append(sp.csr_matrix((Y.ravel(), (np.repeat(idx, Y.shape[1]), np.tile(np.arange(Y.shape[1]),
                                                                                          idx.size))),
                                          shape=(n2, Y.shape[1])))
        parts = [K]
        if cols:
            parts.append(_orthonormal_sparse(R @ sp.hstack(cols).tocsr()))
        return sp.hstack(parts).tocsr() if len(parts) > 1 else K.tocsr()

    def left() -> sp.csr_matrix | None:
        cols = [sp.csr_matrix((np.ones(zero_rows.size), (zero_rows, np.arange(zero_rows.size))),
                              shape=(m, zero_rows.size))]
        for c, p in pieces:
            Z = p.left()
            if Z is None:
                return None
            if Z.shape[1]:
                idx = row_order[rstart[c]:rstart[c + 1]]
                cols.append(sp.csr_matrix((Z.ravel(), (np.repeat(idx, Z.shape[1]), np.tile(np.arange(Z.shape[1]),
                                                                                          idx.size))),
                                          shape=(m, Z.shape[1])))
        return _orthonormal_sparse(sp.diags(row_scale) @ sp.hstack(cols).tocsr())

    return NullSpaces(decision, right, left, free_columns=np.arange(n))


def _components(A: sp.csr_matrix) -> tuple[int, np.ndarray]:
    """Connected components of the bipartite row/column graph of ``A``: labels of rows, then columns.

    Columns are linked through the first column of every row they share (a graph on the columns with
    ``nnz`` edges, not the ``(m + n)``-node bipartite graph); a row takes the label of its columns, and a
    row with no entries is a component of its own.
    """
    m, n = A.shape
    if not (m and n):
        return m + n, np.arange(m + n)
    counts = np.diff(A.indptr)
    nonempty = counts > 0
    first = np.zeros(m, dtype=A.indices.dtype)
    first[nonempty] = A.indices[A.indptr[:-1][nonempty]]
    link = sp.csr_matrix((np.ones(A.nnz, dtype=np.int32), (np.repeat(first, counts), A.indices)), shape=(n, n))
    n_col, col_lab = csgraph.connected_components(link, directed=False)
    row_lab = np.empty(m, dtype=np.int64)
    row_lab[nonempty] = col_lab[first[nonempty]]
    row_lab[~nonempty] = n_col + np.arange(int((~nonempty).sum()))
    return n_col + int((~nonempty).sum()), np.concatenate([row_lab, col_lab.astype(np.int64)])


def _orthonormal_sparse(B: sp.spmatrix) -> sp.csr_matrix:
    """Orthonormal basis of the columns of a full-column-rank sparse ``B``, QR on its nonzero rows only."""
    B = sp.csr_matrix(B)
    rows = np.flatnonzero(np.diff(B.indptr))
    if B.shape[1] == 0:
        return B
    Q, _ = np.linalg.qr(B[rows].toarray())
    out = sp.coo_matrix(Q)
    return sp.csr_matrix((out.data, (rows[out.row], out.col)), shape=B.shape)
