"""Sums and means over axes of a per-sample shape, as linear operators.

Examples
--------
>>> import torch, cellsheaf as cs
>>> R = cs.maps.Reduce((2, 3), dims=(1,), mean=True)    # x.mean(-1) on a (2, 3) stalk
>>> R.apply(torch.arange(6.0)), R.adjoint(torch.ones(2))
(tensor([1., 4.]), tensor([0.3333, 0.3333, 0.3333, 0.3333, 0.3333, 0.3333]))
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .core import Structured

__all__ = ["Reduce"]


class Reduce(Structured):
    """``x.sum(dims)`` (or ``x.mean(dims)`` with ``mean=True``) of a stalk holding ``shape``; the output holds
    ``shape`` without those axes (``keepdim`` changes no flat vector)."""

    _params = ("shape", "dims", "mean")

    def __init__(self, shape: Sequence[int], dims: Sequence[int] | int, mean: bool = False):
        self.shape = tuple(int(s) for s in shape)
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        if not dims or any(not -len(self.shape) <= d < len(self.shape) for d in dims):
            raise ValueError(f"Reduce: dims {dims} must be axes of the shape {self.shape}")
        self.dims = tuple(sorted({int(d) % len(self.shape) for d in dims}))
        self.mean = bool(mean)
        self._keep = tuple(1 if k in self.dims else s for k, s in enumerate(self.shape))
        self.out_shape = tuple(s for k, s in enumerate(self.shape) if k not in self.dims)
        self.d_in, self.d_out = math.prod(self.shape), math.prod(self.out_shape)
        self._scale = 1.0 / (self.d_in // max(self.d_out, 1)) if self.mean else 1.0

    def apply(self, x):
        y = x.reshape(-1, *self.shape).sum(tuple(d + 1 for d in self.dims))
        return (y * self._scale if self.mean else y).reshape(*x.shape[:-1], self.d_out)

    def _spread(self, y, scale: float):
        z = y.reshape(-1, *self._keep).expand(-1, *self.shape)
        return (z * scale if scale != 1.0 else z).reshape(*y.shape[:-1], self.d_in)

    def adjoint(self, y):
        return self._spread(y, self._scale)

    def squared_vjp(self, x, d):
        return self._spread(d, self._scale ** 2)

    def coo(self):
        rows = np.broadcast_to(np.arange(self.d_out).reshape(self._keep), self.shape).reshape(-1).copy()
        return rows, np.arange(self.d_in), np.full(self.d_in, self._scale)

    def matrix(self):
        r, c, v = self.coo()
        M = torch.zeros(self.d_out, self.d_in, dtype=torch.float64)
        M[torch.as_tensor(r), torch.as_tensor(c)] = torch.as_tensor(v)
        return M
