"""Sheaf cohomology on graphs: H⁰ = ker δ, H¹ = coker δ, and relative H⁰(G, U; F).

On a graph the cochain complex is ``0 -> C⁰ -δ-> C¹ -> 0``, so
``H⁰ = ker δ`` (the global sections) and ``H¹ = C¹ / im δ ≅ ker δᵀ``. Both
follow from one rank decision on ``δ``, and ``dim H⁰ − dim H¹ = C0 − C1``
(the Euler characteristic) holds by construction.

Rank decisions
--------------
A numerical rank is a decision: singular values above a tolerance count,
the others are treated as zero. Every result reports the tolerance, the
singular values it saw and the *gap* at the cut (see `RankDecision`),
so one can see how clear the decision was. Three routes:

``"dense"``
    Full SVD of ``δ`` (float64). Default tolerance, as in ``numpy.linalg.matrix_rank``:
    ``max(C1, C0) · eps · σ_max`` with ``eps`` the float64 machine epsilon (δ is
    always assembled in float64, whatever the dtype of the maps).
``"sparse"``
    For large sheaves: the ``k`` smallest eigenpairs of ``δᵀδ``, ``σ = sqrt(λ)``, by
    block inverse iteration on one sparse LU (see `cellsheaf.spectral`; it
    finds kernels of any multiplicity, and needs an LU that does not fill in). Eigenvalues
    carry absolute errors of order ``eps · σ_max²``, so singular values below
    ``sqrt(eps) · σ_max`` cannot be resolved: the default tolerance is
    ``sqrt(max(C1, C0) · eps) · σ_max``. If all ``k`` computed singular values
    are below the tolerance, H⁰ may be larger than ``k`` and a ``ValueError``
    asks for a larger ``k``. The H¹ basis is computed only when ``h1 <= k``.
``exact=True``
    Exact rank and null spaces over the rationals (sympy ``DomainMatrix`` over
    ``QQ``; install the ``exact`` extra). Every float64 entry is a dyadic rational
    and is used exactly, so integer and rational maps (stored exactly) get their
    true rank. Bases are then orthonormalised in float64.

``method="auto"`` uses the dense route when ``max(C0, C1) <= 2048`` and the
sparse route otherwise.

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf(); S.add_vertex("a", 2); S.add_vertex("b", 2)
>>> _ = S.add_edge("a", "b", torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
>>> H = cs.cohomology(S)
>>> H.h0, H.h1, H.H0.shape
(2, 0, torch.Size([4, 2]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import torch
from torch import Tensor

from .operators import coboundary, fixed_indices
from .spectral import _largest, _smallest

__all__ = ["RankDecision", "Cohomology", "RelativeCohomology", "cohomology", "global_sections",
           "relative_cohomology", "DENSE_LIMIT"]

DENSE_LIMIT = 2048
"""``method="auto"`` takes the dense SVD route when ``max(C0, C1)`` is at most this."""

_EPS = float(np.finfo(np.float64).eps)


@dataclass(frozen=True)
class RankDecision:
    """How the rank of a matrix was decided.

    Attributes
    ----------
    rank : the numerical (or exact) rank.
    method : ``"dense"``, ``"sparse"`` or ``"exact"``.
    tol : singular values ``> tol`` count towards the rank (``None`` for exact).
    singular_values : the singular values the decision saw, descending, float64
        (all of them for ``"dense"``; ``σ_max`` and the ``k`` smallest for
        ``"sparse"``; ``None`` for ``"exact"``).
    smallest_kept : the smallest singular value counted (``None`` if the rank is 0).
    largest_dropped : the largest singular value treated as zero (``None`` if none was).
    """

    rank: int
    method: str
    tol: float | None = None
    singular_values: Tensor | None = None
    smallest_kept: float | None = None
    largest_dropped: float | None = None

    @property
    def gap(self) -> float | None:
        """``smallest_kept / largest_dropped``: how clear the cut was (large is clear, near 1 is not).

        A missing side is replaced by ``tol``: with nothing dropped the gap is
        ``smallest_kept / tol``, with nothing kept it is ``tol / largest_dropped``.
        ``inf`` when the dropped values are exactly zero; ``None`` for exact ranks.
        """
        if self.method == "exact":
            return None
        top = self.smallest_kept if self.smallest_kept is not None else self.tol
        bottom = self.largest_dropped if self.largest_dropped is not None else self.tol
        if bottom == 0:
            return math.inf
        return top / bottom


class _Decided:
    """Read-through properties of a result that carries a `RankDecision` as ``decision``."""

    decision: RankDecision

    @property
    def tol(self) -> float | None:
        """Tolerance of the rank decision."""
        return self.decision.tol

    @property
    def singular_values(self) -> Tensor | None:
        """Singular values that the decision saw (descending)."""
        return self.decision.singular_values

    @property
    def gap(self) -> float | None:
        """Singular-value gap at the rank cut (see `RankDecision.gap`)."""
        return self.decision.gap


@dataclass(frozen=True)
class Cohomology(_Decided):
    """Cohomology of a sheaf on a graph.

    Attributes
    ----------
    h0, h1 : ``dim H⁰ = dim ker δ`` and ``dim H¹ = dim coker δ``.
    H0 : ``(C0, h0)`` orthonormal basis of ``ker δ`` (the global sections).
    H1 : ``(C1, h1)`` orthonormal basis of ``ker δᵀ ≅ coker δ``, or ``None`` when
        the sparse route did not compute it (``h1 > k``).
    C0, C1 : dimensions of the cochain spaces.
    decision : the `RankDecision` on ``δ``.
    """

    h0: int
    h1: int
    H0: Tensor
    H1: Tensor | None
    C0: int
    C1: int
    decision: RankDecision

    @property
    def rank(self) -> int:
        """Rank of ``δ``."""
        return self.decision.rank

    @property
    def euler_characteristic(self) -> int:
        """``h0 − h1``, which equals ``C0 − C1``."""
        return self.h0 - self.h1

    def __repr__(self) -> str:
        gap = self.gap
        gap_s = "exact" if gap is None else f"{gap:.3g}"
        return f"Cohomology(h0={self.h0}, h1={self.h1}, rank={self.rank}, method={self.decision.method!r}, gap={gap_s})"


@dataclass(frozen=True)
class RelativeCohomology(_Decided):
    """Relative cohomology ``H⁰(G, U; F) = ker δ_Ω`` for a set ``U`` of fixed coordinates.

    Its elements are the free-coordinate cochains with zero discord when the
    fixed coordinates are zero; the harmonic extension is unique iff ``dim == 0``.

    Attributes
    ----------
    dim : ``dim H⁰(G, U; F)``.
    basis : ``(C0, dim)`` orthonormal basis, zero on the fixed coordinates.
    free : sorted flat indices of the free coordinates ``Ω``.
    decision : the `RankDecision` on ``δ_Ω = δ[:, Ω]``.
    """

    dim: int
    basis: Tensor
    free: Tensor
    decision: RankDecision

    @property
    def h0(self) -> int:
        """Alias of `dim`."""
        return self.dim


# ---------------------------------------------------------------------------- rank engines


def _decide(s: np.ndarray, tol: float, method: str, rank: int | None = None) -> RankDecision:
    """Rank decision from singular values ``s`` (any order); ``rank`` overrides the count above ``tol``."""
    s = np.sort(np.asarray(s, dtype=np.float64))[::-1]
    kept, dropped = s[s > tol], s[s <= tol]
    return RankDecision(
        rank=int(kept.size) if rank is None else rank, method=method, tol=float(tol),
        singular_values=torch.as_tensor(s.copy()),
        smallest_kept=float(kept[-1]) if kept.size else None,
        largest_dropped=float(dropped[0]) if dropped.size else None,
    )


def _dense(D: sp.csr_matrix, tol: float | None):
    """Full SVD route: returns ``(decision, right null basis, left null basis)``."""
    m, n = D.shape
    A = D.toarray()
    if min(m, n) == 0:
        s, U, Vt = np.zeros(0), np.eye(m), np.eye(n)
    else:
        try:
            U, s, Vt = sla.svd(A, full_matrices=True)
        except np.linalg.LinAlgError:  # gesdd can fail to converge; gesvd is slower but robust
            U, s, Vt = sla.svd(A, full_matrices=True, lapack_driver="gesvd")
    smax = float(s[0]) if s.size else 0.0
    if tol is None:
        tol = max(m, n, 1) * _EPS * smax
    dec = _decide(s, tol, "dense")
    r = dec.rank
    return dec, Vt[r:].T, U[:, r:]


def _check_k(k: int | None, n: int) -> int:
    if k is None:
        k = 16
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(min(k, max(n, 1)))


def _sparse(D: sp.csr_matrix, tol: float | None, k: int | None, left: bool):
    """Sparse route: smallest eigenpairs of ``DᵀD`` (and ``DDᵀ`` for the left null space)."""
    m, n = D.shape
    k = _check_k(k, n)
    G = (D.T @ D).tocsr()
    lmax = float(_largest(G, 1, tol=1e-6)[0][0])  # σ_max only sets the scale of the tolerance
    smax = math.sqrt(max(lmax, 0.0))
    if tol is None:
        tol = math.sqrt(max(m, n) * _EPS) * smax
    lam, V = _smallest(G, k)
    s_small = np.sqrt(np.clip(lam, 0.0, None))
    nullity = int((s_small <= tol).sum())
    if nullity == k and k < n:
        raise ValueError(
            f"all {k} smallest singular values of the {m}x{n} coboundary are below tol={tol:.3g}: the kernel may "
            f"have dimension > {k}. Pass a larger k= (or method='dense' if it fits in memory)"
        )
    dec = _decide(np.concatenate([[smax], s_small]), tol, "sparse", rank=n - nullity)
    right = V[:, :nullity]
    left_basis = None
    h1 = m - dec.rank
    if left and h1 <= k:
        left_basis = _smallest((D @ D.T).tocsr(), h1)[1] if h1 else np.zeros((m, 0))
    return dec, right, left_basis


def _exact(D: sp.csr_matrix):
    """Exact rank and null spaces over QQ (sympy)."""
    try:
        from sympy import QQ
        from sympy.polys.matrices import DomainMatrix
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "exact=True needs sympy: install it with `pip install sympy` (or `pip install cellsheaf[exact]`)"
        ) from None
    m, n = D.shape
    coo = D.tocoo()
    rows: dict[int, dict[int, object]] = {}
    rows_t: dict[int, dict[int, object]] = {}
    for i, j, x in zip(coo.row.tolist(), coo.col.tolist(), coo.data.tolist()):
        if x == 0:
            continue
        f = Fraction(x)
        q = QQ(f.numerator, f.denominator)
        rows.setdefault(i, {})[j] = q
        rows_t.setdefault(j, {})[i] = q
    A = DomainMatrix(rows, (m, n), QQ)
    rank = int(A.rank())

    def null(M: DomainMatrix, size: int) -> np.ndarray:
        if M.shape[0] == 0:
            return np.eye(size)
        rows = M.nullspace().to_Matrix().tolist()  # one basis vector per row
        return _orthonormal(np.array(rows, dtype=np.float64).reshape(-1, size).T)

    right = null(A, n)
    left = null(DomainMatrix(rows_t, (n, m), QQ), m)
    return RankDecision(rank=rank, method="exact"), right, left


def _orthonormal(B: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the column span of a full-column-rank ``B``."""
    if B.shape[1] == 0:
        return B
    Q, _ = np.linalg.qr(B)
    return Q


def _null_spaces(D: sp.csr_matrix, tol, exact, method, k, left):
    if method not in ("auto", "dense", "sparse"):
        raise ValueError(f"method must be 'auto', 'dense' or 'sparse', got {method!r}")
    if tol is not None and not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a non-negative finite number, got {tol!r}")
    if exact and tol is not None:
        raise ValueError("exact=True decides the rank exactly: do not pass tol")
    if not np.isfinite(D.data).all():
        raise ValueError("the coboundary has NaN or Inf entries: check the restriction maps")
    m, n = D.shape
    if D.count_nonzero() == 0:  # δ = 0: everything is in the kernel, whatever the route
        dec = RankDecision(0, "exact") if exact else \
            _decide(np.zeros(min(m, n)), tol or 0.0, "dense" if method == "auto" else method)
        return dec, np.eye(n), np.eye(m)
    if exact:
        return _exact(D)
    if method == "dense" or (method == "auto" and max(D.shape) <= DENSE_LIMIT):
        return _dense(D, tol)
    return _sparse(D, tol, k, left)


def _delta(S, at) -> sp.csr_matrix:
    return coboundary(S, at=at, format="scipy")


# ---------------------------------------------------------------------------- public API


def cohomology(S, tol: float | None = None, exact: bool = False, at=None, method: str = "auto",
               k: int | None = None) -> Cohomology:
    """Dimensions and orthonormal bases of ``H⁰ = ker δ`` and ``H¹ = coker δ``.

    Parameters
    ----------
    S : Sheaf
    tol : float, optional
        Singular values ``> tol`` count towards the rank of ``δ``. Default:
        ``max(C1, C0) · eps · σ_max`` (dense) or ``sqrt(max(C1, C0) · eps) · σ_max``
        (sparse); see the module docstring.
    exact : bool
        Decide the rank exactly over the rationals (needs sympy).
    at : cochain, optional
        Linearisation point for sheaves with nonlinear maps (their Jacobians are used).
    method : {"auto", "dense", "sparse"}
        Dense SVD or sparse shift-invert eigensolver (``auto``: dense up to
        `DENSE_LIMIT`).
    k : int, optional
        Sparse route only: how many of the smallest singular values to compute
        (an upper bound on ``h0``; default 16).

    Returns
    -------
    Cohomology
        ``.h0``, ``.h1``, bases ``.H0`` ``(C0, h0)`` and ``.H1`` ``(C1, h1)`` in the
        sheaf's dtype, and the rank decision (``.tol``, ``.singular_values``, ``.gap``).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex(0, 1); S.add_vertex(1, 1)
    >>> _ = S.add_edge(0, 1, torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    >>> _ = S.add_edge(0, 1, torch.ones(1, 1, dtype=torch.float64), 2 * torch.ones(1, 1, dtype=torch.float64))
    >>> H = cs.cohomology(S)
    >>> H.h0, H.h1, H.euler_characteristic == S.C0 - S.C1
    (0, 0, True)
    """
    D = _delta(S, at)
    dec, right, left = _null_spaces(D, tol, exact, method, k, left=True)
    dt = S.dtype
    h0 = S.C0 - dec.rank
    H1 = None if left is None else torch.from_numpy(np.array(left, order="C")).to(dt)
    return Cohomology(h0=h0, h1=S.C1 - dec.rank, H0=torch.from_numpy(np.array(right, order="C")).to(dt), H1=H1,
                      C0=S.C0, C1=S.C1, decision=dec)


def global_sections(S, tol: float | None = None, exact: bool = False, at=None, method: str = "auto",
                    k: int | None = None) -> Tensor:
    """An orthonormal ``(C0, h0)`` basis of the global sections ``H⁰ = ker δ``.

    Arguments as in `cohomology`.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    >>> cs.global_sections(S).abs()
    tensor([[0.7071],
            [0.7071]], dtype=torch.float64)
    """
    D = _delta(S, at)
    _, right, _ = _null_spaces(D, tol, exact, method, k, left=False)
    return torch.from_numpy(np.array(right, order="C")).to(S.dtype)


def relative_cohomology(S, boundary, tol: float | None = None, exact: bool = False, at=None,
                        method: str = "auto", k: int | None = None) -> RelativeCohomology:
    """``H⁰(G, U; F) = ker δ_Ω``: sections vanishing on the fixed coordinates ``U``.

    ``δ_Ω = δ[:, Ω]`` is the coboundary restricted to the free coordinates.
    The harmonic extension with boundary ``U`` is unique exactly when this
    space is zero.

    Parameters
    ----------
    S : Sheaf
    boundary : Boundary, ResolvedBoundary or sequence of flat indices
        The fixed coordinates ``U`` (their values do not matter).
    tol, exact, at, method, k
        As in `cohomology`.

    Returns
    -------
    RelativeCohomology
        ``.dim``, ``.basis`` ``(C0, dim)`` (zero on ``U``), ``.free`` and the rank decision.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    >>> cs.relative_cohomology(S, cs.Boundary().fix("a", [0.0])).dim
    0
    """
    fixed = fixed_indices(S, boundary).cpu().numpy()
    free = np.setdiff1d(np.arange(S.C0), fixed)
    D = _delta(S, at)[:, free].tocsr()
    dec, right, _ = _null_spaces(D, tol, exact, method, k, left=False)
    basis = np.zeros((S.C0, right.shape[1]))
    basis[free] = right
    return RelativeCohomology(dim=int(free.size - dec.rank), basis=torch.as_tensor(basis).to(S.dtype),
                              free=torch.as_tensor(free, dtype=torch.long), decision=dec)
