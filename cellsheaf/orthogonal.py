"""Orthogonal matrices from unconstrained parameters, batched and differentiable.

Each function takes a stack of parameter vectors ``(..., d(d-1)/2)`` and
returns a stack of ``d × d`` orthogonal matrices ``(..., d, d)``, smooth in the
parameters everywhere (zero parameters give the identity for [`exp_skew`][cellsheaf.orthogonal.exp_skew] and
[`cayley`][cellsheaf.orthogonal.cayley]). They are the building blocks of orthogonal restriction maps
(connection sheaves, [`cellsheaf.connection_sheaf`][cellsheaf.connection.connection_sheaf]) and of the orthogonal map
parametrisations in [`cellsheaf.layers`][cellsheaf.layers].

- [`exp_skew`][cellsheaf.orthogonal.exp_skew]: the matrix exponential of a skew-symmetric matrix (all of
  ``SO(d)``); closed forms for ``d = 2`` (rotation by an angle) and ``d = 3``
  (Rodrigues' formula), ``torch.linalg.matrix_exp`` above.
- [`cayley`][cellsheaf.orthogonal.cayley]: the Cayley transform ``(I − A)^{-1} (I + A)`` (``SO(d)`` except the
  rotations with eigenvalue −1); closed form ``I + 2 (A + A²) / (1 + θ²)`` for
  ``d = 2, 3``, a batched solve above.
- [`householder`][cellsheaf.orthogonal.householder]: a product of ``d`` Householder reflections (determinant
  ``(−1)^d``), the parametrisation of ``torch.nn.utils.parametrizations.orthogonal``.

Examples
--------
>>> import torch
>>> from cellsheaf.orthogonal import exp_skew
>>> Q = exp_skew(torch.tensor([[torch.pi / 2]], dtype=torch.float64), 2)
>>> Q.round(decimals=12)
tensor([[[ 0., -1.],
         [ 1.,  0.]]], dtype=torch.float64)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["n_skew", "skew", "exp_skew", "cayley", "householder", "METHODS", "orthogonal"]

METHODS = ("exp", "cayley", "householder")
"""The parametrisations `orthogonal` dispatches to."""


def n_skew(d: int) -> int:
    """Number of parameters of a ``d × d`` skew-symmetric (or orthogonal) matrix: ``d(d-1)/2``."""
    return d * (d - 1) // 2


def _check(a: Tensor, d: int) -> None:
    if isinstance(d, bool) or int(d) != d or d < 1:
        raise ValueError(f"d must be a positive integer, got {d!r}")
    if a.dim() == 0 or a.shape[-1] != n_skew(d):
        raise ValueError(f"a {d}x{d} orthogonal matrix takes d(d-1)/2 = {n_skew(d)} parameters in the last axis, "
                         f"got shape {tuple(a.shape)}")
    if not a.is_floating_point():
        raise TypeError(f"parameters must be a floating-point tensor, got {a.dtype}")


def skew(a: Tensor, d: int) -> Tensor:
    """The skew-symmetric ``A`` with ``A[i, j] = a_k = −A[j, i]`` over the pairs ``i > j`` in row order.

    Examples
    --------
    >>> import torch
    >>> from cellsheaf.orthogonal import skew
    >>> skew(torch.tensor([1.0, 2.0, 3.0]), 3)
    tensor([[ 0., -1., -2.],
            [ 1.,  0., -3.],
            [ 2.,  3.,  0.]])
    """
    _check(a, d)
    i, j = torch.tril_indices(d, d, -1, device=a.device)
    A = a.new_zeros(*a.shape[:-1], d, d)
    A[..., i, j] = a
    A[..., j, i] = -a
    return A


def _eye_like(A: Tensor) -> Tensor:
    return torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)


def exp_skew(a: Tensor, d: int) -> Tensor:
    """``exp(skew(a))``, a rotation in ``SO(d)`` (``a = 0`` gives the identity).

    For ``d = 2, 3`` (where ``A³ = −θ² A`` with ``θ² = Σ a_k²``) Rodrigues' formula
    ``I + sinc(θ) A + ½ sinc(θ/2)² A²``, with no cancellation at small angles.

    Examples
    --------
    >>> import torch
    >>> from cellsheaf.orthogonal import exp_skew
    >>> Q = exp_skew(torch.randn(5, 3, dtype=torch.float64), 3)
    >>> bool(torch.allclose(Q.transpose(1, 2) @ Q, torch.eye(3, dtype=torch.float64)))
    True
    """
    _check(a, d)
    A = skew(a, d)
    if d > 3:
        return torch.linalg.matrix_exp(A)
    if d == 1:
        return _eye_like(A).clone()
    s = (a * a).sum(-1)[..., None, None]
    # torch.sinc(x) = sin(πx)/(πx) is smooth at 0; the square root's gradient is not, so θ = 0 takes
    # the limits through where() on a safe argument (finite gradients everywhere).
    zero = s == 0
    theta = torch.where(zero, torch.ones_like(s), s).sqrt()
    c1 = torch.where(zero, torch.ones_like(theta), torch.sinc(theta / torch.pi))
    c2 = torch.where(zero, torch.full_like(theta, 0.5), 0.5 * torch.sinc(theta / (2 * torch.pi)) ** 2)
    return _eye_like(A) + c1 * A + c2 * (A @ A)


def cayley(a: Tensor, d: int) -> Tensor:
    """The Cayley transform ``(I − A)^{-1} (I + A)`` of ``A = skew(a)``, a rotation in ``SO(d)``.

    For ``d = 2, 3`` the closed form ``I + 2 (A + A²) / (1 + θ²)``, ``θ² = Σ a_k²``.

    Examples
    --------
    >>> import torch
    >>> from cellsheaf.orthogonal import cayley
    >>> cayley(torch.tensor([1.0]), 2)
    tensor([[ 0., -1.],
            [ 1.,  0.]])
    """
    _check(a, d)
    A = skew(a, d)
    eye = _eye_like(A)
    if d <= 3:
        s = (a * a).sum(-1)[..., None, None]
        return eye + (2 / (1 + s)) * (A + A @ A)
    return torch.linalg.solve(eye - A, eye + A)


def householder(a: Tensor, d: int) -> Tensor:
    """The product ``H_1 ⋯ H_d`` of reflections ``H_k = I − 2 v_k v_kᵀ / ‖v_k‖²``, in ``O(d)``.

    ``v_k`` is the ``k``-th column of the unit lower-triangular matrix whose strictly
    lower part holds ``a`` (row order, as in [`skew`][cellsheaf.orthogonal.skew]); ``‖v_k‖ ≥ 1``, so the map is
    smooth everywhere. Its determinant is ``(−1)^d``.

    Examples
    --------
    >>> import torch
    >>> from cellsheaf.orthogonal import householder
    >>> householder(torch.zeros(1), 2)
    tensor([[-1.,  0.],
            [ 0., -1.]])
    """
    _check(a, d)
    i, j = torch.tril_indices(d, d, -1, device=a.device)
    V = torch.eye(d, dtype=a.dtype, device=a.device).repeat(*a.shape[:-1], 1, 1)
    V[..., i, j] = a
    Q = _eye_like(V)
    for k in range(d):  # d reflections; d is a stalk dimension (small)
        v = V[..., :, k:k + 1]
        Q = Q - (2 / (v * v).sum((-2, -1), keepdim=True)) * ((Q @ v) @ v.transpose(-2, -1))
    return Q


def orthogonal(a: Tensor, d: int, method: str = "exp") -> Tensor:
    """Orthogonal matrices ``(..., d, d)`` from parameters ``(..., d(d-1)/2)`` by ``method`` (see [`METHODS`][cellsheaf.orthogonal.METHODS]).

    Examples
    --------
    >>> import torch
    >>> from cellsheaf.orthogonal import orthogonal
    >>> orthogonal(torch.zeros(4, 3), 3, method="cayley").shape
    torch.Size([4, 3, 3])
    """
    try:
        fn = {"exp": exp_skew, "cayley": cayley, "householder": householder}[method]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {METHODS}, got {method!r}") from None
    return fn(a, d)
