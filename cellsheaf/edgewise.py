"""The energy gradient ``∇_x E`` and the local map gradients (Eq. 24) edge by edge, as a compiled plan.

For sheaves of few, large edges (compiled networks) the stacked operators of
[`cellsheaf.operators`][cellsheaf.operators] buy nothing: each edge's maps are applied once, its
own forces are pulled back through its own maps into its own end stalks, and its
trainable maps get ``forceᵀ x`` from its own discord alone. The plan decides once
per sheaf structure how every map is read and pulled back (a view of the state for
an identity or a selection of consecutive coordinates, one ``addmm_`` into the
gradient for a dense linear map, one ``addcmul_`` for an elementwise map such as
ReLU, the map's own ``apply``/``vjp`` for every other map: convolutions, norms,
merge maps), so a call is a short list of tensor operations with no per-edge
lookups. The maps are read at every call: weights changed in place are seen.

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf(); S.add_vertex("u", 1); S.add_vertex("v", 1)
>>> _ = S.add_edge("u", "v", 2 * torch.eye(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64), name="e")
>>> g, _ = cs.edgewise.plan(S).run(torch.tensor([[1.0, 5.0]], dtype=torch.float64))
>>> g                                  # discrepancy 5 − 2·1 = 3: (−2·3, 3)
tensor([[-6.,  3.]], dtype=torch.float64)
"""

from __future__ import annotations

import weakref
from typing import Callable, Hashable, Iterable

import torch
from torch import Tensor

from .energy import _potential
from .maps import Affine, Identity, Linear, ReLU, Select
from .maps.core import Elementwise

__all__ = ["EdgewisePlan", "plan", "EDGEWISE_MAX"]

#: sheaves with at most this many edges take their energy gradients edge by edge (the stacked operators of
#: `cellsheaf.operators` pay off for many small edges)
EDGEWISE_MAX = 64

_STORES: dict[int, tuple] = {}  # id(sheaf) -> (weak reference, its store)


def store(S) -> dict:
    """A dictionary kept for the sheaf ``S`` (by identity: a weak-keyed dictionary would compare sheaves by
    value) until ``S`` is collected; unlike ``S._cache`` it survives ``S.invalidate()``, so what it holds
    must check that it still fits the sheaf."""
    entry = _STORES.get(id(S))
    if entry is None or entry[0]() is not S:
        entry = _STORES[id(S)] = (weakref.ref(S), {})
        weakref.finalize(S, _STORES.pop, id(S), None)
    return entry[1]


def _consecutive(F: Select) -> int | None:
    """The first index of a selection of consecutive coordinates, else ``None``."""
    idx = F.indices
    if not F.d_out:
        return None
    a = int(idx[0])
    return a if torch.equal(idx, torch.arange(a, a + F.d_out)) else None


def _dense(F) -> bool:
    return isinstance(F, Linear) and not F.sparse


def _reader(F, k: int, d: int) -> Callable[[tuple], Tensor]:
    """``views -> F(views[k])`` (``views``: the stalks of a state); a view for an identity or a consecutive
    selection."""
    if isinstance(F, Identity):
        return lambda v: v[k]
    a = _consecutive(F) if isinstance(F, Select) else None
    if a is not None:
        b = a + F.d_out
        return (lambda v: v[k]) if (a, b) == (0, d) else (lambda v: v[k][:, a:b])
    if _dense(F):
        held = [None, None]  # the weight tensor and its transposed view, taken again if the map's tensor changes

        def linear(v: tuple) -> Tensor:
            x, W = v[k], F.weight
            if W is not held[0]:
                held[:] = W, W.t()
            return torch.mm(x, held[1]) if W.dtype == x.dtype and W.device == x.device else F.apply(x)
        return linear
    if _plain_affine(F):
        n = F.A.d_in

        def affine(v: tuple) -> Tensor:
            x, W, b = v[k], F.A.weight, F.b
            if W.dtype != x.dtype or W.device != x.device or b.dtype != x.dtype:
                return F.apply(x)
            return torch.addcmul(torch.mm(x[:, :n], W.t()), b, x[:, n:])
        return affine
    return lambda v: F.apply(v[k])


def _plain_affine(F) -> bool:
    """An affine map in the paper's layout, ``(W | diag b)`` on the stalk ``[x; 1]`` with a dense ``W``."""
    return isinstance(F, Affine) and F._plain


def _puller(F, k: int, d: int, sign: float) -> Callable[[tuple, tuple, Tensor], None]:
    """``(g, x, force) -> None`` adding ``sign · F'(x[k])ᵀ force`` into ``g[k]`` in place (``g``, ``x``: the
    stalks of the gradient and of the state)."""
    if isinstance(F, Identity):
        return (lambda g, x, f: g[k].add_(f)) if sign > 0 else (lambda g, x, f: g[k].sub_(f))
    a = _consecutive(F) if isinstance(F, Select) else None
    if a is not None:
        b = a + F.d_out
        if sign > 0:
            return (lambda g, x, f: g[k].add_(f)) if (a, b) == (0, d) else (lambda g, x, f: g[k][:, a:b].add_(f))
        return (lambda g, x, f: g[k].sub_(f)) if (a, b) == (0, d) else (lambda g, x, f: g[k][:, a:b].sub_(f))
    if _dense(F):
        def linear(g: tuple, x: tuple, f: Tensor) -> None:
            W = F.weight
            if W.dtype == f.dtype and W.device == f.device:
                g[k].addmm_(f, W, alpha=sign)
            else:
                g[k].add_(F.adjoint(f), alpha=sign)
        return linear
    if _plain_affine(F):
        n = F.A.d_in

        def affine(g: tuple, x: tuple, f: Tensor) -> None:
            W, b = F.A.weight, F.b
            if W.dtype != f.dtype or W.device != f.device or b.dtype != f.dtype:
                g[k].add_(F.adjoint(f), alpha=sign)
                return
            g[k][:, :n].addmm_(f, W, alpha=sign)
            g[k][:, n:].addcmul_(f, b, value=sign)
        return affine
    if type(F) is ReLU:  # its derivative is the 0/1 pattern x >= 0, multiplied in as it is
        return lambda g, x, f: g[k].addcmul_(x[k] >= 0, f, value=sign)
    if isinstance(F, Elementwise):
        return lambda g, x, f: g[k].addcmul_(F.derivative(x[k]), f, value=sign)
    if F.linear:
        return lambda g, x, f: g[k].add_(F.adjoint(f), alpha=sign)
    return lambda g, x, f: g[k].add_(F.vjp(x[k], f), alpha=sign)


def _discrepancy(e, ku: int, kv: int) -> Callable[[tuple], Tensor] | None:
    """``views -> F_v x_v − F_u x_u`` in one ``addmm`` and one ``addcmul_`` for a weight edge: ``F_v`` reads a view
    of its stalk (an identity or a selection of consecutive coordinates) and ``F_u`` is an affine map
    ``(W | diag b)`` on ``[x; 1]``; None for any other edge (its maps are read one by one)."""
    Fu, Fv = e.Fu, e.Fv
    a = 0 if isinstance(Fv, Identity) else _consecutive(Fv) if isinstance(Fv, Select) else None
    if a is None or not _plain_affine(Fu):
        return None
    stop, n = a + Fv.d_out, Fu.A.d_in

    def difference(v: tuple) -> Tensor:
        xv, xu, W, b = v[kv][:, a:stop], v[ku], Fu.A.weight, Fu.b
        if W.dtype is not xu.dtype or b.dtype is not xu.dtype or W.device != xu.device:
            return torch.sub(xv, Fu.apply(xu))
        return torch.addmm(xv, xu[:, :n], W.t(), alpha=-1).addcmul_(b, xu[:, n:], value=-1)
    return difference


class _Edge:
    """One edge of a plan: how its two maps are read and pulled back, and its force rule."""

    __slots__ = ("e", "name", "ku", "kv", "read_u", "read_v", "pull_u", "pull_v", "w", "quadratic", "difference")

    def __init__(self, e, position: dict, dims: list, skip: frozenset):
        self.e, self.name = e, e.name
        self.ku, self.kv = position[e.u], position[e.v]
        du, dv = dims[self.ku], dims[self.kv]
        self.read_u, self.read_v = _reader(e.Fu, self.ku, du), _reader(e.Fv, self.kv, dv)
        self.quadratic = e.potential is None or e.potential.quadratic
        self.difference = _discrepancy(e, self.ku, self.kv) if self.quadratic else None
        # with the quadratic potential the force on the u end is minus the force on the v end: pulled back by sign
        self.pull_u = None if e.u in skip else _puller(e.Fu, self.ku, du, -1.0 if self.quadratic else 1.0)
        self.pull_v = None if e.v in skip else _puller(e.Fv, self.kv, dv, 1.0)
        self.w = float(e.weight)

    def forces(self, views: tuple) -> tuple[Tensor, Tensor | None]:
        """``(g_v, g_u)`` at the stalks ``views``; ``g_u`` is ``None`` for the quadratic potential (it is ``−g_v``)."""
        if self.difference is not None:
            gv = self.difference(views)
            return (gv if self.w == 1.0 else gv.mul_(self.w)), None
        av, au = self.read_v(views), self.read_u(views)
        if self.quadratic:
            gv = torch.sub(av, au)
            return (gv if self.w == 1.0 else gv.mul_(self.w)), None
        pv, pu = _potential(self.e, "pair_grad", av, au)
        return self.w * pv, self.w * pu


class EdgewisePlan:
    """The edge-by-edge gradient of a sheaf's energy, compiled once per structure and skipped set.

    ``run(x, maps, at)`` returns ``(g, grads)``: ``g = ∇_x E`` at ``x`` (``(B, C0)``) with nothing
    pulled back into the vertices of ``skip`` (their entries are zero), and ``grads`` the local
    gradient of Eq. (24), ``forceᵀ x`` summed over the batch and masked by the map's ``mask``, for every
    ``(edge, side)`` key of ``maps`` (the stalks of ``at`` when given). The state is cut into its
    stalks by one ``split`` (views); every edge then works on views. Build it with [`plan`][cellsheaf.edgewise.plan].
    """

    def __init__(self, S, skip: Iterable[Hashable] = ()):
        skip = frozenset(skip)
        self.dims = [S.dim(v) for v in S.vertices]
        position = {v: k for k, v in enumerate(S.vertices)}
        self.edges = [_Edge(e, position, self.dims, skip) for e in S.edge_items()]
        self.pulls = any(p.pull_u is not None or p.pull_v is not None for p in self.edges)

    def run(self, x: Tensor, maps=(), at: Tensor | None = None, tensors=None,
            out: Tensor | None = None) -> tuple[Tensor, dict]:
        """``(∇_x E, {(edge, side): Eq. 24})`` at ``x`` (``(C0,)`` or ``(B, C0)``); see the class notes.

        ``tensors``, optional: an accumulator of the local rule of parameter tensors held by the maps (with
        ``add(F, xs, force, sign)``, as
        [`cellsheaf.learning.local_gradients`][cellsheaf.learning.local_gradients] keeps one); every map
        gives it its share from the same forces, ``xs`` its stalk (of ``at`` when given). ``out``, optional: a
        ``(B, C0)`` tensor to write the gradient into (a buffer reused from call to call)."""
        xb = x if x.dim() == 2 else x.unsqueeze(0)
        views = torch.split_with_sizes(xb, self.dims, 1)
        atb = None if at is None else at if at.dim() == 2 else at.unsqueeze(0)
        src = views if atb is None else torch.split_with_sizes(atb, self.dims, 1)
        g = torch.zeros_like(xb) if out is None else out.zero_()
        gviews = torch.split_with_sizes(g, self.dims, 1) if self.pulls else ()
        wanted: dict = {}
        for name, side in maps:
            wanted.setdefault(name, []).append(side)
        grads = {}
        for p in self.edges:
            gv, gu = p.forces(views)
            if p.pull_v is not None:
                p.pull_v(gviews, views, gv)
            if p.pull_u is not None:
                p.pull_u(gviews, views, gv if gu is None else gu)
            for side in wanted.get(p.name, ()):
                grads[(p.name, side)] = _eq24(p.e, side, gv, gu, src[p.kv if side == "v" else p.ku])
            if tensors is not None:  # each map's closed-form parameter_vjp (one product for a dense or affine map)
                tensors.add(p.e.Fv, src[p.kv], gv)
                if gu is None:  # the quadratic potential: the force on u is −g_v
                    tensors.add(p.e.Fu, src[p.ku], gv, -1.0)
                else:
                    tensors.add(p.e.Fu, src[p.ku], gu)
        return (g if x.dim() == 2 else g[0]), grads


def _eq24(e, side: str, gv: Tensor, gu: Tensor | None, xs: Tensor) -> Tensor:
    """Eq. (24) for the map on ``side`` of ``e``: ``forceᵀ x`` over the batch, masked by the map's ``mask``."""
    F = e.Fv if side == "v" else e.Fu
    xs = xs if xs.dtype == gv.dtype else xs.to(gv.dtype)
    if side == "v":
        G = gv.T @ xs
    elif gu is None:  # the quadratic potential: the force on u is −g_v
        G = torch.mm(gv.T, xs).neg_()
    else:
        G = gu.T @ xs
    m = F.mask
    if m is None:
        return G
    return G.mul_(m if m.dtype == G.dtype and m.device == G.device else m.to(dtype=G.dtype, device=G.device))


def plan(S, skip: Iterable[Hashable] = ()) -> EdgewisePlan:
    """The [`EdgewisePlan`][cellsheaf.edgewise.EdgewisePlan] of ``S`` leaving out the vertices ``skip``; cached while the
    sheaf keeps its vertices and edge records (replacing a map, adding an edge or a vertex rebuilds it;
    changing map tensors in place does not need to).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("u", 1); S.add_vertex("v", 1)
    >>> _ = S.add_edge("u", "v", cs.maps.Linear(torch.ones(1, 1), trainable=True), torch.eye(1), name="e")
    >>> cs.edgewise.plan(S, skip={"u"}).run(torch.tensor([[2.0, 1.0]]), [("e", "u")])
    (tensor([[ 0., -1.]]), {('e', 'u'): tensor([[2.]])})
    """
    records = tuple(e for seg in S._segments if isinstance(seg, dict) for e in seg.values())
    dims = tuple(S._dims.items())
    cached = store(S).get("edgewise")
    if cached is None or cached[0] != dims or len(cached[1]) != len(records) \
            or any(a is not b for a, b in zip(cached[1], records)) or len(records) != len(S.edges):
        cached = store(S)["edgewise"] = (dims, records, {})
    key = frozenset(skip)
    p = cached[2].get(key)
    if p is None:
        p = cached[2][key] = EdgewisePlan(S, key)
    return p
