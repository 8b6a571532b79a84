"""The paper's benchmark tasks: sizes, dtypes, seeds, distributions (Sec. 6.2)."""

import math

import pytest
import torch

from cellsheaf_nn import datasets


@pytest.mark.parametrize("name", ["paraboloid", "saddle", "circular", "blobs"])
def test_sizes_dtype_and_seed(name):
    a, b, c = datasets.load(name, seed=0), datasets.load(name, seed=0), datasets.load(name, seed=1)
    assert a.X_train.shape == (300, 2) and a.X_test.shape == (100, 2)
    assert a.X_train.dtype == torch.float64
    assert len(a.Y_train) == 300 and len(a.Y_test) == 100
    assert torch.equal(a.X_train, b.X_train) and torch.equal(a.Y_test, b.Y_test)
    assert not torch.equal(a.X_train, c.X_train)
    assert a.sizes("1H")[0] == 2 and len(a.sizes("2H")) == 4


def test_float32_on_request():
    assert datasets.paraboloid(dtype=torch.float32).X_train.dtype == torch.float32


@pytest.mark.parametrize("name,f,low,high", [
    ("paraboloid", lambda x: x[:, 0] ** 2 + x[:, 1] ** 2 - 2 / 3, -2.0, 2.0),
    ("saddle", lambda x: x[:, 0] ** 2 - x[:, 1] ** 2 + 0.5 * torch.sin(2 * x[:, 0]), 0.0, 2.0),
])
def test_regression_targets_are_function_plus_noise(name, f, low, high):
    t = datasets.load(name, seed=3, n_train=4000)
    assert float(t.X_train.min()) >= low and float(t.X_train.max()) <= high
    resid = t.Y_train[:, 0] - f(t.X_train)
    assert abs(float(resid.mean())) < 4 * 0.02 / math.sqrt(4000)
    assert abs(float(resid.std()) - 0.02) < 0.002
    exact = datasets.load(name, seed=3, noise=0.0)
    assert torch.allclose(exact.Y_train[:, 0], f(exact.X_train))
    assert t.sizes("1H") == [2, 30, 1] and t.sizes("2H") == [2, 10, 8, 1]
    assert (t.output, t.loss, t.kind) == ("identity", "mse", "regression")


def test_circular_radii():
    t = datasets.circular(seed=0, n_train=4000, noise=0.0)
    r = t.X_train.norm(dim=1)
    y = t.Y_train[:, 0]
    assert t.Y_train.shape == (4000, 1) and float(y.mean()) == 0.5
    assert float(r[y == 0].max()) <= 1.0 and float(r[y == 1].min()) >= 1.5 and float(r[y == 1].max()) <= 2.5
    # uniform in area: the median radius of the disk class is sqrt(1/2)
    assert abs(float(r[y == 0].median()) - math.sqrt(0.5)) < 0.03
    assert (t.output, t.loss, t.sizes("1H"), t.sizes("2H")) == ("sigmoid", "bce", [2, 25, 1], [2, 10, 8, 1])


def test_blobs_moments():
    t = datasets.blobs(seed=0, n_train=40000)
    for c in range(4):
        Xc = t.X_train[t.Y_train == c]
        mu = torch.tensor(datasets.BLOB_CENTRES[c], dtype=torch.float64)
        cov = torch.tensor(datasets.BLOB_COVARIANCES[c], dtype=torch.float64)
        assert torch.allclose(Xc.mean(0), mu, atol=0.03)
        assert torch.allclose(torch.cov(Xc.T), cov, atol=0.04)
    assert t.Y_train.dtype == torch.long and t.n_classes == 4
    assert (t.output, t.loss, t.sizes("1H"), t.sizes("2H")) == ("softmax", "ce", [2, 25, 4], [2, 10, 8, 4])


def test_digits():
    t = datasets.digits(seed=0)
    assert t.X_train.shape[1] == 64 and len(t.X_train) + len(t.X_test) == 1797
    assert float(t.X_train.max()) <= 1.0 and float(t.X_train.min()) >= 0.0
    assert set(t.Y_test.tolist()) == set(range(10))
    assert torch.equal(t.X_test, datasets.digits(seed=0).X_test)
    with pytest.raises(ValueError, match="test_fraction"):
        datasets.digits(test_fraction=1.5)


def test_unknown_names():
    with pytest.raises(KeyError, match="unknown task"):
        datasets.load("spiral")
    with pytest.raises(KeyError, match="no architecture"):
        datasets.paraboloid().sizes("3H")
