"""The extended affine map ``(A | diag b)`` of the paper's extended stalks (Eq. 10).

A vertex stalk ``[x; 1]`` carries the neural block ``x`` and a block of stubborn
ones; the weight edge reads it through ``(A | diag b)``, i.e. ``A·x + b ⊙ 1``.
[`Affine`][cellsheaf.maps.Affine] keeps that structure: ``A`` is any linear map (dense, sparse,
convolution, pooling, ...) applied as an operator, the bias is a vector, and
no dense matrix is built unless [`matrix`][cellsheaf.maps.Map.matrix] is asked for.

Examples
--------
>>> import torch, cellsheaf as cs
>>> F = cs.maps.Affine(torch.tensor([[1.0, 2.0]]), torch.tensor([10.0]))
>>> F.d_in, F.d_out                      # stalk [x_1, x_2, 1] -> R^1
(3, 1)
>>> F.apply(torch.tensor([1.0, 1.0, 1.0]))
tensor([13.])
>>> F.matrix()
tensor([[ 1.,  2., 10.]])
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .core import Linear, Structured, _as_tensor, _broadcast_view, as_map

__all__ = ["Affine"]


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` in the dtype and on the device of ``x`` (itself when it already is)."""
    return t if (t.dtype, t.device) == (x.dtype, x.device) else t.to(dtype=x.dtype, device=x.device)


class Affine(Structured):
    """``(A | diag b)`` on a stalk ``[x; ...; 1; ...]``: ``A·x + b ⊙ ones``, linear in the whole stalk.

    Parameters
    ----------
    A : map or matrix
        The linear part on the leading block ``x`` (its first ``A.d_in`` coordinates):
        a tensor or any linear [`Map`][cellsheaf.maps.Map] (e.g. [`Conv2d`][cellsheaf.maps.Conv2d]); it is applied, never densified.
    b : tensor, optional
        The bias, read through the ones block: ``(A.d_out,)``, or one value per
        feature along ``axis`` of the output ``shape`` (a conv bias ``(C,)`` on
        ``(C, H, W)`` with ``axis=0``, a token bias ``(D,)`` on ``(T, D)``), broadcast
        inside [`apply`][cellsheaf.maps.Map.apply] so that a `torch.nn.Parameter` stays the tensor that learns.
        Without it the map is ``(A | 0)``.
    d_in : int, optional
        The stalk dimension (default: ``A.d_in``, plus ``A.d_out`` with a bias).
    ones : int, optional
        Where the ones block (``A.d_out`` coordinates) starts in the stalk
        (default: right after ``x``). Coordinates of the stalk outside ``x`` and
        the ones block are read with zero coefficients.
    shape, axis : per-sample output shape and the axis ``b`` runs along
        (default ``A.out_shape`` when ``A`` has one, else ``(A.d_out,)``; ``axis=-1``).
        A bias of another shape that broadcasts to ``shape`` (as torch broadcasts, e.g. one value) is
        broadcast likewise.
    center : tensor ``(A.d_in,)``, optional
        A constant the neural block is centred at: the map is ``A·(x − c) + b``, i.e. the bias read
        through the ones block is ``b − A·c`` (an eval-mode batch norm: ``c`` its running mean),
        recomputed from ``A`` and ``b`` whenever they change.

    Notes
    -----
    ``apply`` is exact for any stalk value; [`apply_affine`][cellsheaf.maps.Affine.apply_affine] takes the neural block
    alone and adds ``b`` as the ones block would (``A·x + b``, one ``addmm`` for a
    dense ``A``), for solvers that know the ones are ones.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> F = cs.maps.Affine(torch.eye(2), torch.tensor([1.0, -1.0]), d_in=5, ones=3)
    >>> F.adjoint(torch.tensor([1.0, 2.0]))
    tensor([ 1.,  2.,  0.,  1., -2.])
    >>> F.apply_affine(torch.zeros(2))
    tensor([ 1., -1.])
    >>> G = cs.maps.Affine(torch.eye(4), torch.tensor([1.0, 2.0]), shape=(2, 2), axis=0)  # one value per row
    >>> G.bias()
    tensor([1., 1., 2., 2.])
    """

    _params = ("d_in", "ones", "shape", "axis")
    _tensors = ("b", "center")
    _maps = ("A",)

    def __init__(self, A, b=None, d_in: int | None = None, ones: int | None = None,
                 shape: tuple[int, ...] | None = None, axis: int = -1, center=None):
        self.A = as_map(A)
        if not self.A.linear:
            raise ValueError(f"Affine needs a linear A, got the nonlinear {self.A!r}; compose the nonlinearity "
                             "after the affine map instead")
        n, m = self.A.d_in, self.A.d_out
        self.shape = tuple(int(k) for k in (shape if shape is not None else getattr(self.A, "out_shape", (m,))))
        if math.prod(self.shape) != m:
            raise ValueError(f"Affine: output shape {self.shape} does not hold A.d_out={m} values")
        self.axis = int(axis)
        self.b = None if b is None else _as_tensor(b, "bias")
        if self.b is not None and self.b.numel() != m and _broadcast_view(self.b, self.shape, self.axis) is None:
            raise ValueError(f"Affine: the bias has shape {tuple(self.b.shape)}; expected ({m},) (A.d_out), one value "
                             f"per entry of axis {self.axis} of the output shape {self.shape}, or a shape that "
                             "broadcasts to it")
        self.center = None if center is None else _as_tensor(center, "center")
        if self.center is not None and (self.b is None or self.center.shape != (n,)):
            raise ValueError(f"Affine: a center needs a bias and shape ({n},) (A.d_in), got "
                             f"{tuple(self.center.shape)}{'' if self.b is not None else ' without a bias'}")
        if self.b is None and ones is not None:
            raise ValueError("Affine: a ones block (ones=...) needs a bias b")
        self.ones = None if self.b is None else int(n if ones is None else ones)
        end = n if self.ones is None else max(n, self.ones + m)
        self.d_in, self.d_out = int(end if d_in is None else d_in), m
        if self.ones is not None and not (n <= self.ones and self.ones + m <= self.d_in):
            raise ValueError(f"Affine: the ones block [{self.ones}, {self.ones + m}) must lie after x "
                             f"(first {n} coordinates) within the stalk of dim {self.d_in}")
        if self.d_in < n:
            raise ValueError(f"Affine: stalk dim d_in={self.d_in} is smaller than A.d_in={n}")
        # the paper's W̄ = (W | diag b) on a stalk [x; 1] exactly: products take one kernel each
        self._plain = isinstance(self.A, Linear) and not self.A.sparse and self.A.mask is None and \
            self.b is not None and self.b.shape == (m,) and self.center is None and self.d_in == n + m

    @property
    def block(self) -> slice | None:
        """The ones block of the stalk, or None without a bias."""
        return None if self.ones is None else slice(self.ones, self.ones + self.d_out)

    def bias(self, like: Tensor | None = None) -> Tensor | None:
        """The full bias ``(d_out,)`` (broadcast along ``axis``), in the dtype/device of ``like``."""
        if self.b is None:
            return None
        b = self.b if like is None else _like(self.b, like)
        if b.numel() == self.d_out:
            full = b.reshape(-1)
        else:
            full = b.reshape(_broadcast_view(b, self.shape, self.axis)).expand(self.shape).reshape(-1)
        if self.center is None:
            return full
        return full - self.A.apply(self.center if like is None else _like(self.center, like))

    def _neural(self, x: Tensor) -> Tensor:
        return x if self.A.d_in == self.d_in else x[..., :self.A.d_in]

    def apply_affine(self, x: Tensor) -> Tensor:
        """``A·x + b`` for the neural block ``x`` alone (``(..., A.d_in)``): the map with its ones block at 1."""
        if self.b is None:
            return self.A.apply(x)
        b = self.bias(x)
        if isinstance(self.A, Linear) and not self.A.sparse and x.dim() == 2:
            return torch.addmm(b, x, _like(self.A.weight, x).T)
        return self.A.apply(x) + b

    def apply(self, x):
        if self._plain:
            n = self.A.d_in
            return torch.addcmul(x[..., :n] @ _like(self.A.weight, x).T, _like(self.b, x), x[..., n:])
        y = self.A.apply(self._neural(x))
        return y if self.b is None else torch.addcmul(y, self.bias(x), x[..., self.block])

    def adjoint(self, y):
        if self._plain:
            return torch.cat([y @ _like(self.A.weight, y), y * _like(self.b, y)], -1)
        z = self.A.adjoint(y)
        if self.d_in == self.A.d_in:
            return z
        out = y.new_zeros(*y.shape[:-1], self.d_in)
        out[..., :self.A.d_in] = z
        if self.b is not None:
            out[..., self.block] = self.bias(y) * y
        return out

    def parameter_vjp(self, x, w):
        """``[∂/∂b, ∂/∂A's tensors]`` of ``⟨w, A·x + b ⊙ ones⟩``: ``A``'s own closed form on the neural block
        (``wᵀ x`` for a dense ``A``: one matrix product on the neural block alone, as backprop's weight
        gradient) and ``Σ w ⊙ ones`` summed down to the bias's shape (one elementwise product and a sum,
        not a product with the ones block's ``d_out`` columns).
        ``None`` with a ``center`` or an ``A`` without a closed form."""
        inner = self.A.parameter_vjp(self._neural(x), w)
        if inner is None or self.center is not None:
            return None
        if self.b is None:
            return inner
        wb = w * x[..., self.block]
        gb = wb.sum(0) if wb.dim() == 2 else wb.reshape(-1, self.d_out).sum(0)
        if self.b.numel() != self.d_out:
            view = _broadcast_view(self.b, self.shape, self.axis)
            gb = gb.reshape(self.shape).sum_to_size([self.b.numel() if k == -1 else k for k in view])
        return [gb if gb.shape == self.b.shape else gb.reshape(self.b.shape)] + inner

    def free_part(self, fixed):
        """``(A, neural block)`` when every coordinate of the stalk outside the neural block is fixed (the ones
        block: the map's derivative on the free coordinates is ``A``'s)."""
        n = self.A.d_in
        if n == self.d_in or not bool(np.all(fixed[n:])):
            return None
        return self.A, slice(0, n)

    def squared_vjp(self, x, d):
        z = self.A.squared_vjp(self._neural(x), d)
        if self.d_in == self.A.d_in:
            return z
        out = d.new_zeros(*d.shape[:-1], self.d_in)
        out[..., :self.A.d_in] = z
        if self.b is not None:
            out[..., self.block] = self.bias(d) ** 2 * d
        return out

    def matrix(self):
        A = self.A.matrix()
        dtype = A.dtype if self.b is None else torch.promote_types(A.dtype, self.b.dtype)
        M = torch.zeros(self.d_out, self.d_in, dtype=dtype, device=A.device)
        M[:, :self.A.d_in] = A
        if self.b is not None:
            M[:, self.block] = torch.diag(self.bias().to(dtype=dtype, device=A.device))
        return M

    def coo(self):
        r, c, v = self.A.coo()
        if self.b is None:
            return r, c, v
        b = self.bias().detach().double().cpu().numpy()
        k = np.nonzero(b)[0]
        return np.concatenate([r, k]), np.concatenate([c, self.ones + k]), np.concatenate([v, b[k]])
