"""Convolutions, pooling and per-token maps against torch.nn.functional, autograd and dense matrices."""

import pytest
import torch
import torch.nn.functional as fn
from hypothesis import given, settings, strategies as st

import cellsheaf as cs
from cellsheaf import maps as M

from .checks import F64, check_linear

g = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=g, dtype=F64)


@st.composite
def conv_cases(draw, ndim):
    groups = draw(st.integers(1, 2))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    spatial = tuple(max(draw(st.integers(1, 6)), d * (k - 1) + 1 - 2 * p)
                    for k, d, p in zip(kernel, dilation, padding))
    return c_in, c_out, kernel, dilation, padding, stride, spatial, groups


def _conv_against_torch(case, ndim):
    c_in, c_out, kernel, dilation, padding, stride, spatial, groups = case
    W = rand(c_out, c_in // groups, *kernel)
    F = (M.Conv1d if ndim == 1 else M.Conv2d)(W, (c_in, *spatial), stride, padding, dilation, groups)
    x = rand(3, c_in, *spatial).requires_grad_()
    ref = (fn.conv1d if ndim == 1 else fn.conv2d)(x, W, None, stride, padding, dilation, groups)
    assert F.out_shape == tuple(ref.shape[1:])
    assert torch.allclose(F.apply(x.detach().reshape(3, -1)), ref.reshape(3, -1), atol=1e-13)
    w = rand(*ref.shape)
    (vjp,) = torch.autograd.grad(ref, x, w)  # the adjoint is the vjp of the convolution
    assert torch.allclose(F.adjoint(w.reshape(3, -1)), vjp.reshape(3, -1), atol=1e-13)
    check_linear(F)
    d = rand(2, F.d_out).abs()
    assert torch.allclose(F.squared_vjp(None, d), d @ F.matrix() ** 2, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(conv_cases(1))
def test_conv1d_matches_torch(case):
    _conv_against_torch(case, 1)


@settings(max_examples=25, deadline=None)
@given(conv_cases(2))
def test_conv2d_matches_torch(case):
    _conv_against_torch(case, 2)


def test_conv_float32_and_same_padding_and_nn_module():
    conv = torch.nn.Conv2d(2, 4, 3, padding="same", bias=True)
    F = M.Conv2d(conv.weight, (2, 5, 5), padding="same").affine(conv.bias)
    x = torch.randn(3, 2, 5, 5)
    stalk = torch.cat([x.reshape(3, -1), torch.ones(3, F.d_out)], 1)
    assert F.apply(stalk).dtype == torch.float32
    assert torch.allclose(F.apply(stalk), conv(x).reshape(3, -1), atol=1e-5)
    assert torch.allclose(F.apply_affine(x.reshape(3, -1)), conv(x).reshape(3, -1), atol=1e-5)
    assert {id(p) for p in F.parameters()} == {id(conv.weight), id(conv.bias)}
    check_linear(M.Conv1d(rand(2, 1, 2), (2, 5), groups=2, stride=2), dtype=torch.float32, tol=1e-5)


def test_conv_is_not_densified(monkeypatch):
    F = M.Conv2d(rand(3, 2, 3, 3), (2, 8, 8), stride=2, padding=1).affine(rand(3))
    monkeypatch.setattr(M.Conv, "matrix", lambda self: pytest.fail("densified"))
    x = rand(2, F.d_in)
    F.apply(x), F.adjoint(rand(2, F.d_out)), F.squared_vjp(x, rand(2, F.d_out)), F.coo()


def test_conv_errors():
    with pytest.raises(ValueError, match="groups"):
        M.Conv2d(rand(4, 3, 3, 3), (4, 5, 5), groups=2)
    with pytest.raises(ValueError, match="kernel must be 4-d"):
        M.Conv2d(rand(4, 3, 3), (3, 5))
    with pytest.raises(ValueError, match="does not fit"):
        M.Conv1d(rand(1, 1, 5), (1, 3))
    with pytest.raises(ValueError, match="same"):
        M.Conv1d(rand(1, 1, 2), (1, 3), padding="same")


@pytest.mark.parametrize("ndim", [1, 2])
@pytest.mark.parametrize("kernel,stride,padding,count", [(2, None, 0, True), (3, 2, 1, True), (3, 1, 1, False),
                                                         (2, 1, 1, False)])
def test_avg_pool_matches_torch(ndim, kernel, stride, padding, count):
    shape = (2, 7) if ndim == 1 else (2, 5, 6)
    P = (M.AvgPool1d if ndim == 1 else M.AvgPool2d)(kernel, shape, stride, padding, count)
    x = rand(3, *shape)
    ref = (fn.avg_pool1d if ndim == 1 else fn.avg_pool2d)(x, kernel, stride, padding, False, count)
    assert P.out_shape == tuple(ref.shape[1:])
    assert torch.allclose(P.apply(x.reshape(3, -1)), ref.reshape(3, -1), atol=1e-14)
    check_linear(P)
    d = rand(2, P.d_out).abs()
    assert torch.allclose(P.squared_vjp(None, d), d @ P.matrix() ** 2, atol=1e-13)


@pytest.mark.parametrize("ndim,out,shape", [(1, 3, (2, 7)), (1, 1, (1, 4)), (2, (2, 3), (2, 5, 7)),
                                            (2, 1, (3, 4, 4)), (2, (None, 2), (1, 3, 5))])
def test_adaptive_avg_pool_matches_torch(ndim, out, shape):
    P = (M.AdaptiveAvgPool1d if ndim == 1 else M.AdaptiveAvgPool2d)(out, shape)
    x = rand(3, *shape)
    ref = (fn.adaptive_avg_pool1d if ndim == 1 else fn.adaptive_avg_pool2d)(x, out)
    assert P.out_shape == tuple(ref.shape[1:])
    assert torch.allclose(P.apply(x.reshape(3, -1)), ref.reshape(3, -1), atol=1e-14)
    check_linear(P)
    d = rand(2, P.d_out).abs()
    assert torch.allclose(P.squared_vjp(None, d), d @ P.matrix() ** 2, atol=1e-13)


def test_token_linear_matches_nn_linear_per_token():
    lin = torch.nn.Linear(3, 2).double()
    F = M.Affine(M.TokenLinear(lin.weight, tokens=4), lin.bias)
    x = rand(5, 4, 3)
    assert F.shape == (4, 2)
    assert torch.allclose(F.apply_affine(x.reshape(5, -1)), lin(x).reshape(5, -1), atol=1e-14)
    check_linear(M.TokenLinear(rand(2, 3), 4))
    check_linear(F)


def test_permutation_is_a_transpose():
    x = rand(2, 3, 4, 5)
    P = M.permutation((3, 4, 5), (2, 0, 1))
    assert torch.equal(P.apply(x.reshape(2, -1)), x.permute(0, 3, 1, 2).reshape(2, -1))


def test_conv_edge_propagates_and_solves():
    conv = torch.nn.Conv2d(2, 3, 3, stride=2, padding=1).double().requires_grad_(False)
    pool = M.AvgPool2d(2, (3, 3, 3), stride=1)
    F = M.Conv2d(conv.weight, (2, 6, 6), stride=2, padding=1).affine(conv.bias)
    S = cs.Sheaf(); S.add_vertex("x", F.d_in); S.add_vertex("z", F.d_out); S.add_vertex("p", pool.d_out)
    S.add_edge("x", "z", F, M.Identity(F.d_out), name="conv")
    S.add_edge("z", "p", pool, M.Identity(pool.d_out), name="pool")
    x = rand(2, 2, 6, 6)
    bnd = cs.Boundary().fix("x", torch.cat([x.reshape(2, -1), torch.ones(2, F.d_out, dtype=F64)], 1))
    want = fn.avg_pool2d(conv(x), 2, 1).reshape(2, -1)
    for method in ("propagate", "newton"):
        assert torch.allclose(cs.minimize(S, bnd, method=method).x["p"], want, atol=1e-10)
    assert torch.allclose(cs.harmonic_extension(S, bnd)["p"], want, atol=1e-10)


@pytest.mark.parametrize("F", [
    M.Conv2d(rand(4, 1, 2, 3), (2, 5, 6), stride=(2, 1), padding=1, dilation=(1, 2), groups=2).affine(rand(4)),
    M.Conv1d(rand(2, 3, 2).float(), (3, 4)),
    M.AvgPool2d(3, (1, 4, 4), 1, 1, False), M.AdaptiveAvgPool2d((None, 2), (1, 3, 5)),
    M.Affine(M.TokenLinear(rand(2, 3), 4), rand(2), d_in=20, ones=12),
], ids=["conv2d-affine", "conv1d-float32", "avgpool", "adaptive", "token-affine"])
def test_spec_round_trip(F):
    from .specs import check_round_trip

    check_round_trip(F)
