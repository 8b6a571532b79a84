"""Edge potentials: values, gradients and curvature against closed forms and autograd (App. B.3, Eq. 27)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cellsheaf as cs
from cellsheaf import potentials as P



def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)

SMOOTH = [P.Quadratic(), P.Huber(0.7), P.PNorm(3.0), P.PNorm(1.5), P.ElasticNet(0.0, 2.0),
          P.Convex(lambda r: torch.logsumexp(r, -1), name="lse"), P.Weighted(P.Huber(0.5), _t([1.0, 2, 3]))]
ALL = SMOOTH + [P.L1(), P.ElasticNet(0.5, 1.0), P.Weighted(P.Quadratic(), 2.5)]


def _point(seed: int, shape=(4, 3)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(*shape, generator=g, dtype=torch.float64)


def _autograd_grad(U, r):
    r = r.clone().requires_grad_(True)
    return torch.autograd.grad(U.value(r).sum(), r)[0]


@pytest.mark.parametrize("U", ALL, ids=repr)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_grad_matches_autograd_away_from_kinks(U, seed):
    r = _point(seed)
    r = torch.where(r.abs() < 1e-3, torch.full_like(r, 0.5), r)  # stay off the kinks of L1 / Huber
    torch.testing.assert_close(U.grad(r), _autograd_grad(U, r))


@pytest.mark.parametrize("U", SMOOTH, ids=repr)
def test_gradcheck(U):
    r = _point(0).requires_grad_(True)
    r.data = torch.where(r.abs() < 1e-2, torch.full_like(r, 0.4), r)
    r.data = torch.where((r.abs() - 0.7).abs() < 1e-2, torch.full_like(r, 0.3), r)  # off Huber's threshold
    assert torch.autograd.gradcheck(lambda t: U.value(t), (r,))


@pytest.mark.parametrize("U", SMOOTH, ids=repr)
def test_curvature_is_the_hessian_for_smooth_potentials(U):
    r = _t([[0.3, -1.2, 2.0]])
    v = _t([[1.0, -0.5, 0.25]])
    H = torch.autograd.functional.hessian(lambda t: U.value(t.unsqueeze(0)).sum(), r[0])
    torch.testing.assert_close(U.curvature(r, v)[0], H @ v[0])


def test_closed_forms_of_appendix_b3():
    r = _t([0.5, -2.0, 0.0])
    torch.testing.assert_close(P.Quadratic().value(r), _t(2.125))
    torch.testing.assert_close(P.L1().value(r), _t(2.5))
    torch.testing.assert_close(P.L1().grad(r), _t([1.0, -1.0, 0.0]))  # sign(0) = 0 ∈ [−1, 1]
    torch.testing.assert_close(P.Huber(1.0).value(r), _t(0.125 + 1.5))  # Eq. 44
    torch.testing.assert_close(P.Huber(1.0).grad(r), _t([0.5, -1.0, 0.0]))  # Eq. 45
    torch.testing.assert_close(P.PNorm(3).grad(r), _t([0.25, -4.0, 0.0]))  # Eq. 43
    torch.testing.assert_close(P.PNorm(1.5).grad(r), torch.sign(r) * r.abs() ** 0.5)
    torch.testing.assert_close(P.PNorm(2).value(r), P.Quadratic().value(r))
    en = P.ElasticNet(0.3, 2.0)
    torch.testing.assert_close(en.value(r), 0.3 * P.L1().value(r) + 2.0 * P.Quadratic().value(r))
    torch.testing.assert_close(P.Weighted(P.L1(), _t([1.0, 10.0, 5.0])).value(r), _t(20.5))


def test_huber_interpolates_quadratic_and_l1():
    U = P.Huber(0.5)
    small, large = _t([0.1, -0.3]), _t([10.0, -7.0])
    torch.testing.assert_close(U.value(small), P.Quadratic().value(small))
    torch.testing.assert_close(U.value(large), 0.5 * P.L1().value(large) - 2 * 0.5 ** 2 / 2)
    assert U.curvature(large, torch.ones(2, dtype=torch.float64)).abs().max() == 0


def test_l1_curvature_is_the_irls_majoriser():
    r = _t([2.0, -0.5, 0.0])
    w = P.L1().curvature(r, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(w[:2], _t([0.5, 2.0]))
    assert torch.isfinite(w).all() and w[2] > 1e6


@pytest.mark.parametrize("act", ["softmax", "sigmoid"])
def test_cross_entropy_force_on_the_logits_is_phi_minus_y(act):
    z = _t([[0.3, -1.0, 2.0], [1.0, 0.0, -0.5]])
    y = _t([[0.0, 0.0, 1.0], [0.2, 0.5, 0.3]]) if act == "softmax" else _t([[1.0, 0, 1], [0.5, 0, 1]])
    U = P.CrossEntropy(act)  # the prediction (logits) is the u end
    g_target, g_logits = U.pair_grad(y, z)
    phi = torch.softmax(z, -1) if act == "softmax" else torch.sigmoid(z)
    torch.testing.assert_close(g_logits, phi - y)  # Eq. 27
    zz, yy = z.clone().requires_grad_(True), y.clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(zz, yy, reduction="sum") if act == "softmax" else \
        torch.nn.functional.binary_cross_entropy_with_logits(zz, yy, reduction="sum")
    torch.testing.assert_close(U.pair_value(y, z).sum(), ref)
    gz, gy = torch.autograd.grad(ref, (zz, yy))
    torch.testing.assert_close(g_logits, gz)
    torch.testing.assert_close(g_target, gy)


def test_cross_entropy_prediction_end_and_probabilities():
    z, y = _t([0.2, -0.4]), _t([0.7, 0.3])
    a, b = P.CrossEntropy("softmax", prediction="u"), P.CrossEntropy("softmax", prediction="v")
    torch.testing.assert_close(a.pair_value(y, z), b.pair_value(z, y))
    p = torch.softmax(z, -1)
    U = P.CrossEntropy(None)
    torch.testing.assert_close(U.pair_value(y, p), a.pair_value(y, z))
    torch.testing.assert_close(U.pair_grad(y, p)[1], -y / p)


def test_cross_entropy_curvature_is_the_prediction_hessian():
    z, y = _t([[0.2, -0.4, 1.0]]), _t([[0.2, 0.3, 0.5]])
    dz = _t([[1.0, 2.0, -1.0]])
    for act in ("softmax", "sigmoid"):
        U = P.CrossEntropy(act)
        H = torch.autograd.functional.hessian(lambda t: U.pair_value(y[0], t), z[0])
        hv, hu = U.pair_curvature(y, z, torch.zeros_like(y), dz)
        torch.testing.assert_close(hu[0], H @ dz[0])
        assert hv.abs().max() == 0


def test_cross_entropy_is_undefined_at_non_positive_probabilities():
    U = P.CrossEntropy(None)
    with pytest.raises(ValueError, match="positive"):
        U.pair_value(_t([1.0, 0.0]), _t([0.0, 1.0]))
    with pytest.raises(TypeError, match="two-argument"):
        U.value(torch.ones(2, dtype=torch.float64))


def test_undefined_potential_error_names_the_edge():
    S = cs.Sheaf(); S.add_vertex("p", 2); S.add_vertex("y", 2)
    eye = torch.eye(2, dtype=torch.float64)
    S.add_edge("p", "y", eye, eye, name="loss", potential=P.CrossEntropy(None))
    with pytest.raises(ValueError, match="edge 'loss'.*positive"):
        cs.energy(S, _t([-0.5, 1.5, 1.0, 0.0]))


def test_convex_checks_what_the_function_returns():
    with pytest.raises(ValueError, match="reduce the last axis"):
        P.Convex(lambda r: r ** 2, name="square").value(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="not finite"):
        P.Convex(lambda r: torch.log(r).sum(-1), name="log").value(_t([-1.0, 1.0]))
    with pytest.raises(TypeError):
        P.Convex(3.0)


@pytest.mark.parametrize("bad", [lambda: P.Huber(0), lambda: P.PNorm(1.0), lambda: P.ElasticNet(0, 0),
                                 lambda: P.Weighted(P.CrossEntropy(), torch.ones(2, dtype=torch.float64)),
                                 lambda: P.Weighted(P.L1(), _t([-1.0])),
                                 lambda: P.CrossEntropy("relu"), lambda: P.CrossEntropy(prediction="w")])
def test_bad_parameters(bad):
    with pytest.raises((ValueError, TypeError)):
        bad()


def test_weighted_dimension_mismatch_is_explained():
    with pytest.raises(ValueError, match="3 weights"):
        P.Weighted(P.L1(), _t([1.0, 2.0, 3.0])).value(_t([1.0, 2.0]))


def test_flags_and_equality():
    assert P.Quadratic().quadratic and P.Quadratic().separable
    assert not P.L1().smooth and P.ElasticNet(0.0, 1.0).smooth and not P.ElasticNet(1.0, 1.0).smooth
    assert not P.CrossEntropy().difference and P.Weighted(P.CrossEntropy(), 2.0).difference is False
    assert P.Huber(0.5) == P.Huber(0.5) and P.Huber(0.5) != P.Huber(0.6)
    assert P.Weighted(P.L1(), 2.0) == P.Weighted(P.L1(), 2.0)
    assert "Huber" in repr(P.Weighted(P.Huber(1.0), 2.0))


def test_float32():
    r = torch.tensor([0.5, -2.0, 0.1], dtype=torch.float32)
    for U in ALL:
        assert U.value(r).dtype == torch.float32 and U.grad(r).dtype == torch.float32


def test_potentials_round_trip_through_the_sheaf_spec():
    S = cs.Sheaf(); S.add_vertex("a", 2); S.add_vertex("b", 2)
    pots = [P.L1(), P.Huber(0.3), P.PNorm(3), P.ElasticNet(0.1, 2), P.Weighted(P.Huber(1.0), _t([1.0, 2.0])),
            P.CrossEntropy("sigmoid", "v")]
    for i, U in enumerate(pots):
        S.add_edge("a", "b", torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64), name=f"e{i}",
                   potential=U)
    T = cs.Sheaf.from_spec(S.to_spec().model_dump_json())
    assert T == S and [T.edge(f"e{i}").potential for i in range(len(pots))] == pots
