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
    b = cs.Boundary()
    for v in S.vertices:
        sl = S.vertex_slice(v)
        cols = [c - sl.start for c in fixed.tolist() if sl.start <= c < sl.stop]
        if cols:
            b.fix(v, x[:, [sl.start + c for c in cols]], coords=cols)
    ref = cs.minimize(S, b, method="newton", x0=x, tol=1e-12)
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
