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
is cached on the sheaf (``S._cache``) and rebuilt when the sheaf changes.

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
from collections import deque
from dataclasses import dataclass
from typing import Hashable

import numpy as np
import torch
from torch import Tensor

from .boundary import Boundary, ResolvedBoundary
from .cochain import check_finite
from .maps import Linear, Map

__all__ = ["NotDeterminedError", "PropagationStep", "schedule", "is_determined", "determined_part", "propagate"]

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


def _as_index(cols: Tensor) -> slice | Tensor:
    """Sorted column indices as a slice when consecutive (a view instead of a gather)."""
    if len(cols) and int(cols[-1]) - int(cols[0]) + 1 == len(cols):
        return slice(int(cols[0]), int(cols[-1]) + 1)
    return cols


def _split(F: Map, source: slice, is_fixed: np.ndarray) -> Tensor | None:
    """The boundary columns (within its source stalk) of a dense linear ``F``, or None."""
    if not (isinstance(F, Linear) and not F.sparse):
        return None
    cols = np.nonzero(is_fixed[source])[0]
    return torch.as_tensor(cols, dtype=torch.long) if len(cols) else None


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
    if not F.linear or F.d_out == 0 or F.d_out > F.d_in or F.d_out * F.d_in > _SELECTION_MAX:
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
            steps.append(PropagationStep(name, side, torch.as_tensor(targets, dtype=torch.long), scale, other_F,
                                         S.vertex_slice(other), span, _split(other_F, S.vertex_slice(other), is_fixed)))
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


def _fixed_of(S, boundary) -> Tensor:
    if isinstance(boundary, ResolvedBoundary):
        return boundary.fixed
    return (boundary or Boundary()).resolve(S).fixed


def schedule(S, boundary: Boundary | ResolvedBoundary | None = None) -> list[PropagationStep]:
    """The propagation order of a determined sheaf; raises `NotDeterminedError` saying why not.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", 2 * torch.eye(1), torch.eye(1), name="e")
    >>> [s.edge for s in cs.propagation.schedule(S, cs.Boundary().fix("a", [1.0]))]
    ['e']
    """
    fixed = _fixed_of(S, boundary)
    key = ("propagation", fixed.numpy().tobytes())
    cached = S._cache.get(key)
    if cached is None:
        try:
            cached = _build(S, fixed)
        except NotDeterminedError as err:
            cached = err
        S._cache[key] = cached
    if isinstance(cached, NotDeterminedError):
        raise NotDeterminedError(str(cached))
    return cached


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
    `cellsheaf.gauss_newton`). Cached on the sheaf like `schedule`.

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
        if not math.isfinite(float(raw.sum())):  # a cheap screen; check_finite finds the bad entries
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
