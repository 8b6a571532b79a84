"""Nudged equilibria by sweeps: the same point as Newton's, and the linear response as γ → 0."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cellsheaf as cs
from cellsheaf.energy import edge_forces, gradient
from cellsheaf.nudge import nudged_equilibrium, rest_gradient
from tests.cellsheaf.test_propagation import mlp_sheaf

F64 = torch.float64


def nudged_sheaf(widths, seed, gamma, potential=None):
    """A ReLU-MLP sheaf with a target vertex and a loss edge of weight ``gamma`` from the output."""
    S, layers, fixed, const, _ = mlp_sheaf(widths, seed)
    out = f"z{len(layers)}"
    S.add_vertex("t", widths[-1])
    S.add_edge(out, "t", cs.maps.Identity(widths[-1]), cs.maps.Identity(widths[-1]), name="loss", weight=gamma,
               potential=potential)
    t = S.vertex_slice("t")
    fixed = torch.cat([fixed, torch.arange(t.start, t.stop)])
    return S, fixed, const


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=2, max_size=4), st.integers(0, 10_000),
       st.sampled_from([1e-6, 1e-4, 1e-2]), st.sampled_from(["quadratic", "huber"]))
def test_nudged_equilibrium_is_newtons(widths, seed, gamma, kind):
    potential = None if kind == "quadratic" else cs.potentials.Huber(0.3)
    S, fixed, const = nudged_sheaf(widths, seed, gamma, potential)
    g = torch.Generator().manual_seed(seed + 7)
    B = 6
    p = cs.propagation.plan(S, fixed, const, torch.ones(len(const), dtype=F64), determined=True)
    x = torch.zeros(B, S.C0, dtype=F64)
    x[:, : widths[0]] = torch.randn(B, widths[0], generator=g, dtype=F64)
    x[:, S.vertex_slice("t")] = torch.randn(B, widths[-1], generator=g, dtype=F64)
    p.run(x)
    fast, report = nudged_equilibrium(S, p, x.clone(), tol=1e-12, max_iter=50)
    done = report["converged"]   # items where the fixed point does not contract are Newton's (the trainer's fallback)
    free = p.free
    # Newton from the same start, to the same tolerance, on the same sheaf
    ref = cs.minimize(S, _boundary_of(S, x, fixed), method="newton", x0=x, tol=1e-12)
    kinks = ref.extra["on_kinks"]
    ok = done & (kinks == 0)  # items whose Newton equilibrium rests on a ReLU kink may differ within O(γ) there
    torch.testing.assert_close(fast[ok][:, free], ref.x.flat[ok][:, free], rtol=1e-7, atol=1e-9)
    # stationarity of the result, measured independently
    grad = gradient(S, fast)[:, free]
    assert bool((grad[ok].norm(dim=-1) <= 1e-9).all())


def test_linear_response_is_the_backprop_adjoint():
    """For a tiny nudge, each weight edge's discord divided by −γ is backprop's error signal there."""
    gamma = 1e-7
    widths = [3, 4, 2]
    S, fixed, const = nudged_sheaf(widths, 1, gamma)
    p = cs.propagation.plan(S, fixed, const, torch.ones(len(const), dtype=F64), determined=True)
    x = torch.zeros(5, S.C0, dtype=F64)
    x[:, :3] = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    target = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    x[:, S.vertex_slice("t")] = target
    p.run(x)
    fast, _ = nudged_equilibrium(S, p, x)
    z2 = x[:, S.vertex_slice("z2")].clone().requires_grad_(True)
    (0.5 * ((z2 - target) ** 2).sum()).backward()     # dLoss/dz2 = z2 − t
    r = edge_forces(S, "weight:z2", fast)[0]  # the edge's own discord (weight 1)
    torch.testing.assert_close(r / -gamma, z2.grad, rtol=1e-5, atol=1e-8)


def test_rest_gradient_and_no_rest():
    S, fixed, const = nudged_sheaf([2, 3, 1], 0, 0.5)
    x = torch.randn(3, S.C0, dtype=F64)
    g = rest_gradient(S, x, ["loss"])
    want = torch.zeros_like(x)
    r = x[:, S.vertex_slice("t")] - x[:, S.vertex_slice("z2")]
    want[:, S.vertex_slice("t")], want[:, S.vertex_slice("z2")] = 0.5 * r, -0.5 * r
    torch.testing.assert_close(g, want)
    S2, _, const2 = nudged_sheaf([2, 3, 1], 0, 0.5)
    S2.remove_edge("loss")
    p = cs.propagation.plan(S2, fixed, const2, torch.ones(len(const2), dtype=F64), determined=True)
    x2 = p.run(torch.where(torch.isin(torch.arange(S2.C0), fixed), x, torch.zeros_like(x)))
    out, report = nudged_equilibrium(S2, p, x2)
    assert torch.equal(out, x2) and report["iterations"] == 1 and bool(report["converged"].all())


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=2, max_size=4), st.integers(0, 10_000), st.booleans(),
       st.sampled_from([1e-6, 1e-3]))
def test_measured_gradient_and_local_gradients_of_the_sweeps(widths, seed, free_stalks, gamma):
    """The verified free gradient (only nonlinear edges re-evaluated) and the local gradients read off the
    transposed sweep equal a full pass over every edge at the result."""
    S, fixed, const = nudged_sheaf(widths, seed, gamma, cs.potentials.Huber(0.3))
    g = torch.Generator().manual_seed(seed + 1)
    p = cs.propagation.plan(S, fixed, const, torch.ones(len(const), dtype=F64), determined=True)
    x = torch.zeros(5, S.C0, dtype=F64)
    x[:, : widths[0]] = torch.randn(5, widths[0], generator=g, dtype=F64)
    x[:, S.vertex_slice("t")] = torch.randn(5, widths[-1], generator=g, dtype=F64)
    p.run(x)
    keys = [(n, "u") for n in S.edges if n.startswith("weight")]
    at = x if free_stalks else None
    out, report = nudged_equilibrium(S, p, x, tol=1e-12, max_iter=3, maps=keys, at=at)
    measured = gradient(S, out)[:, p.free].norm(dim=-1)
    torch.testing.assert_close(report["grad_norm"], measured, rtol=1e-6, atol=1e-13)
    want = cs.learning.edge_gradients(S, out, keys, at=at)
    for k in keys:
        torch.testing.assert_close(report["grads"][k], want[k], rtol=1e-7, atol=1e-13)


def test_a_terminal_softmax_is_propagated_exactly():
    """A softmax output beside a loss that reads the logits: the sweeps skip it, the result has no discord there."""
    S, fixed, const = nudged_sheaf([3, 4, 3], 2, 1e-3, cs.potentials.CrossEntropy("softmax"))
    S.add_vertex("p", 3)
    S.add_edge("z2", "p", cs.maps.Softmax(3), cs.maps.Identity(3), name="out:p")
    p = cs.propagation.plan(S, fixed, const, torch.ones(len(const), dtype=F64), determined=True)
    x = torch.zeros(4, S.C0, dtype=F64)
    x[:, :3] = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    x[:, S.vertex_slice("t")] = torch.eye(3, dtype=F64)[[0, 2, 1, 0]]
    p.run(x)
    out, report = nudged_equilibrium(S, p, x, tol=1e-13, max_iter=20)
    assert bool(report["converged"].all())
    torch.testing.assert_close(out[:, S.vertex_slice("p")], torch.softmax(out[:, S.vertex_slice("z2")], -1),
                               rtol=0, atol=1e-15)
    assert bool((gradient(S, out)[:, p.free].norm(dim=-1) <= 1e-12).all())
    ref = cs.minimize(S, _boundary_of(S, x, fixed), method="newton", x0=x, tol=1e-13)
    torch.testing.assert_close(out[:, p.free], ref.x.flat[:, p.free], rtol=1e-9, atol=1e-12)


def test_a_step_that_defines_its_u_end():
    """An edge oriented against the propagation (its u end is the target): the same point as Newton's."""
    g = torch.Generator().manual_seed(4)
    A, B = torch.randn(3, 2, generator=g, dtype=F64), torch.randn(2, 3, generator=g, dtype=F64)
    S = cs.Sheaf()
    for v, d in (("x", 2), ("h", 3), ("y", 2), ("t", 2)):
        S.add_vertex(v, d)
    S.add_edge("h", "x", cs.maps.Identity(3), cs.maps.Linear(A), name="in")      # h := A x (its u end)
    S.add_edge("h", "y", cs.maps.Linear(B), cs.maps.Identity(2), name="mid")
    S.add_edge("y", "t", cs.maps.Identity(2), cs.maps.Identity(2), name="loss", weight=0.01)
    fixed = torch.tensor([S.vertex_slice("x").start, S.vertex_slice("x").start + 1,
                          S.vertex_slice("t").start, S.vertex_slice("t").start + 1])
    p = cs.propagation.plan(S, fixed, determined=True)
    assert [s.side for s in p.steps if s.edge == "in"] == ["u"]
    x = torch.zeros(3, S.C0, dtype=F64)
    x[:, fixed] = torch.randn(3, 4, generator=g, dtype=F64)
    p.run(x)
    keys = [("in", "v"), ("mid", "u")]
    out, report = nudged_equilibrium(S, p, x, tol=1e-14, max_iter=50, maps=keys)
    ref = cs.minimize(S, _boundary_of(S, x, fixed), method="newton", x0=x, tol=1e-14)
    torch.testing.assert_close(out, ref.x.flat, rtol=1e-10, atol=1e-12)
    want = cs.learning.edge_gradients(S, out, keys)
    for k in keys:
        torch.testing.assert_close(report["grads"][k], want[k], rtol=1e-8, atol=1e-14)


def test_plan_of_the_determined_part_needs_one():
    S, fixed, const = nudged_sheaf([2, 3, 1], 0, 10.0)   # the loss edge is as stiff as the network
    with pytest.raises(cs.NotDeterminedError, match="no determined part"):
        cs.propagation.plan(S, fixed, const, torch.ones(len(const), dtype=F64), determined=True)


def test_a_stiff_rest_stops_at_the_best_iterate():
    """γ large against the network: the fixed point does not contract; the best iterate comes back."""
    S, fixed, const = nudged_sheaf([2, 3, 2], 0, 0.9)
    p = cs.propagation.plan(S, fixed, const, torch.ones(len(const), dtype=F64), determined=True)
    x = torch.zeros(4, S.C0, dtype=F64)
    x[:, :2] = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    x[:, S.vertex_slice("t")] = 100.0
    p.run(x)
    out, report = nudged_equilibrium(S, p, x, tol=1e-14, max_iter=200)
    assert bool(torch.isfinite(out).all()) and report["iterations"] < 200


def _boundary_of(S, x, fixed):
    b = cs.Boundary()
    for v in S.vertices:
        sl = S.vertex_slice(v)
        cols = [c - sl.start for c in fixed.tolist() if sl.start <= c < sl.stop]
        if cols:
            b.fix(v, x[:, [sl.start + c for c in cols]], coords=cols)
    return b


def clamped_sheaf(widths, seed, kind):
    """An MLP sheaf with its output clamped: the last weight edge (quadratic or Huber) is a stiff rest; or,
    with ``kind="ce"``, a target vertex read by a cross-entropy edge of weight 1 from the logits."""
    S, layers, fixed, const, _ = mlp_sheaf(widths, seed)
    out, n = f"z{len(layers)}", widths[-1]
    if kind == "ce":
        S.add_vertex("t", n)
        S.add_edge(out, "t", cs.maps.Identity(n), cs.maps.Identity(n), name="loss",
                   potential=cs.potentials.CrossEntropy("softmax"))
        t = S.vertex_slice("t")
        return S, torch.cat([fixed, torch.arange(t.start, t.stop)]), const, ["loss"]
    last = f"weight:{out}"
    if kind == "huber":
        e = S.edge(last)
        S.remove_edge(last)
        S.add_edge(e.u, e.v, e.Fu, e.Fv, name=last, potential=cs.potentials.Huber(0.3))
    t = S.vertex_slice(out)
    return S, torch.cat([fixed, torch.arange(t.start, t.stop)]).sort().values, const, [last]


def _clamped_problem(widths, seed, kind, B=6):
    """A clamped network (`clamped_sheaf`), the plan of its determined part and a batch at its forward pass."""
    S, fixed, const, rest = clamped_sheaf(widths, seed, kind)
    g = torch.Generator().manual_seed(seed + 3)
    p = cs.propagation.plan(S, fixed, const, torch.ones(len(const), dtype=F64),
                            edges=[n for n in S.edges if n not in rest])
    x = torch.zeros(B, S.C0, dtype=F64)
    x[:, : widths[0]] = torch.randn(B, widths[0], generator=g, dtype=F64)
    target = S.vertex_slice("t" if kind == "ce" else f"z{len(widths) - 1}")
    y = torch.randn(B, widths[-1], generator=g, dtype=F64)
    x[:, target] = torch.softmax(y, -1) if kind == "ce" else y
    p.run(x)
    return S, fixed, rest, p, x


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=3, max_size=4), st.integers(0, 10_000),
       st.sampled_from(["quadratic", "huber", "ce"]))
def test_low_rank_newton_finds_the_clamped_equilibrium(widths, seed, kind):
    """A hard-clamped output (a rest as stiff as the network): the same equilibrium as Newton's, stationary."""
    S, fixed, rest, p, x = _clamped_problem(widths, seed, kind)
    assert {s.edge for s in p.steps} == set(S.edges) - set(rest)
    fast, report, _ = cs.nudge.low_rank_newton(S, p, x, tol=1e-11, max_iter=30)
    assert torch.equal(fast[:, fixed], x[:, fixed])
    ref = cs.minimize(S, _boundary_of(S, x, fixed), method="newton", x0=x, tol=1e-11)
    ok = report["converged"] & (ref.extra["on_kinks"] == 0)
    grad = gradient(S, fast)[:, p.free]
    smooth = report["converged"] & (report["on_kinks"] == 0)  # at a kink the certificate is one-sided
    assert bool((grad[smooth].norm(dim=-1) <= 1e-9).all())
    if kind != "huber":  # strictly convex in each activation region: one minimum there
        same = ok & ((fast[:, p.free] - ref.x.flat[:, p.free]).abs().amax(-1) < 1e-6)
        # a different region can hold another local minimum: then both are stationary (checked above)
        assert bool(same.any()) or not bool(ok.any())


@pytest.mark.parametrize("solver", ["low_rank_newton", "clamped_equilibrium"])
def test_one_step_in_a_linear_region_is_the_dense_solve(solver):
    """Linear maps and a quadratic clamp: one step is the exact minimiser (a dense least-squares solve), from any
    start of the free stalk (the model is exact)."""
    g = torch.Generator().manual_seed(0)
    A1, A2 = torch.randn(3, 2, generator=g, dtype=F64), torch.randn(2, 3, generator=g, dtype=F64)
    S = cs.Sheaf()
    for v, d in (("x", 2), ("h", 3), ("y", 2)):
        S.add_vertex(v, d)
    S.add_edge("x", "h", A1, torch.eye(3, dtype=F64), name="in")
    S.add_edge("h", "y", A2, torch.eye(2, dtype=F64), name="out", weight=2.5)
    p = cs.propagation.plan(S, torch.tensor([0, 1, 5, 6]), edges=["in"])
    x = torch.zeros(4, S.C0, dtype=F64)
    x[:, :2], x[:, 5:] = torch.randn(4, 2, generator=g, dtype=F64), torch.randn(4, 2, generator=g, dtype=F64)
    x[:, 2:5] = torch.randn(4, 3, generator=g, dtype=F64)
    out, report = getattr(cs.nudge, solver)(S, p, x, tol=1e-12)[:2]
    # min ½|h − A1 x|² + 1.25 |y − A2 h|²  <=>  (I + 2.5 A2ᵀA2) h = A1 x + 2.5 A2ᵀ y
    M = torch.eye(3, dtype=F64) + 2.5 * A2.T @ A2
    h = torch.linalg.solve(M, (x[:, :2] @ A1.T + 2.5 * x[:, 5:] @ A2).T).T
    torch.testing.assert_close(out[:, 2:5], h, rtol=1e-12, atol=1e-12)
    assert report["iterations"] == 1 and bool(report["converged"].all())


def test_low_rank_newton_local_gradients_and_plan_errors():
    S, fixed, const, rest = clamped_sheaf([3, 4, 2], 1, "quadratic")
    edges = [n for n in S.edges if n not in rest]
    p = cs.propagation.plan(S, fixed, const, torch.ones(len(const), dtype=F64), edges=edges)
    x = torch.zeros(3, S.C0, dtype=F64)
    x[:, :3] = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    p.run(x)
    x[:, S.vertex_slice("z2")] += 1.0
    maps = {(n, "u"): S.edge(n).Fu for n in S.edges if n.startswith("weight")}
    out, _, grads = cs.nudge.low_rank_newton(S, p, x, maps=maps)
    want = cs.learning.edge_gradients(S, out, list(maps))
    for k in maps:
        torch.testing.assert_close(grads[k], want[k])
    with pytest.raises(cs.NotDeterminedError, match="undefined"):
        cs.propagation.plan(S, fixed, const, torch.ones(len(const), dtype=F64), edges=edges[:-1])
    with pytest.raises(cs.NotDeterminedError, match="not needed"):
        cs.propagation.plan(S, fixed, const, torch.ones(len(const), dtype=F64), edges=list(S.edges))
    with pytest.raises(KeyError, match="no edge 'nope'"):
        cs.propagation.plan(S, fixed, const, torch.ones(len(const), dtype=F64), edges=["nope"])


def test_parameter_gradients_of_the_sweeps_are_the_local_rule():
    """``params=``: the local rule of tensors the maps hold (a dense ``W̄`` and an affine edge's own weight and
    bias), its forces read off the transposed sweep, equals `cellsheaf.learning.local_gradients` at the result."""
    S, fixed, const = nudged_sheaf([3, 4, 4, 2], 5, 1e-3, cs.potentials.Huber(0.3))
    Wbar = S.edge("weight:z2").Fu.weight
    n = Wbar.shape[1] - Wbar.shape[0]
    W, b = Wbar[:, :n].clone(), Wbar[:, n:].diagonal().clone()
    assert torch.equal(cs.maps.Affine(W, b).matrix(), Wbar)
    S.set_maps("weight:z2", Fu=cs.maps.Affine(W, b))
    p = cs.propagation.plan(S, fixed, const, torch.ones(len(const), dtype=F64), determined=True)
    x = torch.zeros(6, S.C0, dtype=F64)
    x[:, :3] = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    x[:, S.vertex_slice("t")] = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    p.run(x)
    params = [S.edge("weight:z1").Fu.weight, W, b]
    out, report = nudged_equilibrium(S, p, x, tol=1e-13, max_iter=20, params=params)
    want = cs.learning.local_gradients(S, out, params)
    for got, w in zip(report["param_grads"], want):
        torch.testing.assert_close(got, w, rtol=1e-7, atol=1e-13)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=3, max_size=4), st.integers(0, 10_000),
       st.sampled_from(["quadratic", "huber", "ce"]))
def test_clamped_equilibrium_is_stationary_and_agrees_with_newton(widths, seed, kind):
    """Region steps reach a stationary point of the clamped energy (one-sided at kinks), from the forward pass
    (ReLU patterns change on the way); where Newton's equilibrium is smooth, they find the same one."""
    S, fixed, rest, p, x = _clamped_problem(widths, seed, kind)
    fast, report = cs.nudge.clamped_equilibrium(S, p, x, tol=1e-10, max_iter=30)
    assert torch.equal(fast[:, fixed], x[:, fixed])
    grad = gradient(S, fast)[:, p.free]
    ok = report["converged"]
    kink = (fast[:, p.free] == 0) & torch.isin(p.free, torch.cat([torch.arange(S.vertex_slice(v).start,
                                                                             S.vertex_slice(v).stop)
                                                                for v in S.vertices if v.startswith("z")]))
    smooth = ok & ~kink.any(-1)
    assert bool((grad[smooth].norm(dim=-1) <= 1e-9).all())
    assert bool((report["grad_norm"][ok] <= 1e-10).all())
    ref = cs.minimize(S, _boundary_of(S, x, fixed), method="newton", x0=x, tol=1e-11)
    if kind != "huber":
        both = smooth & (ref.extra["on_kinks"] == 0) & ref.converged
        same = both & ((fast[:, p.free] - ref.x.flat[:, p.free]).abs().amax(-1) < 1e-6)
        assert bool(same.any()) or not bool(both.any())


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_cross_entropy_hessian_in_closed_form(activation):
    """The rest's curvature of a cross-entropy on logits (target end held) equals its curvature model applied to
    each basis vector."""
    from cellsheaf.nudge import _prediction_hessian

    g = torch.Generator().manual_seed(0)
    U = cs.potentials.CrossEntropy(activation)
    z, y = torch.randn(5, 4, generator=g, dtype=F64), torch.rand(5, 4, generator=g, dtype=F64)
    h = _prediction_hessian(U, y, z, ["u"])
    for j in range(4):
        e = torch.zeros_like(z)
        e[:, j] = 1.0
        torch.testing.assert_close(h[:, :, j], U.pair_curvature(y, z, torch.zeros_like(y), e)[1])
    assert _prediction_hessian(U, y, z, ["v", "u"]) is None and _prediction_hessian(cs.potentials.Huber(), y, z,
                                                                                    ["u"]) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_held_stationarity_equals_the_two_sided_evaluation(seed):
    """At coordinates held exactly on their ReLU kinks, the one-sided derivatives from the kinked maps alone give
    the measure, the coordinates to let go and their sides of the evaluation at both sides of the kinks."""
    from cellsheaf.gauss_newton import _kink_points, _stationarity
    from cellsheaf.nudge import _held_stationarity

    S, fixed, const, rest = clamped_sheaf([3, 5, 4, 2], seed, "quadratic")
    g = torch.Generator().manual_seed(seed)
    p = cs.propagation.plan(S, fixed, const, torch.ones(len(const), dtype=F64),
                            edges=[n for n in S.edges if n not in rest])
    x = torch.zeros(7, S.C0, dtype=F64)
    x[:, :3] = torch.randn(7, 3, generator=g, dtype=F64)
    x[:, S.vertex_slice("z3")] = torch.randn(7, 2, generator=g, dtype=F64)
    p.run(x)
    x[:, p.free] += 0.3 * torch.randn(7, p.free.numel(), generator=g, dtype=F64)
    points = _kink_points(S, p.free)
    on = ~torch.isnan(points).all(-1) & (torch.rand(7, p.free.numel(), generator=g) < 0.5)
    xf = x[:, p.free]
    x[:, p.free] = torch.where(on, torch.zeros_like(xf), xf)
    gf = gradient(S, x)[:, p.free]
    want = _stationarity(S, x, p.free, gf, on, points, 1e-8)
    got = _held_stationarity(S, x, p.free, gf, on, points, 1e-8)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]) and bool(got[1].any())
