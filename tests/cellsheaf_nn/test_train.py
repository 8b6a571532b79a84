"""Training: the SGD baseline against a plain torch loop; sheaf training (Sec. 5.2)."""

import copy

import pytest
import torch

from cellsheaf_nn import datasets, losses
from cellsheaf_nn.train import he_init, mlp, output_activation, train_sgd

D = torch.float64


# ---------------------------------------------------------------- SGD baseline

def test_he_init_statistics_and_seed():
    a, b = mlp([50, 400, 1], seed=3), mlp([50, 400, 1], seed=3)
    assert torch.equal(a[0].weight, b[0].weight)
    assert not a[0].bias.detach().any()
    assert abs(float(a[0].weight.detach().var()) - 2 / 50) < 0.004


@pytest.mark.parametrize("name,depth,optimizer,batch_size", [
    ("paraboloid", "1H", None, None), ("blobs", "2H", None, None), ("circular", "1H", "adam", 64),
])
def test_sgd_matches_plain_torch_loop(name, depth, optimizer, batch_size):
    task = datasets.load(name, seed=0)
    model = mlp(task.sizes(depth), output=task.output, seed=1)
    ref = copy.deepcopy(model)
    hist = train_sgd(model, task.X_train, task.Y_train, loss=task.loss, steps=30, optimizer=optimizer,
                     lr=0.01, batch_size=batch_size, seed=5, progress=False, eval_every=10)
    # the plain loop
    opt = torch.optim.Adam(ref.parameters(), lr=0.01) if optimizer else torch.optim.SGD(ref.parameters(), lr=0.01)
    y = task.Y_train
    for step in range(30):
        if batch_size:
            epoch, k = divmod(step, 300 // batch_size)
            perm = torch.randperm(300, generator=torch.Generator().manual_seed(5 * 1_000_003 + epoch))
            idx = perm[k * batch_size:(k + 1) * batch_size]
            xb, yb = task.X_train[idx], y[idx]
        else:
            xb, yb = task.X_train, y
        out = ref(xb)
        if task.loss == "mse":
            value = torch.nn.functional.mse_loss(out, yb)
        elif task.loss == "bce":
            value = torch.nn.functional.binary_cross_entropy(out, yb)
        else:
            value = torch.nn.functional.nll_loss(torch.log(out), yb)
        opt.zero_grad()
        value.backward()
        opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-12)
    assert hist.step == [0, 10, 20, 30]
    with torch.no_grad():
        final = losses.get(task.loss)(ref(task.X_train), y)
    assert hist.train_loss[-1] == pytest.approx(float(final), rel=1e-12)


def test_sgd_default_rates_and_history():
    task = datasets.paraboloid(seed=0)
    model = mlp(task.sizes("1H"), seed=0)
    ref = copy.deepcopy(model)
    hist = train_sgd(model, task.X_train, task.Y_train, steps=1, progress=False,
                     X_val=task.X_test, Y_val=task.Y_test)
    torch.nn.functional.mse_loss(ref(task.X_train), task.Y_train).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.005 * p.grad
    assert all(torch.allclose(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    assert len(hist.val_loss) == 2 and hist.train_acc == []


def test_sgd_reduces_loss_on_every_task():
    for name in ["paraboloid", "saddle", "circular", "blobs"]:
        task = datasets.load(name, seed=0)
        model = mlp(task.sizes("1H"), output=task.output, seed=0)
        hist = train_sgd(model, task.X_train, task.Y_train, loss=task.loss, steps=200, progress=False)
        assert hist.train_loss[-1] < 0.8 * hist.train_loss[0], name


def test_sgd_bad_input():
    task = datasets.blobs(seed=0)
    model = mlp(task.sizes("1H"), output="softmax", seed=0)
    X, Y = task.X_train, task.Y_train
    with pytest.raises(ValueError, match=r"shape \(300, 3\); the network takes \(B, 2\)"):
        train_sgd(model, torch.zeros(300, 3, dtype=D), Y, loss="ce", steps=1, progress=False)
    with pytest.raises(TypeError, match="float32"):
        train_sgd(model, X.float(), Y, loss="ce", steps=1, progress=False)
    with pytest.raises(ValueError, match="outside the classes"):
        train_sgd(model, X, Y + 1, loss="ce", steps=1, progress=False)
    with pytest.raises(ValueError, match="NaN or Inf"):
        train_sgd(model, X.clone().fill_(float("inf")), Y, loss="ce", steps=1, progress=False)
    with pytest.raises(ValueError, match="needs a sigmoid output"):
        train_sgd(model, X, Y, loss="bce", steps=1, progress=False)
    with pytest.raises(ValueError, match="300 inputs but 299 targets"):
        train_sgd(model, X, Y[:-1], loss="ce", steps=1, progress=False)
    reg = datasets.paraboloid(seed=0)
    with pytest.raises(FloatingPointError, match="diverged at step"):
        train_sgd(mlp([2, 30, 1], seed=0), reg.X_train, reg.Y_train * 1e3, lr=10.0, steps=50, progress=False)


def test_output_activation_names():
    assert output_activation(mlp([2, 3, 1])) == "identity"
    assert output_activation(mlp([2, 3, 2], output="softmax")) == "softmax"
