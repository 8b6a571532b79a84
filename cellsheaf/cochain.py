"""0-cochains: one flat tensor ``(C0,)`` or ``(B, C0)`` with named views per vertex.

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf(); S.add_vertex("u", 2); S.add_vertex("v", 1)
>>> x = cs.Cochain.from_dict(S, {"u": torch.tensor([1.0, 2.0]), "v": torch.tensor([3.0])})
>>> x.flat
tensor([1., 2., 3.])
>>> x["u"]
tensor([1., 2.])
>>> (2 * x - x.flat)["v"], (x + x).numpy()
(tensor([3.]), array([2., 4., 6.], dtype=float32))
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping

import torch
from torch import Tensor

from .validation import as_real, check_finite

__all__ = ["Cochain", "as_flat", "as_real", "check_finite"]


class Cochain:
    """A 0-cochain of a sheaf: ``flat`` is ``(C0,)`` or ``(B, C0)``; ``x[v]`` is the value at ``v``.

    ``info`` carries the report of the solver that produced it (or ``None``).
    """

    __slots__ = ("sheaf", "flat", "info")

    def __init__(self, sheaf, flat: Tensor, info: Any = None):
        flat = torch.as_tensor(flat)
        if flat.is_complex():
            raise TypeError(f"a cochain is real; got {flat.dtype} values (pass x.real, or split real and imaginary "
                            "parts into twice the coordinates)")
        if flat.dim() not in (1, 2) or flat.shape[-1] != sheaf.C0:
            raise ValueError(f"a cochain of this sheaf has shape (C0,) or (B, C0) with C0={sheaf.C0}, "
                             f"got {tuple(flat.shape)}")
        self.sheaf, self.flat, self.info = sheaf, flat, info

    @classmethod
    def from_dict(cls, sheaf, values: Mapping[Hashable, Tensor], fill: float | None = None) -> "Cochain":
        """Assemble a cochain from ``{vertex: (d,) or (B, d)}``.

        Every vertex needs a value unless ``fill`` is given (then missing ones get ``fill``).
        """
        unknown = [v for v in values if v not in sheaf._dims]
        if unknown:
            raise KeyError(f"unknown vertex {unknown[0]!r} in cochain values")
        missing = [v for v in sheaf.vertices if v not in values and sheaf.dim(v) > 0]
        if missing and fill is None:
            raise KeyError(f"no value for vertex {missing[0]!r}; give every vertex or pass fill=")
        tensors = {v: as_real(t, f"cochain value at vertex {v!r}", finite=False) for v, t in values.items()}
        batch = {t.shape[0] for t in tensors.values() if t.dim() == 2}
        if len(batch) > 1:
            raise ValueError(f"cochain values have different batch sizes {sorted(batch)}")
        dtype = sheaf.dtype
        for t in tensors.values():
            if t.is_floating_point():
                dtype = t.dtype
                break
        device = next((t.device for t in tensors.values()), None)
        shape = (batch.pop(), sheaf.C0) if batch else (sheaf.C0,)
        flat = torch.full(shape, float(fill or 0.0), dtype=dtype, device=device)
        for v, t in tensors.items():
            d = sheaf.dim(v)
            if t.shape[-1:] != (d,) or t.dim() > 2:
                raise ValueError(f"value at vertex {v!r} has shape {tuple(t.shape)}; expected ({d},) or (B, {d})")
            flat[..., sheaf.vertex_slice(v)] = t.to(dtype)
        return cls(sheaf, flat)

    def __getitem__(self, v: Hashable) -> Tensor:
        return self.flat[..., self.sheaf.vertex_slice(v)]

    def to_dict(self) -> dict[Hashable, Tensor]:
        """``{vertex: value}`` views into `flat`."""
        return {v: self[v] for v in self.sheaf.vertices}

    @property
    def batched(self) -> bool:
        return self.flat.dim() == 2

    def __repr__(self) -> str:
        return f"Cochain(shape={tuple(self.flat.shape)}, dtype={self.flat.dtype})"

    def numpy(self):
        """The flat values as a numpy array (detached, on the CPU)."""
        return self.flat.detach().cpu().numpy()

    # arithmetic: cochains of one sheaf form a vector space (+, -, scalar *); the result has no solver info

    def _other(self, other) -> Tensor:
        if isinstance(other, Cochain):
            if other.sheaf is not self.sheaf and other.sheaf.C0 != self.sheaf.C0:
                raise ValueError("cannot combine cochains of sheaves with different layouts "
                                 f"(C0 = {self.sheaf.C0} and {other.sheaf.C0})")
            return other.flat
        return as_flat(self.sheaf, other)

    def __add__(self, other) -> "Cochain":
        return Cochain(self.sheaf, self.flat + self._other(other))

    __radd__ = __add__

    def __sub__(self, other) -> "Cochain":
        return Cochain(self.sheaf, self.flat - self._other(other))

    def __rsub__(self, other) -> "Cochain":
        return Cochain(self.sheaf, self._other(other) - self.flat)

    def __neg__(self) -> "Cochain":
        return Cochain(self.sheaf, -self.flat)

    def __mul__(self, scalar) -> "Cochain":
        if isinstance(scalar, Cochain) or (isinstance(scalar, Tensor) and scalar.dim() > 0):
            return NotImplemented  # only scalars: a product of cochains is not a cochain
        return Cochain(self.sheaf, self.flat * scalar)

    __rmul__ = __mul__

    def __truediv__(self, scalar) -> "Cochain":
        if isinstance(scalar, Cochain) or (isinstance(scalar, Tensor) and scalar.dim() > 0):
            return NotImplemented
        return Cochain(self.sheaf, self.flat / scalar)


def as_flat(sheaf, x) -> Tensor:
    """The flat tensor of a [`Cochain`][cellsheaf.cochain.Cochain], tensor or dict ``x``, checked against ``sheaf``."""
    if isinstance(x, Cochain):
        if x.sheaf is not sheaf and x.sheaf.C0 != sheaf.C0:
            raise ValueError("the cochain belongs to a sheaf with a different layout")
        return x.flat
    if isinstance(x, Mapping):
        return Cochain.from_dict(sheaf, x).flat
    x = as_real(x, "the cochain", finite=False)
    if not x.is_floating_point():
        x = x.to(sheaf.dtype)
    if x.dim() not in (1, 2) or x.shape[-1] != sheaf.C0:
        raise ValueError(f"expected a cochain of shape ({sheaf.C0},) or (B, {sheaf.C0}), got {tuple(x.shape)}")
    return x
