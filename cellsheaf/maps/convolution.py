"""Convolutions, average pooling and per-token linear maps, as matrix-free linear operators.

A stalk is a flat vector; the per-sample shape it holds (``(C, L)`` or
``(C, H, W)`` for a convolution, ``(T, D)`` for tokens) is a parameter of the
map. [`apply`][cellsheaf.maps.Map.apply] runs `torch.nn.functional.conv1d`/`conv2d` (or a batched
matmul), [`adjoint`][cellsheaf.maps.Map.adjoint] the matching transposed convolution (torch's own input
gradient of the convolution, ``convolution_backward``), and [`coo`][cellsheaf.maps.Map.coo] lists the
nonzero entries from index arithmetic: nothing builds the dense
``(C_out·H_out·W_out) × (C_in·H·W)`` matrix unless [`matrix`][cellsheaf.maps.Map.matrix] is asked for.

Examples
--------
>>> import torch, cellsheaf as cs
>>> K = torch.tensor([[[1.0, -1.0]]])                  # one channel, kernel [1, -1]
>>> F = cs.maps.Conv1d(K, in_shape=(1, 4))
>>> F.out_shape, F.apply(torch.tensor([1.0, 2.0, 4.0, 8.0]))
((1, 3), tensor([-1., -2., -4.]))
>>> F.adjoint(torch.ones(3))                            # conv_transpose
tensor([ 1.,  0.,  0., -1.])
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as fn
from torch import Tensor

from .core import Structured, _as_tensor

__all__ = ["Conv", "Conv1d", "Conv2d", "AvgPool", "AvgPool1d", "AvgPool2d", "AdaptiveAvgPool",
           "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "TokenLinear", "permutation"]

_CONV = {1: fn.conv1d, 2: fn.conv2d, 3: fn.conv3d}
_AVG = {2: (fn.avg_pool2d, torch.ops.aten.avg_pool2d_backward), 3: (fn.avg_pool3d, torch.ops.aten.avg_pool3d_backward)}


def _tuple(v, n: int, what: str) -> tuple[int, ...]:
    t = tuple(int(a) for a in v) if isinstance(v, Sequence) else (int(v),) * n
    if len(t) != n:
        raise ValueError(f"{what} needs {n} value(s), got {v!r}")
    return t


def _like(t: Tensor, x: Tensor) -> Tensor:
    return t if (t.dtype, t.device) == (x.dtype, x.device) else t.to(dtype=x.dtype, device=x.device)


def _batched(x: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, tuple[int, ...]]:
    """``x`` (``(..., prod(shape))``) as ``(N, *shape)`` and the leading shape to restore."""
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, *shape), lead


def _window_indices(out: int, k: int, stride: int, pad: int, dil: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Input position ``(out, k)`` of output position ``o`` and kernel tap ``t``, and whether it is inside."""
    pos = np.arange(out)[:, None] * stride - pad + np.arange(k)[None, :] * dil
    return pos, (pos >= 0) & (pos < size)


class Conv(Structured):
    """An N-d convolution (cross-correlation, as `torch.nn.Conv2d`) on a stalk holding ``in_shape``.

    Parameters
    ----------
    weight : tensor ``(C_out, C_in / groups, *kernel)``
        The kernel; a `torch.nn.Parameter` stays shared and trainable.
    in_shape : ``(C_in, *spatial)`` per-sample input shape
    stride, padding, dilation : int or tuple, as in `torch.nn.functional.conv2d` (zero padding;
        ``padding="same"`` or ``"valid"`` also work when the padding they mean is symmetric)
    groups : int

    The output shape is ``out_shape``; a bias is added by [`Affine`][cellsheaf.maps.Affine] (see [`affine`][cellsheaf.maps.Conv.affine]).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> F = cs.maps.Conv2d(torch.ones(2, 1, 2, 2), in_shape=(1, 3, 3), stride=1)
    >>> F.d_in, F.d_out, F.out_shape
    (9, 8, (2, 2, 2))
    """

    _params = ("in_shape", "stride", "padding", "dilation", "groups")
    _tensors = ("weight",)
    ndim: int | None = None

    def __init__(self, weight, in_shape: Sequence[int], stride=1, padding=0, dilation=1, groups: int = 1):
        self.weight = _as_tensor(weight, "kernel")
        n = self.weight.dim() - 2
        if n not in _CONV or (self.ndim is not None and n != self.ndim):
            want = f"{self.ndim + 2}-d" if self.ndim else "3- to 5-d"
            raise ValueError(f"{type(self).__name__}: the kernel must be {want} (C_out, C_in/groups, *kernel), "
                             f"got shape {tuple(self.weight.shape)}")
        self.in_shape = _tuple(in_shape, n + 1, "in_shape (C_in, *spatial)")
        self.stride, self.dilation = _tuple(stride, n, "stride"), _tuple(dilation, n, "dilation")
        self.groups = int(groups)
        self.kernel = tuple(self.weight.shape[2:])
        self.padding = self._resolve_padding(padding, n)
        c_out, c_in = self.weight.shape[0], self.in_shape[0]
        if c_in % self.groups or c_out % self.groups or self.weight.shape[1] * self.groups != c_in:
            raise ValueError(f"{type(self).__name__}: kernel {tuple(self.weight.shape)} with groups={self.groups} "
                             f"does not fit {c_in} input channels (need C_in = kernel.shape[1] * groups, and "
                             "C_out divisible by groups)")
        spatial = tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
                        zip(self.in_shape[1:], self.padding, self.dilation, self.kernel, self.stride))
        if min(spatial, default=1) < 1:
            raise ValueError(f"{type(self).__name__}: the kernel {self.kernel} (dilation {self.dilation}) does not "
                             f"fit the padded input {self.in_shape[1:]} (padding {self.padding})")
        self.out_shape = (c_out, *spatial)
        self.d_in, self.d_out = math.prod(self.in_shape), math.prod(self.out_shape)

    def _resolve_padding(self, padding, n: int) -> tuple[int, ...]:
        if padding == "valid":
            return (0,) * n
        if padding == "same":
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel)]
            if any(t % 2 for t in total) or any(s != 1 for s in self.stride):
                raise ValueError(f"{type(self).__name__}: padding='same' with kernel {self.kernel} pads unevenly "
                                 "(or needs stride 1); give the padding as integers")
            return tuple(t // 2 for t in total)
        return _tuple(padding, n, "padding")

    def _conv(self, x: Tensor, weight: Tensor) -> Tensor:
        xb, lead = _batched(x, self.in_shape)
        y = _CONV[len(self.kernel)](xb, _like(weight, x), None, self.stride, self.padding, self.dilation, self.groups)
        return y.reshape(*lead, self.d_out)

    def _conv_t(self, y: Tensor, weight: Tensor) -> Tensor:
        """The transposed convolution, as torch's input gradient of the convolution (which only reads the
        input's shape: a broadcast zero stands in for it)."""
        yb, lead = _batched(y, self.out_shape)
        shape = yb.new_zeros(()).expand(yb.shape[0], *self.in_shape)
        x = torch.ops.aten.convolution_backward(yb, shape, _like(weight, y), None, self.stride, self.padding,
                                                self.dilation, False, [0] * len(self.kernel), self.groups,
                                                [True, False, False])[0]
        return x.reshape(*lead, self.d_in)

    def apply(self, x):
        return self._conv(x, self.weight)

    def adjoint(self, y):
        return self._conv_t(y, self.weight)

    def squared_vjp(self, x, d):
        return self._conv_t(d, self.weight * self.weight)

    def coo(self):
        W = self.weight.detach().double().cpu().numpy()
        c_out, c_grp = W.shape[:2]
        n = len(self.kernel)
        axes = 2 + 2 * n  # (o, c, out_1, k_1, ..., out_n, k_n)

        def along(a: np.ndarray, axis: int) -> np.ndarray:
            shape = [1] * axes
            shape[axis] = -1
            return a.reshape(shape)

        o, c = along(np.arange(c_out), 0), along(np.arange(c_grp), 1)
        row, col, inside = o, (o // (c_out // self.groups)) * c_grp + c, np.ones([1] * axes, dtype=bool)
        for j in range(n):
            pos, ok = _window_indices(self.out_shape[1 + j], self.kernel[j], self.stride[j], self.padding[j],
                                      self.dilation[j], self.in_shape[1 + j])
            shape = [1] * axes
            shape[2 + 2 * j], shape[3 + 2 * j] = pos.shape
            row = row * self.out_shape[1 + j] + along(np.arange(self.out_shape[1 + j]), 2 + 2 * j)
            col = col * self.in_shape[1 + j] + pos.reshape(shape)
            inside = inside & ok.reshape(shape)
        shape = [c_out, c_grp] + [v for k in self.kernel for v in (1, k)]
        val = W.reshape(shape)
        full = np.broadcast_shapes(row.shape, col.shape, inside.shape, val.shape)
        row, col, inside, val = (np.broadcast_to(a, full) for a in (row, col, inside, val))
        keep = inside & (val != 0)
        return row[keep], col[keep], val[keep]

    def matrix(self):
        r, c, v = self.coo()
        M = torch.zeros(self.d_out, self.d_in, dtype=torch.float64)
        M.index_put_((torch.as_tensor(r), torch.as_tensor(c)), torch.as_tensor(v), accumulate=True)
        return M.to(dtype=self.weight.dtype, device=self.weight.device)

    def affine(self, bias=None, **kw):
        """This convolution with a per-channel ``bias`` ``(C_out,)`` as an [`Affine`][cellsheaf.maps.Affine] map ``(conv | diag b)``."""
        from .affine import Affine

        return Affine(self, bias, shape=self.out_shape, axis=0, **kw)


class Conv1d(Conv):
    """[`Conv`][cellsheaf.maps.Conv] on ``(C, L)`` stalks (as `torch.nn.Conv1d`, zero padding)."""

    ndim = 1


class Conv2d(Conv):
    """[`Conv`][cellsheaf.maps.Conv] on ``(C, H, W)`` stalks (as `torch.nn.Conv2d`, zero padding)."""

    ndim = 2


class AvgPool(Structured):
    """N-d average pooling (as `torch.nn.AvgPool2d`, ``ceil_mode=False``) on a stalk holding ``in_shape``.

    A depthwise sum over each window divided by the window size (``count_include_pad=True``)
    or by the number of input positions it covers (``False``). [`apply`][cellsheaf.maps.Map.apply] and [`adjoint`][cellsheaf.maps.Map.adjoint] run torch's
    average pooling and its backward; [`coo`][cellsheaf.maps.Map.coo] comes from the depthwise sum.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> P = cs.maps.AvgPool1d(2, in_shape=(1, 4))
    >>> P.apply(torch.tensor([1.0, 3.0, 5.0, 7.0])), P.adjoint(torch.ones(2))
    (tensor([2., 6.]), tensor([0.5000, 0.5000, 0.5000, 0.5000]))
    """

    _params = ("kernel", "in_shape", "stride", "padding", "count_include_pad")
    ndim: int | None = None

    def __init__(self, kernel, in_shape: Sequence[int], stride=None, padding=0, count_include_pad: bool = True):
        n = len(in_shape) - 1
        if n not in _CONV or (self.ndim is not None and n != self.ndim):
            raise ValueError(f"{type(self).__name__}: in_shape must be (C, *spatial) with "
                             f"{self.ndim or '1 to 3'} spatial dims, got {tuple(in_shape)}")
        self.kernel = _tuple(kernel, n, "kernel")
        self.stride = self.kernel if stride is None else _tuple(stride, n, "stride")
        self.padding = _tuple(padding, n, "padding")
        if any(2 * p > k for p, k in zip(self.padding, self.kernel)):
            raise ValueError(f"{type(self).__name__}: padding {self.padding} must be at most half the kernel "
                             f"{self.kernel} (as in torch)")
        self.in_shape, self.count_include_pad = tuple(int(s) for s in in_shape), bool(count_include_pad)
        C = self.in_shape[0]
        self._sum = Conv(torch.ones(C, 1, *self.kernel, dtype=torch.float64), self.in_shape, self.stride,
                         self.padding, 1, C)
        self.out_shape, self.d_in, self.d_out = self._sum.out_shape, self._sum.d_in, self._sum.d_out
        counts = [np.full(o, k) if self.count_include_pad else
                  _window_indices(o, k, s, p, 1, size)[1].sum(1)
                  for o, k, s, p, size in zip(self.out_shape[1:], self.kernel, self.stride, self.padding,
                                              self.in_shape[1:])]
        div = np.ones(())
        for c in counts:
            div = np.multiply.outer(div, c)
        self._div = torch.as_tensor(np.broadcast_to(div, self.out_shape).reshape(-1).astype(np.float64))

    def _windows(self) -> tuple[tuple[int, ...], ...]:
        """Kernel, stride and padding, a 1-d pooling lifted to 2-d (torch has no 1-d pooling backward)."""
        if len(self.kernel) == 1:
            return (1, *self.kernel), (1, *self.stride), (0, *self.padding)
        return self.kernel, self.stride, self.padding

    def _lifted(self, t: Tensor, shape) -> tuple[Tensor, tuple[int, ...]]:
        tb, lead = _batched(t, shape)
        return (tb.unsqueeze(2) if len(self.kernel) == 1 else tb), lead

    def apply(self, x):
        xb, lead = self._lifted(x, self.in_shape)
        y = _AVG[xb.dim() - 2][0](xb, *self._windows(), False, self.count_include_pad)
        return y.reshape(*lead, self.d_out)

    def adjoint(self, y):
        yb, lead = self._lifted(y, self.out_shape)
        spatial = (1, *self.in_shape[1:]) if len(self.kernel) == 1 else self.in_shape[1:]
        shape = yb.new_zeros(()).expand(yb.shape[0], self.in_shape[0], *spatial)  # only its shape is read
        x = _AVG[yb.dim() - 2][1](yb, shape, *self._windows(), False, self.count_include_pad, None)
        return x.reshape(*lead, self.d_in)

    def squared_vjp(self, x, d):
        return self.adjoint(d / _like(self._div, d))  # every entry of a row is 1 / divisor

    def coo(self):
        r, c, v = self._sum.coo()
        return r, c, v / self._div.numpy()[r]

    def matrix(self):
        return self._sum.matrix() / self._div[:, None]


class AvgPool1d(AvgPool):
    """[`AvgPool`][cellsheaf.maps.AvgPool] on ``(C, L)`` stalks (as `torch.nn.AvgPool1d`)."""

    ndim = 1


class AvgPool2d(AvgPool):
    """[`AvgPool`][cellsheaf.maps.AvgPool] on ``(C, H, W)`` stalks (as `torch.nn.AvgPool2d`)."""

    ndim = 2


def _adaptive_matrix(size: int, out: int) -> Tensor:
    """``(out, size)`` averaging matrix of adaptive pooling: window ``[⌊i·size/out⌋, ⌈(i+1)·size/out⌉)``."""
    P = torch.zeros(out, size, dtype=torch.float64)
    for i in range(out):
        a, b = (i * size) // out, -((-(i + 1) * size) // out)
        P[i, a:b] = 1.0 / (b - a)
    return P


class AdaptiveAvgPool(Structured):
    """Adaptive average pooling (as `torch.nn.AdaptiveAvgPool2d`) to ``output_size`` on ``in_shape`` stalks.

    Separable: one small averaging matrix per spatial axis, applied along that axis.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> P = cs.maps.AdaptiveAvgPool2d(1, in_shape=(2, 2, 2))      # global average pooling
    >>> P.apply(torch.arange(8.0))
    tensor([1.5000, 5.5000])
    """

    _params = ("output_size", "in_shape")
    ndim: int | None = None

    def __init__(self, output_size, in_shape: Sequence[int]):
        n = len(in_shape) - 1
        if n < 1 or (self.ndim is not None and n != self.ndim):
            raise ValueError(f"{type(self).__name__}: in_shape must be (C, *spatial) with {self.ndim or 'some'} "
                             f"spatial dims, got {tuple(in_shape)}")
        self.in_shape = tuple(int(s) for s in in_shape)
        sizes = output_size if isinstance(output_size, Sequence) else (output_size,) * n
        if len(sizes) != n:
            raise ValueError(f"{type(self).__name__}: output_size {output_size!r} needs {n} value(s)")
        self.output_size = tuple(None if o is None else int(o) for o in sizes)
        spatial = tuple(s if o is None else o for o, s in zip(self.output_size, self.in_shape[1:]))
        if min(spatial) < 1:
            raise ValueError(f"{type(self).__name__}: output_size must be positive, got {output_size!r}")
        self.out_shape = (self.in_shape[0], *spatial)
        self.d_in, self.d_out = math.prod(self.in_shape), math.prod(self.out_shape)
        self._mats = [_adaptive_matrix(s, o) for s, o in zip(self.in_shape[1:], spatial)]

    def _along(self, x: Tensor, shape, mats, transpose: bool) -> Tensor:
        xb, lead = _batched(x, shape)
        for j, P in enumerate(mats):
            P = _like(P, x)
            xb = (xb.movedim(2 + j, -1) @ (P if transpose else P.T)).movedim(-1, 2 + j)
        return xb.reshape(*lead, -1)

    def apply(self, x):
        return self._along(x, self.in_shape, self._mats, False)

    def adjoint(self, y):
        return self._along(y, self.out_shape, self._mats, True)

    def squared_vjp(self, x, d):
        return self._along(d, self.out_shape, [P * P for P in self._mats], True)

    def matrix(self):
        M = torch.eye(self.in_shape[0], dtype=torch.float64)
        for P in self._mats:
            M = torch.kron(M, P)
        return M

    def coo(self):
        M = self.matrix().numpy()
        r, c = np.nonzero(M)  # pooled maps are small (global pooling to a few outputs)
        return r, c, M[r, c]


class AdaptiveAvgPool1d(AdaptiveAvgPool):
    """[`AdaptiveAvgPool`][cellsheaf.maps.AdaptiveAvgPool] on ``(C, L)`` stalks."""

    ndim = 1


class AdaptiveAvgPool2d(AdaptiveAvgPool):
    """[`AdaptiveAvgPool`][cellsheaf.maps.AdaptiveAvgPool] on ``(C, H, W)`` stalks."""

    ndim = 2


class TokenLinear(Structured):
    """The same linear map on every token: ``(T, D_in) -> (T, D_out)``, ``x_t -> W x_t`` (``I_T ⊗ W``).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> F = cs.maps.TokenLinear(torch.tensor([[1.0, 1.0]]), tokens=3)
    >>> F.d_in, F.d_out, F.apply(torch.arange(6.0))
    (6, 3, tensor([1., 5., 9.]))
    """

    _params = ("tokens",)
    _tensors = ("weight",)

    def __init__(self, weight, tokens: int):
        self.weight = _as_tensor(weight, "weight")
        if self.weight.dim() != 2:
            raise ValueError(f"TokenLinear needs a 2-d weight (D_out, D_in), got shape {tuple(self.weight.shape)}")
        self.tokens = int(tokens)
        d_out, d_in = self.weight.shape
        self.in_shape, self.out_shape = (self.tokens, d_in), (self.tokens, d_out)
        self.d_in, self.d_out = self.tokens * d_in, self.tokens * d_out

    def _tokens(self, x: Tensor, shape, M: Tensor) -> Tensor:
        xb, lead = _batched(x, shape)
        return (xb @ _like(M, x)).reshape(*lead, -1)

    def apply(self, x):
        return self._tokens(x, self.in_shape, self.weight.T)

    def adjoint(self, y):
        return self._tokens(y, self.out_shape, self.weight)

    def squared_vjp(self, x, d):
        return self._tokens(d, self.out_shape, self.weight * self.weight)

    def parameter_vjp(self, x, w):
        """``Σ_t w_t x_tᵀ`` over the batch and the tokens: one matrix product."""
        d_out, d_in = self.weight.shape
        return [w.reshape(-1, d_out).T @ x.reshape(-1, d_in).to(w.dtype)]

    def coo(self):
        W = self.weight.detach().double().cpu().numpy()
        r, c = np.nonzero(W)
        t = np.arange(self.tokens)[:, None]
        rows, cols = (t * W.shape[0] + r).reshape(-1), (t * W.shape[1] + c).reshape(-1)
        return rows, cols, np.tile(W[r, c], self.tokens)

    def matrix(self):
        return torch.kron(torch.eye(self.tokens, dtype=self.weight.dtype, device=self.weight.device), self.weight)


def permutation(shape: Sequence[int], dims: Sequence[int]):
    """The [`Select`][cellsheaf.maps.Select] map that permutes the axes of a per-sample ``shape`` (``x.permute(dims)``, flattened).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> cs.maps.permutation((2, 3), (1, 0)).apply(torch.arange(6.0))     # a transpose
    tensor([0., 3., 1., 4., 2., 5.])
    """
    from .core import Select

    n = math.prod(shape)
    return Select(torch.arange(n).reshape(*shape).permute(*dims).reshape(-1), n)
