"""`cellsheaf.maps.Activation`: every torch activation, its derivative and its kinks."""

import pytest
import torch
import torch.nn as nn

import cellsheaf as cs
from cellsheaf import maps as M

from .checks import F64, check_nonlinear
from .specs import check_round_trip

MODULES = [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.ELU(), nn.ELU(0.5), nn.CELU(0.7), nn.SELU(),
           nn.Softplus(), nn.Softplus(2.0, 3.0), nn.Mish(), nn.Hardtanh(), nn.Hardtanh(-2.0, 0.5), nn.Hardswish(),
           nn.Hardsigmoid(), nn.ReLU6(), nn.Tanh(), nn.Sigmoid(), nn.LogSigmoid(), nn.Softsign(), nn.Tanhshrink(),
           nn.ReLU(), nn.LeakyReLU(0.1)]
IDS = [repr(m) for m in MODULES]


def points(dtype=F64):
    g = torch.Generator().manual_seed(3)
    return (4 * torch.randn(3, 6, generator=g, dtype=F64)).to(dtype)


@pytest.mark.parametrize("module", MODULES, ids=IDS)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_apply_matches_the_module(module, dtype):
    F = M.activation(module, 6)
    x = points(dtype)
    y = F.apply(x)
    assert y.dtype == dtype
    assert torch.equal(y, module(x))


@pytest.mark.parametrize("module", MODULES, ids=IDS)
def test_derivatives_match_autograd_away_from_kinks(module):
    F = M.activation(module, 6)
    check_nonlinear(F, points(), tol=1e-12)
    x = points().requires_grad_()
    (J,) = torch.autograd.grad(module(x).sum(), x)  # elementwise: the gradient of the sum is the derivative
    x = x.detach()
    assert torch.allclose(F.derivative(x), J, atol=1e-12)
    assert torch.allclose(F.linearize(x[0]).matrix(), torch.diag(J[0]), atol=1e-12)
    d = torch.rand(3, 6, dtype=F64)
    assert torch.allclose(F.squared_vjp(x, d), d * J ** 2, atol=1e-12)


@pytest.mark.parametrize("name,kinks,left,right", [
    ("relu6", (0.0, 6.0), (0.0, 1.0), (1.0, 0.0)), ("hardtanh", (-1.0, 1.0), (0.0, 1.0), (1.0, 0.0)),
    ("hardswish", (-3.0, 3.0), (0.0, 1.5), (-0.5, 1.0)), ("hardsigmoid", (-3.0, 3.0), (0.0, 1 / 6), (1 / 6, 0.0)),
    ("selu", (0.0,), (1.0507009873554805 * 1.6732632423543772,), (1.0507009873554805,)),
])
def test_kinks_take_the_right_derivative(name, kinks, left, right):
    F = M.Activation(name, len(kinks))
    at = torch.tensor(kinks, dtype=F64)
    assert F.kinks == kinks
    assert torch.allclose(F.derivative(at), torch.tensor(right, dtype=F64), atol=1e-12)
    eps = 1e-7
    assert torch.allclose(F.derivative(at - eps), torch.tensor(left, dtype=F64), atol=1e-6)


def test_options_spec_and_errors():
    F = M.Activation("elu", 3, alpha=0.5)
    assert F.options == {"alpha": 0.5} and F.kinks == (0.0,) and M.Activation("elu", 3).kinks == ()
    assert F == M.Activation("elu", 3, {"alpha": 0.5}) and F != M.Activation("elu", 3)
    for G in (F, M.Activation("softplus", 2, beta=2.0), M.Activation("gelu_tanh", 4)):
        check_round_trip(G)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        M.Activation("swish", 2)
    with pytest.raises(ValueError, match="takes the options"):
        M.Activation("gelu", 2, alpha=1.0)
    with pytest.raises(ValueError, match="no elementwise map for the module Softmax"):
        M.activation(nn.Softmax(), 2)


@pytest.mark.parametrize("name", ["gelu", "silu", "hardswish", "mish"])
def test_activation_edge_propagates_and_minimises(name):
    S = cs.Sheaf(); S.add_vertex("z", 4); S.add_vertex("a", 4)
    S.add_edge("z", "a", M.Activation(name, 4), M.Identity(4))
    z = points()[:, :4]
    bnd = cs.Boundary().fix("z", z)
    want = M.Activation(name, 4).apply(z)
    for method in ("propagate", "newton"):
        assert torch.allclose(cs.minimize(S, bnd, method=method).x["a"], want, atol=1e-10)


@pytest.mark.parametrize("name,kink,start,target", [("relu6", 6.0, 5.5, 7.0), ("hardtanh", 1.0, 0.5, 2.0),
                                                    ("hardtanh", -1.0, -0.5, -2.0)])
def test_newton_holds_a_coordinate_at_any_declared_kink(name, kink, start, target):
    """A pin beyond the saturation pulls z onto the kink of the activation: the minimum is on the switching
    surface; Newton's active set holds z there and the Clarke test certifies it."""
    S = cs.Sheaf()
    for v in ("x", "z", "a", "t"):
        S.add_vertex(v, 2)
    S.add_edge("x", "z", torch.eye(2, dtype=F64), M.Identity(2), name="w")
    S.add_edge("z", "a", M.Activation(name, 2), M.Identity(2), name="act")
    S.add_edge("a", "t", M.Identity(2), M.Identity(2), name="pin", weight=10.0)
    bnd = cs.Boundary().fix("x", torch.tensor([[start, 0.0]], dtype=F64)).fix("t", torch.tensor([[target, 0.0]],
                                                                                                 dtype=F64))
    res = cs.minimize(S, bnd, method="newton", tol=1e-12)
    assert res.converged, res.message
    assert float(res.x["z"][0, 0]) == kink and int(res.extra["on_kinks"][0]) == 1
    x = res.x.flat
    for h in (1e-6, -1e-6):  # a minimum along the held coordinate
        y = x.clone()
        y[0, S.vertex_slice("z").start] += h
        assert float(cs.energy(S, y)[0]) > float(res.energy[0])
