"""Host reads of the iterative loops: fused, every `check_every` iterations, same answers."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

import cellsheaf as cs
from cellsheaf import gauss_newton, syncs
from cellsheaf.linalg import cg
from cellsheaf.lobpcg import lobpcg
from tests.neural_shapes import NeuralShape


def spd_system(n: int = 120, B: int = 6):
    g = torch.Generator().manual_seed(0)
    M = torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5
    A = M @ M.T + 0.1 * torch.eye(n, dtype=torch.float64)
    return A, torch.randn(B, n, generator=g, dtype=torch.float64)


def test_check_every_by_device_and_override(monkeypatch):
    assert syncs.check_every(torch.device("cpu")) == 1
    assert syncs.check_every(torch.device("meta")) == syncs.DEVICE_CHECK_EVERY == 8
    monkeypatch.setattr(syncs, "CHECK_EVERY", 5)
    assert syncs.check_every("cpu") == 5


def test_cg_reads_once_per_iteration_on_the_cpu_and_every_k_when_asked(monkeypatch):
    A, b = spd_system()
    with syncs.count_syncs() as n1:
        x1, info1 = cg(lambda v: v @ A, b, tol=1e-12)
    assert info1.converged and n1[0] <= info1.iterations + 4          # was two reads per iteration
    monkeypatch.setattr(syncs, "CHECK_EVERY", 8)
    with syncs.count_syncs() as n8:
        x8, info8 = cg(lambda v: v @ A, b, tol=1e-12)
    assert info8.converged and info8.iterations == info1.iterations   # converged rows stop moving in between
    assert n8[0] <= info8.iterations // 8 + 6
    torch.testing.assert_close(x8, x1, rtol=0, atol=1e-10)
    torch.testing.assert_close(x8 @ A, b, rtol=0, atol=1e-9)


def test_cg_still_reports_a_breakdown(monkeypatch):
    monkeypatch.setattr(syncs, "CHECK_EVERY", 8)
    A = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64))
    x, info = cg(lambda v: v @ A, torch.ones(1, 3, dtype=torch.float64))
    assert not info.converged and "not positive definite" in info.message


def test_diffusion_checks_every_k_steps_and_still_catches_divergence(monkeypatch):
    n = 30
    S = cs.Sheaf.from_arrays([1] * n, torch.stack([torch.arange(n - 1), torch.arange(1, n)]),
                             torch.ones(n - 1, 1, 1, dtype=torch.float64), torch.ones(n - 1, 1, 1, dtype=torch.float64))
    x0 = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    b = cs.Boundary().fix(0, torch.zeros(2, 1, dtype=torch.float64))
    one = cs.diffuse(S, x0, boundary=b, tol=1e-8, max_steps=100_000)
    monkeypatch.setattr(syncs, "CHECK_EVERY", 8)
    with syncs.count_syncs() as n8:
        eight = cs.diffuse(S, x0, boundary=b, tol=1e-8, max_steps=100_000)
    assert one.converged and eight.converged
    assert one.steps <= eight.steps < one.steps + 8                   # at most 7 steps past convergence
    assert n8[0] < eight.steps // 4
    torch.testing.assert_close(eight.x.flat, torch.zeros(2, n, dtype=torch.float64), rtol=0, atol=1e-6)
    huge = torch.full((2, n), 1e308, dtype=torch.float64)
    huge[:, ::2] = -1e308                                             # finite, but L x overflows
    with pytest.raises(FloatingPointError, match="diverged at step"):
        cs.diffuse(S, huge, boundary=b, tol=1e-8, max_steps=10_000)


def test_lobpcg_checks_every_k_iterations(monkeypatch):
    A, _ = spd_system(200)
    w = torch.linalg.eigvalsh(A)
    monkeypatch.setattr(syncs, "CHECK_EVERY", 8)
    with syncs.count_syncs() as n:
        out = lobpcg(lambda X: A @ X, 200, 3, dtype=torch.float64, device="cpu")
    assert out.converged and out.residual <= 1e-10
    torch.testing.assert_close(out.values, w[:3], rtol=0, atol=1e-9)
    assert n[0] <= out.iterations // 8 + 6


def _pinned_relu_network(batch: int = 16):
    """A [2, 10, 8, 1] ReLU network sheaf with its output soft-pinned: Newton with kinks, a few iterations."""
    net = NeuralShape([2, 10, 8, 1], seed=2)
    Y = torch.randn(batch, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return net.S, cs.soft_pin(net.S, "y", Y, strength=0.5).boundary(net.boundary(net.random_input(batch, seed=4)))


def _newton_reads(monkeypatch, S, b) -> tuple[cs.Result, int, int]:
    """Minimise by Newton counting the host reads: ``(result, reads of the Newton loop, reads of its CG solves)``."""
    inner = [0]

    def counted_cg(*args, **kwargs):
        with syncs.count_syncs() as n:
            out = cg(*args, **kwargs)
        inner[0] += n[0]
        return out

    monkeypatch.setattr(gauss_newton, "cg", counted_cg)
    newton, counts = gauss_newton.newton, [0]

    def counted_newton(*args, **kwargs):
        with syncs.count_syncs() as n:
            out = newton(*args, **kwargs)
        counts[0] = n[0]
        return out

    monkeypatch.setattr(sys.modules["cellsheaf.minimize"], "newton", counted_newton)
    res = cs.minimize(S, b, method="newton", tol=1e-10)
    return res, counts[0] - inner[0], inner[0]


@pytest.mark.parametrize("every", [1, 8])
def test_newton_reads_a_few_flags_per_iteration(monkeypatch, every):
    """One read for the loop's decisions, about one for the line searches (was 38 per iteration)."""
    S, b = _pinned_relu_network()
    reference = cs.minimize(S, b, method="newton", tol=1e-10)
    monkeypatch.setattr(syncs, "CHECK_EVERY", every)
    res, own, in_cg = _newton_reads(monkeypatch, S, b)
    assert res.converged and reference.converged and res.iterations == reference.iterations >= 2
    torch.testing.assert_close(res.x.flat, reference.x.flat, rtol=0, atol=1e-9)
    assert own <= 3 * res.iterations + 3
    if every == 8:
        assert in_cg <= 3 * res.iterations


def test_newton_still_names_the_edge_of_a_non_finite_energy():
    S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1); S.add_vertex("c", 1)
    S.add_edge("a", "b", cs.maps.Function(lambda t: 1.0 / t, 1, 1, name="inv"), cs.maps.Identity(1), name="bad")
    S.add_edge("b", "c", cs.maps.Tanh(1), cs.maps.Identity(1), name="ok")
    with pytest.raises(FloatingPointError, match="energy of edge 'bad' is not finite"):  # read from the batched flag
        gauss_newton.newton(S, torch.zeros(2, 3, dtype=torch.float64), torch.tensor([1, 2]), 1e-10)


def test_scipy_routes_warn_once_off_the_cpu(monkeypatch):
    monkeypatch.setattr(syncs, "_NOTICED", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        syncs.notice_cpu_route(torch.device("cpu"))                   # a CPU sheaf: nothing to say
    with pytest.warns(UserWarning, match="scipy route .* on the CPU"):
        syncs.notice_cpu_route(torch.device("meta"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        syncs.notice_cpu_route(torch.device("meta"))                  # once per process and device type


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(syncs)
    assert result.failed == 0 and result.attempted > 0
