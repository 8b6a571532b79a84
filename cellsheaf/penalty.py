"""Penalty edges: soft pins (Sec. 5.1) and reluctance / regularisation (App. B.2).

A soft pin pulls coordinates ``J`` of a vertex ``v`` toward a target ``p`` with
strength ``γ``: a new stubborn *anchor* vertex holds ``p`` and a *penalty edge*
``anchor -> v`` carries the maps ``√γ·I`` (anchor) and ``√γ·P_J`` (vertex), so its
energy is ``(γ/2)‖P_J x_v − p‖²`` with the quadratic potential (Eq. 23). As
``γ → ∞`` the pin becomes hard. Reluctance anchors whole free stalks to
reference values ``ω₀`` with strength ``λ``, which adds ``(λ/2)‖ω − ω₀‖²`` to the
energy (Eq. 41): regularisation is just more edges.

The anchor's value is boundary data: a pin's [`Penalty.boundary`][cellsheaf.penalty.Penalty.boundary] adds it to
a [`Boundary`][cellsheaf.boundary.Boundary] for the solvers.

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
>>> I = torch.eye(1, dtype=torch.float64)
>>> _ = S.add_edge("a", "b", I, I)
>>> pin = cs.soft_pin(S, "b", torch.tensor([1.0], dtype=torch.float64), strength=3.0)
>>> pin.anchor, pin.edge
('b/pin', 'b/pin')
>>> b = pin.boundary(cs.Boundary().fix("a", torch.tensor([0.0], dtype=torch.float64)))
>>> round(float(cs.minimize(S, b).x["b"]), 6)        # argmin ½b² + (3/2)(b − 1)²
0.75
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

import torch
from torch import Tensor

from .boundary import Boundary
from .cochain import Cochain, check_finite
from .maps import Compose, Scaled, Select
from .potentials import Potential

__all__ = ["Penalty", "Penalties", "soft_pin", "reluctance"]


@dataclass
class Penalty:
    """A penalty edge ``anchor -> vertex`` and the anchor's value.

    Attributes
    ----------
    sheaf : the sheaf it was added to.
    vertex : the pulled vertex; ``coords`` the pulled coordinates (None: the whole stalk).
    anchor : name of the stubborn anchor vertex; ``edge`` name of the penalty edge.
    values : the target, ``(k,)`` or ``(B, k)``.
    strength : ``γ`` (or ``λ``).
    """

    sheaf: object
    vertex: Hashable
    anchor: Hashable
    edge: Hashable
    values: Tensor
    coords: list[int] | None
    strength: float

    def boundary(self, b: Boundary | None = None) -> Boundary:
        """Fix the anchor at the target in ``b`` (a new Boundary if None) and return it, as ``Boundary.fix`` does."""
        return (b if b is not None else Boundary()).fix(self.anchor, self.values)

    def remove(self) -> None:
        """Remove the anchor vertex and the penalty edge from the sheaf."""
        self.sheaf.remove_vertex(self.anchor)


@dataclass
class Penalties:
    """Several penalty edges added together (e.g. by [`reluctance`][cellsheaf.penalty.reluctance])."""

    items: list[Penalty]

    def boundary(self, b: Boundary | None = None) -> Boundary:
        """Fix every anchor in ``b`` (a new Boundary if None) and return it."""
        b = b if b is not None else Boundary()
        for p in self.items:
            p.boundary(b)
        return b

    def remove(self) -> None:
        """Remove all the anchors and their edges."""
        for p in self.items:
            p.remove()

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def _fresh(S, base: str) -> str:
    name, k = base, 1
    while name in S._dims or S.has_edge(name):
        name, k = f"{base}#{k}", k + 1
    return name


def soft_pin(
    S,
    vertex: Hashable,
    values,
    coords: Sequence[int] | None = None,
    strength: float = 1.0,
    name: str | None = None,
    potential: Potential | None = None,
) -> Penalty:
    """Pull coordinates ``coords`` of ``vertex`` toward ``values`` with strength ``γ`` (Eq. 23).

    Adds a stubborn anchor vertex (stalk ``R^k``) and the penalty edge
    ``anchor -> vertex`` with maps ``√γ·I_k`` and ``√γ·P_J``; both are named
    ``name`` (default ``"<vertex>/pin"``, numbered if taken).

    Parameters
    ----------
    S : Sheaf (modified in place)
    vertex : the vertex to pull.
    values : tensor ``(k,)`` or ``(B, k)``, the target.
    coords : the ``k`` coordinates of the stalk to pull (default: all).
    strength : ``γ > 0``.
    name : name of the anchor vertex and of the edge.
    potential : edge potential of the penalty (default quadratic; e.g. ``L1()`` for a robust pin).

    Returns
    -------
    Penalty
        With ``.anchor``, ``.edge`` and ``.boundary(b)``, which fixes the anchor at ``values``.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("h", 3)
    >>> pin = cs.soft_pin(S, "h", torch.tensor([1.0]), coords=[2], strength=4.0)
    >>> S.edge(pin.edge).Fv.matrix().tolist()
    [[0.0, 0.0, 2.0]]
    """
    d = S.dim(vertex)
    strength = float(strength)
    if not (strength > 0 and math.isfinite(strength)):
        raise ValueError(f"soft_pin at vertex {vertex!r}: strength must be positive and finite, got {strength}; "
                         "for a hard pin fix the coordinates in the Boundary instead")
    values = torch.as_tensor(values)
    if not values.is_floating_point():
        values = values.to(S.dtype)
    check_finite(values, f"soft_pin target at vertex {vertex!r}")
    idx = list(range(d)) if coords is None else [int(c) for c in coords]
    if values.dim() not in (1, 2) or values.shape[-1] != len(idx):
        raise ValueError(f"soft_pin at vertex {vertex!r}: values of shape {tuple(values.shape)} for {len(idx)} "
                         f"coordinates; expected ({len(idx)},) or (B, {len(idx)})")
    name = _fresh(S, f"{vertex}/pin") if name is None else name
    k, root = len(idx), math.sqrt(strength)
    S.add_vertex(name, k)
    try:
        S.add_edge(name, vertex, Scaled(root, k), Compose(Scaled(root, k), Select(idx, d)), name=name,
                   potential=potential)
    except Exception:
        S.remove_vertex(name)
        raise
    return Penalty(S, vertex, name, name, values, None if coords is None else idx, strength)


def reluctance(
    S,
    vertices: Sequence[Hashable],
    reference=None,
    strength: float = 1.0,
    potential: Potential | None = None,
) -> Penalties:
    """Anchor each of ``vertices`` to a reference value with strength ``λ`` (App. B.2, Eq. 41).

    Adds, per vertex ``v``, an anchor and an edge with maps ``√λ·I`` so that the
    energy gains ``(λ/2)‖x_v − ω₀,v‖²`` (or ``λ U(x_v − ω₀,v)`` with ``potential``,
    e.g. ``L1()`` for sparse regularisation, Note 5.2).

    Parameters
    ----------
    vertices : the (free) vertices to regularise.
    reference : None (zero: plain L2 regularisation, Eq. 28), a Cochain or flat
        tensor of the sheaf (e.g. the initial state ω₀), or ``{vertex: value}``.
    strength : ``λ > 0``.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> I = torch.eye(1, dtype=torch.float64)
    >>> _ = S.add_edge("a", "b", I, I)
    >>> reg = cs.reluctance(S, ["b"], strength=1.0)
    >>> b = reg.boundary(cs.Boundary().fix("a", torch.tensor([2.0], dtype=torch.float64)))
    >>> round(float(cs.minimize(S, b).x["b"]), 6)
    1.0
    """
    if isinstance(reference, Mapping):
        refs = {v: torch.as_tensor(reference[v]) for v in vertices}
    elif reference is None:
        refs = {v: torch.zeros(S.dim(v), dtype=S.dtype) for v in vertices}
    else:
        flat = reference.flat if isinstance(reference, Cochain) else torch.as_tensor(reference)
        refs = {v: flat[..., S.vertex_slice(v)] for v in vertices}
    return Penalties([soft_pin(S, v, refs[v], strength=strength, name=_fresh(S, f"{v}/reluctance"),
                               potential=potential) for v in vertices])
