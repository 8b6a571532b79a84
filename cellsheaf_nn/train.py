"""Training: the SGD baseline, and sheaf training by local updates (Sec. 5.2).

``train_sgd`` trains a torch model by (full-batch or minibatch) gradient descent
with any torch optimizer; it is the baseline of the paper's Table 1.
[`SheafTrainer`][cellsheaf_nn.train.SheafTrainer] trains a compiled [`NeuralSheaf`][cellsheaf_nn.neural.NeuralSheaf] by
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

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

import cellsheaf as cs
from cellsheaf import learning
from cellsheaf.energy import edge_energies
from cellsheaf.gauss_newton import NewtonOptions

from . import distributed
from . import losses as _losses
from .checkpoint import CheckpointError, read_checkpoint, write_checkpoint

__all__ = ["History", "he_init", "mlp", "output_activation", "train_sgd", "make_optimizer", "DivergenceError"]

Callback = Callable[[int, "History", Any], Any]


class DivergenceError(FloatingPointError):
    """Training produced non-finite stalks, weights or energies; the message names the step and a smaller
    ``dt``/``beta``/``lr`` to try."""

_ACTIVATIONS = {nn.Sigmoid: "sigmoid", nn.Softmax: "softmax", nn.LogSoftmax: "log_softmax", nn.Tanh: "tanh",
                nn.Identity: "identity"}


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


def _io_sizes(model: nn.Module, X: Tensor) -> tuple[tuple[int, ...], int]:
    """``(input_shape, n_out)``: the input size of a model whose first layer is an ``nn.Linear`` (else the
    per-sample shape of ``X``, which the model checks itself), and the output size of its last ``nn.Linear``."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot tell the output size of {type(model).__name__}: it has no nn.Linear")
    first = next((m for m in model.modules() if any(True for _ in m.parameters(recurse=False))), None)
    shape = (first.in_features,) if isinstance(first, nn.Linear) else tuple(torch.as_tensor(X).shape[1:])
    return shape, linears[-1].out_features


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
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
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


def check_data(X: Tensor, Y: Tensor, input_shape: int | Sequence[int], n_out: int, dtype: torch.dtype,
               loss: _losses.Loss, what: str = "training") -> tuple[Tensor, Tensor]:
    """Validate a data set against a network; return ``X`` as ``(B, *input_shape)`` and the float
    ``(B, n_out)`` targets.

    ``X`` is ``(B, *input_shape)`` (images ``(B, C, H, W)`` for a CNN) or flattened ``(B, prod(input_shape))``.
    Raises a ``ValueError`` naming the problem for a shape or dtype mismatch, NaN/Inf, labels
    outside the classes, or a different number of inputs and targets.

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> from cellsheaf_nn.train import check_data
    >>> X, Y = check_data(torch.zeros(5, 64), torch.zeros(5, dtype=torch.long), (1, 8, 8), 10,
    ...                   torch.float32, csnn.losses.get("ce"))
    >>> tuple(X.shape), tuple(Y.shape)
    ((5, 1, 8, 8), (5, 10))
    """
    X = cs.cochain.as_real(X, f"{what} inputs", dtype=dtype, finite=False)  # integers: the network's dtype
    Y = cs.cochain.as_real(Y, f"{what} targets", finite=False)  # integers may be class indices
    shape = (int(input_shape),) if isinstance(input_shape, int) else tuple(int(k) for k in input_shape)
    n_in = math.prod(shape)
    if X.dim() < 2 or (tuple(X.shape[1:]) != shape and not (X.dim() == 2 and X.shape[1] == n_in)):
        flat = f" or (B, {n_in})" if len(shape) > 1 else ""
        raise ValueError(f"{what} inputs have shape {tuple(X.shape)}; the network takes "
                         f"(B, {', '.join(map(str, shape))}){flat}")
    if X.dtype != dtype:
        raise TypeError(f"{what} inputs are {X.dtype} but the network's weights are {dtype}; "
                        f"convert with X.to({dtype}) (or the network with .to(dtype))")
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"{what} inputs contain NaN or Inf values")
    if Y.dim() == 0:
        raise ValueError(f"{what} data: {X.shape[0]} inputs but a scalar target; give one target per input")
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"{what} data: {X.shape[0]} inputs but {Y.shape[0]} targets")
    if X.shape[0] == 0:
        raise ValueError(f"{what} data is empty (0 samples); give at least one")
    return X.reshape(len(X), *shape), loss.target(Y, n_out, dtype)


def _progress(total: int, enabled: bool, desc: str):
    """A tqdm bar (or ``None`` when disabled)."""
    if not enabled or not distributed.is_main():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is an optional extra
        return None
    return tqdm(total=total, desc=desc, leave=True)


def _advance(bar, hist: History) -> None:
    """One step on the progress bar, which shows the last evaluated training loss (and accuracy)."""
    if bar is None:
        return
    if hist.train_loss:
        acc = f", acc={hist.train_acc[-1]:.3f}" if hist.train_acc else ""
        bar.set_postfix_str(f"loss={hist.train_loss[-1]:.4g}{acc}", refresh=False)
    bar.update()


def _evaluation_steps(steps: int, eval_every: int | None) -> set[int]:
    every = eval_every or max(1, steps // 100)
    return set(range(0, steps + 1, every)) | {steps}


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


def _evaluator(forward: Callable, loss: _losses.Loss):
    def evaluate(X: Tensor, Y: Tensor) -> tuple[float, float | None]:
        """Loss (and accuracy) on ``(X, Y)``; under torch.distributed, on the union of the ranks' data."""
        with torch.no_grad():
            out = forward(X)
            stats = {"loss": loss(out, Y).reshape(1).to(out.dtype)}
            if loss.outputs:
                stats["acc"] = torch.tensor([_losses.accuracy(out, Y)], dtype=out.dtype, device=out.device)
            stats = distributed.union_mean(stats, len(Y))
        return float(stats["loss"]), (float(stats["acc"]) if "acc" in stats else None)
    return evaluate


def train_sgd(model: nn.Module, X: Tensor, Y: Tensor, loss: str | _losses.Loss = "mse", lr: float | None = None,
              steps: int = 1000, optimizer=None, batch_size: int | None = None,
              X_val: Tensor | None = None, Y_val: Tensor | None = None, eval_every: int | None = None,
              seed: int = 0, progress: bool = True, callbacks: Sequence[Callback] = ()) -> History:
    """Train ``model`` in place by gradient descent on the batch-mean ``loss``: the baseline.

    Parameters
    ----------
    model : nn.Module
        Trained in place (initialise it first, e.g. with [`he_init`][cellsheaf_nn.train.he_init]).
    X, Y : Tensor
        Inputs ``(B, n_in)`` in the model's dtype; targets as [`cellsheaf_nn.losses`][cellsheaf_nn.losses] takes them.
    loss : str or Loss
        Must fit the model's output activation.
    lr : float, optional
        Default: the paper's 0.005 for regression, 0.01 for classification.
    steps : int
        Number of updates.
    optimizer : None, "sgd", "adam", factory or torch optimizer
        Default: full-batch gradient descent (``torch.optim.SGD`` without momentum).
    batch_size : int, optional
        Minibatch size (a fresh permutation each epoch, drawn from ``seed`` and the epoch number);
        ``None`` means the full batch.
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
    loss = _losses.get(loss).bind(output_activation(model))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    dtype = params[0].dtype
    shape, n_out = _io_sizes(model, X)
    X, Yt = check_data(X, Y, shape, n_out, dtype, loss)
    val = check_data(X_val, Y_val, shape, n_out, dtype, loss, "validation") if X_val is not None else None
    opt = make_optimizer(optimizer, params, lr if lr is not None else default_lr(loss))
    evaluate = _evaluator(model, loss)
    hist, when, bar, t0 = History(), _evaluation_steps(steps, eval_every), _progress(steps, progress, "sgd"), \
        time.perf_counter()
    _record(hist, 0, 0.0, evaluate, (X, Yt), val)
    for step in range(1, steps + 1):
        idx = _batch_index(step - 1, len(X), batch_size, seed)
        xb, yb = (X, Yt) if idx is None else (X[idx], Yt[idx])
        opt.zero_grad(set_to_none=True)
        value = loss(model(xb), yb)
        if not bool(torch.isfinite(value)):
            raise DivergenceError(f"train_sgd diverged at step {step}: the loss is {float(value.detach())}; "
                                     "use a smaller learning rate")
        value.backward()
        opt.step()
        if step in when:
            _record(hist, step, time.perf_counter() - t0, evaluate, (X, Yt), val)
        _advance(bar, hist)
        if step in when and any(cb(step, hist, model) is True for cb in callbacks):
            break
    if bar is not None:
        bar.close()
    return hist


# ====================================================================== sheaf training

_MODES = ("joint", "equilibrium", "nudged")
_INITS = ("random", "forward_pass")
_OUTPUT_MAPS = {"Sigmoid": "sigmoid", "Softmax": "softmax", "Tanh": "tanh"}


def _batch_index(step: int, n: int, batch_size: int | None, seed: int) -> Tensor | None:
    """Indices of the minibatch of update ``step`` (``None``: the full batch).

    Stateless: epoch ``e`` is a permutation drawn from ``seed`` and ``e``, so a resumed
    run draws the same batches as an uninterrupted one.
    """
    if batch_size is None or batch_size >= n:
        return None
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[k * batch_size:(k + 1) * batch_size]


def _output_activation_of(ns) -> str:
    """Output activation of a compiled network, read off its output edge (``"identity"`` without one)."""
    out = ns.edges_of("out")
    if not out:
        return "identity"
    F = ns.sheaf.edge(out[-1]).Fu
    if isinstance(F, cs.maps.SoftmaxAlong):
        return "log_softmax" if F.log else "softmax"
    return _OUTPUT_MAPS.get(type(F).__name__, type(F).__name__.lower())


def _parameter_names(info) -> tuple[str, str | None]:
    """``model.named_parameters()`` names of the ``nn.Linear`` behind a weight edge."""
    prefix = f"{info.module}." if info.module else ""
    return prefix + "weight", (prefix + "bias") if info.ones is not None else None


Inputs = tuple[Tensor, ...]  # the inputs of a batch, one tensor per input of the network


def _take(X: Inputs, idx: Tensor | None) -> Inputs:
    """The items ``idx`` of every input (all of them for ``None``)."""
    return X if idx is None else tuple(x[idx] for x in X)


def check_inputs(ns, X, Y, loss: _losses.Loss, what: str = "training") -> tuple[Inputs, Tensor]:
    """`check_data` for every input of a network: ``X`` one tensor (a single-input network) or a tuple with one
    tensor per input, as ``ns.infer(*X)`` takes them; returns the inputs as a tuple and the targets.

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> from cellsheaf_nn.train import check_inputs
    >>> ns = csnn.compile(torch.nn.Linear(3, 2).double())
    >>> X, Y = check_inputs(ns, torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 2), csnn.losses.get("mse"))
    >>> len(X), tuple(X[0].shape)
    (1, (4, 3))
    """
    n = len(ns.inputs)
    several = isinstance(X, (tuple, list)) and len(X) > 0 and all(isinstance(x, Tensor) for x in X)
    xs = tuple(X) if several and (n > 1 or len(X) == 1) else (X,)
    if len(xs) != n:
        raise ValueError(f"{what} data: the network takes {n} inputs ({', '.join(map(repr, ns.inputs))}), got "
                         f"{len(xs)}; give a tuple of tensors, one per input, as ns.infer(*inputs) takes them")
    out = []
    for name, shape, x in zip(ns.inputs, ns.input_shapes, xs):
        x, Yt = check_data(x, Y, shape, ns.n_out, ns.dtype, loss, what if n == 1 else f"{what} ({name!r})")
        out.append(x)
    return tuple(out), Yt


class SheafTrainer:
    """Train a compiled network by local updates on its sheaf (Sec. 5.2 of the paper, and faster variants).

    Every learned tensor changes only from the discrepancy on the edges whose maps hold it and the
    stalks at their ends: one local rule for all ([`cellsheaf.learning.local_gradients`][cellsheaf.learning.local_gradients]; Eq. 24 for the
    extended map ``W̄ = (W | diag(b))`` of a ``Linear``, whose bias diagonal keeps its pattern, Eq. 25).

    Parameters
    ----------
    ns : NeuralSheaf
        Trained in place: its weight maps change (read them back with ``ns.to_module()``).
    mode : {"nudged", "equilibrium", "joint"}
        Default ``"nudged"`` (the fastest local mode, whose updates tend to the loss gradient).
        ``"joint"``: the paper's joint dynamics Eq. (26) (Eq. (42) with ``lam``/``mu``), forward Euler with
        step ``dt``: stalks and weights move together, the output clamped to the targets.
        ``"equilibrium"``: before each weight update the stalks relax to equilibrium with the current
        weights (output clamped; steps to the minimum of the current activation region from the batch's
        last equilibrium, [`cellsheaf.nudge.clamped_equilibrium`][cellsheaf.nudge.clamped_equilibrium], then
        low-rank and general Newton, [`cellsheaf.minimize`][cellsheaf.minimize.minimize], for items they leave
        unconverged, and general Newton for networks with pins): the ``α ≫ β`` limit of
        Sec. 5.3. ``"nudged"``: the output is pulled toward the target by a loss edge of small weight
        ``gamma``; the local update divided by ``gamma`` tends to the gradient of the loss as
        ``gamma → 0`` (the equilibrium-propagation argument: at the free equilibrium every edge has zero
        discord).
    loss : str or Loss
        On the output edge ([`cellsheaf_nn.losses`][cellsheaf_nn.losses]); must fit the output activation.
    optimizer : None, "sgd", "adam", factory or torch optimizer
        Local modes only: consumes the local directions (scaled as gradients of the batch-mean loss).
        Default plain gradient descent with ``lr``.
    lr : float, optional
        Local modes: learning rate (default 0.005 regression, 0.01 classification).
    alpha, beta, dt : float
        Joint mode: stalk rate α, weight rate β (default ``1/M`` for a batch of ``M``, Sec. 5.3), Euler step.
    gamma : float, optional
        Nudged mode: weight of the loss edge (default ``1e-6`` in float64, ``1e-3`` in float32): the
        local update has a relative bias of order ``gamma``.
    init : {"random", "forward_pass"}
        Joint and equilibrium modes: initial stalks, ``N(0, 1/d_v)`` per coordinate of a vertex of dim
        ``d_v`` (unit-norm stalks on average, Sec. 5.3), or the forward pass.
    warm_start : bool
        Whether a later [`fit`][cellsheaf_nn.train.SheafTrainer.fit] continues from the stalks of the previous one (default) or
        initialises them again.
    lam, mu : float
        Joint mode regularisation, Eq. (28) (``anchor="zero"``) or Eq. (41)/(42) (``anchor="initial"``:
        the stalks and weights at the start).
    batch_size : int, optional
        Minibatches (a permutation per epoch drawn from ``seed``); ``None``: the full batch.
    tol, max_iter : optional
        Gradient-norm tolerance and Newton iteration cap (default 20) of the relaxations (default tolerance
        ``1e-4 · gamma`` in the nudged mode, where the nudge is of order ``gamma``, and ``1e-6`` in the
        equilibrium mode). A relaxation that stops on a ReLU switching surface (Note 5.1) is used as it is.
    seed : int
        Seeds the random initial stalks and the minibatch order.
    free_stalks : bool
        Nudged mode only (ignored by the other modes). Default ``True``: the local rule multiplies each
        edge's forces at the nudged state by the stalks of the free state (the forward pass)
        ([`cellsheaf.learning.edge_gradients`][cellsheaf.learning.edge_gradients] with ``at=``). The
        paper's nudged update evaluates the rule at the nudged state (``free_stalks=False``); the two
        differ by O(γ), and the default is the paper's rule in the limit γ → 0. It is the default because
        it is exactly zero where the forward pass is (a dead ReLU or max-pool input): an optimizer that
        normalises the gradient (Adam) would otherwise turn the O(γ) bias there into full steps (on the
        digits CNN this costs about half a point of test accuracy against backprop).

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> task = csnn.datasets.paraboloid(seed=0)
    >>> ns = csnn.compile(csnn.mlp(task.sizes("1H"), seed=0))
    >>> trainer = csnn.SheafTrainer(ns, mode="joint", loss="mse", dt=0.005)
    >>> hist = trainer.fit(task.X_train, task.Y_train, steps=200, progress=False)
    >>> hist.train_loss[-1] < hist.train_loss[0]
    True
    """

    def __init__(self, ns, mode: str = "nudged", loss: str | _losses.Loss = "mse", optimizer=None,
                 lr: float | None = None, *, alpha: float = 1.0, beta: float | None = None, dt: float = 0.005,
                 gamma: float | None = None, init: str = "random", warm_start: bool = True, lam: float = 0.0,
                 mu: float = 0.0, anchor: str = "zero", batch_size: int | None = None, tol: float | None = None,
                 max_iter: int | None = None, seed: int = 0, free_stalks: bool = True):
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        if anchor not in ("zero", "initial"):
            raise ValueError(f"anchor must be 'zero' (Eq. 28) or 'initial' (Eq. 41), got {anchor!r}")
        gamma = gamma if gamma is not None else (1e-6 if ns.dtype == torch.float64 else 1e-3)
        rates = (("alpha", alpha), ("dt", dt), ("gamma", gamma)) + ((("lr", lr),) if lr is not None else ())
        for name, value in rates:
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be positive and finite, got {value!r}")
        if beta is not None and not (beta > 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be positive and finite, got {beta}")
        if lam < 0 or mu < 0:
            raise ValueError(f"regularisation strengths must be non-negative, got lam={lam}, mu={mu}")
        if mode == "joint" and optimizer is not None:
            raise ValueError("mode='joint' is the paper's Euler dynamics with rate beta; optimizers drive the "
                             "local modes 'equilibrium' and 'nudged'")
        self.ns, self.mode = ns, mode
        self.loss = _losses.get(loss).bind(_output_activation_of(ns))
        self.alpha, self.beta, self.dt, self.gamma = float(alpha), beta, float(dt), float(gamma)
        self.init, self.warm_start, self.lam, self.mu, self.anchor = init, warm_start, float(lam), float(mu), anchor
        self.batch_size, self.tol, self.max_iter, self.seed = batch_size, tol, max_iter, int(seed)
        self.free_stalks = bool(free_stalks)
        self.lr = lr if lr is not None else default_lr(self.loss)
        self.sheaf, self.target = self._training_sheaf()
        self.weights = {edge: F for (edge, side), F in learning.trainable_maps(self.sheaf).items()
                        if side == "u" and edge in ns.edge_info}
        self.parameters = ns.parameters  # the learned tensors the maps hold, trained by the generic local rule
        if not self.weights and not self.parameters:
            raise ValueError("the network has no trainable weight maps or parameters (compile it from a model with "
                             "learned parameters that require grad)")
        self.optimizer = make_optimizer(optimizer, [F.weight for F in self.weights.values()]
                                        + list(self.parameters.values()), self.lr) \
            if mode != "joint" else None
        self.history = History()
        self.step = 0
        self.stalks: Tensor | None = None
        self._free: Tensor | None = None  # free coordinates of the training sheaf (the same for every batch)
        self._anchors: tuple[Tensor, dict[str, Tensor]] | None = None
        self._nudge: tuple | None = None  # (plan of the network part, input columns, target columns)
        self._buffers: tuple | None = None  # (key, [cochain buffers]) of `_work`

    # ------------------------------------------------------------------ the training sheaf
    def _training_sheaf(self):
        """The network's sheaf with the loss on the output edge, and the vertex that holds the targets.

        Clamped modes fix the output vertex to the targets and give the edges into it the loss
        potential (reading the logits for BCE/CE, Eq. 27). The nudged mode adds a target vertex
        and a loss edge of weight ``gamma`` from the prediction.
        """
        ns, loss = self.ns, self.loss
        S = ns.pinned_sheaf.copy()
        out = ns.edges_of("out")
        pred_edge = S.edge(out[-1]) if out else None
        if self.mode == "nudged":
            src = pred_edge.u if pred_edge is not None else ns.output
            Fu = cs.maps.Identity(S.dim(src)) if pred_edge is None or loss.logits else pred_edge.Fu
            S.add_vertex("target", ns.n_out)
            S.add_edge(src, "target", Fu, cs.maps.Identity(ns.n_out), name="loss:target", weight=self.gamma,
                       potential=loss.potential())
            return S, "target"
        if loss.logits and pred_edge is None and loss.outputs and "identity" in loss.outputs:
            raise ValueError(f"loss {loss.name!r} on a logits model trains in mode='nudged' (the clamped modes "
                             "need an output activation to read the logits from); add a Softmax/Sigmoid layer "
                             "with loss 'cross_entropy'/'bce' for the clamped modes")
        for e in [e for e in S.edge_items() if e.v == ns.output]:
            if loss.potential().quadratic and not loss.logits:
                continue
            Fu = cs.maps.Identity(S.dim(e.u)) if loss.logits else e.Fu
            S.remove_edge(e.name)
            S.add_edge(e.u, e.v, Fu, e.Fv, name=e.name, weight=e.weight, potential=loss.potential())
        return S, ns.output

    def _boundary(self, X: Inputs, Y: Tensor) -> cs.Boundary:
        b = self.ns.boundary(*X)
        return b.fix(self.target, Y, coords=list(range(self.ns.n_out)))

    def _initial_stalks(self, X: Inputs, Y: Tensor) -> Tensor:
        S = self.sheaf
        if self.init == "random":
            g = torch.Generator().manual_seed(self.seed)
            scale = torch.cat([torch.full((S.dim(v),), 1.0 / math.sqrt(max(S.dim(v), 1)), dtype=self.ns.dtype)
                               for v in S.vertices])
            x0 = (torch.randn(len(Y), S.C0, generator=g, dtype=self.ns.dtype) * scale).to(self.ns.device)
        else:
            fwd = self._forward_state(X)
            x0 = torch.zeros(len(Y), S.C0, dtype=self.ns.dtype, device=self.ns.device)
            x0[:, : fwd.shape[1]] = fwd
        return self._boundary(X, Y).resolve(S, dtype=self.ns.dtype).fill(x0)

    def _forward_state(self, X: Inputs) -> Tensor:
        """The forward pass (with the network's pins, if any) as a cochain of ``ns.pinned_sheaf``, whose
        vertices come first in the training sheaf (propagation, Prop. 3.4)."""
        self.ns.sheaf.invalidate()
        return self.ns.infer(*X, return_state=True)[1].cochain.flat

    # ------------------------------------------------------------------ fitting
    def fit(self, X: Tensor | Inputs, Y: Tensor, X_val: Tensor | Inputs | None = None, Y_val: Tensor | None = None,
            steps: int = 1000, progress: bool = True, callbacks: Sequence[Callback] = (),
            eval_every: int | None = None, record_every: int | None = None) -> History:
        """Run ``steps`` updates on ``(X, Y)``; returns `history` (accumulated across calls).

        Parameters
        ----------
        X, Y : Tensor
            Inputs ``(N, *input_shape)`` (or flattened ``(N, n_in)``) in the network's dtype, targets as the
            loss takes them. A network with several inputs takes a tuple ``X = (X_1, ..., X_k)``, one tensor
            per input, as ``ns.infer(*X)`` does.
        X_val, Y_val : Tensor, optional
            Validation data, evaluated every ``eval_every`` updates (default: 100 evaluations per call).
        steps : int
            Number of updates (Euler steps in joint mode).
        progress : bool
            Show a tqdm progress bar.
        callbacks : callables ``cb(step, history, trainer)``
            Called at every evaluation; returning ``True`` stops training.
        record_every : int, optional
            Also append ``{"step", "energy", "weight_norm"}`` to ``history.records`` every so many updates.

        Raises
        ------
        DivergenceError
            (a ``FloatingPointError``) when stalks, weights or energies become non-finite: the step, and a
            smaller ``dt``/``beta``/``lr`` to try.
        """
        ns = self.ns
        X, Yt = check_inputs(ns, X, Y, self.loss)
        val = check_inputs(ns, X_val, Y_val, self.loss, "validation") if X_val is not None else None
        if self.mode != "nudged" and (self.stalks is None or not self.warm_start or len(self.stalks) != len(Yt)):
            self.stalks = self._initial_stalks(X, Yt)
        self._free = self._boundary(_take(X, slice(0, 1)), Yt[:1]).resolve(self.sheaf).free
        if self._anchors is None and self.mode == "joint":
            ref = self.stalks.clone() if self.anchor == "initial" else torch.zeros_like(self.stalks)
            self._anchors = (ref, {k: (W.detach().clone() if self.anchor == "initial" else torch.zeros_like(W))
                                   for k, W in self._tensors().items()})
        evaluate = _evaluator(lambda x: ns.infer(*x), self.loss)
        when = {self.step + s for s in _evaluation_steps(steps, eval_every)}
        bar, t0 = _progress(steps, progress, f"sheaf {self.mode}"), time.perf_counter()
        wall0 = self.history.wall[-1] if self.history.wall else 0.0
        if not self.history.step or self.history.step[-1] != self.step:
            self._evaluate(evaluate, (X, Yt), val, wall0)
        for _ in range(steps):
            idx = _batch_index(self.step, len(Yt), self.batch_size, self.seed)
            xb, yb = (X, Yt) if idx is None else (_take(X, idx), Yt[idx])
            step = self.step + 1
            last_finite = self._snapshot(idx)
            try:
                self._update(xb, yb, idx)
                self.step += 1
                if record_every and self.step % record_every == 0:
                    self._record_step()
                if self.step in when:
                    self._evaluate(evaluate, (X, Yt), val, wall0 + time.perf_counter() - t0)
            except DivergenceError:
                self._restore(last_finite)
                raise
            except (ValueError, FloatingPointError) as err:  # cellsheaf refuses non-finite values: a divergence
                self._restore(last_finite)
                self._diverged(str(err), step=step)
            _advance(bar, self.history)
            if self.step in when and any(cb(self.step, self.history, self) is True for cb in callbacks):
                break
        if bar is not None:
            bar.close()
        return self.history

    def _evaluate(self, evaluate, train, val, wall: float) -> None:
        self.ns.sheaf.invalidate()
        _record(self.history, self.step, wall, evaluate, train, val)
        if self.stalks is not None:
            for kind, value in self.discord().items():
                self.history.discord.setdefault(kind, []).append(value)

    def discord(self) -> dict[str, float]:
        """Energy of the current training stalks per edge kind (``"weight"``, ``"act"``, ``"loss"``, ...),
        summed over the batch."""
        if self.stalks is None:
            raise RuntimeError("no training stalks yet: call fit() first")
        out: dict[str, float] = {}
        for name, value in zip(self.sheaf.edges, edge_energies(self.sheaf, self.stalks).sum(0).tolist()):
            kind = str(name).split(":", 1)[0]
            out[kind] = out.get(kind, 0.0) + value
        return out

    # ------------------------------------------------------------------ one update
    @torch.no_grad()  # the maps hold the module's parameters: no autograd graph of the sweeps and local rules
    def _update(self, X: Inputs, Y: Tensor, idx: Tensor | None) -> None:
        if self.mode == "joint":
            x = self.stalks if idx is None else self.stalks[idx]
            x = self._joint_step(x, X, Y, idx)
        else:
            start = None if self.mode == "nudged" else (self.stalks if idx is None else self.stalks[idx])
            x, grads = self._local_directions(X, Y, start)
            grads = distributed.union_mean(grads, len(Y))
            for name, W in self._tensors().items():
                W.grad = grads[name]
            self.optimizer.step()
            self._maps_changed()
            # one screen of the stalks and the stepped tensors (one host read; joint_step screens its own): a
            # non-finite state gives non-finite gradients, and `fit` restores the weights and the optimizer
            self._check_finite(x)
        if self.mode == "nudged" or idx is None:
            self.stalks = x
        else:
            self.stalks[idx] = x

    def _joint_step(self, x: Tensor, X: Inputs, Y: Tensor, idx: Tensor | None) -> Tensor:
        """One forward-Euler step of the joint dynamics, Eq. (26) / (42) (`cellsheaf.learning`)."""
        ref, map_ref = self._anchors
        x_new = learning.joint_step(
            self.sheaf, x, self._free, alpha=self.alpha,
            beta=self.beta if self.beta is not None else 1.0 / distributed.union_count(len(Y)), dt=self.dt,
            lam=self.lam, mu=self.mu, x_anchor=ref if idx is None else ref[idx],
            map_anchors={(k, "u"): map_ref[k] for k in self.weights}, reduce=distributed.all_sum,
            params=self.parameters, param_anchors={k: map_ref[k] for k in self.parameters},
            out=self._next_stalks(len(x), x) if idx is None else None)
        self.ns.sheaf.invalidate()
        return x_new

    def _local_directions(self, X: Inputs, Y: Tensor, start: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """Relax the stalks with the current weights and read off every weight edge's local update.

        Returns the relaxed stalks and ``{edge: direction}``, each direction scaled as the gradient
        of the batch-mean loss (divided by ``gamma`` in the nudged mode).
        """
        if self.mode == "nudged":
            fast = self._nudged_state(X, Y)
            if fast is not None:
                return fast
        elif start is not None:
            fast = self._clamped_state(X, Y, start)
            if fast is not None:
                return fast
        b = self._boundary(X, Y)
        if self.mode == "nudged":
            fwd = self._forward_state(X)
            start = torch.zeros(len(Y), self.sheaf.C0, dtype=self.ns.dtype, device=self.ns.device)
            start[:, : fwd.shape[1]] = fwd
            tol = self.tol if self.tol is not None else 1e-4 * self.gamma
        else:
            tol = self.tol if self.tol is not None else 1e-6
        # equilibrium mode warm-starts from the last equilibrium: keep its coordinates on ReLU kinks held there
        res = cs.minimize(self.sheaf, b, method="newton", x0=start, tol=tol,
                          max_iter=self.max_iter if self.max_iter is not None else 20,
                          options=NewtonOptions(hold_kinks_at_start=self.mode == "equilibrium"))
        x = res.x.flat
        scale = self.loss.scale(self.ns.n_out) / len(Y) / (self.gamma if self.mode == "nudged" else 1.0)
        return x, self._map_gradients(x, scale, at=start if self.mode == "nudged" and self.free_stalks else None)

    def _nudge_plan(self):
        """The compiled forward pass of the training sheaf's network part (input, ones and targets fixed):
        in the nudged mode its determined part (every edge but the loss edge), in the equilibrium mode
        every edge not incident to the clamped output. ``None`` when the network has pins or learned
        tensors in its forward pass (then Newton solves for the state)."""
        ns = self.ns
        extra = 1 if self.mode == "nudged" else 0
        if ns.pins or len(self.sheaf.edges) != len(ns.sheaf.edges) + extra:
            return None
        if self._nudge is None:  # the pattern outlives weight updates: built once
            inputs, ones = ns._fixed_pattern()
            target = self.sheaf.vertex_slice(self.target)
            fixed = torch.cat([inputs, ones, torch.arange(target.start, target.start + ns.n_out)]).sort().values
            edges = None if self.mode == "nudged" else \
                [e.name for e in self.sheaf.edge_items() if self.target not in (e.u, e.v)]
            try:
                plan = cs.propagation.plan(self.sheaf, fixed, ones, torch.ones(len(ones), dtype=torch.float64),
                                           determined=True, edges=edges)
            except cs.NotDeterminedError:
                plan = False
            self._nudge = (plan, [ns._neural_slice(v) for v in ns.inputs], slice(target.start, target.start + ns.n_out))
        return self._nudge if self._nudge[0] else None

    def _clamped_state(self, X: Inputs, Y: Tensor, start: Tensor) -> tuple[Tensor, dict[str, Tensor]] | None:
        """The clamped equilibrium by region steps (`cellsheaf.nudge.clamped_equilibrium`) from ``start`` (the
        last equilibrium of this batch: one to four steps), and the local updates there, as `_local_directions`
        returns them; low-rank Newton (`cellsheaf.nudge.low_rank_newton`), then general Newton, from there for
        items they leave unconverged. ``None`` when the fast path does not apply."""
        nudge = self._nudge_plan()
        if nudge is None:
            return None
        plan, inputs, target = nudge
        x = start.clone()
        _write_inputs(x, inputs, X)
        x[:, target] = Y
        plan._write_constants(x)
        tol = self.tol if self.tol is not None else 1e-6
        max_iter = self.max_iter if self.max_iter is not None else 20
        out, report = cs.nudge.clamped_equilibrium(self.sheaf, plan, x, tol=tol, max_iter=max_iter)
        idx = torch.nonzero(~report["converged"]).flatten()
        if idx.numel():  # a zigzag across a switching surface: low-rank Newton holds kinks, for those items
            out[idx], report, _ = cs.nudge.low_rank_newton(self.sheaf, plan, out[idx], tol=tol, max_iter=max_iter)
            idx = idx[~report["converged"]]
        if idx.numel():  # kinks crossed back and forth: Newton's active set, for those items
            out[idx] = cs.minimize(self.sheaf, self._boundary(_take(X, idx), Y[idx]), method="newton", x0=out[idx],
                                   tol=tol, max_iter=max_iter, options=NewtonOptions(hold_kinks_at_start=True)).x.flat
        return out, self._map_gradients(out, self.loss.scale(self.ns.n_out) / len(Y))

    def _nudged_state(self, X: Inputs, Y: Tensor) -> tuple[Tensor, dict[str, Tensor]] | None:
        """The nudged equilibrium by sweeps (`cellsheaf.nudge`) and the local updates there, as
        `_local_directions` returns them: the forward pass, then the linear response to the loss edge
        (and its correction while the gradient changes); Newton from there for a result that is not
        stationary (verified). ``None`` when the fast path does not apply."""
        nudge = self._nudge_plan()
        if nudge is None:
            return None
        plan, inputs, target = nudge
        x, result = self._work(len(Y), Y)[0], self._next_stalks(len(Y), Y)
        _write_inputs(x, inputs, X)
        x[:, target] = Y
        plan.run(x)
        tol = self.tol if self.tol is not None else 1e-4 * self.gamma
        max_iter = self.max_iter if self.max_iter is not None else 20
        # the measure re-evaluates only the edges with nonlinear maps (the linear ones hold the sweeps' solution
        # exactly), and the local rule of every tensor the maps hold reads its forces off the transposed sweep
        # (`cellsheaf.nudge`), on the free state's stalks with ``free_stalks``
        tensors = self._tensors()
        at = x if self.free_stalks else None
        out, report = cs.nudge.nudged_equilibrium(self.sheaf, plan, x, tol=tol, max_iter=max_iter, at=at,
                                                  params=list(tensors.values()), out=result)
        scale = self.loss.scale(self.ns.n_out) / len(Y) / self.gamma
        if bool((report["grad_norm"] > tol).any()):  # e.g. a coordinate crossed a ReLU kink
            out = cs.minimize(self.sheaf, self._boundary(X, Y), method="newton", x0=out, tol=tol,
                              max_iter=max_iter).x.flat
            return out, self._map_gradients(out, scale, at=at)
        return out, {name: scale * G for name, G in zip(tensors, report["param_grads"])}

    def _work(self, batch: int, like: Tensor) -> list[Tensor]:
        """Three cochain buffers ``(batch, C0)`` kept from update to update (a fresh cochain-sized tensor costs its
        page faults on every update): the nudged mode's free state, and two that the new `stalks` alternate
        between (`_next_stalks`)."""
        key = (batch, like.dtype, like.device)
        if self._buffers is None or self._buffers[0] != key:
            self._buffers = (key, [torch.empty(batch, self.sheaf.C0, dtype=like.dtype, device=like.device)
                                   for _ in range(3)])
        return self._buffers[1]

    def _next_stalks(self, batch: int, like: Tensor) -> Tensor:
        """The state buffer that does not hold `stalks`: the last update's stalks stay intact while the next
        update writes its own (a failed update restores them)."""
        a, b = self._work(batch, like)[1:]
        return a if a is not self.stalks else b

    def _map_gradients(self, x: Tensor, scale: float, at: Tensor | None = None) -> dict[str, Tensor]:
        """``scale ·`` the local rule at stalks ``x`` of every tensor the maps hold (`_tensors`: module
        parameters, and the ``W̄`` of edges built trainable by hand), one rule for all
        (`cellsheaf.learning.local_gradients`; the maps differentiated at ``at``, default ``x``)."""
        local = learning.local_gradients(self.sheaf, x, self._tensors(), at=at)
        return {name: scale * G for name, G in local.items()}

    def _tensors(self) -> dict[str, Tensor]:
        """Every tensor training changes: ``{name: tensor}`` of the parameters the maps hold (`ns.parameters`),
        and ``{edge: W̄}`` of the maps an extension built trainable (`Builder.affine` with ``trainable=True``)."""
        return {**{k: F.weight for k, F in self.weights.items()}, **self.parameters}

    def _maps_changed(self) -> None:
        """Weights changed in place: drop the operators cached from the old values."""
        self.sheaf.invalidate()
        self.ns.sheaf.invalidate()

    def _check_finite(self, x: Tensor, state: bool = True, tensors: bool = True) -> None:
        """Raise `DivergenceError` naming the first non-finite tensor (weights first, then the stalks ``x``);
        the screen reads only the stalks (``state``) and/or the learned tensors (``tensors``)."""
        screen = ([x.sum()] if state else []) + ([W.sum() for W in self._tensors().values()] if tensors else [])
        if not screen or math.isfinite(float(torch.stack(screen).sum())):  # one sync; the search names the culprit
            return
        bad = [name for name, W in self._tensors().items() if not bool(torch.isfinite(W).all())]
        if bad:
            where = f"weights on edge {bad[0]!r}" if bad[0] in self.weights else f"parameter {bad[0]!r}"
        elif not bool(torch.isfinite(x).all()):
            col = int(torch.nonzero(~torch.isfinite(x).all(0))[0])
            vertex = next(v for v in self.sheaf.vertices if col < self.sheaf.vertex_slice(v).stop)
            where = f"stalks at vertex {vertex!r}"
        else:
            return
        self._diverged(f"non-finite {where}")

    def _snapshot(self, idx: Tensor | None) -> tuple:
        """What an update changes, copied: weights, optimizer state, the batch's stalks, step, history sizes."""
        weights = [W.detach().clone() for W in self._tensors().values()]
        opt = None if self.optimizer is None else {
            p: {k: v.clone() if isinstance(v, Tensor) else copy.copy(v) for k, v in st.items()}
            for p, st in self.optimizer.state.items()}
        batch = None if self.stalks is None or idx is None or self.mode == "nudged" \
            else (idx, self.stalks[idx].clone())
        sizes = {k: len(v) for k, v in vars(self.history).items() if isinstance(v, list)}
        return weights, opt, self.stalks, batch, self.step, sizes

    def _restore(self, snapshot: tuple) -> None:
        """Undo a failed update: the network and the trainer are back at their last finite state."""
        weights, opt, stalks, batch, step, sizes = snapshot
        for T, W in zip(self._tensors().values(), weights):
            T.data.copy_(W)
        if opt is not None:
            self.optimizer.state.clear()
            self.optimizer.state.update(opt)
        self.stalks, self.step = stalks, step
        if batch is not None:
            self.stalks[batch[0]] = batch[1]
        for k, n in sizes.items():
            del getattr(self.history, k)[n:]
        for values in self.history.discord.values():
            del values[sizes["step"]:]
        self._maps_changed()

    def _diverged(self, what: str, step: int | None = None) -> None:
        """Stop training: non-finite values at update ``step`` (default: the one under way)."""
        beta = "auto 1/M" if self.beta is None else format(self.beta, "g")
        hint = f"a smaller dt (now {self.dt:g}) or beta (now {beta})" if self.mode == "joint" \
            else f"a smaller lr (now {self.lr:g})"
        raise DivergenceError(f"sheaf training (mode={self.mode!r}) diverged at step "
                          f"{self.step + 1 if step is None else step}: {what}; training stopped. Try {hint}")

    def _record_step(self) -> None:
        energy = float(edge_energies(self.sheaf, self.stalks).sum()) if self.stalks is not None else float("nan")
        norm = math.sqrt(sum(float((W ** 2).sum()) for W in self._tensors().values()))
        self.history.records.append({"step": self.step, "energy": energy, "weight_norm": norm})

    # ------------------------------------------------------------------ local gradients
    def local_gradients(self, X: Tensor | Inputs, Y: Tensor) -> dict[str, Tensor]:
        """The local update of every trainable map on ``(X, Y)``, keyed like ``ns.to_module().named_parameters()``
        (``X`` a tuple of tensors for a network with several inputs, as in `fit`).

        Scaled as an estimate of the gradient of the batch-mean loss: in the nudged mode it tends to
        the backprop gradient as ``gamma → 0``. The weights do not change.

        Examples
        --------
        >>> import torch, cellsheaf_nn as csnn
        >>> task = csnn.datasets.paraboloid(seed=0)
        >>> model = csnn.mlp([2, 8, 1], seed=0)
        >>> trainer = csnn.SheafTrainer(csnn.compile(model), mode="nudged", loss="mse")
        >>> g = trainer.local_gradients(task.X_train[:50], task.Y_train[:50])
        >>> sorted(g), g["0.weight"].shape
        (['0.bias', '0.weight', '2.bias', '2.weight'], torch.Size([8, 2]))
        """
        ns = self.ns
        X, Yt = check_inputs(ns, X, Y, self.loss)
        if self.mode == "joint":
            if self.stalks is None or len(self.stalks) != len(Yt):
                raise RuntimeError("joint mode: local_gradients reads the current stalks; fit() on this batch first")
            scale = self.loss.scale(ns.n_out) / len(Yt)
            grads = self._map_gradients(self.stalks, scale)
        else:
            start = self.stalks if self.mode == "equilibrium" and self.stalks is not None \
                and len(self.stalks) == len(Yt) else None
            if self.mode == "equilibrium" and start is None:
                start = self._initial_stalks(X, Yt)
            grads = self._local_directions(X, Yt, start)[1]
        grads = distributed.union_mean(grads, len(Yt))
        out: dict[str, Tensor] = {}
        for edge, G in grads.items():
            if edge in ns.parameters:
                out[edge] = G.clone()
                continue
            info = ns.edge_info[edge]
            w_name, b_name = _parameter_names(info)
            out[w_name] = G[:, : ns.layout[info.u].n].clone()
            if b_name is not None:
                k = torch.arange(G.shape[0])
                out[b_name] = G[k, info.ones.start + k].clone()
        return out

    # ------------------------------------------------------------------ save / load
    def state_dict(self) -> dict:
        """Weights, stalks, step, history, optimizer state and regularisation anchors."""
        return {"mode": self.mode, "step": self.step,
                "weights": {k: F.weight.detach().clone() for k, F in self.weights.items()},
                "parameters": {k: p.detach().clone() for k, p in self.parameters.items()},
                "stalks": None if self.stalks is None else self.stalks.clone(),
                "history": self.history.to_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "anchors": self._anchors}

    def load_state_dict(self, state: dict) -> "SheafTrainer":
        """Restore a [`state_dict`][cellsheaf_nn.train.SheafTrainer.state_dict] (same network architecture and mode); returns ``self``.

        Everything is checked before anything changes (keys, mode, step, the shape, dtype and
        finiteness of every weight, stalk and anchor, the history and the optimizer state): a
        ``ValueError`` naming the entry leaves the trainer and its network as they were.
        """
        checked = _checked_state(self, state)
        for k, F in self.weights.items():
            F.weight.data.copy_(checked["weights"][k])
        for k, p in self.parameters.items():
            p.data.copy_(checked["parameters"][k])
        self._maps_changed()
        self.step, self.stalks, self._anchors = checked["step"], checked["stalks"], checked["anchors"]
        self.history = checked["history"]
        if self.optimizer is not None and checked["optimizer"] is not None:
            self.optimizer.load_state_dict(checked["optimizer"])
        return self

    def save(self, path) -> None:
        """Save [`state_dict`][cellsheaf_nn.train.SheafTrainer.state_dict] to ``path`` atomically ([`cellsheaf_nn.checkpoint`][cellsheaf_nn.checkpoint]).

        The checkpoint is written to a temporary file in the same folder, fsynced and renamed over
        ``path``: a crash while saving leaves the previous checkpoint intact. Under torch.distributed
        only rank 0 writes.
        """
        if distributed.is_main():
            write_checkpoint(path, self.state_dict(), kind=_CHECKPOINT_KIND)

    def load(self, path) -> "SheafTrainer":
        """Load a state saved by [`save`][cellsheaf_nn.train.SheafTrainer.save] into this trainer (and its network); returns ``self``.

        A loaded trainer continues exactly as the saved one would have. Loading only reads plain
        data (never code) and checks everything first: a [`cellsheaf_nn.checkpoint.CheckpointError`][cellsheaf_nn.checkpoint.CheckpointError]
        naming the file says what is wrong (missing, truncated, not a checkpoint, a newer format,
        wrong shapes, NaN weights) and leaves the trainer unchanged.
        """
        state = read_checkpoint(path, kind=_CHECKPOINT_KIND)
        try:
            return self.load_state_dict(state)
        except ValueError as err:
            raise CheckpointError(f"checkpoint {path} does not fit this trainer: {err}") from None


def _write_inputs(x: Tensor, columns: list[slice], X: Inputs) -> None:
    """Write every input (flattened) into its columns of the cochains ``x``."""
    for sl, xi in zip(columns, X):
        x[:, sl] = xi.reshape(len(xi), -1)


_CHECKPOINT_KIND = "cellsheaf_nn.SheafTrainer"
_STATE_KEYS = ("mode", "step", "weights", "stalks", "history", "optimizer", "anchors")


def _checked_tensor(value, name: str, shape: tuple[int, ...] | None, dtype: torch.dtype, width: int | None = None
                    ) -> Tensor:
    """``value`` as a finite tensor of ``shape`` (or ``(n, width)``) in ``dtype``; a ValueError names ``name``."""
    if not isinstance(value, Tensor) or not (value.is_floating_point() or value.dtype == torch.int64):
        raise ValueError(f"{name} is a {type(value).__name__}"
                         f"{'' if not isinstance(value, Tensor) else ' of ' + str(value.dtype)}, not a real tensor")
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {shape}")
    if width is not None and (value.dim() != 2 or value.shape[1] != width):
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected (B, {width})")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return value.to(dtype)


def _checked_state(trainer: SheafTrainer, state) -> dict:
    """Every entry of a `SheafTrainer.state_dict` checked against ``trainer``; nothing is changed."""
    if not isinstance(state, dict):
        raise ValueError(f"a trainer state is a dict, got a {type(state).__name__}")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"the state lacks the entries {missing}")
    if state["mode"] != trainer.mode:
        raise ValueError(f"the saved trainer ran mode={state['mode']!r}, this one mode={trainer.mode!r}")
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"'step' must be a non-negative int, got {step!r}")
    weights = state["weights"]
    if not isinstance(weights, dict) or set(weights) != set(trainer.weights):
        have = sorted(weights) if isinstance(weights, dict) else type(weights).__name__
        raise ValueError(f"the saved weights are for edges {have}, this network has {sorted(trainer.weights)}")
    dtype = trainer.ns.dtype
    out: dict[str, Any] = {"step": step, "weights": {
        k: _checked_tensor(weights[k], f"the weights of edge {k!r}", tuple(F.weight.shape), dtype)
        for k, F in trainer.weights.items()}}
    params = state.get("parameters", {})
    if not isinstance(params, dict) or set(params) != set(trainer.parameters):
        have = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"the saved parameters are {have}, this network has {sorted(trainer.parameters)}")
    out["parameters"] = {k: _checked_tensor(params[k], f"the parameter {k!r}", tuple(p.shape), dtype)
                         for k, p in trainer.parameters.items()}
    out["stalks"] = None if state["stalks"] is None else         _checked_tensor(state["stalks"], "'stalks'", None, dtype, width=trainer.sheaf.C0)
    try:
        out["history"] = History.from_dict(state["history"])
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"'history' is not a training history ({err})") from None
    out["anchors"] = _checked_anchors(trainer, state["anchors"])
    out["optimizer"] = state["optimizer"]
    if trainer.optimizer is not None and state["optimizer"] is not None:
        scratch = copy.deepcopy(trainer.optimizer)  # load_state_dict checks the parameter groups
        try:
            scratch.load_state_dict(state["optimizer"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
            raise ValueError(f"'optimizer' does not fit this trainer's {type(trainer.optimizer).__name__} "
                             f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})"
                             ) from None
        for i, slot in state["optimizer"].get("state", {}).items():
            for key, value in slot.items():
                if isinstance(value, Tensor) and not bool(torch.isfinite(value).all()):
                    raise ValueError(f"'optimizer' state {key!r} of parameter {i} contains NaN or Inf values")
    return out


def _checked_anchors(trainer: SheafTrainer, anchors):
    """The joint mode's regularisation anchors ``(stalks, {edge or parameter: tensor})``, checked; ``None`` passes."""
    if anchors is None:
        return None
    tensors = trainer._tensors()
    if not isinstance(anchors, (tuple, list)) or len(anchors) != 2 or not isinstance(anchors[1], dict) \
            or set(anchors[1]) != set(tensors):
        raise ValueError("'anchors' must be (stalks, {edge or parameter: tensor}) for this network's weight edges "
                         "and parameters")
    dtype = trainer.ns.dtype
    return (_checked_tensor(anchors[0], "the anchor stalks", None, dtype, width=trainer.sheaf.C0),
            {k: _checked_tensor(anchors[1][k], f"the anchor weights of {k!r}", tuple(W.shape), dtype)
             for k, W in tensors.items()})
