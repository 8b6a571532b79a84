"""Topology helpers on a sheaf's cochains: the Laplacian of 1-cochains, the Hodge decomposition of a
1-cochain, cohomology of a pair (graph, subgraph), sheaf morphisms and the pushforward along a graph map.

On a graph the cochain complex is ``0 -> C⁰ -δ-> C¹ -> 0``. With the edge weights ``W`` as the inner
product on ``C¹``, the adjoint of ``δ`` is ``δ* = δᵀW`` and ``C¹ = im δ ⊕ ker δ*`` (W-orthogonal): every
1-cochain is a coboundary plus a harmonic part, and the harmonic 1-cochains represent ``H¹``
(``dim ker δ* = h1``). There are no 2-cells, so nothing else appears.

Examples
--------
>>> import torch, networkx as nx, cellsheaf as cs
>>> G = nx.cycle_graph(3)
>>> S = cs.constant_sheaf(G, 1)
>>> flow = torch.tensor([1.0 if v == (u + 1) % 3 else -1.0 for u, v in G.edges], dtype=torch.float64)
>>> torch.allclose(cs.hodge_decomposition(S, flow).harmonic, flow)   # around the cycle: no coboundary part
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Hashable, Iterable, Mapping, NamedTuple

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from torch import Tensor

from .cohomology import _Decided, _check, _exact, _owners, _tensor, _EPS64
from .operators import _export, coboundary, edge_weights
from .rank import NullSpaces, RankDecision, decide

__all__ = ["edge_laplacian", "HodgeDecomposition", "hodge_decomposition", "PairCohomology", "pair_cohomology",
           "SheafMorphism", "pushforward"]

_DENSE_LSTSQ = 4000  # coboundaries with at most this many columns are solved by a dense least-squares


def edge_laplacian(S, format: str = "torch", dtype: torch.dtype | None = None):
    """The Laplacian of 1-cochains ``W^{1/2} δ δᵀ W^{1/2}`` (the weighted ``δδ*``), shape ``(C1, C1)``.

    It couples two edges through the vertices they share (the "up-Laplacian" of the edges when the
    graph is read with its edges as the cells of interest); its nonzero spectrum equals that of
    ``L = δᵀWδ`` and its kernel has dimension ``h1``.

    Parameters
    ----------
    format : {"torch", "scipy", "dense"}
    dtype : torch dtype, optional (default: the sheaf's)

    Examples
    --------
    >>> import networkx as nx, cellsheaf as cs
    >>> S = cs.constant_sheaf(nx.path_graph(3), 1)
    >>> cs.edge_laplacian(S, format="dense").tolist()
    [[2.0, -1.0], [-1.0, 2.0]]
    """
    D = coboundary(S, format="scipy", dtype=torch.float64)
    r = sp.diags(np.sqrt(edge_weights(S, torch.float64).detach().cpu().numpy()))
    return _export((r @ D @ D.T @ r).tocsr(), format, dtype or S.dtype)


class HodgeDecomposition(NamedTuple):
    """``y = exact + harmonic`` with ``exact = δ potential`` and ``δᵀW harmonic = 0``."""

    exact: Tensor
    harmonic: Tensor
    potential: Tensor


def hodge_decomposition(S, y) -> HodgeDecomposition:
    """Split a 1-cochain ``y`` (``(C1,)`` or ``(B, C1)``) into its coboundary and harmonic parts.

    ``exact = δx`` is the W-orthogonal projection of ``y`` onto ``im δ`` (``x`` the minimum-norm
    potential, a least-squares solution of ``W^{1/2} δ x = W^{1/2} y``) and ``harmonic = y − exact``
    lies in ``ker δᵀW``, which represents ``H¹``. Dense least squares up to 4000 vertex coordinates,
    LSQR beyond.

    Examples
    --------
    >>> import torch, networkx as nx, cellsheaf as cs
    >>> S = cs.constant_sheaf(nx.path_graph(3), 1)
    >>> parts = cs.hodge_decomposition(S, torch.tensor([1.0, 2.0], dtype=torch.float64))
    >>> bool(parts.harmonic.abs().max() < 1e-12), parts.exact.round(decimals=12).tolist()  # no H¹ on a path
    (True, [1.0, 2.0])
    """
    y = torch.as_tensor(y)
    if y.dim() not in (1, 2) or y.shape[-1] != S.C1:
        raise ValueError(f"a 1-cochain of this sheaf has shape (C1,) or (B, C1) with C1={S.C1}, got {tuple(y.shape)}")
    dtype = y.dtype if y.is_floating_point() else S.dtype
    Y = y.detach().reshape(y.shape[0] if y.dim() == 2 else 1, S.C1).double().cpu().numpy()
    D = coboundary(S, format="scipy", dtype=torch.float64)
    r = np.sqrt(edge_weights(S, torch.float64).detach().cpu().numpy())
    A, Yw = sp.diags(r) @ D, Y * r
    if S.C0 <= _DENSE_LSTSQ:
        X = np.linalg.lstsq(A.toarray(), Yw.T, rcond=None)[0].T if S.C0 else np.zeros((Y.shape[0], 0))
    else:
        X = np.stack([spla.lsqr(A, b, atol=1e-14, btol=1e-14, iter_lim=20 * S.C0)[0] for b in Yw])
    E = (D @ X.T).T
    out = lambda M: torch.as_tensor(M).to(dtype).reshape(*y.shape[:-1], M.shape[-1])
    return HodgeDecomposition(out(E), out(Y - E), out(X))


# ---------------------------------------------------------------------------- pairs (G, A)


@dataclass(frozen=True)
class PairCohomology(_Decided):
    """Cohomology ``H⁰(G, A; F)``, ``H¹(G, A; F)`` of a graph relative to a subgraph ``A``.

    The relative cochains are those vanishing on the cells of ``A``; the relative coboundary is ``δ``
    restricted to the edges and vertices outside ``A``.

    Attributes
    ----------
    h0, h1 : dimensions of ``H⁰(G, A; F)`` and ``H¹(G, A; F)``.
    H0 : ``(C0, h0)`` orthonormal basis, zero on the stalks of ``A``'s vertices.
    H1 : ``(C1, h1)`` orthonormal basis of ``ker δ_relᵀ``, zero on ``A``'s edges (``None`` when not computed).
    decision : the `RankDecision` on the relative coboundary.
    """

    h0: int
    h1: int
    decision: RankDecision
    _spaces: NullSpaces = field(repr=False, compare=False)
    _rows: np.ndarray = field(repr=False, compare=False)
    _cols: np.ndarray = field(repr=False, compare=False)
    _shape: tuple = field(repr=False, compare=False)
    _dtype: torch.dtype = field(repr=False, compare=False)

    @cached_property
    def H0(self) -> Tensor:
        """Orthonormal ``(C0, h0)`` basis of the relative global sections."""
        return _tensor(_embed(self._spaces.right(), self._cols, self._shape[1]), self._dtype)

    @cached_property
    def H1(self) -> Tensor | None:
        """Orthonormal ``(C1, h1)`` basis of the relative ``ker δᵀ`` (or ``None``)."""
        L = self._spaces.left()
        return None if L is None else _tensor(_embed(L, self._rows, self._shape[0]), self._dtype)


def _embed(B: np.ndarray, idx: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, B.shape[1]))
    out[idx] = B
    return out


def pair_cohomology(S, vertices: Iterable[Hashable], edges: Iterable[Hashable] | None = None,
                    tol: float | None = None, exact: bool = False, method: str = "auto",
                    k: int | None = None) -> PairCohomology:
    """Relative cohomology of ``S`` on the pair ``(G, A)`` for the subgraph ``A = (vertices, edges)``.

    Parameters
    ----------
    vertices
        The vertices of ``A``.
    edges
        The edges of ``A`` (each with both endpoints in ``vertices``); default: every edge of ``G``
        between two vertices of ``A`` (the induced subgraph).
    tol, exact, method, k
        As in [`cellsheaf.cohomology`][cellsheaf.cohomology.cohomology].

    Examples
    --------
    >>> import networkx as nx, cellsheaf as cs
    >>> S = cs.constant_sheaf(nx.path_graph(4), 1)
    >>> P = cs.pair_cohomology(S, [0, 3])     # a path relative to its ends is a circle
    >>> P.h0, P.h1
    (0, 1)
    """
    k = _check(tol, exact, method, k)
    vset = list(dict.fromkeys(vertices))
    for v in vset:
        S._check_vertex(v)
    inside = set(vset)
    if edges is None:
        eset = [e.name for e in S.edge_items() if e.u in inside and e.v in inside]
    else:
        eset = list(dict.fromkeys(edges))
        for name in eset:
            e = S.edge(name)
            outside = [w for w in (e.u, e.v) if w not in inside]
            if outside:
                raise ValueError(f"edge {name!r} of the subgraph has endpoint {outside[0]!r} outside its vertices; "
                                 "a subgraph contains the endpoints of its edges")
    row_owner, col_owner = _owners(S)
    vpos = np.array([S._vertex_index()[v] for v in vset], dtype=np.int64)
    epos = np.array([S._edge_position(e) for e in eset], dtype=np.int64)
    cols = np.flatnonzero(~np.isin(col_owner, vpos))
    rows = np.flatnonzero(~np.isin(row_owner, epos))
    D = coboundary(S, format="scipy", dtype=torch.float64)[rows][:, cols].tocsr()
    if exact:
        spaces = _exact(D)
    else:
        eps = float(torch.finfo(S.dtype).eps) if S.dtype.is_floating_point else _EPS64
        spaces = decide(D, row_owner[rows], col_owner[cols], eps=max(eps, _EPS64), tol=tol, method=method, k=k)
    r = spaces.decision.rank
    return PairCohomology(h0=cols.size - r, h1=rows.size - r, decision=spaces.decision, _spaces=spaces,
                          _rows=rows, _cols=cols, _shape=(S.C1, S.C0), _dtype=S.dtype)


# ---------------------------------------------------------------------------- morphisms


class SheafMorphism:
    """A morphism ``φ: F -> G`` of sheaves on the same graph: maps on every vertex and edge stalk that
    commute with the restriction maps, ``G_{v◁e} φ_v = φ_e F_{v◁e}`` (checked).

    ``vertex_maps[v]`` is ``(dim G(v), dim F(v))`` and ``edge_maps[e]`` is ``(dim G(e), dim F(e))``; both
    sheaves need the same vertices and edges (same names, same endpoints) and linear maps. It induces
    cochain maps ``φ⁰``, ``φ¹`` with ``δ_G φ⁰ = φ¹ δ_F``, hence maps on ``H⁰`` (``on_h0``).

    Examples
    --------
    >>> import torch, networkx as nx, cellsheaf as cs
    >>> F, G = cs.constant_sheaf(nx.path_graph(3), 1), cs.constant_sheaf(nx.path_graph(3), 2)
    >>> diag = torch.tensor([[1.0], [2.0]], dtype=torch.float64)     # R -> R², x -> (x, 2x)
    >>> phi = cs.SheafMorphism(F, G, {v: diag for v in F.vertices}, {e: diag for e in F.edges})
    >>> phi.on_vertices(torch.ones(3, dtype=torch.float64))
    tensor([1., 2., 1., 2., 1., 2.], dtype=torch.float64)
    """

    def __init__(self, source, target, vertex_maps: Mapping[Hashable, Tensor], edge_maps: Mapping[Hashable, Tensor],
                 atol: float = 1e-10):
        if not (source.linear and target.linear):
            raise ValueError("sheaf morphisms need linear restriction maps on both sheaves")
        if source.vertices != target.vertices:
            raise ValueError("source and target must have the same vertices (in the same order)")
        if source.edges != target.edges:
            raise ValueError("source and target must have the same edges (in the same order)")
        self.source, self.target = source, target
        self._v = {v: self._checked(vertex_maps, v, target.dim(v), source.dim(v), "vertex") for v in source.vertices}
        self._e = {}
        for ef in source.edge_items():
            eg = target.edge(ef.name)
            if (ef.u, ef.v) != (eg.u, eg.v):
                raise ValueError(f"edge {ef.name!r} joins {ef.u!r} -> {ef.v!r} in the source but {eg.u!r} -> {eg.v!r} "
                                 "in the target")
            self._e[ef.name] = phi_e = self._checked(edge_maps, ef.name, eg.dim, ef.dim, "edge")
            for side, w, Mf, Mg in (("u", ef.u, ef.Fu, eg.Fu), ("v", ef.v, ef.Fv, eg.Fv)):
                gap = Mg.matrix().double() @ self._v[w] - phi_e @ Mf.matrix().double()
                scale = 1.0 + sum(float(M.abs().max()) for M in (phi_e, self._v[w]) if M.numel())
                if gap.numel() and float(gap.abs().max()) > atol * scale:
                    raise ValueError(f"the maps do not commute on edge {ef.name!r} at its {side}-end {w!r}: "
                                     f"|G φ_{w} − φ_e F| = {float(gap.abs().max()):.3g}")

    @staticmethod
    def _checked(maps: Mapping, key, rows: int, cols: int, what: str) -> Tensor:
        if key not in maps:
            raise KeyError(f"no map for {what} {key!r}")
        M = torch.as_tensor(maps[key]).to(torch.float64)
        if tuple(M.shape) != (rows, cols):
            raise ValueError(f"the map on {what} {key!r} has shape {tuple(M.shape)}, expected ({rows}, {cols})")
        if not bool(torch.isfinite(M).all()):
            raise ValueError(f"the map on {what} {key!r} has NaN or Inf entries")
        return M

    def matrix(self, degree: int = 0) -> Tensor:
        """The cochain map ``φ⁰`` (``(C0_G, C0_F)``) or ``φ¹`` (``(C1_G, C1_F)``), block diagonal, dense float64."""
        blocks = list(self._v.values()) if degree == 0 else list(self._e.values())
        if degree not in (0, 1):
            raise ValueError(f"degree must be 0 or 1, got {degree!r}")
        return torch.block_diag(*blocks) if blocks else torch.zeros(0, 0, dtype=torch.float64)

    def on_vertices(self, x) -> Tensor:
        """``φ⁰ x`` for a 0-cochain of the source (``(C0,)`` or ``(B, C0)``)."""
        return torch.as_tensor(x).to(torch.float64) @ self.matrix(0).T

    def on_edges(self, y) -> Tensor:
        """``φ¹ y`` for a 1-cochain of the source."""
        return torch.as_tensor(y).to(torch.float64) @ self.matrix(1).T

    def on_h0(self) -> Tensor:
        """The induced map ``H⁰(F) -> H⁰(G)`` in the orthonormal bases of [`cellsheaf.cohomology`][cellsheaf.cohomology.cohomology]: ``H0_Gᵀ φ⁰ H0_F``."""
        HF, HG = self.source.cohomology().H0.double(), self.target.cohomology().H0.double()
        return HG.T @ self.matrix(0) @ HF


# ---------------------------------------------------------------------------- pushforward


def pushforward(S, vertex_map: Mapping[Hashable, Hashable], edge_map: Mapping[Hashable, Hashable | None] | None = None):
    """The pushforward ``f_*F`` of a linear sheaf along a graph map ``f: G -> H``.

    ``vertex_map`` sends every vertex of ``G`` to a vertex of ``H``; ``edge_map`` sends every edge to an
    edge of ``H`` (whose ends are the images of its ends, in either orientation) or to ``None`` when it
    collapses to a vertex (both ends with one image). Default: an edge whose ends have one image collapses,
    every other edge keeps its name. Stalks are sections over preimages of open stars:
    ``f_*F(w) = H⁰(f⁻¹(w); F)`` (the sections over the vertices sent to ``w`` and the edges collapsed or
    looped onto it) and ``f_*F(ε) = ⊕_{e ↦ ε} F(e)``; a restriction map evaluates a section on the
    edges over ``ε``. Global sections are preserved: ``H⁰(H; f_*F) ≅ H⁰(G; F)``. Fibres are solved
    densely (meant for quotients with small fibres).

    Examples
    --------
    >>> import networkx as nx, cellsheaf as cs
    >>> S = cs.constant_sheaf(nx.path_graph(4), 2)
    >>> P = cs.pushforward(S, {0: "a", 1: "a", 2: "b", 3: "b"})    # collapse two edges of the path
    >>> P.vertices, P.edges, P.cohomology().h0 == S.cohomology().h0
    (['a', 'b'], [1], True)
    """
    from .sheaf import Sheaf

    if not S.linear:
        raise ValueError("pushforward needs linear restriction maps")
    for v in S.vertices:
        if v not in vertex_map:
            raise KeyError(f"vertex_map has no image for vertex {v!r}")
    f = vertex_map
    edges = list(S.edge_items())
    if edge_map is None:
        edge_map = {e.name: (None if f[e.u] == f[e.v] else e.name) for e in edges}
    targets: dict = {}  # target edge -> (tail, head) of H
    for e in edges:
        if e.name not in edge_map:
            raise KeyError(f"edge_map has no image for edge {e.name!r}")
        eps = edge_map[e.name]
        if eps is None:
            if f[e.u] != f[e.v]:
                raise ValueError(f"edge {e.name!r} collapses, but its ends go to {f[e.u]!r} and {f[e.v]!r}")
            continue
        ends = targets.setdefault(eps, (f[e.u], f[e.v]))
        if {f[e.u], f[e.v]} != set(ends):
            raise ValueError(f"edge {e.name!r} goes to {eps!r}, whose ends are {ends}, but its own ends go to "
                             f"{(f[e.u], f[e.v])}")
    H_vertices = list(dict.fromkeys(f[v] for v in S.vertices))
    fibre = {w: [v for v in S.vertices if f[v] == w] for w in H_vertices}
    inner = {w: [e for e in edges if f[e.u] == w and f[e.v] == w] for w in H_vertices}
    sections, offset, noise = {}, {}, {}
    for w in H_vertices:  # sections over the fibre: a basis, and where each vertex sits in it
        vs = fibre[w]
        offset[w] = dict(zip(vs, np.cumsum([0] + [S.dim(v) for v in vs])[:-1].tolist()))
        n = sum(S.dim(v) for v in vs)
        rows = []
        for e in inner[w]:
            C = np.zeros((e.dim, n))
            C[:, offset[w][e.u]:offset[w][e.u] + S.dim(e.u)] -= e.Fu.matrix().double().numpy()
            C[:, offset[w][e.v]:offset[w][e.v] + S.dim(e.v)] += e.Fv.matrix().double().numpy()
            rows.append(C)
        sections[w], noise[w] = _fibre_sections(np.vstack(rows) if rows else np.zeros((0, n)))
    P = Sheaf()
    for w in H_vertices:
        P.add_vertex(w, sections[w].shape[1])
    for eps, (a, b) in targets.items():
        over = [e for e in edges if edge_map[e.name] == eps]
        blocks = {a: [], b: []}
        for e in over:
            tail_side = (e.u, e.Fu) if f[e.u] == a else (e.v, e.Fv)  # the end of e over ε's tail
            head_side = (e.v, e.Fv) if tail_side[0] is e.u else (e.u, e.Fu)
            for end, (v, F) in ((a, tail_side), (b, head_side)):
                at = offset[end][v]
                blocks[end].append(_on_sections(F.matrix().double().numpy(), sections[end][at:at + S.dim(v)],
                                                 noise[end]))
        P.add_edge(a, b, torch.as_tensor(np.vstack(blocks[a])), torch.as_tensor(np.vstack(blocks[b])), name=eps)
    return P


def _fibre_sections(C: np.ndarray) -> tuple[np.ndarray, float]:
    """An orthonormal basis of ``ker C`` (the sections over a fibre) and its relative accuracy.

    The basis from an SVD of ``C`` is off the true kernel by an angle of about ``eps·‖C‖ / σ₊`` (``σ₊`` the
    smallest singular value kept), plus ``eps`` for the basis itself (Wedin's theorem).
    """
    n = C.shape[1]
    if C.shape[0] == 0:
        return np.eye(n), 0.0
    _, s, Vt = np.linalg.svd(C, full_matrices=True)
    r = int((s > max(C.shape) * _EPS64 * s[0]).sum()) if s.size else 0
    return Vt[r:].T.copy(), _EPS64 * (1.0 + (s[0] / s[r - 1] if r else 0.0))


def _on_sections(F: np.ndarray, basis: np.ndarray, accuracy: float) -> np.ndarray:
    """``F @ basis`` with the directions at rounding level set to zero.

    A map evaluated on sections it annihilates comes out at ``‖F‖ · accuracy``, not zero, and nothing
    downstream can tell such a map from a small genuine one. Singular values of ``F @ basis`` at most
    ``32 · max(shape) · accuracy · ‖F‖₂`` (the rounding of the basis and of the product) are dropped.
    """
    B = F @ basis
    if B.size == 0:
        return B
    U, s, Vt = np.linalg.svd(B, full_matrices=False)
    floor = 32.0 * max(F.shape + basis.shape) * accuracy * np.linalg.norm(F, 2)
    keep = s > floor
    if keep.all():
        return B
    return (U[:, keep] * s[keep]) @ Vt[keep]
