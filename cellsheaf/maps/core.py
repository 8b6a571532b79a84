"""The map interface and the basic maps: linear, structured and nonlinear (state-dependent).

Every map acts on the last axis of a batch ``(..., d_in) -> (..., d_out)`` and
knows its *local adjoint*: the transposed Jacobian at a point (Sec. 4.2 of the
paper). Linear maps ignore the point. Structured maps (identity, selection,
diagonal, scaled identity) never materialise a dense matrix.

Examples
--------
>>> import torch, cellsheaf as cs
>>> F = cs.maps.Select([0, 2], 3)
>>> F.apply(torch.tensor([1.0, 2.0, 3.0]))
tensor([1., 3.])
>>> cs.maps.ReLU(2).vjp(torch.tensor([-1.0, 2.0]), torch.ones(2))
tensor([0., 1.])
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

__all__ = [
    "Map", "Linear", "Identity", "Scaled", "Select", "Diagonal", "HStack", "VStack",
    "Compose", "Elementwise", "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "Softmax",
    "Function", "as_map",
]


def _as_tensor(M, name: str = "matrix") -> Tensor:
    if isinstance(M, Tensor):
        return M
    if isinstance(M, (np.ndarray, list, tuple)) or (np.isscalar(M) and not isinstance(M, (str, bytes))):
        return torch.as_tensor(np.asarray(M, dtype=np.float64))
    try:
        import scipy.sparse as sp

        if sp.issparse(M):
            coo = M.tocoo()
            idx = torch.as_tensor(np.vstack([coo.row, coo.col]), dtype=torch.long)
            return torch.sparse_coo_tensor(idx, torch.as_tensor(coo.data), coo.shape, check_invariants=True).coalesce()
    except ImportError:  # pragma: no cover - scipy is a dependency
        pass
    raise TypeError(f"cannot use {type(M).__name__} as a {name}; give a torch tensor or numpy array")


class Map:
    """Base class of restriction maps ``R^{d_in} -> R^{d_out}``.

    Subclasses implement [`apply`][cellsheaf.maps.Map.apply] and, if nonlinear, [`vjp`][cellsheaf.maps.Map.vjp] and
    [`jvp`][cellsheaf.maps.Map.jvp]; linear ones implement [`adjoint`][cellsheaf.maps.Map.adjoint] and [`matrix`][cellsheaf.maps.Map.matrix].
    """

    d_in: int
    d_out: int
    linear: bool = True

    def apply(self, x: Tensor) -> Tensor:
        """Apply the map to ``x`` of shape ``(..., d_in)``."""
        raise NotImplementedError

    def adjoint(self, y: Tensor) -> Tensor:
        """Apply the transpose of a linear map to ``y`` of shape ``(..., d_out)``."""
        raise NotImplementedError(f"{type(self).__name__} is nonlinear: use vjp(x, y) at a point x")

    def matrix(self) -> Tensor:
        """Dense ``(d_out, d_in)`` matrix of a linear map."""
        raise NotImplementedError(f"{type(self).__name__} is nonlinear: use jacobian(x) or linearize(x)")

    def jvp(self, x: Tensor, v: Tensor) -> Tensor:
        """Jacobian-vector product ``J(x) v``."""
        return self.apply(v)

    def vjp(self, x: Tensor, w: Tensor) -> Tensor:
        """Local adjoint ``J(x)^T w`` (the transposed Jacobian at ``x``)."""
        return self.adjoint(w)

    def jacobian(self, x: Tensor) -> Tensor:
        """Jacobian at ``x``: ``(..., d_out, d_in)`` for ``x`` of shape ``(..., d_in)``."""
        M = self.matrix().to(dtype=x.dtype, device=x.device)
        return M.expand(*x.shape[:-1], self.d_out, self.d_in)

    def linearize(self, x: Tensor | None = None) -> "Map":
        """The linear map ``J(x)`` at a single point ``x`` of shape ``(d_in,)``."""
        return self

    def squared_vjp(self, x: Tensor, d: Tensor) -> Tensor:
        """``Σ_k d_k J(x)[k, i]²`` for every input coordinate ``i``, batched over rows: the map's share of a
        Gauss–Newton diagonal. Structured maps compute it without a matrix (a convolution with its squared
        kernel, an elementwise map with its squared derivative).

        Examples
        --------
        >>> import torch, cellsheaf as cs
        >>> cs.maps.Linear(torch.tensor([[1.0, -2.0]])).squared_vjp(torch.zeros(2), torch.tensor([3.0]))
        tensor([ 3., 12.])
        """
        if self.linear:
            M = self.matrix().to(dtype=d.dtype, device=d.device)
            return d @ (M * M)
        J = self.jacobian(x)
        return torch.einsum("...k,...ki->...i", d, J * J)

    def parameter_vjp(self, x: Tensor, w: Tensor) -> list[Tensor | None] | None:
        """The gradient of ``⟨w, F(x)⟩`` (summed over the batch rows) with respect to each of
        [`tensors`][cellsheaf.maps.Map.tensors], in closed form: a list aligned with them (``None`` for a
        tensor the map reads as a constant), or ``None`` when the map has no closed form (the local
        learning rule, [`cellsheaf.learning.local_gradients`][cellsheaf.learning.local_gradients], then uses
        autograd). A dense [`Linear`][cellsheaf.maps.Linear] gives ``wᵀ x`` (Eq. 24 of the paper), masked
        by its ``mask``.

        Examples
        --------
        >>> import torch, cellsheaf as cs
        >>> F = cs.maps.Linear(torch.zeros(1, 2))
        >>> F.parameter_vjp(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]]))
        [tensor([[3., 6.]])]
        """
        return [] if not self.tensors() else None

    def free_part(self, fixed: np.ndarray) -> tuple["Map", slice] | None:
        """``(G, cols)`` when the derivative of the map with respect to the coordinates that are not
        ``fixed`` (a boolean mask over its stalk) is that of ``G`` on the consecutive coordinates ``cols``
        of the stalk, and nothing else reads them: the sweeps along a propagation order
        ([`cellsheaf.gauss_newton.transposed_sweep`][cellsheaf.gauss_newton.transposed_sweep]) then apply
        ``G`` alone (an affine map ``(A | diag b)`` with its ones block fixed: ``A`` on the neural block).
        ``None`` (the default): the whole map.

        Examples
        --------
        >>> import numpy as np, torch, cellsheaf as cs
        >>> F = cs.maps.Affine(torch.eye(2), torch.ones(2))           # stalk [x_1, x_2, 1, 1]
        >>> G, cols = F.free_part(np.array([False, False, True, True]))
        >>> G is F.A, cols
        (True, slice(0, 2, None))
        """
        return None

    def coo(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nonzero entries ``(rows, cols, values)`` of a linear map (numpy, float64)."""
        M = self.matrix().detach().double().cpu().numpy()
        r, c = np.nonzero(M)
        return r, c, M[r, c]

    def to(self, dtype: torch.dtype | None = None, device=None) -> "Map":
        """A copy with tensors moved to ``dtype``/``device`` (self when nothing changes)."""
        return self

    def tensors(self) -> list[Tensor]:
        """The tensors that hold this map's parameters."""
        return []

    def parameters(self) -> list[Tensor]:
        """The trainable torch tensors this map holds, each once: a `torch.nn.Parameter` or any tensor
        that requires grad (possibly shared with other maps, e.g. a tied weight).

        Examples
        --------
        >>> import torch, cellsheaf as cs
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> [p is w for p in cs.maps.Diagonal(w).parameters()]
        [True]
        """
        out: dict[int, Tensor] = {}
        for t in self.tensors():
            if isinstance(t, torch.nn.Parameter) or t.requires_grad:
                out.setdefault(id(t), t)
        return list(out.values())

    def __call__(self, x: Tensor) -> Tensor:
        return self.apply(x)

    def __eq__(self, other: object) -> bool:
        if type(self) is not type(other) or (self.d_in, self.d_out) != (other.d_in, other.d_out):
            return False
        if self.linear:
            return bool(torch.equal(self.matrix().double().cpu(), other.matrix().double().cpu()))
        return self._key() == other._key()

    def _key(self):
        return ()

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.d_in} -> {self.d_out})"


class Linear(Map):
    """A linear map given by a dense or sparse matrix of shape ``(d_out, d_in)``.

    Parameters
    ----------
    M : tensor, numpy array or scipy sparse matrix
    trainable : bool
        Whether learning rules ([`cellsheaf.learning`][cellsheaf.learning]) may change it.
    mask : tensor, optional
        0/1 pattern of the entries that may change (a projection such as
        "keep the diagonal of a block", Eq. 25 of the paper).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> cs.maps.Linear(torch.eye(2) * 3).apply(torch.ones(2))
    tensor([3., 3.])
    """

    def __init__(self, M, trainable: bool = False, mask: Tensor | None = None):
        M = _as_tensor(M)
        if M.dim() != 2:
            raise ValueError(f"a linear map needs a 2-d matrix, got shape {tuple(M.shape)}")
        self.weight = M
        self.d_out, self.d_in = M.shape
        self.sparse = M.is_sparse
        if trainable and self.sparse:
            raise TypeError("a sparse matrix cannot be trainable: give a dense tensor")
        self.trainable = trainable
        if mask is not None:
            mask = _as_tensor(mask).to(M.dtype)
            if mask.shape != M.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match matrix {tuple(M.shape)}")
        self.mask = mask

    def _weight_like(self, x: Tensor) -> Tensor:
        W = self.weight
        return W if (W.dtype, W.device) == (x.dtype, x.device) else W.to(dtype=x.dtype, device=x.device)

    def apply(self, x: Tensor) -> Tensor:
        W = self._weight_like(x)
        if self.sparse:
            flat = x.reshape(-1, self.d_in)
            return torch.sparse.mm(W, flat.T).T.reshape(*x.shape[:-1], self.d_out)
        return x @ W.T

    def adjoint(self, y: Tensor) -> Tensor:
        W = self._weight_like(y)
        if self.sparse:
            flat = y.reshape(-1, self.d_out)
            return torch.sparse.mm(W.t(), flat.T).T.reshape(*y.shape[:-1], self.d_in)
        return y @ W

    def matrix(self) -> Tensor:
        return self.weight.to_dense() if self.sparse else self.weight

    def parameter_vjp(self, x, w):
        if self.sparse:
            return None
        x = x if x.dtype == w.dtype else x.to(w.dtype)
        G = torch.mm(w.T, x) if w.dim() == x.dim() == 2 else w.reshape(-1, self.d_out).T @ x.reshape(-1, self.d_in)
        return [G if self.mask is None else G * self.mask.to(dtype=G.dtype, device=G.device)]

    def coo(self):
        if self.sparse:
            W = self.weight.coalesce()
            i = W.indices().cpu().numpy()
            return i[0], i[1], W.values().detach().double().cpu().numpy()
        return super().coo()

    def to(self, dtype=None, device=None):
        W = self.weight.to(dtype=dtype or self.weight.dtype, device=device or self.weight.device)
        if W is self.weight:
            return self
        out = Linear.__new__(Linear)
        out.__dict__.update(self.__dict__, weight=W)
        if self.mask is not None:
            out.mask = self.mask.to(dtype=W.dtype, device=W.device)
        return out

    def tensors(self):
        return [self.weight]


class Identity(Map):
    """The identity on ``R^d``."""

    def __init__(self, d: int):
        self.d_in = self.d_out = int(d)

    def apply(self, x):
        return x

    def adjoint(self, y):
        return y

    def squared_vjp(self, x, d):
        return d

    def matrix(self):
        return torch.eye(self.d_in, dtype=torch.get_default_dtype())

    def coo(self):
        r = np.arange(self.d_in)
        return r, r, np.ones(self.d_in)


class Scaled(Map):
    """``c`` times the identity on ``R^d``."""

    def __init__(self, c: float, d: int):
        self.c, self.d_in, self.d_out = float(c), int(d), int(d)

    def apply(self, x):
        return self.c * x

    adjoint = apply

    def squared_vjp(self, x, d):
        return self.c ** 2 * d

    def matrix(self):
        return self.c * torch.eye(self.d_in, dtype=torch.float64)  # exact: c is a Python float

    def coo(self):
        r = np.arange(self.d_in)
        return r, r, np.full(self.d_in, self.c)


class Select(Map):
    """Coordinate selection ``x -> x[indices]`` from ``R^{d_in}`` (a projection ``P_J``).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> cs.maps.Select([1], 2).adjoint(torch.tensor([5.0]))
    tensor([0., 5.])
    """

    def __init__(self, indices: Sequence[int], d_in: int, shape: Sequence[int] | None = None):
        idx = torch.as_tensor(list(indices) if not isinstance(indices, Tensor) else indices, dtype=torch.long)
        if idx.dim() != 1:
            raise ValueError("Select needs a 1-d list of indices")
        if idx.numel() and (idx.min() < 0 or idx.max() >= d_in):
            raise IndexError(f"Select indices must lie in [0, {d_in}), got {idx.tolist()}")
        self.indices, self.d_in, self.d_out = idx, int(d_in), int(idx.numel())
        self._grid = _strided(idx, tuple(shape)) if shape is not None else None
        first = int(idx[0]) if len(idx) else 0
        # a run of consecutive coordinates: its adjoint writes a slice (an index_add along the last axis is slow)
        self._run = slice(first, first + len(idx)) if torch.equal(idx, torch.arange(first, first + len(idx))) \
            else None

    def apply(self, x):
        if self._run is not None:
            return x[..., self._run]
        if self._grid is not None and x.dim() >= 1 and x.stride(-1) == 1:  # a strided view, copied once
            shape, offset, strides = self._grid
            lead = x.shape[:-1]
            view = x.as_strided((*lead, *shape), (*x.stride()[:-1], *strides), x.storage_offset() + offset)
            return view.reshape(*lead, self.d_out)
        return x[..., self.indices.to(x.device)]

    def adjoint(self, y):
        out = y.new_zeros(*y.shape[:-1], self.d_in)
        if self._run is not None:
            out[..., self._run] = y
            return out
        return out.index_add(-1, self.indices.to(y.device), y)

    def squared_vjp(self, x, d):
        return self.adjoint(d)

    def matrix(self):
        M = torch.zeros(self.d_out, self.d_in, dtype=torch.get_default_dtype())
        M[torch.arange(self.d_out), self.indices] = 1.0
        return M

    def coo(self):
        return np.arange(self.d_out), self.indices.numpy(), np.ones(self.d_out)


def _strided(idx: Tensor, shape: tuple[int, ...]):
    """``(shape, offset, strides)`` when ``idx`` is ``offset + Σ_k i_k strides_k`` over the grid ``shape`` with
    non-negative strides (a transpose, slice, chunk or permute of a reshaped stalk), else ``None``."""
    if math.prod(shape) != len(idx) or not len(idx):
        return None
    grid = idx.reshape(shape)
    offset = int(idx[0])
    strides = [int(grid[tuple(int(j == k) for j in range(len(shape)))]) - offset if s > 1 else 0
               for k, s in enumerate(shape)]
    if min(strides, default=0) < 0:
        return None
    want = torch.full(shape, offset, dtype=torch.long)
    for k, (s, st) in enumerate(zip(shape, strides)):
        want += (torch.arange(s) * st).reshape([s if j == k else 1 for j in range(len(shape))])
    return (shape, offset, tuple(strides)) if torch.equal(want, grid) else None


def _broadcast_view(t: Tensor, shape: tuple[int, ...], axis: int | None) -> tuple[int, ...] | None:
    """The view of ``t`` that broadcasts to the per-sample ``shape``: one value per entry of ``axis`` for a
    1-d ``t`` that fits it, else torch's rule (trailing axes aligned, leading ones dropped); None if none."""
    if axis is not None and t.dim() == 1 and -len(shape) <= axis < len(shape) and t.numel() == shape[axis]:
        view = [1] * len(shape)
        view[axis] = -1
        return tuple(view)
    view = tuple(t.shape)
    while len(view) > len(shape) and view[0] == 1:
        view = view[1:]
    try:
        return view if np.broadcast_shapes(view, tuple(shape)) == tuple(shape) else None  # torch's imports sympy
    except ValueError:
        return None


class Diagonal(Map):
    """A diagonal map ``x -> v ⊙ x``: a per-coordinate scale.

    ``v`` itself is kept: a `torch.nn.Parameter` stays the tensor that learns.

    Parameters
    ----------
    v : tensor
        The scale. Without ``shape``, the diagonal itself (flattened).
    shape : per-sample shape of the stalk, optional
        The map acts on stalks holding ``shape`` flattened and ``v`` broadcasts to it as torch broadcasts
        (trailing axes aligned, leading ones dropped: a scalar, a per-channel ``(C, 1, 1)`` tensor).
    axis : int, optional
        With ``shape``, a 1-d ``v`` runs along this axis (a BatchNorm2d scale on ``(C, H, W)``: ``axis=0``).
    factor : tensor, optional
        A constant multiplied in, broadcast like ``v`` (an eval-mode batch norm's ``1/√(var + ε)``).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> cs.maps.Diagonal(torch.tensor(2.0), shape=(3,)).apply(torch.ones(3))
    tensor([2., 2., 2.])
    >>> cs.maps.Diagonal(torch.tensor([1.0, 10.0]), shape=(2, 2), axis=0, factor=torch.tensor(0.5)).diagonal()
    tensor([0.5000, 0.5000, 5.0000, 5.0000])
    """

    def __init__(self, v, shape: Sequence[int] | None = None, axis: int | None = None, factor=None):
        v = _as_tensor(v, "diagonal")
        self.shape = None if shape is None else tuple(int(s) for s in shape)
        self.axis = None if axis is None else int(axis)
        self.v = v if shape is not None or v.dim() == 1 else v.reshape(-1)  # keep a 1-d parameter itself
        self._shape = self.shape if self.shape is not None else (self.v.numel(),)
        self.factor = None if factor is None else _as_tensor(factor, "factor")
        self._view = self._broadcast(self.v, "v")
        self._factor_view = None if self.factor is None else self._broadcast(self.factor, "factor")
        self.d_in = self.d_out = math.prod(self._shape)

    def _broadcast(self, t: Tensor, what: str) -> tuple[int, ...]:
        """The view of ``t`` that broadcasts to the stalk shape; a ValueError names ``what`` when there is none."""
        view = _broadcast_view(t, self._shape, self.axis)
        if view is None:
            raise ValueError(f"Diagonal: {what} of shape {tuple(t.shape)} does not broadcast to the stalk shape "
                             f"{self._shape}" + (f" along axis {self.axis}" if self.axis is not None else ""))
        return view

    def diagonal(self) -> Tensor:
        """The diagonal, ``(d,)``."""
        w = self.v.reshape(self._view).expand(self._shape)
        if self.factor is not None:
            w = w * self.factor.to(w.dtype).reshape(self._factor_view)
        return w.reshape(-1)

    def apply(self, x):
        return x * self.diagonal().to(dtype=x.dtype, device=x.device)

    adjoint = apply

    def squared_vjp(self, x, d):
        return d * self.diagonal().to(dtype=d.dtype, device=d.device) ** 2

    def matrix(self):
        return torch.diag(self.diagonal())

    def coo(self):
        v = self.diagonal().detach().double().cpu().numpy()
        r = np.nonzero(v)[0]
        return r, r, v[r]

    def to(self, dtype=None, device=None):
        moved = [None if t is None else t.to(dtype=dtype or t.dtype, device=device or t.device)
                 for t in (self.v, self.factor)]
        if moved[0] is self.v and moved[1] is self.factor:
            return self
        return Diagonal(moved[0], self.shape, self.axis, moved[1])

    def tensors(self):
        return [self.v] if self.factor is None else [self.v, self.factor]

    def __eq__(self, other):
        return type(other) is Diagonal and self.d_in == other.d_in and \
            torch.equal(self.diagonal().detach().double().cpu(), other.diagonal().detach().double().cpu())

    __hash__ = Map.__hash__


class _Blocks(Map):
    """Shared machinery of `HStack` and `VStack`."""

    def __init__(self, maps: Sequence):
        self.maps = [as_map(m) for m in maps]
        if not self.maps:
            raise ValueError(f"{type(self).__name__} needs at least one map")
        self.linear = all(m.linear for m in self.maps)

    def to(self, dtype=None, device=None):
        return type(self)([m.to(dtype, device) for m in self.maps])

    def tensors(self):
        return [t for m in self.maps for t in m.tensors()]

    def _key(self):
        return tuple(self.maps)


class HStack(_Blocks):
    """Block row ``[A_1 ... A_n]`` acting on a concatenated input ``[x_1; ...; x_n]``."""

    def __init__(self, maps):
        super().__init__(maps)
        outs = {m.d_out for m in self.maps}
        if len(outs) != 1:
            raise ValueError(f"HStack blocks must share d_out, got {sorted(outs)}")
        self.d_out = outs.pop()
        self.sizes = [m.d_in for m in self.maps]
        self.d_in = sum(self.sizes)

    def _split(self, x):
        return torch.split(x, self.sizes, dim=-1)

    def apply(self, x):
        return sum(m.apply(xi) for m, xi in zip(self.maps, self._split(x)))

    def adjoint(self, y):
        return torch.cat([m.adjoint(y) for m in self.maps], dim=-1)

    def jvp(self, x, v):
        return sum(m.jvp(xi, vi) for m, xi, vi in zip(self.maps, self._split(x), self._split(v)))

    def vjp(self, x, w):
        return torch.cat([m.vjp(xi, w) for m, xi in zip(self.maps, self._split(x))], dim=-1)

    def matrix(self):
        return torch.cat([m.matrix() for m in self.maps], dim=1)

    def jacobian(self, x):
        return torch.cat([m.jacobian(xi) for m, xi in zip(self.maps, self._split(x))], dim=-1)

    def linearize(self, x=None):
        return HStack([m.linearize(xi) for m, xi in zip(self.maps, self._split(x))]) if not self.linear else self


class VStack(_Blocks):
    """Block column ``[A_1; ...; A_n]``: outputs of maps on the same input, concatenated."""

    def __init__(self, maps):
        super().__init__(maps)
        ins = {m.d_in for m in self.maps}
        if len(ins) != 1:
            raise ValueError(f"VStack blocks must share d_in, got {sorted(ins)}")
        self.d_in = ins.pop()
        self.sizes = [m.d_out for m in self.maps]
        self.d_out = sum(self.sizes)

    def apply(self, x):
        return torch.cat([m.apply(x) for m in self.maps], dim=-1)

    def adjoint(self, y):
        return sum(m.adjoint(yi) for m, yi in zip(self.maps, torch.split(y, self.sizes, dim=-1)))

    def jvp(self, x, v):
        return torch.cat([m.jvp(x, v) for m in self.maps], dim=-1)

    def vjp(self, x, w):
        return sum(m.vjp(x, wi) for m, wi in zip(self.maps, torch.split(w, self.sizes, dim=-1)))

    def matrix(self):
        return torch.cat([m.matrix() for m in self.maps], dim=0)

    def jacobian(self, x):
        return torch.cat([m.jacobian(x) for m in self.maps], dim=-2)

    def linearize(self, x=None):
        return VStack([m.linearize(x) for m in self.maps]) if not self.linear else self


class Compose(Map):
    """``outer ∘ inner``, e.g. an activation after a projection (``φ ∘ P``)."""

    def __init__(self, outer, inner):
        self.outer, self.inner = as_map(outer), as_map(inner)
        if self.inner.d_out != self.outer.d_in:
            raise ValueError(f"Compose: inner d_out={self.inner.d_out} != outer d_in={self.outer.d_in}")
        self.d_in, self.d_out = self.inner.d_in, self.outer.d_out
        self.linear = self.outer.linear and self.inner.linear

    def apply(self, x):
        return self.outer.apply(self.inner.apply(x))

    def adjoint(self, y):
        return self.inner.adjoint(self.outer.adjoint(y))

    def jvp(self, x, v):
        return self.outer.jvp(self.inner.apply(x), self.inner.jvp(x, v))

    def vjp(self, x, w):
        return self.inner.vjp(x, self.outer.vjp(self.inner.apply(x), w))

    def matrix(self):
        A, B = self.outer.matrix(), self.inner.matrix()
        dt = torch.promote_types(A.dtype, B.dtype)
        return A.to(dt) @ B.to(dt)

    def squared_vjp(self, x, d):
        if isinstance(self.outer, Elementwise):  # a diagonal outer Jacobian scales the rows of the inner one
            return self.inner.squared_vjp(x, d * self.outer.derivative(self.inner.apply(x)) ** 2)
        return super().squared_vjp(x, d)

    def jacobian(self, x):
        A, B = self.outer.jacobian(self.inner.apply(x)), self.inner.jacobian(x)
        dt = torch.promote_types(A.dtype, B.dtype)
        return A.to(dt) @ B.to(dt)

    def linearize(self, x=None):
        if self.linear:
            return self
        return Compose(self.outer.linearize(self.inner.apply(x)), self.inner.linearize(x))

    def to(self, dtype=None, device=None):
        return Compose(self.outer.to(dtype, device), self.inner.to(dtype, device))

    def tensors(self):
        return self.outer.tensors() + self.inner.tensors()

    def _key(self):
        return (self.outer, self.inner)


class Elementwise(Map):
    """A nonlinear map applied coordinatewise, with closed-form derivative.

    ``kinks`` lists the points where the derivative jumps (ReLU: 0); there
    [`derivative`][cellsheaf.maps.Elementwise.derivative] is the one on the right (the fast selection rule, Eq. 12).
    """

    linear = False
    kinks: tuple[float, ...] = ()

    def __init__(self, d: int):
        self.d_in = self.d_out = int(d)

    def derivative(self, x: Tensor) -> Tensor:
        """Coordinatewise derivative at ``x``."""
        raise NotImplementedError

    def jvp(self, x, v):
        return self.derivative(x) * v

    def vjp(self, x, w):
        return self.derivative(x) * w

    def squared_vjp(self, x, d):
        return d * self.derivative(x) ** 2

    def jacobian(self, x):
        return torch.diag_embed(self.derivative(x))

    def linearize(self, x=None):
        if x is None or x.dim() != 1:
            raise ValueError(f"{type(self).__name__}.linearize needs one point of shape ({self.d_in},)")
        return Diagonal(self.derivative(x))


class ReLU(Elementwise):
    """ReLU with the fast selection rule: the derivative is 1 where ``z >= 0`` (Eq. 12)."""

    kinks = (0.0,)

    def apply(self, x):
        return torch.relu(x)

    def derivative(self, x):
        return (x >= 0).to(x.dtype)

    def jvp(self, x, v):
        return v * (x >= 0)  # the 0/1 pattern multiplied in as it is (no conversion to x's dtype)

    vjp = jvp


class LeakyReLU(Elementwise):
    """Leaky ReLU ``max(z, slope*z)``; derivative 1 where ``z >= 0``."""

    kinks = (0.0,)

    def __init__(self, d: int, slope: float = 0.01):
        super().__init__(d)
        self.slope = float(slope)

    def apply(self, x):
        return torch.where(x >= 0, x, self.slope * x)

    def derivative(self, x):
        return torch.where(x >= 0, torch.ones_like(x), torch.full_like(x, self.slope))

    def _key(self):
        return (self.slope,)


class Sigmoid(Elementwise):
    """The logistic sigmoid."""

    def apply(self, x):
        return torch.sigmoid(x)

    def derivative(self, x):
        s = torch.sigmoid(x)
        return s * (1 - s)


class Tanh(Elementwise):
    """The hyperbolic tangent."""

    def apply(self, x):
        return torch.tanh(x)

    def derivative(self, x):
        return 1 - torch.tanh(x) ** 2


class Softmax(Map):
    """Softmax over the stalk; Jacobian ``diag(p) - p pᵀ``."""

    linear = False

    def __init__(self, d: int):
        self.d_in = self.d_out = int(d)

    def apply(self, x):
        if not x.shape[-1] or not x.is_floating_point():
            return torch.softmax(x, dim=-1)
        # exp(x − max) / Σ: a few elementwise kernels, faster than torch's softmax on the short rows of a
        # network's output (two to three times on 10 classes), equal to it to rounding
        e = torch.exp(x - x.amax(-1, keepdim=True))
        return e / e.sum(-1, keepdim=True)

    def jvp(self, x, v):
        p = self.apply(x)
        return p * (v - (p * v).sum(-1, keepdim=True))

    vjp = jvp  # the Jacobian is symmetric

    def jacobian(self, x):
        p = self.apply(x)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)

    def linearize(self, x=None):
        if x is None or x.dim() != 1:
            raise ValueError(f"Softmax.linearize needs one point of shape ({self.d_in},)")
        return Linear(self.jacobian(x))


class _Autodiff(Map):
    """A nonlinear map whose derivatives come from its `apply` by torch's autograd: `jvp` by forward
    mode (dual numbers), `vjp` by reverse mode, `jacobian` by `torch.func` (vectorised over rows)."""

    linear = False

    def jvp(self, x, v):
        with fwAD.dual_level():
            t = fwAD.unpack_dual(self.apply(fwAD.make_dual(x, v.to(dtype=x.dtype)))).tangent
        return torch.zeros(*x.shape[:-1], self.d_out, dtype=x.dtype, device=x.device) if t is None else t

    def vjp(self, x, w):
        with torch.enable_grad():
            z = x if x.requires_grad else x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.apply(z), z, w, allow_unused=True,
                                       create_graph=x.requires_grad or w.requires_grad)
        return torch.zeros_like(x) if g is None else g

    def jacobian(self, x):
        flat = x.reshape(-1, self.d_in).contiguous()  # some torch kernels (group_norm) refuse strided batches
        J = torch.func.vmap(torch.func.jacrev(lambda z: self.apply(z.unsqueeze(0))[0]))(flat)
        return J.reshape(*x.shape[:-1], self.d_out, self.d_in)

    def linearize(self, x=None):
        if x is None or x.dim() != 1:
            raise ValueError(f"{type(self).__name__}.linearize needs one point of shape ({self.d_in},)")
        return Linear(self.jacobian(x))


class Function(_Autodiff):
    """Any differentiable callable ``fn: (..., d_in) -> (..., d_out)``; Jacobians by autograd.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> F = cs.maps.Function(lambda x: x ** 2, 2, 2)
    >>> F.vjp(torch.tensor([1.0, 3.0]), torch.ones(2))
    tensor([2., 6.])
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], d_in: int, d_out: int, name: str | None = None):
        self.fn, self.d_in, self.d_out = fn, int(d_in), int(d_out)
        self.name = name or getattr(fn, "__name__", "function")

    def apply(self, x):
        y = self.fn(x)
        if not isinstance(y, Tensor) or y.shape != (*x.shape[:-1], self.d_out):
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(
                f"map {self.name!r} returned {shape} for input {tuple(x.shape)}; "
                f"expected {(*x.shape[:-1], self.d_out)}"
            )
        return y

    def _key(self):
        return (self.fn,)

    def __repr__(self):
        return f"Function({self.name!r}, {self.d_in} -> {self.d_out})"


_STRUCTURED: dict[str, type] = {}


def _same(a, b) -> bool:
    """Equality of map attributes: tensors by value (as float64 on the CPU), the rest by ``==``."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(
            torch.equal(a.detach().double().cpu(), b.detach().double().cpu()))
    return a == b


class Structured(Map):
    """A map described by its hyperparameters, tensors and inner maps (a convolution, a norm, ...).

    Subclasses name them in ``_params`` (JSON values: ints, floats, strings,
    tuples), ``_tensors`` (tensors or None, possibly `torch.nn.Parameter`) and
    ``_maps`` (inner maps); the constructor takes them as keywords and stores
    them as attributes of the same names. Equality, [`to`][cellsheaf.maps.Map.to], [`tensors`][cellsheaf.maps.Map.tensors] and the
    JSON spec ([`cellsheaf.spec`][cellsheaf.spec]) follow from that description, and no matrix is
    built for them. Subclasses are registered by class name for specs.
    """

    _params: tuple[str, ...] = ()
    _tensors: tuple[str, ...] = ()
    _maps: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _STRUCTURED[cls.__name__] = cls

    def state(self) -> tuple[dict, dict, dict]:
        """``(params, tensors, maps)``: the keywords that rebuild this map."""
        return ({k: getattr(self, k) for k in self._params}, {k: getattr(self, k) for k in self._tensors},
                {k: getattr(self, k) for k in self._maps})

    def to(self, dtype=None, device=None):
        params, tensors, maps = self.state()
        moved = {k: None if t is None else t.to(dtype=dtype or t.dtype, device=device or t.device)
                 for k, t in tensors.items()}
        inner = {k: m.to(dtype, device) for k, m in maps.items()}
        if all(moved[k] is tensors[k] for k in tensors) and all(inner[k] is maps[k] for k in maps):
            return self
        return type(self)(**params, **moved, **inner)

    def tensors(self):  # read off the attributes directly: the local rule asks every map once per update
        out = [t for t in (getattr(self, k) for k in self._tensors) if t is not None]
        for k in self._maps:
            out += getattr(self, k).tensors()
        return out

    def __eq__(self, other):
        if type(self) is not type(other):
            return False
        mine, theirs = self.state(), other.state()
        return all(mine[i].keys() == theirs[i].keys() and all(_same(v, theirs[i][k]) for k, v in mine[i].items())
                   for i in range(3))

    __hash__ = Map.__hash__

    def __repr__(self):
        params = ", ".join(f"{k}={v!r}" for k, v in self.state()[0].items())
        return f"{type(self).__name__}({params}; {self.d_in} -> {self.d_out})"


def as_map(F) -> Map:
    """Coerce ``F`` (a [`Map`][cellsheaf.maps.Map], tensor, numpy array or scipy sparse matrix) into a [`Map`][cellsheaf.maps.Map].

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> cs.maps.as_map(torch.eye(2)).d_out
    2
    """
    return F if isinstance(F, Map) else Linear(F)
