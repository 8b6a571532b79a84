"""Batches of graphs: the disjoint union of sheaves with a batch vector, and per-graph pooling of cochains.

The convention is torch-geometric's: the sheaves of a batch are laid side by
side as one sheaf whose Laplacian is block diagonal, and a batch vector
``(N,)`` says which graph each vertex came from. Stacked edges
([`cellsheaf.Sheaf.from_arrays`][cellsheaf.sheaf.Sheaf.from_arrays]) of one shape are concatenated into one stack,
so a batch of graphs costs one batched product per operator call, and maps
that require grad keep their autograd graph.

Examples
--------
>>> import torch, cellsheaf as cs
>>> F = torch.eye(2).expand(2, 2, 2)
>>> A = cs.Sheaf.from_arrays([2, 2, 2], [[0, 1], [1, 2]], F, F)
>>> B = cs.Sheaf.from_arrays([2, 2], [[0], [1]], F[:1], F[:1])
>>> U, batch = cs.disjoint_union([A, B])
>>> U, batch
(Sheaf(5 vertices, 3 edges, C0=10, C1=6), tensor([0, 0, 0, 1, 1]))
>>> cs.pool(U, torch.arange(10.0), batch, reduce="sum")
tensor([[ 6.,  9.],
        [14., 16.]])
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
from torch import Tensor

from .cochain import as_flat
from .sheaf import Sheaf
from .stacked import EdgeStack

__all__ = ["disjoint_union", "pool", "REDUCTIONS"]

REDUCTIONS = ("sum", "mean", "max")


def _plain(S: Sheaf) -> bool:
    """Vertices ``0..n-1`` and edges ``0..m-1`` in order (as `Sheaf.from_arrays` names them)."""
    return S.vertices == list(range(len(S))) and S.edges == list(range(S.num_edges))


def _stack_kind(st: EdgeStack) -> tuple:
    return (st.diagonal, tuple(st.Fu.shape[1:]), tuple(st.Fv.shape[1:]), st.weights is not None,
            torch.promote_types(st.Fu.dtype, st.Fv.dtype), st.Fu.device)


def disjoint_union(sheaves: Sequence[Sheaf]) -> tuple[Sheaf, Tensor]:
    """The disjoint union of ``sheaves`` and its batch vector ``(N,)`` (the graph of each vertex).

    Vertices and edges keep their order, graph after graph, so a cochain of the union
    is the concatenation of the graphs' cochains. When every sheaf names its vertices
    ``0..n-1`` and its edges ``0..m-1`` (as [`cellsheaf.Sheaf.from_arrays`][cellsheaf.sheaf.Sheaf.from_arrays] does) the
    union does too, with offsets (torch-geometric's convention); otherwise vertex and
    edge names become pairs ``(graph, name)``. Consecutive stacks of equal shape are
    joined into one stack; maps are shared, not copied, by per-edge records.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.eye(1), torch.eye(1), name="e")
    >>> U, batch = cs.disjoint_union([S, S])
    >>> U.vertices, U.edges, batch
    ([(0, 'a'), (0, 'b'), (1, 'a'), (1, 'b')], [(0, 'e'), (1, 'e')], tensor([0, 0, 1, 1]))
    """
    sheaves = list(sheaves)
    for i, S in enumerate(sheaves):
        if not isinstance(S, Sheaf):
            raise TypeError(f"disjoint_union takes a sequence of cellsheaf.Sheaf; item {i} is {type(S).__name__}")
    plain = all(_plain(S) for S in sheaves)
    U = Sheaf()
    base = 0
    for i, S in enumerate(sheaves):
        for k, v in enumerate(S.vertices):
            U.add_vertex(base + k if plain else (i, v), S.dim(v))
        base += len(S)
    pending: list[tuple[EdgeStack, int, int]] = []  # stacks waiting to be joined: (stack, graph, vertex offset)

    def flush() -> None:
        if not pending:
            return
        index = torch.cat([st.index + off for st, _, off in pending], 1)
        Fu = torch.cat([st.Fu for st, *_ in pending])
        Fv = torch.cat([st.Fv for st, *_ in pending])
        w = torch.cat([st.weights for st, *_ in pending]) if pending[0][0].weights is not None else None
        names = None if plain else [(i, n) for st, i, _ in pending for n in st.names()]
        U.add_edges(index, Fu, Fv, names=names, weights=w)
        pending.clear()

    voff = eoff = 0
    for i, S in enumerate(sheaves):
        position = {v: k for k, v in enumerate(S.vertices)}
        for block in S.blocks():
            if isinstance(block, EdgeStack):
                if pending and _stack_kind(pending[0][0]) != _stack_kind(block):
                    flush()
                pending.append((block, i, voff))
                continue
            flush()
            for e in block:
                name: Hashable = eoff + e.name if plain else (i, e.name)
                u, v = (voff + position[e.u], voff + position[e.v]) if plain else ((i, e.u), (i, e.v))
                U.add_edge(u, v, e.Fu, e.Fv, name=name, weight=e.weight, potential=e.potential)
        voff, eoff = voff + len(S), eoff + S.num_edges
    flush()
    counts = torch.tensor([len(S) for S in sheaves], dtype=torch.long)
    return U, torch.repeat_interleave(torch.arange(len(sheaves)), counts)


def pool(S: Sheaf, x, batch: Tensor, reduce: str = "mean", num_graphs: int | None = None) -> Tensor:
    """Pool a 0-cochain over the vertices of each graph: ``(..., C0) -> (..., G, d)``.

    ``batch (N,)`` gives the graph of every vertex ([`disjoint_union`][cellsheaf.union.disjoint_union]); every stalk has
    the same dimension ``d``. ``reduce`` is ``"sum"``, ``"mean"`` or ``"max"`` (per
    coordinate); ``num_graphs`` defaults to ``batch.max() + 1`` (graphs without
    vertices pool to 0). Differentiable in ``x``.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf.from_arrays([1, 1, 1], [[0], [1]], torch.ones(1, 1, 1), torch.ones(1, 1, 1))
    >>> cs.pool(S, torch.tensor([1.0, 3.0, 7.0]), torch.tensor([0, 0, 1]))
    tensor([[2.],
            [7.]])
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    dims = {S.dim(v) for v in S.vertices}
    if len(dims) > 1:
        raise ValueError(f"pool needs equal stalk dims; this sheaf has stalks of dims {sorted(dims)}")
    d, N = (dims.pop() if dims else 0), len(S)
    batch = torch.as_tensor(batch)
    if batch.shape != (N,) or batch.is_floating_point():
        raise ValueError(f"batch must be an integer tensor of shape ({N},) (the graph of every vertex), "
                         f"got {tuple(batch.shape)} {batch.dtype}")
    x = as_flat(S, x)
    G = int(batch.max()) + 1 if num_graphs is None and N else int(num_graphs or 0)
    batch = batch.to(device=x.device, dtype=torch.long)
    if N and (int(batch.min()) < 0 or int(batch.max()) >= G):
        raise ValueError(f"batch holds graph numbers outside [0, {G}); pass num_graphs=")
    xs = x.reshape(*x.shape[:-1], N, d)
    out = xs.new_zeros(*x.shape[:-1], G, d)
    if reduce == "max":
        idx = batch.view(N, 1).expand(*xs.shape)
        return out.scatter_reduce(-2, idx, xs, "amax", include_self=False)
    out = out.index_add(-2, batch, xs)
    if reduce == "mean":
        counts = torch.bincount(batch, minlength=G).clamp(min=1).to(x.dtype)
        out = out / counts.unsqueeze(-1)
    return out
