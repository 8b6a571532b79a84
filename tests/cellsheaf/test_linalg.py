"""Batched preconditioned CG against dense solves."""

import numpy as np
import pytest
import scipy.linalg as sla
import scipy.sparse as sp
import torch

from cellsheaf.linalg import block_jacobi, cg


def spd(n, seed, cond=100.0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)) @ Q.T


@pytest.mark.parametrize("grad_mode", [True, False])
@pytest.mark.parametrize("precond", [True, False])
def test_batched_cg_matches_solve(grad_mode, precond):
    """In place (no grad) and on copies (grad mode), with and without a preconditioner."""
    A = spd(30, 0)
    b = torch.randn(4, 30, dtype=torch.float64)
    with torch.set_grad_enabled(grad_mode):
        x, info = cg(lambda v: v @ A, b, precond=(lambda r: r / torch.diagonal(A)) if precond else None,
                     tol=1e-13)
    assert info.converged and info.residual <= 1e-13
    torch.testing.assert_close(x, torch.linalg.solve(A, b.T).T, rtol=0, atol=1e-10)


def test_cg_reports_non_convergence():
    A = spd(50, 1, cond=1e8)
    x, info = cg(lambda v: v @ A, torch.randn(2, 50, dtype=torch.float64), maxiter=3)
    assert not info.converged and info.iterations == 3 and "tol" in info.message


def test_cg_detects_indefinite():
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    _, info = cg(lambda v: v @ A, torch.ones(1, 2, dtype=torch.float64))
    assert not info.converged and "positive definite" in info.message


def test_zero_rhs_and_unbatched():
    A = spd(5, 2)
    x, info = cg(lambda v: v @ A, torch.zeros(5, dtype=torch.float64))
    assert info.converged and x.shape == (5,) and x.abs().max() == 0


def test_autograd_differentiates_through_cg():
    A = spd(8, 3).requires_grad_()
    b = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    x, _ = cg(lambda v: v @ A, b, tol=1e-14)
    ref = torch.linalg.solve(A, b.T).T
    g = torch.randn(2, 8, dtype=torch.float64)
    grads = torch.autograd.grad((x * g).sum(), (A, b))
    expected = torch.autograd.grad((ref * g).sum(), (A, b))
    torch.testing.assert_close(grads[1], expected[1], rtol=0, atol=1e-8)
    sym = lambda G: (G + G.T) / 2  # CG sees A as symmetric: compare along symmetric perturbations
    torch.testing.assert_close(sym(grads[0]), sym(expected[0]), rtol=0, atol=1e-8)


def test_converged_only_on_the_true_residual():
    # an operator that changes after a few products: the recursive residual keeps shrinking, the true one does not
    A = spd(20, 4)
    calls = {"n": 0}

    def drifting(v):
        calls["n"] += 1
        return v @ (A if calls["n"] < 5 else 1.5 * A)

    b = torch.randn(3, 20, dtype=torch.float64)
    x, info = cg(drifting, b, tol=1e-10, restarts=0)
    true = ((b - x @ (1.5 * A)).norm(dim=-1) / b.norm(dim=-1)).max()
    assert info.residual == pytest.approx(float(true), rel=1e-6)
    assert info.converged == (float(true) <= 1e-10)
    # with restarts from the true residual, CG recovers on the (now fixed) operator
    calls["n"] = 0
    x, info = cg(drifting, b, tol=1e-10)
    assert info.converged
    torch.testing.assert_close(x @ (1.5 * A), b, rtol=0, atol=1e-8)


def test_jacobi_tensor_preconditioner_matches_callable():
    A = spd(25, 5, cond=1e4)
    b = torch.randn(2, 25, dtype=torch.float64)
    dinv = 1 / torch.diagonal(A)
    with torch.no_grad():
        x1, i1 = cg(lambda v: v @ A, b, precond=dinv, tol=1e-10)
        x2, i2 = cg(lambda v: v @ A, b, precond=lambda r: r * dinv, tol=1e-10)
    assert i1.converged and i1.iterations == i2.iterations
    torch.testing.assert_close(x1, x2, rtol=0, atol=1e-10)


@pytest.mark.parametrize("owner", [[0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 1, 2, 2, 2, 3, 4, 4]])
def test_block_jacobi_inverts_the_diagonal_blocks(owner):
    """Equal blocks (batched directly) and blocks of different widths (padded) against scipy's block inverse."""
    A = spd(9, 3).numpy()
    owner = np.array(owner)
    M = block_jacobi(sp.csr_matrix(A), owner)
    blocks = [A[np.ix_(owner == b, owner == b)] for b in np.unique(owner)]
    ref = sla.block_diag(*[np.linalg.inv(B) for B in blocks])
    R = torch.randn(5, 9, dtype=torch.float64)
    torch.testing.assert_close(M(R), torch.as_tensor(R.numpy() @ ref.T), rtol=1e-12, atol=1e-12)
    x, info = cg(lambda v: v @ torch.as_tensor(A), R, precond=M)
    assert info.converged
    torch.testing.assert_close(x @ torch.as_tensor(A), R, rtol=0, atol=1e-10)


def test_block_jacobi_refuses_an_indefinite_block():
    A = sp.csr_matrix(np.diag([1.0, -1.0, 2.0]))
    assert block_jacobi(A, np.array([0, 0, 1])) is None


def as_csr(A: torch.Tensor) -> torch.Tensor:
    return A.to_sparse_csr()


@pytest.mark.parametrize("layout", ["dense", "csr", "coo"])
@pytest.mark.parametrize("columns", [False, True])
def test_a_matrix_operator_matches_solve(monkeypatch, layout, columns):
    """``A`` given as the matrix (dense, CSR, COO) solves as the callable does; ``columns``: a tiny
    `COLUMN_BYTES` sends the CSR batch down the column-by-column route (sparse matrix-vector products)."""
    import cellsheaf.linalg as la

    if columns:
        monkeypatch.setattr(la, "COLUMN_BYTES", 0)
    A = spd(40, 5)
    M = {"dense": A, "csr": as_csr(A), "coo": A.to_sparse()}[layout]
    b = torch.randn(5, 40, dtype=torch.float64)
    x0 = torch.randn(5, 40, dtype=torch.float64)
    with torch.no_grad():
        assert la.by_columns(M, b) == (columns and layout == "csr")
        x, info = cg(M, b, precond=1.0 / torch.diagonal(A), x0=x0, tol=1e-13)
        xr, ref = cg(lambda v: v @ A, b, precond=1.0 / torch.diagonal(A), x0=x0, tol=1e-13)
    assert info.converged and info.residual <= 1e-13
    torch.testing.assert_close(x, torch.linalg.solve(A, b.T).T, rtol=0, atol=1e-10)
    assert abs(info.iterations - ref.iterations) <= 2  # the most any column took (products round differently)


def test_the_column_route_reports_the_worst_column(monkeypatch):
    import cellsheaf.linalg as la

    monkeypatch.setattr(la, "COLUMN_BYTES", 0)
    A = spd(50, 1, cond=1e8)
    b = torch.randn(3, 50, dtype=torch.float64)
    with torch.no_grad():
        x, info = cg(as_csr(A), b, maxiter=3)
        _, ref = cg(lambda v: v @ A, b, maxiter=3)
    assert not info.converged and info.iterations == 3 and "tol" in info.message
    assert info.residual == pytest.approx(ref.residual, rel=1e-10)
    _, info = cg(as_csr(torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64))),
                 torch.ones(2, 3, dtype=torch.float64))
    assert not info.converged and "positive definite" in info.message


def test_route_choice():
    """Column by column only for a CPU CSR matrix, a batch above `COLUMN_BYTES`, and grad mode off (autograd
    then differentiates through the batched products)."""
    import cellsheaf.linalg as la

    A = as_csr(spd(4, 0))
    n = la.COLUMN_BYTES // 8 // 2 + 1  # two float64 rows exceed the bound
    big, one = torch.zeros(2, n, dtype=torch.float64), torch.zeros(1, n, dtype=torch.float64)
    with torch.no_grad():
        assert la.by_columns(A, big) and not la.by_columns(A, one)
        assert not la.by_columns(A.to_dense(), big) and not la.by_columns(A, big[:, :8])
    assert not la.by_columns(A, big)


def test_the_sparse_products_are_exact_and_written_into_the_workspace():
    """The CSR product reads 32-bit indices and writes into the solve's workspace (``out``) when one is given."""
    from cellsheaf.linalg import _index32, _product

    A = spd(30, 2)
    S = as_csr(A)
    assert _index32(S).col_indices().dtype == torch.int32
    w = torch.randn(1, 30, dtype=torch.float64)
    out = torch.empty(1, 30, dtype=torch.float64)
    with torch.no_grad():
        y = _product(S)(w, out)
        assert y.data_ptr() == out.data_ptr()
        torch.testing.assert_close(y, w @ A, rtol=1e-14, atol=1e-13)
        W = torch.randn(3, 30, dtype=torch.float64)
        torch.testing.assert_close(_product(S)(W, None), W @ A, rtol=1e-14, atol=1e-13)
        out3 = torch.empty(3, 30, dtype=torch.float64)
        assert _product(A)(W, out3).data_ptr() == out3.data_ptr()


def test_autograd_through_a_csr_matrix_operator():
    A = spd(8, 3)
    b = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    x, _ = cg(as_csr(A), b, tol=1e-14)
    g = torch.randn(2, 8, dtype=torch.float64)
    grad, = torch.autograd.grad((x * g).sum(), b)
    torch.testing.assert_close(grad, torch.linalg.solve(A, g.T).T, rtol=0, atol=1e-8)
