"""LOBPCG and the deflated CG solve against dense eigendecompositions and solves."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellsheaf.lobpcg import deflated_solve, lobpcg


def spd(n: int, seed: int, repeated: int = 0) -> torch.Tensor:
    """A random PSD matrix; with ``repeated`` its smallest eigenvalue has that multiplicity."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    w = torch.rand(n, generator=g, dtype=torch.float64) * 10
    if repeated:
        w[:repeated] = 0.0
    return (Q * w) @ Q.T


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 5), st.booleans())
def test_lobpcg_matches_eigh(seed, k, largest):
    A = spd(80, seed)
    out = lobpcg(lambda X: A @ X, 80, k, dtype=torch.float64, device="cpu", largest=largest, block=k + 4)
    w, V = torch.linalg.eigh(A)
    want = w.flip(0)[:k] if largest else w[:k]
    assert out.converged and out.residual <= 1e-10
    torch.testing.assert_close(out.values, want, atol=1e-8, rtol=0)
    torch.testing.assert_close(out.vectors.T @ out.vectors, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(A @ out.vectors, out.vectors * out.values, atol=1e-7, rtol=0)
    nxt = w.flip(0)[k] if largest else w[k]
    assert out.next_value == pytest.approx(float(nxt), abs=1e-4)


def test_lobpcg_finds_a_repeated_kernel():
    A = spd(200, 3, repeated=6)
    out = lobpcg(lambda X: A @ X, 200, 8, dtype=torch.float64, device="cpu")
    np.testing.assert_allclose(out.values.numpy(), torch.linalg.eigvalsh(A)[:8].numpy(), atol=1e-8)


def test_lobpcg_reports_non_convergence():
    A = spd(300, 4)
    out = lobpcg(lambda X: A @ X, 300, 4, dtype=torch.float64, device="cpu", maxiter=2)
    assert not out.converged and out.iterations == 2 and out.residual > 1e-10


def test_lobpcg_small_operators_go_dense_and_bad_k_raises():
    A = spd(20, 5)
    out = lobpcg(lambda X: A @ X, 20, 3, dtype=torch.float64, device="cpu")
    torch.testing.assert_close(out.values, torch.linalg.eigvalsh(A)[:3])
    with pytest.raises(ValueError, match="k must lie"):
        lobpcg(lambda X: A @ X, 20, 0, dtype=torch.float64, device="cpu")


@pytest.mark.parametrize("largest", [False, True])
def test_deflated_solve_is_the_pseudo_inverse_on_the_complement(largest):
    A = spd(60, 6)
    w, V = torch.linalg.eigh(A)
    idx = torch.arange(59, 56, -1) if largest else torch.arange(3)
    Vk, lam = V[:, idx], w[idx]
    G = torch.randn(60, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    Y, iters, rel = deflated_solve(lambda X: A @ X, Vk, lam, G, largest=largest)
    assert rel <= 1e-12 and iters > 0
    Q = torch.eye(60, dtype=torch.float64) - Vk @ Vk.T
    for i in range(3):
        want = torch.linalg.lstsq(Q @ (A - lam[i] * torch.eye(60, dtype=torch.float64)) @ Q, Q @ G[:, i]).solution
        torch.testing.assert_close(Y[:, i], Q @ want, atol=1e-9, rtol=0)


def test_docstring_examples_run():
    import doctest
    import sys

    result = doctest.testmod(sys.modules["cellsheaf.lobpcg"])
    assert result.failed == 0 and result.attempted > 0
