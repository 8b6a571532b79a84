"""JSON description of a sheaf: validated pydantic models and a lossless round trip.

A [`SheafSpec`][cellsheaf.spec.SheafSpec] lists the vertices (name, stalk dim) and the edges (name,
endpoints ``u -> v``, weight, the two restriction maps, an optional
potential). Maps are a discriminated union on their ``"type"`` field, one
model per map class of [`cellsheaf.maps`][cellsheaf.maps] ([`MapSpec`][cellsheaf.spec.MapSpec]); nested maps
(``hstack``, ``vstack``, ``compose``) nest their specs. ``Function`` maps wrap
arbitrary Python code and cannot be serialised.

* Names of vertices and edges are JSON strings or integers (``"a"``, ``3``)
  and keep their type through JSON; other hashables (tuples, ...) are refused.
* Numbers are float64 and JSON keeps them exactly (shortest round-trip
  representation); each tensor records its dtype (``"float32"`` maps come back
  as float32). NaN and Inf are refused.
* Potentials are stored by class name plus their constructor's keywords
  (their attributes): ``{"name": "Huber", "params": {"tau": 0.5}}``, and
  loading calls the constructor, so a spec passes the same checks as code
  (``Huber`` with ``tau <= 0``, unknown keys and keys naming a method are
  refused). Any subclass of [`cellsheaf.potentials.Potential`][cellsheaf.potentials.Potential] is found by name
  (see [`register_potential`][cellsheaf.spec.register_potential] for classes defined elsewhere). Tensor attributes
  are stored as ``{"__tensor__": [...], "dtype": ...}``, potential attributes
  (a potential wrapping another) as ``{"__potential__": {...}}``; attributes
  holding callables cannot be serialised.
* Dimensions are JSON integers between 0 and [`MAX_DIM`][cellsheaf.spec.MAX_DIM] (2²⁶); a structured
  map's keys are the ones its class declares.

Round trip: ``Sheaf.from_spec(S.to_spec()) == S``, and through JSON with
``spec.model_dump_json()`` / ``SheafSpec.model_validate_json(text)`` (or
``Sheaf.from_spec(text)``). Bad input raises [`SpecError`][cellsheaf.spec.SpecError] naming the
vertex or edge at fault.

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf(); S.add_vertex("a", 2); S.add_vertex("b", 1)
>>> _ = S.add_edge("a", "b", cs.maps.Select([0], 2), torch.ones(1, 1, dtype=torch.float64), name="e")
>>> text = S.to_spec().model_dump_json()
>>> cs.Sheaf.from_spec(text) == S
True
"""

from __future__ import annotations

import base64
import inspect
import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, FiniteFloat, NonNegativeInt, StrictInt, \
    StrictStr, ValidationError, model_validator

from . import maps as M
from . import potentials as _pot
from .potentials import Potential

__all__ = [
    "SpecError", "SheafSpec", "VertexSpec", "EdgeSpec", "PotentialSpec", "MapSpec", "LinearSpec",
    "SparseLinearSpec", "IdentitySpec", "ScaledSpec", "SelectSpec", "DiagonalSpec", "HStackSpec", "VStackSpec",
    "ComposeSpec", "ReLUSpec", "LeakyReLUSpec", "SigmoidSpec", "TanhSpec", "SoftmaxSpec", "StructuredSpec",
    "TensorSpec", "to_spec", "from_spec",
    "map_to_spec", "register_potential", "ArraySpec", "StackSpec", "MAX_DIM", "Dim", "EncodedTensor",
    "EncodedPotential", "HuberParams", "PNormParams", "ElasticNetParams", "CrossEntropyParams", "WeightedParams",
]

Name = Union[StrictStr, StrictInt]
"""A vertex or edge name: a string or an integer."""

DType = Literal["float16", "bfloat16", "float32", "float64"]

MAX_DIM = 2 ** 26
"""The largest dimension (stalk, map side, tensor axis) a spec may declare: 2²⁶ coordinates, 512 MiB per
float64 cochain. Larger values in a file are far more likely a typo or a hostile file than a real sheaf."""


def _bounded(value: int) -> int:
    if value > MAX_DIM:
        raise ValueError(f"dimension {value} exceeds the limit of {MAX_DIM} (cellsheaf.spec.MAX_DIM) a spec may "
                         "declare; check the file")
    return value


Dim = Annotated[StrictInt, Field(ge=0), AfterValidator(_bounded)]
"""A dimension: a JSON integer (not ``1e9`` or ``2.5``), ``0 <= dim <= MAX_DIM``."""


class SpecError(ValueError):
    """A sheaf that cannot be serialised, or a spec that does not describe a valid sheaf."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _dtype_name(t: torch.Tensor) -> str:
    name = str(t.dtype).removeprefix("torch.")
    if name not in DType.__args__:
        raise SpecError(f"tensors of dtype {t.dtype} cannot be serialised; use a floating dtype")
    return name


def _tensor(data, dtype: str) -> torch.Tensor:
    return torch.tensor(data, dtype=torch.float64).to(getattr(torch, dtype))


def _finite_values(t: torch.Tensor) -> list:
    arr = t.detach().cpu().double().numpy()
    if not np.isfinite(arr).all():
        raise SpecError("the tensor has NaN or Inf entries, which JSON cannot carry")
    return arr.tolist()


# ---------------------------------------------------------------------------- maps


class LinearSpec(_Model):
    """A dense [`Linear`][cellsheaf.maps.Linear] map: ``data`` is the ``(d_out, d_in)`` matrix, row by row."""

    type: Literal["linear"] = "linear"
    shape: tuple[Dim, Dim]
    data: list[list[FiniteFloat]]
    dtype: DType = "float64"
    trainable: bool = False
    mask: list[list[FiniteFloat]] | None = None

    @model_validator(mode="after")
    def _check(self):
        rows, cols = self.shape
        for what, m in (("data", self.data), ("mask", self.mask)):
            if m is not None and (len(m) != rows or any(len(r) != cols for r in m)):
                raise ValueError(f"linear map: {what} is not a {rows}x{cols} matrix")
        return self

    def dims(self) -> tuple[int, int]:
        return self.shape

    def to_map(self) -> M.Map:
        W = _tensor(self.data, self.dtype).reshape(self.shape)
        mask = None if self.mask is None else _tensor(self.mask, self.dtype).reshape(self.shape)
        return M.Linear(W, trainable=self.trainable, mask=mask)


class SparseLinearSpec(_Model):
    """A sparse [`Linear`][cellsheaf.maps.Linear] map in coordinate form (``rows``, ``cols``, ``values``)."""

    type: Literal["sparse_linear"] = "sparse_linear"
    shape: tuple[Dim, Dim]
    rows: list[NonNegativeInt]
    cols: list[NonNegativeInt]
    values: list[FiniteFloat]
    dtype: DType = "float64"

    @model_validator(mode="after")
    def _check(self):
        if not len(self.rows) == len(self.cols) == len(self.values):
            raise ValueError("sparse linear map: rows, cols and values must have the same length")
        if any(r >= self.shape[0] for r in self.rows) or any(c >= self.shape[1] for c in self.cols):
            raise ValueError(f"sparse linear map: an entry lies outside the {self.shape[0]}x{self.shape[1]} shape")
        return self

    def dims(self) -> tuple[int, int]:
        return self.shape

    def to_map(self) -> M.Map:
        idx = torch.tensor([self.rows, self.cols], dtype=torch.long).reshape(2, -1)
        W = torch.sparse_coo_tensor(idx, _tensor(self.values, self.dtype), self.shape, check_invariants=True)
        return M.Linear(W.coalesce())


class IdentitySpec(_Model):
    """[`Identity`][cellsheaf.maps.Identity] on ``R^dim``."""

    type: Literal["identity"] = "identity"
    dim: Dim

    def dims(self) -> tuple[int, int]:
        return self.dim, self.dim

    def to_map(self) -> M.Map:
        return M.Identity(self.dim)


class ScaledSpec(_Model):
    """[`Scaled`][cellsheaf.maps.Scaled]: ``c`` times the identity on ``R^dim``."""

    type: Literal["scaled"] = "scaled"
    c: FiniteFloat
    dim: Dim

    def dims(self) -> tuple[int, int]:
        return self.dim, self.dim

    def to_map(self) -> M.Map:
        return M.Scaled(self.c, self.dim)


class SelectSpec(_Model):
    """[`Select`][cellsheaf.maps.Select]: coordinates ``indices`` of ``R^{d_in}``."""

    type: Literal["select"] = "select"
    indices: list[NonNegativeInt]
    d_in: Dim

    @model_validator(mode="after")
    def _check(self):
        bad = [i for i in self.indices if i >= self.d_in]
        if bad:
            raise ValueError(f"select map: indices {bad} outside [0, {self.d_in})")
        return self

    def dims(self) -> tuple[int, int]:
        return len(self.indices), self.d_in

    def to_map(self) -> M.Map:
        return M.Select(self.indices, self.d_in)


class DiagonalSpec(_Model):
    """[`Diagonal`][cellsheaf.maps.Diagonal] with the given diagonal ``values``."""

    type: Literal["diagonal"] = "diagonal"
    values: list[FiniteFloat]
    dtype: DType = "float64"

    def dims(self) -> tuple[int, int]:
        return len(self.values), len(self.values)

    def to_map(self) -> M.Map:
        return M.Diagonal(_tensor(self.values, self.dtype))


class HStackSpec(_Model):
    """[`HStack`][cellsheaf.maps.HStack]: the block row ``[A_1 ... A_n]``."""

    type: Literal["hstack"] = "hstack"
    maps: list[MapSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self):
        outs = {m.dims()[0] for m in self.maps}
        if len(outs) != 1:
            raise ValueError(f"hstack: blocks must share d_out, got {sorted(outs)}")
        return self

    def dims(self) -> tuple[int, int]:
        return self.maps[0].dims()[0], sum(m.dims()[1] for m in self.maps)

    def to_map(self) -> M.Map:
        return M.HStack([m.to_map() for m in self.maps])


class VStackSpec(_Model):
    """[`VStack`][cellsheaf.maps.VStack]: the block column ``[A_1; ...; A_n]``."""

    type: Literal["vstack"] = "vstack"
    maps: list[MapSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self):
        ins = {m.dims()[1] for m in self.maps}
        if len(ins) != 1:
            raise ValueError(f"vstack: blocks must share d_in, got {sorted(ins)}")
        return self

    def dims(self) -> tuple[int, int]:
        return sum(m.dims()[0] for m in self.maps), self.maps[0].dims()[1]

    def to_map(self) -> M.Map:
        return M.VStack([m.to_map() for m in self.maps])


class ComposeSpec(_Model):
    """[`Compose`][cellsheaf.maps.Compose]: ``outer ∘ inner``."""

    type: Literal["compose"] = "compose"
    outer: MapSpec
    inner: MapSpec

    @model_validator(mode="after")
    def _check(self):
        if self.inner.dims()[0] != self.outer.dims()[1]:
            raise ValueError(f"compose: inner maps to dim {self.inner.dims()[0]} but outer takes "
                             f"dim {self.outer.dims()[1]}")
        return self

    def dims(self) -> tuple[int, int]:
        return self.outer.dims()[0], self.inner.dims()[1]

    def to_map(self) -> M.Map:
        return M.Compose(self.outer.to_map(), self.inner.to_map())


class _ElementwiseSpec(_Model):
    dim: Dim

    def dims(self) -> tuple[int, int]:
        return self.dim, self.dim


class ReLUSpec(_ElementwiseSpec):
    """[`ReLU`][cellsheaf.maps.ReLU] on ``R^dim``."""

    type: Literal["relu"] = "relu"

    def to_map(self) -> M.Map:
        return M.ReLU(self.dim)


class LeakyReLUSpec(_ElementwiseSpec):
    """[`LeakyReLU`][cellsheaf.maps.LeakyReLU] on ``R^dim`` with negative ``slope``."""

    type: Literal["leaky_relu"] = "leaky_relu"
    slope: FiniteFloat = 0.01

    def to_map(self) -> M.Map:
        return M.LeakyReLU(self.dim, self.slope)


class SigmoidSpec(_ElementwiseSpec):
    """[`Sigmoid`][cellsheaf.maps.Sigmoid] on ``R^dim``."""

    type: Literal["sigmoid"] = "sigmoid"

    def to_map(self) -> M.Map:
        return M.Sigmoid(self.dim)


class TanhSpec(_ElementwiseSpec):
    """[`Tanh`][cellsheaf.maps.Tanh] on ``R^dim``."""

    type: Literal["tanh"] = "tanh"

    def to_map(self) -> M.Map:
        return M.Tanh(self.dim)


class SoftmaxSpec(_ElementwiseSpec):
    """[`Softmax`][cellsheaf.maps.Softmax] over ``R^dim``."""

    type: Literal["softmax"] = "softmax"

    def to_map(self) -> M.Map:
        return M.Softmax(self.dim)


class TensorSpec(_Model):
    """A tensor: its ``shape``, its entries ``data`` (flattened, row-major) and ``dtype``."""

    shape: list[Dim]
    data: list[FiniteFloat]
    dtype: DType = "float64"

    @model_validator(mode="after")
    def _check(self):
        if math.prod(self.shape) != len(self.data):
            raise ValueError(f"tensor: {len(self.data)} values do not fill the shape {self.shape}")
        return self

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorSpec":
        return cls(shape=list(t.shape), data=_finite_values(t.reshape(-1)), dtype=_dtype_name(t))

    def to_tensor(self) -> torch.Tensor:
        return _tensor(self.data, self.dtype).reshape(self.shape)


ArrayDType = Literal["float16", "bfloat16", "float32", "float64", "int64"]


class ArraySpec(_Model):
    """A tensor stored compactly and exactly: ``shape``, ``dtype`` and its raw little-endian bytes in base64
    (stacked edges: dumping and loading cost a copy, not a float-to-text conversion per entry)."""

    shape: list[Dim]
    dtype: ArrayDType
    base64: str

    @model_validator(mode="after")
    def _check(self):
        size = math.prod(self.shape) * getattr(torch, self.dtype).itemsize
        if len(self.base64) != 4 * ((size + 2) // 3):
            raise ValueError(f"array: {len(self.base64)} base64 characters do not hold {self.shape} {self.dtype}")
        return self

    @classmethod
    def of(cls, t: torch.Tensor) -> "ArraySpec":
        t = t.detach().cpu().contiguous()
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise SpecError("the tensor has NaN or Inf entries, which a spec cannot carry")
        name = str(t.dtype).removeprefix("torch.")
        if name not in ArrayDType.__args__:
            raise SpecError(f"tensors of dtype {t.dtype} cannot be serialised")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return cls(shape=list(t.shape), dtype=name, base64=base64.b64encode(raw).decode("ascii"))

    def to_tensor(self) -> torch.Tensor:
        raw = base64.b64decode(self.base64, validate=True)
        dtype = getattr(torch, self.dtype)
        if not raw:
            return torch.zeros(self.shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(self.shape)


class StackSpec(_Model):
    """Edges of one shape stored as arrays (a [`cellsheaf.EdgeStack`][cellsheaf.stacked.EdgeStack], from [`Sheaf.from_arrays`][cellsheaf.sheaf.Sheaf.from_arrays] or
    [`Sheaf.add_edges`][cellsheaf.sheaf.Sheaf.add_edges]): ``at`` is the position of its first edge in the edge order, ``index`` the ``(2, E)``
    vertex positions, ``Fu``/``Fv`` the stacked maps, ``weights`` and ``names`` optional (default names are
    the integers ``at, at + 1, ...``)."""

    at: NonNegativeInt
    index: ArraySpec
    Fu: ArraySpec
    Fv: ArraySpec
    weights: ArraySpec | None = None
    names: list[Name] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.index.dtype != "int64" or len(self.index.shape) != 2 or self.index.shape[0] != 2:
            raise ValueError(f"stack at {self.at}: index must be int64 of shape (2, E), got {self.index.shape}")
        E = self.index.shape[1]
        for what, a in (("Fu", self.Fu), ("Fv", self.Fv), ("weights", self.weights)):
            if a is not None and (not a.shape or a.shape[0] != E or a.dtype == "int64"):
                raise ValueError(f"stack at {self.at}: {what} must be a float array with {E} rows, got {a.shape}")
        if self.names is not None and len(self.names) != E:
            raise ValueError(f"stack at {self.at}: {len(self.names)} names for {E} edges")
        return self

    def add_to(self, S) -> None:
        """Add these edges to the sheaf ``S`` (its edge count must be ``at``)."""
        try:
            S.add_edges(self.index.to_tensor(), self.Fu.to_tensor(), self.Fv.to_tensor(), names=self.names,
                        weights=None if self.weights is None else self.weights.to_tensor())
        except (ValueError, TypeError, IndexError, KeyError) as err:
            raise SpecError(f"stack at {self.at}: {err}") from None


def _stack_to_spec(st, at: int) -> StackSpec:
    names = None
    if st._names is not None or st.name0 != at:
        names = [_check_name(n, "edge") for n in st.names()]
    try:
        return StackSpec(at=at, index=ArraySpec.of(st.index), Fu=ArraySpec.of(st.Fu), Fv=ArraySpec.of(st.Fv),
                         weights=None if st.weights is None else ArraySpec.of(st.weights), names=names)
    except SpecError as err:
        raise SpecError(f"stack at {at} (edges {st.name(0)!r}...): {err}") from None


class StructuredSpec(_Model):
    """A [`cellsheaf.maps.Structured`][cellsheaf.maps.Structured] map (convolution, pooling, affine, norm, ...): its class name ``kind``,
    hyperparameters ``params``, tensors and inner maps, passed back to its constructor."""

    type: Literal["structured"] = "structured"
    kind: StrictStr
    params: dict[str, Any] = {}
    tensors: dict[str, TensorSpec | None] = {}
    maps: dict[str, MapSpec] = {}

    @model_validator(mode="after")
    def _check(self):
        F = self.to_map()  # the constructor validates shapes and names the problem
        for side, d in (("d_in", F.d_in), ("d_out", F.d_out)):
            _bounded(d)
        return self

    def dims(self) -> tuple[int, int]:
        F = self.to_map()
        return F.d_out, F.d_in

    def to_map(self) -> M.Map:
        from .maps.core import _STRUCTURED

        cls = _STRUCTURED.get(self.kind)
        if cls is None:
            raise ValueError(f"unknown structured map {self.kind!r}: import the module that defines it")
        for field, given, allowed in (("params", self.params, cls._params), ("tensors", self.tensors, cls._tensors),
                                      ("maps", self.maps, cls._maps)):
            unknown = sorted(set(given) - set(allowed))
            if unknown:
                raise ValueError(f"structured map {self.kind}: unknown {field} key {unknown[0]!r} "
                                 f"(allowed: {', '.join(allowed) or 'none'})")
        tensors = {k: None if t is None else t.to_tensor() for k, t in self.tensors.items()}
        try:
            return cls(**self.params, **tensors, **{k: m.to_map() for k, m in self.maps.items()})
        except (TypeError, IndexError, KeyError, RuntimeError, OverflowError) as err:  # constructors' own checks
            raise ValueError(f"structured map {self.kind}: {err}") from None


MapSpec = Annotated[
    Union[LinearSpec, SparseLinearSpec, IdentitySpec, ScaledSpec, SelectSpec, DiagonalSpec, HStackSpec, VStackSpec,
          ComposeSpec, ReLUSpec, LeakyReLUSpec, SigmoidSpec, TanhSpec, SoftmaxSpec, StructuredSpec],
    Field(discriminator="type"),
]
"""Any serialisable restriction map, discriminated by its ``"type"`` field."""

for _model in (HStackSpec, VStackSpec, ComposeSpec, StructuredSpec):
    _model.model_rebuild()


def map_to_spec(F: M.Map):
    """The [`MapSpec`][cellsheaf.spec.MapSpec] of a restriction map; [`SpecError`][cellsheaf.spec.SpecError] for maps that cannot be serialised.

    Examples
    --------
    >>> import cellsheaf as cs
    >>> map_to_spec(cs.maps.Select([1], 3))
    SelectSpec(type='select', indices=[1], d_in=3)
    """
    t = type(F)
    if t is M.Linear:
        if F.sparse:
            r, c, v = F.coo()
            if not np.isfinite(v).all():
                raise SpecError("the matrix has NaN or Inf entries, which JSON cannot carry")
            return SparseLinearSpec(shape=(F.d_out, F.d_in), rows=r.tolist(), cols=c.tolist(), values=v.tolist(),
                                    dtype=_dtype_name(F.weight))
        mask = None if F.mask is None else _finite_values(F.mask)
        return LinearSpec(shape=(F.d_out, F.d_in), data=_finite_values(F.weight), dtype=_dtype_name(F.weight),
                          trainable=F.trainable, mask=mask)
    if t is M.Identity:
        return IdentitySpec(dim=F.d_in)
    if t is M.Scaled:
        return ScaledSpec(c=F.c, dim=F.d_in)
    if t is M.Select:
        return SelectSpec(indices=F.indices.tolist(), d_in=F.d_in)
    if t is M.Diagonal:
        return DiagonalSpec(values=_finite_values(F.diagonal()), dtype=_dtype_name(F.v))
    if t is M.HStack:
        return HStackSpec(maps=[map_to_spec(m) for m in F.maps])
    if t is M.VStack:
        return VStackSpec(maps=[map_to_spec(m) for m in F.maps])
    if t is M.Compose:
        return ComposeSpec(outer=map_to_spec(F.outer), inner=map_to_spec(F.inner))
    if t is M.LeakyReLU:
        return LeakyReLUSpec(dim=F.d_in, slope=F.slope)
    simple = {M.ReLU: ReLUSpec, M.Sigmoid: SigmoidSpec, M.Tanh: TanhSpec, M.Softmax: SoftmaxSpec}
    if t in simple:
        return simple[t](dim=F.d_in)
    if isinstance(F, M.Structured):
        params, tensors, maps = F.state()
        return StructuredSpec(kind=t.__name__, params=params,
                              tensors={k: None if v is None else TensorSpec.of(v) for k, v in tensors.items()},
                              maps={k: map_to_spec(m) for k, m in maps.items()})
    if t is M.Function:
        raise SpecError(f"map {F!r} wraps Python code and cannot be serialised; replace it by a built-in map "
                        "(cellsheaf.maps) to save this sheaf")
    raise SpecError(f"maps of type {t.__name__} cannot be serialised (no spec model for them)")


# ---------------------------------------------------------------------------- potentials
#
# A potential is stored as its class name and its constructor's keywords; loading calls the constructor, so a
# spec passes the same checks as code does. The built-in potentials have a pydantic model of their keywords
# (`_PARAMS`); other subclasses take the parameters of their ``__init__``, and their attributes must be those.

_POTENTIALS: dict[str, type] = {}


def register_potential(cls: type) -> type:
    """Register a [`Potential`][cellsheaf.potentials.Potential] subclass under its class name (usable as a decorator).

    Subclasses of ``Potential`` are also found by name without registering, once
    their module is imported; registering resolves name clashes in favour of ``cls``.
    A spec rebuilds a potential by calling ``cls(**params)``, so the attributes of an
    instance must be the keyword arguments of its constructor.
    """
    if not (isinstance(cls, type) and issubclass(cls, Potential)):
        raise TypeError("register_potential needs a subclass of cellsheaf.potentials.Potential")
    _POTENTIALS[cls.__name__] = cls
    return cls


def _potential_class(name: str) -> type:
    if name in _POTENTIALS:
        return _POTENTIALS[name]
    stack, seen = [Potential], set()
    while stack:
        c = stack.pop()
        if c.__name__ == name and c is not Potential:
            return c
        for sub in c.__subclasses__():
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
    raise ValueError(f"unknown potential {name!r}: import the module that defines it, or register it with "
                     "cellsheaf.spec.register_potential")


class EncodedTensor(_Model):
    """A tensor attribute of a potential: ``{"__tensor__": nested lists of floats, "dtype": ...}``."""

    tensor: Any = Field(alias="__tensor__")
    dtype: DType = "float64"

    @model_validator(mode="after")
    def _check(self):
        try:
            arr = np.asarray(self.tensor, dtype=np.float64)
        except (ValueError, TypeError):
            raise ValueError("__tensor__ must be a number or nested lists of numbers of one shape") from None
        if not np.isfinite(arr).all():
            raise ValueError("__tensor__ has NaN or Inf entries")
        if arr.size > MAX_DIM:
            raise ValueError(f"__tensor__ has {arr.size} entries, beyond the limit {MAX_DIM}")
        return self

    def to_tensor(self) -> torch.Tensor:
        return _tensor(self.tensor, self.dtype)


class EncodedPotential(_Model):
    """A potential attribute of a potential: ``{"__potential__": PotentialSpec}``."""

    potential: PotentialSpec = Field(alias="__potential__")


class _Params(_Model):
    """The keywords of a potential's constructor (no unknown keys)."""

    def kwargs(self) -> dict:
        out = {}
        for key in type(self).model_fields:
            value = getattr(self, key)
            if isinstance(value, EncodedTensor):
                value = value.to_tensor()
            elif isinstance(value, EncodedPotential):
                value = value.potential.to_potential()
            out[key] = value
        return out


class _NoParams(_Params):
    pass


class HuberParams(_Params):
    """[`Huber`][cellsheaf.potentials.Huber]: threshold ``tau > 0``."""

    tau: FiniteFloat = Field(1.0, gt=0)


class PNormParams(_Params):
    """[`PNorm`][cellsheaf.potentials.PNorm]: exponent ``p > 1``."""

    p: FiniteFloat = Field(2.0, gt=1)


class ElasticNetParams(_Params):
    """[`ElasticNet`][cellsheaf.potentials.ElasticNet]: ``l1, l2 >= 0``, not both zero."""

    l1: FiniteFloat = Field(1.0, ge=0)
    l2: FiniteFloat = Field(1.0, ge=0)


class CrossEntropyParams(_Params):
    """[`CrossEntropy`][cellsheaf.potentials.CrossEntropy]: the activation read on the prediction end and which end predicts."""

    activation: Literal["softmax", "sigmoid"] | None = "softmax"
    prediction: Literal["u", "v"] = "u"


class WeightedParams(_Params):
    """[`Weighted`][cellsheaf.potentials.Weighted]: the weighted potential and its weights (scalar or per coordinate)."""

    potential: EncodedPotential
    weights: EncodedTensor | FiniteFloat


_PARAMS: dict[type, type[_Params]] = {
    _pot.Quadratic: _NoParams, _pot.L1: _NoParams, _pot.Huber: HuberParams, _pot.PNorm: PNormParams,
    _pot.ElasticNet: ElasticNetParams, _pot.CrossEntropy: CrossEntropyParams, _pot.Weighted: WeightedParams,
}


def _constructor_keywords(cls: type) -> set[str] | None:
    """Names the constructor of a user potential takes by keyword (None: it takes ``**kwargs``)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return {name for name, p in list(params.items())[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _check_keys(cls: type, keys) -> None:
    """Refuse keys the constructor of ``cls`` does not take, naming them (and methods posing as parameters)."""
    allowed = _constructor_keywords(cls)
    for key in keys:
        if allowed is not None and key in allowed:
            continue
        if hasattr(cls, key):
            raise ValueError(f"potential {cls.__name__}: {key!r} names a method or class attribute of "
                             f"{cls.__name__}, not a parameter")
        if allowed is not None:
            raise ValueError(f"potential {cls.__name__}: unknown parameter {key!r} (allowed: "
                             f"{', '.join(sorted(allowed)) or 'none'})")


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "__tensor__" in value:
        return EncodedTensor.model_validate(value).to_tensor()
    if isinstance(value, dict) and "__potential__" in value:
        return EncodedPotential.model_validate(value).potential.to_potential()
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _build_potential(name: str, params: dict) -> Potential:
    """Validate ``params`` against the constructor of the potential ``name`` and call it."""
    cls = _potential_class(name)
    model = _PARAMS.get(cls)
    if model is not None:
        _check_keys(cls, params)
        try:
            kwargs = model.model_validate(params).kwargs()
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"] if "[" not in str(p))  # not pydantic's validator names
            raise ValueError(f"potential {name}: {where + ': ' if where else ''}"
                             f"{first['msg'].removeprefix('Value error, ')}") from None
    else:
        _check_keys(cls, params)
        kwargs = {k: _decode(v) for k, v in params.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"potential {name}: {err}") from None


def _encode(value: Any, where: str) -> Any:
    """A JSON-ready form of a potential attribute."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not np.isfinite(value):
            raise SpecError(f"{where} is {value}, which JSON cannot carry")
        return value
    if isinstance(value, torch.Tensor):
        return {"__tensor__": _finite_values(value), "dtype": _dtype_name(value)}
    if isinstance(value, Potential):
        return {"__potential__": _potential_to_spec(value, where).model_dump()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, where) for v in value]
    raise SpecError(f"{where} holds a {type(value).__name__}, which cannot be serialised")


class PotentialSpec(_Model):
    """An edge potential: its class name and its constructor's keywords, checked as the constructor checks
    them (``Huber`` with ``tau <= 0``, unknown keys and keys naming methods are refused)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self):
        _build_potential(self.name, self.params)
        return self

    def to_potential(self) -> Potential:
        return _build_potential(self.name, self.params)


EncodedPotential.model_rebuild()
WeightedParams.model_rebuild()


def _potential_to_spec(p: Potential, where: str) -> PotentialSpec:
    cls = type(p)
    name = cls.__name__
    if _PARAMS.get(cls) is None:
        allowed = _constructor_keywords(cls)
        stray = sorted(set(vars(p)) - allowed) if allowed is not None else []
        if stray:
            raise SpecError(f"{where}: potential {name} stores attribute {stray[0]!r}, which its constructor "
                            "does not take; a spec rebuilds potentials by calling the constructor with their "
                            "attributes")
    params = {k: _encode(v, f"{where}: attribute {k!r} of potential {name}") for k, v in vars(p).items()}
    try:
        return PotentialSpec(name=name, params=params)
    except ValidationError as err:
        raise SpecError(f"{where}: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None


# ---------------------------------------------------------------------------- the sheaf


class VertexSpec(_Model):
    """A vertex: its name and stalk dimension."""

    name: Name
    dim: Dim


class EdgeSpec(_Model):
    """An oriented edge ``u -> v`` with its maps ``Fu``, ``Fv``, weight and optional potential."""

    name: Name
    u: Name
    v: Name
    Fu: MapSpec
    Fv: MapSpec
    weight: FiniteFloat = Field(default=1.0, gt=0)
    potential: PotentialSpec | None = None


class SheafSpec(_Model):
    """A whole sheaf; vertices and edges in cochain order.

    Examples
    --------
    >>> spec = SheafSpec.model_validate({
    ...     "vertices": [{"name": "a", "dim": 1}, {"name": "b", "dim": 1}],
    ...     "edges": [{"name": "e", "u": "a", "v": "b",
    ...                "Fu": {"type": "identity", "dim": 1}, "Fv": {"type": "scaled", "c": 2.0, "dim": 1}}]})
    >>> spec.to_sheaf().C1
    1
    """

    format: Literal["cellsheaf.sheaf"] = "cellsheaf.sheaf"
    version: Literal[1] = 1
    vertices: list[VertexSpec] = Field(default_factory=list)
    edges: list[EdgeSpec] = Field(default_factory=list)
    stacks: list[StackSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self):
        dims: dict = {}
        for vx in self.vertices:
            if vx.name in dims:
                raise ValueError(f"vertex {vx.name!r} is listed twice; vertex names must be unique")
            dims[vx.name] = vx.dim
        seen = set()
        for e in self.edges:
            if e.name in seen:
                raise ValueError(f"edge {e.name!r} is listed twice; edge names must be unique")
            seen.add(e.name)
            for side, w, F in (("Fu", e.u, e.Fu), ("Fv", e.v, e.Fv)):
                if w not in dims:
                    raise ValueError(f"edge {e.name!r} names unknown vertex {w!r}")
                if F.dims()[1] != dims[w]:
                    raise ValueError(f"edge {e.name!r}: {side} takes inputs of dim {F.dims()[1]} but vertex {w!r} "
                                     f"has stalk dim {dims[w]}")
            if e.Fu.dims()[0] != e.Fv.dims()[0]:
                raise ValueError(f"edge {e.name!r}: Fu maps to dim {e.Fu.dims()[0]} but Fv to dim {e.Fv.dims()[0]}")
        return self

    def to_sheaf(self):
        """Build the [`Sheaf`][cellsheaf.sheaf.Sheaf]."""
        from .sheaf import Sheaf

        S = Sheaf()
        for vx in self.vertices:
            S.add_vertex(vx.name, vx.dim)
        stacks = sorted(self.stacks, key=lambda st: st.at)
        edges, count = iter(self.edges), 0
        for st in stacks + [None]:
            while st is None or count < st.at:
                e = next(edges, None)
                if e is None:
                    if st is None:
                        return S
                    raise SpecError(f"stack at {st.at}: only {count} edges precede it")
                try:
                    pot = None if e.potential is None else e.potential.to_potential()
                except (ValueError, TypeError) as err:
                    raise SpecError(f"edge {e.name!r}: {err}") from None
                S.add_edge(e.u, e.v, e.Fu.to_map(), e.Fv.to_map(), name=e.name, weight=e.weight, potential=pot)
                count += 1
            if count != st.at:
                raise SpecError(f"stack at {st.at}: {count} edges precede it (stacks overlap)")
            st.add_to(S)
            count += st.index.shape[1]
        return S


def _check_name(name, what: str):
    if isinstance(name, bool) or not isinstance(name, (str, int)):
        raise SpecError(f"{what} name {name!r} is a {type(name).__name__}; only str and int names can be serialised")
    return name


def to_spec(S) -> SheafSpec:
    """The [`SheafSpec`][cellsheaf.spec.SheafSpec] of a sheaf (maps, weights, potentials).

    Raises [`SpecError`][cellsheaf.spec.SpecError] naming the edge whose map or potential cannot be
    serialised (``Function`` maps, potentials holding callables) and the
    vertex or edge whose name is neither ``str`` nor ``int``.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex(0, 1); S.add_vertex(1, 1)
    >>> _ = S.add_edge(0, 1, cs.maps.Identity(1), cs.maps.Identity(1), name="e")
    >>> to_spec(S).edges[0].Fu
    IdentitySpec(type='identity', dim=1)
    """
    vertices = [VertexSpec(name=_check_name(v, "vertex"), dim=S.dim(v)) for v in S.vertices]
    edges, stacks = [], []
    for seg, at in zip(S._segments, S._segment_starts()):
        if not isinstance(seg, dict):
            stacks.append(_stack_to_spec(seg, at))
    for e in (e for seg in S._segments if isinstance(seg, dict) for e in seg.values()):
        _check_name(e.name, "edge")
        specs = {}
        for side in ("Fu", "Fv"):
            try:
                specs[side] = map_to_spec(getattr(e, side))
            except SpecError as err:
                raise SpecError(f"edge {e.name!r}, map {side}: {err}") from None
        pot = None if e.potential is None else _potential_to_spec(e.potential, f"edge {e.name!r}")
        edges.append(EdgeSpec(name=e.name, u=e.u, v=e.v, weight=e.weight, potential=pot, **specs))
    return SheafSpec(vertices=vertices, edges=edges, stacks=stacks)


def _locate(loc: tuple, raw: Any) -> str:
    """``edge 'e3'``/``vertex 'a'`` (or the position) for a validation-error location."""
    if len(loc) >= 2 and loc[0] in ("vertices", "edges") and isinstance(loc[1], int):
        kind = "vertex" if loc[0] == "vertices" else "edge"
        try:
            name = raw[loc[0]][loc[1]]["name"]
        except (KeyError, IndexError, TypeError):
            name = None
        valid = isinstance(name, (str, int)) and not isinstance(name, bool)
        head = f"{kind} {name!r}" if valid else f"{kind} #{loc[1]}"
        rest = ".".join(str(p) for p in loc[2:])
        return f"{head}{': ' + rest if rest else ''}"
    return ".".join(str(p) for p in loc) or "spec"


def _explain(err: ValidationError, raw: Any, source: str) -> SpecError:
    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {_locate(tuple(e['loc']), raw)}: {msg}")
    return SpecError(f"invalid sheaf spec{source} ({len(lines)} problem{'s' * (len(lines) > 1)}):\n"
                     + "\n".join(lines))


def from_spec(spec) -> Any:
    """Build a [`Sheaf`][cellsheaf.sheaf.Sheaf] from a [`SheafSpec`][cellsheaf.spec.SheafSpec], a dict, a JSON string or a JSON file path.

    Strings are parsed as JSON text; pass a `pathlib.Path` (or other
    ``os.PathLike``) to read a file. Problems raise [`SpecError`][cellsheaf.spec.SpecError] naming the
    vertex or edge at fault.

    Examples
    --------
    >>> import cellsheaf as cs
    >>> S = from_spec('{"vertices": [{"name": "a", "dim": 2}], "edges": []}')
    >>> S.vertices, S.C0
    (['a'], 2)
    """
    source = ""
    if isinstance(spec, os.PathLike):
        source = f" in file {os.fspath(spec)!r}"
        try:
            spec = Path(spec).read_text()
        except OSError as err:
            raise SpecError(f"cannot read sheaf spec file {os.fspath(spec)!r}: {err}") from None
    if isinstance(spec, (str, bytes)):
        try:
            raw = json.loads(spec)
        except json.JSONDecodeError as err:
            raise SpecError(f"malformed JSON{source}: {err}") from None
        spec = raw
    if not isinstance(spec, SheafSpec):
        if not isinstance(spec, dict):
            raise SpecError(f"a sheaf spec is a SheafSpec, dict, JSON string or path, got {type(spec).__name__}")
        try:
            spec = SheafSpec.model_validate(spec)
        except ValidationError as err:
            raise _explain(err, spec, source) from None
    return spec.to_sheaf()
