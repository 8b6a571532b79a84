"""Coboundary, Laplacian and their restricted blocks, assembled or matrix-free.

Matrix-free actions group the edges whose two maps are small dense linear maps
of equal shape: their matrices are stacked once and applied with one batched
matmul and one ``index_add`` per group, so a sheaf with 10⁵ vertices runs no
Python loop per edge. Other edges (large, structured or nonlinear maps) are
applied one by one through their map objects.

Nonlinear maps are handled throughout: `apply_coboundary` is the
nonlinear discrepancy ``F_v(x_v) − F_u(x_u)``; adjoints and assembled
matrices take a point ``at`` and use the Jacobians there.

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
>>> _ = S.add_edge("a", "b", torch.eye(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64))
>>> cs.operators.apply_laplacian(S, torch.tensor([1.0, 0.0], dtype=torch.float64))
tensor([ 1., -1.], dtype=torch.float64)
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Hashable, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from .boundary import Boundary, ResolvedBoundary
from .cochain import as_flat

__all__ = [
    "apply_coboundary", "apply_coboundary_jvp", "apply_coboundary_adjoint", "apply_laplacian",
    "expressed", "pullback", "edge_weights", "coboundary", "laplacian", "restricted_laplacian",
    "to_torch_sparse",
]

_GROUP_MAX = 1024  # edges whose d_e * (d_u + d_v) is at most this are stacked into groups


class _Group:
    """Edges with small dense linear maps of one shape ``(d_u, d_v, d_e)``."""

    def __init__(self, edges, voff, eoff):
        self.edges = edges
        du, dv, de = edges[0].Fu.d_in, edges[0].Fv.d_in, edges[0].dim
        self.uidx = torch.tensor([voff[e.u] for e in edges]).unsqueeze(1) + torch.arange(du)
        self.vidx = torch.tensor([voff[e.v] for e in edges]).unsqueeze(1) + torch.arange(dv)
        self.eidx = torch.tensor([eoff[e.name] for e in edges]).unsqueeze(1) + torch.arange(de)
        self.uvidx = torch.cat([self.uidx, self.vidx], 1).flatten()  # both ends' coordinates, edge by edge
        self._mats: dict = {}

    def matrices(self, dtype, device) -> tuple[Tensor, Tensor]:
        """Stacked ``(G, d_e, d_u)`` and ``(G, d_e, d_v)`` matrices (cached unless they need grad)."""
        key = (dtype, device)
        if key in self._mats:
            return self._mats[key]
        tensors = [t for e in self.edges for t in e.Fu.tensors() + e.Fv.tensors()]
        Mu = torch.stack([e.Fu.matrix() for e in self.edges]).to(dtype=dtype, device=device)
        Mv = torch.stack([e.Fv.matrix() for e in self.edges]).to(dtype=dtype, device=device)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            self._mats[key] = (Mu, Mv)
        return Mu, Mv

    def local_laplacians(self, dtype, device) -> Tensor:
        """Per-edge blocks ``w_e Mᵀ M`` with ``M = [−F_u  F_v]``, shape ``(G, d_u+d_v, d_u+d_v)``.

        ``L = Σ_e P_eᵀ (w_e Mᵀ M) P_e`` where ``P_e`` picks the coordinates of both ends
        (`uvidx`). Cached like `matrices`.
        """
        key = ("local", dtype, device)
        if key in self._mats:
            return self._mats[key]
        Mu, Mv = self.matrices(dtype, device)
        M = torch.cat([-Mu, Mv], 2)
        w = torch.tensor([e.weight for e in self.edges], dtype=dtype, device=device).view(-1, 1, 1)
        K = (M.transpose(1, 2) @ (w * M)).contiguous()
        if (dtype, device) in self._mats:  # the maps were cacheable
            self._mats[key] = K
        return K


class _Plan:
    """Index structure of a sheaf for matrix-free actions; rebuilt when the sheaf changes."""

    def __init__(self, S):
        _, voff, eoff, _ = S._offsets()
        buckets: dict[tuple, list] = defaultdict(list)
        self.singles = []
        for e in S.edge_items():
            Fu, Fv = e.Fu, e.Fv
            small = e.dim * (Fu.d_in + Fv.d_in) <= _GROUP_MAX
            dense = not getattr(Fu, "sparse", False) and not getattr(Fv, "sparse", False)
            if Fu.linear and Fv.linear and small and dense:
                buckets[(Fu.d_in, Fv.d_in, e.dim)].append(e)
            else:
                self.singles.append((e, S.vertex_slice(e.u), S.vertex_slice(e.v), S.edge_slice(e.name)))
        self.groups = [_Group(edges, voff, eoff) for edges in buckets.values()]
        self.C0, self.C1 = S.C0, S.C1
        self._aranges: dict[tuple[int, int], Tensor] = {}

    def index(self, sl: slice) -> Tensor:
        """``arange(sl.start, sl.stop)``, cached."""
        key = (sl.start, sl.stop)
        if key not in self._aranges:
            self._aranges[key] = torch.arange(sl.start, sl.stop)
        return self._aranges[key]


def _bmm(A: Tensor, X: Tensor) -> Tensor:
    """Batched ``A @ X`` for many tiny blocks; ``einsum`` picks a batched-GEMM layout about 3x
    faster than ``torch.bmm`` for float64 blocks of a few rows (as fast for float32)."""
    return torch.einsum("gij,gjb->gib", A, X)


def _plan(S) -> _Plan:
    plan = S._cache.get("plan")
    if plan is None:
        plan = S._cache["plan"] = _Plan(S)
    return plan


def _batch(S, x) -> tuple[Tensor, bool]:
    x = as_flat(S, x)
    if not x.is_floating_point():
        x = x.to(S.dtype)
    return (x, False) if x.dim() == 2 else (x.unsqueeze(0), True)


def _scatter(n: int, pieces: list[tuple[Tensor, Tensor]], like: Tensor) -> Tensor:
    """Sum ``(index, values (k, B))`` pieces into an ``(n, B)`` tensor with one ``index_add``."""
    out = like.new_zeros(n, like.shape[0])
    if not pieces:
        return out
    idx = torch.cat([i for i, _ in pieces]).to(like.device)
    return out.index_add(0, idx, torch.cat([v for _, v in pieces]))


def expressed(S, x) -> tuple[Tensor, Tensor]:
    """The values each edge receives from its two ends: ``(a_v, a_u)`` with ``a_v = F_v(x_v)``,
    ``a_u = F_u(x_u)``, each of shape ``(..., C1)``.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", 2 * torch.eye(1), torch.eye(1))
    >>> cs.operators.expressed(S, torch.tensor([1.0, 5.0]))
    (tensor([5.]), tensor([2.]))
    """
    xb, squeeze = _batch(S, x)
    plan, B, xt = _plan(S), xb.shape[0], xb.T.contiguous()
    pv, pu = [], []
    for g in plan.groups:
        Mu, Mv = g.matrices(xb.dtype, xb.device)
        pu.append((g.eidx.flatten(), _bmm(Mu, xt[g.uidx]).reshape(-1, B)))
        pv.append((g.eidx.flatten(), _bmm(Mv, xt[g.vidx]).reshape(-1, B)))
    for e, su, sv, se in plan.singles:
        ie = plan.index(se)
        pu.append((ie, e.Fu.apply(xb[:, su]).T))
        pv.append((ie, e.Fv.apply(xb[:, sv]).T))
    av, au = _scatter(plan.C1, pv, xb).T, _scatter(plan.C1, pu, xb).T
    return (av[0], au[0]) if squeeze else (av, au)


def apply_coboundary(S, x) -> Tensor:
    """``δx``: the discrepancy ``F_v(x_v) − F_u(x_u)`` on every edge, ``(..., C1)``.

    For linear maps this is the coboundary; for nonlinear maps it is the
    nonlinear discrepancy of Sec. 4.2.
    """
    av, au = expressed(S, x)
    return av - au


def apply_coboundary_jvp(S, at, v) -> Tensor:
    """``J_δ(at) v``: the coboundary linearised at ``at`` applied to ``v`` (``(..., C1)``)."""
    plan = _plan(S)
    if all(e.Fu.linear and e.Fv.linear for e, *_ in plan.singles):
        return apply_coboundary(S, v)
    vb, squeeze = _batch(S, v)
    ab = _batch(S, at)[0].to(vb.dtype).expand_as(vb)
    B, vt = vb.shape[0], vb.T.contiguous()
    pieces = []
    for g in plan.groups:
        Mu, Mv = g.matrices(vb.dtype, vb.device)
        pieces.append((g.eidx.flatten(), (_bmm(Mv, vt[g.vidx]) - _bmm(Mu, vt[g.uidx])).reshape(-1, B)))
    for e, su, sv, se in plan.singles:
        pieces.append((plan.index(se), (e.Fv.jvp(ab[:, sv], vb[:, sv]) - e.Fu.jvp(ab[:, su], vb[:, su])).T))
    out = _scatter(plan.C1, pieces, vb).T
    return out[0] if squeeze else out


def pullback(S, gv: Tensor, gu: Tensor, at=None) -> Tensor:
    """``Σ_e F_v'(x_v)ᵀ gv_e + F_u'(x_u)ᵀ gu_e`` scattered to the vertices, ``(..., C0)``.

    ``gv``/``gu`` are 1-cochains ``(..., C1)`` of forces on the two ends of each
    edge; ``at`` is the point of the Jacobians (needed only for nonlinear maps).
    """
    squeeze = gv.dim() == 1
    gvb, gub = (gv.unsqueeze(0), gu.unsqueeze(0)) if squeeze else (gv, gu)
    plan, B = _plan(S), gvb.shape[0]
    nonlinear = [e for e, *_ in plan.singles if not (e.Fu.linear and e.Fv.linear)]
    if nonlinear and at is None:
        raise ValueError(f"edge {nonlinear[0].name!r} has a nonlinear map: pass at= (the point of the Jacobian)")
    ab = _batch(S, at)[0].to(gvb.dtype).expand(B, -1) if nonlinear else None
    gvt, gut = gvb.T.contiguous(), gub.T.contiguous()
    pieces = []
    for g in plan.groups:
        Mu, Mv = g.matrices(gvb.dtype, gvb.device)
        pieces.append((g.uidx.flatten(), _bmm(Mu.transpose(1, 2), gut[g.eidx]).reshape(-1, B)))
        pieces.append((g.vidx.flatten(), _bmm(Mv.transpose(1, 2), gvt[g.eidx]).reshape(-1, B)))
    for e, su, sv, se in plan.singles:
        cu = e.Fu.adjoint(gub[:, se]) if e.Fu.linear else e.Fu.vjp(ab[:, su], gub[:, se])
        cv = e.Fv.adjoint(gvb[:, se]) if e.Fv.linear else e.Fv.vjp(ab[:, sv], gvb[:, se])
        pieces += [(plan.index(su), cu.T), (plan.index(sv), cv.T)]
    out = _scatter(plan.C0, pieces, gvb).T
    return out[0] if squeeze else out


def apply_coboundary_adjoint(S, y: Tensor, at=None) -> Tensor:
    """``δᵀy`` (``J_δ(at)ᵀ y`` for nonlinear maps), ``(..., C0)``."""
    return pullback(S, y, -y, at)


def edge_weights(S, dtype=None, device=None) -> Tensor:
    """Per-coordinate edge weights ``(C1,)``: each edge's weight repeated over its stalk."""
    key = ("weights", dtype, device)
    if key not in S._cache:
        edges = list(S.edge_items())
        w = torch.tensor([e.weight for e in edges], dtype=torch.float64)
        dims = torch.tensor([e.dim for e in edges], dtype=torch.long)
        S._cache[key] = torch.repeat_interleave(w, dims).to(dtype=dtype or S.dtype, device=device)
    return S._cache[key]


def apply_laplacian(S, x, at=None) -> Tensor:
    """``L x = δᵀ W δ x`` matrix-free (at the Jacobians of ``at`` for nonlinear maps).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.eye(1), torch.eye(1))
    >>> cs.operators.apply_laplacian(S, torch.tensor([[1.0, 0.0]]))
    tensor([[ 1., -1.]])
    """
    xf = as_flat(S, x)
    plan = _plan(S)
    if plan.groups and not plan.singles:
        return _grouped_laplacian(plan, xf)
    r = apply_coboundary_jvp(S, at, xf) if at is not None else apply_coboundary(S, xf)
    return apply_coboundary_adjoint(S, r * edge_weights(S, r.dtype, r.device), at=at)


_CHUNK = 1 << 21  # elements of the gathered block per step of _grouped_laplacian (about 2x faster than
#                   one step over 10⁵ edges, whose temporaries fall out of cache)


def _grouped_laplacian(plan: _Plan, x: Tensor) -> Tensor:
    """``L x`` when every edge is in a group: per chunk of a group one gather of both ends'
    coordinates, one batched matmul with the local blocks ``w_e Mᵀ M`` and one ``index_add``,
    on a contiguous ``(C0, B)`` layout (the two-pass δ then δᵀ costs about twice as much)."""
    squeeze = x.dim() == 1
    xt = (x.unsqueeze(1) if squeeze else x.T).contiguous()
    out = xt.new_zeros(xt.shape)
    B = xt.shape[1]
    for g in plan.groups:
        K = g.local_laplacians(xt.dtype, xt.device)
        idx = g.uvidx.to(xt.device)
        k = K.shape[2]
        step = max(1, _CHUNK // (k * B))
        for s in range(0, K.shape[0], step):
            i = idx[s * k:(s + step) * k]
            z = xt.index_select(0, i).view(-1, k, B)
            out.index_add_(0, i, _bmm(K[s:s + step], z).reshape(-1, B))
    return out[:, 0] if squeeze else out.T


# ---------------------------------------------------------------------------- assembled


def _coboundary_csr(S, at=None) -> sp.csr_matrix:
    key = "delta_csr"
    if at is None and key in S._cache:
        return S._cache[key]
    plan = _plan(S)
    atf = None if at is None else as_flat(S, at)
    if atf is not None and atf.dim() != 1:
        raise ValueError(f"assembled operators are linearised at one point of shape ({S.C0},)")
    rows, cols, vals = [], [], []
    for g in plan.groups:
        Mu, Mv = (M.detach().double().cpu().numpy() for M in g.matrices(torch.float64, torch.device("cpu")))
        for M, idx, sign in ((Mu, g.uidx, -1.0), (Mv, g.vidx, 1.0)):
            r = np.broadcast_to(g.eidx.numpy()[:, :, None], M.shape)
            c = np.broadcast_to(idx.numpy()[:, None, :], M.shape)
            keep = M != 0
            rows.append(r[keep]); cols.append(c[keep]); vals.append(sign * M[keep])
    for e, su, sv, se in plan.singles:
        for F, sl, sign in ((e.Fu, su, -1.0), (e.Fv, sv, 1.0)):
            if not F.linear:
                if atf is None:
                    raise ValueError(f"edge {e.name!r} has a nonlinear map: pass at= (a point of shape ({S.C0},))")
                F = F.linearize(atf[sl].detach())
            r, c, v = F.coo()
            rows.append(r + se.start); cols.append(c + sl.start); vals.append(sign * v)
    cat = (lambda a, dt: np.concatenate(a).astype(dt)) if rows else (lambda a, dt: np.zeros(0, dt))
    D = sp.csr_matrix((cat(vals, np.float64), (cat(rows, np.int64), cat(cols, np.int64))), shape=(S.C1, S.C0))
    if at is None:
        S._cache[key] = D
    return D


def to_torch_sparse(M: sp.spmatrix, dtype: torch.dtype = torch.float64, device=None,
                    layout: torch.layout = torch.sparse_coo) -> Tensor:
    """A scipy sparse matrix as a torch sparse tensor: coalesced COO, or CSR with ``layout=torch.sparse_csr``.

    CSR is the layout for repeated products with dense blocks (CG, Euler steps): on one CPU thread it
    multiplies 6-30x faster than COO from a few hundred rows up.

    Examples
    --------
    >>> import scipy.sparse as sp, torch
    >>> from cellsheaf.operators import to_torch_sparse
    >>> A = to_torch_sparse(sp.csr_matrix([[0.0, 2.0], [3.0, 0.0]]), layout=torch.sparse_csr)
    >>> A @ torch.ones(2, 1, dtype=torch.float64)
    tensor([[2.],
            [3.]], dtype=torch.float64)
    """
    if layout == torch.sparse_csr:
        csr = sp.csr_matrix(M)
        if not csr.has_canonical_format:  # sorted, no duplicates; on a copy, M may be a cached operator
            csr = csr.copy()
            csr.sum_duplicates()
        index = [torch.as_tensor(a.astype(np.int64)) for a in (csr.indptr, csr.indices)]
        with warnings.catch_warnings():  # torch calls its CSR support beta; products with dense blocks are solid
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
            return torch.sparse_csr_tensor(*index, torch.as_tensor(csr.data).to(dtype), csr.shape, device=device,
                                           check_invariants=False)
    if layout != torch.sparse_coo:
        raise ValueError(f"layout must be torch.sparse_coo or torch.sparse_csr, got {layout}")
    coo = M.tocoo()
    idx = torch.as_tensor(np.vstack([coo.row, coo.col]).astype(np.int64))
    vals = torch.as_tensor(coo.data).to(dtype)
    return torch.sparse_coo_tensor(idx, vals, coo.shape, device=device, check_invariants=False).coalesce()


def _export(M: sp.spmatrix, format: str, dtype, device=None):
    if format == "scipy":
        return M.tocsr()
    if format == "torch":
        return to_torch_sparse(M, dtype, device)
    if format == "dense":
        return torch.as_tensor(M.toarray()).to(dtype=dtype, device=device)
    raise ValueError(f"format must be 'torch', 'scipy' or 'dense', got {format!r}")


def coboundary(S, at=None, format: str = "torch", dtype: torch.dtype | None = None):
    """The coboundary matrix ``δ`` of shape ``(C1, C0)`` (unweighted).

    Parameters
    ----------
    at : cochain, optional
        Point of linearisation; required when some map is nonlinear.
    format : {"torch", "scipy", "dense"}
        Torch sparse COO, scipy CSR, or a dense torch tensor.
    dtype : torch dtype, optional
        Defaults to the sheaf's dtype.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.eye(1), torch.eye(1))
    >>> cs.operators.coboundary(S, format="dense")
    tensor([[-1.,  1.]])
    """
    return _export(_coboundary_csr(S, at), format, dtype or S.dtype)


def _laplacian_csr(S, at=None) -> sp.csr_matrix:
    if at is None and "L_csr" in S._cache:
        return S._cache["L_csr"]
    D = _coboundary_csr(S, at)
    w = edge_weights(S, torch.float64).cpu().numpy()
    L = (D.T @ sp.diags(w) @ D).tocsr()
    L.sort_indices()
    if at is None:
        S._cache["L_csr"] = L
    return L


def _normalize(S, L: sp.csr_matrix) -> sp.csr_matrix:
    """``D^{-1/2} L D^{-1/2}`` with ``D`` the vertex-block diagonal of ``L`` (pseudo-inverse root)."""
    blocks = []
    for v in S.vertices:
        sl = S.vertex_slice(v)
        Dv = L[sl, sl].toarray()
        lam, Q = np.linalg.eigh(Dv)
        tol = max(Dv.shape + (1,)) * np.finfo(float).eps * max(lam.max(initial=0.0), 1.0)
        inv = np.where(lam > tol, 1.0 / np.sqrt(np.where(lam > tol, lam, 1.0)), 0.0)
        blocks.append((Q * inv) @ Q.T)
    R = sp.block_diag(blocks, format="csr") if blocks else sp.csr_matrix((0, 0))
    return (R @ L @ R).tocsr()


def laplacian(S, at=None, normalized: bool = False, format: str = "torch", dtype: torch.dtype | None = None):
    """The weighted sheaf Laplacian ``L = δᵀ W δ`` of shape ``(C0, C0)``.

    With all weights 1 (the default) this is ``δᵀδ``. ``normalized=True`` gives
    ``D^{-1/2} L D^{-1/2}`` with ``D`` the block diagonal of ``L`` (Hansen & Ghrist).
    Arguments as in `coboundary`.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.eye(1), torch.eye(1))
    >>> cs.operators.laplacian(S, format="dense")
    tensor([[ 1., -1.],
            [-1.,  1.]])
    """
    L = _laplacian_csr(S, at)
    if normalized:
        L = _normalize(S, L)
    return _export(L, format, dtype or S.dtype)


def fixed_indices(S, boundary) -> Tensor:
    """Sorted flat indices of the fixed coordinates given by a boundary or an index list."""
    if isinstance(boundary, Boundary):
        return boundary.resolve(S).fixed
    if isinstance(boundary, ResolvedBoundary):
        return boundary.fixed
    idx = torch.as_tensor(list(boundary) if not isinstance(boundary, Tensor) else boundary, dtype=torch.long)
    if idx.numel() and (idx.min() < 0 or idx.max() >= S.C0):
        raise IndexError(f"fixed indices must lie in [0, {S.C0})")
    return torch.unique(idx)


def restricted_laplacian(S, boundary, at=None, format: str = "torch", dtype: torch.dtype | None = None):
    """The blocks ``(L[Ω,Ω], L[Ω,U])`` for the fixed coordinates ``U`` of ``boundary``.

    ``boundary`` is a `Boundary`, a resolved one, or a list of
    flat indices. Other arguments as in `laplacian`.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.eye(1), torch.eye(1))
    >>> LOO, LOU = cs.operators.restricted_laplacian(S, [0], format="dense")
    >>> LOO, LOU
    (tensor([[1.]]), tensor([[-1.]]))
    """
    fixed = fixed_indices(S, boundary).numpy()
    free = np.setdiff1d(np.arange(S.C0), fixed)
    L = _laplacian_csr(S, at)
    dt = dtype or S.dtype
    return _export(L[free][:, free], format, dt), _export(L[free][:, fixed], format, dt)


def vertex_coordinates(S, vertices: Sequence[Hashable]) -> Tensor:
    """Flat indices of all coordinates of ``vertices`` (in the given order)."""
    return torch.cat([torch.arange(S.vertex_slice(v).start, S.vertex_slice(v).stop) for v in vertices]) \
        if vertices else torch.zeros(0, dtype=torch.long)
