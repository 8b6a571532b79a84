"""Coboundary, Laplacian and their restricted blocks, assembled or matrix-free.

Matrix-free actions group the edges whose two maps are small dense linear maps
of equal shape: their matrices are stacked once and applied with one batched
matmul and one ``index_add`` per group, so a sheaf with 10⁵ vertices runs no
Python loop per edge. Other edges (large, structured or nonlinear maps) are
applied one by one through their map objects.

Nonlinear maps are handled throughout: [`apply_coboundary`][cellsheaf.operators.apply_coboundary] is the
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

import copy
import threading
import warnings
from collections import OrderedDict, defaultdict
from typing import Hashable, Sequence, Union

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from .boundary import Boundary, ResolvedBoundary
from . import maps as _maps
from .cochain import as_flat
from .stacked import EdgeStack
from .syncs import notice_cpu_route

__all__ = [
    "apply_coboundary", "apply_coboundary_jvp", "apply_coboundary_adjoint", "apply_laplacian",
    "expressed", "pullback", "edge_weights", "coboundary", "laplacian", "restricted_laplacian",
    "to_torch_sparse", "degree_blocks", "dirichlet_energy",
]

_GROUP_MAX = 1024  # edges whose d_e * (d_u + d_v) is at most this are stacked into groups


class _Group:
    """Edges of one shape ``(d_u, d_v, d_e)`` computed together: an `EdgeStack`, or per-edge small
    dense linear maps stacked once. Index tensors are built once and cached per device; map
    values are fetched per call (cached when nothing requires grad)."""

    def __init__(self, S, u: Tensor, v: Tensor, shape: tuple[int, int, int], ecoords, source):
        self.u, self.v = u.cpu(), v.cpu()  # (G,) vertex positions
        self.du, self.dv, self.de = shape
        self.ecoords = ecoords  # slice of the 1-cochain (stacks) or (G, d_e) flat indices
        self.source = source    # EdgeStack, or the list of Edge records
        self.stacked = isinstance(source, EdgeStack)
        self.diagonal = self.stacked and source.diagonal
        voff = torch.as_tensor(S._vertex_offsets())
        self._voff = voff
        self._dev: dict = {}
        self._vals: dict = {}
        self.loops = torch.nonzero(self.u == self.v).flatten()

    def __len__(self) -> int:
        return self.u.shape[0]

    # ---------------------------------------------------------------- indices
    @property
    def uidx(self) -> Tensor:
        """``(G, d_u)`` flat 0-cochain coordinates of the tails (CPU)."""
        return self._voff[self.u].unsqueeze(1) + torch.arange(self.du)

    @property
    def vidx(self) -> Tensor:
        """``(G, d_v)`` flat 0-cochain coordinates of the heads (CPU)."""
        return self._voff[self.v].unsqueeze(1) + torch.arange(self.dv)

    @property
    def eidx(self) -> Tensor:
        """``(G, d_e)`` flat 1-cochain coordinates (CPU)."""
        if isinstance(self.ecoords, slice):
            return torch.arange(self.ecoords.start, self.ecoords.stop).view(-1, self.de)
        return self.ecoords

    def index(self, device) -> dict:
        """Index tensors on ``device`` (cached): endpoints, flat coordinates, edge coordinates, loops."""
        key = torch.device(device)
        if key not in self._dev:
            self._dev[key] = {
                "u": self.u.to(key), "v": self.v.to(key),
                "uflat": self.uidx.flatten().to(key), "vflat": self.vidx.flatten().to(key),
                "e": None if isinstance(self.ecoords, slice) else self.ecoords.flatten().to(key),
                "loops": self.loops.to(key),
            }
        return self._dev[key]

    # ---------------------------------------------------------------- values
    @property
    def requires_grad(self) -> bool:
        if self.stacked:
            return self.source.requires_grad
        return any(t.requires_grad for e in self.source for t in e.Fu.tensors() + e.Fv.tensors())

    def token(self):
        """Changes whenever the values may have changed (stacks: tensor identity and in-place versions)."""
        return self.source.token() if self.stacked else 0

    def values(self, dtype, device) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(F_u, F_v, w)``: stacked maps ``(G, d_e, d)`` (or ``(G, d)`` diagonal) and weights ``(G,)`` or None."""
        if self.stacked:
            st = self.source
            w = None if st.weights is None else st.weights.to(dtype=dtype, device=device)
            return st.Fu.to(dtype=dtype, device=device), st.Fv.to(dtype=dtype, device=device), w
        Mu, Mv = self.matrices(dtype, device)
        key = ("w", dtype, torch.device(device))
        if key not in self._vals:
            w = torch.tensor([e.weight for e in self.source], dtype=torch.float64)
            self._vals[key] = None if bool((w == 1).all()) else w.to(dtype=dtype, device=device)
        return Mu, Mv, self._vals[key]

    def matrices(self, dtype, device) -> tuple[Tensor, Tensor]:
        """Dense stacked ``(G, d_e, d_u)`` and ``(G, d_e, d_v)`` matrices (diagonal stacks embedded)."""
        if self.stacked:
            Fu, Fv, _ = self.values(dtype, device)
            return (torch.diag_embed(Fu), torch.diag_embed(Fv)) if self.diagonal else (Fu, Fv)
        key = (dtype, torch.device(device))
        if key in self._vals:
            return self._vals[key]
        Mu = torch.stack([e.Fu.matrix() for e in self.source]).to(dtype=dtype, device=device)
        Mv = torch.stack([e.Fv.matrix() for e in self.source]).to(dtype=dtype, device=device)
        if not self.requires_grad:  # (a copy made under no_grad must not serve a later call that tracks grad)
            self._vals[key] = (Mu, Mv)
        return Mu, Mv


class _Vertices:
    """How to gather and scatter vertex stalks on a ``(C0, B)`` layout: by vertex when every stalk
    has one dim (a ``(n, d, B)`` view), else by flat coordinates."""

    def __init__(self, S):
        dims = S._dim_array()
        self.n = dims.size
        self.uniform = int(dims[0]) if dims.size and bool((dims == dims[0]).all()) else None
        self.dims = dims
        self.voff = S._vertex_offsets()
        self._groups: dict = {}

    def groups(self, device) -> list[tuple[int, Tensor, Tensor, Tensor]]:
        """Vertices grouped by stalk dim: ``(d, positions (n_d,), flat coordinates (n_d * d,), row of each
        vertex in its group (n,))`` on ``device`` (cached)."""
        key = torch.device(device)
        if key not in self._groups:
            out = []
            row = np.zeros(self.n, dtype=np.int64)
            for d in np.unique(self.dims).tolist():
                pos = np.nonzero(self.dims == d)[0]
                row[pos] = np.arange(pos.size)
                flat = (self.voff[pos][:, None] + np.arange(d)).reshape(-1)
                out.append([d, torch.as_tensor(pos), torch.as_tensor(flat)])
            rows = torch.as_tensor(row).to(key)
            self._groups[key] = [(d, p.to(key), f.to(key), rows) for d, p, f in out]
        return self._groups[key]

    def gather(self, xt: Tensor, idx: dict, side: str, d: int) -> Tensor:
        """Stalks of one end of a group's edges, ``(G, d, B)``."""
        if self.uniform is not None:
            return xt.view(self.n, self.uniform, -1).index_select(0, idx[side])
        return xt.index_select(0, idx[side + "flat"]).view(-1, d, xt.shape[1])

    def scatter_add(self, out: Tensor, idx: dict, side: str, vals: Tensor) -> None:
        """``out[end of each edge] += vals`` for ``vals`` of shape ``(G, d, B)`` (in place on ``out``)."""
        if self.uniform is not None:
            out.view(self.n, self.uniform, -1).index_add_(0, idx[side], vals)
        else:
            out.index_add_(0, idx[side + "flat"], vals.reshape(-1, out.shape[1]))


class _Plan:
    """Index structure of a sheaf for matrix-free actions; kept while the structure is unchanged
    (`Sheaf.update_maps` keeps it, and `forget_values` drops the map values its groups cached)."""

    def __init__(self, S):
        from .sheaf import Sheaf  # noqa: F401  (type only)

        voff, eoff = S._vertex_offsets(), S._edge_offsets()
        vpos = S._vertex_index()
        buckets: dict[tuple, list] = defaultdict(list)
        self.groups: list[_Group] = []
        self.singles = []
        for seg, start in zip(S._segments, S._segment_starts()):
            if isinstance(seg, EdgeStack):
                ecoords = slice(int(eoff[start]), int(eoff[start + len(seg)]))
                self.groups.append(_Group(S, seg.index[0], seg.index[1], seg.shape, ecoords, seg))
                continue
            for k, e in enumerate(seg.values()):
                Fu, Fv = e.Fu, e.Fv
                small = e.dim * (Fu.d_in + Fv.d_in) <= _GROUP_MAX
                dense = not any(getattr(F, "sparse", False) or isinstance(F, _maps.Structured) for F in (Fu, Fv))
                if Fu.linear and Fv.linear and small and dense:
                    buckets[(Fu.d_in, Fv.d_in, e.dim)].append((e, start + k))
                else:
                    su, sv = S.vertex_slice(e.u), S.vertex_slice(e.v)
                    o = int(eoff[start + k])
                    self.singles.append((e, su, sv, slice(o, o + e.dim)))
        for shape, items in buckets.items():
            edges = [e for e, _ in items]
            u = torch.tensor([vpos[e.u] for e in edges], dtype=torch.long)
            v = torch.tensor([vpos[e.v] for e in edges], dtype=torch.long)
            ecoords = torch.as_tensor(eoff[[k for _, k in items]]).unsqueeze(1) + torch.arange(shape[2])
            self.groups.append(_Group(S, u, v, shape, ecoords, edges))
        self.C0, self.C1 = S.C0, S.C1
        self.vertices = _Vertices(S)
        self.vertex_index = vpos
        self.cache: dict = {}  # structure-only tensors (per device)
        self._aranges: dict[tuple[int, int], Tensor] = {}

    def index(self, sl: slice) -> Tensor:
        """``arange(sl.start, sl.stop)``, cached."""
        key = (sl.start, sl.stop)
        if key not in self._aranges:
            self._aranges[key] = torch.arange(sl.start, sl.stop)
        return self._aranges[key]

    def tracks_grad(self) -> bool:
        """Whether a group's values require grad while grad mode is on (then nothing is cached)."""
        return torch.is_grad_enabled() and any(g.requires_grad for g in self.groups)

    def bind(self, S) -> "_Plan":
        """This structure with the stacks of ``S`` as the sources of its groups (``None``: no values, a
        template). Index tensors, their device copies and the structure-only cache are shared. Only for
        plans of sheaves made of stacks (no per-edge records)."""
        plan = copy.copy(self)
        plan.groups = [copy.copy(g) for g in self.groups]
        for g, st in zip(plan.groups, [None] * len(self.groups) if S is None else S._segments):
            g.source, g._vals = st, {}
        plan.vertex_index = None if S is None else S._vertex_index()
        return plan

    def same_structure(self, S) -> bool:
        """Whether ``S`` (stacks only, of the same structure key) has this plan's stalk dims and endpoints."""
        if not np.array_equal(self.vertices.dims, S._dim_array()):
            return False
        return all(torch.equal(g.u, st.index[0].cpu()) and torch.equal(g.v, st.index[1].cpu())
                   for g, st in zip(self.groups, S._segments))

    def forget_values(self) -> None:
        """Drop the map values the groups cached (kept: the index structure); called whenever values change."""
        for g in self.groups:
            g._vals.clear()


def _bmm(A: Tensor, X: Tensor) -> Tensor:
    """Batched ``A @ X`` for many tiny blocks; ``einsum`` picks a batched-GEMM layout about 3x
    faster than ``torch.bmm`` for float64 blocks of a few rows (as fast for float32)."""
    return torch.einsum("gij,gjb->gib", A, X)


def _apply(F: Tensor, X: Tensor) -> Tensor:
    """Stacked maps on stacked stalks: ``(G, d_e, d) @ (G, d, B)``, or elementwise for ``(G, d)`` diagonals."""
    return F.unsqueeze(2) * X if F.dim() == 2 else _bmm(F, X)


def _adjoint(F: Tensor, Y: Tensor) -> Tensor:
    """Transposed stacked maps: ``(G, d_e, d)ᵀ @ (G, d_e, B)``, or elementwise for diagonals."""
    return F.unsqueeze(2) * Y if F.dim() == 2 else torch.einsum("gji,gjb->gib", F, Y)


def _plan(S) -> _Plan:
    plan = S._cache.get("plan")
    if plan is None:
        plan = S._cache["plan"] = _shared_plan(S)
    return plan


_TEMPLATES: OrderedDict = OrderedDict()  # recent structures of stacked sheaves -> plan templates (no values)
_TEMPLATES_MAX = 8


def _structure_key(S) -> tuple | None:
    """What a plan of a sheaf made of stacks only depends on, up to the endpoints themselves (compared
    exactly on a hit): vertex count and coordinates, and per stack its size, shape, kind and device. None
    for sheaves with per-edge records (their plans hold the records)."""
    segments = S._segments
    if not segments or not all(isinstance(seg, EdgeStack) for seg in segments):
        return None
    return (len(S._dims), S.C0, tuple((len(st), st.shape, st.diagonal, st.index.device) for st in segments))


def _shared_plan(S) -> _Plan:
    """The plan of ``S``: the index structure of an earlier sheaf with the same structure (same stalk dims,
    same stacked endpoints, shapes and kinds), rebound to the values of ``S``, or a new one. This is how
    ``Sheaf.from_arrays`` on an unchanged graph (a layer that builds its sheaf on every forward pass) reuses
    the index tensors, the per-device copies and the CSR structure instead of rebuilding them."""
    key = _structure_key(S)
    if key is None:
        return _Plan(S)
    template = _TEMPLATES.get(key)
    if template is not None and template.same_structure(S):
        _TEMPLATES.move_to_end(key)
        return template.bind(S)
    plan = _Plan(S)
    _TEMPLATES[key] = plan.bind(None)
    while len(_TEMPLATES) > _TEMPLATES_MAX:
        _TEMPLATES.popitem(last=False)
    return plan


def _batch(S, x) -> tuple[Tensor, bool]:
    x = as_flat(S, x)
    if not x.is_floating_point():
        x = x.to(S.dtype)
    return (x, False) if x.dim() == 2 else (x.unsqueeze(0), True)


def _columns(x: Tensor) -> Tensor:
    """A ``(B, n)`` batch as the contiguous ``(n, B)`` layout the grouped kernels use."""
    return x.T.contiguous()


_WORKSPACE_MIN = 1 << 20  # bytes from which a product's input is transposed into a kept workspace
_TRANSPOSE_CHUNK = 1 << 20  # bytes of one slab of that transposition (it stays in the cache)


def _columns_workspace(S, x: Tensor) -> Tensor:
    """`_columns` of ``x`` for a product that only reads it: a large batch that nothing differentiates is
    transposed slab by slab into a workspace kept on ``S`` (per dtype, device, shape and thread), which
    spares a fresh ``(n, B)`` block per call and its page faults (about 6x faster than ``contiguous()``
    at 10⁵ vertices, 16 columns). The caller must not hand the result out or keep it."""
    if x.numel() * x.element_size() < _WORKSPACE_MIN or (x.requires_grad and torch.is_grad_enabled()):
        return _columns(x)
    key = ("columns", x.dtype, x.device, tuple(x.shape), threading.get_ident())
    out = S._cache.get(key)
    if out is None:
        out = S._cache[key] = x.new_empty(x.shape[1], x.shape[0])
    step = max(1, _TRANSPOSE_CHUNK // (x.shape[0] * x.element_size()))
    for s in range(0, x.shape[1], step):
        out[s:s + step].copy_(x[:, s:s + step].T)
    return out


def _place(out: Tensor, g: _Group, idx: dict, vals: Tensor) -> None:
    """Write a group's ``(G, d_e, B)`` edge values into the ``(C1, B)`` layout (adds; in place)."""
    if isinstance(g.ecoords, slice):
        out[g.ecoords] += vals.reshape(-1, out.shape[1])
    else:
        out.index_add_(0, idx["e"], vals.reshape(-1, out.shape[1]))


def _take(yt: Tensor, g: _Group, idx: dict) -> Tensor:
    """A group's edge values ``(G, d_e, B)`` from the ``(C1, B)`` layout."""
    vals = yt[g.ecoords] if isinstance(g.ecoords, slice) else yt.index_select(0, idx["e"])
    return vals.view(len(g), g.de, yt.shape[1])


def _scatter(n: int, pieces: list[tuple[Tensor, Tensor]], like: Tensor, out: Tensor | None = None) -> Tensor:
    """Sum ``(index, values (k, B))`` pieces into an ``(n, B)`` tensor with one ``index_add``."""
    out = like.new_zeros(n, like.shape[0]) if out is None else out
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
    plan, B, xt = _plan(S), xb.shape[0], _columns(xb)
    V = plan.vertices
    av, au = xt.new_zeros(plan.C1, B), xt.new_zeros(plan.C1, B)
    for g in plan.groups:
        idx = g.index(xt.device)
        Fu, Fv, _ = g.values(xt.dtype, xt.device)
        _place(au, g, idx, _apply(Fu, V.gather(xt, idx, "u", g.du)))
        _place(av, g, idx, _apply(Fv, V.gather(xt, idx, "v", g.dv)))
    pv, pu = [], []
    for e, su, sv, se in plan.singles:
        ie = plan.index(se)
        pu.append((ie, e.Fu.apply(xb[:, su]).T))
        pv.append((ie, e.Fv.apply(xb[:, sv]).T))
    av, au = _scatter(plan.C1, pv, xb, av).T, _scatter(plan.C1, pu, xb, au).T
    return (av[0], au[0]) if squeeze else (av, au)


def apply_coboundary(S, x) -> Tensor:
    """``δx``: the discrepancy ``F_v(x_v) − F_u(x_u)`` on every edge, ``(..., C1)``.

    For linear maps this is the coboundary; for nonlinear maps it is the
    nonlinear discrepancy of Sec. 4.2. Differentiable with respect to ``x``
    and to stacked maps that require grad.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf.from_arrays([1, 1], [[0], [1]], torch.ones(1, 1, 1), 2 * torch.ones(1, 1, 1))
    >>> cs.operators.apply_coboundary(S, torch.tensor([1.0, 1.0]))
    tensor([1.])
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
    B, vt = vb.shape[0], _columns(vb)
    V = plan.vertices
    out = vt.new_zeros(plan.C1, B)
    for g in plan.groups:
        idx = g.index(vt.device)
        Fu, Fv, _ = g.values(vt.dtype, vt.device)
        _place(out, g, idx, _apply(Fv, V.gather(vt, idx, "v", g.dv)) - _apply(Fu, V.gather(vt, idx, "u", g.du)))
    pieces = []
    for e, su, sv, se in plan.singles:
        pieces.append((plan.index(se), (e.Fv.jvp(ab[:, sv], vb[:, sv]) - e.Fu.jvp(ab[:, su], vb[:, su])).T))
    out = _scatter(plan.C1, pieces, vb, out).T
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
    gvt, gut = _columns(gvb), _columns(gub)
    V = plan.vertices
    out = gvt.new_zeros(plan.C0, B)
    for g in plan.groups:
        idx = g.index(gvt.device)
        Fu, Fv, _ = g.values(gvt.dtype, gvt.device)
        V.scatter_add(out, idx, "u", _adjoint(Fu, _take(gut, g, idx)))
        V.scatter_add(out, idx, "v", _adjoint(Fv, _take(gvt, g, idx)))
    pieces = []
    for e, su, sv, se in plan.singles:
        cu = e.Fu.adjoint(gub[:, se]) if e.Fu.linear else e.Fu.vjp(ab[:, su], gub[:, se])
        cv = e.Fv.adjoint(gvb[:, se]) if e.Fv.linear else e.Fv.vjp(ab[:, sv], gvb[:, se])
        pieces += [(plan.index(su), cu.T), (plan.index(sv), cv.T)]
    out = _scatter(plan.C0, pieces, gvb, out).T
    return out[0] if squeeze else out


def apply_coboundary_adjoint(S, y: Tensor, at=None) -> Tensor:
    """``δᵀy`` (``J_δ(at)ᵀ y`` for nonlinear maps), ``(..., C0)``.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf.from_arrays([1, 1], [[0], [1]], torch.ones(1, 1, 1), 2 * torch.ones(1, 1, 1))
    >>> cs.operators.apply_coboundary_adjoint(S, torch.tensor([1.0]))
    tensor([-1.,  2.])
    """
    return pullback(S, y, -y, at)


def edge_weights(S, dtype=None, device=None) -> Tensor:
    """Per-coordinate edge weights ``(C1,)``: each edge's weight repeated over its stalk.

    Differentiable with respect to stacked weights that require grad.
    """
    dtype = dtype or S.dtype
    key = ("weights", dtype, device)
    if key in S._cache:
        return S._cache[key]
    dims = torch.as_tensor(S._edge_dim_array())
    parts = []
    for seg in S._segments:
        if isinstance(seg, EdgeStack):
            w = seg.weights if seg.weights is not None else torch.ones(len(seg), dtype=torch.float64)
            parts.append(w.to(dtype=dtype, device=device))
        else:
            parts.append(torch.tensor([e.weight for e in seg.values()], dtype=torch.float64).to(dtype=dtype,
                                                                                                 device=device))
    w = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)
    out = torch.repeat_interleave(w, dims.to(w.device))
    if not any(isinstance(seg, EdgeStack) and seg.weights is not None and seg.weights.requires_grad
               for seg in S._segments):  # a copy made under no_grad must not serve a call that tracks grad
        S._cache[key] = out
    return out


# ---------------------------------------------------------------------------- Laplacians, matrix-free

Normalization = Union[bool, str]

_CHUNK = 1 << 21  # elements of a gathered block per step (temporaries of 10⁵ edges at once fall out of cache)


def _chunks(n: int, per_item: int):
    step = max(1, _CHUNK // max(per_item, 1))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def _sub(idx: dict, s: int, t: int, g: _Group) -> dict:
    """The index entries of rows ``s:t`` of a group."""
    return {"u": idx["u"][s:t], "v": idx["v"][s:t], "uflat": idx["uflat"][s * g.du:t * g.du],
            "vflat": idx["vflat"][s * g.dv:t * g.dv]}


def _rows(x: Tensor | None, s: int, t: int):
    return None if x is None else x[s:t]


def _groups_laplacian(plan: _Plan, xt: Tensor, out: Tensor) -> None:
    """``out += Σ_groups δ_gᵀ W δ_g x`` through the maps (differentiable in maps, weights and ``x``)."""
    V, B = plan.vertices, xt.shape[1]
    for g in plan.groups:
        idx = g.index(xt.device)
        Fu, Fv, w = g.values(xt.dtype, xt.device)
        for s, t in _chunks(len(g), (g.du + g.dv + g.de) * B):
            ix = _sub(idx, s, t, g)
            fu, fv = Fu[s:t], Fv[s:t]
            r = _apply(fv, V.gather(xt, ix, "v", g.dv)) - _apply(fu, V.gather(xt, ix, "u", g.du))
            if w is not None:
                r = r * w[s:t, None, None]
            V.scatter_add(out, ix, "v", _adjoint(fv, r))
            V.scatter_add(out, ix, "u", -_adjoint(fu, r))


def _edge_blocks(plan: _Plan, dtype, device) -> list:
    """Per group the off-diagonal blocks ``L_uv = −w F_uᵀ F_v`` (``(G, d_u, d_v)``, or ``(G, d)`` diagonal)."""
    out = []
    for g in plan.groups:
        Fu, Fv, w = g.values(dtype, device)
        O = -(Fu * Fv) if g.diagonal else -torch.einsum("gki,gkj->gij", Fu, Fv)
        out.append(O if w is None else O * w.view(-1, *([1] * (O.dim() - 1))))
    return out


def _cached_blocks(S, plan: _Plan, dtype, device) -> tuple[list, list]:
    """Vertex blocks (without self-loop cross terms) and edge blocks of ``L``, cached while the values hold."""
    key = ("L_blocks", dtype, torch.device(device))
    token = tuple(g.token() for g in plan.groups)
    hit = S._cache.get(key)
    if hit is not None and hit[0] == token:
        return hit[1]
    with torch.no_grad():
        blocks = (_vertex_blocks(plan, dtype, device, loops=False, singles=False), _edge_blocks(plan, dtype, device))
    S._cache[key] = (token, blocks)
    return blocks


def _block_pieces(plan: _Plan, D: list[Tensor], O: list[Tensor], device) -> tuple[list, list, list]:
    """Rows, columns and values of every block entry of the grouped part of ``L``: vertex blocks,
    then each group's edge blocks ``L_uv`` and their transposes ``L_vu`` (duplicates not summed)."""
    rows, cols, vals = [], [], []
    for (d, _, flat, _), blk in zip(plan.vertices.groups(device), D):
        f = flat.view(-1, d)
        if blk.dim() == 2:
            rows.append(f); cols.append(f)
        else:
            rows.append(f.unsqueeze(2).expand(blk.shape)); cols.append(f.unsqueeze(1).expand(blk.shape))
        vals.append(blk)
    for g, blk in zip(plan.groups, O):
        idx = g.index(device)
        uf, vf = idx["uflat"].view(-1, g.du), idx["vflat"].view(-1, g.dv)
        if blk.dim() == 2:
            rows += [uf, vf]; cols += [vf, uf]; vals += [blk, blk]
            continue
        bt = blk.transpose(1, 2)
        rows += [uf.unsqueeze(2).expand(blk.shape), vf.unsqueeze(2).expand(bt.shape)]
        cols += [vf.unsqueeze(1).expand(blk.shape), uf.unsqueeze(1).expand(bt.shape)]
        vals += [blk, bt]
    return rows, cols, vals


def _csr_structure(plan: _Plan, D: list[Tensor], O: list[Tensor], device) -> tuple[Tensor, Tensor, Tensor]:
    """``(crow, col, slot)`` of the grouped part of ``L`` in CSR form, with ``slot`` the CSR position of
    every block entry (entries sharing a position, e.g. of parallel edges, are summed). Structure only:
    cached on the plan per device."""
    key = ("csr", torch.device(device))
    if key not in plan.cache:
        rows, cols, _ = _block_pieces(plan, D, O, device)
        r = torch.cat([t.reshape(-1) for t in rows]) if rows else torch.zeros(0, dtype=torch.long, device=device)
        c = torch.cat([t.reshape(-1) for t in cols]) if cols else torch.zeros(0, dtype=torch.long, device=device)
        keys, slot = torch.unique(r * plan.C0 + c, return_inverse=True)
        crow = torch.zeros(plan.C0 + 1, dtype=torch.long, device=device)
        crow[1:] = torch.cumsum(torch.bincount(keys // max(plan.C0, 1), minlength=plan.C0), 0)
        plan.cache[key] = (crow, keys % max(plan.C0, 1), slot)
    return plan.cache[key]


def _csr_laplacian(S, plan: _Plan, dtype, device, mode: str | None = None) -> Tensor:
    """The grouped part of ``L`` (``mode``: its normalised form ``R L R``, ``R`` the degree roots) as a torch
    CSR matrix on ``device`` (values from the cached blocks, the structure from the plan): what a
    matrix-free product runs on when nothing requires grad."""
    key = ("L_torch_csr", mode, dtype, torch.device(device))
    token = tuple(g.token() for g in plan.groups)
    hit = S._cache.get(key)
    if hit is not None and hit[0] == token:
        return hit[1]
    D, O = _cached_blocks(S, plan, dtype, device)
    crow, col, slot = _csr_structure(plan, D, O, device)
    if mode is not None:
        with torch.no_grad():
            D, O = _normalized_blocks(S, plan, D, O, mode, dtype, device)
    _, _, vals = _block_pieces(plan, D, O, device)
    flat = torch.cat([v.reshape(-1) for v in vals]) if vals else torch.zeros(0, dtype=dtype, device=device)
    values = flat.new_zeros(col.shape[0]).index_add_(0, slot, flat)
    with warnings.catch_warnings():  # torch calls its CSR support beta; products with dense blocks are solid
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        L = torch.sparse_csr_tensor(crow, col, values, (plan.C0, plan.C0), check_invariants=False)
    S._cache[key] = (token, L)
    return L


def _normalized_blocks(S, plan: _Plan, D: list[Tensor], O: list[Tensor], mode: str, dtype, device):
    """Vertex blocks ``R_v D_v R_v`` and edge blocks ``R_u L_uv R_v`` of ``R L R`` (``R`` the degree roots),
    each block in the form (diagonal or dense) of the one it scales."""
    R = _degree_roots(S, plan, dtype, device, mode)
    vgroups = plan.vertices.groups(device)
    slot = {d: k for k, (d, *_) in enumerate(vgroups)}
    rowpos = vgroups[0][3] if vgroups else None

    def scale(A: Tensor, Ru: Tensor, Rv: Tensor) -> Tensor:
        if A.dim() == 2 and Ru.dim() == 2 and Rv.dim() == 2:
            return Ru * A * Rv
        dense = lambda b: torch.diag_embed(b) if b.dim() == 2 else b  # noqa: E731
        return dense(Ru) @ dense(A) @ dense(Rv)

    D = [scale(blk, r, r) for blk, r in zip(D, R)]
    O = [scale(blk, R[slot[g.du]][rowpos[g.index(device)["u"]]], R[slot[g.dv]][rowpos[g.index(device)["v"]]])
         for g, blk in zip(plan.groups, O)]
    return D, O


def _singles_laplacian(S, plan: _Plan, xb: Tensor, at) -> Tensor | None:
    """``Σ_singles δ_eᵀ w_e δ_e x`` for the edges computed one by one (at the Jacobians of ``at``)."""
    if not plan.singles:
        return None
    nonlinear = [e for e, *_ in plan.singles if not (e.Fu.linear and e.Fv.linear)]
    ab = None
    if nonlinear:
        if at is None:
            at = xb
        ab = _batch(S, at)[0].to(xb.dtype).expand_as(xb)
    pieces = []
    for e, su, sv, se in plan.singles:
        xu, xv = xb[:, su], xb[:, sv]
        if e.Fu.linear and e.Fv.linear:
            r = e.weight * (e.Fv.apply(xv) - e.Fu.apply(xu))
            cu, cv = e.Fu.adjoint(r), e.Fv.adjoint(r)
        else:
            au, av = ab[:, su], ab[:, sv]
            r = e.weight * (e.Fv.jvp(av, xv) - e.Fu.jvp(au, xu))
            cu, cv = e.Fu.vjp(au, r), e.Fv.vjp(av, r)
        pieces += [(plan.index(su), -cu.T), (plan.index(sv), cv.T)]
    return _scatter(plan.C0, pieces, xb)


def _laplacian_columns(S, plan: _Plan, xt: Tensor, at=None) -> Tensor:
    """``L x`` on the ``(C0, B)`` layout."""
    if plan.groups and not plan.tracks_grad():
        out = torch.sparse.mm(_csr_laplacian(S, plan, xt.dtype, xt.device), xt)  # 5% faster than @ (measured)
    else:
        out = xt.new_zeros(xt.shape)
        if plan.groups:
            _groups_laplacian(plan, xt, out)
    single = _singles_laplacian(S, plan, xt.T, at)
    return out if single is None else out + single


def _check_normalized(normalized) -> str | None:
    if normalized is False or normalized is None:
        return None
    if normalized is True:
        return "plain"
    if normalized == "augmented":
        return "augmented"
    raise ValueError(f"normalized must be False, True or 'augmented', got {normalized!r}")


def apply_laplacian(S, x, at=None, normalized: Normalization = False) -> Tensor:
    """``L x = δᵀ W δ x`` matrix-free (at the Jacobians of ``at`` for nonlinear maps).

    Parameters
    ----------
    x : cochain, ``(C0,)`` or ``(B, C0)``
    at : cochain, optional
        Point of linearisation for nonlinear maps.
    normalized : False, True or "augmented"
        ``True`` applies ``D^{-1/2} L D^{-1/2}`` and ``"augmented"`` applies
        ``(D + I)^{-1/2} L (D + I)^{-1/2}``, with ``D`` the vertex-diagonal blocks of ``L``
        ([`degree_blocks`][cellsheaf.operators.degree_blocks]; pseudo-inverse roots where a block is singular).

    Differentiable with respect to ``x`` and to stacked maps and weights that require
    grad ([`cellsheaf.Sheaf.update_maps`][cellsheaf.sheaf.Sheaf.update_maps]); when nothing requires grad, the blocks of ``L``
    are cached and reused while the maps are unchanged.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.eye(1), torch.eye(1))
    >>> cs.operators.apply_laplacian(S, torch.tensor([[1.0, 0.0]]))
    tensor([[ 1., -1.]])
    >>> cs.operators.apply_laplacian(S, torch.tensor([[1.0, 0.0]]), normalized="augmented")
    tensor([[ 0.5000, -0.5000]])
    """
    mode = _check_normalized(normalized)
    xb, squeeze = _batch(S, x)
    plan = _plan(S)
    xt = _columns_workspace(S, xb)  # read only: every branch below returns a fresh tensor
    if mode is not None:
        R = _degree_roots(S, plan, xt.dtype, xt.device, mode)
        xt = _apply_vertex_blocks(plan, R, xt)
    y = _laplacian_columns(S, plan, xt, at)
    if mode is not None:
        y = _apply_vertex_blocks(plan, R, y)
    y = y.T
    return y[0] if squeeze else y


# ---------------------------------------------------------------------------- degree blocks


def _single_blocks(plan: _Plan, dtype, device):
    """Singles as one-edge dense blocks ``(u position, v position, M_u, M_v, w)`` (linear maps only)."""
    vpos = plan.vertex_index
    for e, *_ in plan.singles:
        if not (e.Fu.linear and e.Fv.linear):
            raise ValueError(f"edge {e.name!r} has a nonlinear map: linearize the sheaf first (S.linearize(x))")
        yield vpos[e.u], vpos[e.v], e.Fu.matrix().to(dtype=dtype, device=device), \
            e.Fv.matrix().to(dtype=dtype, device=device), e.weight


def _vertex_blocks(plan: _Plan, dtype, device, loops: bool = True, singles: bool = True) -> list[Tensor]:
    """The vertex-diagonal blocks of ``L``, one tensor per stalk dim (`_Vertices.groups` order):
    ``(n_d, d, d)``, or ``(n_d, d)`` when every map is diagonal. ``loops=False`` leaves out the cross
    terms ``−w (F_uᵀF_v + F_vᵀF_u)`` of self-loops (the block form adds them as edge blocks);
    ``singles=False`` only sums the groups."""
    V = plan.vertices
    vgroups = V.groups(device)
    slot = {d: k for k, (d, *_) in enumerate(vgroups)}
    singles = singles and bool(plan.singles)
    diagonal = not singles and all(g.diagonal for g in plan.groups)
    D = [torch.zeros((p.shape[0], d) if diagonal else (p.shape[0], d, d), dtype=dtype, device=device)
         for d, p, _, _ in vgroups]
    rows = vgroups[0][3] if vgroups else None

    def gram(A, B):
        return A * B if A.dim() == 2 else torch.einsum("gki,gkj->gij", A, B)

    def add(d, pos, block):
        if not diagonal and block.dim() == 2:
            block = torch.diag_embed(block)
        k = slot[d]
        D[k] = D[k].index_add(0, rows[pos], block)

    for g in plan.groups:
        idx = g.index(device)
        Fu, Fv, w = g.values(dtype, device)
        wv = (lambda t: t) if w is None else (lambda t: t * w.view(-1, *([1] * (t.dim() - 1))))
        add(g.du, idx["u"], wv(gram(Fu, Fu)))
        add(g.dv, idx["v"], wv(gram(Fv, Fv)))
        if loops and g.loops.numel():
            lp = idx["loops"]
            fu, fv = Fu[lp], Fv[lp]
            cross = gram(fu, fv)
            cross = cross + (cross.transpose(1, 2) if cross.dim() == 3 else cross)
            cross = cross if w is None else cross * w[lp].view(-1, *([1] * (cross.dim() - 1)))
            add(g.du, idx["u"][lp], -cross)
    for u, v, Mu, Mv, w in _single_blocks(plan, dtype, device) if singles else ():
        pu, pv = torch.tensor([u], device=device), torch.tensor([v], device=device)
        if u == v:
            M = Mv - Mu
            add(Mu.shape[1], pu, (w * M.T @ M if loops else w * (Mu.T @ Mu + Mv.T @ Mv))[None])
        else:
            add(Mu.shape[1], pu, (w * Mu.T @ Mu)[None])
            add(Mv.shape[1], pv, (w * Mv.T @ Mv)[None])
    return D


def _apply_vertex_blocks(plan: _Plan, blocks: list[Tensor], xt: Tensor, out: Tensor | None = None) -> Tensor:
    """Vertex-block-diagonal operator on the ``(C0, B)`` layout: ``out + blocks x`` (or ``blocks x``)."""
    V, B = plan.vertices, xt.shape[1]
    groups = V.groups(xt.device)
    if V.uniform is not None:
        if not groups:
            return xt.new_zeros(xt.shape) if out is None else out
        X = xt.view(V.n, V.uniform, B)
        Y = blocks[0].unsqueeze(2) * X if blocks[0].dim() == 2 else _bmm(blocks[0], X)
        Y = Y.reshape(-1, B)
        if out is None:
            return Y
        out += Y
        return out
    res = xt.new_zeros(xt.shape) if out is None else out
    for (d, _, flat, _), blk in zip(groups, blocks):
        if d == 0:
            continue
        X = xt.index_select(0, flat).view(-1, d, B)
        Y = blk.unsqueeze(2) * X if blk.dim() == 2 else _bmm(blk, X)
        res.index_add_(0, flat, Y.reshape(-1, B))
    return res


class _SymmetricPower(torch.autograd.Function):
    """``A^p`` of symmetric positive semi-definite blocks (pseudo-power: eigenvalues at or below a
    relative tolerance map to 0), with the Daleckii-Krein backward, which stays finite for repeated
    eigenvalues (a connection Laplacian's ``deg(v)·I`` blocks)."""

    @staticmethod
    def forward(ctx, A: Tensor, p: float) -> Tensor:
        lam, Q = torch.linalg.eigh(A)
        d = A.shape[-1]
        tol = d * torch.finfo(A.dtype).eps * lam.abs().amax(-1, keepdim=True).clamp_min(1.0)
        keep = lam > tol
        safe = torch.where(keep, lam, torch.ones_like(lam))
        f = torch.where(keep, safe ** p, torch.zeros_like(lam))
        df = torch.where(keep, p * safe ** (p - 1), torch.zeros_like(lam))
        ctx.save_for_backward(lam, Q, f, df, tol)
        return (Q * f.unsqueeze(-2)) @ Q.transpose(-1, -2)

    @staticmethod
    def backward(ctx, G: Tensor):
        lam, Q, f, df, tol = ctx.saved_tensors
        gap = lam.unsqueeze(-1) - lam.unsqueeze(-2)
        close = gap.abs() <= tol.unsqueeze(-1)
        divided = (f.unsqueeze(-1) - f.unsqueeze(-2)) / torch.where(close, torch.ones_like(gap), gap)
        K = torch.where(close, 0.5 * (df.unsqueeze(-1) + df.unsqueeze(-2)), divided)
        Gs = 0.5 * (G + G.transpose(-1, -2))
        inner = K * (Q.transpose(-1, -2) @ Gs @ Q)
        return Q @ inner @ Q.transpose(-1, -2), None


def _power(block: Tensor, p: float) -> Tensor:
    """``block^p`` for symmetric PSD blocks ``(n, d, d)`` or diagonal ones ``(n, d)`` (pseudo-power)."""
    if block.shape[0] == 0 or block.shape[-1] == 0:
        return block.clone()
    if block.dim() == 2:
        tol = block.shape[-1] * torch.finfo(block.dtype).eps * block.detach().abs().amax(-1, keepdim=True).clamp_min(1)
        keep = block > tol
        return torch.where(keep, torch.where(keep, block, torch.ones_like(block)) ** p, torch.zeros_like(block))
    sym = 0.5 * (block + block.transpose(-1, -2))
    return _SymmetricPower.apply(sym, p)


def _degree_roots(S, plan: _Plan, dtype, device, mode: str) -> list[Tensor]:
    """``D^{-1/2}`` (``mode="plain"``) or ``(D + I)^{-1/2}`` (``"augmented"``) per vertex group."""
    grad = plan.tracks_grad()
    key = ("degree_roots", mode, dtype, torch.device(device))
    token = tuple(g.token() for g in plan.groups)
    hit = None if grad else S._cache.get(key)
    if hit is not None and hit[0] == token:
        return hit[1]
    D = _vertex_blocks(plan, dtype, device)
    if mode == "augmented":
        D = [d + 1 if d.dim() == 2 else d + torch.eye(d.shape[-1], dtype=dtype, device=device) for d in D]
    R = [_power(d, -0.5) for d in D]
    if not grad:
        S._cache[key] = (token, R)
    return R


def degree_blocks(S, dtype: torch.dtype | None = None, device=None):
    """The vertex-diagonal blocks ``D_v = L[v, v]`` of the Laplacian (the sheaf's degree).

    ``D_v = Σ_{e ∋ v} w_e F_{v◁e}ᵀ F_{v◁e}`` (a self-loop contributes
    ``w_e (F_v − F_u)ᵀ (F_v − F_u)``). Differentiable with respect to stacked maps and
    weights that require grad.

    Returns
    -------
    Tensor ``(n_vertices, d, d)`` when every stalk has the same dim ``d``; otherwise a list
    of ``(d_v, d_v)`` tensors, one per vertex in vertex order.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> F = torch.eye(2).expand(3, 2, 2)
    >>> S = cs.Sheaf.from_arrays([2, 2, 2], [[0, 1, 2], [1, 2, 0]], F, 2 * F)
    >>> cs.operators.degree_blocks(S)[0]
    tensor([[5., 0.],
            [0., 5.]])
    """
    plan = _plan(S)
    dtype = dtype or S.dtype
    device = torch.device(device) if device is not None else S.device
    D = [b if b.dim() == 3 else torch.diag_embed(b) for b in _vertex_blocks(plan, dtype, device)]
    V = plan.vertices
    if V.uniform is not None:
        return D[0] if D else torch.zeros(0, 0, 0, dtype=dtype, device=device)
    out: list = [None] * V.n
    for (d, pos, _, _), blk in zip(V.groups(device), D):
        for k, p in enumerate(pos.tolist()):
            out[p] = blk[k]
    return out


def dirichlet_energy(S, x, normalized: Normalization = False) -> Tensor:
    """The Dirichlet energy ``½ Σ_e w_e ‖(δx)_e‖² = ½ xᵀ L x`` (per batch row for ``(B, C0)``).

    ``normalized=True`` / ``"augmented"`` evaluates it at ``D^{-1/2} x`` /
    ``(D + I)^{-1/2} x``, i.e. ``½ xᵀ Δ x`` with the normalised Laplacian ``Δ`` of
    [`apply_laplacian`][cellsheaf.operators.apply_laplacian]. Differentiable with respect to ``x``, stacked maps and weights.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf.from_arrays([1, 1], [[0], [1]], torch.ones(1, 1, 1), torch.ones(1, 1, 1))
    >>> cs.operators.dirichlet_energy(S, torch.tensor([1.0, 3.0]))
    tensor(2.)
    """
    mode = _check_normalized(normalized)
    xb, squeeze = _batch(S, x)
    if mode is not None:
        plan = _plan(S)
        R = _degree_roots(S, plan, xb.dtype, xb.device, mode)
        xb = _apply_vertex_blocks(plan, R, _columns(xb)).T
    r = apply_coboundary(S, xb)
    e = 0.5 * (edge_weights(S, r.dtype, r.device) * r * r).sum(-1)
    return e[0] if squeeze else e


# ---------------------------------------------------------------------------- assembled


def _remember(S, key: tuple, value) -> None:
    """Cache ``value`` under ``key``, dropping entries of the same kind (``key[0]``) for older values."""
    for k in [k for k in S._cache if isinstance(k, tuple) and k[0] == key[0]]:
        del S._cache[k]
    S._cache[key] = value


def _stack_token(S) -> tuple:
    """Identity and in-place versions of the stacked values: cached matrices are keyed by it, so an
    in-place change of a held tensor (an optimiser step) is never served a stale matrix."""
    return tuple(st.token() for st in S.stacks)



def _coboundary_csr(S, at=None) -> sp.csr_matrix:
    notice_cpu_route(S.device)  # every scipy route starts here
    key = ("delta_csr", _stack_token(S))
    if at is None and key in S._cache:
        return S._cache[key]
    plan = _plan(S)
    atf = None if at is None else as_flat(S, at)
    if atf is not None and atf.dim() != 1:
        raise ValueError(f"assembled operators are linearised at one point of shape ({S.C0},)")
    rows, cols, vals = [], [], []
    for g in plan.groups:
        Fu, Fv, _ = g.values(torch.float64, torch.device("cpu"))
        e = g.eidx.numpy()
        for F, idx, sign in ((Fu, g.uidx, -1.0), (Fv, g.vidx, 1.0)):
            M, c = F.detach().numpy(), idx.numpy()
            r = e if M.ndim == 2 else np.broadcast_to(e[:, :, None], M.shape)
            c = c if M.ndim == 2 else np.broadcast_to(c[:, None, :], M.shape)
            keep = M != 0
            if keep.all():
                rows.append(r.reshape(-1)); cols.append(c.reshape(-1)); vals.append(sign * M.reshape(-1))
            else:
                rows.append(r[keep]); cols.append(c[keep]); vals.append(sign * M[keep])
    for e, su, sv, se in plan.singles:
        for F, sl, sign in ((e.Fu, su, -1.0), (e.Fv, sv, 1.0)):
            if not F.linear:
                if atf is None:
                    raise ValueError(f"edge {e.name!r} has a nonlinear map: pass at= (a point of shape ({S.C0},))")
                F = F.linearize(atf[sl].detach())
            r, c, v = F.coo()
            rows.append(r + se.start); cols.append(c + sl.start); vals.append(sign * v)
    cat = (lambda a, dt: np.concatenate(a).astype(dt, copy=False)) if rows else (lambda a, dt: np.zeros(0, dt))
    index = np.int32 if max(S.C0, S.C1) < 2 ** 31 else np.int64  # scipy's own index type: no cast inside
    D = sp.csr_matrix((cat(vals, np.float64), (cat(rows, index), cat(cols, index))), shape=(S.C1, S.C0))
    if at is None:
        _remember(S, key, D)
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
            return torch.sparse_csr_tensor(*index, torch.tensor(csr.data, dtype=dtype), csr.shape, device=device,
                                           check_invariants=False)
    if layout != torch.sparse_coo:
        raise ValueError(f"layout must be torch.sparse_coo or torch.sparse_csr, got {layout}")
    coo = M.tocoo()
    idx = torch.as_tensor(np.vstack([coo.row, coo.col]).astype(np.int64))
    vals = torch.tensor(coo.data, dtype=dtype)  # a copy: M may be a cached operator
    return torch.sparse_coo_tensor(idx, vals, coo.shape, device=device, check_invariants=False).coalesce()


def _export(M: sp.spmatrix, format: str, dtype, device=None):
    """``M`` in the requested format; always a new object (never a cached matrix)."""
    if format == "scipy":
        return M.tocsr(copy=True)
    if format == "torch":
        return to_torch_sparse(M, dtype, device)
    if format == "dense":
        return torch.as_tensor(M.toarray()).to(dtype=dtype, device=device)
    raise ValueError(f"format must be 'torch', 'scipy' or 'dense', got {format!r}")


def _differentiable(S, at, format: str, what: str) -> bool:
    """Whether to assemble in torch with autograd: maps require grad, grad mode is on and the format
    can carry it. Otherwise a scipy build; a warning says when that detaches maps that require grad."""
    if not (torch.is_grad_enabled() and S.requires_grad):
        return False
    if format in ("torch", "dense") and at is None:
        return True
    why = "a scipy matrix cannot carry autograd" if format == "scipy" else "it is linearised at a point (at=)"
    warnings.warn(f"{what} is detached from the maps that require grad: {why}; use format='torch' or 'dense' "
                  "(or the matrix-free cellsheaf.operators functions) for gradients", stacklevel=3)
    return False


def _torch_matrix(rows: list, cols: list, vals: list, shape, format: str, dtype, device) -> Tensor:
    """A differentiable torch sparse COO (or dense) matrix from index and value pieces."""
    if rows:
        idx = torch.stack([torch.cat([r.reshape(-1) for r in rows]), torch.cat([c.reshape(-1) for c in cols])])
        val = torch.cat([v.reshape(-1) for v in vals])
    else:
        idx, val = torch.zeros(2, 0, dtype=torch.long, device=device), torch.zeros(0, dtype=dtype, device=device)
    M = torch.sparse_coo_tensor(idx, val, shape, check_invariants=False).coalesce()
    return M.to_dense() if format == "dense" else M


def _coboundary_torch(S, format: str, dtype, device) -> Tensor:
    """``δ`` assembled in torch, differentiable with respect to the maps."""
    plan = _plan(S)
    rows, cols, vals = [], [], []
    for g in plan.groups:
        idx = g.index(device)
        e = g.eidx.to(device)
        Fu, Fv, _ = g.values(dtype, device)
        for F, flat, d, sign in ((Fu, idx["uflat"], g.du, -1.0), (Fv, idx["vflat"], g.dv, 1.0)):
            c = flat.view(-1, d)
            if F.dim() == 2:
                rows.append(e); cols.append(c)
            else:
                rows.append(e.unsqueeze(2).expand(F.shape)); cols.append(c.unsqueeze(1).expand(F.shape))
            vals.append(sign * F)
    for e, su, sv, se in plan.singles:
        r = torch.arange(se.start, se.stop, device=device).unsqueeze(1)
        for F, sl, sign in ((e.Fu, su, -1.0), (e.Fv, sv, 1.0)):
            if not F.linear:
                raise ValueError(f"edge {e.name!r} has a nonlinear map: linearize the sheaf first (S.linearize(x))")
            M = F.matrix().to(dtype=dtype, device=device)
            c = torch.arange(sl.start, sl.stop, device=device).unsqueeze(0)
            rows.append(r.expand(M.shape)); cols.append(c.expand(M.shape)); vals.append(sign * M)
    return _torch_matrix(rows, cols, vals, (S.C1, S.C0), format, dtype, device)


def _laplacian_torch(S, mode: str | None, format: str, dtype, device) -> Tensor:
    """``L`` (or a normalised ``L``) assembled in torch from its blocks, differentiable in maps and weights:
    vertex blocks ``R D R`` and edge blocks ``R_u L_uv R_v`` (and transposes), ``R`` the degree roots."""
    plan = _plan(S)
    V = plan.vertices
    vgroups = V.groups(device)
    D = _vertex_blocks(plan, dtype, device, loops=False)
    R = _degree_roots(S, plan, dtype, device, mode) if mode is not None else None
    dense = lambda b: torch.diag_embed(b) if b.dim() == 2 else b  # noqa: E731
    rows, cols, vals = [], [], []
    for k, ((d, _, flat, _), blk) in enumerate(zip(vgroups, D)):
        f = flat.view(-1, d)
        blk = dense(blk)
        if R is not None:
            blk = dense(R[k]) @ blk @ dense(R[k])
        rows.append(f.unsqueeze(2).expand(blk.shape)); cols.append(f.unsqueeze(1).expand(blk.shape)); vals.append(blk)
    slot = {d: k for k, (d, *_) in enumerate(vgroups)}
    rowpos = vgroups[0][3] if vgroups else None
    edges = [(g.index(device)["uflat"].view(-1, g.du), g.index(device)["vflat"].view(-1, g.dv), g.index(device)["u"],
              g.index(device)["v"], g.du, g.dv, O) for g, O in zip(plan.groups, _edge_blocks(plan, dtype, device))]
    voff = torch.as_tensor(S._vertex_offsets(), device=device)
    for u, v, Mu, Mv, w in _single_blocks(plan, dtype, device):
        du, dv = Mu.shape[1], Mv.shape[1]
        pu, pv = torch.tensor([u], device=device), torch.tensor([v], device=device)
        edges.append(((voff[u] + torch.arange(du, device=device))[None], (voff[v] + torch.arange(dv, device=device))[None],
                      pu, pv, du, dv, (-w * Mu.T @ Mv)[None]))
    for uf, vf, up, vp, du, dv, O in edges:
        O = dense(O)
        if R is not None:
            O = dense(R[slot[du]])[rowpos[up]] @ O @ dense(R[slot[dv]])[rowpos[vp]]
        for a, b, blk in ((uf, vf, O), (vf, uf, O.transpose(1, 2))):
            rows.append(a.unsqueeze(2).expand(blk.shape)); cols.append(b.unsqueeze(1).expand(blk.shape))
            vals.append(blk)
    return _torch_matrix(rows, cols, vals, (S.C0, S.C0), format, dtype, device)


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
    dtype = dtype or S.dtype
    if _differentiable(S, at, format, "the coboundary"):
        return _coboundary_torch(S, format, dtype, S.device)
    return _export(_coboundary_csr(S, at), format, dtype)


def _laplacian_csr(S, at=None) -> sp.csr_matrix:
    key = ("L_csr", _stack_token(S))
    if at is None and key in S._cache:
        return S._cache[key]
    D = _coboundary_csr(S, at)
    w = edge_weights(S, torch.float64).detach().cpu().numpy()
    if not (w == 1).all():  # δᵀ W as δᵀ with its columns scaled (the entries of the product δᵀ diag(w))
        Dw = D.copy()
        Dw.data *= np.repeat(w, np.diff(D.indptr))
        Dw.eliminate_zeros()
    else:
        Dw = D
    L = (Dw.T @ D).tocsr()
    L.sort_indices()
    if at is None:
        _remember(S, key, L)
    return L


def _normalize(S, L: sp.csr_matrix, augmented: bool = False) -> sp.csr_matrix:
    """``R L R`` with ``R = D^{-1/2}`` (or ``(D + I)^{-1/2}``), ``D`` the vertex-diagonal blocks of ``L``
    (pseudo-inverse roots of singular blocks); vectorised over the vertices of each stalk dim."""
    coo = L.tocoo()
    voff = S._vertex_offsets()
    vr = np.searchsorted(voff, coo.row, side="right") - 1
    vc = np.searchsorted(voff, coo.col, side="right") - 1
    on = vr == vc
    dims = S._dim_array()
    rows, cols, vals = [], [], []
    for d in np.unique(dims).tolist():
        if d == 0:
            continue
        pos = np.nonzero(dims == d)[0]
        slot = np.full(dims.size, -1)
        slot[pos] = np.arange(pos.size)
        sel = on & (slot[vr] >= 0)
        blocks = np.zeros((pos.size, d, d))
        np.add.at(blocks, (slot[vr[sel]], coo.row[sel] - voff[vr[sel]], coo.col[sel] - voff[vr[sel]]), coo.data[sel])
        if augmented:
            blocks += np.eye(d)
        root = _power(torch.as_tensor(blocks), -0.5).numpy()
        base = voff[pos][:, None, None]
        rows.append(np.broadcast_to(base + np.arange(d)[None, :, None], root.shape).reshape(-1))
        cols.append(np.broadcast_to(base + np.arange(d)[None, None, :], root.shape).reshape(-1))
        vals.append(root.reshape(-1))
    cat = (lambda a: np.concatenate(a)) if rows else (lambda a: np.zeros(0))
    R = sp.csr_matrix((cat(vals), (cat(rows).astype(np.int64), cat(cols).astype(np.int64))), shape=L.shape)
    return (R @ L @ R).tocsr()


def laplacian(S, at=None, normalized: Normalization = False, format: str = "torch",
              dtype: torch.dtype | None = None):
    """The weighted sheaf Laplacian ``L = δᵀ W δ`` of shape ``(C0, C0)``.

    With all weights 1 (the default) this is ``δᵀδ``. ``normalized=True`` gives
    ``D^{-1/2} L D^{-1/2}`` with ``D`` the block diagonal of ``L`` (Hansen & Ghrist),
    ``normalized="augmented"`` gives ``(D + I)^{-1/2} L (D + I)^{-1/2}``.
    Arguments as in [`coboundary`][cellsheaf.operators.coboundary]. The result is always a new matrix (never a cached one).

    When maps or weights require grad (and grad mode is on), ``format="torch"``/``"dense"``
    are assembled in torch and keep autograd; ``format="scipy"`` (or ``at=``) cannot, and
    warns that it detaches.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.eye(1), torch.eye(1))
    >>> cs.operators.laplacian(S, format="dense")
    tensor([[ 1., -1.],
            [-1.,  1.]])
    """
    dtype = dtype or S.dtype
    mode = _check_normalized(normalized)
    if _differentiable(S, at, format, "the Laplacian"):
        return _laplacian_torch(S, mode, format, dtype, S.device)
    L = _laplacian_csr(S, at)
    if mode is not None:
        L = _normalize(S, L, augmented=mode == "augmented")
    return _export(L, format, dtype)


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

    ``boundary`` is a [`Boundary`][cellsheaf.boundary.Boundary], a resolved one, or a list of
    flat indices. Other arguments as in [`laplacian`][cellsheaf.operators.laplacian].

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
