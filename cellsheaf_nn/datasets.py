"""The paper's four benchmark tasks (Sec. 6.2) and scikit-learn's bundled digits.

Every loader returns a [`Task`][cellsheaf_nn.datasets.Task]: train and test tensors, the kind of
problem, and the architectures and loss the paper pairs with it. Data are
drawn from a ``torch.Generator`` seeded by ``seed``, so a seed fixes the data
set exactly; inputs are ``float64`` unless ``dtype`` says otherwise.

Targets follow the loss they are meant for: regression targets are ``(n, 1)``
floats, binary labels are ``(n, 1)`` floats in ``{0, 1}`` (sigmoid output with
binary cross-entropy), multiclass labels are ``(n,)`` integer class indices
(softmax output with cross-entropy).

Examples
--------
>>> import cellsheaf_nn as csnn
>>> task = csnn.datasets.load("paraboloid", seed=0)
>>> task.X_train.shape, task.Y_train.shape, task.X_test.shape
(torch.Size([300, 2]), torch.Size([300, 1]), torch.Size([100, 2]))
>>> task.sizes("1H"), task.output, task.loss
([2, 30, 1], 'identity', 'mse')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

__all__ = ["Task", "TASKS", "load", "paraboloid", "saddle", "circular", "blobs", "digits"]

N_TRAIN, N_TEST, NOISE = 300, 100, 0.02


@dataclass(frozen=True)
class Task:
    """A supervised learning task with a fixed train/test split.

    Attributes
    ----------
    name : str
    X_train, Y_train, X_test, Y_test : Tensor
    kind : str
        ``"regression"``, ``"binary"`` or ``"multiclass"``.
    output : str
        The output activation the paper pairs with it: ``"identity"``, ``"sigmoid"`` or ``"softmax"``.
    loss : str
        The matching loss name in [`cellsheaf_nn.losses`][cellsheaf_nn.losses]: ``"mse"``, ``"bce"`` or ``"ce"``.
    architectures : dict
        Layer widths by depth label, e.g. ``{"1H": [2, 30, 1], "2H": [2, 10, 8, 1]}``.
    n_classes : int or None
    """

    name: str
    X_train: Tensor
    Y_train: Tensor
    X_test: Tensor
    Y_test: Tensor
    kind: str
    output: str
    loss: str
    architectures: dict = field(default_factory=dict)
    n_classes: int | None = None

    def sizes(self, depth: str) -> list[int]:
        """Layer widths of the architecture labelled ``depth`` (``"1H"`` or ``"2H"``)."""
        if depth not in self.architectures:
            raise KeyError(f"task {self.name!r} has no architecture {depth!r}; "
                           f"choose from {sorted(self.architectures)}")
        return list(self.architectures[depth])

    @property
    def classification(self) -> bool:
        return self.kind != "regression"


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _uniform(g: torch.Generator, n: int, low: float, high: float, dtype) -> Tensor:
    return low + (high - low) * torch.rand(n, 2, generator=g, dtype=dtype)


def _regression(name: str, f: Callable[[Tensor], Tensor], low: float, high: float,
                seed: int, n_train: int, n_test: int, noise: float, dtype) -> Task:
    g = _generator(seed)
    X = _uniform(g, n_train + n_test, low, high, dtype)
    Y = (f(X) + noise * torch.randn(n_train + n_test, generator=g, dtype=dtype)).unsqueeze(1)
    return Task(name, X[:n_train], Y[:n_train], X[n_train:], Y[n_train:], "regression", "identity", "mse",
                {"1H": [2, 30, 1], "2H": [2, 10, 8, 1]})


def paraboloid(seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST, noise: float = NOISE,
               dtype: torch.dtype = torch.float64) -> Task:
    """Regression of ``f(x) = x₁² + x₂² − 2/3`` on ``[−2, 2]²`` with Gaussian target noise.

    Examples
    --------
    >>> import cellsheaf_nn as csnn
    >>> csnn.datasets.paraboloid(seed=1, noise=0.0).Y_train.shape
    torch.Size([300, 1])
    """
    return _regression("paraboloid", lambda X: X[:, 0] ** 2 + X[:, 1] ** 2 - 2.0 / 3.0, -2.0, 2.0,
                       seed, n_train, n_test, noise, dtype)


def saddle(seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST, noise: float = NOISE,
           dtype: torch.dtype = torch.float64) -> Task:
    """Regression of ``f(x) = x₁² − x₂² + ½ sin(2x₁)`` on ``[0, 2]²`` with Gaussian target noise.

    Examples
    --------
    >>> import cellsheaf_nn as csnn
    >>> float(csnn.datasets.saddle(seed=0).X_train.min()) >= 0.0
    True
    """
    return _regression("saddle", lambda X: X[:, 0] ** 2 - X[:, 1] ** 2 + 0.5 * torch.sin(2 * X[:, 0]), 0.0, 2.0,
                       seed, n_train, n_test, noise, dtype)


def _balanced_labels(n: int, classes: int) -> Tensor:
    return torch.arange(n) % classes


def circular(seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST, noise: float = 0.1,
             dtype: torch.dtype = torch.float64) -> Task:
    """Binary classification, disk (class 0) against annulus (class 1), balanced.

    Class 0 has radius ``√U``, class 1 radius ``√(1.5² + U (2.5² − 1.5²))`` with ``U ~ U[0, 1]``
    (uniform in area), both plus ``N(0, noise²)``; the angle is uniform.

    Examples
    --------
    >>> import cellsheaf_nn as csnn
    >>> t = csnn.datasets.circular(seed=0)
    >>> t.Y_train.shape, float(t.Y_train.mean())
    (torch.Size([300, 1]), 0.5)
    """
    g = _generator(seed)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = _balanced_labels(n, 2).to(dtype)
        u = torch.rand(n, generator=g, dtype=dtype)
        r = torch.where(y == 0, torch.sqrt(u), torch.sqrt(1.5 ** 2 + u * (2.5 ** 2 - 1.5 ** 2)))
        r = r + noise * torch.randn(n, generator=g, dtype=dtype)
        theta = 2 * math.pi * torch.rand(n, generator=g, dtype=dtype)
        return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], 1), y.unsqueeze(1)

    (Xtr, Ytr), (Xte, Yte) = draw(n_train), draw(n_test)
    return Task("circular", Xtr, Ytr, Xte, Yte, "binary", "sigmoid", "bce",
                {"1H": [2, 25, 1], "2H": [2, 10, 8, 1]}, n_classes=2)


BLOB_CENTRES = ((-1.5, -1.5), (1.8, -1.0), (1.0, 2.0), (-2.0, 1.5))
BLOB_COVARIANCES = (((0.8, 0.3), (0.3, 0.4)), ((0.3, -0.2), (-0.2, 1.0)),
                    ((1.2, 0.5), (0.5, 0.5)), ((0.5, 0.0), (0.0, 0.8)))


def blobs(seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST,
          dtype: torch.dtype = torch.float64) -> Task:
    """Four anisotropic Gaussian classes (balanced), labels ``0..3`` as integer indices.

    Examples
    --------
    >>> import cellsheaf_nn as csnn
    >>> t = csnn.datasets.blobs(seed=0)
    >>> t.Y_train.dtype, t.n_classes, torch.bincount(t.Y_train).tolist()
    (torch.int64, 4, [75, 75, 75, 75])
    """
    g = _generator(seed)
    mu = torch.tensor(BLOB_CENTRES, dtype=dtype)
    chol = torch.linalg.cholesky(torch.tensor(BLOB_COVARIANCES, dtype=dtype))

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = _balanced_labels(n, 4)
        eps = torch.randn(n, 2, generator=g, dtype=dtype)
        return mu[y] + (chol[y] @ eps.unsqueeze(-1)).squeeze(-1), y

    (Xtr, Ytr), (Xte, Yte) = draw(n_train), draw(n_test)
    return Task("blobs", Xtr, Ytr, Xte, Yte, "multiclass", "softmax", "ce",
                {"1H": [2, 25, 4], "2H": [2, 10, 8, 4]}, n_classes=4)


def digits(seed: int = 0, test_fraction: float = 0.2, dtype: torch.dtype = torch.float64) -> Task:
    """scikit-learn's bundled 8×8 handwritten digits (1797 images, no download), scaled to ``[0, 1]``.

    The split is a seeded stratified shuffle; architectures ``"1H"`` = [64, 64, 10] and
    ``"2H"`` = [64, 64, 32, 10] with softmax output. Needs the optional extra
    ``pip install cellsheaf[data]`` (scikit-learn).

    Examples
    --------
    >>> import cellsheaf_nn as csnn
    >>> t = csnn.datasets.digits(seed=0)
    >>> t.X_train.shape[1], t.n_classes
    (64, 10)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set needs scikit-learn: pip install 'cellsheaf[data]' "
                          "(or pip install scikit-learn)") from exc
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    data = load_digits()
    X = torch.as_tensor(data.data, dtype=dtype) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.long)
    g = _generator(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[: round(test_fraction * len(idx))]] = True
    train = ~test
    return Task("digits", X[train], y[train], X[test], y[test], "multiclass", "softmax", "ce",
                {"1H": [64, 64, 10], "2H": [64, 64, 32, 10]}, n_classes=10)


TASKS: dict[str, Callable[..., Task]] = {
    "paraboloid": paraboloid, "saddle": saddle, "circular": circular, "blobs": blobs, "digits": digits,
}


def load(name: str, seed: int = 0, **kwargs) -> Task:
    """Load a task by name: ``"paraboloid"``, ``"saddle"``, ``"circular"``, ``"blobs"`` or ``"digits"``.

    Examples
    --------
    >>> import cellsheaf_nn as csnn
    >>> csnn.datasets.load("blobs", seed=3).kind
    'multiclass'
    """
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name](seed=seed, **kwargs)
