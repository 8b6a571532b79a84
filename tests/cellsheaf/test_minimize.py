"""cs.minimize: propagation, Gauss–Newton and the Euler flow agree, and say when they cannot."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize as so
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cellsheaf as cs
from cellsheaf import maps as M
from cellsheaf import potentials as P
from cellsheaf.energy import gradient
from cellsheaf.propagation import NotDeterminedError, is_determined
from tests.conftest import build_random_sheaf
from tests.neural_shapes import NeuralShape

F64 = torch.float64


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def _free_grad_norm(S, b, x):
    return gradient(S, x)[..., b.resolve(S).free].norm(dim=-1)


# ---------------------------------------------------------------------------------------------- determined sheaves


@pytest.mark.parametrize("output", [None, "sigmoid"])
def test_three_solvers_reach_the_forward_pass(output):
    net = NeuralShape([3, 5, 4, 2], seed=2, output=M.Sigmoid(2) if output else None)
    X = net.random_input(6)
    b = net.boundary(X)
    sols = {m: cs.minimize(net.S, b, method=m, tol=1e-12) for m in ("propagate", "newton", "euler")}
    for m, res in sols.items():
        assert res.converged and res.method == m, (m, res.message)
        torch.testing.assert_close(res.x["y"], net.forward(X)["y"], rtol=0, atol=1e-9)
        torch.testing.assert_close(res.x.flat, sols["propagate"].x.flat, rtol=0, atol=1e-9)
    assert sols["propagate"].iterations == 1 and sols["newton"].iterations < 20
    assert float(sols["propagate"].energy.max()) < 1e-25


def test_auto_propagates_determined_sheaves_and_reports_why():
    net = NeuralShape([2, 3, 1], seed=0)
    res = cs.minimize(net.S, net.boundary(net.random_input(4)))
    assert res.method == "propagate" and "determined" in res.extra["auto"]
    pin = cs.soft_pin(net.S, "a1", _t([1.0]), coords=[0])
    res = cs.minimize(net.S, pin.boundary(net.boundary(net.random_input(4))))
    assert res.method == "newton" and "not determined" in res.extra["auto"] and res.converged


def test_unbatched_in_unbatched_out():
    net = NeuralShape([2, 3, 2], seed=1)
    X = net.random_input(1)[0]
    for m in ("propagate", "newton"):
        res = cs.minimize(net.S, net.boundary(X), method=m)
        assert res.x.flat.shape == (net.S.C0,) and res.energy.dim() == 0
        torch.testing.assert_close(res.x["y"], net.forward(X)["y"])


def test_skip_connection_with_a_merge_vertex_is_determined():
    """y = A1 x + A2 relu(W x) + c through a merge vertex m (docs: Architecture): propagation is the forward pass."""
    g = torch.Generator().manual_seed(3)
    W, A1, A2 = (torch.randn(*s, generator=g, dtype=F64) for s in ((4, 3), (2, 3), (2, 4)))
    c = torch.randn(2, generator=g, dtype=F64)
    S = cs.Sheaf()
    for v, d in (("x", 3), ("z", 4), ("h", 4), ("m", 7 + 2), ("y", 2)):
        S.add_vertex(v, d)
    S.add_edge("x", "z", W, M.Identity(4))
    S.add_edge("z", "h", M.ReLU(4), M.Identity(4))
    S.add_edge("x", "m", M.Identity(3), M.Select(range(0, 3), 9), name="skip")
    S.add_edge("h", "m", M.Identity(4), M.Select(range(3, 7), 9), name="main")
    S.add_edge("m", "y", torch.cat([A1, A2, torch.diag(c)], 1), M.Identity(2), name="merge")
    X = torch.randn(5, 3, generator=g, dtype=F64)
    b = cs.Boundary().fix("x", X).fix("m", torch.ones(2, dtype=F64), coords=[7, 8])
    assert is_determined(S, b) == (True, "")
    res = cs.minimize(S, b)
    assert res.method == "propagate" and res.converged
    torch.testing.assert_close(res.x["y"], X @ A1.T + torch.relu(X @ W.T) @ A2.T + c)


def test_propagate_says_why_it_does_not_apply():
    net = NeuralShape([2, 3, 1], seed=0)
    b = net.boundary(net.random_input(2))
    pinned = net.S.copy()
    pin = cs.soft_pin(pinned, "z1", _t([0.5]), coords=[1])
    with pytest.raises(NotDeterminedError, match="over-constrains"):
        cs.minimize(pinned, pin.boundary(b.copy()), method="propagate")
    hard = b.copy().fix("z1", _t([0.5]), coords=[1])  # a hard pin on a computed coordinate
    assert "over-constrains" in is_determined(net.S, hard)[1]
    dense = cs.Sheaf(); dense.add_vertex("a", 2); dense.add_vertex("b", 2)
    dense.add_edge("a", "b", torch.eye(2, dtype=F64), _t([[1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(NotDeterminedError, match="coordinate 0 of vertex 'b' is not defined"):
        cs.minimize(dense, cs.Boundary().fix("a", _t([1.0, 0.0])), method="propagate")
    ce = NeuralShape([2, 3, 2], seed=0, output_edge=False).S
    ce.add_vertex("y", 2)
    ce.add_edge("z2", "y", M.Identity(2), M.Identity(2), potential=P.CrossEntropy())
    assert "two-argument" in is_determined(ce, NeuralShape([2, 3, 2], seed=0).boundary(_t([[1.0, 2.0]])))[1]
    shifted = cs.Sheaf(); shifted.add_vertex("a", 1); shifted.add_vertex("b", 1)
    shifted.add_edge("a", "b", torch.eye(1, dtype=F64), M.Identity(1),
                     potential=P.Convex(lambda r: ((r - 1) ** 2).sum(-1)))
    assert "not minimised at zero" in is_determined(shifted, cs.Boundary().fix("a", _t([0.0])))[1]


def test_propagation_schedule_is_cached_and_dropped_on_mutation():
    net = NeuralShape([2, 3, 1], seed=0)
    b = net.boundary(net.random_input(2))
    cs.minimize(net.S, b)
    assert any(isinstance(k, tuple) and k[0] == "propagation" for k in net.S._cache)
    net.S.add_vertex("extra", 1)
    assert not any(isinstance(k, tuple) and k[0] == "propagation" for k in net.S._cache)


def test_scaled_selections_are_solved():
    S = cs.Sheaf(); S.add_vertex("a", 2); S.add_vertex("b", 2)
    S.add_edge("a", "b", M.Tanh(2), M.Diagonal(_t([2.0, -4.0])))
    res = cs.minimize(S, cs.Boundary().fix("a", _t([0.3, -1.0])), method="propagate")
    torch.testing.assert_close(res.x["b"], torch.tanh(_t([0.3, -1.0])) / _t([2.0, -4.0]))


# ---------------------------------------------------------------------------------------------- Newton


def _convex_problem(seed: int):
    """A random linear sheaf with strictly convex potentials and boundary data: a unique minimiser."""
    S0 = build_random_sheaf(seed, n_vertices=5, n_edges=9, dims=(1, 2), edge_dims=(2, 3), connected=True)
    rng = np.random.default_rng(seed)
    S = cs.Sheaf()
    for v in S0.vertices:
        S.add_vertex(v, S0.dim(v))
    choices = [None, P.PNorm(3.0), P.PNorm(1.6), P.Weighted(P.Quadratic(), 2.0)]
    for e in S0.edge_items():
        S.add_edge(e.u, e.v, e.Fu, e.Fv, name=e.name, potential=choices[rng.integers(len(choices))])
    fixed = S.vertices[:2]
    b = cs.Boundary()
    for v in fixed:
        b.fix(v, torch.as_tensor(rng.standard_normal((3, S.dim(v))), dtype=F64))
    return S, b


def _scipy_minimum(S, b, item: int) -> torch.Tensor:
    rb = b.resolve(S)
    base = rb.fill(torch.zeros(S.C0, dtype=F64).expand(rb.values.shape[0], -1))[item]

    def fun(w):
        x = base.clone()
        x[rb.free] = torch.as_tensor(w)
        return float(cs.energy(S, x)), gradient(S, x)[rb.free].numpy()

    out = so.minimize(fun, np.zeros(len(rb.free)), jac=True, method="L-BFGS-B",
                      options={"ftol": 1e-16, "gtol": 1e-12, "maxiter": 5000})
    x = base.clone()
    x[rb.free] = torch.as_tensor(out.x)
    return x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_newton_matches_euler_and_an_independent_optimiser_on_convex_problems(seed):
    S, b = _convex_problem(seed)
    res = cs.minimize(S, b, method="newton", tol=1e-11)
    assert res.method == "newton" and res.converged, res.message
    assert float(_free_grad_norm(S, b, res.x.flat).max()) <= 1e-11  # first-order conditions
    flow = cs.minimize(S, b, method="euler", tol=1e-10, dt=0.02, max_iter=60_000)
    assert flow.converged, flow.message
    torch.testing.assert_close(res.x.flat, flow.x.flat, rtol=0, atol=1e-8)
    assert bool((res.energy <= flow.energy + 1e-12).all())
    ref = _scipy_minimum(S, b, 0)
    torch.testing.assert_close(res.x.flat[0], ref, rtol=0, atol=1e-5)


def test_newton_with_soft_pins_on_a_linear_network_is_the_least_squares_compromise():
    net = NeuralShape([3, 4, 2], seed=3)
    S = net.S
    S.set_maps("r1", Fu=M.Identity(4))  # identity activation: a linear sheaf
    X = net.random_input(5)
    pin = cs.soft_pin(S, "y", _t([[1.0, -1.0]]).expand(5, 2), strength=3.0)
    b = pin.boundary(net.boundary(X))
    res = cs.minimize(S, b, tol=1e-12)
    assert res.method == "newton" and res.converged
    torch.testing.assert_close(res.x.flat, cs.harmonic_extension(S, b).flat, rtol=0, atol=1e-9)
    flow = cs.minimize(S, b, method="euler", tol=1e-11)
    torch.testing.assert_close(res.x.flat, flow.x.flat, rtol=0, atol=1e-9)


def test_newton_on_a_pinned_relu_network_satisfies_first_order_conditions():
    net = NeuralShape([3, 6, 6, 2], seed=3)
    X = net.random_input(8)
    pin = cs.soft_pin(net.S, "z2", net.forward(X)["z2"][:, :2] + 0.3, coords=[0, 1], strength=2.0)
    b = pin.boundary(net.boundary(X))
    res = cs.minimize(net.S, b)
    assert res.method == "newton" and res.converged and res.iterations < 30
    assert float(_free_grad_norm(net.S, b, res.x.flat).max()) <= 1e-10
    flow = cs.minimize(net.S, b, method="euler", tol=1e-11)
    assert flow.converged
    assert bool((res.energy <= flow.energy + 1e-12).all())
    torch.testing.assert_close(res.x.flat, flow.x.flat, rtol=0, atol=1e-8)


def test_newton_with_cross_entropy_output_and_clamped_targets():
    net = NeuralShape([3, 5, 3], seed=8, output_edge=False)
    S = net.S
    S.add_vertex("y", 3)
    S.add_edge("z2", "y", M.Identity(3), M.Identity(3), name="out", potential=P.CrossEntropy("softmax"))
    X = net.random_input(2)
    Y = torch.softmax(torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=F64), -1)
    b = net.boundary(X).fix("y", Y)
    res = cs.minimize(S, b)
    assert res.method == "newton" and res.converged, res.message
    flow = cs.minimize(S, b, method="euler", tol=1e-9)
    assert flow.converged and bool((res.energy <= flow.energy + 1e-12).all())
    torch.testing.assert_close(res.x.flat, flow.x.flat, rtol=0, atol=1e-7)


@pytest.mark.parametrize("potential", [P.Huber(0.3), P.PNorm(1.5), P.ElasticNet(0.0, 2.0)])
def test_newton_with_non_quadratic_penalty_edges(potential):
    S = cs.Sheaf()
    for v in ("a", "b", "c"):
        S.add_vertex(v, 2)
    g = torch.Generator().manual_seed(4)
    S.add_edge("a", "b", torch.randn(3, 2, generator=g, dtype=F64), torch.randn(3, 2, generator=g, dtype=F64),
               potential=potential)
    S.add_edge("b", "c", M.Tanh(2), M.Identity(2), potential=potential)
    pin = cs.soft_pin(S, "c", _t([0.2, -0.4]), strength=5.0, potential=potential)
    b = pin.boundary(cs.Boundary().fix("a", _t([[1.0, 2.0], [-1.0, 0.5]])))
    res = cs.minimize(S, b)
    assert res.converged, res.message
    flow = cs.minimize(S, b, method="euler", tol=1e-10, dt=0.01, max_iter=200_000)
    assert bool((res.energy <= flow.energy + 1e-12).all())
    torch.testing.assert_close(res.x.flat, flow.x.flat, rtol=0, atol=1e-7)


def test_switching_surface_equilibrium_is_found_and_reported():
    """Note 5.1: pinning a post-activation below zero puts z on the ReLU kink with a ≠ relu(z)."""
    net = NeuralShape([2, 3, 1], seed=0)
    S = net.S
    X = net.random_input(4)
    pin = cs.soft_pin(S, "a1", _t([-1.0, -1.0, -1.0]), coords=[0, 1, 2], strength=10.0)
    b = pin.boundary(net.boundary(X))
    res = cs.minimize(S, b)
    assert res.method == "newton" and res.converged and "switching surfaces" in res.message
    held = res.extra["on_kinks"]
    assert bool((held > 0).all())
    x = res.x.flat
    z, a = res.x["z1"], res.x["a1"][:, :3]
    on_kink = z == 0
    assert int(on_kink.sum()) == int(held.sum()) and bool((a[on_kink].abs() > 1e-3).all())  # not a global section
    assert float(gradient(S, x)[:, b.resolve(S).free].norm(dim=-1).max()) > 1e-3  # no smooth stationarity there
    for i, j in zip(*torch.nonzero(on_kink, as_tuple=True)):  # a local minimum along each held coordinate
        col = S.vertex_slice("z1").start + int(j)
        for h in (1e-5, -1e-5):
            y = x[i].clone()
            y[col] += h
            assert float(cs.energy(S, y)) >= float(res.energy[i]) - 1e-13
    flow = cs.minimize(S, b, method="euler", max_iter=1000)
    assert not flow.converged and "gradient norm" in flow.message  # the flow only creeps along the surface
    assert bool((res.energy <= flow.energy + 1e-12).all())


def test_l1_minimum_on_a_kink():
    S = cs.Sheaf()
    for v in "abcm":
        S.add_vertex(v, 1)
    for u in "abc":
        S.add_edge(u, "m", M.Identity(1), M.Identity(1), potential=P.L1())
    b = cs.Boundary().fix("a", _t([0.0])).fix("b", _t([1.0])).fix("c", _t([5.0]))
    res = cs.minimize(S, b)  # the median, where 0 ∈ ∂E = {−1 + [−1, 1] + 1}
    assert res.converged and float(res.x["m"]) == 1.0


def test_stalling_on_a_non_smooth_potential_is_reported():
    S = cs.Sheaf(); S.add_vertex("data", 3); S.add_vertex("w", 3)
    S.add_edge("data", "w", M.Identity(3), M.Identity(3))
    reg = cs.reluctance(S, ["w"], strength=1.0, potential=P.L1())  # soft thresholding: w = (2, 0, −1)
    res = cs.minimize(S, reg.boundary(cs.Boundary().fix("data", _t([3.0, 0.5, -2.0]))))
    assert not res.converged and "non-smooth potential" in res.message and bool(res.extra["stalled"].all())
    torch.testing.assert_close(res.x["w"], _t([2.0, 0.0, -1.0]), atol=1e-3, rtol=0)


def test_newton_record_and_batched_subsetting():
    net = NeuralShape([2, 4, 2], seed=5)
    X = net.random_input(6)
    pin = cs.soft_pin(net.S, "y", _t([0.5, 0.5]), strength=1.0)
    res = cs.minimize(net.S, pin.boundary(net.boundary(X)), method="newton", record=True)
    traj = res.extra["trajectory"]
    assert traj["edge_energy"].shape == (len(traj["step"]), 6, len(net.S.edges))
    E = traj["edge_energy"].sum(-1)
    assert bool((E[1:] <= E[:-1] + 1e-12).all())  # monotone per item


# ---------------------------------------------------------------------------------------------- Euler


def test_euler_records_the_energy_per_edge_and_refuses_unstable_steps():
    net = NeuralShape([2, 3, 1], seed=0)
    b = net.boundary(net.random_input(3))
    res = cs.minimize(net.S, b, method="euler", record=5, tol=1e-9)
    traj = res.extra["trajectory"]
    assert traj["edge_energy"].shape[1:] == (3, len(net.S.edges)) and res.converged
    E = traj["edge_energy"].sum(-1)
    assert bool((E[1:] <= E[:-1] + 1e-12).all())
    with pytest.raises(ValueError, match="stability bound"):
        cs.minimize(net.S, b, method="euler", dt=10.0)


def test_euler_not_converged_says_so():
    net = NeuralShape([2, 3, 1], seed=0)
    res = cs.minimize(net.S, net.boundary(net.random_input(3)), method="euler", max_iter=5)
    assert not res.converged and res.iterations == 5 and res.message


# ---------------------------------------------------------------------------------------------- inputs


def test_bad_maps_are_named():
    S = cs.Sheaf(); S.add_vertex("a", 2); S.add_vertex("b", 2)
    S.add_edge("a", "b", M.Function(lambda t: t[..., :1], 2, 2, name="short"), M.Identity(2), name="e")
    b = cs.Boundary().fix("a", _t([1.0, 2.0]))
    for m in ("auto", "newton", "euler"):
        with pytest.raises(ValueError, match="'e'"):
            cs.minimize(S, b, method=m)
    T = cs.Sheaf(); T.add_vertex("a", 1); T.add_vertex("b", 1)
    T.add_edge("b", "a", M.Function(torch.log, 1, 1), M.Identity(1), name="log")
    with pytest.raises(ValueError, match="'log'.*non-finite"):
        cs.minimize(T, cs.Boundary().fix("a", _t([1.0])), method="newton", x0=_t([1.0, -1.0]))
    with pytest.raises(ValueError, match="'log'"):
        cs.minimize(T, cs.Boundary().fix("b", _t([-1.0])), method="propagate")


def test_bad_options():
    net = NeuralShape([2, 3, 1], seed=0)
    b = net.boundary(net.random_input(1))
    with pytest.raises(ValueError, match="method"):
        cs.minimize(net.S, b, method="lbfgs")
    with pytest.raises(ValueError, match="alpha"):
        cs.minimize(net.S, b, alpha=0.0)
    with pytest.raises(ValueError, match="NaN"):
        cs.minimize(net.S, b, method="newton", x0=torch.full((net.S.C0,), float("nan"), dtype=F64))


def test_float32():
    net = NeuralShape([3, 4, 2], seed=1, dtype=torch.float32)
    X = net.random_input(5)
    for m in ("propagate", "newton"):
        res = cs.minimize(net.S, net.boundary(X), method=m)
        assert res.converged and res.x.flat.dtype == torch.float32
        torch.testing.assert_close(res.x["y"], net.forward(X)["y"], rtol=1e-4, atol=1e-4)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), widths=st.lists(st.integers(1, 5), min_size=3, max_size=5))
def test_propagate_equals_newton_on_random_networks(seed, widths):
    net = NeuralShape(widths, seed=seed)
    X = net.random_input(3, seed=seed)
    b = net.boundary(X)
    p = cs.minimize(net.S, b, method="propagate")
    n = cs.minimize(net.S, b, method="newton", tol=1e-11)
    assert p.converged and n.converged
    torch.testing.assert_close(p.x.flat, n.x.flat, rtol=0, atol=1e-9)
    torch.testing.assert_close(p.x["y"], net.forward(X)["y"])


def test_newton_with_every_coordinate_fixed_returns_the_boundary():
    S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    S.add_edge("a", "b", cs.maps.ReLU(1), torch.ones(1, 1, dtype=torch.float64))
    b = cs.Boundary().fix("a", [[1.0]]).fix("b", [[2.0]])
    res = cs.minimize(S, b, method="newton")
    assert res.converged and res.energy == pytest.approx(0.5)
