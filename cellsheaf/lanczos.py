"""Extremal eigenpairs of a symmetric operator in torch by thick-restart Lanczos.

`lanczos` takes the operator as a function ``apply(X) -> A X`` on ``(n, m)``
blocks of columns (it calls it with one column at a time) and runs matrix-free on
whatever device the operator lives on: no scipy, no host copy of the data. It is
the Lanczos process with full reorthogonalisation (classical Gram–Schmidt twice
against the whole basis, so the basis stays orthonormal to rounding), restarted
thickly (Wu & Simon): every ``krylov`` steps the Ritz vectors of the wanted end of
the spectrum and of its neighbourhood are kept, the others dropped, and the
projected matrix is diagonalised by ``torch.linalg.eigh``. The residual of a Ritz
pair is read off the projected matrix (``|β_m s_m|``, no operator application) and
tested once per restart, the only host read of the loop; the residuals reported
are measured afresh at the end (one block application).

Single-vector Lanczos sees one copy of each eigenvalue from a given start vector.
Missed copies are searched for by deflation: with everything found so far locked
(every new basis vector orthogonal to it), a run from a fresh random vector must
find nothing below the ``k``-th value found; what it finds there is added, and the
search repeats (a check, as in ARPACK-based codes, not a proof: a copy whose
component in every start vector is tiny can still hide).

Examples
--------
>>> import torch
>>> from cellsheaf.lanczos import lanczos
>>> A = torch.diag(torch.arange(1.0, 201.0, dtype=torch.float64))
>>> out = lanczos(lambda X: A @ X, 200, 3, dtype=torch.float64, device="cpu")
>>> [round(v, 8) for v in out.values.tolist()], out.converged
([1.0, 2.0, 3.0], True)
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .lobpcg import LobpcgResult, _dense
from .syncs import check_every

__all__ = ["lanczos", "LanczosResult"]

Operator = Callable[[Tensor], Tensor]

_FRESH = 1e-15  # size of the fresh directions relative to ‖A‖: a few times the rounding of a step
_FLOOR = 1e-100  # their size while ‖A‖ is unknown or 0

LanczosResult = LobpcgResult
"""``values (k,)``, orthonormal ``vectors (n, k)``, ``iterations`` (restarts, over every run),
``applications`` (operator applications to one column), ``residual`` (largest ``‖A v − λ v‖ / scale``),
``converged``, ``next_value`` (an estimate of the eigenvalue just beyond the ``k`` returned)."""


class _Run(NamedTuple):
    values: Tensor      # (c,) Ritz values, ascending, of the converged wanted pairs
    vectors: Tensor     # (c, n) their Ritz vectors (rows)
    next_value: float   # the Ritz value just beyond the wanted ones (nan if none)
    restarts: int
    applications: int
    converged: bool
    scale: float        # the largest |Ritz value| seen (an estimate of ‖A‖ from below)


class _Krylov:
    """One thick-restart Lanczos run for the ``want`` smallest eigenpairs of ``op`` on the orthogonal
    complement of the rows of ``locked``."""

    def __init__(self, op: Operator, n: int, dtype, device, locked: Tensor | None, krylov: int, seed: int):
        self.op, self.n = op, n
        self.l0 = 0 if locked is None else locked.shape[0]
        self.m = min(krylov, n - self.l0)
        self.B = torch.zeros(self.l0 + self.m + 1, n, dtype=dtype, device=device)  # locked rows, then the basis
        if self.l0:
            self.B[:self.l0] = locked
        g = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(n, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
        q = self._orthogonalize(torch.randn(n, generator=g, dtype=torch.float64).to(dtype=dtype, device=device),
                                self.l0)[0]
        self.B[self.l0] = q / q.norm()
        self.T = torch.zeros(self.m + 1, self.m + 1, dtype=dtype, device=device)  # projected matrix (lower)
        self.steps = 0

    def _orthogonalize(self, w: Tensor, top: int) -> tuple[Tensor, Tensor]:
        """``w`` minus its components along the first ``top`` rows of the basis (twice), and the coefficients."""
        if top == 0:
            return w, w.new_zeros(0)
        Q = self.B[:top]
        h = torch.mv(Q, w)
        w = torch.addmv(w, Q.T, h, alpha=-1)
        h2 = torch.mv(Q, w)
        return torch.addmv(w, Q.T, h2, alpha=-1), h + h2

    def _step(self, j: int, fresh: float) -> None:
        """Lanczos step on basis vector ``j`` of the Krylov part: row ``j`` of the projected matrix (its lower
        triangle holds it). ``fresh`` scales a random direction added to ``A q``: far below the tolerance but
        above rounding, so that when the Krylov space is exhausted (``A q`` in the span of the basis: few
        distinct eigenvalues, ``A = 0``) the next basis vector is a new random direction, not rounding noise
        that Gram–Schmidt cannot make orthogonal."""
        l0 = self.l0
        w = self.op(self.B[l0 + j].unsqueeze(1)).squeeze(1)
        w = torch.add(w, self.noise.roll(self.steps * 7919 % self.n), alpha=fresh)
        w, h = self._orthogonalize(w, l0 + j + 1)
        self.steps += 1
        beta = w.norm()
        self.T[j, :j + 1] = h[l0:]
        self.T[j + 1, j] = beta
        torch.div(w, beta, out=self.B[l0 + j + 1])

    def run(self, want: int, tol: float, max_restarts: int) -> _Run:
        """Steps until the ``want`` smallest Ritz pairs have residuals ``<= tol · scale``: tested every
        ``4 · check_every(device)`` steps and at each restart, one host read each."""
        l0, m = self.l0, self.m
        every = 4 * check_every(self.B.device)
        start, restarts, scale = 0, 0, 0.0
        while True:
            for j in range(start, m):
                fresh = max(_FRESH * scale, _FLOOR)
                self._step(j, fresh)
                if scale == 0.0:  # ‖A‖ from below by the first step (one host read): sets the fresh directions
                    scale = float(torch.maximum(self.T[j, j].abs(), self.T[j + 1, j]))
                if j + 1 < m and (j + 1 - start) % every or j + 1 <= want:
                    continue
                theta, Y = torch.linalg.eigh(self.T[:j + 1, :j + 1], UPLO="L")
                res = (self.T[j + 1, j] * Y[j, :want]).abs().max()
                res, top = torch.stack([res, theta.abs().max()]).tolist()  # the loop's only host read
                scale = max(scale, top)
                converged = res <= max(tol * scale, 1e3 * _FLOOR)  # the floor: A = 0
                if converged or (j + 1 == m and restarts + 1 >= max_restarts):
                    V = Y[:, :want].T @ self.B[l0:l0 + j + 1]
                    nxt = float(theta[want]) if want <= j else float("nan")
                    return _Run(theta[:want], V, nxt, restarts + 1, self.steps, converged, scale)
            restarts += 1
            keep = min(m - 1, want + (m - want) // 2)
            kept = Y[:, :keep].T @ self.B[l0:l0 + m]
            self.B[l0:l0 + keep] = kept
            self.B[l0 + keep] = self.B[l0 + m]
            self.T.zero_()
            self.T[:keep, :keep] = torch.diag(theta[:keep])
            start = keep


def lanczos(apply: Operator, n: int, k: int, *, dtype: torch.dtype, device, largest: bool = False,
            tol: float = 1e-10, krylov: int | None = None, max_restarts: int = 500, rounds: int | None = None,
            seed: int = 0) -> LanczosResult:
    """The ``k`` smallest (or largest) eigenpairs of a symmetric ``n × n`` operator by thick-restart Lanczos.

    Parameters
    ----------
    apply : callable
        ``X (n, m) -> A X (n, m)``, on the device and dtype given (called with ``m = 1`` in the
        Lanczos steps and once with ``m = k`` to measure the residuals).
    n, k : int
        Size of the operator and number of eigenpairs, ``1 <= k <= n``.
    largest : bool
        The largest eigenpairs (values descending) instead of the smallest (ascending).
    tol : float
        Converged when every wanted residual ``‖A v − θ v‖ <= tol · scale``, ``scale`` the largest
        ``|θ|`` seen (Lanczos finds the far end of the spectrum early, so it estimates ``‖A‖``).
    krylov : int, optional
        Dimension of the Krylov space between restarts (default ``max(2k + 16, 32)``).
    max_restarts : int
        Restarts of one run before giving up (then ``converged`` is False).
    rounds : int, optional
        Deflation checks for missed copies of repeated eigenvalues (default ``k + 4``); when the
        last one still finds a missed eigenvalue the result is not ``converged``.
    seed : int
        Seed of the random start vectors (drawn on the CPU, so results do not depend on the device).

    Returns
    -------
    LanczosResult
        ``iterations`` counts the restarts of every run, ``applications`` the columns the operator was
        applied to. Small operators (``n <= 3 · krylov``) are solved densely by ``eigh`` of ``A`` built
        column by column.

    Examples
    --------
    >>> import torch
    >>> from cellsheaf.lanczos import lanczos
    >>> A = torch.diag(torch.tensor([0.0, 0.0, 1.0] + [2.0] * 197, dtype=torch.float64))
    >>> out = lanczos(lambda X: A @ X, 200, 3, dtype=torch.float64, device="cpu")
    >>> [round(v, 8) + 0.0 for v in out.values.tolist()]  # the repeated 0 found twice
    [0.0, 0.0, 1.0]
    """
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}], got {k}")
    krylov = krylov if krylov is not None else max(2 * k + 16, 32)
    if krylov <= k:
        raise ValueError(f"krylov must exceed k={k}, got {krylov}")
    if n <= 3 * krylov:
        return _dense(apply, n, k, dtype, device, -1.0 if largest else 1.0)
    sign = -1.0 if largest else 1.0
    op = (lambda X: -apply(X)) if largest else apply
    rounds = k + 4 if rounds is None else rounds
    first = _Krylov(op, n, dtype, device, None, krylov, seed).run(k, tol, max_restarts)
    restarts, applications = first.restarts, first.applications
    values, vectors, nxt = first.values, first.vectors, first.next_value
    converged, scale = first.converged, first.scale
    for r in range(1, rounds + 1):
        if not converged:
            break
        check = _Krylov(op, n, dtype, device, vectors, krylov, seed + r).run(1, math.sqrt(tol), max_restarts)
        restarts, applications = restarts + check.restarts, applications + check.applications
        scale = max(scale, check.scale)
        if not bool(check.values[0] < values[-1]):  # the Ritz value bounds the complement's least from above
            nxt = min(nxt, float(check.values[0])) if nxt == nxt else float(check.values[0])
            break
        # something was missed below the k-th value: find it (and its neighbours) to full accuracy
        found = _Krylov(op, n, dtype, device, vectors, krylov, seed + r).run(min(k, 3), tol, max_restarts)
        restarts, applications = restarts + found.restarts, applications + found.applications
        converged, scale = found.converged, max(scale, found.scale)
        values, order = torch.cat([values, found.values]).sort()
        vectors = torch.cat([vectors, found.vectors])[order]
        if values.numel() > k:
            nxt = float(values[k])
            values, vectors = values[:k], vectors[:k]
        converged = converged and r < rounds  # the last round found something: copies may still hide
    if scale <= 1e3 * _FLOOR:  # A = 0 (numerically): its Ritz values are the fresh directions' level
        values, nxt = torch.zeros_like(values), 0.0
    V = vectors.T.contiguous()
    AV = op(V)
    res = float((AV - V * values).norm(dim=0).max()) / max(scale, torch.finfo(dtype).tiny)
    return LanczosResult(sign * values, V, restarts, applications + k, res, converged, sign * nxt)
