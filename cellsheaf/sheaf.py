"""The [`Sheaf`][cellsheaf.sheaf.Sheaf]: an oriented multigraph with stalks and restriction maps.

For an edge ``e = u -> v`` the coboundary is ``(δx)_e = F_v x_v − F_u x_u``.
Vertices and edges keep their insertion order, which is the order of the
0-cochain and 1-cochain coordinates.

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf()
>>> S.add_vertex("u", 2); S.add_vertex("v", 2)
>>> S.add_edge("u", "v", torch.eye(2), torch.eye(2), name="e")
'e'
>>> S.cohomology().h0
2
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Hashable, Iterable, Mapping, Sequence

import networkx as nx
import numpy as np
import torch
from torch import Tensor

from . import maps as _maps
from .potentials import Potential, Quadratic
from .stacked import EdgeStack, as_map_tensor, bad_weight_row, check_map, check_stack, first_bad_row

__all__ = ["Edge", "Sheaf", "constant_sheaf"]

_STRUCTURAL = {"plan", "energy_layout"}  # cache entries that depend on the structure only, not on map values


@dataclass(frozen=True, eq=False)
class Edge:
    """One oriented edge ``u -> v`` with its two restriction maps."""

    name: Hashable
    u: Hashable
    v: Hashable
    Fu: _maps.Map
    Fv: _maps.Map
    weight: float = 1.0
    potential: Potential | None = None

    @property
    def dim(self) -> int:
        """Dimension of the edge stalk."""
        return self.Fu.d_out

    @property
    def linear(self) -> bool:
        """Whether both maps are linear and the potential is quadratic."""
        return self.Fu.linear and self.Fv.linear and self.quadratic

    @property
    def quadratic(self) -> bool:
        return self.potential is None or self.potential.quadratic

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Edge):
            return NotImplemented
        same_pot = (self.potential or Quadratic()) == (other.potential or Quadratic())
        return (self.name, self.u, self.v, self.weight) == (other.name, other.u, other.v, other.weight) \
            and self.Fu == other.Fu and self.Fv == other.Fv and same_pot

    __hash__ = object.__hash__


class Sheaf:
    """A cellular sheaf on an oriented multigraph.

    Vertex stalks are ``R^d``; each edge carries two restriction maps
    ([`cellsheaf.maps`][cellsheaf.maps]; a plain tensor means [`cellsheaf.maps.Linear`][cellsheaf.maps.Linear]),
    an optional weight and an optional edge potential.

    Edges live in one of two storages behind the same interface: one record
    per edge ([`add_edge`][cellsheaf.sheaf.Sheaf.add_edge]: few, heterogeneous, structured or nonlinear maps)
    or stacked tensors ([`from_arrays`][cellsheaf.sheaf.Sheaf.from_arrays], [`add_edges`][cellsheaf.sheaf.Sheaf.add_edges]: many edges of one shape,
    see [`cellsheaf.stacked`][cellsheaf.stacked]). [`edge`][cellsheaf.sheaf.Sheaf.edge], [`edge_items`][cellsheaf.sheaf.Sheaf.edge_items] and every operator,
    solver and spec work on both.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf()
    >>> S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> S.add_edge("a", "b", torch.ones(1, 1), 2 * torch.ones(1, 1))
    'a->b'
    >>> S.coboundary().to_dense()
    tensor([[-1.,  2.]])
    """

    def __init__(self) -> None:
        self._dims: dict[Hashable, int] = {}
        self._segments: list[dict | EdgeStack] = []  # per-edge dicts and stacks, in cochain order
        self._graph: nx.MultiDiGraph | None = None
        self._version = 0
        self._layout: dict[str, Any] = {}
        self._cache: dict[Any, Any] = {}

    # ------------------------------------------------------------------ building
    def add_vertex(self, name: Hashable, dim: int) -> None:
        """Add a vertex with stalk ``R^dim`` (``dim >= 0``)."""
        if name in self._dims:
            raise ValueError(f"vertex {name!r} already exists; vertex names must be unique")
        if isinstance(dim, bool) or int(dim) != dim or dim < 0:
            raise ValueError(f"stalk dim of vertex {name!r} must be a non-negative integer, got {dim!r}")
        self._dims[name] = int(dim)
        self._touch()

    def add_edge(
        self,
        u: Hashable,
        v: Hashable,
        Fu,
        Fv,
        name: Hashable | None = None,
        weight: float = 1.0,
        potential: Potential | None = None,
    ) -> Hashable:
        """Add the oriented edge ``u -> v`` with maps ``F_{u◁e} = Fu`` and ``F_{v◁e} = Fv``.

        Returns the edge name (``"u->v"`` by default, ``"u->v#k"`` for a parallel edge).
        Complex maps and maps with NaN/Inf entries are refused; integer maps are cast to float64.
        """
        for w in (u, v):
            if w not in self._dims:
                raise KeyError(f"unknown vertex {w!r} in edge {u!r} -> {v!r}; add it with add_vertex first")
        if name is None:
            name = f"{u}->{v}"
            k = 1
            while self.has_edge(name):
                name, k = f"{u}->{v}#{k}", k + 1
        elif self.has_edge(name):
            raise ValueError(f"edge {name!r} already exists; edge names must be unique")
        Fu, Fv = check_map(Fu, name, "Fu"), check_map(Fv, name, "Fv")
        for w, F, side in ((u, Fu, "Fu"), (v, Fv, "Fv")):
            if F.d_in != self._dims[w]:
                raise ValueError(
                    f"edge {name!r}: {side} takes inputs of dim {F.d_in} but vertex {w!r} has stalk dim "
                    f"{self._dims[w]}"
                )
        if Fu.d_out != Fv.d_out:
            raise ValueError(f"edge {name!r}: Fu maps to dim {Fu.d_out} but Fv to dim {Fv.d_out}; they must agree")
        weight = float(weight)
        if not (weight > 0 and weight < float("inf")):
            raise ValueError(f"edge {name!r}: weight must be positive and finite, got {weight}")
        if potential is not None and not isinstance(potential, Potential):
            raise TypeError(f"edge {name!r}: potential must be a cellsheaf.potentials.Potential")
        if not self._segments or not isinstance(self._segments[-1], dict):
            self._segments.append({})
        self._segments[-1][name] = Edge(name, u, v, Fu, Fv, weight, potential)
        self._touch()
        return name

    def add_edges(self, edge_index, Fu, Fv, names: Sequence[Hashable] | None = None, weights=None) -> None:
        """Add ``E`` edges of one shape at once, stored as stacked tensors (the torch-geometric convention).

        Parameters
        ----------
        edge_index : (2, E) integer tensor or array
            Positions in [`vertices`][cellsheaf.sheaf.Sheaf.vertices] of the tails ``u`` (row 0) and heads ``v`` (row 1).
        Fu, Fv : tensors
            ``(E, d_e, d_u)`` and ``(E, d_e, d_v)`` dense maps, or ``(E, d)`` diagonal maps
            applied elementwise. Held by reference: maps that require grad keep autograd
            through every operator (see [`update_maps`][cellsheaf.sheaf.Sheaf.update_maps]).
        names : sequence, optional
            Edge names; by default the integers ``k0, k0 + 1, ...`` with ``k0`` the number of
            edges already in the sheaf.
        weights : (E,) tensor, optional
            Positive finite edge weights.

        Examples
        --------
        >>> import torch, cellsheaf as cs
        >>> S = cs.Sheaf(); S.add_vertex("a", 2); S.add_vertex("b", 2)
        >>> S.add_edges([[0], [1]], torch.eye(2)[None], 2 * torch.eye(2)[None])
        >>> S.edges, S.edge(0).u, S.edge(0).v
        ([0], 'a', 'b')
        """
        where = "add_edges"
        index = torch.as_tensor(edge_index)
        if index.is_floating_point() or index.is_complex() or index.dim() != 2 or index.shape[0] != 2:
            raise ValueError(f"{where}: edge_index must be an integer tensor of shape (2, E), got "
                             f"{tuple(index.shape)} {index.dtype}")
        index = index.to(torch.long).clone()
        E = index.shape[1]
        Fu, Fv = check_stack(Fu, Fv, E, where)
        if names is not None:
            names = list(names)
            if len(names) != E:
                raise ValueError(f"{where}: {len(names)} names for {E} edges")
        stack = EdgeStack(index, Fu, Fv, None, names=names, name0=self.num_edges)
        n = len(self._dims)
        if E and (int(index.min()) < 0 or int(index.max()) >= n):
            k = int(torch.nonzero(((index < 0) | (index >= n)).any(0))[0])
            raise IndexError(f"{where}: edge {stack.name(k)!r} joins positions {index[:, k].tolist()}, but the "
                             f"sheaf has {n} vertices (edge_index holds positions in S.vertices)")
        self._check_new_names(stack)
        self._check_stack_dims(stack, where)
        self._check_stack_values(stack, Fu, Fv)
        if weights is not None:
            stack.weights = self._checked_weights(stack, weights, where)
        self._segments.append(stack)
        self._touch()

    @classmethod
    def from_arrays(cls, dims, edge_index, Fu, Fv, names: Sequence[Hashable] | None = None,
                    weights=None) -> "Sheaf":
        """Build a sheaf from arrays: stalk dims per vertex and ``E`` edges of one shape.

        Parameters
        ----------
        dims : sequence of ints, 1-d integer tensor/array, or mapping ``{name: dim}``
            Stalk dimension of each vertex. Vertices are named ``0 .. n-1`` unless a
            mapping gives their names (in its order).
        edge_index, Fu, Fv, names, weights
            As in [`add_edges`][cellsheaf.sheaf.Sheaf.add_edges]: ``edge_index`` holds positions in the vertex order.

        Examples
        --------
        >>> import torch, cellsheaf as cs
        >>> F = torch.eye(3).expand(4, 3, 3)
        >>> S = cs.Sheaf.from_arrays([3] * 4, torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]]), F, F)
        >>> S.C0, S.C1, S.cohomology().h0
        (12, 12, 3)
        """
        S = cls()
        S._add_vertices(dims)
        S.add_edges(edge_index, Fu, Fv, names=names, weights=weights)
        return S

    def _add_vertices(self, dims) -> None:
        """Add many vertices: ``dims`` is a mapping name -> dim, or dims of vertices named by position."""
        if isinstance(dims, Mapping):
            for name, d in dims.items():
                self.add_vertex(name, d)
            return
        arr = np.asarray(dims.detach().cpu() if isinstance(dims, Tensor) else dims)
        if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)) or (arr < 0).any():
            raise ValueError("dims must be a 1-d sequence of non-negative integers (one stalk dim per vertex) or a "
                             "mapping {name: dim}")
        if self._dims:
            raise ValueError("dims given as a sequence name vertices 0..n-1: only on a sheaf without vertices")
        self._dims = dict(zip(range(arr.size), arr.tolist()))
        self._touch()

    def _check_new_names(self, stack: EdgeStack) -> None:
        if stack._names is None:
            lo, hi = stack.name0, stack.name0 + len(stack)
            clash = next((n for seg in self._segments for n in self._segment_names(seg, int_only=True)
                          if lo <= n < hi), None)
        else:
            if len(set(stack._names)) != len(stack._names):
                seen: set = set()
                dup = next(n for n in stack._names if n in seen or seen.add(n))
                raise ValueError(f"edge {dup!r} is named twice; edge names must be unique")
            clash = next((n for n in stack._names if self.has_edge(n)), None)
        if clash is not None:
            raise ValueError(f"edge {clash!r} already exists; edge names must be unique (pass names=)")

    @staticmethod
    def _segment_names(seg, int_only: bool = False):
        if isinstance(seg, dict):
            names = seg.keys()
        elif seg._names is None:
            return range(seg.name0, seg.name0 + len(seg))
        else:
            names = seg._names
        if int_only:
            return (n for n in names if isinstance(n, (int, np.integer)) and not isinstance(n, bool))
        return names

    def _check_stack_dims(self, stack: EdgeStack, where: str) -> None:
        vd = torch.as_tensor(self._dim_array())
        du, dv, _ = stack.shape
        idx = stack.index.cpu()
        for row, d, side in ((0, du, "Fu"), (1, dv, "Fv")):
            wrong = vd[idx[row]] != d
            if bool(wrong.any()):
                k = int(torch.nonzero(wrong)[0])
                w = self.vertices[int(idx[row, k])]
                raise ValueError(f"{where}: edge {stack.name(k)!r}: {side} takes inputs of dim {d} but vertex {w!r} "
                                 f"has stalk dim {self._dims[w]}")

    def _check_stack_values(self, stack: EdgeStack, Fu: Tensor, Fv: Tensor) -> None:
        for F, side in ((Fu, "Fu"), (Fv, "Fv")):
            k = first_bad_row(F) if F.numel() else None
            if k is not None:
                raise ValueError(f"edge {stack.name(k)!r}: {side} has NaN or Inf entries; restriction maps must be "
                                 "finite")

    def _checked_weights(self, stack: EdgeStack, weights, where: str) -> Tensor:
        w = as_map_tensor(weights, f"{where}: weights")
        if w.shape != (len(stack),):
            raise ValueError(f"{where}: weights must have shape ({len(stack)},), got {tuple(w.shape)}")
        k = bad_weight_row(w)
        if k is not None:
            raise ValueError(f"edge {stack.name(k)!r}: weight must be positive and finite, got {float(w[k])}")
        return w

    def update_maps(self, Fu=None, Fv=None, weights=None, check: bool = True) -> None:
        """Replace the values of the stacked maps (and weights), keeping the structure and its cached plan.

        ``Fu``/``Fv`` have the shapes of the stored stacks (``(E, d_e, d_u)``/``(E, d_e, d_v)``,
        or ``(E, d)`` for diagonal stacks); ``None`` keeps a side. With several stacks
        (several [`add_edges`][cellsheaf.sheaf.Sheaf.add_edges] calls) pass a list with one tensor per stack. Tensors that
        require grad keep autograd through every operator ([`cellsheaf.operators`][cellsheaf.operators]), which is
        how a sheaf neural network learns its maps. ``check=False`` skips the NaN/Inf scan
        (one pass over the values and a host sync).

        Examples
        --------
        >>> import torch, cellsheaf as cs
        >>> S = cs.Sheaf.from_arrays([1, 1], [[0], [1]], torch.ones(1, 1, 1), torch.ones(1, 1, 1))
        >>> Fv = torch.full((1, 1, 1), 2.0, requires_grad=True)
        >>> S.update_maps(Fv=Fv)
        >>> L = cs.operators.apply_laplacian(S, torch.tensor([1.0, 1.0]))
        >>> L
        tensor([-1.,  2.], grad_fn=<...>)
        """
        stacks = self.stacks
        if not stacks:
            raise ValueError("update_maps needs stacked edges (from_arrays / add_edges); use set_maps for single edges")

        def per_stack(x, what):
            if x is None:
                return [None] * len(stacks)
            if isinstance(x, (list, tuple)):
                if len(x) != len(stacks):
                    raise ValueError(f"update_maps: {len(x)} {what} tensors for {len(stacks)} stacks")
                return list(x)
            if len(stacks) != 1:
                raise ValueError(f"update_maps: the sheaf has {len(stacks)} stacks of edges; pass a list of {what} "
                                 "tensors, one per stack (None keeps one)")
            return [x]

        new = []
        for st, fu, fv, w in zip(stacks, per_stack(Fu, "Fu"), per_stack(Fv, "Fv"), per_stack(weights, "weights")):
            fu = st.Fu if fu is None else as_map_tensor(fu, "update_maps: Fu")
            fv = st.Fv if fv is None else as_map_tensor(fv, "update_maps: Fv")
            for F, old, side in ((fu, st.Fu, "Fu"), (fv, st.Fv, "Fv")):
                if F.shape != old.shape:
                    raise ValueError(f"update_maps: {side} has shape {tuple(F.shape)}, the stored stack "
                                     f"{tuple(old.shape)}; the structure must stay the same (build a new sheaf "
                                     "otherwise)")
            if check:
                self._check_stack_values(st, fu if fu is not st.Fu else fu[:0], fv if fv is not st.Fv else fv[:0])
            w = st.weights if w is None else self._checked_weights(st, w, "update_maps") if check else \
                as_map_tensor(w, "update_maps: weights")
            new.append((fu, fv, w))
        for st, (fu, fv, w) in zip(stacks, new):
            st.Fu, st.Fv, st.weights = fu, fv, w
            st.version += 1
        self._touch(structure=False)

    def remove_edge(self, name: Hashable) -> None:
        """Remove edge ``name``."""
        seg, key = self._find(name)
        if isinstance(seg, dict):
            del seg[key]
        else:
            keep = torch.ones(len(seg), dtype=torch.bool)
            keep[key] = False
            self._segments[self._segments.index(seg)] = seg.select(keep)
        self._segments = [s for s in self._segments if len(s)]
        self._touch()

    def remove_vertex(self, name: Hashable) -> None:
        """Remove a vertex and every edge incident to it."""
        self._check_vertex(name)
        pos = self._vertex_index()[name]
        segments = []
        for seg in self._segments:
            if isinstance(seg, dict):
                seg = {k: e for k, e in seg.items() if name not in (e.u, e.v)}
            else:
                idx = seg.index
                keep = ((idx[0] != pos) & (idx[1] != pos)).cpu()
                seg = seg.select(keep, index=idx - (idx > pos).to(idx.dtype))
            if len(seg):
                segments.append(seg)
        self._segments = segments
        del self._dims[name]
        self._touch()

    def set_maps(self, name: Hashable, Fu=None, Fv=None) -> None:
        """Replace one or both restriction maps of edge ``name`` (same shapes)."""
        seg, key = self._find(name)
        e = self.edge(name)
        new = {}
        for side, old, F in (("Fu", e.Fu, Fu), ("Fv", e.Fv, Fv)):
            if F is not None:
                F = check_map(F, name, side)
                if (F.d_in, F.d_out) != (old.d_in, old.d_out):
                    raise ValueError(
                        f"edge {name!r}: new {side} has shape {F.d_out}x{F.d_in}, expected {old.d_out}x{old.d_in}"
                    )
                new[side] = F
        if isinstance(seg, dict):
            seg[name] = replace(e, **new)
            self._touch()  # the plan holds the per-edge records
            return
        for side, F in new.items():
            M = F.matrix()
            values = torch.diagonal(M) if seg.diagonal else M
            if seg.diagonal and not bool((M == torch.diag_embed(values)).all()):
                raise ValueError(f"edge {name!r} is in a diagonal stack: its new {side} must be diagonal")
            stacked = getattr(seg, side).clone()
            stacked[key] = values.to(stacked.dtype)
            setattr(seg, side, stacked)
        seg.version += 1
        self._touch(structure=False)

    def invalidate(self) -> None:
        """Drop cached operators; call it after changing map tensors in place. The layout (stalk dims,
        offsets, names) does not depend on the maps and is kept."""
        self._version += 1
        self._cache.clear()

    def _touch(self, structure: bool = True) -> None:
        """Drop caches: all of them, or (``structure=False``) those that depend on map values."""
        self._version += 1
        if structure:
            self._layout = {}
            self._graph = None
            self._cache.clear()
        else:
            self._cache = {k: v for k, v in self._cache.items() if k in _STRUCTURAL}
            if "plan" in self._cache:  # the plan keeps its index tensors, not the values its groups cached
                self._cache["plan"].forget_values()

    # ------------------------------------------------------------------ reading
    @property
    def vertices(self) -> list[Hashable]:
        """Vertex names in cochain order."""
        return list(self._dims)

    @property
    def edges(self) -> list[Hashable]:
        """Edge names in cochain order."""
        return [n for seg in self._segments for n in self._segment_names(seg)]

    @property
    def num_edges(self) -> int:
        """Number of edges."""
        return sum(len(seg) for seg in self._segments)

    @property
    def stacks(self) -> list[EdgeStack]:
        """The stacked blocks of edges ([`cellsheaf.stacked.EdgeStack`][cellsheaf.stacked.EdgeStack]), in cochain order."""
        return [seg for seg in self._segments if isinstance(seg, EdgeStack)]

    @property
    def graph(self) -> nx.MultiDiGraph:
        """The underlying oriented multigraph (edge keys are edge names). Do not mutate it."""
        if self._graph is None:
            G = nx.MultiDiGraph()
            G.add_nodes_from(self._dims)
            G.add_edges_from((e.u, e.v, e.name) for e in self.edge_items())
            self._graph = G
        return self._graph

    def has_edge(self, name: Hashable) -> bool:
        """Whether an edge is called ``name``."""
        return self._lookup(name) is not None

    def _lookup(self, name: Hashable):
        for seg in self._segments:
            if isinstance(seg, dict):
                try:
                    if name in seg:
                        return seg, name
                except TypeError:
                    return None
            else:
                k = seg.row(name)
                if k is not None:
                    return seg, k
        return None

    def _find(self, name: Hashable):
        found = self._lookup(name)
        if found is None:
            raise KeyError(f"unknown edge {name!r}")
        return found

    def edge(self, name: Hashable) -> Edge:
        """The [`Edge`][cellsheaf.sheaf.Edge] called ``name`` (for stacked edges a light view of the stacked tensors)."""
        seg, key = self._find(name)
        return seg[key] if isinstance(seg, dict) else self._stack_edge(seg, key)

    def _stack_edge(self, st: EdgeStack, k: int) -> Edge:
        names = self.vertices if "vnames" not in self._layout else self._layout["vnames"]
        self._layout["vnames"] = names
        u, v = (int(i) for i in st.index[:, k].tolist())
        Fu, Fv = st.maps(k)
        return Edge(st.name(k), names[u], names[v], Fu, Fv, st.weight(k))

    def blocks(self) -> list["EdgeStack | list[Edge]"]:
        """The edges in cochain order, block by block: an [`cellsheaf.stacked.EdgeStack`][cellsheaf.stacked.EdgeStack] for stacked
        edges ([`add_edges`][cellsheaf.sheaf.Sheaf.add_edges], [`from_arrays`][cellsheaf.sheaf.Sheaf.from_arrays]), a list of [`Edge`][cellsheaf.sheaf.Edge] records for edges added one by one.

        Examples
        --------
        >>> import torch, cellsheaf as cs
        >>> S = cs.Sheaf.from_arrays([1, 1, 1], [[0], [1]], torch.ones(1, 1, 1), torch.ones(1, 1, 1))
        >>> _ = S.add_edge(1, 2, torch.ones(1, 1), torch.ones(1, 1), name="e")
        >>> [type(b).__name__ for b in S.blocks()], [e.name for e in S.blocks()[1]]
        (['EdgeStack', 'list'], ['e'])
        """
        return [seg if isinstance(seg, EdgeStack) else list(seg.values()) for seg in self._segments]

    def edge_items(self) -> Iterable[Edge]:
        """All [`Edge`][cellsheaf.sheaf.Edge] records in order (stacked edges as light views, made on the fly)."""
        for seg in self._segments:
            if isinstance(seg, dict):
                yield from seg.values()
            else:
                for k in range(len(seg)):
                    yield self._stack_edge(seg, k)

    def dim(self, vertex: Hashable) -> int:
        """Stalk dimension of ``vertex``."""
        self._check_vertex(vertex)
        return self._dims[vertex]

    def _check_vertex(self, v: Hashable) -> None:
        if v not in self._dims:
            raise KeyError(f"unknown vertex {v!r}; the sheaf has {len(self._dims)} vertices")

    # ------------------------------------------------------------------ layout (cached until the structure changes)
    def _dim_array(self) -> np.ndarray:
        """Stalk dims in vertex order, ``(n,)`` int64."""
        if "vdims" not in self._layout:
            self._layout["vdims"] = np.fromiter(self._dims.values(), dtype=np.int64, count=len(self._dims))
        return self._layout["vdims"]

    def _vertex_offsets(self) -> np.ndarray:
        """Start of every vertex in the 0-cochain, ``(n + 1,)``."""
        if "voff" not in self._layout:
            self._layout["voff"] = np.concatenate([[0], np.cumsum(self._dim_array())]).astype(np.int64)
        return self._layout["voff"]

    def _vertex_index(self) -> dict:
        """Vertex name -> position."""
        if "vpos" not in self._layout:
            self._layout["vpos"] = {v: k for k, v in enumerate(self._dims)}
        return self._layout["vpos"]

    def _segment_starts(self) -> list[int]:
        """Position of each segment's first edge in the edge order."""
        if "seg_starts" not in self._layout:
            starts, k = [], 0
            for seg in self._segments:
                starts.append(k)
                k += len(seg)
            self._layout["seg_starts"] = starts
        return self._layout["seg_starts"]

    def _edge_dim_array(self) -> np.ndarray:
        """Edge stalk dims in edge order, ``(E,)`` int64."""
        if "edims" not in self._layout:
            parts = [np.fromiter((e.dim for e in seg.values()), dtype=np.int64, count=len(seg))
                     if isinstance(seg, dict) else np.full(len(seg), seg.shape[2], dtype=np.int64)
                     for seg in self._segments]
            self._layout["edims"] = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return self._layout["edims"]

    def _edge_offsets(self) -> np.ndarray:
        """Start of every edge in the 1-cochain, ``(E + 1,)``."""
        if "eoff" not in self._layout:
            self._layout["eoff"] = np.concatenate([[0], np.cumsum(self._edge_dim_array())]).astype(np.int64)
        return self._layout["eoff"]

    def _edge_position(self, name: Hashable) -> int:
        seg, key = self._find(name)
        start = self._segment_starts()[next(i for i, s in enumerate(self._segments) if s is seg)]
        return start + (key if not isinstance(seg, dict) else list(seg).index(key))

    @property
    def C0(self) -> int:
        """Dimension of the 0-cochains (sum of vertex stalk dims)."""
        return int(self._vertex_offsets()[-1])

    @property
    def C1(self) -> int:
        """Dimension of the 1-cochains (sum of edge stalk dims)."""
        return int(self._edge_offsets()[-1])

    def vertex_slice(self, v: Hashable) -> slice:
        """Slice of vertex ``v`` in the flat 0-cochain."""
        self._check_vertex(v)
        o = int(self._vertex_offsets()[self._vertex_index()[v]])
        return slice(o, o + self._dims[v])

    def edge_slice(self, name: Hashable) -> slice:
        """Slice of edge ``name`` in the flat 1-cochain."""
        k = self._edge_position(name)
        off = self._edge_offsets()
        return slice(int(off[k]), int(off[k + 1]))

    @property
    def linear(self) -> bool:
        """True when every map is linear and every potential quadratic."""
        return all(e.linear for seg in self._segments if isinstance(seg, dict) for e in seg.values())

    @property
    def requires_grad(self) -> bool:
        """Whether some map or weight tensor requires grad."""
        return any(seg.requires_grad if isinstance(seg, EdgeStack) else
                   any(t.requires_grad for e in seg.values() for t in e.Fu.tensors() + e.Fv.tensors())
                   for seg in self._segments)

    @property
    def dtype(self) -> torch.dtype:
        """The promoted dtype of all map tensors (the default dtype if there are none)."""
        dt = None
        for seg in self._segments:
            tensors = seg.tensors()[:2] if isinstance(seg, EdgeStack) else \
                [t for e in seg.values() for t in e.Fu.tensors() + e.Fv.tensors()]
            for t in tensors:
                if t.is_floating_point():
                    dt = t.dtype if dt is None else torch.promote_types(dt, t.dtype)
        return dt or torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        """The device of the map tensors (cpu if there are none)."""
        for seg in self._segments:
            if isinstance(seg, EdgeStack):
                tensors = seg.tensors()
                if tensors:
                    return tensors[0].device
                continue
            for e in seg.values():  # the first map holding a tensor decides: no list of every tensor
                for t in e.Fu.tensors() or e.Fv.tensors():
                    return t.device
        return torch.device("cpu")

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Sheaf":
        """Move every map tensor (and every cached operator) to ``device``/``dtype``, in place; returns ``self``.

        Cached index plans are kept (they are cached per device); cached values are dropped and
        rebuilt on the new device on first use.

        Examples
        --------
        >>> import torch, cellsheaf as cs
        >>> S = cs.Sheaf.from_arrays([1, 1], [[0], [1]], torch.ones(1, 1, 1), torch.ones(1, 1, 1))
        >>> S.to("cpu", torch.float64).dtype
        torch.float64
        """
        if isinstance(device, torch.dtype) and dtype is None:
            device, dtype = None, device
        for seg in self._segments:
            if isinstance(seg, EdgeStack):
                seg.to(dtype, device)
            else:
                for name, e in seg.items():
                    seg[name] = replace(e, Fu=e.Fu.to(dtype, device), Fv=e.Fv.to(dtype, device))
        self._touch(structure=any(isinstance(seg, dict) for seg in self._segments))  # plans hold per-edge records
        return self

    def __len__(self) -> int:
        return len(self._dims)

    def __repr__(self) -> str:
        return f"Sheaf({len(self._dims)} vertices, {self.num_edges} edges, C0={self.C0}, C1={self.C1})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sheaf):
            return NotImplemented
        return self._dims == other._dims and self.edges == other.edges and all(
            a == b for a, b in zip(self.edge_items(), other.edge_items())
        )

    __hash__ = object.__hash__

    def copy(self) -> "Sheaf":
        """A shallow copy (maps are shared, structure is not)."""
        S = Sheaf()
        S._dims = dict(self._dims)
        S._segments = [dict(seg) if isinstance(seg, dict) else
                       EdgeStack(seg.index, seg.Fu, seg.Fv, seg.weights, seg._names, seg.name0)
                       for seg in self._segments]
        return S

    def linearize(self, x) -> "Sheaf":
        """The linear sheaf of Jacobians at one 0-cochain ``x`` (shape ``(C0,)``).

        Nonlinear maps are replaced by their Jacobians at ``x`` (a frozen
        activation pattern for ReLU); potentials are kept.
        """
        from .cochain import as_flat

        x = as_flat(self, x)
        if x.dim() != 1:
            raise ValueError(f"linearize needs a single cochain of shape ({self.C0},), got {tuple(x.shape)}")
        S = self.copy()
        for seg in S._segments:
            if isinstance(seg, dict):
                for name, e in seg.items():
                    Fu = e.Fu.linearize(x[self.vertex_slice(e.u)]) if not e.Fu.linear else e.Fu
                    Fv = e.Fv.linearize(x[self.vertex_slice(e.v)]) if not e.Fv.linear else e.Fv
                    seg[name] = replace(e, Fu=Fu, Fv=Fv)
        return S

    # ------------------------------------------------------------------ networkx
    @classmethod
    def from_networkx(cls, G: nx.Graph, dim: str = "dim", Fu: str = "Fu", Fv: str = "Fv",
                      stalk: int | None = None) -> "Sheaf":
        """Build a sheaf from a networkx graph whose nodes carry ``dim`` and edges ``Fu``/``Fv``.

        Optional edge attributes ``name``, ``weight`` and ``potential`` are used when present.
        Undirected graphs are oriented as their edges are listed. Edges are added in the
        order of their ``index`` attribute when every edge has one (as [`to_networkx`][cellsheaf.sheaf.Sheaf.to_networkx]
        writes, so the cochain order survives a round trip), else as networkx lists them.

        ``stalk=d`` is the default for what is missing: nodes without ``dim`` get stalk
        ``R^d`` and edges without maps get identities on ``R^d``. On a plain graph (no
        attributes at all) this is [`constant_sheaf`][cellsheaf.sheaf.constant_sheaf] (stacked storage, integer edge names).

        Examples
        --------
        >>> import networkx as nx, cellsheaf as cs
        >>> cs.Sheaf.from_networkx(nx.path_graph(3), stalk=2).cohomology().h0
        2
        """
        plain = stalk is not None and not any(dim in d for _, d in G.nodes(data=True)) and not any(
            Fu in d or Fv in d for *_, d in G.edges(data=True))
        if plain:
            return constant_sheaf(G, stalk)
        S = cls()
        for n, data in G.nodes(data=True):
            if dim not in data and stalk is None:
                raise KeyError(f"node {n!r} has no {dim!r} attribute (its stalk dimension); pass stalk= for a default")
            S.add_vertex(n, data.get(dim, stalk))
        edges = list(G.edges(data=True))
        if edges and all("index" in data for *_, data in edges):
            edges.sort(key=lambda edge: edge[2]["index"])
        for u, v, data in edges:
            if (Fu not in data or Fv not in data) and stalk is None:
                raise KeyError(f"edge {u!r}->{v!r} needs {Fu!r} and {Fv!r} attributes (its restriction maps); pass "
                               "stalk= for identity maps")
            S.add_edge(u, v, data.get(Fu, _maps.Identity(stalk or 0)), data.get(Fv, _maps.Identity(stalk or 0)),
                       name=data.get("name"), weight=data.get("weight", 1.0), potential=data.get("potential"))
        return S

    def to_networkx(self) -> nx.MultiDiGraph:
        """A new ``MultiDiGraph`` with ``dim`` on nodes and ``Fu``, ``Fv``, ``name``, ``weight``,
        ``potential`` and ``index`` (position in the cochain order) on edges (keys are edge names)."""
        G = nx.MultiDiGraph()
        for v, d in self._dims.items():
            G.add_node(v, dim=d)
        for k, e in enumerate(self.edge_items()):
            G.add_edge(e.u, e.v, key=e.name, Fu=e.Fu, Fv=e.Fv, name=e.name, weight=e.weight, potential=e.potential,
                       index=k)
        return G

    # ------------------------------------------------------------------ operators
    def coboundary(self, at=None, format: str = "torch", dtype: torch.dtype | None = None):
        """The coboundary ``δ`` of shape ``(C1, C0)``; see [`cellsheaf.operators.coboundary`][cellsheaf.operators.coboundary]."""
        from .operators import coboundary

        return coboundary(self, at=at, format=format, dtype=dtype)

    def laplacian(self, at=None, normalized: bool = False, format: str = "torch", dtype: torch.dtype | None = None):
        """The (weighted) Laplacian ``δᵀWδ``; see [`cellsheaf.operators.laplacian`][cellsheaf.operators.laplacian]."""
        from .operators import laplacian

        return laplacian(self, at=at, normalized=normalized, format=format, dtype=dtype)

    def cohomology(self, **kwargs):
        """Dimensions and bases of H⁰ and H¹; see [`cellsheaf.cohomology.cohomology`][cellsheaf.cohomology.cohomology]."""
        from .cohomology import cohomology

        return cohomology(self, **kwargs)

    def global_sections(self, **kwargs) -> Tensor:
        """A ``(C0, h0)`` orthonormal basis of ``ker δ``."""
        from .cohomology import global_sections

        return global_sections(self, **kwargs)

    def to_spec(self):
        """The pydantic [`cellsheaf.spec.SheafSpec`][cellsheaf.spec.SheafSpec] of this sheaf."""
        from .spec import to_spec

        return to_spec(self)

    @classmethod
    def from_spec(cls, spec) -> "Sheaf":
        """Build a sheaf from a [`cellsheaf.spec.SheafSpec`][cellsheaf.spec.SheafSpec] (or its dict / JSON string)."""
        from .spec import from_spec

        return from_spec(spec)


def constant_sheaf(G: nx.Graph, d: int, dtype: torch.dtype | None = None) -> Sheaf:
    """The constant sheaf ``R^d`` on a networkx graph: identity maps on every edge (stacked, diagonal).

    Vertices keep the graph's node names (in its node order); edges are oriented as
    networkx lists them and named ``0 .. E-1`` in that order.

    Examples
    --------
    >>> import networkx as nx, cellsheaf as cs
    >>> S = cs.constant_sheaf(nx.cycle_graph(5), 2)
    >>> S.cohomology().h0, S.cohomology().h1
    (2, 2)
    """
    if isinstance(d, bool) or int(d) != d or d < 0:
        raise ValueError(f"stalk dim must be a non-negative integer, got {d!r}")
    pos = {n: k for k, n in enumerate(G.nodes)}
    ends = [(pos[u], pos[v]) for u, v in G.edges()]
    index = torch.tensor(ends, dtype=torch.long).reshape(-1, 2).T
    ones = torch.ones(len(ends), int(d), dtype=dtype or torch.get_default_dtype())
    return Sheaf.from_arrays({n: int(d) for n in G.nodes}, index, ones, ones)
