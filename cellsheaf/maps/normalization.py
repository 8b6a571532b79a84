"""Normalisations on a stalk: LayerNorm, RMSNorm, GroupNorm, and softmax / log-softmax along an axis.

The stalk is flat; the per-sample ``shape`` it holds is a parameter of the map.
Each map is nonlinear: [`apply`][cellsheaf.maps.Map.apply] runs the torch function, and [`jvp`][cellsheaf.maps.Map.jvp]/[`vjp`][cellsheaf.maps.Map.vjp] are
exact derivatives (closed forms for softmax, forward/reverse autograd through
`torch.func` for the norms). Affine weights and biases of the norms may be
`torch.nn.Parameter`s, shared and learned like any map tensor.

Examples
--------
>>> import torch, cellsheaf as cs
>>> F = cs.maps.LayerNorm((2, 3), normalized_shape=(3,))   # each of 2 tokens normalised
>>> y = F.apply(torch.arange(6.0))
>>> torch.allclose(y.reshape(2, 3).mean(-1), torch.zeros(2), atol=1e-6)
True
>>> cs.maps.SoftmaxAlong((2, 2), dim=0).apply(torch.zeros(4))
tensor([0.5000, 0.5000, 0.5000, 0.5000])
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as fn
from torch import Tensor

from .core import Structured, _as_tensor, _Autodiff

__all__ = ["ShapedMap", "LayerNorm", "RMSNorm", "GroupNorm", "SoftmaxAlong"]


def _optional(t, what: str) -> Tensor | None:
    return None if t is None else _as_tensor(t, what)


def _like(t: Tensor | None, x: Tensor) -> Tensor | None:
    if t is None:
        return None
    return t if (t.dtype, t.device) == (x.dtype, x.device) else t.to(dtype=x.dtype, device=x.device)


class ShapedMap(_Autodiff, Structured):
    """A nonlinear map of a stalk that holds a per-sample ``shape``, given by [`forward`][cellsheaf.maps.ShapedMap.forward] on ``(N, *shape)``
    tensors; [`jvp`][cellsheaf.maps.Map.jvp], [`vjp`][cellsheaf.maps.Map.vjp] and [`jacobian`][cellsheaf.maps.Map.jacobian] are exact, by autograd."""

    _params = ("shape",)

    def __init__(self, shape: Sequence[int], out_shape: Sequence[int] | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.out_shape = self.shape if out_shape is None else tuple(int(s) for s in out_shape)
        self.d_in, self.d_out = math.prod(self.shape), math.prod(self.out_shape)

    def forward(self, x: Tensor) -> Tensor:
        """The map on ``(N, *shape)``, returning ``(N, *out_shape)``."""
        raise NotImplementedError

    def apply(self, x):
        lead = x.shape[:-1]
        return self.forward(x.reshape(-1, *self.shape)).reshape(*lead, self.d_out)


class LayerNorm(ShapedMap):
    """`torch.nn.LayerNorm` over the trailing ``normalized_shape`` of ``shape``, with optional affine
    ``weight`` and ``bias`` (of ``normalized_shape``).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> ln = torch.nn.LayerNorm(4)
    >>> F = cs.maps.LayerNorm((4,), (4,), ln.weight, ln.bias, ln.eps)
    >>> x = torch.randn(3, 4)
    >>> torch.allclose(F.apply(x), ln(x))
    True
    """

    _params = ("shape", "normalized_shape", "eps")
    _tensors = ("weight", "bias")

    def __init__(self, shape, normalized_shape=None, weight=None, bias=None, eps: float = 1e-5):
        super().__init__(shape)
        ns = self.shape[-1:] if normalized_shape is None else normalized_shape
        self.normalized_shape = (int(ns),) if isinstance(ns, int) else tuple(int(s) for s in ns)
        if self.shape[len(self.shape) - len(self.normalized_shape):] != self.normalized_shape:
            raise ValueError(f"{type(self).__name__}: normalized_shape {self.normalized_shape} must be the trailing "
                             f"dims of the stalk shape {self.shape}")
        self.weight, self.bias, self.eps = _optional(weight, "weight"), _optional(bias, "bias"), float(eps)
        for what, t in (("weight", self.weight), ("bias", self.bias)):
            if t is not None and tuple(t.shape) != self.normalized_shape:
                raise ValueError(f"{type(self).__name__}: {what} has shape {tuple(t.shape)}, expected "
                                 f"{self.normalized_shape}")

    def forward(self, x):
        return fn.layer_norm(x, self.normalized_shape, _like(self.weight, x), _like(self.bias, x), self.eps)


class RMSNorm(LayerNorm):
    """`torch.nn.RMSNorm` over the trailing ``normalized_shape`` of ``shape``, with optional ``weight``
    (``eps=None`` is torch's default, the dtype's machine epsilon). ``bias`` must be None."""

    def __init__(self, shape, normalized_shape=None, weight=None, bias=None, eps: float | None = None):
        if bias is not None:
            raise ValueError("RMSNorm has no bias (torch.nn.RMSNorm); add one with an Affine map")
        super().__init__(shape, normalized_shape, weight, None, 0.0 if eps is None else eps)
        self.eps = None if eps is None else float(eps)

    def forward(self, x):
        return fn.rms_norm(x, self.normalized_shape, _like(self.weight, x), self.eps)


class GroupNorm(ShapedMap):
    """`torch.nn.GroupNorm` with ``num_groups`` on a stalk of ``shape = (C, *spatial)``, with optional
    per-channel ``weight`` and ``bias``."""

    _params = ("shape", "num_groups", "eps")
    _tensors = ("weight", "bias")

    def __init__(self, shape, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
        super().__init__(shape)
        self.num_groups, self.eps = int(num_groups), float(eps)
        if self.shape[0] % self.num_groups:
            raise ValueError(f"GroupNorm: {self.shape[0]} channels do not split into {self.num_groups} groups")
        self.weight, self.bias = _optional(weight, "weight"), _optional(bias, "bias")
        for what, t in (("weight", self.weight), ("bias", self.bias)):
            if t is not None and tuple(t.shape) != self.shape[:1]:
                raise ValueError(f"GroupNorm: {what} has shape {tuple(t.shape)}, expected ({self.shape[0]},)")

    def forward(self, x):
        return fn.group_norm(x, self.num_groups, _like(self.weight, x), _like(self.bias, x), self.eps)


class SoftmaxAlong(ShapedMap):
    """Softmax (or log-softmax with ``log=True``) along axis ``dim`` of the per-sample ``shape``.

    Closed-form derivatives: ``J v = p ⊙ (v − Σ_dim p v)`` (symmetric), and for log-softmax
    ``J v = v − Σ_dim p v``, ``Jᵀ w = w − p Σ_dim w``.
    """

    _params = ("shape", "dim", "log")

    def __init__(self, shape, dim: int = -1, log: bool = False):
        super().__init__(shape)
        if not -len(self.shape) <= int(dim) < len(self.shape):
            raise ValueError(f"SoftmaxAlong: dim {dim} is not an axis of the shape {self.shape}")
        self.dim, self.log = int(dim), bool(log)
        self._axis = 1 + self.dim % len(self.shape)  # the axis in (N, *shape)

    def forward(self, x):
        return (torch.log_softmax if self.log else torch.softmax)(x, self._axis)

    def _both(self, x, u):
        lead = x.shape[:-1]
        xb, ub = x.reshape(-1, *self.shape), u.reshape(-1, *self.shape)
        return lead, torch.softmax(xb, self._axis), ub

    def jvp(self, x, v):
        lead, p, vb = self._both(x, v)
        s = vb - (p * vb).sum(self._axis, keepdim=True)
        return (s if self.log else p * s).reshape(*lead, self.d_out)

    def vjp(self, x, w):
        lead, p, wb = self._both(x, w)
        out = wb - p * wb.sum(self._axis, keepdim=True) if self.log else p * (wb - (p * wb).sum(self._axis,
                                                                                                    keepdim=True))
        return out.reshape(*lead, self.d_in)
