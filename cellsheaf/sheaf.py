"""The `Sheaf`: an oriented multigraph with stalks and restriction maps.

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
from typing import Any, Hashable, Iterable

import networkx as nx
import torch
from torch import Tensor

from . import maps as _maps
from .potentials import Potential, Quadratic

__all__ = ["Edge", "Sheaf"]


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
    (`cellsheaf.maps`; a plain tensor means `cellsheaf.maps.Linear`),
    an optional weight and an optional edge potential.

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
        self._edges: dict[Hashable, Edge] = {}
        self._graph = nx.MultiDiGraph()
        self._version = 0
        self._layout: tuple[int, dict, dict] | None = None
        self._cache: dict[Any, Any] = {}

    # ------------------------------------------------------------------ building
    def add_vertex(self, name: Hashable, dim: int) -> None:
        """Add a vertex with stalk ``R^dim`` (``dim >= 0``)."""
        if name in self._dims:
            raise ValueError(f"vertex {name!r} already exists; vertex names must be unique")
        if isinstance(dim, bool) or int(dim) != dim or dim < 0:
            raise ValueError(f"stalk dim of vertex {name!r} must be a non-negative integer, got {dim!r}")
        self._dims[name] = int(dim)
        self._graph.add_node(name)
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
        """
        for w in (u, v):
            if w not in self._dims:
                raise KeyError(f"unknown vertex {w!r} in edge {u!r} -> {v!r}; add it with add_vertex first")
        Fu, Fv = _maps.as_map(Fu), _maps.as_map(Fv)
        if name is None:
            name = f"{u}->{v}"
            k = 1
            while name in self._edges:
                name, k = f"{u}->{v}#{k}", k + 1
        elif name in self._edges:
            raise ValueError(f"edge {name!r} already exists; edge names must be unique")
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
        self._edges[name] = Edge(name, u, v, Fu, Fv, weight, potential)
        self._graph.add_edge(u, v, key=name)
        self._touch()
        return name

    def remove_edge(self, name: Hashable) -> None:
        """Remove edge ``name``."""
        e = self.edge(name)
        del self._edges[name]
        self._graph.remove_edge(e.u, e.v, key=name)
        self._touch()

    def remove_vertex(self, name: Hashable) -> None:
        """Remove a vertex and every edge incident to it."""
        self._check_vertex(name)
        for e in [e for e in self._edges.values() if name in (e.u, e.v)]:
            del self._edges[e.name]
        del self._dims[name]
        self._graph.remove_node(name)
        self._touch()

    def set_maps(self, name: Hashable, Fu=None, Fv=None) -> None:
        """Replace one or both restriction maps of edge ``name`` (same shapes)."""
        e = self.edge(name)
        new = {}
        for side, old, F in (("Fu", e.Fu, Fu), ("Fv", e.Fv, Fv)):
            if F is not None:
                F = _maps.as_map(F)
                if (F.d_in, F.d_out) != (old.d_in, old.d_out):
                    raise ValueError(
                        f"edge {name!r}: new {side} has shape {F.d_out}x{F.d_in}, expected {old.d_out}x{old.d_in}"
                    )
                new[side] = F
        self._edges[name] = replace(e, **new)
        self._touch()

    def invalidate(self) -> None:
        """Drop cached operators; call it after changing map tensors in place."""
        self._touch()

    def _touch(self) -> None:
        self._version += 1
        self._layout = None
        self._cache.clear()

    # ------------------------------------------------------------------ reading
    @property
    def vertices(self) -> list[Hashable]:
        """Vertex names in cochain order."""
        return list(self._dims)

    @property
    def edges(self) -> list[Hashable]:
        """Edge names in cochain order."""
        return list(self._edges)

    @property
    def graph(self) -> nx.MultiDiGraph:
        """The underlying oriented multigraph (edge keys are edge names). Do not mutate it."""
        return self._graph

    def edge(self, name: Hashable) -> Edge:
        """The `Edge` called ``name``."""
        try:
            return self._edges[name]
        except KeyError:
            raise KeyError(f"unknown edge {name!r}") from None

    def edge_items(self) -> Iterable[Edge]:
        """All `Edge` records in order."""
        return self._edges.values()

    def dim(self, vertex: Hashable) -> int:
        """Stalk dimension of ``vertex``."""
        self._check_vertex(vertex)
        return self._dims[vertex]

    def _check_vertex(self, v: Hashable) -> None:
        if v not in self._dims:
            raise KeyError(f"unknown vertex {v!r}; the sheaf has {len(self._dims)} vertices")

    def _offsets(self) -> tuple[int, dict, dict]:
        if self._layout is None:
            voff, eoff, n = {}, {}, 0
            for v, d in self._dims.items():
                voff[v], n = n, n + d
            m = 0
            for name, e in self._edges.items():
                eoff[name], m = m, m + e.dim
            self._layout = (n, voff, eoff, m)
        return self._layout

    @property
    def C0(self) -> int:
        """Dimension of the 0-cochains (sum of vertex stalk dims)."""
        return self._offsets()[0]

    @property
    def C1(self) -> int:
        """Dimension of the 1-cochains (sum of edge stalk dims)."""
        return self._offsets()[3]

    def vertex_slice(self, v: Hashable) -> slice:
        """Slice of vertex ``v`` in the flat 0-cochain."""
        self._check_vertex(v)
        o = self._offsets()[1][v]
        return slice(o, o + self._dims[v])

    def edge_slice(self, name: Hashable) -> slice:
        """Slice of edge ``name`` in the flat 1-cochain."""
        e = self.edge(name)
        o = self._offsets()[2][name]
        return slice(o, o + e.dim)

    @property
    def linear(self) -> bool:
        """True when every map is linear and every potential quadratic."""
        return all(e.linear for e in self._edges.values())

    @property
    def dtype(self) -> torch.dtype:
        """The promoted dtype of all map tensors (the default dtype if there are none)."""
        dt = None
        for e in self._edges.values():
            for t in e.Fu.tensors() + e.Fv.tensors():
                if t.is_floating_point():
                    dt = t.dtype if dt is None else torch.promote_types(dt, t.dtype)
        return dt or torch.get_default_dtype()

    def __len__(self) -> int:
        return len(self._dims)

    def __repr__(self) -> str:
        return f"Sheaf({len(self._dims)} vertices, {len(self._edges)} edges, C0={self.C0}, C1={self.C1})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sheaf):
            return NotImplemented
        return self._dims == other._dims and list(self._edges) == list(other._edges) and all(
            a == b for a, b in zip(self._edges.values(), other._edges.values())
        )

    __hash__ = object.__hash__

    def copy(self) -> "Sheaf":
        """A shallow copy (maps are shared, structure is not)."""
        S = Sheaf()
        for v, d in self._dims.items():
            S.add_vertex(v, d)
        for e in self._edges.values():
            S.add_edge(e.u, e.v, e.Fu, e.Fv, name=e.name, weight=e.weight, potential=e.potential)
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
        S = Sheaf()
        for v, d in self._dims.items():
            S.add_vertex(v, d)
        for e in self._edges.values():
            Fu = e.Fu.linearize(x[self.vertex_slice(e.u)]) if not e.Fu.linear else e.Fu
            Fv = e.Fv.linearize(x[self.vertex_slice(e.v)]) if not e.Fv.linear else e.Fv
            S.add_edge(e.u, e.v, Fu, Fv, name=e.name, weight=e.weight, potential=e.potential)
        return S

    # ------------------------------------------------------------------ networkx
    @classmethod
    def from_networkx(cls, G: nx.Graph, dim: str = "dim", Fu: str = "Fu", Fv: str = "Fv") -> "Sheaf":
        """Build a sheaf from a networkx graph whose nodes carry ``dim`` and edges ``Fu``/``Fv``.

        Optional edge attributes ``name``, ``weight`` and ``potential`` are used when present.
        Undirected graphs are oriented as their edges are listed. Edges are added in the
        order of their ``index`` attribute when every edge has one (as `to_networkx`
        writes, so the cochain order survives a round trip), else as networkx lists them.
        """
        S = cls()
        for n, data in G.nodes(data=True):
            if dim not in data:
                raise KeyError(f"node {n!r} has no {dim!r} attribute (its stalk dimension)")
            S.add_vertex(n, data[dim])
        edges = list(G.edges(data=True))
        if edges and all("index" in data for *_, data in edges):
            edges.sort(key=lambda edge: edge[2]["index"])
        for u, v, data in edges:
            if Fu not in data or Fv not in data:
                raise KeyError(f"edge {u!r}->{v!r} needs {Fu!r} and {Fv!r} attributes (its restriction maps)")
            S.add_edge(u, v, data[Fu], data[Fv], name=data.get("name"), weight=data.get("weight", 1.0),
                       potential=data.get("potential"))
        return S

    def to_networkx(self) -> nx.MultiDiGraph:
        """A new ``MultiDiGraph`` with ``dim`` on nodes and ``Fu``, ``Fv``, ``name``, ``weight``,
        ``potential`` and ``index`` (position in the cochain order) on edges (keys are edge names)."""
        G = nx.MultiDiGraph()
        for v, d in self._dims.items():
            G.add_node(v, dim=d)
        for k, e in enumerate(self._edges.values()):
            G.add_edge(e.u, e.v, key=e.name, Fu=e.Fu, Fv=e.Fv, name=e.name, weight=e.weight, potential=e.potential,
                       index=k)
        return G

    # ------------------------------------------------------------------ operators
    def coboundary(self, at=None, format: str = "torch", dtype: torch.dtype | None = None):
        """The coboundary ``δ`` of shape ``(C1, C0)``; see `cellsheaf.operators.coboundary`."""
        from .operators import coboundary

        return coboundary(self, at=at, format=format, dtype=dtype)

    def laplacian(self, at=None, normalized: bool = False, format: str = "torch", dtype: torch.dtype | None = None):
        """The (weighted) Laplacian ``δᵀWδ``; see `cellsheaf.operators.laplacian`."""
        from .operators import laplacian

        return laplacian(self, at=at, normalized=normalized, format=format, dtype=dtype)

    def cohomology(self, **kwargs):
        """Dimensions and bases of H⁰ and H¹; see `cellsheaf.cohomology.cohomology`."""
        from .cohomology import cohomology

        return cohomology(self, **kwargs)

    def global_sections(self, **kwargs) -> Tensor:
        """A ``(C0, h0)`` orthonormal basis of ``ker δ``."""
        from .cohomology import global_sections

        return global_sections(self, **kwargs)

    def to_spec(self):
        """The pydantic `cellsheaf.spec.SheafSpec` of this sheaf."""
        from .spec import to_spec

        return to_spec(self)

    @classmethod
    def from_spec(cls, spec) -> "Sheaf":
        """Build a sheaf from a `cellsheaf.spec.SheafSpec` (or its dict / JSON string)."""
        from .spec import from_spec

        return from_spec(spec)
