"""Stubborn coordinates: which coordinates of which vertices are fixed, and to what.

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf(); S.add_vertex("u", 2); S.add_vertex("v", 2)
>>> b = cs.Boundary().fix("u", torch.tensor([1.0, 2.0])).fix("v", torch.tensor([0.5]), coords=[1])
>>> r = b.resolve(S)
>>> r.fixed.tolist(), r.free.tolist(), r.values.tolist()
([0, 1, 3], [2], [1.0, 2.0, 0.5])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np
import torch
from torch import Tensor

from .cochain import as_real

__all__ = ["Boundary", "ResolvedBoundary"]


@dataclass
class ResolvedBoundary:
    """A boundary laid out on a sheaf's flat 0-cochain.

    ``fixed`` and ``free`` are sorted index tensors partitioning ``range(C0)``;
    ``values`` is ``(n_fixed,)`` or ``(B, n_fixed)``, aligned with ``fixed``.
    """

    fixed: Tensor
    free: Tensor
    values: Tensor

    @property
    def batch(self) -> int | None:
        return self.values.shape[0] if self.values.dim() == 2 else None

    def fill(self, x: Tensor) -> Tensor:
        """``x`` (``(C0,)`` or ``(B, C0)``) with its fixed coordinates set to the boundary values."""
        x = x.clone() if self.values.dim() <= x.dim() else x.expand(self.values.shape[0], -1).clone()
        v = self.values.to(dtype=x.dtype, device=x.device).expand(*x.shape[:-1], -1)
        return x.scatter_(-1, self.fixed.to(x.device).expand_as(v), v)  # much faster than x[..., fixed] = v


def _common_batch(a: Tensor, b: Tensor, vertex) -> tuple[Tensor, Tensor]:
    """Expand unbatched ``(k,)`` values to the batch of the other, or check the batches agree."""
    if a.dim() == 2 and b.dim() == 2 and a.shape[0] != b.shape[0]:
        raise ValueError(f"boundary at vertex {vertex!r}: batch sizes {a.shape[0]} and {b.shape[0]} differ")
    B = a.shape[0] if a.dim() == 2 else (b.shape[0] if b.dim() == 2 else None)
    if B is None:
        return a, b
    return a.expand(B, -1) if a.dim() == 1 else a, b.expand(B, -1) if b.dim() == 1 else b


class Boundary:
    """Boundary data ("stubborn" coordinates) for solvers.

    ``fix`` returns the boundary, so calls chain. Values are ``(k,)`` or ``(B, k)``
    for ``k`` fixed coordinates; batched and unbatched values may be mixed
    (unbatched ones are shared by every item).
    """

    def __init__(self) -> None:
        self._fixes: dict[Hashable, tuple[list[int] | None, Tensor]] = {}

    def fix(self, vertex: Hashable, values, coords: Sequence[int] | None = None) -> "Boundary":
        """Fix coordinates ``coords`` (default: the whole stalk) of ``vertex`` to ``values``."""
        values = as_real(values, f"boundary value at vertex {vertex!r}")  # integers: cast to the sheaf's dtype
        if values.dim() not in (1, 2):
            raise ValueError(f"boundary value at vertex {vertex!r} must be (k,) or (B, k), got {tuple(values.shape)}")
        if coords is not None:
            coords = [int(c) for c in coords]
            if len(set(coords)) != len(coords):
                raise ValueError(f"boundary at vertex {vertex!r}: repeated coordinates {coords}")
            if values.shape[-1] != len(coords):
                raise ValueError(f"boundary at vertex {vertex!r}: {len(coords)} coords but values of shape "
                                 f"{tuple(values.shape)}")
        if vertex in self._fixes:
            oc, ov = self._fixes[vertex]
            if oc is None or coords is None or set(oc) & set(coords):
                raise ValueError(f"vertex {vertex!r} already has these coordinates fixed; call unfix({vertex!r}) first")
            dt = torch.promote_types(ov.dtype, values.dtype)
            ov, values = _common_batch(ov.to(dt), values.to(dt), vertex)
            coords, values = oc + coords, torch.cat([ov, values], -1)
        self._fixes[vertex] = (coords, values)
        return self

    def unfix(self, vertex: Hashable) -> "Boundary":
        """Free every coordinate of ``vertex``."""
        self._fixes.pop(vertex, None)
        return self

    @property
    def vertices(self) -> list[Hashable]:
        """Vertices with at least one fixed coordinate."""
        return list(self._fixes)

    def copy(self) -> "Boundary":
        b = Boundary()
        b._fixes = dict(self._fixes)
        return b

    def __len__(self) -> int:
        return len(self._fixes)

    def __repr__(self) -> str:
        parts = [f"{v!r}: {'all' if c is None else c}" for v, (c, _) in self._fixes.items()]
        return f"Boundary({', '.join(parts)})"

    def resolve(self, sheaf, dtype: torch.dtype | None = None, device=None) -> ResolvedBoundary:
        """Lay the boundary out on ``sheaf``'s 0-cochain; checks vertices, coords and shapes."""
        batch = {v.shape[0] for _, v in self._fixes.values() if v.dim() == 2}
        if len(batch) > 1:
            raise ValueError(f"boundary values have different batch sizes {sorted(batch)}")
        B = batch.pop() if batch else None
        names, coords = list(self._fixes), [c for c, _ in self._fixes.values()]
        vals = [v if B is None or v.dim() == 2 else v.expand(B, -1) for _, v in self._fixes.values()]
        position = sheaf._vertex_index()
        unknown = [v for v in names if v not in position]
        if unknown:
            raise KeyError(f"boundary names unknown vertex {unknown[0]!r}")
        pos = np.fromiter((position[v] for v in names), dtype=np.int64, count=len(names))
        dims, starts = sheaf._dim_array()[pos], sheaf._vertex_offsets()[pos]
        widths = np.fromiter((v.shape[-1] for v in vals), dtype=np.int64, count=len(vals))
        whole = np.fromiter((c is None for c in coords), dtype=bool, count=len(coords))
        wrong = np.flatnonzero(whole & (widths != dims))
        if wrong.size:
            i = int(wrong[0])
            raise ValueError(f"boundary at vertex {names[i]!r}: value of shape {tuple(self._fixes[names[i]][1].shape)}, "
                             f"but the stalk has dim {int(dims[i])}; pass coords= to fix part of it")
        first = np.cumsum(widths) - widths
        local = np.arange(int(widths.sum())) - np.repeat(first, widths)  # 0, 1, ... within every fix
        for i in np.flatnonzero(~whole).tolist():
            c = np.asarray(coords[i], dtype=np.int64)
            if ((c < 0) | (c >= dims[i])).any():
                raise IndexError(f"boundary at vertex {names[i]!r}: coordinates {c[(c < 0) | (c >= dims[i])].tolist()} "
                                 f"outside the stalk of dim {int(dims[i])}")
            local[first[i]:first[i] + c.size] = c
        dtype = dtype or next((v.dtype for v in vals if v.is_floating_point()), None) or sheaf.dtype
        fixed = torch.as_tensor(np.repeat(starts, widths) + local)
        values = torch.cat([v.to(dtype) for v in vals], -1) if vals else \
            torch.zeros((B, 0) if B else (0,), dtype=dtype)
        if not bool((fixed[1:] > fixed[:-1]).all()):  # skip the gather when fixed in cochain order already
            order = torch.argsort(fixed)
            fixed, values = fixed[order], values.index_select(-1, order)
        mask = torch.ones(sheaf.C0, dtype=torch.bool)
        mask[fixed] = False
        res = ResolvedBoundary(fixed, torch.nonzero(mask).flatten(), values)
        if device is not None:
            res = ResolvedBoundary(res.fixed.to(device), res.free.to(device), res.values.to(device))
        return res
