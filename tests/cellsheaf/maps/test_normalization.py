"""LayerNorm, RMSNorm, GroupNorm and softmax along an axis against torch.nn and autograd."""

import pytest
import torch
import torch.nn as nn

import cellsheaf as cs
from cellsheaf import maps as M

from .checks import F64, check_nonlinear
from .specs import check_round_trip

g = torch.Generator().manual_seed(5)


def rand(*shape):
    return torch.randn(*shape, generator=g, dtype=F64)


def affine(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


CASES = {
    "layernorm": lambda: (affine(nn.LayerNorm(4).double()), (3, 4),
                          lambda m: M.LayerNorm((3, 4), (4,), m.weight, m.bias, m.eps)),
    "layernorm-2d": lambda: (affine(nn.LayerNorm((2, 3), elementwise_affine=False).double()), (2, 3),
                             lambda m: M.LayerNorm((2, 3), (2, 3), eps=m.eps)),
    "rmsnorm": lambda: (affine(nn.RMSNorm(4).double()), (2, 4), lambda m: M.RMSNorm((2, 4), (4,), m.weight)),
    "rmsnorm-eps": lambda: (affine(nn.RMSNorm(3, eps=1e-3).double()), (3,),
                            lambda m: M.RMSNorm((3,), 3, m.weight, eps=m.eps)),
    "groupnorm": lambda: (affine(nn.GroupNorm(2, 4).double()), (4, 3),
                          lambda m: M.GroupNorm((4, 3), 2, m.weight, m.bias, m.eps)),
    "groupnorm-2d": lambda: (affine(nn.GroupNorm(1, 2).double()), (2, 2, 2),
                             lambda m: M.GroupNorm((2, 2, 2), 1, m.weight, m.bias, m.eps)),
    "softmax-0": lambda: (nn.Softmax(1), (3, 2), lambda m: M.SoftmaxAlong((3, 2), 0)),
    "softmax-last": lambda: (nn.Softmax(-1), (2, 3), lambda m: M.SoftmaxAlong((2, 3), -1)),
    "logsoftmax": lambda: (nn.LogSoftmax(2), (2, 3, 2), lambda m: M.SoftmaxAlong((2, 3, 2), 1, log=True)),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_torch_and_autograd(case):
    module, shape, make = CASES[case]()
    F = make(module)
    x = rand(3, *shape)
    with torch.no_grad():
        assert torch.allclose(F.apply(x.reshape(3, -1)), module(x).reshape(3, -1), atol=1e-13)
    check_nonlinear(F, x.reshape(3, -1), tol=1e-11)
    assert torch.allclose(F.linearize(x[0].reshape(-1)).matrix(), F.jacobian(x[0].reshape(-1)), atol=1e-14)
    check_round_trip(F)
    xf = x.float().reshape(3, -1)
    with torch.no_grad():
        assert torch.allclose(F.apply(xf), module.float()(x.float()).reshape(3, -1), atol=1e-5)


def test_norm_parameters_are_shared_and_errors_are_clear():
    ln = nn.LayerNorm(3)
    F = M.LayerNorm((2, 3), 3, ln.weight, ln.bias)
    assert [id(p) for p in F.parameters()] == [id(ln.weight), id(ln.bias)]
    with pytest.raises(ValueError, match="trailing"):
        M.LayerNorm((2, 3), (2,))
    with pytest.raises(ValueError, match="groups"):
        M.GroupNorm((3, 2), 2)
    with pytest.raises(ValueError, match="weight has shape"):
        M.LayerNorm((3,), 3, torch.ones(2))
    with pytest.raises(ValueError, match="not an axis"):
        M.SoftmaxAlong((2, 3), 2)


def test_layernorm_edge_propagates():
    F = M.LayerNorm((2, 3), 3)
    S = cs.Sheaf(); S.add_vertex("z", 6); S.add_vertex("y", 6)
    S.add_edge("z", "y", F, M.Identity(6))
    z = rand(4, 6)
    bnd = cs.Boundary().fix("z", z)
    for method in ("propagate", "newton"):
        assert torch.allclose(cs.minimize(S, bnd, method=method).x["y"], F.apply(z), atol=1e-10)
