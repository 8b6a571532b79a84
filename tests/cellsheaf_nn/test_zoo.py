"""The compiler on the model zoo: ``ns.infer(*inputs) == model(*inputs)``, diffusion, Lemma 3.2, pins by index,
max-pool ties, the dtype of a model without tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import cellsheaf as cs
import cellsheaf_nn as csnn

from .test_compile import TwoInTwoOut
from .zoo import (SMOOTH, Conv1dNet, Gated, LeNet, Learned, NormMLP, ResCNN, SwiGLU, Tied, TransformerBlock,
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
    "learned_scalar_vector_channel": (Learned, [(2, 4, 4)]),
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


def _scaled_norm_mlp(norm):
    """`NormMLP` with pre-activations of unit size: a norm of tiny pre-activations has a Jacobian ~ 1/σ, and
    the heat equation then needs ~10^4 steps (it still converges, see the step-size test below)."""
    model = NormMLP(norm)
    with torch.no_grad():
        model.a.weight.mul_(4.0)
    return model


def _small_cnn():
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2))


DIFFUSION = {  # the small ones: the heat equation from random starts within a few seconds
    "gelu_mlp": (ZOO["mlp_0"][0], [(3,)]),
    "silu_mlp": (ZOO["mlp_2"][0], [(3,)]),
    "tied": ZOO["tied"],
    "layernorm_mlp": (lambda: _scaled_norm_mlp(nn.LayerNorm), [(5,)]),
    "cnn_relu_maxpool": (_small_cnn, [(1, 4, 4)]),
    "two_in_two_out": (TwoInTwoOut, [(3,), (2,)]),
    "gated_quotient_two_in_two_out": ZOO["gated_two_in_two_out"],
}


@pytest.mark.parametrize("name", sorted(DIFFUSION))
def test_diffusion_from_a_random_start_reaches_the_forward_pass(name):
    make, shapes = DIFFUSION[name]
    torch.manual_seed(0)
    model = make().double().eval()
    ns = csnn.compile(model, input_shape=shapes if len(shapes) > 1 else shapes[0])
    xs = _inputs(shapes, F64, batch=2)
    y = ns.infer(*xs, method="diffusion", generator=torch.Generator().manual_seed(3), tol=1e-10, max_steps=20_000)
    with torch.no_grad():
        _close(y, model(*xs), 1e-7)


@pytest.mark.parametrize("init", ["random", "zeros"])
def test_a_quotient_denominator_starts_on_the_side_of_its_pole_where_the_answer_is(init):
    # the edge energy of a / b is infinite at b = 0: no gradient flow crosses it, so the denominator block of
    # the merge vertex starts at its forward-pass value; every other coordinate keeps the requested start
    torch.manual_seed(0)
    ns = csnn.compile(Gated().double(), input_shape=[(3,), (2,)])
    xs = _inputs([(3,), (2,)], F64, batch=2)
    start = ns.infer(*xs, method="diffusion", init=init, max_steps=0, check=False, return_state=True,
                     generator=torch.Generator().manual_seed(3))[1]
    answer = ns.infer(*xs, return_state=True)[1]
    assert torch.equal(start["truediv.in"][:, 4:], answer["truediv.in"][:, 4:])
    assert bool((answer["truediv.in"][:, 4:] > 1.5).all())
    want = torch.zeros(2, 4, dtype=F64) if init == "zeros" else None
    assert torch.equal(start["truediv.in"][:, :4], want) if want is not None else \
        not torch.allclose(start["truediv.in"][:, :4], answer["truediv.in"][:, :4])


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
def test_the_default_diffusion_step_is_stable_at_the_answer_of_a_norm_layer(norm):
    # at a random start the norm's Jacobian is small; at the answer (pre-activations of size ~0.3) it is
    # ~4x larger: a step from the start alone makes Euler circle the answer instead of reaching it
    torch.manual_seed(0)
    ns = csnn.compile(NormMLP(norm).double())
    x = _inputs([(5,)], F64, batch=2)[0]
    state = ns.infer(x, method="diffusion", max_steps=1, check=False, return_state=True,
                     generator=torch.Generator().manual_seed(3))[1]
    answer = ns.infer(x, return_state=True)[1].cochain.flat
    lam = max(float(cs.lambda_max(ns.sheaf, boundary=ns.boundary(x), at=answer[b])) for b in range(2))
    assert state.info.t * lam <= 1.0 + 1e-9  # one step of dt <= 1/λ_max at the answer: Euler is stable there


LEMMA_3_2 = {
    "cnn": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(32, 3), nn.Softmax(-1)), (1, 8, 8)),
    "lenet": (lambda: LeNet(12, 2, 2), (1, 12, 12)),
    "residual_cnn": (lambda: randomise_batchnorm(ResCNN(2, 2)), (3, 4, 4)),
    "transformer": (lambda: TransformerBlock(8, 2), (3, 8)),
    "transformer_mha": (lambda: TransformerBlock(8, 2, mha=True), (3, 8)),
}


@pytest.mark.parametrize("name", sorted(LEMMA_3_2))
def test_lemma_3_2_coboundary_is_square_with_determinant_one(name):
    make, shape = LEMMA_3_2[name]
    torch.manual_seed(0)
    ns = csnn.compile(make().double().eval(), input_shape=shape)
    x = torch.randn(*shape, dtype=F64)
    D = ns.restricted_coboundary(x, format="scipy")
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


def _clamped_completion(model, shape, seed: int, batch: int = 2):
    """Clamp the output of ``model`` to the class coordinates ``model(x_class)`` of random inputs, free the input,
    start from other random inputs; returns ``(state, completed input, output, target)``."""
    ns = csnn.compile(model, input_shape=shape)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        target = model(torch.randn(batch, *shape, generator=g, dtype=F64))
    ns.free_input()
    ns.clamp(ns.output, target)
    _, state = ns.infer(torch.randn(batch, *shape, generator=g, dtype=F64), method="newton", return_state=True,
                        check=False)
    return state, state[ns.input].reshape(batch, *shape), state[ns.output], target


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_clamp_a_class_through_a_max_pool_cnn_and_complete_the_input(act):
    # LeNet-style (Conv2d, activation, MaxPool2d, AvgPool2d, flatten, Linear): the completion rests on max-pool
    # ties (windows whose inputs are held equal to their maximum), certified stationary, and is a global section:
    # zero discord on every edge, so the network maps the completed input to the clamped class coordinates
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), act(), nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(8, 3)).double()
    state, completed, y, target = _clamped_completion(model, (1, 8, 8), seed=0)
    assert state.info.converged and state.info.residual <= 1e-10
    assert bool((state.info.extra["on_ties"] > 0).any())
    assert torch.equal(y, target)
    assert float(state.info.energy.max()) <= 1e-18
    with torch.no_grad():
        assert torch.allclose(model(completed), target, atol=1e-8, rtol=0)


@st.composite
def max_pool_cnns(draw):
    c_mid, k, pad = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(0, 1))
    size = draw(st.integers(max(k, 4), 6))
    act = draw(st.sampled_from([nn.ReLU, nn.Tanh]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    body = nn.Sequential(nn.Conv2d(1, c_mid, k, 1, pad), act(), nn.MaxPool2d(2)).double()
    n = body(torch.zeros(1, 1, size, size, dtype=F64)).numel()
    return nn.Sequential(body, nn.Flatten(), nn.Linear(n, 3)).double(), (1, size, size), draw(st.integers(0, 99))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(max_pool_cnns())
def test_clamped_max_pool_cnns_converge_to_certified_completions(case):
    # every item converges (a stationary point, ties and kinks certified); where it is a global section (zero
    # discord) the network maps the completed input to the clamp, and where it is not the energy says so
    model, shape, seed = case
    state, completed, y, target = _clamped_completion(model, shape, seed)
    assert bool(state.info.extra["converged"].all()), state.info.message
    assert torch.equal(y, target)
    with torch.no_grad():
        err = (model(completed) - target).abs().amax(-1)
    section = state.info.energy <= 1e-20
    assert bool((err[section] <= 1e-8).all()) and bool((err[~section] > 0).all())


def test_nudged_max_pool_cnn_takes_the_fast_path_with_backprops_gradients(monkeypatch):
    # dead windows (every input 0 after the ReLU) and a constant image (equal conv outputs) tie max pools at the
    # free state; the sweeps keep torch's selection there (its subgradient), so the nudged state needs no Newton
    # and its local gradients are backprop's
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, padding=1),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 5)).double()
    with torch.no_grad():
        model[0].bias.fill_(-0.3)
    ns = csnn.compile(model, input_shape=(1, 8, 8))
    X = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    X[0] = 0.5
    with torch.no_grad():
        h = torch.relu(model[0](X))
        assert bool((h[0, :, 2:4, 2:4] == h[0, :, 2:3, 2:3]).all()) and bool((F.max_pool2d(h, 2) == 0).any())

    def no_newton(*args, **kwargs):
        raise AssertionError("the nudged state fell back to Newton")
    monkeypatch.setattr(cs, "minimize", no_newton)
    trainer = csnn.SheafTrainer(ns, mode="nudged", loss="ce", gamma=1e-7)
    Y = torch.arange(6) % 5
    local = trainer.local_gradients(X, Y)
    module = ns.to_module()
    trainer.loss(module(X), Y).backward()
    for name, p in module.named_parameters():
        assert float(F.cosine_similarity(local[name].flatten(), p.grad.flatten(), dim=0)) > 0.999, name
        assert float((local[name] - p.grad).norm()) <= 1e-3 * float(p.grad.norm()), name


def test_max_pool_ties_select_as_torch_does():
    # windows with equal maxima (all zero after a ReLU, repeated values): the selection is torch's, so the
    # compiled map's vjp is torch's gradient and inference is exact
    x = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [2.0, 2.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0]],
                     dtype=F64).reshape(1, 1, 4, 4).requires_grad_(True)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    F.max_pool2d(x, 2).backward(w.reshape(1, 1, 2, 2))
    P = cs.maps.MaxPool2d(2, in_shape=(1, 4, 4))
    assert torch.equal(P.vjp(x.detach().reshape(-1), w), x.grad.reshape(-1))
    torch.manual_seed(0)
    model = _small_cnn().double()
    with torch.no_grad():
        model[0].bias.fill_(-1.0)  # most windows are dead: all zero
    ns = csnn.compile(model, input_shape=(1, 4, 4))
    xs = torch.randn(6, 1, 4, 4, dtype=F64)
    with torch.no_grad():
        assert bool((F.max_pool2d(torch.relu(model[0](xs)), 2) == 0).any())
        _close(ns.infer(xs), model(xs), 1e-12)


def test_pinned_max_pool_equilibria_are_reported_honestly():
    # a soft pin pulls the selected maximum down to the next one: the equilibrium lies on a switching
    # surface of the max-pool map. Newton either certifies it or says it did not converge, never silently
    torch.manual_seed(0)
    ns = csnn.compile(_small_cnn().double(), input_shape=(1, 4, 4))
    ns.pin(ns.output, [0], torch.tensor([2.0], dtype=F64), strength=5.0)
    xs = torch.randn(3, 1, 4, 4, dtype=F64)
    try:
        info = ns.infer(xs, method="newton", max_steps=15, return_state=True)[1].info
        assert info.converged and info.residual <= 1e-8
    except csnn.ConvergenceError as err:
        assert not err.result.converged and err.result.residual > 1e-10 and err.result.message


class _Functional(nn.Module):
    """No tensors of its own: only functional and shape ops."""

    def forward(self, x):
        return torch.tanh(x).reshape(x.shape[0], 2, 3).sum(-1)


class _Buffered(_Functional):
    """A floating buffer fixes the dtype as a parameter does."""

    def __init__(self):
        super().__init__()
        self.register_buffer("c", torch.ones(2, dtype=F64))

    def forward(self, x):
        return super().forward(x) * self.c


def test_a_model_without_tensors_compiles_in_torchs_default_dtype_unless_told():
    x = torch.randn(4, 6, dtype=F64)
    assert csnn.compile(_Functional(), input_shape=(6,)).dtype == torch.get_default_dtype() == torch.float32
    ns = csnn.compile(_Functional(), torch.float64, input_shape=(6,))
    assert ns.dtype == F64 and torch.allclose(ns.infer(x), _Functional()(x), atol=1e-15, rtol=0)
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(F64)
        assert csnn.compile(_Functional(), input_shape=(6,)).dtype == F64
    finally:
        torch.set_default_dtype(old)
    assert csnn.compile(_Buffered(), input_shape=(6,)).dtype == F64


def test_shape_ops_are_read_through_not_stored():
    # chunk -> view -> transpose of the qkv projection: the copy edges into the attention products read the
    # projection directly; only the head merge before the output projection is a vertex of its own
    torch.manual_seed(0)
    ns = csnn.compile(TransformerBlock(8, 2).double(), input_shape=(3, 8))
    assert [v for v, info in ns.layout.items() if info.kind == "select"] == ["transpose_4"]
    assert ns.edge_info["merge:matmul.in.0"].u == ns.edge_info["merge:matmul.in.1"].u == "z1"
    model = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.Flatten()).double()  # a reshape only
    x = torch.randn(5, 4, dtype=F64)
    assert torch.equal(csnn.compile(model).infer(x), model(x).detach())


def test_multihead_attention_vertices_are_named_after_their_part():
    torch.manual_seed(0)
    block = TransformerBlock(8, 2, mha=True).double().eval()
    ns = csnn.compile(block, input_shape=(3, 8))
    parts = [v for v, info in ns.layout.items() if info.module == "att"]
    assert parts == ["att.0.in_proj", "att.0.scores.in", "att.0.scores", "att.0.scaled_scores", "att.0.softmax",
                     "att.0.weighted_sum.in", "att.0.weighted_sum", "att.0.heads", "att.0"]
    x = torch.randn(2, 3, 8, dtype=F64)
    with torch.no_grad():
        h = block.n1(x)
        want = block.att(h, h, h, need_weights=True, average_attn_weights=False)[1]
    got = ns.infer(x, return_state=True)[1]["att.0.softmax"].reshape(want.shape)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_supported_ops_grouped_by_kind_with_the_names_users_call():
    ops = csnn.supported_ops(grouped=True)
    assert set(ops) == {"modules", "functions", "tensor methods"}
    for name in ("Conv2d", "MaxPool2d", "LayerNorm", "MultiheadAttention", "GELU", "BatchNorm2d"):
        assert name in ops["modules"]
    for name in ("torch.matmul", "torch.nn.functional.gelu", "torch.nn.functional.logsigmoid", "operator.add",
                 "torch.where", "torch.split"):
        assert name in ops["functions"]
    assert {"Tensor.view", "Tensor.transpose", "Tensor.mean"} <= set(ops["tensor methods"])
    assert sorted(n for names in ops.values() for n in names) == csnn.supported_ops()
    assert not any("_C" in n for names in ops.values() for n in names)
