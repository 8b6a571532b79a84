"""Sheaf neural networks: map parametrisations, a map learner and a sheaf diffusion layer (`torch.nn`).

Optional for users who only want the mathematics: nothing in `cellsheaf` imports
this module, and it uses the same operators as everything else
(`cellsheaf.operators`), so a layer's Laplacian is the sheaf's Laplacian.

Map parametrisations turn a stack of unconstrained parameter vectors
``(..., num_parameters)`` into a stack of restriction maps:

- `GeneralMaps`: any ``d_e × d`` matrix;
- `DiagonalMaps`: a diagonal ``d × d`` map, stored as its diagonal ``(..., d)``
  (a diagonal stack, applied elementwise);
- `OrthogonalMaps`: a ``d × d`` orthogonal matrix (`cellsheaf.orthogonal`);
- `ScaledOrthogonalMaps`: ``c Q`` with ``Q`` orthogonal and ``c`` a real scalar.

Examples
--------
>>> import torch
>>> from cellsheaf.layers import OrthogonalMaps
>>> P = OrthogonalMaps(3)
>>> Q = P(torch.randn(10, P.num_parameters, dtype=torch.float64))
>>> Q.shape, bool(torch.allclose(Q @ Q.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(10, 3, 3)))
(torch.Size([10, 3, 3]), True)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import orthogonal as _orth

__all__ = ["MapParametrisation", "GeneralMaps", "DiagonalMaps", "OrthogonalMaps", "ScaledOrthogonalMaps"]


def _dim(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class MapParametrisation(nn.Module):
    """Base class: ``forward(params (..., num_parameters))`` returns maps ``(..., d_e, d)``,
    or their diagonals ``(..., d)`` when `diagonal` is true.

    Subclasses set `d`, `d_e` and `num_parameters` and implement `forward`.
    """

    d: int
    d_e: int
    num_parameters: int
    diagonal: bool = False

    def _check(self, params: Tensor) -> None:
        if not isinstance(params, Tensor) or params.dim() == 0 or params.shape[-1] != self.num_parameters:
            shape = tuple(params.shape) if isinstance(params, Tensor) else type(params).__name__
            raise ValueError(f"{type(self).__name__} takes {self.num_parameters} parameters per map in the last "
                             f"axis, got {shape}")

    def extra_repr(self) -> str:
        return f"d={self.d}, d_e={self.d_e}, num_parameters={self.num_parameters}"


class GeneralMaps(MapParametrisation):
    """Any ``d_e × d`` matrix: the parameters are its entries in row order.

    Examples
    --------
    >>> import torch
    >>> from cellsheaf.layers import GeneralMaps
    >>> GeneralMaps(2, d_e=1)(torch.tensor([[1.0, 2.0]]))
    tensor([[[1., 2.]]])
    """

    def __init__(self, d: int, d_e: int | None = None) -> None:
        super().__init__()
        self.d = _dim(d, "d")
        self.d_e = self.d if d_e is None else _dim(d_e, "d_e")
        self.num_parameters = self.d_e * self.d

    def forward(self, params: Tensor) -> Tensor:
        self._check(params)
        return params.unflatten(-1, (self.d_e, self.d))


class DiagonalMaps(MapParametrisation):
    """A diagonal ``d × d`` map, returned as its diagonal ``(..., d)`` (a diagonal stack).

    Examples
    --------
    >>> import torch
    >>> from cellsheaf.layers import DiagonalMaps
    >>> DiagonalMaps(3)(torch.ones(4, 3)).shape
    torch.Size([4, 3])
    """

    diagonal = True

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = self.d_e = _dim(d, "d")
        self.num_parameters = self.d

    def forward(self, params: Tensor) -> Tensor:
        self._check(params)
        return params


class OrthogonalMaps(MapParametrisation):
    """A ``d × d`` orthogonal matrix from ``d(d-1)/2`` parameters.

    ``method`` is ``"exp"`` (matrix exponential of a skew-symmetric matrix: all of
    ``SO(d)``), ``"cayley"`` (Cayley transform) or ``"householder"`` (``d``
    reflections, determinant ``(−1)^d``); ``d = 2, 3`` use closed forms
    (`cellsheaf.orthogonal`). Zero parameters give the identity for ``"exp"`` and
    ``"cayley"``.

    Examples
    --------
    >>> import torch
    >>> from cellsheaf.layers import OrthogonalMaps
    >>> OrthogonalMaps(2)(torch.zeros(1, 1))
    tensor([[[1., 0.],
             [0., 1.]]])
    """

    def __init__(self, d: int, method: str = "exp") -> None:
        super().__init__()
        if method not in _orth.METHODS:
            raise ValueError(f"method must be one of {_orth.METHODS}, got {method!r}")
        self.d = self.d_e = _dim(d, "d")
        self.method = method
        self.num_parameters = _orth.n_skew(self.d)

    def forward(self, params: Tensor) -> Tensor:
        self._check(params)
        return _orth.orthogonal(params, self.d, self.method)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.method!r}"


class ScaledOrthogonalMaps(OrthogonalMaps):
    """``c Q``: a real scale ``c`` (the first parameter) times an orthogonal ``Q`` (the other
    ``d(d-1)/2``, as in `OrthogonalMaps`).

    Examples
    --------
    >>> import torch
    >>> from cellsheaf.layers import ScaledOrthogonalMaps
    >>> ScaledOrthogonalMaps(2)(torch.tensor([[2.0, 0.0]]))
    tensor([[[2., 0.],
             [0., 2.]]])
    """

    def __init__(self, d: int, method: str = "exp") -> None:
        super().__init__(d, method)
        self.num_parameters += 1

    def forward(self, params: Tensor) -> Tensor:
        self._check(params)
        return params[..., :1, None] * _orth.orthogonal(params[..., 1:], self.d, self.method)
