"""Soft pins (Eq. 23) and reluctance edges (App. B.2): penalties as ordinary edges."""

from __future__ import annotations

import math

import pytest
import torch

import cellsheaf as cs
from cellsheaf import maps as M
from cellsheaf import potentials as P
from tests.conftest import path_sheaf

F64 = torch.float64


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def test_soft_pin_maps_and_energy_are_equation_23():
    S = cs.Sheaf(); S.add_vertex("h", 4)
    pin = cs.soft_pin(S, "h", _t([1.0, -2.0]), coords=[3, 1], strength=9.0)
    e = S.edge(pin.edge)
    assert (e.u, e.v) == (pin.anchor, "h") and pin.coords == [3, 1]
    torch.testing.assert_close(e.Fu.matrix().to(F64), 3.0 * torch.eye(2, dtype=F64))
    torch.testing.assert_close(e.Fv.matrix().to(F64), 3.0 * _t([[0, 0, 0, 1], [0, 1, 0, 0]]))
    x = _t([0.5, 0.25, 7.0, 3.0, 1.0, -2.0])  # h, then the anchor holding the target
    assert float(cs.energy(S, x)) == pytest.approx(9.0 / 2 * ((3.0 - 1.0) ** 2 + (0.25 + 2.0) ** 2))


def test_hard_pin_is_the_limit_of_strong_soft_pins():
    S = path_sheaf(5, d=2)
    ends = cs.Boundary().fix(0, _t([0.0, 0.0])).fix(4, _t([4.0, -4.0]))
    hard = cs.harmonic_extension(S, ends.copy().fix(2, _t([10.0]), coords=[0]))
    errors = []
    for gamma in (1.0, 10.0, 100.0, 1000.0):
        T = S.copy()
        pin = cs.soft_pin(T, 2, _t([10.0]), coords=[0], strength=gamma)
        soft = cs.minimize(T, pin.boundary(ends.copy()), tol=1e-11)
        assert soft.method == "newton" and soft.converged
        errors.append(float((soft.x.flat[: S.C0] - hard.flat).abs().max()))
    assert all(b < a / 5 for a, b in zip(errors, errors[1:]))  # O(1/γ)
    assert errors[-1] < 1e-2


def test_batched_targets_and_the_boundary_handle():
    S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    S.add_edge("a", "b", torch.eye(1, dtype=F64), torch.eye(1, dtype=F64))
    targets = _t([[1.0], [2.0], [3.0]])
    pin = cs.soft_pin(S, "b", targets, strength=1.0)
    b = pin.boundary(cs.Boundary().fix("a", _t([0.0])))
    assert pin.anchor in b.vertices
    res = cs.minimize(S, b)
    torch.testing.assert_close(res.x["b"], targets / 2)  # midpoint of 0 and the target
    with pytest.raises(ValueError, match="already"):
        pin.boundary(b)


def test_names_removal_and_robust_pins():
    S = cs.Sheaf(); S.add_vertex("v", 2); S.add_vertex("w", 2)
    S.add_edge("w", "v", torch.eye(2, dtype=F64), torch.eye(2, dtype=F64))
    first = cs.soft_pin(S, "v", _t([1.0, 1.0]))
    second = cs.soft_pin(S, "v", _t([0.0]), coords=[0], potential=P.L1())
    assert first.anchor == "v/pin" and second.anchor == "v/pin#1"
    assert S.edge(second.edge).potential == P.L1()
    named = cs.soft_pin(S, "w", _t([2.0, 2.0]), name="target")
    assert named.anchor == named.edge == "target"
    first.remove()
    assert "v/pin" not in S.vertices and "v/pin" not in S.edges and "v/pin#1" in S.vertices


@pytest.mark.parametrize("kwargs, match", [
    ({"strength": 0.0}, "strength"), ({"strength": math.inf}, "hard pin"),
    ({"values": _t([1.0, 2.0, 3.0])}, "values of shape"), ({"values": _t([float("nan"), 0.0])}, "NaN"),
    ({"coords": [5, 0]}, "Select"),
])
def test_bad_soft_pins(kwargs, match):
    S = cs.Sheaf(); S.add_vertex("v", 2)
    args = {"values": _t([1.0, 2.0]), **kwargs}
    with pytest.raises((ValueError, IndexError), match=match):
        cs.soft_pin(S, "v", **args)
    assert S.vertices == ["v"]  # nothing left behind
    with pytest.raises(KeyError):
        cs.soft_pin(S, "nowhere", _t([1.0]))


def _reluctance_reference(S, b, lam, omega0):
    """Closed form of the regularised linear problem: (L_ΩΩ + λI) ω = −L_ΩU u + λ ω₀."""
    rb = b.resolve(S)
    L = S.laplacian().to_dense().to(F64)
    free, fixed = rb.free, rb.fixed
    A = L[free][:, free] + lam * torch.eye(len(free), dtype=F64)
    rhs = -L[free][:, fixed] @ rb.values + lam * omega0[free]
    x = torch.zeros(S.C0, dtype=F64)
    x[fixed], x[free] = rb.values, torch.linalg.solve(A, rhs)
    return x


@pytest.mark.parametrize("reference", ["zero", "cochain", "dict"])
def test_reluctance_is_the_regularised_energy_equation_41(reference):
    S = path_sheaf(4, d=2)
    b = cs.Boundary().fix(0, _t([1.0, 2.0])).fix(3, _t([-1.0, 5.0]))
    lam = 0.7
    omega0 = torch.zeros(S.C0, dtype=F64) if reference == "zero" else torch.linspace(-1, 1, S.C0, dtype=F64)
    ref = {"zero": None, "cochain": cs.Cochain(S, omega0), "dict": {1: omega0[2:4], 2: omega0[4:6]}}[reference]
    T = S.copy()
    reg = cs.reluctance(T, [1, 2], reference=ref, strength=lam)
    assert len(reg) == 2 and [p.vertex for p in reg] == [1, 2]
    res = cs.minimize(T, reg.boundary(b.copy()), tol=1e-12)
    torch.testing.assert_close(res.x.flat[: S.C0], _reluctance_reference(S, b, lam, omega0))
    x = res.x.flat
    expected = cs.energy(S, x[: S.C0]) + lam / 2 * ((x[2:6] - omega0[2:6]) ** 2).sum()
    torch.testing.assert_close(cs.energy(T, x), expected)
    reg.remove()
    assert T == S


def test_l1_reluctance_gives_sparse_states():
    """Note 5.2: an L1 anchor at zero shrinks small values exactly to zero (soft thresholding)."""
    S = cs.Sheaf(); S.add_vertex("data", 3); S.add_vertex("w", 3)
    S.add_edge("data", "w", M.Identity(3), M.Identity(3))
    reg = cs.reluctance(S, ["w"], strength=1.0, potential=P.L1())
    b = reg.boundary(cs.Boundary().fix("data", _t([3.0, 0.5, -2.0])))
    res = cs.minimize(S, b, method="euler", dt=0.05, max_iter=4000)
    torch.testing.assert_close(res.x["w"], _t([2.0, 0.0, -1.0]), atol=0.06, rtol=0)
