"""Propagation: solving a *determined* sheaf edge by edge, in topological order.

A sheaf with boundary data is *determined* when every free coordinate is
defined by exactly one edge whose map on that coordinate's side is a (scaled)
coordinate selection — ``Identity``, ``Select``, ``Scaled``, ``Diagonal`` or any
linear map with one nonzero per row in distinct columns — and these edges can be
ordered so that each one reads only coordinates that are fixed or defined
earlier. Then ``δ_Ω`` is square and triangular in that order (unitriangular for
plain selections, Lemma 3.2 of the paper), the zero-discord cochain exists and is
unique, and forward substitution finds it: for ``e = u -> v`` with
``F_v = Select(J)``, ``x_v[J] = F_u(x_u)``. Every compiled feedforward network,
including skip connections compiled with merge vertices, is determined; pins and
penalty edges make ``δ_Ω`` tall and the sheaf not determined.

The schedule depends only on the structure and the set of fixed coordinates; it
is cached on the sheaf (``S._cache``) and rebuilt when the sheaf changes. A
[`PropagationPlan`][cellsheaf.propagation.PropagationPlan] ([`plan`][cellsheaf.propagation.plan]) compiles the schedule into a short list of tensor
operations: index tensors and views computed once, affine edges applied as one
``addmm`` with the contribution of constant boundary columns (the "ones" of a
compiled network) as its bias, no host synchronisation while it runs, and one
fused finiteness check at the end that can be switched off.

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf(); S.add_vertex("x", 2); S.add_vertex("h", 2)
>>> _ = S.add_edge("x", "h", cs.maps.ReLU(2), cs.maps.Identity(2))
>>> b = cs.Boundary().fix("x", torch.tensor([[1.0, -1.0]], dtype=torch.float64))
>>> cs.propagation.is_determined(S, b)
(True, '')
>>> cs.minimize(S, b, method="propagate").x["h"]
tensor([[1., 0.]], dtype=torch.float64)
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Hashable

import numpy as np
import torch
from torch import Tensor

from .boundary import Boundary, ResolvedBoundary
from .cochain import check_finite
from .maps import Activation, Affine, Compose, Identity, Linear, Map, ReLU, Select, Sigmoid, Tanh

__all__ = ["NotDeterminedError", "PropagationStep", "PropagationPlan", "BoundPlan", "schedule", "plan", "is_determined",
           "determined_part", "propagate"]

_SELECTION_MAX = 10_000_000  # largest d_out * d_in inspected for a scaled-selection pattern


class NotDeterminedError(ValueError):
    """The sheaf with this boundary is not determined, so propagation does not apply; the message says why."""


@dataclass(frozen=True)
class PropagationStep:
    """One edge of the schedule: ``x[targets] = F(x[source]) / scale``.

    ``edge`` is the edge name, ``side`` the end it defines (``"u"`` or ``"v"``),
    ``F`` the map of the other end, ``source`` that end's slice of the 0-cochain.
    """

    edge: Hashable
    side: str
    targets: Tensor
    scale: Tensor | None
    F: Map
    source: slice
    span: slice | None = None  # ``targets`` as a slice when they are consecutive (a cheaper write)
    split: Tensor | None = None  # boundary columns of the source, for a dense linear F (see _apply)
    # ``(G, cols)``: F's derivative on the free columns of its source, read through G on ``x[:, cols]``
    # (`Map.free_part`: an affine map's linear part on its neural block); the sweeps use it
    reduced: tuple | None = None


def _as_index(cols: Tensor) -> slice | Tensor:
    """Sorted column indices as a slice when consecutive (a view instead of a gather)."""
    if len(cols) and int(cols[-1]) - int(cols[0]) + 1 == len(cols):
        return slice(int(cols[0]), int(cols[-1]) + 1)
    return cols


def _runs(idx: Tensor) -> list[slice]:
    """Sorted indices as runs of consecutive ones (slices)."""
    if not len(idx):
        return []
    bounds = [0] + (torch.nonzero(idx[1:] - idx[:-1] != 1).flatten() + 1).tolist() + [len(idx)]
    return [slice(int(idx[a]), int(idx[b - 1]) + 1) for a, b in zip(bounds[:-1], bounds[1:])]


def _split(F: Map, source: slice, is_fixed: np.ndarray) -> Tensor | None:
    """The boundary columns (within its source stalk) of a dense linear ``F``, or None."""
    if not (isinstance(F, Linear) and not F.sparse):
        return None
    cols = np.nonzero(is_fixed[source])[0]
    return torch.as_tensor(cols, dtype=torch.long) if len(cols) else None


def _reduced(F: Map, source: slice, is_fixed: np.ndarray) -> tuple | None:
    """``(G, cols)`` for a step whose map ``F`` reads fixed columns of its source through a part of its own
    (`Map.free_part`), with ``cols`` the cochain columns of ``G``'s input; None otherwise."""
    part = F.free_part(is_fixed[source])
    if part is None:
        return None
    G, local = part
    return G, slice(source.start + local.start, source.start + local.stop)


def _apply(s: PropagationStep, xs: Tensor) -> Tensor:
    """``F(xs)`` for source values ``xs`` (``(B, d)``).

    A dense linear ``F`` whose boundary columns hold the same values for every item
    of the batch (e.g. the "ones" of an affine map) takes their contribution as one
    matrix-vector product ``F[:, shared] u``; only the other columns meet the batch.
    """
    if s.split is None or xs.shape[0] < 2:
        return s.F.apply(xs)
    fixed = s.split.to(xs.device)
    u = xs[:, _as_index(fixed)]
    same = (u == u[:1]).all(0)
    if not bool(same.any()):
        return s.F.apply(xs)
    keep = torch.ones(xs.shape[1], dtype=torch.bool, device=xs.device)
    keep[fixed[same]] = False
    W = s.F.weight.to(dtype=xs.dtype, device=xs.device)
    shared, rest = _as_index(fixed[same]), _as_index(torch.nonzero(keep).flatten())
    return xs[:, rest] @ W[:, rest].T + W[:, shared] @ u[0, same]


def _scaled_selection(F: Map) -> tuple[np.ndarray, np.ndarray] | None:
    """``(columns, scales)`` if ``F`` picks one input coordinate per output row with a nonzero factor."""
    cheap = isinstance(F, (Identity, Select))  # coo() without a matrix, whatever the size
    if not F.linear or F.d_out == 0 or F.d_out > F.d_in or (not cheap and F.d_out * F.d_in > _SELECTION_MAX):
        return None
    r, c, v = F.coo()
    if len(r) != F.d_out or len(np.unique(r)) != F.d_out or len(np.unique(c)) != F.d_out or np.any(v == 0):
        return None
    order = np.argsort(r)
    return np.asarray(c)[order], np.asarray(v, dtype=np.float64)[order]


def _edge_reason(e) -> str | None:
    """Why edge ``e`` cannot define coordinates by zero discord regardless of structure, or None."""
    if e.potential is None or e.potential.quadratic:
        return None
    if not e.potential.difference:
        return (f"edge {e.name!r} carries the two-argument potential {e.potential!r}, whose minimiser is not "
                "zero discrepancy")
    g = e.potential.grad(torch.zeros(1, e.dim, dtype=torch.float64))
    if bool(g.abs().max() > 0):
        return f"edge {e.name!r} has a potential {e.potential!r} that is not minimised at zero discrepancy"
    return None


def _coordinate_name(S, i: int) -> str:
    for v in S.vertices:
        sl = S.vertex_slice(v)
        if sl.start <= i < sl.stop:
            return f"coordinate {i - sl.start} of vertex {v!r}"
    return f"coordinate {i}"  # pragma: no cover - every index lies in some stalk


def _order(S, fixed: Tensor, names) -> tuple[list[PropagationStep], np.ndarray, set, dict]:
    """Kahn's algorithm on the edges ``names``: define coordinates as soon as an edge's source end is fully known.

    Returns the steps, which coordinates they leave known, the edges used and every edge's candidate sides.
    """
    known = np.zeros(S.C0, dtype=bool)
    known[fixed.numpy()] = True
    is_fixed = known.copy()
    unknown_count = {v: int((~known[S.vertex_slice(v)]).sum()) for v in S.vertices}
    candidates = {}
    for name in names:
        e = S.edge(name)
        sides = []
        for side, F, own, other in (("v", e.Fv, e.v, e.u), ("u", e.Fu, e.u, e.v)):
            sel = _scaled_selection(F) if own != other else None
            if sel is not None:
                cols, scales = sel
                targets = S.vertex_slice(own).start + cols
                other_F = e.Fu if side == "v" else e.Fv
                sides.append((side, own, other, targets, scales, other_F))
        candidates[name] = sides
    incident: dict = {v: [] for v in S.vertices}
    for name in names:
        e = S.edge(name)
        incident[e.u].append(name)
        incident[e.v].append(name)
    steps, used = [], set()
    queue = deque(names)
    while queue:
        name = queue.popleft()
        if name in used:
            continue
        for side, own, other, targets, scales, other_F in candidates[name]:
            if unknown_count[other] or known[targets].any():
                continue
            known[targets] = True
            unknown_count[own] -= len(targets)
            scale = None if np.all(scales == 1.0) else torch.as_tensor(scales)
            consecutive = len(targets) and bool(np.all(np.diff(targets) == 1))
            span = slice(int(targets[0]), int(targets[0]) + len(targets)) if consecutive else None
            source = S.vertex_slice(other)
            steps.append(PropagationStep(name, side, torch.as_tensor(targets, dtype=torch.long), scale, other_F,
                                         source, span, _split(other_F, source, is_fixed),
                                         _reduced(other_F, source, is_fixed)))
            used.add(name)
            if unknown_count[own] == 0:
                queue.extend(incident[own])
            break
    return steps, known, used, candidates


def _build(S, fixed: Tensor) -> list[PropagationStep]:
    """The schedule over all edges, or `NotDeterminedError` saying why there is none."""
    for e in S.edge_items():
        reason = _edge_reason(e)
        if reason:
            raise NotDeterminedError(reason)
    steps, known, used, candidates = _order(S, fixed, list(S.edges))
    if not known.all():
        i = int(np.nonzero(~known)[0][0])
        for name, sides in candidates.items():
            for side, own, other, targets, scales, other_F in sides:
                if i in targets and name not in used and known[targets].any():
                    raise NotDeterminedError(
                        f"free {_coordinate_name(S, i)} would be defined by edge {name!r}, but that edge also "
                        "selects coordinates that are fixed or defined by another edge (a hard pin on a computed "
                        "coordinate over-constrains them: δ_Ω is tall)")
        raise NotDeterminedError(
            f"free {_coordinate_name(S, i)} is not defined by any edge: no edge whose map on its side is a coordinate "
            "selection (Identity/Select) computes it from already-determined values (or such edges form a cycle)")
    spare = [n for n in S.edges if n not in used]
    if spare:
        raise NotDeterminedError(
            f"edge {spare[0]!r} is not needed to define any free coordinate, so it over-constrains them (δ_Ω is "
            "tall: a pin, penalty or reluctance edge, or a coordinate selected by two edges)")
    return steps


def _schedule(S, fixed: Tensor) -> list[PropagationStep]:
    key = ("propagation", fixed.cpu().numpy().tobytes())
    cached = S._cache.get(key)
    if cached is None:
        try:
            cached = _build(S, fixed.cpu())
        except NotDeterminedError as err:
            cached = err
        S._cache[key] = cached
    if isinstance(cached, NotDeterminedError):
        raise NotDeterminedError(str(cached))
    return cached


def _fixed_of(S, boundary) -> Tensor:
    if isinstance(boundary, ResolvedBoundary):
        return boundary.fixed
    return (boundary or Boundary()).resolve(S).fixed


def schedule(S, boundary: Boundary | ResolvedBoundary | None = None) -> list[PropagationStep]:
    """The propagation order of a determined sheaf; raises [`NotDeterminedError`][cellsheaf.propagation.NotDeterminedError] saying why not.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", 2 * torch.eye(1), torch.eye(1), name="e")
    >>> [s.edge for s in cs.propagation.schedule(S, cs.Boundary().fix("a", [1.0]))]
    ['e']
    """
    return _schedule(S, _fixed_of(S, boundary))


def is_determined(S, boundary: Boundary | ResolvedBoundary | None = None) -> tuple[bool, str]:
    """``(True, "")`` if propagation applies, else ``(False, reason)``.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.eye(1), torch.eye(1))
    >>> cs.propagation.is_determined(S)[0]
    False
    """
    try:
        schedule(S, boundary)
    except NotDeterminedError as err:
        return False, str(err)
    return True, ""


def determined_part(S, boundary: Boundary | ResolvedBoundary | None = None) -> list[PropagationStep] | None:
    """The schedule of the heaviest determined subsheaf of quadratic edges, or None if there is none.

    Edges are admitted by decreasing stiffness (weight times the square of the
    smallest factor of their selection side) until the admitted quadratic edges
    define every free coordinate; the edges left out (soft pins, penalty and loss
    edges) are the rest of the energy, and must be softer than the determined part
    (weight times largest squared map entry below its smallest stiffness), so that
    the determined part dominates the curvature. The steps' edges form a
    square, triangular ``δ_Ω`` (used to precondition Gauss–Newton steps, see
    [`cellsheaf.gauss_newton`][cellsheaf.gauss_newton]). Cached on the sheaf like [`schedule`][cellsheaf.propagation.schedule].

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("x", 1); S.add_vertex("y", 1); S.add_vertex("t", 1)
    >>> _ = S.add_edge("x", "y", torch.eye(1), torch.eye(1), name="net")
    >>> _ = S.add_edge("y", "t", torch.eye(1), torch.eye(1), name="pin", weight=1e-6)
    >>> b = cs.Boundary().fix("x", [1.0]).fix("t", [2.0])
    >>> [s.edge for s in cs.propagation.determined_part(S, b)]
    ['net']
    """
    return _determined_part(S, _fixed_of(S, boundary))


def _stiffness(e) -> float:
    """``w_e · s²`` for the smallest factor ``s`` of the stiffer selection side of edge ``e`` (0 if it has none)."""
    sels = [_scaled_selection(F) for F, own, other in ((e.Fv, e.v, e.u), (e.Fu, e.u, e.v)) if own != other]
    return e.weight * max((float(np.abs(sel[1]).min()) ** 2 for sel in sels if sel is not None), default=0.0)


def _strength(e) -> float:
    """``w_e · max |entry|²`` over the linear maps of edge ``e`` (a nonlinear map counts as 1)."""
    peak = [float(np.abs(F.coo()[2]).max(initial=0.0)) if F.linear else 1.0 for F in (e.Fu, e.Fv)]
    return e.weight * max(peak) ** 2


def _determined_part(S, fixed: Tensor) -> list[PropagationStep] | None:
    key = ("determined part", fixed.cpu().numpy().tobytes())
    if key not in S._cache:
        stiff = {e.name: _stiffness(e) for e in S.edge_items() if e.potential is None or e.potential.quadratic}
        S._cache[key] = None
        for k in sorted(set(stiff.values()) - {0.0}, reverse=True):
            steps, known, _, _ = _order(S, fixed.cpu(), [name for name, v in stiff.items() if v >= k])
            if known.all():
                used = {s.edge for s in steps}
                rest = max((_strength(e) for e in S.edge_items() if e.name not in used), default=0.0)
                S._cache[key] = steps if rest < min(stiff[name] for name in used) else None
                break
    return S._cache[key]


# ====================================================================== compiled plans

#: elementwise maps with an ``out=`` kernel (one pass, written straight into the cochain)
_OUT_KERNELS = {ReLU: partial(torch.clamp_min, min=0.0), Sigmoid: torch.sigmoid, Tanh: torch.tanh}
_ACTIVATION_KERNELS = {torch.nn.functional.gelu: torch._C._nn.gelu, torch.nn.functional.silu: torch._C._nn.silu}


def _out_kernel(G: Map):
    """``kernel(v, out=...)`` writing ``G(v)`` into the cochain directly (ReLU, sigmoid, tanh, GELU, SiLU)."""
    if isinstance(G, Activation):
        return _ACTIVATION_KERNELS.get(G._kind.fn) if not G.options else None
    return _OUT_KERNELS.get(type(G))


def _narrow(F: Map, source: slice) -> tuple[Map, slice | Tensor]:
    """``(G, cols)`` with ``F(x[:, source]) == G(x[:, cols])``: a selection of consecutive coordinates
    (``Select``, or the inner map of ``Compose(outer, Select)``) becomes a view of the cochain."""
    inner = F.inner if isinstance(F, Compose) else F
    if isinstance(inner, Select) and inner.d_out:
        a, n = int(inner.indices[0]), inner.d_out
        if torch.equal(inner.indices, torch.arange(a, a + n)):
            return (F.outer if isinstance(F, Compose) else Identity(n)), slice(source.start + a, source.start + a + n)
    return F, source


def _possible_entries(F: Linear) -> np.ndarray:
    """Where a dense linear map can be nonzero when a plan runs: a trainable map's mask (all entries without
    one) or current nonzeros; every entry of a non-trainable map, whose tensor may be edited in place after
    the plan is built (a zero bias block written later must still reach the output)."""
    nz = F.weight.detach().cpu().numpy() != 0
    if not F.trainable:
        return np.ones_like(nz)
    return nz | (np.ones_like(nz) if F.mask is None else F.mask.detach().cpu().numpy() != 0)


def _affine(F: Linear, source: slice, const: np.ndarray, values: np.ndarray):
    """An affine reading of a dense linear ``F`` whose source holds constant coordinates.

    Returns ``(rest, bias, view)``: ``F(x) = x[rest] @ W[:, rest]ᵀ + bias(W)`` with ``rest`` the
    non-constant columns (a slice within the source) and ``bias(W)`` the constant columns'
    contribution from the current weights (``None`` when nothing reads them); ``view`` says
    that ``bias(W)`` is a view of ``W`` (for the extended map ``(A | diag b)`` of an affine
    layer reading ones: ``b`` itself). ``None`` when the non-constant columns are not consecutive.
    """
    cmask = const[source]
    rest = np.nonzero(~cmask)[0]
    if len(rest) and rest[-1] - rest[0] + 1 != len(rest):
        return None
    rest_sl = slice(int(rest[0]), int(rest[-1]) + 1) if len(rest) else slice(0, 0)
    cols = np.nonzero(cmask)[0]
    block = _possible_entries(F)[:, cols]
    if not block.any():
        return rest_sl, None, False
    vals = values[source][cols]
    rows, k = np.nonzero(block)
    off = cols[k] - rows
    if len(rows) == F.d_out and np.array_equal(rows, np.arange(F.d_out)) and np.all(off == off[0]):
        o = int(off[0])
        if np.all(vals[k] == 1.0):
            return rest_sl, lambda W: W.diagonal(o), True
        v = torch.as_tensor(vals[k])
        return rest_sl, lambda W: W.diagonal(o) * v.to(dtype=W.dtype, device=W.device), False
    idx, v = torch.as_tensor(cols), torch.as_tensor(vals)
    return rest_sl, lambda W: W[:, idx.to(W.device)] @ v.to(dtype=W.dtype, device=W.device), False


def _structured_affine(F: Affine, source: slice, tgt: slice, const: np.ndarray, values: np.ndarray):
    """``bind(x) -> op`` for an `Affine` map ``(A | diag b)`` whose ones block is constant and whose
    neural block is not: ``addmm(b ⊙ ones, x, Aᵀ)`` for a dense ``A``, ``A·x + b ⊙ ones`` for any
    other linear ``A`` (convolutions, pooling: applied as operators). ``None`` otherwise."""
    n = F.A.d_in
    if const[source][:n].any() or (F.block is not None and not const[source][F.block].all()):
        return None
    nsl = slice(source.start, source.start + n)
    ones = None if F.block is None else values[source][F.block]
    unit = ones is None or bool(np.all(ones == 1.0))
    v = None if unit else torch.as_tensor(ones)

    def bias(x: Tensor) -> Tensor | None:
        b = F.bias(x)  # broadcast (a per-channel conv bias) and centred (a batch norm) by the map
        return b if b is None or v is None else b * v.to(dtype=x.dtype, device=x.device)

    dense = isinstance(F.A, Linear) and not F.A.sparse
    full = F.b is not None and F.b.numel() == F.d_out and F.center is None  # F.b is the bias as it is

    def bind(x: Tensor):
        a, o = x[:, nsl], x[:, tgt]
        if dense and unit and full and (F.A.weight.dtype, F.A.weight.device, F.b.dtype) == \
                (x.dtype, x.device, x.dtype):
            return partial(torch.addmm, F.b, a, F.A.weight.T, out=o)

        def op() -> None:
            c = bias(x)
            if dense:
                W = F.A.weight.to(dtype=x.dtype, device=x.device)
                torch.mm(a, W.T, out=o) if c is None else torch.addmm(c, a, W.T, out=o)
            else:
                y = F.A.apply(a)
                o.copy_(y) if c is None else torch.add(y, c, out=o)
        return op
    return bind


def _step_binder(s: PropagationStep, const: np.ndarray, values: np.ndarray):
    """``bind(x) -> op``: the tensor operations of one step on the cochain ``x``, ``op()`` writing its
    targets in place. Views of ``x`` (and of the weights) are taken when binding, so an op bound
    once runs with no Python-side indexing."""
    tgt = s.span if s.span is not None else s.targets
    F, scale = s.F, s.scale
    if isinstance(F, Linear) and not F.sparse and scale is None and s.span is not None:
        split = _affine(F, s.source, const, values)
        if split is not None:
            rest, bias, view = split
            src = slice(s.source.start + rest.start, s.source.start + rest.stop)

            def bind_affine(x: Tensor):
                a, o = x[:, src], x[:, tgt]
                W = F.weight
                if (W.dtype, W.device) == (x.dtype, x.device):
                    Wt = W[:, rest].T
                    if bias is None:
                        return partial(torch.mm, a, Wt, out=o)
                    if view:  # b is a strided view of W (its diagonal block): copied out contiguous, then
                        b, c = bias(W), torch.empty(W.shape[0], dtype=W.dtype, device=W.device)  # broadcast fast

                        def affine() -> None:
                            torch.addmm(c.copy_(b), a, Wt, out=o)
                        return affine
                    return lambda: torch.addmm(bias(W), a, Wt, out=o)

                def converted():  # weights in another dtype/device: converted at every run
                    Wc = F.weight.to(dtype=x.dtype, device=x.device)
                    if bias is None:
                        torch.mm(a, Wc[:, rest].T, out=o)
                    else:
                        torch.addmm(bias(Wc), a, Wc[:, rest].T, out=o)
                return converted
            return bind_affine
    if isinstance(F, Affine) and scale is None and s.span is not None:
        bind = _structured_affine(F, s.source, tgt, const, values)
        if bind is not None:
            return bind
    G, cols = _narrow(F, s.source)
    kernel = _out_kernel(G)
    if kernel is not None and scale is None and s.span is not None:
        return lambda x: partial(kernel, x[:, cols], out=x[:, tgt])

    def bind_generic(x: Tensor):
        t = tgt if isinstance(tgt, slice) or tgt.device == x.device else tgt.to(x.device)
        v = x[:, cols]
        sc = None if scale is None else scale.to(dtype=x.dtype, device=x.device)

        def generic() -> None:
            raw = G.apply(v)
            x[:, t] = raw if sc is None else raw / sc.to(raw.dtype)
        return generic
    return bind_generic


class PropagationPlan:
    """A propagation schedule compiled into tensor operations, for one boundary pattern.

    Built by [`plan`][cellsheaf.propagation.plan] (once per sheaf and pattern, cached). ``run(x)`` fills the
    constant and free coordinates of a batch of cochains ``x`` (``(B, C0)``, the other
    fixed coordinates already set) in place: per step one kernel where the map allows
    it (an affine edge is one ``addmm`` into the cochain, an activation one
    elementwise kernel), no Python lists and no host synchronisation; then, unless
    ``check=False``, one reduction checks that everything is finite. [`bound`][cellsheaf.propagation.PropagationPlan.bound] keeps a
    cochain buffer per batch shape with every view taken once, for repeated runs. The
    plan holds the maps, not their matrices: weights changed in place are read at every
    run (a map's entries outside its trainable mask must stay zero).

    Attributes
    ----------
    steps
        The schedule ([`PropagationStep`][cellsheaf.propagation.PropagationStep]), in order.
    fixed, free : sorted index tensors of the fixed and free coordinates.
    constant, constant_values : the fixed coordinates whose values were given when
        the plan was built (the same for every item and call), and those values.
    reads_free : one bool per step: whether its source stalk holds a free coordinate (the
        sweeps of [`cellsheaf.gauss_newton`][cellsheaf.gauss_newton] skip the others' Jacobian products).
    fixed_vertices : the vertices with no free coordinate.
    """

    def __init__(self, S, fixed: Tensor, constant: Tensor, constant_values: Tensor,
                 steps: list[PropagationStep] | None = None):
        self.S = S
        self.fixed = fixed.cpu()
        self.steps = _schedule(S, self.fixed) if steps is None else steps
        mask = torch.ones(S.C0, dtype=torch.bool)
        mask[self.fixed] = False
        self.free = torch.nonzero(mask).flatten()
        self.constant, self.constant_values = constant.cpu(), constant_values.detach().cpu().double()
        const = np.zeros(S.C0, dtype=bool)
        values = np.zeros(S.C0)
        const[self.constant.numpy()] = True
        values[self.constant.numpy()] = self.constant_values.numpy()
        self._binders = [_step_binder(s, const, values) for s in self.steps]
        self._names = [f"the map {'Fu' if s.side == 'v' else 'Fv'} of edge {s.edge!r}" for s in self.steps]
        self._maps = [s.F for s in self.steps]
        self._tensors = [t for F in self._maps for t in F.tensors()]
        v = self.constant_values
        self._fill = float(v[0]) if len(v) and bool((v == v[0]).all()) else None
        # one value in a few runs of consecutive columns: a fill of each (an index_fill_ across columns is slow)
        runs = _runs(self.constant)
        self._fill_runs = runs if self._fill is not None and len(runs) <= 8 else None
        self.inexact = [s for s in self.steps if s.scale is not None]
        self.reads_free = [bool(mask[s.source].any()) for s in self.steps]
        self.fixed_vertices = {v for v in S.vertices if not bool(mask[S.vertex_slice(v)].any())}
        self._bound: dict = {}

    def needs_autograd(self, x: Tensor) -> bool:
        """Whether a run at ``x`` must be differentiable (then [`propagate`][cellsheaf.propagation.propagate] runs instead: ``run`` writes in place)."""
        return torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in self._tensors))

    def _write_constants(self, x: Tensor) -> None:
        if self._fill_runs is not None:
            for run in self._fill_runs:
                x[:, run].fill_(self._fill)
        elif len(self.constant):
            idx = self.constant if self.constant.device == x.device else self.constant.to(x.device)
            if self._fill is not None:
                x.index_fill_(1, idx, self._fill)
            else:
                x[:, idx] = self.constant_values.to(dtype=x.dtype, device=x.device)

    def _execute(self, ops, x: Tensor, check: bool, watch: list[Tensor] | None = None) -> Tensor:
        i = 0
        try:
            with torch.no_grad():  # in-place writes: no autograd graph (see needs_autograd)
                for i, op in enumerate(ops):
                    op()
        except Exception as err:
            raise ValueError(f"{self._names[i]} failed on its input: {err}") from err
        if check:
            total = (x if watch is None else watch[0]).sum()
            for w in (watch or ())[1:]:
                total = total + w.sum()
            if not math.isfinite(total.item()):
                self._locate(x)
        return x

    def run(self, x: Tensor, check: bool = True) -> Tensor:
        """Fill the constant and free coordinates of ``x`` (``(B, C0)``) in place; returns ``x``.

        With ``check=True`` one fused reduction tests that ``x`` is finite afterwards
        (the only host synchronisation); a failure names the boundary vertex or the
        edge whose map produced the first non-finite value.
        """
        self._write_constants(x)
        return self._execute([bind(x) for bind in self._binders], x, check)

    def bound(self, batch: int, dtype: torch.dtype, device=None) -> "BoundPlan":
        """A cochain buffer ``(batch, C0)`` with the plan's operations bound to it (cached per thread).

        Write the non-constant fixed coordinates into ``bound.x``, call ``bound.run()``, and
        copy out what you need before the next run overwrites it.
        """
        key = (batch, dtype, device, threading.get_ident())
        b = self._bound.get(key)
        if b is None or not b.current():
            if len(self._bound) >= 16:
                self._bound.clear()
            b = self._bound[key] = BoundPlan(self, batch, dtype, device)
        return b

    def _locate(self, x: Tensor) -> None:
        """Raise ``ValueError`` naming where the first non-finite value of a run came from."""
        S = self.S
        fixed = torch.zeros(S.C0, dtype=torch.bool)
        fixed[self.fixed] = True
        for v in S.vertices:
            sl = S.vertex_slice(v)
            check_finite(x[:, sl][:, fixed[sl].to(x.device)], f"boundary value at vertex {v!r}")
        for s, name in zip(self.steps, self._names):
            t = s.span if s.span is not None else s.targets.to(x.device)
            check_finite(x[:, t], f"{name} (its output)")

    def residuals(self, x: Tensor) -> dict:
        """``{edge: F_v x_v − F_u x_u}`` at ``x`` for the steps whose written values can differ from their
        map's output (scaled selections); every other step holds exactly."""
        res = {}
        for s in self.inexact:
            raw = s.F.apply(x[:, s.source])
            t = s.span if s.span is not None else s.targets.to(x.device)
            own = x[:, t] * s.scale.to(dtype=x.dtype, device=x.device)
            res[s.edge] = own - raw if s.side == "v" else raw - own
        return res


class BoundPlan:
    """A [`PropagationPlan`][cellsheaf.propagation.PropagationPlan] bound to its own cochain buffer ``x`` (made by [`PropagationPlan.bound`][cellsheaf.propagation.PropagationPlan.bound])."""

    def __init__(self, plan: PropagationPlan, batch: int, dtype: torch.dtype, device):
        self.plan = plan
        self.x = torch.empty(batch, plan.S.C0, dtype=dtype, device=device)
        plan._write_constants(self.x)
        self._held = [(F, tuple(F.tensors())) for F in plan._maps]
        self._held = [(F, held) for F, held in self._held if held]  # maps without tensors cannot go stale
        self._ops = [bind(self.x) for bind in plan._binders]
        self._views: dict = {}

    def current(self) -> bool:
        """Whether every map still holds the tensors the views were taken of."""
        return all(a is b for F, held in self._held for a, b in zip(F.tensors(), held))

    def columns(self, cols: slice) -> Tensor:
        """The view ``x[:, cols]`` (taken once)."""
        key = (cols.start, cols.stop)
        v = self._views.get(key)
        if v is None:
            v = self._views[key] = self.x[:, cols]
        return v

    def run(self, check: bool = True, watch: list[slice] | None = None) -> Tensor:
        """Run the plan on the buffer (see [`PropagationPlan.run`][cellsheaf.propagation.PropagationPlan.run]); returns the buffer.

        With ``watch`` (column slices, e.g. the outputs a caller copies out) the finiteness check sums
        only those columns: it then costs what they cost, not a pass over the whole cochain. A
        non-finite value there still names the vertex or edge where the first one arose.
        """
        return self.plan._execute(self._ops, self.x, check, None if watch is None else [self.columns(c) for c in watch])


def plan(S, fixed: Tensor, constant: Tensor | None = None, constant_values: Tensor | None = None,
         determined: bool = False, edges=None) -> PropagationPlan:
    """The compiled propagation plan for fixed coordinates ``fixed``; cached on the sheaf.

    ``constant`` (a subset of ``fixed``) are coordinates whose values
    ``constant_values`` are known now and the same for every item (the ones blocks of a
    compiled network): their contribution to an affine edge becomes the bias of its
    ``addmm``, and [`PropagationPlan.run`][cellsheaf.propagation.PropagationPlan.run] writes them itself. Raises
    [`NotDeterminedError`][cellsheaf.propagation.NotDeterminedError] when the sheaf with this boundary is not determined.
    With ``determined=True`` the plan propagates the sheaf's determined part
    ([`determined_part`][cellsheaf.propagation.determined_part]: the other, softer edges are left out, e.g. to start
    [`cellsheaf.nudge.nudged_equilibrium`][cellsheaf.nudge.nudged_equilibrium]). ``edges`` (a sequence of edge
    names) plans exactly these edges, which must define every free coordinate (e.g. a network without the edges
    into its clamped output, for [`cellsheaf.nudge.low_rank_newton`][cellsheaf.nudge.low_rank_newton]).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("x", 2); S.add_vertex("y", 1)
    >>> _ = S.add_edge("x", "y", torch.tensor([[2.0, 3.0]]), torch.eye(1))
    >>> p = cs.propagation.plan(S, torch.tensor([0, 1]), constant=torch.tensor([1]),
    ...                         constant_values=torch.tensor([1.0]))
    >>> x = torch.zeros(2, 3); x[:, 0] = torch.tensor([1.0, -1.0])
    >>> p.run(x)[:, 2]                      # y = 2 x + 3
    tensor([5., 1.])
    """
    fixed = torch.as_tensor(fixed, dtype=torch.long).cpu()
    constant = torch.zeros(0, dtype=torch.long) if constant is None else torch.as_tensor(constant).cpu()
    constant_values = torch.zeros(0, dtype=torch.float64) if constant_values is None else \
        torch.as_tensor(constant_values).detach().cpu().double()
    if constant.shape != constant_values.shape:
        raise ValueError(f"plan: {len(constant)} constant coordinates but {len(constant_values)} values")
    if not bool(torch.isin(constant, fixed).all()):
        raise ValueError("plan: every constant coordinate must be fixed")
    key = ("plan", determined, fixed.numpy().tobytes(), constant.numpy().tobytes(),
           constant_values.numpy().tobytes(), None if edges is None else tuple(edges))
    cached = S._cache.get(key)
    if cached is None:
        steps = None
        if edges is not None:
            steps = _subschedule(S, fixed, list(edges))
        elif determined:
            steps = _determined_part(S, fixed)
            if steps is None:
                raise NotDeterminedError("the sheaf has no determined part that is stiffer than the rest of its "
                                         "edges (see cellsheaf.propagation.determined_part)")
        cached = S._cache[key] = PropagationPlan(S, fixed, constant, constant_values, steps)
    return cached


def _subschedule(S, fixed: Tensor, edges: list) -> list[PropagationStep]:
    """The schedule of the edges ``edges`` alone, or `NotDeterminedError` when they leave a free coordinate
    undefined or are not all needed."""
    unknown = [n for n in edges if n not in set(S.edges)]
    if unknown:
        raise KeyError(f"plan: no edge {unknown[0]!r} in the sheaf")
    for name in edges:
        reason = _edge_reason(S.edge(name))
        if reason:
            raise NotDeterminedError(reason)
    steps, known, used, _ = _order(S, fixed, edges)
    if not known.all():
        raise NotDeterminedError(f"the edges given leave the free {_coordinate_name(S, int(np.nonzero(~known)[0][0]))} "
                                 "undefined")
    if len(used) != len(set(edges)):
        spare = next(n for n in edges if n not in used)
        raise NotDeterminedError(f"edge {spare!r} is not needed to define any free coordinate")
    return steps


def propagate(S, x: Tensor, steps: list[PropagationStep], residuals: bool = False, inplace: bool = False):
    """Fill the free coordinates of ``x`` (``(B, C0)``, fixed ones already set) by forward substitution.

    With ``residuals=True`` also return ``{edge: r_e}``, the discrepancy ``F_v x_v − F_u x_u``
    (``(B, d_e)``) at the result, from the values of the sweep itself (each map is applied
    once), for the edges whose written values can differ from their map's output: scaled
    selections and writes into a lower precision. Every other scheduled edge holds
    exactly (its coordinates are a copy of the map's output), so it is left out.
    ``inplace=True`` writes into ``x`` instead of a copy.
    """
    x = x if inplace else x.clone()
    res = {}
    for s in steps:
        name = f"the map {'Fu' if s.side == 'v' else 'Fv'} of edge {s.edge!r}"
        try:
            raw = _apply(s, x[:, s.source])
        except Exception as err:
            raise ValueError(f"{name} failed on its input: {err}") from err
        if not math.isfinite(float(raw.detach().sum())):  # a cheap screen; check_finite finds the bad entries
            check_finite(raw, f"{name} (its output)")
        targets = s.span if s.span is not None and x.device == s.targets.device else s.targets.to(x.device)
        if s.scale is not None:
            x[:, targets] = (raw / s.scale.to(dtype=raw.dtype, device=raw.device)).to(x.dtype)
        else:  # clone a view of x (identity-like maps) so that writing it back does not alias
            same = raw.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
            x[:, targets] = (raw.clone() if same else raw).to(x.dtype)
        inexact = s.scale is not None or torch.promote_types(raw.dtype, x.dtype) != x.dtype
        if residuals and inexact:
            own = x[:, targets] if s.scale is None else x[:, targets] * s.scale.to(dtype=x.dtype, device=x.device)
            res[s.edge] = own - raw if s.side == "v" else raw - own
    return (x, res) if residuals else x
