"""Max pooling: a piecewise-linear selection map.

On each window the output copies the largest input, so the Jacobian at a point
is a coordinate selection ([`Select`][cellsheaf.maps.Select]): [`jvp`][cellsheaf.maps.Map.jvp] gathers, [`vjp`][cellsheaf.maps.Map.vjp] scatters. Where a
window has several maximal inputs (a switching surface, like ReLU at 0), the
first of them in scan order is selected, as torch's own max pooling does: the
fast selection rule.

Examples
--------
>>> import torch, cellsheaf as cs
>>> P = cs.maps.MaxPool1d(2, in_shape=(1, 4))
>>> x = torch.tensor([1.0, 3.0, 5.0, 4.0])
>>> P.apply(x), P.vjp(x, torch.ones(2))
(tensor([3., 5.]), tensor([0., 1., 1., 0.]))
>>> P.linearize(x).indices
tensor([1, 2])
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as fn
from torch import Tensor

from .convolution import _tuple
from .core import Map, Select, Structured

__all__ = ["MaxPool", "MaxPool1d", "MaxPool2d"]

_POOL = {1: fn.max_pool1d, 2: fn.max_pool2d, 3: fn.max_pool3d}


class _Selection:
    """The local maps of a map whose Jacobian at ``x`` copies one input per output, ``indices(x)``."""

    linear = False
    d_in: int
    d_out: int

    def indices(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def jvp(self, x, v):
        return v.gather(-1, self.indices(x).expand(*v.shape[:-1], self.d_out))

    def vjp(self, x, w):
        idx = self.indices(x).expand(*w.shape[:-1], self.d_out)
        return w.new_zeros(*w.shape[:-1], self.d_in).scatter_add(-1, idx, w)

    def squared_vjp(self, x, d):
        return self.vjp(x, d)

    def jacobian(self, x):
        idx = self.indices(x)
        J = x.new_zeros(*idx.shape, self.d_in)
        return J.scatter_(-1, idx.unsqueeze(-1), 1.0)

    def linearize(self, x=None):
        if x is None or x.dim() != 1:
            raise ValueError(f"{type(self).__name__}.linearize needs one point of shape ({self.d_in},)")
        return Select(self.indices(x), self.d_in)


class MaxPool(_Selection, Structured):
    """N-d max pooling (as `torch.nn.MaxPool2d`, ``ceil_mode=False``) on a stalk holding ``in_shape``."""

    _params = ("kernel", "in_shape", "stride", "padding", "dilation")
    ndim: int | None = None

    def __init__(self, kernel, in_shape: Sequence[int], stride=None, padding=0, dilation=1):
        n = len(in_shape) - 1
        if n not in _POOL or (self.ndim is not None and n != self.ndim):
            raise ValueError(f"{type(self).__name__}: in_shape must be (C, *spatial) with "
                             f"{self.ndim or '1 to 3'} spatial dims, got {tuple(in_shape)}")
        self.in_shape = tuple(int(s) for s in in_shape)
        self.kernel = _tuple(kernel, n, "kernel")
        self.stride = self.kernel if stride is None else _tuple(stride, n, "stride")
        self.padding, self.dilation = _tuple(padding, n, "padding"), _tuple(dilation, n, "dilation")
        if any(2 * p > k for p, k in zip(self.padding, self.kernel)):
            raise ValueError(f"{type(self).__name__}: padding {self.padding} must be at most half the kernel "
                             f"{self.kernel} (as in torch)")
        spatial = tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
                        zip(self.in_shape[1:], self.padding, self.dilation, self.kernel, self.stride))
        if min(spatial) < 1:
            raise ValueError(f"{type(self).__name__}: the window {self.kernel} does not fit the input "
                             f"{self.in_shape[1:]}")
        self.out_shape = (self.in_shape[0], *spatial)
        self.d_in, self.d_out = math.prod(self.in_shape), math.prod(self.out_shape)

    def _pool(self, x: Tensor, indices: bool):
        xb = x.reshape(-1, *self.in_shape)
        return _POOL[len(self.kernel)](xb, self.kernel, self.stride, self.padding, self.dilation,
                                       return_indices=indices)

    def apply(self, x):
        return self._pool(x, False).reshape(*x.shape[:-1], self.d_out)

    def indices(self, x: Tensor) -> Tensor:
        """The stalk coordinate each output copies at ``x``: ``(..., d_out)`` indices into ``(..., d_in)``."""
        _, idx = self._pool(x, True)
        plane = math.prod(self.in_shape[1:])
        channel = torch.arange(self.in_shape[0], device=x.device).view(1, -1, *([1] * len(self.kernel)))
        return (idx + channel * plane).reshape(*x.shape[:-1], self.d_out)

    def windows(self) -> Tensor:
        """``(d_out, K)``: the stalk coordinates of each output's window (``K = Π kernel``), in the order
        torch scans them (a tie selects the first maximum); ``-1`` for padding.

        Examples
        --------
        >>> import cellsheaf as cs
        >>> cs.maps.MaxPool1d(2, in_shape=(1, 5), padding=1).windows()
        tensor([[-1,  0],
                [ 1,  2],
                [ 3,  4]])
        """
        idx = torch.arange(self.d_in).reshape(self.in_shape)
        idx = fn.pad(idx, [p for q in reversed(self.padding) for p in (q, q)], value=-1)
        for axis, (k, s, d) in enumerate(zip(self.kernel, self.stride, self.dilation), start=1):
            idx = idx.unfold(axis, d * (k - 1) + 1, s)[..., ::d]  # the window along this axis, appended last
        return idx.reshape(self.d_out, -1)

    def tie_broken(self, ref: Tensor) -> Map:
        """This pooling with the ties of the points ``ref`` (``(B, d_in)``) broken as torch breaks them: in each
        window the inputs equal to its maximum at ``ref`` that torch does not select are left out. It acts on
        batches of ``B`` points aligned with ``ref``, is this map near ``ref`` wherever ``ref`` has no tie, and
        its Jacobian at ``ref`` is torch's (the subgradient backprop uses) also where it has one.

        Examples
        --------
        >>> import torch, cellsheaf as cs
        >>> P = cs.maps.MaxPool1d(2, in_shape=(1, 2))
        >>> ref = torch.zeros(1, 2)                     # a tie: torch selects the first input
        >>> x = torch.tensor([[-1.0, 0.0]])
        >>> P.apply(x), P.tie_broken(ref).apply(x)      # the second input is left out
        (tensor([[0.]]), tensor([[-1.]]))
        """
        return _TieBroken(self, ref)


class _TieBroken(_Selection, Map):
    """`MaxPool.tie_broken`: max pooling over the windows with the inputs ``left_out`` (``(B, d_out, K)``)."""

    def __init__(self, pool: MaxPool, ref: Tensor):
        self.d_in, self.d_out = pool.d_in, pool.d_out
        self.windows = pool.windows().to(ref.device)
        self._flat = torch.where(self.windows >= 0, self.windows, self.d_in).reshape(-1)
        v = self._gather(ref)
        first = v.argmax(-1, keepdim=True)
        others = torch.arange(v.shape[-1], device=ref.device) != first
        self.left_out = (self.windows < 0) | ((v == v.amax(-1, keepdim=True)) & others)

    def _gather(self, x: Tensor) -> Tensor:
        padded = torch.cat([x, x.new_full((*x.shape[:-1], 1), -math.inf)], -1)
        return padded[..., self._flat].view(*x.shape[:-1], *self.windows.shape)

    def _scores(self, x: Tensor) -> Tensor:
        return self._gather(x).masked_fill(self.left_out, -math.inf)

    def apply(self, x):
        return self._scores(x).amax(-1)

    def indices(self, x: Tensor) -> Tensor:
        k = self._scores(x).argmax(-1, keepdim=True)
        return self.windows.expand(*k.shape[:-1], -1).gather(-1, k).squeeze(-1)


class MaxPool1d(MaxPool):
    """[`MaxPool`][cellsheaf.maps.MaxPool] on ``(C, L)`` stalks (as `torch.nn.MaxPool1d`)."""

    ndim = 1


class MaxPool2d(MaxPool):
    """[`MaxPool`][cellsheaf.maps.MaxPool] on ``(C, H, W)`` stalks (as `torch.nn.MaxPool2d`)."""

    ndim = 2
