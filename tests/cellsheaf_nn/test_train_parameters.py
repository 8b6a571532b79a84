"""Every compiled parameter trains by the local rule and is written back: conv kernels and biases, batch
norm affines, norm weights, per-token Linear, attention projections, learned scalars and vectors, and
tied (shared) parameters, in the joint, equilibrium and nudged modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cellsheaf_nn as csnn
from cellsheaf_nn import losses

from .zoo import Tied, TransformerBlock, randomise_batchnorm

D = torch.float64


class SmallCNN(nn.Module):
    """Conv (kernel, bias), BatchNorm2d (eval affine), GroupNorm, a learned scalar, a learned per-channel
    broadcast scale ``(C, 1, 1)``, a learned vector and a Linear used twice (tied), softmax output."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1, self.bn = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.c2, self.gn = nn.Conv2d(3, 4, 3, stride=2), nn.GroupNorm(2, 4)
        self.scale = nn.Parameter(torch.tensor(1.3))
        self.channel = nn.Parameter(1 + 0.1 * torch.randn(4, 1, 1, generator=g))
        self.fc, self.tied = nn.Linear(16, 5), nn.Linear(5, 5)
        self.vec = nn.Parameter(1 + 0.1 * torch.randn(5, generator=g))

    def forward(self, x):
        h = torch.tanh(self.bn(self.c1(x)))
        h = F.silu(self.gn(self.c2(h))) * self.scale * self.channel
        z = torch.tanh(self.tied(torch.tanh(self.fc(h.flatten(1)))))
        return torch.softmax(self.tied(z) * self.vec, -1)


class Tokens(nn.Module):
    """Per-token Linear, LayerNorm and RMSNorm on ``(T, D)``, ``nn.MultiheadAttention``, a learned shift."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.inp, self.ln, self.rms = nn.Linear(d, d), nn.LayerNorm(d), nn.RMSNorm(d)
        self.att = nn.MultiheadAttention(d, 2, batch_first=True)
        self.shift = nn.Parameter(0.1 * torch.arange(d, dtype=torch.float32))

    def forward(self, x):
        h = torch.tanh(self.ln(self.inp(x)))
        h = h + self.att(h, h, h, need_weights=False)[0]
        return (self.rms(h) + self.shift).flatten(1)


def _perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norm weights and biases (torch initialises them to ones and zeros: too special)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return randomise_batchnorm(model, seed)


def _cnn():
    return _perturbed(SmallCNN()).double(), (1, 6, 6), torch.randn(6, 1, 6, 6, dtype=D), torch.arange(6) % 5, "ce"


def _tokens():
    g = torch.Generator().manual_seed(1)
    return (_perturbed(Tokens()).double(), (3, 4), torch.randn(5, 3, 4, generator=g, dtype=D),
            torch.randn(5, 12, generator=g, dtype=D), "mse")


class _Flat(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x).flatten(1)


def _transformer():
    g = torch.Generator().manual_seed(2)
    return (_perturbed(_Flat(TransformerBlock(8, 2))).double(), (4, 8), torch.randn(3, 4, 8, generator=g, dtype=D),
            torch.randn(3, 32, generator=g, dtype=D), "mse")


def _autograd(model: nn.Module, X, Y, loss) -> dict:
    model.zero_grad()
    loss(model(X), Y).backward()
    return {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("case", [_cnn, _tokens, _transformer], ids=["cnn", "tokens", "transformer"])
def test_nudged_local_gradients_of_every_parameter_kind_match_autograd(case):
    model, shape, X, Y, loss_name = case()
    ns = csnn.compile(model, input_shape=shape)
    trainer = csnn.SheafTrainer(ns, mode="nudged", loss=loss_name, gamma=1e-7)
    local = trainer.local_gradients(X, Y)
    exact = _autograd(ns.to_module(), X, Y, trainer.loss)
    assert set(local) == set(exact)
    for k, G in exact.items():
        cos = F.cosine_similarity(local[k].flatten(), G.flatten(), dim=0)
        assert float(cos) > 0.999, (k, float(cos))
        assert float((local[k] - G).norm()) <= 1e-3 * float(G.norm()), k


def test_the_cnn_covers_every_parameter_kind():
    model, shape, *_ = _cnn()
    ns = csnn.compile(model, input_shape=shape)
    assert set(ns.parameters) == {"c1.weight", "c1.bias", "bn.weight", "bn.bias", "c2.weight", "c2.bias",
                                  "gn.weight", "gn.bias", "scale", "channel", "tied.weight", "tied.bias", "vec",
                                  "fc.weight", "fc.bias"}
    assert ns.parameters["scale"].dim() == 0 and ns.parameters["channel"].shape == (4, 1, 1)
    tokens = csnn.compile(_tokens()[0], input_shape=(3, 4))
    assert {"inp.weight", "ln.weight", "rms.weight", "att.in_proj_weight", "att.out_proj.bias", "shift"} \
        <= set(tokens.parameters)


def test_a_tied_linear_is_one_parameter_whose_gradient_sums_its_uses():
    model = Tied().double()
    ns = csnn.compile(model)
    assert set(ns.parameters) == {"lin.weight", "lin.bias", "head.weight", "head.bias"}
    held = [t for e in ns.sheaf.edge_items() for t in e.Fu.tensors() if t is ns.parameters["lin.weight"]]
    assert len(held) == 2  # both uses hold the one tensor
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(7, 6, generator=g, dtype=D), torch.randn(7, 2, generator=g, dtype=D)
    local = csnn.SheafTrainer(ns, mode="nudged", loss="mse", gamma=1e-8).local_gradients(X, Y)
    exact = _autograd(ns.to_module(), X, Y, losses.get("mse"))
    for k, G in exact.items():
        assert float((local[k] - G).norm()) <= 1e-5 * float(G.norm()), k


@pytest.mark.parametrize("mode", ["nudged", "equilibrium", "joint"])
def test_training_changes_every_parameter_and_to_module_carries_it(mode):
    model, shape, X, Y, loss_name = _cnn()
    ns = csnn.compile(model, input_shape=shape)
    before = {k: p.clone() for k, p in ns.parameters.items()}
    options = {"joint": {"dt": 0.05}, "nudged": {"optimizer": "adam", "lr": 1e-2},
               "equilibrium": {"optimizer": "adam", "lr": 1e-2, "init": "forward_pass", "max_iter": 3}}[mode]
    trainer = csnn.SheafTrainer(ns, mode=mode, loss=loss_name, **options)
    trainer.fit(X, Y, steps=2, progress=False)
    assert all(not torch.equal(p, before[k]) for k, p in ns.parameters.items())
    back = ns.to_module()
    assert torch.allclose(back(X), ns.infer(X), atol=1e-10, rtol=0)
    params = dict(back.named_parameters())
    for k, p in ns.parameters.items():
        assert torch.equal(params[k].detach(), p) and params[k].requires_grad, k
    assert not any(p.requires_grad for p in ns.parameters.values())  # inference builds no autograd graph


def test_trainer_state_round_trips_the_parameters(tmp_path):
    model, shape, X, Y, loss_name = _cnn()
    ns = csnn.compile(model, input_shape=shape)
    trainer = csnn.SheafTrainer(ns, mode="nudged", loss=loss_name, optimizer="adam", lr=1e-2)
    trainer.fit(X, Y, steps=1, progress=False)
    trainer.save(tmp_path / "t.ckpt")
    saved = {k: p.clone() for k, p in ns.parameters.items()}
    trainer.fit(X, Y, steps=1, progress=False)
    trainer.load(tmp_path / "t.ckpt")
    assert all(torch.equal(p, saved[k]) for k, p in ns.parameters.items())
    state = trainer.state_dict()
    del state["parameters"]["scale"]
    with pytest.raises(ValueError, match="saved parameters"):
        trainer.load_state_dict(state)


def test_fit_takes_images_or_flat_inputs_and_names_the_shape():
    model, shape, X, Y, loss_name = _cnn()
    trainer = csnn.SheafTrainer(csnn.compile(model, input_shape=shape), mode="nudged", loss=loss_name)
    trainer.fit(X.reshape(len(X), -1), Y, steps=1, progress=False)
    assert trainer.local_gradients(X, Y).keys() == trainer.local_gradients(X.reshape(len(X), -1), Y).keys()
    with pytest.raises(ValueError, match=r"shape \(6, 1, 5, 7\); the network takes \(B, 1, 6, 6\) or \(B, 36\)"):
        trainer.fit(torch.zeros(6, 1, 5, 7, dtype=D), Y, steps=1, progress=False)
    hist = csnn.train_sgd(model, X, Y, loss=loss_name, steps=2, progress=False)  # backprop on images too
    assert len(hist.train_loss) == 3


class TwoInputs(nn.Module):
    """``head(relu(a(x) + b(cat(x, u))))``: two inputs of different sizes, a merge and a ReLU."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x, u):
        return self.head(torch.relu(self.a(x) + self.b(torch.cat([x, u], -1))))


def _two_input_data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, generator=g, dtype=D), torch.randn(n, 2, generator=g, dtype=D)), \
        torch.randn(n, 2, generator=g, dtype=D)


def test_a_two_input_model_trains_from_tuples_like_backprop():
    """``fit``/``local_gradients`` take a tuple of inputs as ``ns.infer(*inputs)`` does; the nudged local
    gradients match backprop, and one SGD step of the sheaf equals one of torch."""
    torch.manual_seed(0)
    model = TwoInputs().double()
    ns = csnn.compile(model, input_shape=[(3,), (2,)])
    X, Y = _two_input_data()
    assert torch.allclose(ns.infer(*X), model(*X), atol=1e-12, rtol=0)
    trainer = csnn.SheafTrainer(ns, mode="nudged", loss="mse", optimizer="sgd", lr=0.1, gamma=1e-8)
    local = trainer.local_gradients(X, Y)
    assert trainer._nudge_plan() is not None   # the sweeps' fast path, both inputs written into the cochain
    reference = ns.to_module()
    torch.nn.functional.mse_loss(reference(*X), Y).backward()
    exact = {k: p.grad for k, p in reference.named_parameters()}
    assert set(local) == set(exact)
    for k, G in exact.items():
        assert float((local[k] - G).norm()) <= 1e-5 * float(G.norm()), k
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    trainer.fit(X, Y, steps=1, progress=False, X_val=X, Y_val=Y)
    for (k, p), q in zip(ns.to_module().named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-9), k
    assert len(trainer.history.val_loss) == 2


@pytest.mark.parametrize("mode, kw", [("equilibrium", dict(optimizer="adam", lr=0.02, init="forward_pass")),
                                      ("joint", dict(dt=0.02, batch_size=4))])
def test_two_inputs_in_the_clamped_modes_and_the_wrong_number_of_inputs(mode, kw):
    ns = csnn.compile(TwoInputs().double(), input_shape=[(3,), (2,)])
    X, Y = _two_input_data(8)
    hist = csnn.SheafTrainer(ns, mode=mode, loss="mse", **kw).fit(X, Y, steps=6, progress=False)
    assert hist.step[-1] == 6 and hist.train_loss[-1] < hist.train_loss[0]
    with pytest.raises(ValueError, match=r"takes 2 inputs \('x', 'u'\), got 1"):
        csnn.SheafTrainer(ns, loss="mse").fit(X[0], Y, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"training \('u'\) inputs have shape \(8, 3\)"):
        csnn.SheafTrainer(ns, loss="mse").fit((X[0], X[0]), Y, steps=1, progress=False)
