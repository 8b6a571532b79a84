"""Energy of a 0-cochain: ``E(x) = Σ_e w_e U_e(F_v(x_v), F_u(x_u))``, per edge and in total.

With the default quadratic potential ``U = ½‖F_v x_v − F_u x_u‖²`` the total is
half the discord ``½‖δx‖²`` and its gradient is ``Lx``.

``cs.energy`` and ``cs.discord`` are this module's [`energy`][cellsheaf.energy.energy] and
[`discord`][cellsheaf.energy.discord]: the package attribute ``cellsheaf.energy`` is the
function, so the other functions are imported from the module by name
(``from cellsheaf.energy import gradient, forces, edge_energies``).

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
>>> _ = S.add_edge("a", "b", torch.eye(1), torch.eye(1), name="e")
>>> x = torch.tensor([0.0, 2.0])
>>> cs.energy(S, x), cs.discord(S, x)
(tensor(2.), {'e': tensor(2.)})
"""

from __future__ import annotations

from typing import Hashable

import torch
from torch import Tensor

from .cochain import as_flat
from .operators import edge_weights, expressed, pullback

__all__ = ["edge_energies", "energy", "discord", "forces", "gradient"]


def _layout(S) -> tuple[Tensor, Tensor, list]:
    """Edge id of every 1-cochain coordinate, mask of quadratic coordinates, special edges."""
    if "energy_layout" not in S._cache:
        dims = torch.as_tensor(S._edge_dim_array())
        ids = torch.repeat_interleave(torch.arange(dims.shape[0]), dims)
        special = [(start + k, e, S.edge_slice(e.name)) for seg, start in zip(S._segments, S._segment_starts())
                   if isinstance(seg, dict) for k, e in enumerate(seg.values()) if not e.quadratic]  # stacks: quadratic
        quad = torch.ones(S.C1, dtype=torch.bool)
        for _, _, sl in special:
            quad[sl] = False
        S._cache["energy_layout"] = (ids, quad, special)
    return S._cache["energy_layout"]


def _check(values: Tensor, S, what: str) -> None:
    """Raise naming the first edge whose ``values`` (``(..., E)``) are not finite: one host read when all are."""
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        k = int(torch.nonzero(bad.reshape(-1, values.shape[-1]).any(0))[0])
        raise FloatingPointError(f"{what} of edge {S.edges[k]!r} is not finite (NaN or Inf); check the maps and "
                                 "the potential at this point (e.g. log of a non-positive probability)")


def _potential(e, method: str, a_v: Tensor, a_u: Tensor):
    """``e.potential.<method>(a_v, a_u)``, with errors (a potential undefined at the point) naming the edge."""
    try:
        return getattr(e.potential, method)(a_v, a_u)
    except ValueError as err:
        raise ValueError(f"edge {e.name!r}: {err}") from err


def edge_energies(S, x, check: bool = True) -> Tensor:
    """Weighted energy of every edge, ``(..., E)`` in edge order.

    A non-finite energy raises `FloatingPointError` naming the edge (one host read);
    ``check=False`` returns it as it is, for loops that fold the test into their own reads.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.eye(1), torch.eye(1), weight=3.0)
    >>> from cellsheaf.energy import edge_energies
    >>> edge_energies(S, torch.tensor([[0.0, 1.0]]))
    tensor([[1.5000]])
    """
    xf = as_flat(S, x)
    av, au = expressed(S, xf)
    ids, quad, special = _layout(S)
    w = edge_weights(S, av.dtype, av.device)
    r = av - au
    coord = torch.where(quad.to(av.device), 0.5 * w * r * r, torch.zeros_like(r))
    out = coord.new_zeros(*coord.shape[:-1], len(S.edges)).index_add(-1, ids.to(av.device), coord)
    if special:
        k = torch.tensor([k for k, _, _ in special], device=av.device)
        vals = torch.stack([e.weight * _potential(e, "pair_value", av[..., sl], au[..., sl])
                            for _, e, sl in special], -1)
        out = out.index_add(-1, k, vals)
    if check:
        _check(out, S, "energy")
    return out


def energy(S, x) -> Tensor:
    """Total energy ``E(x)``: a scalar, or ``(B,)`` for a batch ``(B, C0)``.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 2); S.add_vertex("b", 2)
    >>> _ = S.add_edge("a", "b", torch.eye(2), torch.eye(2))
    >>> cs.energy(S, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    tensor([1.])
    """
    return edge_energies(S, x).sum(-1)


def discord(S, x) -> dict[Hashable, Tensor]:
    """``{edge: energy}`` (scalars, or ``(B,)`` for a batch).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.eye(1), torch.eye(1), name="e")
    >>> cs.discord(S, torch.tensor([1.0, 0.0]))
    {'e': tensor(0.5000)}
    """
    E = edge_energies(S, x)
    return {name: E[..., k] for k, name in enumerate(S.edges)}


def edge_forces(S, name, x: Tensor, maps=None) -> tuple[Tensor, Tensor]:
    """``(∂E_e/∂a_v, ∂E_e/∂a_u)`` of one edge at a batch ``x`` (``(B, C0)``): its own weighted potential
    gradient, from its own discord only (the slice of [`forces`][cellsheaf.energy.forces] for that edge, without a pass over the others).
    ``maps`` (``(F_v, F_u)``) replaces the edge's maps (e.g. a max pooling with the ties of a reference point
    broken, [`cellsheaf.maps.MaxPool.tie_broken`][cellsheaf.maps.MaxPool.tie_broken]).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.eye(1), torch.eye(1), name="e", weight=2.0)
    >>> from cellsheaf.energy import edge_forces
    >>> edge_forces(S, "e", torch.tensor([[1.0, 3.0]]))
    (tensor([[4.]]), tensor([[-4.]]))
    """
    e = S.edge(name)
    Fv, Fu = maps or (e.Fv, e.Fu)
    av, au = Fv.apply(x[:, S.vertex_slice(e.v)]), Fu.apply(x[:, S.vertex_slice(e.u)])
    if e.potential is None or e.potential.quadratic:
        gv = av - au if e.weight == 1.0 else e.weight * (av - au)
        return gv, -gv
    pv, pu = _potential(e, "pair_grad", av, au)
    return (pv, pu) if e.weight == 1.0 else (e.weight * pv, e.weight * pu)


def forces(S, x, check: bool = True) -> tuple[Tensor, Tensor]:
    """``(∂E/∂a_v, ∂E/∂a_u)``: the weighted potential gradients on both ends of every edge, ``(..., C1)``.

    A non-finite gradient of a non-quadratic potential raises `FloatingPointError` naming the edge
    (a host read per such edge); ``check=False`` skips the test."""
    xf = as_flat(S, x)
    av, au = expressed(S, xf)
    _, quad, special = _layout(S)
    g = (av - au) * edge_weights(S, av.dtype, av.device)
    if not special:
        return g, -g
    gv, gu = g.clone(), -g
    for _, e, sl in special:
        pv, pu = _potential(e, "pair_grad", av[..., sl], au[..., sl])
        if check and not bool(torch.isfinite(pv).all() and torch.isfinite(pu).all()):
            raise FloatingPointError(f"the potential gradient of edge {e.name!r} is not finite at this point")
        gv[..., sl], gu[..., sl] = e.weight * pv, e.weight * pu
    return gv, gu


def gradient(S, x) -> Tensor:
    """``∇E(x)`` on all coordinates, ``(..., C0)``: the nonlinear Laplacian ``δᵀ ∘ ∇U ∘ δ`` at ``x``.

    For a linear sheaf with quadratic potentials this is ``Lx``.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.eye(1), cs.maps.ReLU(1))
    >>> from cellsheaf.energy import gradient
    >>> gradient(S, torch.tensor([0.0, 2.0]))
    tensor([-2.,  2.])
    """
    xf = as_flat(S, x)
    gv, gu = forces(S, xf)
    return pullback(S, gv, gu, at=xf)
