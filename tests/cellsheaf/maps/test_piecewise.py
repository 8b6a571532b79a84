"""Max pooling as a piecewise-linear selection map."""

import pytest
import torch
import torch.nn.functional as fn

import cellsheaf as cs
from cellsheaf import maps as M

from .checks import F64, check_nonlinear
from .specs import check_round_trip

g = torch.Generator().manual_seed(11)


@pytest.mark.parametrize("ndim,kernel,stride,padding,dilation", [
    (1, 2, None, 0, 1), (1, 3, 2, 1, 1), (1, 2, 1, 1, 2), (2, 2, None, 0, 1), (2, (3, 2), (2, 1), (1, 0), 1),
    (2, 2, 1, 1, (1, 2))])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_max_pool_matches_torch(ndim, kernel, stride, padding, dilation, dtype):
    shape = (2, 7) if ndim == 1 else (2, 5, 6)
    P = (M.MaxPool1d if ndim == 1 else M.MaxPool2d)(kernel, shape, stride, padding, dilation)
    x = torch.randn(3, *shape, generator=g, dtype=F64).to(dtype).requires_grad_()
    ref = (fn.max_pool1d if ndim == 1 else fn.max_pool2d)(x, kernel, stride, padding, dilation)
    assert P.out_shape == tuple(ref.shape[1:])
    xf = x.detach().reshape(3, -1)
    assert torch.equal(P.apply(xf), ref.detach().reshape(3, -1))
    w = torch.randn(ref.shape, generator=g, dtype=F64).to(dtype)
    (vjp,) = torch.autograd.grad(ref, x, w)
    assert torch.allclose(P.vjp(xf, w.reshape(3, -1)), vjp.reshape(3, -1), atol=1e-6)
    if dtype == F64:
        check_nonlinear(P, xf, tol=1e-14)
        assert torch.equal(P.linearize(xf[0]).matrix(), P.jacobian(xf[0]))
        d = torch.rand(3, P.d_out, dtype=F64)
        assert torch.allclose(P.squared_vjp(xf, d), torch.einsum("bk,bki->bi", d, P.jacobian(xf) ** 2))
    check_round_trip(P)


def test_ties_select_the_first_maximum():
    P = M.MaxPool1d(2, (1, 4))
    x = torch.tensor([1.0, 1.0, 2.0, 2.0], dtype=F64)
    assert P.indices(x).tolist() == [0, 2]


def test_lenet_style_block_propagates_and_minimises():
    conv = M.Conv2d(torch.randn(2, 1, 3, 3, generator=g, dtype=F64), (1, 6, 6))
    pool = M.MaxPool2d(2, conv.out_shape)
    S = cs.Sheaf(); S.add_vertex("x", conv.d_in); S.add_vertex("z", conv.d_out)
    S.add_vertex("a", conv.d_out); S.add_vertex("p", pool.d_out)
    S.add_edge("x", "z", conv, M.Identity(conv.d_out))
    S.add_edge("z", "a", M.ReLU(conv.d_out), M.Identity(conv.d_out))
    S.add_edge("a", "p", pool, M.Identity(pool.d_out))
    x = torch.randn(2, 36, generator=g, dtype=F64)
    want = fn.max_pool2d(torch.relu(fn.conv2d(x.reshape(2, 1, 6, 6), conv.weight)), 2).reshape(2, -1)
    bnd = cs.Boundary().fix("x", x)
    for method in ("propagate", "newton"):
        assert torch.allclose(cs.minimize(S, bnd, method=method).x["p"], want, atol=1e-10)
