"""Multi-input maps on a concatenated stalk ``[a; b]``: products, matrix products, quotients, masked choice.

A node ``y = f(x_1, x_2)`` of a network compiles as copy edges into a merge
vertex ``m = [x_1; x_2]`` and one edge ``m -> y`` whose map on ``m`` is ``f``
(the construction `+` and `cat` use; ``δ_Ω`` stays square). These maps are
that ``f``: nonlinear in the whole stalk, with exact closed-form [`jvp`][cellsheaf.maps.Map.jvp] and
[`vjp`][cellsheaf.maps.Map.vjp]. Per-sample shapes of the blocks are parameters (attention:
``(H, T, D) @ (H, D, T)``).

Examples
--------
>>> import torch, cellsheaf as cs
>>> F = cs.maps.Product(2)                               # [a; b] -> a ⊙ b
>>> F.apply(torch.tensor([1.0, 2.0, 3.0, 4.0]))
tensor([3., 8.])
>>> F.vjp(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.ones(2))
tensor([3., 4., 1., 2.])
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .core import Structured, _as_tensor
from .normalization import ShapedMap

__all__ = ["Product", "Quotient", "MatMul", "Where"]


class _TwoBlocks(ShapedMap):
    """A map of ``[a; b]`` with ``a`` of ``shape_a`` and ``b`` of ``shape_b`` (per sample)."""

    _params = ("shape_a", "shape_b")

    def __init__(self, shape_a: Sequence[int], shape_b: Sequence[int], out_shape: Sequence[int]):
        self.shape_a, self.shape_b = tuple(int(s) for s in shape_a), tuple(int(s) for s in shape_b)
        self.n_a, self.n_b = math.prod(self.shape_a), math.prod(self.shape_b)
        super().__init__((self.n_a + self.n_b,), out_shape)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, tuple]:
        lead = x.shape[:-1]
        a, b = x[..., :self.n_a], x[..., self.n_a:]
        return a.reshape(-1, *self.shape_a), b.reshape(-1, *self.shape_b), lead

    def _join(self, ga: Tensor, gb: Tensor, lead) -> Tensor:
        return torch.cat([ga.reshape(*lead, self.n_a), gb.reshape(*lead, self.n_b)], -1)

    def apply(self, x):
        a, b, lead = self._split(x)
        return self.pair(a, b).reshape(*lead, self.d_out)

    def pair(self, a: Tensor, b: Tensor) -> Tensor:
        """The map on the two blocks ``(N, *shape_a)``, ``(N, *shape_b)``."""
        raise NotImplementedError


class Product(_TwoBlocks):
    """The elementwise product ``a ⊙ b`` of two blocks of ``d`` coordinates (a gate, SwiGLU).

    ``J [u; v] = u ⊙ b + a ⊙ v``, ``Jᵀ w = [w ⊙ b; w ⊙ a]``.
    """

    _params = ("d",)

    def __init__(self, d: int):
        self.d = int(d)
        super().__init__((self.d,), (self.d,), (self.d,))

    def pair(self, a, b):
        return a * b

    def jvp(self, x, v):
        a, b, lead = self._split(x)
        u, w, _ = self._split(v)
        return (u * b + a * w).reshape(*lead, self.d_out)

    def vjp(self, x, w):
        a, b, lead = self._split(x)
        w = w.reshape(-1, self.d)
        return self._join(w * b, w * a, lead)


class Quotient(Product):
    """The elementwise quotient ``a / b`` of two blocks of ``d`` coordinates.

    ``J [u; v] = u / b − a v / b²``, ``Jᵀ w = [w / b; −w a / b²]``. The map has a pole at ``b = 0``: the
    energy of its edge is infinite there, so no gradient flow moves a denominator coordinate across zero
    ([`denominator`][cellsheaf.maps.Quotient.denominator] says which input coordinates those are).
    """

    @property
    def denominator(self) -> slice:
        """The input coordinates of the denominator ``b`` (the second block).

        Examples
        --------
        >>> import cellsheaf as cs
        >>> cs.maps.Quotient(3).denominator
        slice(3, 6, None)
        """
        return slice(self.d, 2 * self.d)

    def pair(self, a, b):
        return a / b

    def jvp(self, x, v):
        a, b, lead = self._split(x)
        u, w, _ = self._split(v)
        return ((u - a * w / b) / b).reshape(*lead, self.d_out)

    def vjp(self, x, w):
        a, b, lead = self._split(x)
        w = w.reshape(-1, self.d) / b
        return self._join(w, -w * a / b, lead)


class MatMul(_TwoBlocks):
    """The matrix product ``a @ b`` of two blocks holding ``(..., m, k)`` and ``(..., k, n)`` (as `torch.matmul`,
    leading axes broadcast): attention scores ``q @ kᵀ`` and ``att @ v``, `torch.bmm` per head.

    ``J [u; v] = u @ b + a @ v``, ``Jᵀ w = [w @ bᵀ; aᵀ @ w]`` (summed over broadcast axes).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> F = cs.maps.MatMul((2, 3), (3, 1))
    >>> F.d_in, F.d_out, F.out_shape
    (9, 2, (2, 1))
    """

    def __init__(self, shape_a: Sequence[int], shape_b: Sequence[int]):
        sa, sb = tuple(shape_a), tuple(shape_b)
        if len(sa) < 2 or len(sb) < 2 or sa[-1] != sb[-2]:
            raise ValueError(f"MatMul: blocks of shapes {sa} @ {sb} do not multiply (need (..., m, k) @ (..., k, n))")
        try:
            lead = np.broadcast_shapes(sa[:-2], sb[:-2])  # torch's imports sympy on its first call (seconds)
        except ValueError as err:
            raise ValueError(f"MatMul: the leading axes of {sa} and {sb} do not broadcast") from err
        super().__init__(sa, sb, (*lead, sa[-2], sb[-1]))
        rank = max(len(sa), len(sb))  # pad the per-sample shapes to one rank: the batch axis must not broadcast
        self._pa, self._pb = (1,) * (rank - len(sa)) + sa, (1,) * (rank - len(sb)) + sb

    def _split(self, x):
        a, b, lead = super()._split(x)
        return a.reshape(-1, *self._pa), b.reshape(-1, *self._pb), lead

    def pair(self, a, b):
        return a @ b

    def jvp(self, x, v):
        a, b, lead = self._split(x)
        u, w, _ = self._split(v)
        return (u @ b + a @ w).reshape(*lead, self.d_out)

    def vjp(self, x, w):
        a, b, lead = self._split(x)
        w = w.reshape(-1, *self.out_shape)
        ga = (w @ b.transpose(-1, -2)).sum_to_size(a.shape)
        gb = (a.transpose(-1, -2) @ w).sum_to_size(b.shape)
        return self._join(ga, gb, lead)


class Where(Structured):
    """``where(mask, a, b)`` of two blocks of ``d`` coordinates with a constant boolean ``mask`` ``(d,)``:
    a coordinate selection, hence linear (`torch.where` with a fixed mask).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> F = cs.maps.Where(torch.tensor([True, False]))
    >>> F.apply(torch.tensor([1.0, 2.0, 3.0, 4.0])), F.adjoint(torch.tensor([1.0, 1.0]))
    (tensor([1., 4.]), tensor([1., 0., 0., 1.]))
    """

    _tensors = ("mask",)

    def __init__(self, mask):
        mask = _as_tensor(mask, "mask")
        self.mask = mask.reshape(-1).to(torch.bool)
        d = self.mask.numel()
        self.d_in, self.d_out = 2 * d, d
        self._index = torch.where(self.mask, torch.arange(d), d + torch.arange(d))

    def state(self):
        return {}, {"mask": self.mask.to(torch.float64)}, {}  # specs carry floats

    def to(self, dtype=None, device=None):
        return self  # a boolean pattern: nothing to convert

    def tensors(self):
        return []

    def apply(self, x):
        return x[..., self._index.to(x.device)]

    def adjoint(self, y):
        return y.new_zeros(*y.shape[:-1], self.d_in).index_add(-1, self._index.to(y.device), y)

    def squared_vjp(self, x, d):
        return self.adjoint(d)

    def coo(self):
        return np.arange(self.d_out), self._index.numpy(), np.ones(self.d_out)

    def matrix(self):
        M = torch.zeros(self.d_out, self.d_in, dtype=torch.float64)
        M[torch.arange(self.d_out), self._index] = 1.0
        return M
