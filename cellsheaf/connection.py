"""Connection sheaves: orthogonal restriction maps on ``d``-dimensional stalks.

An ``O(d)``-connection on a graph transports the stalk of ``u`` to the stalk of
``v`` along every edge by an orthogonal matrix. As a sheaf it has stalks
``R^d`` everywhere and orthogonal restriction maps; its Laplacian is the
connection Laplacian (vector diffusion maps): off-diagonal blocks
``−w_e F_{u◁e}ᵀ F_{v◁e}``, and — because ``Fᵀ F = I`` — vertex blocks
``deg(v)·I`` with ``deg`` the weighted degree (on graphs without self-loops: a
loop ``e = v -> v`` adds ``w_e (F_v − F_u)ᵀ (F_v − F_u)`` to the block of ``v``).

Examples
--------
>>> import torch, cellsheaf as cs
>>> from cellsheaf.orthogonal import exp_skew
>>> Q = exp_skew(torch.tensor([[0.3], [0.5], [-0.8]], dtype=torch.float64), 2)
>>> S = cs.connection_sheaf([[0, 1, 2], [1, 2, 0]], Q)
>>> cs.operators.degree_blocks(S)[0]
tensor([[2., 0.],
        [0., 2.]], dtype=torch.float64)
>>> S.cohomology().h0  # the holonomy around the triangle is the rotation by 0: flat
2
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sheaf import Sheaf

__all__ = ["connection_sheaf"]


def _check_orthogonal(Q: Tensor, side: str, atol: float | None) -> None:
    d = Q.shape[-1]
    tol = 100 * d * torch.finfo(Q.dtype).eps if atol is None else atol
    with torch.no_grad():
        err = (Q.transpose(-2, -1) @ Q - torch.eye(d, dtype=Q.dtype, device=Q.device)).abs().amax((-2, -1))
    bad = torch.nonzero(~(err <= tol))  # NaN counts as bad
    if len(bad):
        k = int(bad[0])
        raise ValueError(f"connection_sheaf: {side} of edge {k} is not orthogonal (max |FᵀF − I| = "
                         f"{float(err[k]):.3g} > {tol:.3g}); use cellsheaf.orthogonal to make orthogonal maps, or "
                         "pass atol=")


def connection_sheaf(edge_index, Fu: Tensor, Fv: Tensor | None = None, num_vertices: int | None = None,
                     weights: Tensor | None = None, atol: float | None = None) -> Sheaf:
    """The sheaf of an ``O(d)``-connection: stalks ``R^d``, orthogonal maps ``(E, d, d)``.

    Parameters
    ----------
    edge_index : (2, E) integer tensor or array
        Tails and heads of the edges (positions ``0..N-1``).
    Fu : (E, d, d) tensor
        Orthogonal maps ``F_{u◁e}``.
    Fv : (E, d, d) tensor, optional
        Orthogonal maps ``F_{v◁e}``; the identity by default, so that
        ``(δx)_e = x_v − F_{u◁e} x_u`` (``F_{u◁e}`` transports ``u``'s stalk to ``v``'s).
    num_vertices : int, optional
        ``N``; by default one more than the largest vertex in ``edge_index``.
    weights : (E,) tensor, optional
        Positive edge weights.
    atol : float, optional
        Tolerance on ``max |FᵀF − I|``; by default ``100 d`` machine epsilons of the maps' dtype.

    Returns
    -------
    Sheaf
        Stacked ([`cellsheaf.Sheaf.from_arrays`][cellsheaf.sheaf.Sheaf.from_arrays]): differentiable in the maps, and its
        Laplacian is the connection Laplacian.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.connection_sheaf([[0], [1]], -torch.eye(3)[None])
    >>> S.laplacian().to_dense()[:3, 3:]
    tensor([[1., 0., 0.],
            [0., 1., 0.],
            [0., 0., 1.]])
    """
    index = torch.as_tensor(edge_index)
    if not isinstance(Fu, Tensor) or Fu.dim() != 3 or Fu.shape[1] != Fu.shape[2]:
        raise ValueError(f"connection_sheaf: Fu must be a (E, d, d) tensor of orthogonal maps, got "
                         f"{tuple(Fu.shape) if isinstance(Fu, Tensor) else type(Fu).__name__}")
    E, d = Fu.shape[0], Fu.shape[1]
    if Fv is None:
        Fv = torch.eye(d, dtype=Fu.dtype, device=Fu.device).expand(E, d, d).contiguous()
    elif not isinstance(Fv, Tensor) or Fv.shape != Fu.shape:
        raise ValueError(f"connection_sheaf: Fv must have the shape of Fu {tuple(Fu.shape)}")
    _check_orthogonal(Fu, "Fu", atol)
    _check_orthogonal(Fv, "Fv", atol)
    if num_vertices is None:
        num_vertices = int(index.max()) + 1 if index.numel() else 0
    return Sheaf.from_arrays([d] * num_vertices, index, Fu, Fv, weights=weights)
