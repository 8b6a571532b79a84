"""Learning restriction maps: the joint state/map dynamics of Sec. 5.2 and App. B.1.

A trainable map is a dense [`cellsheaf.maps.Linear`][cellsheaf.maps.Linear] with ``trainable=True``
and an optional 0/1 ``mask`` of the entries that may change (the projection
``Π_W``, e.g. "keep the diagonal of the bias block", Eq. 25). The energy
gradient with respect to a map is *local* (Eq. 24): for ``e = u -> v`` with
weight ``w`` and potential forces ``g_v = ∂U/∂a_v``, ``g_u = ∂U/∂a_u``,

    ``∂E/∂F_v = w Σ_b g_v xᵥᵀ``  and  ``∂E/∂F_u = w Σ_b g_u x_uᵀ``

(summed over the batch ``b``), which for the quadratic potential is
``(F_v x_v − F_u x_u) x_vᵀ`` and ``−(F_v x_v − F_u x_u) x_uᵀ``: each map moves
using only its own edge's discrepancy and the stalk at its own vertex.

The joint dynamics Eq. (26), regularised as Eq. (42), are

    ``dω/dt = −α P_Ω (∇_ω E + λ(ω − ω₀))``,   ``dF/dt = −β Π_W (∇_F E + μ(F − F₀))``,

integrated by forward Euler in [`joint_step`][cellsheaf.learning.joint_step] / [`joint_flow`][cellsheaf.learning.joint_flow]. The state
term ``λ`` is the same as reluctance edges ([`cellsheaf.reluctance`][cellsheaf.penalty.reluctance]); the map
term ``μ`` is reluctance on the parameter sheaf. The map tensors are ordinary
torch tensors, so a torch optimizer can drive them instead
([`parameters`][cellsheaf.learning.parameters], [`optimizer_step`][cellsheaf.learning.optimizer_step]).

Maps are keyed ``(edge, side)`` with ``side`` in ``{"u", "v"}``. Where an
argument takes such a dictionary (anchors), a bare edge name also works when
only one side of that edge is trainable.

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf(); S.add_vertex("u", 1); S.add_vertex("v", 1)
>>> one = torch.ones(1, 1, dtype=torch.float64)
>>> _ = S.add_edge("u", "v", cs.maps.Linear(one.clone(), trainable=True), one, name="e")
>>> x = torch.tensor([2.0, 1.0], dtype=torch.float64)     # discrepancy 1·1 − 1·2 = −1
>>> cs.learning.map_gradients(S, x)
{('e', 'u'): tensor([[2.]], dtype=torch.float64)}
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Hashable, Mapping

import torch
from torch import Tensor

from . import edgewise
from .boundary import Boundary, ResolvedBoundary
from .cochain import Cochain, as_flat, check_finite
from .energy import edge_energies, edge_forces, forces
from .maps import Linear
from .operators import pullback
from .results import Result

__all__ = [
    "MapKey", "set_trainable", "trainable_maps", "parameters", "map_gradients", "edge_gradients", "snapshot",
    "map_parameters", "local_gradients",
    "assign_gradients", "optimizer_step", "joint_step", "joint_flow",
]

MapKey = tuple  # (edge name, "u" | "v")


def set_trainable(S, edge: Hashable, side: str = "u", mask=None, trainable: bool = True) -> Linear:
    """Mark the map on ``side`` (``"u"`` or ``"v"``) of ``edge`` as trainable, with an optional 0/1 ``mask``.

    The map must be a dense [`Linear`][cellsheaf.maps.Linear] (a tensor map); it is
    replaced by a trainable copy holding its own tensor, which is returned.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 2); S.add_vertex("b", 2)
    >>> _ = S.add_edge("a", "b", torch.eye(2), torch.eye(2), name="e")
    >>> cs.learning.set_trainable(S, "e", "u", mask=torch.eye(2)).trainable
    True
    """
    if side not in ("u", "v"):
        raise ValueError(f"side must be 'u' or 'v', got {side!r}")
    e = S.edge(edge)
    F = e.Fu if side == "u" else e.Fv
    if not isinstance(F, Linear) or F.sparse:
        kind = "a sparse Linear" if isinstance(F, Linear) else type(F).__name__
        raise TypeError(f"edge {edge!r}: the map F{side} is {kind}, not a dense tensor map, so it cannot be "
                        f"trainable; replace it by cs.maps.Linear(F.matrix(), trainable=True) if it is linear")
    new = Linear(F.weight.detach().clone(), trainable=trainable, mask=mask if mask is not None else F.mask)
    S.set_maps(edge, **{f"F{side}": new})
    return new


def trainable_maps(S) -> dict[MapKey, Linear]:
    """``{(edge, side): map}`` for every map with ``trainable=True``, in edge order.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", cs.maps.Linear(torch.eye(1), trainable=True), torch.eye(1), name="e")
    >>> list(cs.learning.trainable_maps(S))
    [('e', 'u')]
    """
    out = {}
    for e in S.edge_items():
        for side, F in (("u", e.Fu), ("v", e.Fv)):
            if getattr(F, "trainable", False):
                out[(e.name, side)] = F
    return out


def parameters(S) -> list[Tensor]:
    """The tensors of the trainable maps, for a torch optimizer (see [`optimizer_step`][cellsheaf.learning.optimizer_step])."""
    return [F.weight for F in trainable_maps(S).values()]


def _resolve_keys(S, values: Mapping | None, maps: dict[MapKey, Linear], what: str) -> dict[MapKey, Tensor]:
    """Normalise ``{(edge, side) or edge: tensor}`` to ``(edge, side)`` keys of trainable maps."""
    out = {}
    for k, val in (values or {}).items():
        if isinstance(k, tuple) and k in maps:
            out[k] = val
            continue
        sides = [key for key in maps if key[0] == k]
        if len(sides) != 1:
            why = "has no trainable map" if not sides else "has trainable maps on both sides: key it by (edge, side)"
            raise KeyError(f"{what}: edge {k!r} {why}")
        out[sides[0]] = val
    return out


def snapshot(S) -> dict[MapKey, Tensor]:
    """Copies of the current trainable maps: the anchors ``F₀`` of Eq. (41)."""
    return {k: F.weight.detach().clone() for k, F in trainable_maps(S).items()}


def map_parameters(S) -> list[Tensor]:
    """Every trainable tensor the maps of ``S`` hold ([`cellsheaf.maps.Map.parameters`][cellsheaf.maps.Map.parameters]), each once, in edge order.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    >>> S = cs.Sheaf(); S.add_vertex("a", 2); S.add_vertex("b", 2); S.add_vertex("c", 2)
    >>> _ = S.add_edge("a", "b", cs.maps.Diagonal(w), torch.eye(2))
    >>> _ = S.add_edge("b", "c", cs.maps.Diagonal(w), torch.eye(2))          # w is tied
    >>> [p is w for p in cs.learning.map_parameters(S)]
    [True]
    """
    out: dict[int, Tensor] = {}
    for e in S.edge_items():
        for t in e.Fu.parameters() + e.Fv.parameters():
            out.setdefault(id(t), t)
    return list(out.values())


class _Gradients:
    """The local rule accumulated over edges for a list of tensors: each map that holds one adds its
    closed-form parameter gradient ([`cellsheaf.maps.Map.parameter_vjp`][cellsheaf.maps.Map.parameter_vjp]:
    one matrix product for a dense or affine map), or, for a map without one, ``⟨force, F(x)⟩`` to a
    sum differentiated by autograd once at the end (`result`). Each gradient is kept with a sign
    (``signs[k] · grads[k]``), so the force on the other end of a quadratic edge costs no negation until
    one is asked for (`result`; `signed` leaves the signs to the caller, e.g. folded into a step size)."""

    def __init__(self, tensors: list[Tensor]):
        self.tensors = tensors
        self.index = {id(t): k for k, t in enumerate(tensors)}
        self.grads: list[Tensor | None] = [None] * len(tensors)
        self.signs: list[float] = [1.0] * len(tensors)
        self.pending: list[tuple] = []

    def holds(self, F) -> list[Tensor] | None:
        """``F.tensors()`` if ``F`` holds one of the tensors, else None."""
        held = F.tensors()
        return held if any(id(t) in self.index for t in held) else None

    def add(self, F, xs: Tensor, force: Tensor, sign: float = 1.0, held: list[Tensor] | None = None) -> None:
        """The share of map ``F`` (on stalks ``xs``, with ``force = sign · ∂U_e/∂(F x)`` at the state: a
        ``sign`` of −1 takes the force on the other end of a quadratic edge without negating it first);
        ``held``: its `holds` when already known (None: asked here)."""
        held = held or self.holds(F)
        if held is None:
            return
        grads = F.parameter_vjp(xs, force)
        if grads is None:
            self.pending.append((F, xs, force if sign > 0 else force.neg()))
            return
        self.take(held, grads, sign)

    def take(self, held, grads, sign: float = 1.0) -> None:
        """Add ``sign ·`` the gradients ``grads`` of the tensors ``held`` (aligned; ``None``: no share)."""
        for t, g in zip(held, grads):
            k = self.index.get(id(t))
            if k is not None and g is not None:
                now = self.grads[k]
                if now is None:
                    self.grads[k], self.signs[k] = g, sign
                else:  # s·now + sign·g = s·(now ± g)
                    self.grads[k] = now + g if sign == self.signs[k] else now - g

    def over_edges(self, S, forces: Callable[[str], tuple[Tensor | None, Tensor]], src: Tensor) -> list[Tensor]:
        """The rule over the edges of ``S`` whose maps hold a tensor (`result`): ``forces(edge) -> (g_v, g_u)``
        evaluated for those alone (``g_v`` None: it is ``−g_u``), the maps differentiated at the stalks ``src``
        (``(B, C0)``)."""
        for e in S.edge_items():
            hv, hu = self.holds(e.Fv), self.holds(e.Fu)
            if hv is None and hu is None:
                continue
            gv, gu = forces(e.name)
            if hv is not None:
                if gv is None:
                    self.add(e.Fv, src[:, S.vertex_slice(e.v)], gu, -1.0, held=hv)
                else:
                    self.add(e.Fv, src[:, S.vertex_slice(e.v)], gv, held=hv)
            if hu is not None:
                self.add(e.Fu, src[:, S.vertex_slice(e.u)], gu, held=hu)
        return self.result()

    def signed(self) -> tuple[list[Tensor], list[float]]:
        """``(grads, signs)``: the gradients are ``signs[k] · grads[k]`` (zeros for a tensor no map holds)."""
        if self.pending:
            switched = [t for t in self.tensors if not t.requires_grad]
            try:
                for t in switched:
                    t.requires_grad_(True)
                with torch.enable_grad():
                    E = sum((force * F.apply(xs)).sum() for F, xs, force in self.pending)
                    auto = torch.autograd.grad(E, self.tensors, allow_unused=True)
            finally:
                for t in switched:
                    t.requires_grad_(False)
            self.take(self.tensors, auto)
            self.pending = []
        return ([torch.zeros_like(t) if g is None else g if not g.requires_grad and g.dtype == t.dtype
                 else g.detach().to(t.dtype) for t, g in zip(self.tensors, self.grads)], list(self.signs))

    def result(self) -> list[Tensor]:
        """The gradients, aligned with the tensors (zeros for one that no map holds)."""
        grads, signs = self.signed()
        return [g if s > 0 else g.neg() for g, s in zip(grads, signs)]


def local_gradients(S, x, params: Mapping | list | None = None, at=None) -> dict | list:
    """The local learning rule for maps holding torch parameters: for each parameter ``θ``,
    ``Σ_{e holds θ} ∂E_e(x)/∂θ``, the gradient of each edge's *own* energy at the fixed state ``x``
    with respect to its *own* parameters, summed over the edges that share ``θ`` (and over a batch).

    One rule for every map kind (dense and affine weights, convolution kernels, norm weights,
    scalars, gates, tied matrices; the maps that hold ``θ`` are found by identity among their
    [`cellsheaf.maps.Map.tensors`][cellsheaf.maps.Map.tensors]): nothing but each edge's discrepancy and its
    end stalks enters (Eq. 24 for a dense map, ``∂E_e/∂θ = ⟨∂U_e/∂a, ∂(F x)/∂θ⟩`` in general). A map
    computes its share in closed form ([`cellsheaf.maps.Map.parameter_vjp`][cellsheaf.maps.Map.parameter_vjp]:
    one matrix product per dense or affine edge), else by autograd through the map. A dense
    [`cellsheaf.maps.Linear`][cellsheaf.maps.Linear] with a ``mask`` gives the masked gradient (``Π_W``, Eq. 25).

    Parameters
    ----------
    S : Sheaf
    x : Cochain or tensor ``(C0,)`` / ``(B, C0)``
        The state; held fixed (not differentiated).
    params : mapping ``{name: tensor}``, sequence of tensors, or None
        The parameters (default: [`map_parameters`][cellsheaf.learning.map_parameters]). A tensor that does not require grad
        is differentiated all the same.
    at : Cochain or tensor like ``x``, optional
        Where the maps are differentiated in ``θ`` (default ``x``): the forces are those at ``x``.
        Nudged training passes the free state here (see `edge_gradients`).

    Returns
    -------
    ``{name: gradient}`` for a mapping, else a list of gradients aligned with ``params``
    (zeros for a parameter that no edge holds).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> s = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))   # one scalar on two edges
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", cs.maps.Diagonal(s), torch.eye(1, dtype=torch.float64), name="e1")
    >>> _ = S.add_edge("b", "a", cs.maps.Diagonal(s), torch.eye(1, dtype=torch.float64), name="e2")
    >>> x = torch.tensor([1.0, 3.0], dtype=torch.float64)
    >>> cs.learning.local_gradients(S, x, {"s": s})    # e1: -(3 - 2·1)·1, e2: -(1 - 2·3)·3
    {'s': tensor([14.], dtype=torch.float64)}
    """
    names = list(params) if isinstance(params, Mapping) else None
    plist = list(params.values()) if names is not None else map_parameters(S) if params is None else list(params)
    for k, p in enumerate(plist):
        if not isinstance(p, Tensor) or not p.is_floating_point():
            raise TypeError(f"local_gradients: parameter {names[k] if names else k!r} is not a floating tensor")
    acc = _Gradients(plist)
    xb, atb = (_batched(as_flat(S, v).detach()) for v in (x, x if at is None else at))
    with torch.no_grad():
        out = acc.over_edges(S, lambda name: edge_forces(S, name, xb), atb)
    _check_all({f"the local gradient of parameter {names[k] if names else k!r}": g for k, g in enumerate(out)},
               check_finite)
    return dict(zip(names, out)) if names is not None else out


def _local_gradients(S, x: Tensor, gv: Tensor, gu: Tensor, maps: dict[MapKey, Linear]) -> dict[MapKey, Tensor]:
    """Eq. (24) for every trainable map from the forces ``gv, gu`` (weights included) at ``x``."""
    xb = x if x.dim() == 2 else x.unsqueeze(0)
    gvb = gv if gv.dim() == 2 else gv.unsqueeze(0)
    gub = gu if gu.dim() == 2 else gu.unsqueeze(0)
    out = {}
    for (name, side), F in maps.items():
        e = S.edge(name)
        se = S.edge_slice(name)
        g = (gvb if side == "v" else gub)[:, se]
        out[(name, side)] = _eq24(F, g, xb[:, S.vertex_slice(e.v if side == "v" else e.u)])
    return out


def _batched(x: Tensor) -> Tensor:
    return x if x.dim() == 2 else x.unsqueeze(0)


def edge_gradients(S, x: Tensor, keys, at: Tensor | None = None) -> dict[MapKey, Tensor]:
    """Eq. (24) for the trainable maps ``keys`` (``(edge, side)``) at a batch ``x`` (``(B, C0)``), each from
    its own edge's discord alone: what [`map_gradients`][cellsheaf.learning.map_gradients] gives for them, without a pass over the other edges.

    With ``at`` (a state like ``x``) the forces at ``x`` multiply the stalks of ``at``: nudged training
    takes the forces at the nudged state and the stalks of the free state (the forward pass). The two
    agree up to O(γ), and the free-state form is exactly zero where the forward pass is (a dead input),
    so that optimizers that normalise the gradient (Adam) do not blow the O(γ) bias up to full steps.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("u", 2); S.add_vertex("v", 1)
    >>> W = cs.maps.Linear(torch.zeros(1, 2, dtype=torch.float64), trainable=True)
    >>> _ = S.add_edge("u", "v", W, torch.eye(1, dtype=torch.float64), name="e")
    >>> cs.learning.edge_gradients(S, torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64), [("e", "u")])
    {('e', 'u'): tensor([[-3., -6.]], dtype=torch.float64)}
    """
    out = {}
    for name, side in keys:
        e = S.edge(name)
        F = e.Fv if side == "v" else e.Fu
        gv, gu = edge_forces(S, name, x)
        src = x if at is None else at
        out[(name, side)] = _eq24(F, gv if side == "v" else gu, src[:, S.vertex_slice(e.v if side == "v" else e.u)])
    return out


def map_gradients(S, x, mu: float = 0.0, anchors: Mapping | None = None) -> dict[MapKey, Tensor]:
    """``Π_W ∇_F`` of the energy (summed over a batch) for every trainable map, by Eq. (24).

    With ``mu > 0`` adds the structure regularisation ``μ(F − F₀)`` of Eq. (42)
    (anchors ``F₀`` from [`snapshot`][cellsheaf.learning.snapshot]; default zero, Eq. 29).

    Parameters
    ----------
    S : Sheaf
    x : Cochain or tensor ``(C0,)`` / ``(B, C0)``
    mu : float
    anchors : ``{(edge, side) or edge: tensor}``, optional

    Returns
    -------
    dict
        ``{(edge, side): tensor}`` of the maps' shapes, masked by each map's ``mask``.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("u", 2); S.add_vertex("v", 1)
    >>> W = cs.maps.Linear(torch.zeros(1, 2, dtype=torch.float64), trainable=True)
    >>> _ = S.add_edge("u", "v", W, torch.eye(1, dtype=torch.float64), name="e")
    >>> cs.learning.map_gradients(S, torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))[("e", "u")]
    tensor([[-3., -6.]], dtype=torch.float64)
    """
    xf = as_flat(S, x)
    maps = trainable_maps(S)
    gv, gu = forces(S, xf)
    return _regularised(S, _local_gradients(S, xf, gv, gu, maps), maps, mu, anchors)


def _regularised(S, grads: dict, maps: dict, mu: float, anchors: Mapping | None) -> dict:
    if mu == 0:
        return grads
    ref = _resolve_keys(S, anchors, maps, "map anchors")
    for k, F in maps.items():
        F0 = ref.get(k)
        diff = F.weight.detach() - (F0.to(F.weight.dtype) if F0 is not None else 0.0)
        reg = mu * (diff if F.mask is None else diff * F.mask.to(diff.dtype))
        grads[k] = grads[k] + reg
    return grads


def assign_gradients(S, x, mu: float = 0.0, anchors: Mapping | None = None) -> dict[MapKey, Tensor]:
    """Write [`map_gradients`][cellsheaf.learning.map_gradients] into the ``.grad`` of every trainable map tensor (and return them),
    so that a torch optimizer over [`parameters`][cellsheaf.learning.parameters] can step."""
    grads = map_gradients(S, x, mu, anchors)
    for k, F in trainable_maps(S).items():
        F.weight.grad = grads[k].to(F.weight.dtype)
    return grads


def optimizer_step(S, x, optimizer: torch.optim.Optimizer, mu: float = 0.0,
                   anchors: Mapping | None = None) -> dict[MapKey, Tensor]:
    """One map update by a torch optimizer: local gradients (Eq. 24), ``optimizer.step()``, masked
    entries restored (``Π_W`` even with weight decay), cached operators dropped.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("u", 1); S.add_vertex("v", 1)
    >>> one = torch.ones(1, 1, dtype=torch.float64)
    >>> _ = S.add_edge("u", "v", cs.maps.Linear(one.clone(), trainable=True), one, name="e")
    >>> opt = torch.optim.SGD(cs.learning.parameters(S), lr=0.1)
    >>> x = torch.tensor([2.0, 1.0], dtype=torch.float64)
    >>> _ = cs.learning.optimizer_step(S, x, opt)
    >>> S.edge("e").Fu.weight
    tensor([[0.8000]], dtype=torch.float64)
    """
    maps = trainable_maps(S)
    frozen = {k: F.weight.detach().clone() for k, F in maps.items() if F.mask is not None}
    optimizer.zero_grad()
    grads = assign_gradients(S, x, mu, anchors)
    optimizer.step()
    with torch.no_grad():
        for k, W0 in frozen.items():
            W, m = maps[k].weight, maps[k].mask.to(dtype=W0.dtype, device=W0.device)
            W.copy_(m * W + (1 - m) * W0)
    _maps_changed(S, maps)
    return grads


def _check_step(t: Tensor, what: str) -> None:
    """Refuse a non-finite result of a step, naming ``what`` and saying how to avoid it."""
    if t.is_floating_point() and math.isfinite(t.sum().item()):  # one reduction screens the common case
        return
    check_finite(t, f"after the step (it diverged: use a smaller step), {what}")


def _check_all(named: Mapping[str, Tensor], check: Callable[[Tensor, str], None] = _check_step) -> None:
    """``check(t, what)`` for every ``{what: t}``, screened by one reduction (one host read) when all are finite."""
    if not named or _all_finite(list(named.values())):
        return
    for what, t in named.items():
        check(t, what)


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether a screen finds every tensor finite, with one host read: the sum of the first (the state) and
    of the others concatenated (the learned tensors, small). A sum that overflows fails the screen: the
    caller then checks tensor by tensor."""
    if not all(t.is_floating_point() for t in tensors):
        return False
    total = tensors[0].sum()
    if len(tensors) > 1:
        total = total + torch.cat([t.reshape(-1) for t in tensors[1:]]).sum()
    return math.isfinite(float(total))


def _maps_changed(S, maps: dict[MapKey, Linear]) -> None:
    for (name, side), F in maps.items():
        _check_step(F.weight, f"the trainable map F{side} of edge {name!r}")
    S.invalidate()


def _free_of(S, boundary, like: Tensor) -> Tensor:
    if isinstance(boundary, Tensor):
        return boundary.to(device=like.device, dtype=torch.long)
    if isinstance(boundary, ResolvedBoundary):
        return boundary.free.to(like.device)
    return (boundary or Boundary()).resolve(S).free.to(like.device)


def _eq24(F: Linear, force: Tensor, xs: Tensor) -> Tensor:
    """Eq. (24) for one dense map: ``forceᵀ x`` over the batch, masked by the map's ``mask`` (its closed-form
    parameter gradient, [`cellsheaf.maps.Map.parameter_vjp`][cellsheaf.maps.Map.parameter_vjp])."""
    return F.parameter_vjp(xs, force)[0]


def _edgewise(S, x: Tensor, maps: dict, at: Tensor | None = None, skip=(),
              tensors: _Gradients | None = None, out: Tensor | None = None) -> tuple[Tensor, dict]:
    """``(∇_x E, {map: Eq. 24})`` edge by edge: each edge's maps applied once, its own forces pulled back
    through its own maps and multiplied into its own end stalks (those of ``at`` if given, see
    `edge_gradients`). For sheaves of few, large edges (compiled networks), where the stacked operators
    (`cellsheaf.operators`) buy nothing; a compiled plan (`cellsheaf.edgewise`). The gradient is left
    zero on the vertices in ``skip`` (e.g. those with no free coordinate). With ``tensors`` (a
    `_Gradients`), the local rule of the parameters it holds is accumulated into it from the same forces;
    ``out``: where to write the gradient (a reused buffer)."""
    return edgewise.plan(S, skip).run(x, maps, at, tensors, out)


def _joint_gradients(S, x: Tensor, maps: dict, lam: float, mu: float, x_anchor, map_anchors, reduce=None,
                     tensors: _Gradients | None = None, skip=(), out: Tensor | None = None):
    """``(∇_x E + λ(x − x₀), {map: Π_W(∇_F E + μ(F − F₀))})`` sharing one evaluation of the forces (and the
    local rule of the parameters in ``tensors``, accumulated there, when the edges go one by one).

    ``reduce`` (a list of tensors -> list of tensors) combines the energy part of the map
    gradients with other batches before the regularisation is added (data parallelism). The
    state gradient may be left zero on the vertices ``skip`` (those with no free coordinate); ``out``: a
    buffer the edge-by-edge pass may write it into."""
    if len(S.edges) <= edgewise.EDGEWISE_MAX:
        g, grads = _edgewise(S, x, maps, skip=skip, tensors=tensors, out=out)
    else:
        gv, gu = forces(S, x)
        g = pullback(S, gv, gu, at=x)
        grads = _local_gradients(S, x, gv, gu, maps)
        if tensors is not None and tensors.tensors:
            tensors.grads = local_gradients(S, x, tensors.tensors)
    if lam:
        g = g + lam * (x - (0.0 if x_anchor is None else as_flat(S, x_anchor).to(x.dtype)))
    if reduce is not None:
        grads = dict(zip(grads, reduce(list(grads.values()))))
    return g, _regularised(S, grads, maps, mu, map_anchors)


def _buffer(S, name: str, like: Tensor) -> Tensor:
    """A work tensor shaped like ``like`` kept for ``S`` across calls (one per thread; its contents are
    undefined): a fresh state-sized tensor would fault its pages in on every step."""
    key = (name, tuple(like.shape), like.dtype, like.device, threading.get_ident())
    bufs = edgewise.store(S).setdefault("buffers", {})
    buf = bufs.get(key)
    if buf is None:
        if len(bufs) >= 16:
            bufs.clear()
        buf = bufs[key] = torch.empty_like(like)
    return buf


def _rates(S, moves: Tensor, rate: float, like: Tensor) -> Tensor:
    """``rate`` on the coordinates ``moves`` (the mask of `_moves`) and 0 on the others, in ``like``'s dtype:
    the Euler step ``x + rate·P_Ω g`` is one ``addcmul``. Kept while the same mask and rate come back."""
    cached = edgewise.store(S).get("rates")
    if cached is not None and cached[0] is moves and cached[1] == (rate, like.dtype):
        return cached[2]
    out = torch.zeros(moves.shape, dtype=like.dtype, device=moves.device).masked_fill_(moves, rate)
    edgewise.store(S)["rates"] = (moves, (rate, like.dtype), out)
    return out


def _moves(S, free: Tensor, like: Tensor) -> tuple[Tensor, frozenset]:
    """The mask ``P_Ω`` of the free coordinates ``free`` (on ``like``'s device) and the vertices with no free
    coordinate; kept while the same index tensor comes back (a trainer's every step)."""
    cached = edgewise.store(S).get("moves")  # (free, C0, device, (mask, fixed vertices))
    if cached is not None and cached[0] is free and cached[1:3] == (like.shape[-1], like.device):
        return cached[3]
    mask = torch.zeros(S.C0, dtype=torch.bool, device=like.device).index_fill_(0, free, True)
    moving = mask.cpu().numpy()
    fixed = frozenset(v for v in S.vertices if not moving[S.vertex_slice(v)].any())
    edgewise.store(S)["moves"] = (free, S.C0, like.device, (mask, fixed))
    return mask, fixed


def _parameter_gradients(S, x: Tensor, params: Mapping[str, Tensor], mu: float, anchors: Mapping | None,
                         reduce=None, tensors: _Gradients | None = None) -> tuple[dict[str, Tensor], list[float]]:
    """`local_gradients` of ``params`` at ``x`` (or those accumulated in ``tensors`` from the same pass),
    combined by ``reduce`` (a sum over processes: linear, so the signs pass through it), plus ``μ(θ − θ₀)``:
    ``(grads, signs)``, the gradients being ``signs[k] · grads[k]``."""
    if not params:
        return {}, []
    if tensors is None:
        values, signs = list(local_gradients(S, x, params).values()), [1.0] * len(params)
    else:
        values, signs = tensors.signed()
    if reduce is not None:
        values = reduce(values)
    grads = dict(zip(params, values))
    if mu:
        ref = anchors or {}
        grads = {k: (G if s > 0 else G.neg()) + mu * (params[k].detach() - (ref[k].to(G.dtype) if k in ref else 0.0))
                 for (k, G), s in zip(grads.items(), signs)}
        signs = [1.0] * len(signs)
    return grads, signs


def joint_step(
    S,
    x,
    boundary: Boundary | ResolvedBoundary | Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    dt: float = 0.01,
    lam: float = 0.0,
    mu: float = 0.0,
    x_anchor=None,
    map_anchors: Mapping | None = None,
    reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
    params: Mapping[str, Tensor] | None = None,
    param_anchors: Mapping[str, Tensor] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """One forward-Euler step of the joint dynamics Eq. (26) (Eq. (42) with ``lam``, ``mu``).

    All updates use the gradients at the current point; the trainable maps and the
    parameters ``params`` are changed in place (and the sheaf's cached operators
    dropped); the new state is returned.

    Parameters
    ----------
    S : Sheaf
    x : Cochain or tensor ``(C0,)`` / ``(B, C0)``, the current state (fixed coordinates already set).
    boundary : Boundary, ResolvedBoundary, or a tensor of the *free* coordinate indices
        The coordinates that move (``P_Ω``); None: all of them.
    alpha, beta, dt : rates of the state and the maps, and the time step.
    lam, x_anchor : state regularisation ``λ(ω − ω₀)`` (``ω₀`` default 0); the same as reluctance edges.
    mu, map_anchors
        Map regularisation ``μ(F − F₀)`` (``F₀`` default 0, or from [`snapshot`][cellsheaf.learning.snapshot]).
    reduce : callable, optional
        Combines the batch sums of the map gradients with those of other processes before the
        step (e.g. an all-reduce sum under torch.distributed, so every process takes the same step).
    params, param_anchors : ``{name: tensor}``, optional
        Parameters held by the maps (conv kernels, norm weights, tied matrices, scalars: `map_parameters`)
        that move with rate ``beta`` by their local gradients (`local_gradients`, summed over the edges
        sharing each), regularised by ``mu`` towards ``param_anchors`` (default 0).
    out : tensor like ``x``, optional
        Where to write the new state (default: a new tensor), e.g. one of two buffers a trainer alternates
        between (a fresh state-sized tensor costs its page faults on every step). It must not be ``x``.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("u", 1); S.add_vertex("v", 1)
    >>> one = torch.ones(1, 1, dtype=torch.float64)
    >>> _ = S.add_edge("u", "v", cs.maps.Linear(one.clone(), trainable=True), one, name="e")
    >>> b = cs.Boundary().fix("u", [2.0]).fix("v", [1.0])
    >>> x = cs.learning.joint_step(S, torch.tensor([2.0, 1.0], dtype=torch.float64), b, beta=1.0, dt=0.1)
    >>> S.edge("e").Fu.weight                       # 1 − 0.1 · (−(1 − 2)) · 2
    tensor([[0.8000]], dtype=torch.float64)
    """
    for name, val in (("alpha", alpha), ("beta", beta), ("dt", dt), ("lam", lam), ("mu", mu)):
        if not (val >= 0 and math.isfinite(val)):
            raise ValueError(f"joint_step: {name} must be non-negative and finite, got {val}")
    xf = as_flat(S, x)
    moves, fixed = _moves(S, _free_of(S, boundary, xf), xf)
    maps = trainable_maps(S)
    tensors = _Gradients(list(params.values())) if params else None
    work = _buffer(S, "joint:g", xf) if xf.dim() == 2 else None
    g, map_grads = _joint_gradients(S, xf, maps, lam, mu, x_anchor, map_anchors, reduce, tensors, skip=fixed,
                                    out=work)
    param_grads, signs = _parameter_gradients(S, xf, params or {}, mu, param_anchors, reduce, tensors)
    x_new = torch.addcmul(xf, g, _rates(S, moves, -dt * alpha, xf), out=out)  # −dt α on the free coordinates, 0 else
    with torch.no_grad():
        for k, F in maps.items():
            G = map_grads[k]
            F.weight.sub_(G if G.dtype == F.weight.dtype else G.to(F.weight.dtype), alpha=dt * beta)
        for (k, p), sign in zip((params or {}).items(), signs):
            G = param_grads[k]
            p.sub_(G if G.dtype == p.dtype else G.to(p.dtype), alpha=sign * dt * beta)
    if not _all_finite([x_new, *(F.weight for F in maps.values()), *(params or {}).values()]):
        results = {f"the parameter {k!r}": p for k, p in (params or {}).items()}
        results.update({f"the trainable map F{side} of edge {name!r}": F.weight for (name, side), F in maps.items()})
        _check_all({**results, "the state": x_new})
    S.invalidate()
    return x_new


def joint_flow(
    S,
    x0,
    boundary: Boundary | None = None,
    steps: int = 1000,
    alpha: float = 1.0,
    beta: float = 1.0,
    dt: float = 0.01,
    lam: float = 0.0,
    mu: float = 0.0,
    x_anchor=None,
    map_anchors: Mapping | None = None,
    tol: float | None = None,
    record: bool | int = True,
) -> Result:
    """Integrate the joint dynamics for ``steps`` Euler steps (or until the energy stops changing).

    Returns a [`Result`][cellsheaf.results.Result] with the final state ``x``; the maps
    are trained in place. ``extra["energy"]`` is the total energy ``(K,)`` of the
    regularised objective (Eq. 41, summed over the batch) every ``record`` steps and
    ``extra["step"]`` the step numbers; ``residual`` is the norm of the joint
    gradient ``(P_Ω ∇_ω, Π_W ∇_F)`` at the end. With ``tol`` it stops
    (``converged=True``) once the energy changes by less than ``tol`` in a step;
    without, ``converged`` means the ``steps`` were taken.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("u", 1); S.add_vertex("v", 1)
    >>> one = torch.ones(1, 1, dtype=torch.float64)
    >>> _ = S.add_edge("u", "v", cs.maps.Linear(one.clone(), trainable=True), one, name="e")
    >>> b = cs.Boundary().fix("u", [2.0]).fix("v", [1.0])
    >>> res = cs.learning.joint_flow(S, torch.zeros(2, dtype=torch.float64), b, steps=500, dt=0.1)
    >>> round(float(res.energy), 8), round(float(S.edge("e").Fu.weight), 6)    # learned to lie: F_u = 1/2
    (0.0, 0.5)
    """
    xf = as_flat(S, x0)
    if boundary is not None:
        rb = boundary.resolve(S, dtype=xf.dtype)
        xf = rb.fill(xf)
    else:
        rb = Boundary().resolve(S)
    every = int(record)
    maps = trainable_maps(S)

    def objective(x: Tensor) -> float:
        E = float(edge_energies(S, x).sum())
        if lam:
            ref = 0.0 if x_anchor is None else as_flat(S, x_anchor)
            E += 0.5 * lam * float(((x - ref)[..., rb.free] ** 2).sum())
        if mu:
            ref_maps = _resolve_keys(S, map_anchors, maps, "map anchors")
            E += 0.5 * mu * sum(float((((F.weight - ref_maps.get(k, 0.0)) ** 2) *
                                       (1 if F.mask is None else F.mask)).sum()) for k, F in maps.items())
        return E

    hist_step, hist_E = [], []
    x, previous, converged, step = xf, objective(xf), False, 0
    if every:
        hist_step.append(0)
        hist_E.append(previous)
    while step < steps:
        x = joint_step(S, x, rb, alpha, beta, dt, lam, mu, x_anchor, map_anchors)
        step += 1
        E = objective(x)
        if every and step % every == 0:
            hist_step.append(step)
            hist_E.append(E)
        if tol is not None and abs(previous - E) <= tol:
            converged = True
            break
        previous = E
    g, map_grads = _joint_gradients(S, x, maps, lam, mu, x_anchor, map_anchors)
    residual = math.sqrt(float((g[..., rb.free] ** 2).sum()) + sum(float((G ** 2).sum()) for G in map_grads.values()))
    msg = "" if converged or tol is None else f"energy still changing after {steps} steps"
    res = Result("joint", converged or tol is None, step, residual, energy=edge_energies(S, x).sum(-1), message=msg,
                 x=Cochain(S, x), t=step * dt)
    res.extra.update(step=torch.tensor(hist_step), energy=torch.tensor(hist_E, dtype=torch.float64))
    return res
