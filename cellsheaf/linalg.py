"""Batched linear algebra shared by the solvers: preconditioned conjugate gradients, block-Jacobi preconditioners.

Examples
--------
>>> import torch
>>> from cellsheaf.linalg import cg
>>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
>>> x, info = cg(lambda v: v @ A, torch.tensor([[1.0, 2.0]], dtype=torch.float64))
>>> info.converged, torch.allclose(x @ A, torch.tensor([[1.0, 2.0]], dtype=torch.float64))
(True, True)
"""

from __future__ import annotations

import warnings
from typing import Callable, Union

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from .results import SolveInfo
from .syncs import check_every

__all__ = ["cg", "block_jacobi", "by_columns", "COLUMN_BYTES"]


Operator = Union[Callable[[Tensor], Tensor], Tensor]

#: a CPU sparse ``A`` whose batch of iterates holds more than this many bytes is solved one column after the
#: other (scipy's way): each column's vectors then stay in the cache, and the product is a sparse
#: matrix-vector product streaming ``A`` once per column (measured in benchmarks/bench_core.py, row ``cg``)
COLUMN_BYTES = 1 << 23


def cg(
    A: Operator,
    b: Tensor,
    precond: Callable[[Tensor], Tensor] | Tensor | None = None,
    x0: Tensor | None = None,
    tol: float | Tensor = 1e-12,
    maxiter: int | None = None,
    restarts: int = 2,
) -> tuple[Tensor, SolveInfo]:
    """Solve ``A x = b`` for a batch of right-hand sides ``b`` of shape ``(B, n)`` by preconditioned CG.

    ``A`` is a callable mapping ``(B, n) -> (B, n)``, symmetric positive (semi)definite on each row,
    or the matrix itself: a dense or sparse (CSR, COO) tensor ``(n, n)``. With a matrix, CG applies it
    into a workspace of the solve (no fresh ``(B, n)`` block per product), and on the CPU a batch whose
    iterates exceed `COLUMN_BYTES` is solved column after column (each column's vectors stay in the
    cache; the product is a sparse matrix-vector product with 32-bit indices), else all columns at
    once. ``precond`` applies an SPD approximation of ``A⁻¹``: a callable (row-wise), or a tensor
    ``(n,)`` of inverse diagonal entries (Jacobi, applied in place). Each row stops when its
    recursively updated residual meets ``‖r‖ <= tol · ‖b‖``; then the *true* residual ``‖b − A x‖``
    is computed, and CG restarts from ``x`` (at most ``restarts`` times) while it misses ``tol``:
    rounding can make the recursive residual much smaller than the true one, and "converged" is only
    reported on the true residual. The convergence test is read on the host once every
    `cellsheaf.syncs.check_every` iterations (every iteration on the CPU, every 8 on a GPU; rows that
    have converged stop moving in between), and the true residual once per attempt; ``tol`` may be a
    0-dim tensor on the device (no read to pass it). Under ``torch.no_grad()`` the iterates are
    updated in place (no fresh ``(B, n)`` block per step); with grad mode on, autograd can
    differentiate through the iterations.

    Returns
    -------
    x : tensor ``(B, n)``
    info : SolveInfo
        A [`SolveInfo`][cellsheaf.results.SolveInfo]: ``converged`` is True only if every row's true residual met ``tol``;
        ``residual`` is the largest true relative residual; ``iterations`` the most any column took.
    """
    squeeze = b.dim() == 1
    b = b.unsqueeze(0) if squeeze else b
    x0 = x0.unsqueeze(0) if x0 is not None and x0.dim() == 1 else x0
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    product = _product(A) if isinstance(A, Tensor) else (lambda w, out: A(w))
    if isinstance(A, Tensor) and by_columns(A, b):  # each column in place in its row of x
        infos = [_solve(product, b[k:k + 1], x[k:k + 1], x0 is not None, precond, tol, maxiter, restarts)[1]
                 for k in range(b.shape[0])]
        info = SolveInfo("cg", all(i.converged for i in infos), max(i.iterations for i in infos),
                         max(i.residual for i in infos), message=next((i.message for i in infos if i.message), ""))
    else:
        x, info = _solve(product, b, x, x0 is not None, precond, tol, maxiter, restarts)
    return (x[0] if squeeze else x), info


def by_columns(A: Tensor, b: Tensor) -> bool:
    """Whether `cg` solves ``A x = b`` (``b`` of shape ``(B, n)``) one column after the other: ``A`` is a
    CPU sparse CSR matrix, nothing is differentiated through the iterations (grad mode off), and the
    batch has more than one row and more than `COLUMN_BYTES` bytes."""
    return (not torch.is_grad_enabled() and A.layout == torch.sparse_csr and A.device.type == "cpu"
            and b.shape[0] > 1 and b.numel() * b.element_size() > COLUMN_BYTES)


def _index32(A: Tensor) -> Tensor:
    """CSR ``A`` with 32-bit indices when they fit (a product reads a third fewer bytes), else ``A``."""
    if A.crow_indices().dtype == torch.int32 or max(A.values().numel(), A.shape[1]) >= 2 ** 31:
        return A
    with warnings.catch_warnings():  # torch calls its CSR support beta
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        return torch.sparse_csr_tensor(A.crow_indices().to(torch.int32), A.col_indices().to(torch.int32),
                                       A.values(), A.shape, check_invariants=False)


Product = Callable[[Tensor, "Tensor | None"], Tensor]


def _product(A: Tensor) -> Product:
    """``(w (B, n), out) -> w Aᵀ`` (``A`` applied to every row), written into ``out`` when it is given (the
    solve's workspace, only passed with grad mode off): one sparse matrix-vector product for one row of a
    CPU CSR ``A``, else one matrix product."""
    if A.layout == torch.strided:
        return lambda w, out: w @ A.T if out is None else torch.mm(w, A.T, out=out)
    if A.layout == torch.sparse_csr and A.device.type == "cpu":
        A32 = _index32(A)

        def csr(w: Tensor, out: Tensor | None) -> Tensor:
            if w.shape[0] != 1 or torch.is_grad_enabled():
                return (A @ w.T).T
            if out is None:
                return torch.mv(A32, w[0]).unsqueeze(0)
            torch.mv(A32, w[0], out=out[0])
            return out
        return csr
    return lambda w, out: (A @ w.T).T


def _solve(product: Product, b: Tensor, x: Tensor, started: bool, precond, tol, maxiter: int | None,
           restarts: int) -> tuple[Tensor, SolveInfo]:
    """CG attempts from ``x`` (``started``: ``x`` is a guess, else zero) until the true residual meets ``tol``."""
    n = b.shape[-1]
    maxiter = maxiter or max(10 * n, 100)
    bnorm = b.norm(dim=-1).clamp_min(torch.finfo(b.dtype).tiny)
    inplace = not torch.is_grad_enabled()  # in place saves a fresh (B, n) block per update; autograd needs copies
    it, message = 0, ""
    r = b - product(x, None) if started else b.clone()
    for attempt in range(restarts + 1):
        x, r, steps, message = _cg_run(product, x, r, bnorm, precond, tol, maxiter, it, inplace)
        true = b - product(x, None)
        rel = (true.norm(dim=-1) / bnorm).detach()
        worst = rel.max() if rel.numel() else rel.new_zeros(())
        # one host read per attempt: the worst true residual, whether it misses tol (and the iterations)
        read = [worst, (worst > tol).to(worst.dtype)] + ([steps.to(worst.dtype)] if isinstance(steps, Tensor) else [])
        worst, missed, *counted = torch.stack(read).tolist()
        it += int(counted[0]) if counted else steps
        if message or it >= maxiter or not missed:
            break
        r = true  # the recursion drifted: restart from the true residual
    converged = not missed and not message
    if not converged and not message:
        message = f"CG stopped after {it} iterations with true relative residual {worst:.3g} > tol {float(tol):.3g}"
    return x, SolveInfo("cg", converged, it, worst, message=message)


def _cg_run(product: Product, x: Tensor, r: Tensor, bnorm: Tensor, precond, tol, maxiter: int, it: int,
            inplace: bool):
    """CG iterations from ``(x, r)`` until the recursive residuals meet ``tol`` or ``maxiter``.

    Returns ``(x, r, steps, message)``: ``steps`` counts the iterations with a row still at work
    (a device tensor when the test is read every few iterations, an int when every one). Reading
    every few iterations, the first read comes after the first few (a system solved from the
    start only runs masked iterations until then)."""
    jacobi = isinstance(precond, Tensor)

    def apply_M(r: Tensor, out: Tensor | None) -> Tensor:
        if jacobi:
            return torch.mul(r, precond, out=out) if out is not None else r * precond
        return precond(r) if precond else r

    z = apply_M(r, None)
    p = z.clone()
    Ap = torch.empty_like(p) if inplace else None  # the workspace of the products
    rz = torch.linalg.vecdot(r, z)
    rel = (r.norm(dim=-1) / bnorm).detach()
    every = check_every(r.device)
    broken = torch.zeros((), dtype=torch.bool, device=r.device)
    steps = torch.zeros((), dtype=torch.long, device=r.device)  # iterations with a row still at work
    message, k = "", 0
    while it + k < maxiter:
        if k % every == 0 and (k or every == 1):  # the loop's only host read: fused, every `every` iterations
            working, broke = torch.stack([(rel > tol).any(), broken]).tolist()
            if broke:
                message = "the operator is not positive definite along a search direction (singular system?)"
                break
            if not working:
                break
        Ap = product(p, Ap)
        pAp = torch.linalg.vecdot(p, Ap)
        active = rel > tol
        broken = broken | (active & (pAp <= 0)).any()
        active = active & (pAp > 0)  # a row that broke down stops here; the next check reports it
        step = torch.where(active, rz / torch.where(active, pAp, torch.ones_like(pAp)), torch.zeros_like(rz))
        x = _axpy(x, step.unsqueeze(-1), p, inplace)
        r = _axpy(r, -step.unsqueeze(-1), Ap, inplace)
        z = apply_M(r, z if (inplace and jacobi) else None)
        rz_new = torch.linalg.vecdot(r, z)
        beta = torch.where(active, rz_new / torch.where(rz == 0, torch.ones_like(rz), rz), torch.zeros_like(rz))
        p = p.mul_(beta.unsqueeze(-1)).add_(z) if inplace else torch.addcmul(z, beta.unsqueeze(-1), p)
        rz = rz_new
        rel = (r.norm(dim=-1) / bnorm).detach()
        steps = steps + active.any()
        k += 1
    return x, r, (steps if every > 1 else k), message


def _axpy(y: Tensor, a: Tensor, v: Tensor, inplace: bool) -> Tensor:
    """``y + a v`` (``a`` broadcast over the rows), overwriting ``y`` when ``inplace``."""
    return y.addcmul_(a, v) if inplace else torch.addcmul(y, a, v)


def block_jacobi(A: sp.spmatrix, owner: np.ndarray, dtype: torch.dtype = torch.float64,
                 device=None) -> Callable[[Tensor], Tensor] | None:
    """The block-Jacobi preconditioner of an SPD ``A``: the inverse of its diagonal blocks, applied batched.

    ``owner`` (non-decreasing, one entry per row) groups consecutive rows into blocks, e.g. the
    coordinates of one vertex stalk. The blocks are inverted once (batched, padded to the widest
    block with the identity); the returned callable maps ``(B, n) -> (B, n)``. Returns ``None`` when a
    diagonal block is not positive definite (then ``A`` is not SPD; use Jacobi instead).

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp, torch
    >>> A = sp.csr_matrix(np.array([[4.0, 1, 0], [1, 3, 1], [0, 1, 2]]))
    >>> M = block_jacobi(A, np.array([0, 0, 1]))
    >>> z = M(torch.tensor([[5.0, 4.0, 2.0]], dtype=torch.float64))  # [[4, 1], [1, 3]]⁻¹ [5, 4] and 2 / 2
    >>> torch.allclose(z, torch.ones(1, 3, dtype=torch.float64))
    True
    """
    n = A.shape[0]
    owner = np.asarray(owner)
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]]) if n else np.zeros(0, np.int64)
    width = np.diff(np.r_[starts, n])
    nb, w = starts.size, int(width.max(initial=1))
    block = np.repeat(np.arange(nb), width)
    local = np.arange(n) - starts[block]
    coo = A.tocoo()
    same = block[coo.row] == block[coo.col]
    blocks = np.zeros((nb, w, w))
    blocks[block[coo.row[same]], local[coo.row[same]], local[coo.col[same]]] = coo.data[same]
    pad = np.arange(w)[None, :] >= width[:, None]  # identity on the padding
    blocks[:, np.arange(w), np.arange(w)] += pad
    try:
        chol = np.linalg.cholesky(blocks)
    except np.linalg.LinAlgError:
        return None
    eye = np.broadcast_to(np.eye(w), blocks.shape)
    inv_chol = np.linalg.solve(chol, eye)
    inv = torch.as_tensor(np.ascontiguousarray(inv_chol.transpose(0, 2, 1) @ inv_chol)).to(dtype=dtype, device=device)
    if (width == w).all():
        def apply(r: Tensor) -> Tensor:
            return torch.bmm(inv, r.reshape(r.shape[0], nb, w).permute(1, 2, 0)).permute(2, 0, 1).reshape(r.shape)
        return apply
    pos = torch.as_tensor(block * w + local, device=device)

    def apply_padded(r: Tensor) -> Tensor:
        R = r.new_zeros(r.shape[0], nb * w).index_copy_(1, pos, r)
        Z = torch.bmm(inv, R.reshape(r.shape[0], nb, w).permute(1, 2, 0)).permute(2, 0, 1).reshape(r.shape[0], -1)
        return Z.index_select(1, pos)
    return apply_padded
