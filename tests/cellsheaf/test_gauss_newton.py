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


# ---------------------------------------------------------------- converged is a certificate on kinks


def _one_neuron():
    """Linear(1,1) (w = 1, b = −1) → ReLU → Linear(1,1) (w = 1, b = 0), with a1 pinned to 1."""
    import cellsheaf_nn as csnn

    m = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.ReLU(), torch.nn.Linear(1, 1)).double()
    with torch.no_grad():
        m[0].weight.fill_(1.0), m[0].bias.fill_(-1.0), m[2].weight.fill_(1.0), m[2].bias.fill_(0.0)
    ns = csnn.compile(m)
    ns.pin("a1", [0], torch.tensor([1.0], dtype=F64))
    return ns


@pytest.mark.parametrize("init", ["zeros", "forward_pass"])
def test_newton_does_not_stop_on_a_concave_kink(init):
    """At z1 = 0 the energy ½(z1 + 1)² + ½(1 − relu(z1))² has slope 0 to the right but −1 along −z1:
    a Clarke point, not a minimum. Newton must leave it to the minimum ½ at z1 = −1 (or say it did not)."""
    ns = _one_neuron()
    _, state = ns.infer(torch.zeros(1, 1, dtype=F64), method="newton", init=init, return_state=True, check=False)
    assert state.info.converged
    assert float(state.info.energy.max()) == pytest.approx(0.5, abs=1e-12)
    assert float(state["z1"][0, 0]) == pytest.approx(-1.0, abs=1e-9)


def _no_descent_along_coordinates(S, b, x, h=1e-5):
    """Whether no ±h step along one free coordinate lowers the energy by more than first-order rounding."""
    rb = b.resolve(S)
    E0 = cs.energy(S, x)
    for i in rb.free.tolist():
        for sign in (1.0, -1.0):
            y = x.clone()
            y[:, i] += sign * h
            drop = E0 - cs.energy(S, y)
            if bool((drop > 1e-3 * h).any()):
                return False
    return True


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), pin_value=st.floats(-2.0, 2.0), init=st.sampled_from(["zeros", "random"]))
def test_converged_pinned_relu_networks_have_no_descent_direction(seed, pin_value, init):
    import cellsheaf_nn as csnn

    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3), torch.nn.ReLU(),
                            torch.nn.Linear(3, 1)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    ns = csnn.compile(m)
    ns.pin("a1", [int(seed % 3)], torch.tensor([pin_value], dtype=F64))
    X = torch.randn(4, 2, generator=g, dtype=F64)
    _, state = ns.infer(X, method="newton", init=init, return_state=True, check=False)
    if state.info.converged:
        assert _no_descent_along_coordinates(ns.pinned_sheaf, ns.boundary(X), state.cochain.flat)
