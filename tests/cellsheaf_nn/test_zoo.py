"""The compiler on the model zoo: ``ns.infer(*inputs) == model(*inputs)``, diffusion, Lemma 3.2, pins by index."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import cellsheaf_nn as csnn

from .zoo import (SMOOTH, Conv1dNet, Gated, LeNet, NormMLP, ResCNN, SwiGLU, Tied, TransformerBlock,
                  randomise_batchnorm, smooth_mlp)

F64 = torch.float64

ZOO = {
    "lenet": (lambda: LeNet(), [(1, 28, 28)]),
    "residual_cnn": (lambda: randomise_batchnorm(ResCNN(8, 3)), [(3, 8, 8)]),
    "conv1d": (Conv1dNet, [(4, 20)]),
    "swiglu": (SwiGLU, [(8,)]),
    "layernorm_mlp": (NormMLP, [(5,)]),
    "rmsnorm_mlp": (lambda: NormMLP(nn.RMSNorm), [(5,)]),
    "transformer": (lambda: TransformerBlock(16, 2), [(6, 16)]),
    "transformer_mha": (lambda: TransformerBlock(16, 2, mha=True), [(6, 16)]),
    "tied": (Tied, [(6,)]),
    "gated_two_in_two_out": (Gated, [(3,), (2,)]),
    **{f"mlp_{i}": (lambda a=act: smooth_mlp(a), [(3,)]) for i, act in enumerate(SMOOTH)},
}


def _inputs(shapes, dtype, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def _close(got, want, tol):
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert float((g - w).abs().max()) <= tol * max(1.0, float(w.abs().max()))


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_infer_is_the_forward_pass(name, dtype, tol):
    make, shapes = ZOO[name]
    torch.manual_seed(0)
    model = make().to(dtype).eval()
    ns = csnn.compile(model, input_shape=shapes if len(shapes) > 1 else shapes[0])
    xs = _inputs(shapes, dtype)
    with torch.no_grad():
        want = model(*xs)
    _close(ns.infer(*xs), want, tol)


@pytest.mark.parametrize("name", ["mlp_0", "mlp_2", "tied"])
def test_diffusion_from_a_random_start_reaches_the_forward_pass(name):
    make, shapes = ZOO[name]
    torch.manual_seed(0)
    model = make().double().eval()
    ns = csnn.compile(model, input_shape=shapes[0])
    xs = _inputs(shapes, F64, batch=2)
    y = ns.infer(*xs, method="diffusion", generator=torch.Generator().manual_seed(3), tol=1e-11, max_steps=20_000)
    _close(y, model(*xs).detach(), 1e-8)


@pytest.mark.parametrize("name, shape", [("cnn", (1, 8, 8)), ("transformer", (3, 8))])
def test_lemma_3_2_coboundary_is_square_with_determinant_one(name, shape):
    torch.manual_seed(0)
    if name == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(32, 3), nn.Softmax(-1)).double()
    else:
        model = TransformerBlock(8, 2).double()
    ns = csnn.compile(model, input_shape=shape)
    x = torch.randn(*shape, dtype=F64)
    D = ns.restricted_coboundary(x)
    assert D.shape[0] == D.shape[1]
    assert ns.coboundary_determinant(x) == 1.0


@st.composite
def cnns(draw):
    c_in, c_mid = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    k, stride, pad = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 1))
    size = draw(st.integers(max(k, 4), 9))
    pool = draw(st.sampled_from(["max", "avg", "adaptive", "none"]))
    layers = [nn.Conv2d(c_in, c_mid, k, stride, pad), draw(st.sampled_from([nn.ReLU, nn.GELU, nn.Tanh]))()]
    side = (size + 2 * pad - k) // stride + 1
    if pool == "max" and side >= 2:
        layers.append(nn.MaxPool2d(2))
    elif pool == "avg" and side >= 2:
        layers.append(nn.AvgPool2d(2))
    elif pool == "adaptive":
        layers.append(nn.AdaptiveAvgPool2d(2))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    body = nn.Sequential(*layers).double()
    n = body(torch.zeros(1, c_in, size, size, dtype=F64)).numel()
    model = nn.Sequential(body, nn.Flatten(), nn.Linear(n, 3)).double().eval()
    x = torch.randn(2, c_in, size, size, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return model, x


@settings(max_examples=15, deadline=None)
@given(cnns())
def test_random_cnns_infer_exactly(case):
    model, x = case
    ns = csnn.compile(model, input_shape=tuple(x.shape[1:]))
    _close(ns.infer(x), model(x).detach(), 1e-10)


def test_pin_a_conv_feature_map_by_channel_row_column():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 5 * 5, 2)).double()
    ns = csnn.compile(model, input_shape=(1, 5, 5))
    assert ns.layout["z1"].shape == (2, 5, 5)
    x = torch.randn(2, 1, 5, 5, dtype=F64)
    ns.pin("z1", [(1, 2, 3)], torch.tensor([0.7], dtype=F64))
    _, state = ns.infer(x, return_state=True)
    assert torch.allclose(state["z1"][:, 1 * 25 + 2 * 5 + 3], torch.full((2,), 0.7, dtype=F64), atol=1e-12)


def test_clamp_a_class_at_the_cnn_output_and_complete_the_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    ns = csnn.compile(model, input_shape=(1, 4, 4))
    target = torch.tensor([2.0, -1.0, 0.5], dtype=F64)
    ns.free_input()
    ns.clamp(ns.output, target)
    x0 = torch.zeros(1, 1, 4, 4, dtype=F64)
    _, state = ns.infer(x0, return_state=True, max_steps=200)
    completed = state["x"].reshape(1, 1, 4, 4)
    assert torch.allclose(model(completed).detach()[0], target, atol=1e-8)
