"""Sheaf cohomology on graphs: H⁰ = ker δ, H¹ = coker δ, and relative H⁰(G, U; F).

On a graph the cochain complex is ``0 -> C⁰ -δ-> C¹ -> 0``, so
``H⁰ = ker δ`` (the global sections) and ``H¹ = C¹ / im δ ≅ ker δᵀ``. Both
follow from one rank decision on ``δ``, and ``dim H⁰ − dim H¹ = C0 − C1``
(the Euler characteristic) holds by construction.

Rank decisions
--------------
A numerical rank is a decision: singular values above a tolerance count,
the others are treated as zero. Decisions are made by [`cellsheaf.rank`][cellsheaf.rank]:
edges are equilibrated (rescaling an edge never changes a rank), vertex stalks
are equilibrated (local kernels are decided vertex by vertex), connected
components are decided separately, and each component gets a certified count:
a dense SVD up to [`DENSE_LIMIT`][cellsheaf.cohomology.DENSE_LIMIT] rows and columns, beyond that a Lanczos bound or
an ``LDLᵀ`` inertia count on the sparse equilibrated Laplacian. Every result
reports the tolerance, the singular values it saw, the *gap* at the cut and
whether the count is certified (see [`RankDecision`][cellsheaf.rank.RankDecision]). The default tolerance
follows the precision of the maps: float32 maps are decided in float64 with
float32's epsilon.

``method``
    ``"auto"`` (dense SVD per component up to [`DENSE_LIMIT`][cellsheaf.cohomology.DENSE_LIMIT], sparse count beyond),
    ``"dense"`` (every component by SVD) or ``"sparse"`` (the sparse count for every
    component above 64 rows or columns).
``exact=True``
    Exact rank and null spaces over the rationals (sympy ``DomainMatrix`` over
    ``QQ``; install the ``exact`` extra). Every float64 entry is a dyadic rational
    and is used exactly, so integer and rational maps (stored exactly) get their
    true rank. Bases are then orthonormalised in float64.

The bases ``H0`` and ``H1`` are computed when first read (they are dense and can
be large). On sparse components ``H1`` is computed only when it has at most
``k`` vectors there.

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
from dataclasses import dataclass, field, replace
from functools import cached_property
from fractions import Fraction

import numpy as np
import scipy.sparse as sp
import scipy.sparse.csgraph as csgraph
import torch
from torch import Tensor

from .operators import coboundary, fixed_indices
from .rank import DENSE_LIMIT, NullSpaces, RankDecision, decide

__all__ = ["RankDecision", "Cohomology", "RelativeCohomology", "cohomology", "global_sections",
           "relative_cohomology", "DENSE_LIMIT"]


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

    @property
    def certified(self) -> bool:
        """Whether the rank decision is certified (see `RankDecision.certified`)."""
        return self.decision.certified


def _tensor(M, dtype) -> Tensor | None:
    return None if M is None else torch.from_numpy(np.array(M, dtype=np.float64, order="C")).to(dtype)


@dataclass(frozen=True)
class Cohomology(_Decided):
    """Cohomology of a sheaf on a graph.

    Attributes
    ----------
    h0, h1 : ``dim H⁰ = dim ker δ`` and ``dim H¹ = dim coker δ``.
    H0 : ``(C0, h0)`` orthonormal basis of ``ker δ`` (the global sections), computed when first read.
    H1 : ``(C1, h1)`` orthonormal basis of ``ker δᵀ ≅ coker δ``, computed when first read, or
        ``None`` when a sparse component has more than ``k`` of its vectors.
    C0, C1 : dimensions of the cochain spaces.
    decision
        The [`RankDecision`][cellsheaf.rank.RankDecision] on ``δ`` (``.certified``, ``.gap``, ``.tol``, ``.certificate``).
    """

    h0: int
    h1: int
    C0: int
    C1: int
    decision: RankDecision
    _spaces: NullSpaces = field(repr=False, compare=False)
    _dtype: torch.dtype = field(repr=False, compare=False)

    @cached_property
    def H0(self) -> Tensor:
        """Orthonormal ``(C0, h0)`` basis of the global sections."""
        return _tensor(self._spaces.right(), self._dtype)

    @cached_property
    def H1(self) -> Tensor | None:
        """Orthonormal ``(C1, h1)`` basis of ``ker δᵀ``, or ``None`` (see the class docstring)."""
        return _tensor(self._spaces.left(), self._dtype)

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
        gap_s = "exact" if self.decision.method == "exact" else ("uncertified" if gap is None else f"{gap:.3g}")
        return f"Cohomology(h0={self.h0}, h1={self.h1}, rank={self.rank}, method={self.decision.method!r}, gap={gap_s})"


@dataclass(frozen=True)
class RelativeCohomology(_Decided):
    """Relative cohomology ``H⁰(G, U; F) = ker δ_Ω`` for a set ``U`` of fixed coordinates.

    Its elements are the free-coordinate cochains with zero discord when the
    fixed coordinates are zero; the harmonic extension is unique iff ``dim == 0``.

    Attributes
    ----------
    dim : ``dim H⁰(G, U; F)``.
    basis : ``(C0, dim)`` orthonormal basis, zero on the fixed coordinates (computed when first read).
    free : sorted flat indices of the free coordinates ``Ω``.
    decision
        The [`RankDecision`][cellsheaf.rank.RankDecision] on ``δ_Ω = δ[:, Ω]``.
    """

    dim: int
    free: Tensor
    decision: RankDecision
    _spaces: NullSpaces = field(repr=False, compare=False)
    _dtype: torch.dtype = field(repr=False, compare=False)
    _C0: int = field(repr=False, compare=False)
    _columns: np.ndarray | None = field(default=None, repr=False, compare=False)  # the columns decided (default: free)

    @property
    def h0(self) -> int:
        """Alias of `dim`."""
        return self.dim

    def basis_sparse(self) -> sp.csr_matrix:
        """The basis as a scipy sparse ``(C0, dim)`` matrix (cheap when the kernel is local)."""
        B = self._spaces.right(sparse=True).tocoo()
        cols = self.free.numpy() if self._columns is None else self._columns
        return sp.csr_matrix((B.data, (cols[B.row], B.col)), shape=(self._C0, B.shape[1]))

    @cached_property
    def basis(self) -> Tensor:
        """Orthonormal ``(C0, dim)`` basis, zero on the fixed coordinates."""
        return _tensor(self.basis_sparse().toarray(), self._dtype)


# ---------------------------------------------------------------------------- exact route


def _exact(D: sp.csr_matrix) -> NullSpaces:
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
    rank = int(A.rank()) if m and n else 0

    def null(M: DomainMatrix, size: int) -> sp.csr_matrix:
        if M.shape[0] == 0 or rank == 0:
            return sp.identity(size, format="csr")
        rows = M.nullspace().to_Matrix().tolist()  # one basis vector per row
        B = np.array(rows, dtype=np.float64).reshape(-1, size).T
        return sp.csr_matrix(np.linalg.qr(B)[0] if B.shape[1] else B)

    return NullSpaces(RankDecision(rank=rank, method="exact", certificate="exact rank over the rationals"),
                      lambda: null(A, n), lambda: null(DomainMatrix(rows_t, (n, m), QQ), m),
                      free_columns=np.arange(n))


# ---------------------------------------------------------------------------- shared plumbing


def _owners(S) -> tuple[np.ndarray, np.ndarray]:
    """Edge index of every row of ``δ`` and vertex index of every column."""
    edims, vdims = S._edge_dim_array(), S._dim_array()  # cached layout arrays: no per-edge objects
    rows = np.repeat(np.arange(edims.size), edims)
    cols = np.repeat(np.arange(vdims.size), vdims)
    return rows.astype(np.int64), cols.astype(np.int64)


def _check(tol, exact, method, k) -> int:
    if method not in ("auto", "dense", "sparse"):
        raise ValueError(f"method must be 'auto', 'dense' or 'sparse', got {method!r}")
    if tol is not None and not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a non-negative finite number, got {tol!r}")
    if exact and tol is not None:
        raise ValueError("exact=True decides the rank exactly: do not pass tol")
    if k is None:
        k = 16
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _spaces(S, D: sp.csr_matrix, cols: np.ndarray | None, tol, exact, method, k, dtype: torch.dtype) -> NullSpaces:
    """Rank decision on ``D`` (all columns of ``δ``, or the columns ``cols``); ``dtype``: the maps' dtype."""
    k = _check(tol, exact, method, k)
    if not np.isfinite(D.data).all():
        raise ValueError("the coboundary has NaN or Inf entries: check the restriction maps")
    row_owner, col_owner = _owners(S)
    if cols is not None:
        D, col_owner = D[:, cols].tocsr(), col_owner[cols]
    if exact:
        return _exact(D)
    eps = float(torch.finfo(dtype).eps) if dtype.is_floating_point else _EPS64
    return decide(D, row_owner, col_owner, eps=max(eps, _EPS64), tol=tol, method=method, k=k)


_EPS64 = float(np.finfo(np.float64).eps)


def _delta(S, at) -> sp.csr_matrix:
    return coboundary(S, at=at, format="scipy", dtype=torch.float64)


# ---------------------------------------------------------------------------- public API


def cohomology(S, tol: float | None = None, exact: bool = False, at=None, method: str = "auto",
               k: int | None = None) -> Cohomology:
    """Dimensions and orthonormal bases of ``H⁰ = ker δ`` and ``H¹ = coker δ``.

    Parameters
    ----------
    S : Sheaf
    tol : float, optional
        Singular values of the equilibrated coboundary ``> tol`` count towards the rank
        (default: from the dtype of the maps; see [`cellsheaf.rank`][cellsheaf.rank]).
    exact : bool
        Decide the rank exactly over the rationals (needs sympy).
    at : cochain, optional
        Linearisation point for sheaves with nonlinear maps (their Jacobians are used).
    method : {"auto", "dense", "sparse"}
        How components are decided (see the module docstring).
    k : int, optional
        Sparse components only: ``H1`` is computed when it has at most ``k`` vectors there (default 16).

    Returns
    -------
    Cohomology
        ``.h0``, ``.h1``, bases ``.H0`` ``(C0, h0)`` and ``.H1`` ``(C1, h1)`` in the
        sheaf's dtype, and the rank decision (``.tol``, ``.singular_values``, ``.gap``, ``.certified``).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex(0, 1); S.add_vertex(1, 1)
    >>> _ = S.add_edge(0, 1, torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    >>> _ = S.add_edge(0, 1, torch.ones(1, 1, dtype=torch.float64), 2 * torch.ones(1, 1, dtype=torch.float64))
    >>> H = cs.cohomology(S)
    >>> H.h0, H.h1, H.euler_characteristic == S.C0 - S.C1, H.certified
    (0, 0, True, True)
    """
    dtype = S.dtype
    spaces = _spaces(S, _delta(S, at), None, tol, exact, method, k, dtype)
    r = spaces.decision.rank
    return Cohomology(h0=S.C0 - r, h1=S.C1 - r, C0=S.C0, C1=S.C1, decision=spaces.decision, _spaces=spaces,
                      _dtype=dtype)


def global_sections(S, tol: float | None = None, exact: bool = False, at=None, method: str = "auto",
                    k: int | None = None) -> Tensor:
    """An orthonormal ``(C0, h0)`` basis of the global sections ``H⁰ = ker δ``.

    Arguments as in [`cohomology`][cellsheaf.cohomology.cohomology].

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    >>> cs.global_sections(S).abs()
    tensor([[0.7071],
            [0.7071]], dtype=torch.float64)
    """
    dtype = S.dtype
    spaces = _spaces(S, _delta(S, at), None, tol, exact, method, k, dtype)
    return _tensor(spaces.right(), dtype)


def relative_cohomology(S, boundary, tol: float | None = None, exact: bool = False, at=None,
                        method: str = "auto", k: int | None = None) -> RelativeCohomology:
    """``H⁰(G, U; F) = ker δ_Ω``: sections vanishing on the fixed coordinates ``U``.

    ``δ_Ω = δ[:, Ω]`` is the coboundary restricted to the free coordinates.
    The harmonic extension with boundary ``U`` is unique exactly when this
    space is zero.

    Above [`DENSE_LIMIT`][cellsheaf.cohomology.DENSE_LIMIT] free coordinates (default ``tol``, ``method="auto"``), propagation
    from the boundary comes first: a vertex joined to a fixed or already determined vertex by an edge
    whose map at it is injective on its free coordinates (``σ_min > 10⁻⁶ σ_max``) vanishes in every
    relative section, and only the vertices left over go to the rank decision. When none is left the
    answer is exact (``decision.method == "exact"``, the certificate says how many were determined).

    Parameters
    ----------
    S : Sheaf
    boundary : Boundary, ResolvedBoundary or sequence of flat indices
        The fixed coordinates ``U`` (their values do not matter).
    tol, exact, at, method, k
        As in [`cohomology`][cellsheaf.cohomology.cohomology].

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
    is_free = np.ones(S.C0, dtype=bool)
    is_free[fixed_indices(S, boundary).cpu().numpy()] = False
    free = np.flatnonzero(is_free)
    dtype = S.dtype
    cols, note = free, ""
    if free.size > DENSE_LIMIT and not exact and tol is None and at is None and method == "auto" and S.linear:
        cols = _undetermined(S, free)
        note = (f"{free.size - cols.size} of {free.size} free coordinates determined by propagation from the "
                "boundary through injective maps")
    if cols.size == 0:
        decision = RankDecision(rank=int(free.size), method="exact", certificate=note)
        spaces = NullSpaces(decision, lambda: sp.csr_matrix((0, 0)), lambda: None, free_columns=cols)
    else:
        spaces = _spaces(S, _delta(S, at), cols, tol, exact, method, k, dtype)
        if note:
            d = spaces.decision
            spaces.decision = replace(d, rank=d.rank + free.size - cols.size, certificate=f"{note}; {d.certificate}")
    return RelativeCohomology(dim=int(free.size - spaces.decision.rank),
                              free=torch.as_tensor(free, dtype=torch.long), decision=spaces.decision,
                              _spaces=spaces, _dtype=dtype, _C0=S.C0, _columns=cols)


# ---------------------------------------------------------------------------- propagation from the boundary

_CONDITION = 1e-6  # a map whose σ_min exceeds this times its norm is injective (rounding moves σ by ~eps·norm)


def _injective(F: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Whether each map of the stack ``F`` ``(k, de, dv)`` is injective on its coordinates ``free`` ``(k, dv)``.

    A sufficient test without SVDs: with ``G`` the Gram matrix of the free columns and ``n`` their number,
    ``σ_min² >= det G / σ_max^{2(n-1)}``, so ``det G > c²·‖F‖_F^{2n}`` proves ``σ_min > c·σ_max``
    (``c`` = `_CONDITION`). The fixed columns enter ``G`` as ``‖F‖_F²`` on the diagonal, which scales
    ``det G`` by ``‖F‖_F²`` per column and leaves the test unchanged. Square maps free everywhere use
    ``det F`` itself.
    """
    k, de, dv = F.shape
    if k == 0:
        return np.zeros(0, dtype=bool)
    norm2 = np.einsum("kij,kij->k", F, F)
    if de == dv and free.all():
        det2 = np.linalg.det(F) ** 2
    else:
        G = np.matmul((F * free[:, None, :]).transpose(0, 2, 1), F * free[:, None, :])
        G[:, np.arange(dv), np.arange(dv)] += np.where(free, 0.0, norm2[:, None])
        det2 = np.linalg.det(G)
    n_free = free.sum(axis=1)
    return (n_free > 0) & (n_free <= de) & (norm2 > 0) & (det2 > _CONDITION ** 2 * norm2 ** dv)


def _undetermined(S, free: np.ndarray) -> np.ndarray:
    """The free coordinates of the vertices that propagation from the boundary does not determine.

    A vertex is *determined* when every relative section vanishes on it: vertices with no free coordinate
    are, and so is ``v`` when an edge joins it to a determined ``u`` and the edge's map at ``v`` is injective
    on the free coordinates of ``v`` (``F_v x_v = F_u x_u = 0`` forces ``x_v = 0``). Relative sections vanish
    on determined vertices, so ``H⁰(G, U; F)`` is decided on the other coordinates alone (all of them
    determined: the extension is unique, exactly). Stacked edges are checked batched.
    """
    dims, off = S._dim_array(), S._vertex_offsets()
    n_v = dims.size
    is_free = np.zeros(S.C0, dtype=bool)
    is_free[free] = True
    owner = np.repeat(np.arange(n_v), dims)
    coords = lambda w, d: is_free[off[w][:, None] + np.arange(d)]  # (k, d): free coordinates of the vertices w
    pos = S._vertex_index()
    arcs = []  # (from, to): a determined `from` determines `to`
    for seg in S._segments:
        if isinstance(seg, dict):
            u = np.fromiter((pos[e.u] for e in seg.values()), dtype=np.int64, count=len(seg))
            v = np.fromiter((pos[e.v] for e in seg.values()), dtype=np.int64, count=len(seg))
            into = [np.array([_injective(_dense(F)[None], coords(w[None], F.d_in))[0]
                              for F, w in zip(maps, ends)], dtype=bool).reshape(-1)
                    for maps, ends in (([e.Fu for e in seg.values()], u), ([e.Fv for e in seg.values()], v))]
            into_u, into_v = into
        else:
            u, v = seg.index[0].cpu().numpy(), seg.index[1].cpu().numpy()
            Fu, Fv = _dense(seg.Fu, stacked=True), _dense(seg.Fv, stacked=True)
            into_u, into_v = _injective(Fu, coords(u, Fu.shape[2])), _injective(Fv, coords(v, Fv.shape[2]))
        step = u != v
        arcs += [(u[into_v & step], v[into_v & step]), (v[into_u & step], u[into_u & step])]
    root = np.flatnonzero(np.bincount(owner[free], minlength=n_v) == 0)  # no free coordinate: determined
    src = np.concatenate([a for a, _ in arcs] + [np.full(root.size, n_v)])
    dst = np.concatenate([b for _, b in arcs] + [root])
    G = sp.csr_matrix((np.ones(src.size, dtype=np.int8), (src, dst)), shape=(n_v + 1, n_v + 1))
    reached = np.zeros(n_v + 1, dtype=bool)
    reached[csgraph.breadth_first_order(G, n_v, directed=True, return_predecessors=False)] = True
    return free[~reached[owner[free]]]


def _dense(F, stacked: bool = False) -> np.ndarray:
    """A map (`Map`) or a stack of maps (``(E, de, dv)`` or diagonal ``(E, d)`` tensors) as float64 numpy."""
    if not stacked:
        return F.matrix().detach().to_dense().double().cpu().numpy()
    A = F.detach().double().cpu().numpy()
    if A.ndim == 2:  # diagonal maps
        D = np.zeros(A.shape + A.shape[1:])
        D[:, np.arange(A.shape[1]), np.arange(A.shape[1])] = A
        return D
    return A
