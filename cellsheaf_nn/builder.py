"""The builder through which op compilers emit the vertices and edges of a neural sheaf.

An op compiler (see [`cellsheaf_nn.ops`][cellsheaf_nn.ops]) receives a [`Builder`][cellsheaf_nn.builder.Builder] and the
[`Value`][cellsheaf_nn.builder.Value] handles of its inputs, and returns the [`Value`][cellsheaf_nn.builder.Value] of its
output. It describes every map on the *neural block* of a vertex only; the
builder lays out the stalks at the end (Eqs. 10-17 of the paper):

* a vertex stalk is ``[neural block | ones blocks]``: one block ``1_{d_e}`` for
  every outgoing edge that carries a bias (the stubborn "ones" coordinates);
* an edge ``u -> v`` with source map ``A`` and bias ``b`` gets the extended
  map ``W̄ = (A | 0 | diag(b))`` on ``u`` (the paper's ``(W | B)``), and the
  selection of its block of ``v``'s neural block on ``v`` (``I`` or ``P_n``).

Vertices and edges keep their creation order, which is a topological order:
every edge is created after both of its endpoints, and a vertex's defining
edges come before any later vertex. With a coordinate selection as every
downstream map, ``δ_Ω`` is square and lower unitriangular in that order
(Lemma 3.2), and the harmonic extension is the forward pass (Prop. 3.4).

Examples
--------
>>> import torch, cellsheaf_nn as csnn, cellsheaf as cs
>>> b = csnn.Builder(torch.float64)
>>> x = b.input(2)
>>> z = b.affine(x, torch.ones(3, 2), torch.zeros(3))
>>> a = b.activation(z, cs.maps.ReLU(3))
>>> b.name(z, "z1"); b.name(a, "a1")
>>> built = b.finish()
>>> built.sheaf.vertices, built.sheaf.edges
(['x', 'z1', 'a1'], ['weight:z1', 'act:a1'])
>>> built.sheaf.dim("x"), built.vertices["x"].ones
(5, (slice(2, 5, None),))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

import cellsheaf as cs
from cellsheaf import maps as M

__all__ = ["Value", "Param", "Builder", "VertexInfo", "EdgeInfo", "Writeback", "Built"]

#: ``writeback(module, weight, bias)`` copies an affine edge's current ``(W, b)`` into a module's parameters.
Writeback = Callable[[torch.nn.Module, Tensor, "Tensor | None"], None]


@dataclass(frozen=True)
class Value:
    """Handle of one quantity of the forward pass: the vertex carrying it and its per-sample shape.

    ``dim`` is the size of the vertex's neural block (``prod(shape)``).
    """

    vertex: int
    dim: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class VertexInfo:
    """Layout of one vertex of a compiled network.

    Attributes
    ----------
    name : the vertex name in the sheaf.
    kind : ``"input"``, ``"linear"``, ``"act"``, ``"affine"``, ``"merge"``, ``"concat"``, ... (what it carries).
    dim : the stalk dimension (neural block plus ones blocks).
    neural : slice of the neural block within the stalk (always ``slice(0, n)``).
    ones : slices of the stubborn ones blocks within the stalk (fixed to 1).
    shape : per-sample shape of the quantity (``prod(shape) == neural size``).
    layer : layer index ``ℓ`` (counting ``Linear`` layers) or ``None``.
    module : qualified name of the module that produced it (``""`` for the root, ``None`` for functions).
    """

    name: str
    kind: str
    dim: int
    neural: slice
    ones: tuple[slice, ...]
    shape: tuple[int, ...]
    layer: int | None = None
    module: str | None = None

    @property
    def n(self) -> int:
        """Size of the neural block."""
        return self.neural.stop - self.neural.start


@dataclass(frozen=True)
class EdgeInfo:
    """What one edge of a compiled network computes.

    ``kind`` is the prefix of the edge name: ``"weight"`` (a Linear layer, Eq. 15),
    ``"act"`` (a hidden activation, Eq. 16), ``"out"`` (the output activation,
    Eq. 17), ``"affine"`` (BatchNorm, constant shifts), ``"scale"``, ``"merge"``
    (copy of an input into a merge vertex), ``"sum"`` (merge vertex to the sum),
    ``"penalty"`` (soft pins). ``u -> v`` are its vertices; ``ones`` is the slice
    of ``u``'s stalk holding the ones block its bias reads (``None`` without bias).
    """

    name: str
    kind: str
    u: str
    v: str
    layer: int | None = None
    module: str | None = None
    ones: slice | None = None


class Built(NamedTuple):
    """What [`Builder.finish`][cellsheaf_nn.builder.Builder.finish] returns."""

    sheaf: cs.Sheaf
    vertices: dict[str, VertexInfo]
    edges: dict[str, EdgeInfo]
    writebacks: list[tuple[str, str | None, Writeback]]  # (edge name, module path, writeback)
    parameters: dict[str, Tensor] | None = None  # learned tensors the maps hold, by their name in the model


@dataclass(frozen=True)
class Param:
    """Handle of a learned tensor of the model used directly in ``forward`` (a scale, a gate vector).

    ``tensor`` is the model's own `torch.nn.Parameter`; the maps that use it hold it (shared, not
    copied), so the sheaf trains it and ``ns.to_module()`` carries it.
    """

    name: str
    tensor: Tensor


@dataclass
class _Vertex:
    dim: int
    kind: str
    shape: tuple[int, ...]
    name: str | None = None
    layer: int | None = None
    module: str | None = None
    ones: list[int] = field(default_factory=list)  # sizes of ones blocks, in edge order
    role: str | None = None  # its part in the op that made it, named after the op's output (see Builder.label)


@dataclass
class _Edge:
    kind: str
    src: int
    dst: int
    Fu: M.Map
    Fv: M.Map
    block: tuple[int, int]
    bias: Tensor | None
    trainable: bool
    mask: Tensor | None
    layer: int | None
    module: str | None
    writeback: Writeback | None
    ones_index: int | None = None
    bias_axis: int | None = None
    center: Tensor | None = None


def _identity(d: int) -> M.Map:
    return M.Identity(d)


class Builder:
    """Collects vertices and edges while a network is compiled; [`finish`][cellsheaf_nn.builder.Builder.finish] makes the sheaf.

    Op compilers use [`affine`][cellsheaf_nn.builder.Builder.affine], [`activation`][cellsheaf_nn.builder.Builder.activation], [`combine`][cellsheaf_nn.builder.Builder.combine],
    [`concat`][cellsheaf_nn.builder.Builder.concat] and [`alias`][cellsheaf_nn.builder.Builder.alias]; anything else can be written with the two
    primitives [`vertex`][cellsheaf_nn.builder.Builder.vertex] and [`edge`][cellsheaf_nn.builder.Builder.edge]. Maps act on neural blocks only.

    Parameters
    ----------
    dtype : torch dtype of every map tensor.

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> b = csnn.Builder(torch.float64)
    >>> x = b.input(2)
    >>> z = b.affine(x, 2 * torch.eye(2)); b.name(z, "z1")
    >>> mark = b.n_vertices
    >>> y = b.combine([x, z])                  # y = x + 2x through the merge vertex "y.in"
    >>> b.name(y, "y", since=mark)
    >>> S = b.finish().sheaf
    >>> S.vertices, S.edges
    (['x', 'z1', 'y.in', 'y'], ['weight:z1', 'merge:y.in.0', 'merge:y.in.1', 'sum:y'])
    """

    def __init__(self, dtype: torch.dtype = torch.float64):
        self.dtype = dtype
        self._vertices: list[_Vertex] = []
        self._edges: list[_Edge] = []
        self.layer: int | None = None
        self.module: str | None = None
        self.parameters: dict[str, Tensor] = {}
        self._selected: dict[int, tuple[int, Tensor]] = {}  # select vertex -> (its source vertex, the indices)
        self._keep: set[int] = set()

    # ------------------------------------------------------------------ primitives
    def input(self, dim: int, shape: Sequence[int] | None = None, name: str = "x") -> Value:
        """The input vertex (stubborn: the whole stalk is boundary data)."""
        v = self.vertex(dim, kind="input", shape=shape)
        self.name(v, name)
        return v

    def vertex(self, dim: int, *, kind: str, shape: Sequence[int] | None = None) -> Value:
        """A new vertex with a neural block of size ``dim`` carrying a quantity of type ``kind``."""
        if int(dim) != dim or dim < 0:
            raise ValueError(f"a vertex needs a non-negative integer size, got {dim!r}")
        shape = tuple(shape) if shape is not None else (int(dim),)
        self._vertices.append(_Vertex(int(dim), kind, shape, layer=self.layer, module=self.module))
        return Value(len(self._vertices) - 1, int(dim), shape)

    def edge(
        self,
        src: Value,
        dst: Value,
        Fu: M.Map | Tensor,
        Fv: M.Map | Tensor | None = None,
        *,
        kind: str,
        bias: Tensor | None = None,
        block: tuple[int, int] | None = None,
        trainable: bool = False,
        mask: Tensor | None = None,
        writeback: Writeback | None = None,
        bias_axis: int | None = None,
        center: Tensor | None = None,
    ) -> None:
        """The edge ``src -> dst`` with ``Fu`` on ``src``'s neural block (plus ``bias`` through a ones block).

        Parameters
        ----------
        Fu : map or matrix from the neural block of ``src`` to the edge stalk.
        Fv : map on the selected block of ``dst`` (default: the identity, i.e. a coordinate selection).
        kind : edge type; the edge is named ``"{kind}:{dst}"`` (``".{i}"`` appended when several edges of
            one kind define the same vertex).
        bias : ``(d_e,)`` vector added through a new ones block of ``src`` (``Fu`` must be linear).
        block : ``(start, size)`` of the part of ``dst``'s neural block this edge defines (default: all).
        trainable : mark the extended map trainable (weights of the network); ``mask`` (shape of ``Fu``)
            restricts which entries of ``Fu`` may change; the bias diagonal is always trainable.
        writeback
            How [`NeuralSheaf.to_module`][cellsheaf_nn.neural.NeuralSheaf.to_module] copies ``(W, b)`` back into the module being compiled.
        bias_axis, center
            A learned bias (a parameter, not trainable as part of ``W̄``) with one value per entry of this axis
            of ``dst``'s shape (a conv bias per channel), and the constant the input is centred at
            ([`cellsheaf.maps.Affine`][cellsheaf.maps.Affine]).
        """
        Fu, Fv = M.as_map(self._cast(Fu)), M.as_map(self._cast(Fv)) if Fv is not None else None
        start, size = block if block is not None else (0, dst.dim)
        if not 0 <= start <= start + size <= dst.dim:
            raise ValueError(f"block {block} does not fit the neural block of size {dst.dim} of the target vertex")
        Fv = Fv if Fv is not None else _identity(size)
        if Fu.d_in != src.dim:
            raise ValueError(f"{kind} edge: Fu takes inputs of size {Fu.d_in} but its source carries {src.dim}")
        if Fv.d_in != size:
            raise ValueError(f"{kind} edge: Fv takes inputs of size {Fv.d_in} but its target block has size {size}")
        if Fu.d_out != Fv.d_out:
            raise ValueError(f"{kind} edge: Fu maps to size {Fu.d_out} but Fv to {Fv.d_out}; they must agree")
        if bias is not None:
            keep = not trainable and isinstance(bias, torch.nn.Parameter)  # held, see `use`
            bias = bias if keep else self._cast(bias).reshape(-1)
            if not Fu.linear:
                raise ValueError(f"{kind} edge: a bias needs a linear Fu (the extended map (W | diag(b)), Eq. 10)")
            if not keep and bias.numel() != Fu.d_out:
                raise ValueError(f"{kind} edge: bias of size {bias.numel()} for an edge stalk of size {Fu.d_out}")
        if mask is not None and tuple(mask.shape) != (Fu.d_out, Fu.d_in):
            raise ValueError(f"{kind} edge: mask of shape {tuple(mask.shape)}, expected {(Fu.d_out, Fu.d_in)}")
        if (bias_axis is not None or center is not None) and (trainable or size != dst.dim):
            raise ValueError(f"{kind} edge: bias_axis and center need a fixed map defining all of its target")
        rec = _Edge(kind, src.vertex, dst.vertex, Fu, Fv, (start, size), bias, trainable, mask,
                    self.layer, self.module, writeback, bias_axis=bias_axis,
                    center=None if center is None else self._cast(center).reshape(-1))
        if bias is not None:
            ones = self._vertices[src.vertex].ones
            rec.ones_index = len(ones)
            ones.append(Fu.d_out)
        self._edges.append(rec)

    # ------------------------------------------------------------------ common ops
    def affine(
        self,
        x: Value,
        weight: Tensor | M.Map,
        bias: Tensor | None = None,
        *,
        kind: str = "weight",
        trainable: bool = True,
        mask: Tensor | None = None,
        writeback: Writeback | None = None,
        shape: Sequence[int] | None = None,
        bias_axis: int | None = None,
        center: Tensor | None = None,
    ) -> Value:
        """``z = W x + b`` as a new vertex and one edge with ``W̄ = (W | diag(b))`` (Eqs. 10, 15).

        ``weight`` is a matrix or any linear map (a convolution, a per-token linear map, ...);
        a structured map is kept as an operator ([`cellsheaf.maps.Affine`][cellsheaf.maps.Affine]), never densified,
        and is not trainable. ``shape`` is the output's per-sample shape. A learned parameter (`parameter`) as
        ``weight`` or ``bias`` is held by the map and trained by the local rule (``bias_axis``, ``center``:
        see `edge`).

        Examples
        --------
        >>> import torch, cellsheaf_nn as csnn
        >>> b = csnn.Builder(torch.float64); x = b.input(3)
        >>> b.affine(x, torch.ones(2, 3), torch.ones(2)).dim
        2
        """
        A = weight if isinstance(weight, M.Map) else M.Linear(self._cast(weight))
        if trainable and not isinstance(A, M.Linear):
            raise ValueError(f"a trainable affine edge needs a dense matrix, got {A!r}")
        z = self.vertex(A.d_out, kind="linear" if kind == "weight" else kind, shape=shape)
        self.edge(x, z, A, kind=kind, bias=bias, trainable=trainable, mask=mask, writeback=writeback,
                  bias_axis=bias_axis, center=center)
        return z

    def activation(self, x: Value, fn: M.Map, *, kind: str = "act") -> Value:
        """``a = φ(z)``: a new vertex and the edge with ``F_z = φ`` and ``F_a = P_n`` (Eqs. 16, 17).

        Examples
        --------
        >>> import torch, cellsheaf as cs, cellsheaf_nn as csnn
        >>> b = csnn.Builder(torch.float64); x = b.input(3)
        >>> b.activation(x, cs.maps.ReLU(3)).dim
        3
        """
        a = self.vertex(fn.d_out, kind=kind, shape=x.shape if fn.d_out == x.dim else None)
        self.edge(x, a, fn, kind=kind)
        return a

    def concat(self, inputs: Sequence[Value], *, kind: str = "concat") -> Value:
        """``[x_1; ...; x_n]``: a vertex whose blocks are copies of the inputs, one ``merge`` edge each.

        The concatenation *is* a merge vertex (docs: Architecture, "Skip connections"). An input made by
        `select` is copied straight from its source (the copy edge carries the selection).
        """
        m = self.vertex(sum(x.dim for x in inputs), kind=kind)
        start = 0
        for x in inputs:
            src, F = self._source(x)
            self.edge(src, m, F, kind="merge", block=(start, x.dim))
            start += x.dim
        return m

    def select(self, x: Value, indices, shape: Sequence[int] | None = None) -> Value:
        """``x[indices]`` (a shape op that moves coordinates: transpose, slicing, chunk): a new vertex and a
        ``select`` edge with the map [`cellsheaf.maps.Select`][cellsheaf.maps.Select].

        A selection of a selection reads the first source directly, and merge vertices copy a selection
        straight from its source; a selection vertex that no edge reads in the end (and that is not kept,
        see `keep`) is left out of the sheaf by `finish`. Its coordinates are copies, so nothing is lost.

        Examples
        --------
        >>> import torch, cellsheaf_nn as csnn
        >>> b = csnn.Builder(torch.float64); x = b.input(4)
        >>> t = b.select(b.select(x, [3, 2, 1, 0]), [0, 1])   # reads x[[3, 2]]; the first one is dropped
        >>> b.name(t, "t"); b.keep(t); b.finish().sheaf.edges
        ['select:t']
        """
        src, base = self._selected.get(x.vertex, (x.vertex, None))
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        idx = idx if base is None else base[idx]
        v = self._vertices[src]
        z = self.vertex(len(idx), kind="select", shape=shape if shape is not None else (len(idx),))
        self.edge(Value(src, v.dim, v.shape), z, M.Select(idx, v.dim, z.shape), kind="select")
        self._selected[z.vertex] = (src, idx)
        return z

    def keep(self, value: Value) -> None:
        """Keep ``value``'s vertex in the sheaf even if no edge reads it (an output of the network)."""
        self._keep.add(value.vertex)

    def _source(self, x: Value) -> tuple[Value, M.Map]:
        """Where a copy of ``x`` reads from: its own vertex (the identity), or the source of a selection."""
        if x.vertex not in self._selected:
            return x, _identity(x.dim)
        src, idx = self._selected[x.vertex]
        v = self._vertices[src]
        return Value(src, v.dim, v.shape), M.Select(idx, v.dim, self._vertices[x.vertex].shape)

    def combine(
        self,
        inputs: Sequence[Value],
        weights: Sequence[Tensor | None] | None = None,
        bias: Tensor | None = None,
        *,
        kind: str = "sum",
        trainable: bool = False,
    ) -> Value:
        """``y = Σ_i A_i x_i + b`` through a merge vertex (docs: Architecture, "Skip connections").

        A merge vertex ``m = [x_1; ...; x_n]`` gets one copy edge per input, then
        the edge ``m -> y`` has the map ``[A_1 ... A_n]`` (``None`` = identity) and
        the bias through a ones block of ``m``. ``δ_Ω`` stays square and unitriangular.
        """
        weights = list(weights) if weights is not None else [None] * len(inputs)
        if len(weights) != len(inputs):
            raise ValueError(f"combine: {len(inputs)} inputs but {len(weights)} weights")
        outs = {w.shape[0] if w is not None else x.dim for x, w in zip(inputs, weights)}
        if len(outs) != 1:
            raise ValueError(f"combine: the terms have different sizes {sorted(outs)}; they must match to be added")
        m = self.concat(inputs, kind="merge")
        blocks = [_identity(x.dim) if w is None else M.Linear(self._cast(w)) for x, w in zip(inputs, weights)]
        dense = bias is not None or trainable
        Fu = M.Linear(torch.cat([B.matrix().to(self.dtype) for B in blocks], 1)) if dense else M.HStack(blocks)
        y = self.vertex(outs.pop(), kind=kind)
        self.edge(m, y, Fu, kind=kind, bias=bias, trainable=trainable)
        return y

    def alias(self, x: Value, shape: Sequence[int] | None = None) -> Value:
        """The same quantity under another shape (Flatten, Identity, Dropout in eval): no new vertex."""
        shape = tuple(shape) if shape is not None else x.shape
        return Value(x.vertex, x.dim, shape)

    # ------------------------------------------------------------------ naming and finishing
    def name(self, value: Value, name: str, since: int | None = None) -> None:
        """Give the vertex of ``value`` its final name (names must be unique).

        With ``since`` (a value of [`n_vertices`][cellsheaf_nn.builder.Builder.n_vertices]), the unnamed vertices created
        after that point are named after it too: ``"{name}.in"`` for a merge vertex,
        ``"{name}.{kind}"`` otherwise (numbered ``.in1``, ``.{kind}1``, ... when an op makes several), or
        ``"{name}.{role}"`` for a vertex given a role by [`label`][cellsheaf_nn.builder.Builder.label].
        """
        self._vertices[value.vertex].name = name
        seen: dict[str, int] = {}
        for v in self._vertices[since if since is not None else len(self._vertices):]:
            if v.name is None:
                base = f"{name}.{v.role}" if v.role else f"{name}.in" if v.kind == "merge" else f"{name}.{v.kind}"
                k = seen[base] = seen.get(base, -1) + 1
                v.name = base if k == 0 else f"{base}{k}"

    def label(self, value: Value, role: str) -> Value:
        """Name the part ``value`` plays in the op being compiled (``"in_proj"``, ``"scores"``, ``"softmax"``):
        when the op's output is named ``name``, this vertex is named ``"{name}.{role}"`` (a vertex already
        named keeps its name). Returns ``value``.

        Examples
        --------
        >>> import torch
        >>> from cellsheaf_nn.builder import Builder
        >>> b = Builder(); x = b.input(2); mark = b.n_vertices
        >>> h = b.label(b.affine(x, torch.eye(2)), "proj"); y = b.affine(h, torch.eye(2))
        >>> b.name(y, "block", since=mark); b.named(h)
        'block.proj'
        """
        self._vertices[value.vertex].role = role
        return value

    def named(self, value: Value) -> str | None:
        """The name given to the vertex of ``value`` so far (``None`` if not named yet)."""
        return self._vertices[value.vertex].name

    def set_kind(self, value: Value, kind: str) -> None:
        """Change the kind of ``value``'s vertex and of the edges that define it (e.g. ``"act"`` -> ``"out"``)."""
        old = self._vertices[value.vertex].kind
        self._vertices[value.vertex].kind = kind
        for e in self._edges:
            if e.dst == value.vertex and e.kind == old:
                e.kind = kind

    def use(self, param: Param) -> Tensor:
        """The tensor of a learned parameter, recorded as a parameter of the sheaf (for a map to hold)."""
        self.parameters[param.name] = param.tensor
        return param.tensor

    def parameter(self, module: torch.nn.Module, name: str) -> Tensor | None:
        """``module``'s tensor ``name`` (e.g. ``"weight"``, ``"out_proj.bias"``) for a map to hold: a learned
        parameter (``requires_grad``) becomes a parameter of the sheaf, named by its path in the model, that
        the local rule trains and `NeuralSheaf.to_module` carries; a frozen one (or a buffer) a constant.

        Examples
        --------
        >>> import torch, cellsheaf_nn as csnn
        >>> b = csnn.Builder(torch.float32)
        >>> w = b.parameter(torch.nn.Conv1d(1, 2, 3), "weight")
        >>> isinstance(w, torch.nn.Parameter), list(b.parameters)
        (True, ['weight'])
        """
        *path, attr = name.split(".")
        t = getattr(module.get_submodule(".".join(path)), attr)
        if t is None:
            return None
        if isinstance(t, torch.nn.Parameter) and t.requires_grad:
            return self.use(Param(f"{self.module}.{name}" if self.module else name, t))
        return t.detach()

    @property
    def n_edges(self) -> int:
        """Number of edges created so far (the next edge's number)."""
        return len(self._edges)

    def set_shape(self, value: Value) -> None:
        """Record ``value.shape`` as the per-sample shape of its vertex (its neural block in C order)."""
        v = self._vertices[value.vertex]
        if v.dim != value.dim:
            raise ValueError(f"shape {value.shape} does not fit a neural block of size {v.dim}")
        v.shape = tuple(value.shape)

    @property
    def n_vertices(self) -> int:
        """Number of vertices created so far (a marker for "vertices created after this point")."""
        return len(self._vertices)

    def kind(self, value: Value) -> str:
        """The kind of ``value``'s vertex."""
        return self._vertices[value.vertex].kind

    def _cast(self, t):
        if isinstance(t, Tensor):
            return t.detach().to(self.dtype).clone()
        if isinstance(t, M.Map):
            return t.to(self.dtype)
        return t

    def finish(self) -> Built:
        """Lay out the stalks and build the sheaf: the sheaf, the vertex and edge layouts, the writebacks.

        Unnamed vertices are named ``"v{k}"``. Vertices and edges keep their creation order. Selection
        vertices that nothing reads (`select`) are left out.
        """
        names = [v.name if v.name is not None else f"v{k}" for k, v in enumerate(self._vertices)]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"vertex names {sorted(dup)} are used twice; give unique names")
        read = {e.src for e in self._edges}
        dropped = {k for k in self._selected if k not in read and k not in self._keep}
        edges_kept = [e for e in self._edges if e.dst not in dropped]
        layout: dict[str, VertexInfo] = {}
        for k, v in enumerate(self._vertices):
            if k in dropped:
                continue
            ones, start = [], v.dim
            for size in v.ones:
                ones.append(slice(start, start + size))
                start += size
            layout[names[k]] = VertexInfo(names[k], v.kind, start, slice(0, v.dim), tuple(ones), v.shape,
                                          v.layer, v.module)
        S = cs.Sheaf()
        for name, info in layout.items():
            S.add_vertex(name, info.dim)
        counts: dict[tuple[str, int], int] = {}
        for e in edges_kept:
            counts[(e.kind, e.dst)] = counts.get((e.kind, e.dst), 0) + 1
        seen: dict[tuple[str, int], int] = {}
        edges: dict[str, EdgeInfo] = {}
        for e in edges_kept:
            key = (e.kind, e.dst)
            name = f"{e.kind}:{names[e.dst]}"
            if counts[key] > 1:
                name, seen[key] = f"{name}.{seen.get(key, 0)}", seen.get(key, 0) + 1
            src, dst = layout[names[e.src]], layout[names[e.dst]]
            ones = src.ones[e.ones_index] if e.ones_index is not None else None
            S.add_edge(src.name, dst.name, _source_map(e, src, ones, dst.shape), _target_map(e, dst), name=name)
            edges[name] = EdgeInfo(name, e.kind, src.name, dst.name, e.layer, e.module, ones)
        writebacks = [(name, e.module, e.writeback) for name, e in zip(edges, edges_kept) if e.writeback]
        return Built(S, layout, edges, writebacks, dict(self.parameters))


def _source_map(e: _Edge, src: VertexInfo, ones: slice | None, shape: tuple[int, ...]) -> M.Map:
    """``Fu`` on the whole stalk of ``src``: ``(A | 0 | diag(b))`` for a bias or a trainable map (Eq. 10),
    ``A ∘ P_n`` otherwise."""
    n, D = src.n, src.dim
    if ones is None and not e.trainable:
        if D == n:
            return e.Fu
        P = M.Select(range(n), D)  # P_n: read the neural block only
        return P if isinstance(e.Fu, M.Identity) else M.Compose(e.Fu, P)
    if not e.trainable:  # a fixed bias: A·x + b through the ones block, A kept as an operator
        fits = math.prod(shape) == e.Fu.d_out  # the target's shape, to broadcast a learned bias over
        return M.Affine(e.Fu, e.bias, d_in=D, ones=ones.start, shape=shape if fits else None,
                        axis=-1 if e.bias_axis is None else e.bias_axis, center=e.center)
    A = e.Fu.matrix()
    W = A.new_zeros(A.shape[0], D)
    W[:, :n] = A
    mask = None
    if e.trainable:
        mask = W.new_zeros(W.shape)
        mask[:, :n] = e.mask if e.mask is not None else 1.0
    if ones is not None:
        idx = torch.arange(A.shape[0])
        W[idx, ones.start + idx] = e.bias
        if mask is not None:
            mask[idx, ones.start + idx] = 1.0
    if mask is not None and bool((mask == 1).all()):
        mask = None
    return M.Linear(W, trainable=e.trainable, mask=mask)


def _target_map(e: _Edge, dst: VertexInfo) -> M.Map:
    """``Fv`` on the whole stalk of ``dst``: the selection of the edge's block (``I`` or ``P_n``, Eqs. 15-17)."""
    start, size = e.block
    if start == 0 and size == dst.dim:
        return e.Fv
    P = M.Select(range(start, start + size), dst.dim)
    return P if isinstance(e.Fv, M.Identity) else M.Compose(e.Fv, P)
