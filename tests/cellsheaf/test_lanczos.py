"""Thick-restart Lanczos against dense eigendecompositions."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellsheaf import syncs
from cellsheaf.lanczos import lanczos


def spd(n: int, seed: int, repeated: int = 0, copies: int = 1) -> torch.Tensor:
    """A random PSD matrix; ``repeated`` zero eigenvalues, and every other eigenvalue ``copies`` times."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    w = (torch.rand(-(-n // copies), generator=g, dtype=torch.float64) * 10).repeat_interleave(copies)[:n]
    w[:repeated] = 0.0
    return (Q * w) @ Q.T


def check(out, A: torch.Tensor, k: int, largest: bool = False) -> None:
    w = torch.linalg.eigvalsh(A)
    want = w.flip(0)[:k] if largest else w[:k]
    assert out.converged and out.residual <= 1e-10
    torch.testing.assert_close(out.values, want, atol=1e-9, rtol=0)
    torch.testing.assert_close(out.vectors.T @ out.vectors, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(A @ out.vectors, out.vectors * out.values, atol=1e-8, rtol=0)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6), st.booleans())
def test_lanczos_matches_eigh(seed, k, largest):
    A = spd(150, seed)
    out = lanczos(lambda X: A @ X, 150, k, dtype=torch.float64, device="cpu", largest=largest, krylov=k + 12)
    check(out, A, k, largest)
    w = torch.linalg.eigvalsh(A)
    nxt = w.flip(0)[k] if largest else w[k]
    assert out.next_value == pytest.approx(float(nxt), abs=1e-6)
    assert out.applications > 0 and out.iterations > 0


@pytest.mark.parametrize("repeated, copies", [(6, 1), (0, 3)])
def test_lanczos_finds_repeated_eigenvalues(repeated, copies):
    """Single-vector Lanczos sees one copy of each eigenvalue; the deflation rounds find the others."""
    A = spd(240, 3, repeated=repeated, copies=copies)
    out = lanczos(lambda X: A @ X, 240, 8, dtype=torch.float64, device="cpu")
    check(out, A, 8)


def test_lanczos_on_the_zero_operator_and_an_exhausted_krylov_space():
    Z = torch.zeros(300, 300, dtype=torch.float64)
    out = lanczos(lambda X: Z @ X, 300, 4, dtype=torch.float64, device="cpu")
    check(out, Z, 4)
    D = torch.diag(torch.tensor([1.0, 2.0] * 150, dtype=torch.float64))  # two distinct eigenvalues only
    check(lanczos(lambda X: D @ X, 300, 3, dtype=torch.float64, device="cpu"), D, 3)


def test_lanczos_reports_non_convergence_and_bad_arguments():
    A = spd(400, 4)
    out = lanczos(lambda X: A @ X, 400, 4, dtype=torch.float64, device="cpu", max_restarts=1, krylov=8)
    assert not out.converged and out.residual > 1e-10
    small = spd(20, 5)
    torch.testing.assert_close(lanczos(lambda X: small @ X, 20, 3, dtype=torch.float64, device="cpu").values,
                               torch.linalg.eigvalsh(small)[:3])  # small operators go dense
    with pytest.raises(ValueError, match="k must lie"):
        lanczos(lambda X: A @ X, 400, 0, dtype=torch.float64, device="cpu")
    with pytest.raises(ValueError, match="krylov must exceed"):
        lanczos(lambda X: A @ X, 400, 4, dtype=torch.float64, device="cpu", krylov=4)


def test_lanczos_reads_the_host_once_per_check(monkeypatch):
    A = spd(300, 6)
    monkeypatch.setattr(syncs, "CHECK_EVERY", 8)  # as off the CPU: a test every 32 steps or at a restart
    with syncs.count_syncs() as n:
        out = lanczos(lambda X: A @ X, 300, 3, dtype=torch.float64, device="cpu")
    check(out, A, 3)
    assert n[0] <= out.applications // 20 + 12


def test_docstring_examples_run():
    import doctest
    import sys

    result = doctest.testmod(sys.modules["cellsheaf.lanczos"])
    assert result.failed == 0 and result.attempted > 0
