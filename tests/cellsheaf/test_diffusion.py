"""Heat diffusion against closed forms (scipy expm), Thms 2.4/2.5, and its stability checks."""

import numpy as np
import pytest
import scipy.linalg as sla
import torch
from hypothesis import given, settings, strategies as st

import cellsheaf as cs

from .test_harmonic import random_sheaf

F64 = torch.float64


def affine_flow(S, b, x0, alpha, t):
    """Solve dω/dt = −α(Aω + c) by the exponential of the augmented matrix [[−αA, −αc], [0, 0]]."""
    rb = b.resolve(S)
    L = S.laplacian(format="dense").numpy()
    free, fixed = rb.free.numpy(), rb.fixed.numpy()
    A, c = L[np.ix_(free, free)], L[np.ix_(free, fixed)] @ rb.values.numpy()
    n = len(free)
    M = np.zeros((n + 1, n + 1))
    M[:n, :n], M[:n, n] = -alpha * A, -alpha * c
    w = sla.expm(M * t) @ np.append(x0[free], 1.0)
    x = x0.copy()
    x[free], x[fixed] = w[:n], rb.values.numpy()
    return x


def test_exact_matches_expm_and_rk4_and_euler_approach_it():
    S = random_sheaf(0)
    b = cs.Boundary().fix(1, torch.tensor([1.0, -1.0], dtype=F64))
    x0 = torch.randn(S.C0, dtype=F64, generator=torch.Generator().manual_seed(0))
    ref = affine_flow(S, b, x0.numpy(), alpha=0.7, t=0.9)
    exact = cs.diffuse(S, x0, b, method="exact", t=0.9, alpha=0.7)
    np.testing.assert_allclose(exact.x.flat.numpy(), ref, atol=1e-12)
    rk4 = cs.diffuse(S, x0, b, method="rk4", t=0.9, alpha=0.7, dt=1e-3)
    np.testing.assert_allclose(rk4.x.flat.numpy(), ref, atol=1e-10)
    euler = cs.diffuse(S, x0, b, method="euler", t=0.9, alpha=0.7, dt=1e-4)
    assert np.abs(euler.x.flat.numpy() - ref).max() < 1e-3
    assert euler.steps == 9000 and abs(euler.t - 0.9) < 1e-12


@pytest.mark.parametrize("method", ["euler", "rk4", "exact"])
def test_without_boundary_converges_to_projection_on_h0(method):
    S = cs.Sheaf()  # constant sheaf on a path plus one edge that kills a direction: H0 = span{(1,0) everywhere}
    for v in range(4):
        S.add_vertex(v, 2)
    I = torch.eye(2, dtype=F64)
    for v in range(3):
        S.add_edge(v, v + 1, I, I)
    S.add_edge(0, 3, torch.tensor([[0.0, 1.0]], dtype=F64), torch.tensor([[0.0, -1.0]], dtype=F64))
    x0 = torch.randn(3, S.C0, dtype=F64, generator=torch.Generator().manual_seed(1))
    H = np.linalg.svd(S.laplacian(format="dense").numpy())[2][-1:].T  # ker L (dim 1)
    proj = (x0.numpy() @ H) @ H.T
    res = cs.diffuse(S, x0, method=method, tol=1e-12)
    assert res.converged
    np.testing.assert_allclose(res.x.flat.numpy(), proj, atol=1e-10)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_converges_to_harmonic_extension(seed):
    S = random_sheaf(seed, n=5, extra=2)
    b = cs.Boundary().fix(0, torch.randn(2, 2, dtype=F64)).fix(3, torch.randn(2, dtype=F64)).fix(
        2, torch.randn(1, dtype=F64), coords=[1])
    x0 = torch.randn(2, S.C0, dtype=F64, generator=torch.Generator().manual_seed(seed))
    res = cs.diffuse(S, x0, b, method="rk4", tol=1e-11, max_steps=200_000)
    assert res.converged
    torch.testing.assert_close(res.x.flat, cs.harmonic_extension(S, b).flat, rtol=0, atol=1e-8)


def test_euler_energy_decreases_and_is_recorded():
    S = random_sheaf(2)
    b = cs.Boundary().fix(0, torch.ones(2, dtype=F64))
    res = cs.diffuse(S, torch.zeros(S.C0, dtype=F64), b, t=2.0, record=5)
    traj = res.extra["trajectory"]
    total = traj["edge_energy"].sum(-1)
    assert traj["edge_energy"].shape[-1] == len(S.edges) and traj["step"][1] == 5
    assert bool((total[1:] <= total[:-1] + 1e-15).all())


def test_step_size_is_checked_against_the_spectrum():
    S = random_sheaf(3)
    lam = float(torch.linalg.eigvalsh(S.laplacian(format="dense")).max())
    bound = cs.stable_step(S)
    assert bound == pytest.approx(2 / lam, rel=1e-6)
    with pytest.raises(ValueError, match="stability bound"):
        cs.diffuse(S, torch.zeros(S.C0, dtype=F64), dt=1.01 * bound, t=1.0)


def test_not_converged_is_reported():
    S = random_sheaf(4)
    res = cs.diffuse(S, torch.randn(S.C0, dtype=F64), cs.Boundary().fix(0, torch.ones(2, dtype=F64)), max_steps=3)
    assert not res.converged and res.steps == 3 and "tol" in res.message


def test_nonlinear_sheaf_flows_to_the_consistent_state():
    # z = 2x (x fixed to -1 or 1), a = relu(z): a single-neuron network, gradient flow with the local adjoint.
    S = cs.Sheaf()
    for v in ("x", "z", "a"):
        S.add_vertex(v, 1)
    S.add_edge("x", "z", 2 * torch.eye(1, dtype=F64), torch.eye(1, dtype=F64))
    S.add_edge("z", "a", cs.maps.ReLU(1), torch.eye(1, dtype=F64))
    b = cs.Boundary().fix("x", torch.tensor([[-1.0], [1.0]], dtype=F64))
    res = cs.diffuse(S, torch.zeros(2, 3, dtype=F64), b, tol=1e-12, dt=0.2)
    assert res.converged
    torch.testing.assert_close(res.x["a"], torch.tensor([[0.0], [2.0]], dtype=F64))
    assert float(res.energy.max()) < 1e-20


# ---------------------------------------------------------------- argument checks and honest fixed-time runs

@pytest.mark.parametrize("kw, name", [(dict(t=-50.0), "t"), (dict(t=float("nan")), "t"), (dict(t=float("inf")), "t"),
                                      (dict(t=1.0, dt=0.0), "dt"), (dict(dt=-1.0), "dt"), (dict(tol=float("nan")), "tol"),
                                      (dict(alpha=float("inf")), "alpha"), (dict(max_steps=-1), "max_steps"),
                                      (dict(max_steps=2.5), "max_steps"), (dict(t="1"), "t")])
@pytest.mark.parametrize("method", ["euler", "rk4", "exact"])
def test_bad_time_arguments_are_named(kw, name, method):
    S = random_sheaf(5)
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        cs.diffuse(S, torch.ones(S.C0, dtype=F64), method=method, **kw)


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_max_steps_is_honoured_with_a_final_time(method):
    S = random_sheaf(5)
    res = cs.diffuse(S, torch.ones(S.C0, dtype=F64), method=method, t=1e7, max_steps=10)
    assert not res.converged and res.steps == 10 and res.t < 1e7 and "max_steps" in res.message


@pytest.mark.parametrize("method", ["euler", "rk4", "exact"])
def test_t_zero_and_an_empty_batch_are_no_ops(method):
    S = random_sheaf(6)
    b = cs.Boundary().fix(0, torch.ones(2, dtype=F64))
    x0 = torch.randn(S.C0, dtype=F64, generator=torch.Generator().manual_seed(0))
    res = cs.diffuse(S, x0, b, method=method, t=0.0)
    assert res.converged and res.steps == 0 and res.t == 0.0
    torch.testing.assert_close(res.x.flat, b.resolve(S).fill(x0), rtol=0, atol=0)
    empty = cs.diffuse(S, torch.zeros(0, S.C0, dtype=F64), b, method=method)
    assert empty.converged and empty.x.flat.shape == (0, S.C0) and empty.energy.shape == (0,)


@pytest.mark.parametrize("t", [0.05, 0.3, 2.0])
@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_fixed_time_subdivides_and_estimates_its_error(t, method):
    S = random_sheaf(7)
    b = cs.Boundary().fix(1, torch.tensor([1.0, -1.0], dtype=F64))
    x0 = torch.randn(S.C0, dtype=F64, generator=torch.Generator().manual_seed(3))
    ref = affine_flow(S, b, x0.numpy(), alpha=1.0, t=t)
    res = cs.diffuse(S, x0, b, method=method, t=t)
    err = float(np.abs(res.x.flat.numpy() - ref).max())
    bound = cs.stable_step(S, b, method=method)
    assert res.converged and res.steps >= t / bound and abs(res.t - t) < 1e-12
    est = res.extra["error_estimate"]
    assert est / 3 <= err <= 3 * est or err < 1e-12, (err, est)


def test_the_default_tolerance_is_reachable_in_float32():
    g = torch.Generator().manual_seed(8)
    maps = [(torch.randn(2, 2, generator=g, dtype=F64), torch.randn(2, 2, generator=g, dtype=F64)) for _ in range(6)]
    sheaves = []
    for dtype in (torch.float32, F64):
        S = cs.Sheaf()
        for v in range(6):
            S.add_vertex(v, 2)
        for v, (Fu, Fv) in enumerate(maps):
            S.add_edge(v, (v + 1) % 6, Fu.to(dtype), Fv.to(dtype))
        sheaves.append(S)
    res = cs.diffuse(sheaves[0], torch.zeros(12), cs.Boundary().fix(0, torch.ones(2)), max_steps=20_000)
    assert res.converged and res.x.flat.dtype == torch.float32
    ref = cs.harmonic_extension(sheaves[1], cs.Boundary().fix(0, torch.ones(2, dtype=F64))).flat
    assert float((res.x.flat.double() - ref).abs().max()) < 1e-3


def _scaled_path(scale: float) -> cs.Sheaf:
    g = torch.Generator().manual_seed(0)
    S = cs.Sheaf()
    for v in "abc":
        S.add_vertex(v, 2)
    for u, v in ("ab", "bc"):
        S.add_edge(u, v, scale * (torch.eye(2, dtype=torch.float64) + 0.3 * torch.randn(2, 2, generator=g, dtype=torch.float64)),
                   scale * (torch.eye(2, dtype=torch.float64) + 0.3 * torch.randn(2, 2, generator=g, dtype=torch.float64)),
                   name=u + v)
    return S


@pytest.mark.parametrize("scale", [1e-60, 1e-20, 1e-5])
def test_small_maps_are_not_certified_at_the_start(scale):
    """With maps of size 1e-20 every gradient is below an absolute 1e-10: the tolerance scales with the
    Laplacian, so the flow and the minimiser still reach the harmonic extension (they stopped at x0 before)."""
    b = cs.Boundary().fix("a", torch.ones(2, dtype=torch.float64))
    ref = cs.harmonic_extension(_scaled_path(1.0), b).flat
    S = _scaled_path(scale)
    for res in (cs.diffuse(S, torch.zeros(6, dtype=torch.float64), boundary=b, max_steps=5000),
                cs.diffuse(S, torch.zeros(6, dtype=torch.float64), boundary=b, method="exact"),
                cs.minimize(S, b, method="newton")):
        assert res.converged
        torch.testing.assert_close(res.x.flat, ref, atol=1e-8, rtol=0)


@pytest.mark.parametrize("scale", [1e-100, 1e-200])
def test_maps_too_small_for_the_precision_are_refused_naming_the_edge(scale):
    b = cs.Boundary().fix("a", torch.ones(2, dtype=torch.float64))
    S = _scaled_path(scale)
    for call in (lambda: cs.diffuse(S, torch.zeros(6, dtype=torch.float64), boundary=b),
                 lambda: cs.diffuse(S, torch.zeros(6, dtype=torch.float64), boundary=b, method="exact"),
                 lambda: cs.minimize(S, b)):
        with pytest.raises(FloatingPointError, match="maps are too small.*edge 'ab'"):
            call()
    with pytest.raises(FloatingPointError, match="edge 'ab' has a map entry"):
        cs.diffuse(_scaled_path(1e200), torch.zeros(6, dtype=torch.float64), boundary=b)
