"""Gauss–Newton steps preconditioned by the determined part of the sheaf (a network with a soft-pinned output)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cellsheaf as cs
from cellsheaf.gauss_newton import GaussNewton, NewtonOptions
from cellsheaf.propagation import determined_part
from tests.neural_shapes import NeuralShape

F64 = torch.float64


def _pinned_mlp(batch: int, strength: float, seed: int = 0):
    """A [2, 10, 8, 1] ReLU network sheaf with its output soft-pinned to random targets."""
    net = NeuralShape([2, 10, 8, 1], seed=seed)
    X = net.random_input(batch, seed=seed + 1)
    Y = torch.randn(batch, 1, dtype=F64, generator=torch.Generator().manual_seed(seed))
    pin = cs.soft_pin(net.S, "y", Y, strength=strength)
    return net, pin.boundary(net.boundary(X))


def test_determined_part_leaves_out_the_soft_pin():
    net, b = _pinned_mlp(3, 1e-6)
    assert not cs.propagation.is_determined(net.S, b)[0]
    assert [s.edge for s in determined_part(net.S, b)] == ["w1", "r1", "w2", "r2", "w3", "out"]


def test_no_determined_part_when_the_pin_is_stiffer_than_the_network():
    net, b = _pinned_mlp(3, 2.0)
    assert determined_part(net.S, b) is None


def test_no_determined_part_without_selections():
    S = cs.Sheaf(); S.add_vertex("a", 2); S.add_vertex("b", 2)
    S.add_edge("a", "b", torch.eye(2, dtype=F64), torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=F64))
    assert determined_part(S, cs.Boundary().fix("a", torch.ones(2, dtype=F64))) is None


def test_determined_solve_inverts_the_determined_model():
    """Two triangular sweeps equal the dense inverse of J_Ωᵀ W J_Ω (the unpinned network) at a random point."""
    net = NeuralShape([2, 10, 8, 1], seed=3)
    b = net.boundary(net.random_input(4))
    rb = b.resolve(net.S)
    x = rb.fill(torch.randn(4, net.S.C0, dtype=F64, generator=torch.Generator().manual_seed(0)))
    model = GaussNewton(net.S, x)
    basis = torch.eye(net.S.C0, dtype=F64)[rb.free]
    H = torch.stack([model.matvec(e.expand(4, -1).clone())[:, rb.free] for e in basis], -1)
    r = torch.zeros(4, net.S.C0, dtype=F64)
    r[:, rb.free] = torch.randn(4, rb.free.numel(), dtype=F64, generator=torch.Generator().manual_seed(1))
    z = model.determined_solve(determined_part(net.S, b), r)
    torch.testing.assert_close(z[:, rb.free], torch.linalg.solve(H, r[:, rb.free]), rtol=1e-10, atol=1e-10)
    assert bool((z[:, rb.fixed] == 0).all())


@pytest.mark.parametrize("strength", [1e-6, 1e-2])
def test_preconditioned_newton_matches_jacobi_in_few_cg_iterations(strength):
    net, b = _pinned_mlp(32, strength)
    runs = {pc: cs.minimize(net.S, b, method="newton", tol=1e-12, options=NewtonOptions(preconditioner=pc))
            for pc in ("auto", "jacobi")}
    assert all(r.converged for r in runs.values())
    torch.testing.assert_close(runs["auto"].x.flat, runs["jacobi"].x.flat, rtol=0, atol=1e-9)
    fast, slow = (runs[pc].extra["cg_iterations"] for pc in ("auto", "jacobi"))
    assert fast <= 3 * runs["auto"].iterations  # the pin has rank 1: about 2 CG iterations per Newton step
    assert 4 * fast < slow


def test_unknown_preconditioner_is_refused():
    with pytest.raises(ValueError, match="preconditioner"):
        NewtonOptions(preconditioner="ilu")


def test_a_warm_start_can_keep_the_kinks_of_an_earlier_equilibrium():
    """From an equilibrium resting on switching surfaces, with the weights moved a little, holding the
    coordinates that sit on ReLU kinks from the start reaches the same energy in far fewer iterations."""
    net = NeuralShape([2, 10, 8, 1], seed=0)
    Y = torch.randn(64, 1, dtype=F64, generator=torch.Generator().manual_seed(0))
    b = net.boundary(net.random_input(64)).fix("y", Y)
    first = cs.minimize(net.S, b, method="newton", tol=1e-10)
    assert first.converged and int(first.extra["on_kinks"].sum()) > 0
    warm = NewtonOptions(hold_kinks_at_start=True)
    again = cs.minimize(net.S, b, method="newton", x0=first.x.flat, tol=1e-10, options=warm)
    assert again.converged and again.iterations == 0
    with torch.no_grad():
        net.S.edge("w2").Fu.weight.mul_(1.01)
    net.S.invalidate()
    runs = [cs.minimize(net.S, b, method="newton", x0=first.x.flat, tol=1e-10, options=opt)
            for opt in (NewtonOptions(), warm)]
    assert all(r.converged for r in runs)
    torch.testing.assert_close(runs[1].energy, runs[0].energy, rtol=0, atol=1e-10)
    assert 3 * runs[1].iterations < runs[0].iterations


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), widths=st.lists(st.integers(1, 6), min_size=3, max_size=5))
def test_a_warm_restart_from_an_equilibrium_stays_there(seed, widths):
    """Random ReLU networks with the output clamped to random targets: restarting from the
    equilibrium with its kinks held is already stationary, at the same point."""
    net = NeuralShape(widths, seed=seed)
    Y = torch.randn(16, widths[-1], dtype=F64, generator=torch.Generator().manual_seed(seed))
    b = net.boundary(net.random_input(16, seed=seed)).fix(f"z{len(widths) - 1}", Y)
    first = cs.minimize(net.S, b, method="newton", tol=1e-10)
    again = cs.minimize(net.S, b, method="newton", x0=first.x.flat, tol=1e-10,
                        options=NewtonOptions(hold_kinks_at_start=True))
    assert again.converged == first.converged
    if first.converged:
        assert again.iterations == 0
        torch.testing.assert_close(again.x.flat, first.x.flat, rtol=0, atol=0)
