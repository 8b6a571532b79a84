"""Extremal eigenpairs of a symmetric operator in torch: LOBPCG, and CG on a deflated shifted system.

Both take the operator as a function ``apply(X) -> A X`` on ``(n, m)`` blocks of
columns, so they run matrix-free on whatever device ``X`` lives on (no scipy, no
host round trip of the data). `lobpcg` finds the ``k`` smallest (or largest)
eigenpairs with a block of ``p > k`` vectors, so repeated eigenvalues up to
multiplicity ``p`` are found together (a block method does not miss copies the way
single-vector Lanczos can). `deflated_solve` applies ``(A − λ_i I)⁻¹`` on the
orthogonal complement of ``k`` computed eigenvectors by conjugate gradients: there
``A − λ_i I`` is definite, which is what the backward pass of an eigenvector needs.

Examples
--------
>>> import torch
>>> from cellsheaf.lobpcg import lobpcg
>>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
>>> out = lobpcg(lambda X: A @ X, 100, 3, dtype=torch.float64, device="cpu")
>>> [round(v, 8) for v in out.values.tolist()], out.converged
([1.0, 2.0, 3.0], True)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .syncs import check_every

__all__ = ["LobpcgResult", "lobpcg", "deflated_solve"]

Operator = Callable[[Tensor], Tensor]


class LobpcgResult(NamedTuple):
    """``values (k,)``, orthonormal ``vectors (n, k)``, ``iterations`` (block iterations), ``applications``
    (columns the operator was applied to), ``residual`` (largest ``‖A v − λ v‖ / scale``), ``converged``,
    and ``next_value``: the Ritz value just beyond the ``k`` wanted ones (an estimate of ``λ_{k+1}``, or
    ``nan`` when ``k = n``)."""

    values: Tensor
    vectors: Tensor
    iterations: int
    applications: int
    residual: float
    converged: bool
    next_value: float


def _svqb(Z: Tensor) -> tuple[Tensor, Tensor]:
    """``C`` with ``Z C`` orthonormal (columns ``Z`` spans numerically, all others zero) and the count kept.

    SVQB (Stathopoulos & Wu): scale the columns, ``eigh`` of the Gram matrix, drop the directions
    below ``n · eps`` of the largest. The caller applies ``C`` to ``Z`` and to ``A Z`` alike."""
    tiny, eps = torch.finfo(Z.dtype).tiny, torch.finfo(Z.dtype).eps
    d = Z.pow(2).sum(0).clamp_min(tiny).rsqrt()
    s, U = torch.linalg.eigh((Z * d).T @ (Z * d))
    keep = s > s[-1].clamp_min(tiny) * (Z.shape[0] * eps)
    return d[:, None] * U / s.clamp_min(tiny).sqrt(), keep


def _orthonormalize(Z: Tensor, AZ: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Orthonormal ``Q`` spanning ``Z``, ``A Q`` from ``A Z`` (no operator application), and the mask of the
    columns kept (the others are zero: ``Z`` was numerically rank deficient). No host sync."""
    C, keep = _svqb(Z)
    C = C * keep
    return Z @ C, AZ @ C, keep


def _project_out(X: Tensor, Z: Tensor) -> Tensor:
    """``Z`` with its components along the orthonormal columns ``X`` removed (twice is enough, Kahan)."""
    Z = Z - X @ (X.T @ Z)
    return Z - X @ (X.T @ Z)


def _dense(apply: Operator, n: int, k: int, dtype, device, sign: float) -> LobpcgResult:
    A = apply(torch.eye(n, dtype=dtype, device=device))
    lam, V = torch.linalg.eigh(sign * 0.5 * (A + A.T))
    nxt = float(sign * lam[k]) if k < n else float("nan")
    return LobpcgResult(sign * lam[:k], V[:, :k], 1, n, 0.0, True, nxt)


def lobpcg(apply: Operator, n: int, k: int, *, dtype: torch.dtype, device, largest: bool = False,
           tol: float = 1e-10, maxiter: int = 2000, block: int | None = None, seed: int = 0) -> LobpcgResult:
    """The ``k`` smallest (or largest) eigenpairs of a symmetric ``n × n`` operator by LOBPCG.

    Parameters
    ----------
    apply : callable
        ``X (n, m) -> A X (n, m)``, on the device and dtype given.
    n, k : int
        Size of the operator and number of eigenpairs, ``1 <= k <= n``.
    largest : bool
        The largest eigenpairs (values descending) instead of the smallest (ascending).
    tol : float
        Converged when every wanted residual ``‖A v − θ v‖ <= tol · scale``, ``scale`` the
        largest ``|θ|`` any Rayleigh–Ritz step has seen (an estimate of ``‖A‖`` from below).
    maxiter : int
        Block iterations before giving up (then ``converged`` is False).
    block : int, optional
        Block size ``p >= k`` (default ``k + max(8, k)``): eigenvalues beyond the ``p``-th
        set the convergence rate, copies of one eigenvalue up to ``p`` are found together.
    seed : int
        Seed of the random start (drawn on the CPU, so results do not depend on the device).

    Returns
    -------
    LobpcgResult
        Small operators (``3p >= n``) are solved densely by ``eigh`` of ``A`` built column by column.

    Examples
    --------
    >>> import torch
    >>> from cellsheaf.lobpcg import lobpcg
    >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    >>> out = lobpcg(lambda X: A @ X, 100, 2, dtype=torch.float64, device="cpu", largest=True)
    >>> [round(v, 8) for v in out.values.tolist()]
    [100.0, 99.0]
    """
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}], got {k}")
    sign = -1.0 if largest else 1.0
    op = (lambda X: -apply(X)) if largest else apply
    p = min(n, block if block is not None else k + max(8, k))
    if p < k:
        raise ValueError(f"block must be at least k={k}, got {block}")
    if 3 * p >= n:
        return _dense(apply, n, k, dtype, device, sign)
    g = torch.Generator().manual_seed(seed)
    X = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))[0].to(dtype=dtype, device=device)
    AX = op(X)
    theta, W = torch.linalg.eigh(0.5 * (X.T @ AX + AX.T @ X))
    X, AX = X @ W, AX @ W
    applications, P, AP = p, None, None
    scale = theta.abs().max()
    tiny = torch.finfo(dtype).tiny
    res = float("inf")
    check = check_every(X.device)
    for it in range(1, maxiter + 1):
        R = AX - X * theta
        if it % check == 0 or it == 1:
            res = float(R[:, :k].norm(dim=0).max() / scale.clamp_min(tiny))  # the loop's only host sync
            if res <= tol:
                return _finish(op, X, theta, k, sign, it, applications, scale, True)
        R = _project_out(X, R)
        AR = op(R)
        applications += p
        if P is None:
            Z, AZ = R, AR
        else:
            M = X.T @ P
            Z, AZ = torch.cat([R, P - X @ M], 1), torch.cat([AR, AP - AX @ M], 1)
        Q, AQ, keep = _orthonormalize(Z, AZ)
        XAQ = AX.T @ Q
        QAQ = Q.T @ AQ
        # a dropped (zero) column of Q would give a spurious Ritz value 0: push it past every real one
        QAQ = QAQ + torch.diag((~keep).to(dtype) * (4 * scale + 1))
        H = torch.cat([torch.cat([torch.diag(theta), XAQ], 1), torch.cat([XAQ.T, QAQ], 1)], 0)
        lam, W = torch.linalg.eigh(0.5 * (H + H.T))
        scale = torch.maximum(scale, lam[:p].abs().max())
        Wx, Wq = W[:p, :p], W[p:, :p]
        P, AP = Q @ Wq, AQ @ Wq
        X, AX, theta = X @ Wx + P, AX @ Wx + AP, lam[:p]
    return _finish(op, X, theta, k, sign, maxiter, applications, scale, False)


def _finish(op: Operator, X: Tensor, theta: Tensor, k: int, sign: float, iterations: int, applications: int,
            scale: Tensor, converged: bool) -> LobpcgResult:
    """The result, with the residual measured by one fresh application (not the updated ``A X``)."""
    V = X[:, :k]
    r = (op(V) - V * theta[:k]).norm(dim=0).max() / scale.clamp_min(torch.finfo(X.dtype).tiny)
    nxt = float(sign * theta[k]) if k < theta.numel() else float("nan")
    return LobpcgResult(sign * theta[:k], V, iterations, applications + k, float(r), converged, nxt)


def deflated_solve(apply: Operator, V: Tensor, lam: Tensor, G: Tensor, *, largest: bool = False,
                   tol: float = 1e-12, maxiter: int = 10_000, check_every: int = 10) -> tuple[Tensor, int, float]:
    """Solve ``Q (A − λ_i I) Q y_i = Q g_i`` for ``y_i ⟂ V``, every column ``i`` at once, by CG.

    ``V (n, k)`` are orthonormal eigenvectors of ``A`` holding the ``k`` smallest (``largest=True``: the
    ``k`` largest) eigenvalues ``lam`` and ``Q = I − V Vᵀ``: on the range of ``Q`` every eigenvalue of ``A``
    lies beyond all of ``lam``, so ``A − λ_i I`` (``λ_i I − A``) is positive definite there. Convergence is
    checked every ``check_every`` iterations with one host sync. Returns ``(Y, iterations,
    relative residual)``; ``Y`` is ``(n, k)`` like ``G``.

    Examples
    --------
    >>> import torch
    >>> from cellsheaf.lobpcg import deflated_solve
    >>> A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    >>> V = torch.eye(3, dtype=torch.float64)[:, :1]
    >>> Y, _, _ = deflated_solve(lambda X: A @ X, V, torch.tensor([1.0], dtype=torch.float64),
    ...                          torch.ones(3, 1, dtype=torch.float64))
    >>> [round(v, 12) for v in Y[:, 0].tolist()]
    [0.0, 1.0, 0.333333333333]
    """
    proj = lambda X: X - V @ (V.T @ X)
    sign = -1.0 if largest else 1.0
    op = lambda X: sign * proj(apply(X) - X * lam)
    b = sign * proj(G)
    bnorm = b.norm(dim=0).clamp_min(torch.finfo(G.dtype).tiny)
    Y = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(0)
    goal = (tol * bnorm) ** 2
    rel = 0.0
    for it in range(1, maxiter + 1):
        Ap = op(p)
        pAp = (p * Ap).sum(0)
        active = (pAp > 0) & (rr > goal)  # a converged column stops (CG past convergence drifts); no host sync
        alpha = torch.where(active, rr / pAp.clamp_min(torch.finfo(G.dtype).tiny), torch.zeros_like(rr))
        Y = Y + p * alpha
        r = r - Ap * alpha
        rr_new = (r * r).sum(0)
        beta = torch.where(rr > 0, rr_new / rr.clamp_min(torch.finfo(G.dtype).tiny), torch.zeros_like(rr))
        p = r + p * beta
        rr = rr_new
        if it % check_every == 0:
            rel = float((rr.sqrt() / bnorm).max())  # one host sync every check_every iterations
            if rel <= tol:
                return proj(Y), it, rel
    return proj(Y), maxiter, rel
