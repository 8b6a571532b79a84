"""Training: the SGD baseline, and sheaf training by local updates (Sec. 5.2).

``train_sgd`` trains a torch model by (full-batch or minibatch) gradient descent
with any torch optimizer; it is the baseline of the paper's Table 1.
:class:`SheafTrainer` trains a compiled :class:`~cellsheaf_nn.NeuralSheaf` by
local updates, each weight map changed only from its own edge's discrepancy
and the stalks at its ends.

Examples
--------
>>> import torch, cellsheaf_nn as csnn
>>> task = csnn.datasets.paraboloid(seed=0)
>>> model = csnn.mlp(task.sizes("1H"), seed=0)
>>> hist = csnn.train_sgd(model, task.X_train, task.Y_train, loss="mse", steps=200, progress=False)
>>> hist.train_loss[-1] < hist.train_loss[0]
True
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from . import losses as _losses

__all__ = ["History", "he_init", "mlp", "output_activation", "train_sgd", "make_optimizer"]

Callback = Callable[[int, "History", Any], Any]

_ACTIVATIONS = {nn.Sigmoid: "sigmoid", nn.Softmax: "softmax", nn.Tanh: "tanh", nn.Identity: "identity"}


@dataclass
class History:
    """What happened during training, one entry per evaluation.

    Attributes
    ----------
    step : list of int
        Number of updates done at each evaluation.
    train_loss, val_loss : list of float
        Batch-mean loss of the network (its forward pass) on the training and validation data.
    train_acc, val_acc : list of float
        Accuracy, for classification losses.
    discord : dict of str to list of float
        Sheaf training only: total energy per edge kind (``"weight"``, ``"activation"``, ``"output"``, ...)
        of the training stalks, summed over the batch.
    wall : list of float
        Seconds since training began (accumulated across resumed runs).
    records : list of dict
        Optional per-step records (``record_every``).
    """

    step: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    train_acc: list = field(default_factory=list)
    val_acc: list = field(default_factory=list)
    discord: dict = field(default_factory=dict)
    wall: list = field(default_factory=list)
    records: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """A plain (JSON-able) dictionary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(**{k: (dict(v) if isinstance(v, dict) else list(v)) for k, v in d.items()})

    def __repr__(self) -> str:
        if not self.step:
            return "History(empty)"
        val = f", val_loss={self.val_loss[-1]:.4g}" if self.val_loss else ""
        return f"History(steps={self.step[-1]}, train_loss={self.train_loss[-1]:.4g}{val})"


def he_init(model: nn.Module, seed: int | None = None) -> nn.Module:
    """He (Kaiming) normal initialisation of every ``nn.Linear`` weight, zero biases; in place.

    ``W ~ N(0, 2 / fan_in)``, drawn from a generator seeded by ``seed``, so one seed gives the
    same initial network whatever else has touched torch's global random state.

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> m = csnn.he_init(torch.nn.Linear(4, 3), seed=0)
    >>> bool(m.bias.detach().any())
    False
    """
    g = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.Linear):
                std = math.sqrt(2.0 / layer.in_features)
                w = torch.randn(layer.weight.shape, generator=g, dtype=torch.float64) * std
                layer.weight.copy_(w)
                if layer.bias is not None:
                    layer.bias.zero_()
    return model


def mlp(sizes: Sequence[int], output: str = "identity", seed: int | None = 0,
        dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """A ReLU MLP ``[n_0, n_1, ..., n_L]`` with output activation ``output``, He-initialised.

    Examples
    --------
    >>> import cellsheaf_nn as csnn
    >>> csnn.mlp([2, 8, 1], output="sigmoid")
    Sequential(
      (0): Linear(in_features=2, out_features=8, bias=True)
      (1): ReLU()
      (2): Linear(in_features=8, out_features=1, bias=True)
      (3): Sigmoid()
    )
    """
    if len(sizes) < 2:
        raise ValueError(f"an MLP needs at least input and output sizes, got {list(sizes)}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    heads = {"identity": None, "sigmoid": nn.Sigmoid(), "softmax": nn.Softmax(dim=-1), "tanh": nn.Tanh()}
    if output not in heads:
        raise ValueError(f"unknown output activation {output!r}; choose from {sorted(heads)}")
    if heads[output] is not None:
        layers.append(heads[output])
    return he_init(nn.Sequential(*layers).to(dtype), seed)


def output_activation(model: nn.Module) -> str:
    """The name of a model's output activation (``"identity"`` unless its last module is a known one).

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> csnn.output_activation(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Softmax(-1)))
    'softmax'
    """
    last = model
    while isinstance(last, nn.Sequential) and len(last):
        last = last[-1]
    return _ACTIVATIONS.get(type(last), "identity")


def _io_sizes(model: nn.Module) -> tuple[int, int]:
    """``(n_in, n_out)`` from the first and last ``nn.Linear`` of a model."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot tell the input and output sizes of {type(model).__name__}: it has no nn.Linear")
    return linears[0].in_features, linears[-1].out_features


def default_lr(loss: _losses.Loss) -> float:
    """The paper's SGD rates: 0.005 for regression losses, 0.01 for classification (BCE/CE)."""
    return 0.01 if loss.outputs else 0.005


def make_optimizer(optimizer, params: Iterable[Tensor], lr: float) -> torch.optim.Optimizer:
    """An optimizer over ``params``: ``None``/``"sgd"`` (plain gradient descent), ``"adam"``, a callable
    ``params -> Optimizer`` (e.g. ``functools.partial(torch.optim.Adam, lr=1e-3)``) or an optimizer instance.

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> p = [torch.zeros(2, requires_grad=True)]
    >>> type(csnn.make_optimizer("adam", p, lr=1e-3)).__name__
    'Adam'
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    params = list(params)
    if optimizer is None or optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    if callable(optimizer):
        opt = optimizer(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer")
        return opt
    raise ValueError(f"unknown optimizer {optimizer!r}; give 'sgd', 'adam', a factory or a torch optimizer")


def check_data(X: Tensor, Y: Tensor, n_in: int, n_out: int, dtype: torch.dtype, loss: _losses.Loss,
               what: str = "training") -> tuple[Tensor, Tensor]:
    """Validate a data set against a network; return ``X`` and the float ``(B, n_out)`` targets.

    Raises a ``ValueError`` naming the problem for a shape or dtype mismatch, NaN/Inf, labels
    outside the classes, or a different number of inputs and targets.
    """
    X, Y = torch.as_tensor(X), torch.as_tensor(Y)
    if X.dim() != 2 or X.shape[1] != n_in:
        raise ValueError(f"{what} inputs have shape {tuple(X.shape)}; the network takes (B, {n_in})")
    if X.dtype != dtype:
        raise TypeError(f"{what} inputs are {X.dtype} but the network's weights are {dtype}; "
                        f"convert with X.to({dtype}) (or the network with .to(dtype))")
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"{what} inputs contain NaN or Inf values")
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"{what} data: {X.shape[0]} inputs but {Y.shape[0]} targets")
    return X, loss.target(Y, n_out, dtype)


def _progress(total: int, enabled: bool, desc: str):
    """A tqdm bar (or ``None`` when disabled)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is an optional extra
        return None
    return tqdm(total=total, desc=desc, leave=False)


def _evaluation_steps(steps: int, eval_every: int | None) -> set[int]:
    every = eval_every or max(1, steps // 100)
    return set(range(0, steps + 1, every)) | {steps}


def _batches(n: int, batch_size: int | None, generator: torch.Generator):
    """Endless index batches: everything, or shuffled minibatches epoch after epoch."""
    if batch_size is None or batch_size >= n:
        while True:
            yield None
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


def _record(hist: History, step: int, wall: float, evaluate: Callable[[Tensor, Tensor], tuple[float, float | None]],
            train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor] | None) -> None:
    loss, acc = evaluate(*train)
    hist.step.append(step)
    hist.train_loss.append(loss)
    hist.wall.append(wall)
    if acc is not None:
        hist.train_acc.append(acc)
    if val is not None:
        vloss, vacc = evaluate(*val)
        hist.val_loss.append(vloss)
        if vacc is not None:
            hist.val_acc.append(vacc)


def _evaluator(forward: Callable[[Tensor], Tensor], loss: _losses.Loss):
    def evaluate(X: Tensor, Y: Tensor) -> tuple[float, float | None]:
        with torch.no_grad():
            out = forward(X)
        acc = _losses.accuracy(out, Y) if loss.outputs else None
        return float(loss(out, Y)), acc
    return evaluate


def train_sgd(model: nn.Module, X: Tensor, Y: Tensor, loss: str | _losses.Loss = "mse", lr: float | None = None,
              steps: int = 1000, optimizer=None, batch_size: int | None = None,
              X_val: Tensor | None = None, Y_val: Tensor | None = None, eval_every: int | None = None,
              seed: int = 0, progress: bool = True, callbacks: Sequence[Callback] = ()) -> History:
    """Train ``model`` in place by gradient descent on the batch-mean ``loss``: the baseline.

    Parameters
    ----------
    model : nn.Module
        Trained in place (initialise it first, e.g. with :func:`he_init`).
    X, Y : Tensor
        Inputs ``(B, n_in)`` in the model's dtype; targets as :mod:`cellsheaf_nn.losses` takes them.
    loss : str or Loss
        Must fit the model's output activation.
    lr : float, optional
        Default: the paper's 0.005 for regression, 0.01 for classification.
    steps : int
        Number of updates.
    optimizer : None, "sgd", "adam", factory or torch optimizer
        Default: full-batch gradient descent (``torch.optim.SGD`` without momentum).
    batch_size : int, optional
        Minibatch size (shuffled each epoch with ``seed``); ``None`` means the full batch.
    X_val, Y_val : Tensor, optional
        Validation data, evaluated with the training data every ``eval_every`` steps (default: 100 times).
    callbacks : sequence of callables ``cb(step, history, model)``
        Called at every evaluation; returning ``True`` stops training.

    Returns
    -------
    History

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> task = csnn.datasets.blobs(seed=0)
    >>> model = csnn.mlp(task.sizes("1H"), output="softmax", seed=0)
    >>> h = csnn.train_sgd(model, task.X_train, task.Y_train, loss="ce", steps=50, progress=False)
    >>> len(h.step), h.train_acc[-1] > 0.5
    (51, True)
    """
    loss = _losses.get(loss)
    loss.check_output(output_activation(model))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    dtype = params[0].dtype
    n_in, n_out = _io_sizes(model)
    X, Yt = check_data(X, Y, n_in, n_out, dtype, loss)
    val = check_data(X_val, Y_val, n_in, n_out, dtype, loss, "validation") if X_val is not None else None
    opt = make_optimizer(optimizer, params, lr if lr is not None else default_lr(loss))
    evaluate = _evaluator(model, loss)
    batches = _batches(len(X), batch_size, torch.Generator().manual_seed(seed))
    hist, when, bar, t0 = History(), _evaluation_steps(steps, eval_every), _progress(steps, progress, "sgd"), \
        time.perf_counter()
    _record(hist, 0, 0.0, evaluate, (X, Yt), val)
    for step in range(1, steps + 1):
        idx = next(batches)
        xb, yb = (X, Yt) if idx is None else (X[idx], Yt[idx])
        opt.zero_grad(set_to_none=True)
        value = loss(model(xb), yb)
        if not bool(torch.isfinite(value)):
            raise FloatingPointError(f"train_sgd diverged at step {step}: the loss is {float(value)}; "
                                     "use a smaller learning rate")
        value.backward()
        opt.step()
        if bar is not None:
            bar.update()
        if step in when:
            _record(hist, step, time.perf_counter() - t0, evaluate, (X, Yt), val)
            if any(cb(step, hist, model) is True for cb in callbacks):
                break
    if bar is not None:
        bar.close()
    return hist
