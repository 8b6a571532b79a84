"""Losses: values against torch, the potential scale, targets and output checks."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from cellsheaf_nn import losses

D = torch.float64

def _data(seed, B=7, n=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, n, generator=g, dtype=D), torch.randn(B, n, generator=g, dtype=D), g


@pytest.mark.parametrize("loss,reference", [
    (losses.MSE(), torch.nn.MSELoss()),
    (losses.L1(), torch.nn.L1Loss()),
    (losses.Huber(0.3), torch.nn.HuberLoss(delta=0.3)),
    (losses.PNorm(2.0), torch.nn.MSELoss()),
])
def test_difference_losses_match_torch(loss, reference):
    out, y, _ = _data(0)
    assert torch.allclose(loss(out, y), reference(out, y))


def test_pnorm_value():
    out, y, _ = _data(1)
    assert torch.allclose(losses.PNorm(1.5)(out, y), ((out - y).abs() ** 1.5).mean())


def test_bce_and_ce_match_torch_on_logits():
    z, _, g = _data(2, n=4)
    labels = torch.randint(0, 4, (7,), generator=g)
    ce = losses.CrossEntropy()(torch.softmax(z, -1), labels)
    assert torch.allclose(ce, F.cross_entropy(z, labels))
    soft = torch.softmax(torch.randn(7, 4, generator=g, dtype=D), -1)
    assert torch.allclose(losses.CrossEntropy()(torch.softmax(z, -1), soft), F.cross_entropy(z, soft))
    zb = z[:, :1]
    yb = (torch.rand(7, 1, generator=g, dtype=D) > 0.5).double()
    assert torch.allclose(losses.BCE()(torch.sigmoid(zb), yb), F.binary_cross_entropy_with_logits(zb, yb))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), name=st.sampled_from(["mse", "l1", "huber", "pnorm", "bce", "ce"]),
       n=st.integers(1, 4))
def test_loss_is_scaled_mean_of_potential(seed, name, n):
    """loss(batch) = scale(n) · mean over samples of the output-edge potential."""
    loss = losses.get(name)
    if name == "bce":
        n = 1
    z, y, g = _data(seed, B=5, n=n)
    if name == "ce":
        y = torch.softmax(torch.randn(5, n, generator=g, dtype=D), -1)
        out = torch.softmax(z, -1)
    elif name == "bce":
        y = torch.rand(5, 1, generator=g, dtype=D)
        out = torch.sigmoid(z)
    else:
        out = z
    U = loss.potential()
    pred = z if loss.logits else out
    per_sample = U.pair_value(y, pred) if not U.difference else U.value(pred - y)
    assert torch.allclose(loss(out, y), loss.scale(n) * per_sample.mean())


def test_output_activation_check():
    for name in ["mse", "l1", "huber", "pnorm"]:
        for act in ["identity", "sigmoid", "softmax", "tanh"]:
            losses.get(name).check_output(act)
    losses.get("bce").check_output("sigmoid")
    losses.get("ce").check_output("softmax")
    with pytest.raises(ValueError, match="needs a sigmoid output"):
        losses.get("bce").check_output("identity")
    with pytest.raises(ValueError, match="use 'bce'"):
        losses.get("ce").check_output("sigmoid")


def test_target_checks():
    with pytest.raises(ValueError, match="outside the classes 0..3"):
        losses.get("ce").target(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="probability vectors"):
        losses.get("ce").target(torch.tensor([[0.5, 0.6]]), 2)
    with pytest.raises(ValueError, match="labels 0/1"):
        losses.get("bce").target(torch.tensor([[2.0]]), 1)
    with pytest.raises(ValueError, match=r"expected \(B, 2\)"):
        losses.get("mse").target(torch.zeros(3, 1), 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        losses.get("mse").target(torch.tensor([[float("nan")]]), 1)
    assert losses.get("mse").target(torch.zeros(3), 1).shape == (3, 1)
    assert torch.equal(losses.get("ce").target(torch.tensor([1, 0]), 2), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_get_and_accuracy():
    assert losses.get("huber", tau=0.5).tau == 0.5
    with pytest.raises(KeyError, match="unknown loss"):
        losses.get("hinge")
    with pytest.raises(ValueError, match="p > 1"):
        losses.PNorm(1.0)
    assert losses.accuracy(torch.tensor([[0.7], [0.2]]), torch.tensor([[1.0], [1.0]])) == 0.5
    assert losses.accuracy(torch.eye(3), torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


def test_losses_as_torch_users_expect():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g, dtype=D)
    labels = torch.tensor([0, 3, 1, 2, 2, 0])
    probs = torch.softmax(torch.randn(6, 4, generator=g, dtype=D), -1)
    ce = losses.get("cross_entropy").bind("identity")
    assert torch.allclose(ce(logits, labels), torch.nn.CrossEntropyLoss()(logits, labels))
    assert torch.allclose(ce(logits, probs), torch.nn.CrossEntropyLoss()(logits, probs))
    assert torch.allclose(losses.get("ce").bind("softmax")(torch.softmax(logits, -1), labels),
                          torch.nn.CrossEntropyLoss()(logits, labels))
    nll = losses.get("nll").bind("log_softmax")
    assert torch.allclose(nll(torch.log_softmax(logits, -1), labels),
                          torch.nn.NLLLoss()(torch.log_softmax(logits, -1), labels))
    y = (torch.rand(6, 4, generator=g, dtype=D) > 0.5).double()
    assert torch.allclose(losses.get("bce_with_logits").bind("identity")(logits, y),
                          torch.nn.BCEWithLogitsLoss()(logits, y))
    with pytest.raises(ValueError, match="use 'nll'"):
        losses.get("cross_entropy").bind("log_softmax")


def test_cross_entropy_on_a_logits_model_trains_nudged_like_backprop():
    import cellsheaf_nn as csnn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).double()
    X, Y = torch.randn(8, 3, dtype=D), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    trainer = csnn.SheafTrainer(csnn.compile(model), mode="nudged", loss="cross_entropy", gamma=1e-7)
    local = trainer.local_gradients(X, Y)
    model.zero_grad()
    torch.nn.CrossEntropyLoss()(model(X), Y).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(local[name], p.grad, rtol=1e-4, atol=1e-7), name
