"""Training losses, each with the cellsheaf edge potential that plays it on the output edge.

A loss is evaluated on the network's output (after the output activation) as
a mean over the batch: difference losses and binary cross-entropy average over
all elements, cross-entropy sums over classes per sample and averages over
samples. In the sheaf, the same loss is an edge potential ``U`` on the output
edge (Sec. 5.2.3, App. B.3), summed over samples; [`Loss.scale`][cellsheaf_nn.losses.Loss.scale] converts,
``loss(batch) = scale(n_out) · mean_m U(sample m)``.

Which losses fit which output activation: a *difference* loss (MSE, L1, Huber,
p-norm) fits any activation ``φ`` (the output edge carries ``U(φ(z) − y)``,
Eq. 21); binary cross-entropy needs a sigmoid output, ``"bce_with_logits"`` and ``"cross_entropy"`` take the
logits themselves as ``torch.nn.BCEWithLogitsLoss``/``torch.nn.CrossEntropyLoss`` do (cross-entropy also
fits a softmax output, ``"nll"`` a log-softmax one); the force on the logits is ``φ(z) − y`` (Eq. 27).
[`Loss.bind`][cellsheaf_nn.losses.Loss.bind] sets a loss up for the network's output activation.

Examples
--------
>>> import torch, cellsheaf_nn as csnn
>>> mse = csnn.losses.get("mse")
>>> mse(torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]]))
tensor(2.5000)
>>> csnn.losses.get("bce").check_output("identity")
Traceback (most recent call last):
...
ValueError: loss 'bce' needs a sigmoid output activation, but the network's output is 'identity'; ...
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import cellsheaf as cs

__all__ = ["Loss", "MSE", "L1", "Huber", "PNorm", "BCE", "BCEWithLogits", "CrossEntropy", "NLL", "get", "accuracy",
           "LOSSES", "ALIASES"]

_LOG_FLOOR = -100.0  # torch's BCELoss convention: log-probabilities are clamped at -100


class Loss:
    """Base class: a batch-mean loss on network outputs and its output-edge potential."""

    name: str = "loss"
    outputs: tuple[str, ...] | None = None  # output activations it fits; None: any
    per_element: bool = True  # mean over all elements (else: sum over outputs, mean over samples)
    logits: bool = False  # the potential reads the logits z (the output edge's map on z is the identity)

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        """The batch-mean loss of ``output`` ``(B, n_out)`` against ``target`` (see `target`)."""
        y = self.target(target, output.shape[-1], output.dtype)
        if y.shape[0] != output.shape[0]:
            raise ValueError(f"loss {self.name!r}: {output.shape[0]} outputs but {y.shape[0]} targets")
        return self.elementwise(output, y).sum(-1).mean() / (output.shape[-1] if self.per_element else 1)

    def elementwise(self, output: Tensor, y: Tensor) -> Tensor:
        """Loss per sample and output coordinate, ``(B, n_out)``."""
        raise NotImplementedError

    def target(self, Y: Tensor, n_out: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """Checked targets as a float ``(B, n_out)`` tensor (``(B,)`` is accepted when ``n_out == 1``)."""
        Y = torch.as_tensor(Y)
        if Y.dim() == 1 and n_out == 1:
            Y = Y.unsqueeze(1)
        if Y.dim() != 2 or Y.shape[1] != n_out:
            raise ValueError(f"loss {self.name!r}: targets of shape {tuple(Y.shape)} do not match a network "
                             f"with {n_out} outputs; expected (B, {n_out})")
        Y = Y.to(dtype)
        cs.cochain.check_finite(Y, f"targets of loss {self.name!r}")
        return Y

    def potential(self) -> cs.potentials.Potential:
        """The cellsheaf potential for the output edge ``z -> y`` (per sample).

        It reads ``φ(z)`` at the ``u`` end, or the logits ``z`` when `logits` is true,
        and the target at the ``v`` end.
        """
        raise NotImplementedError

    def scale(self, n_out: int) -> float:
        """``c`` with ``loss(batch) = c · mean_m U(sample m)`` for the potential ``U``."""
        return 1.0 / n_out if self.per_element else 1.0

    def bind(self, activation: str) -> "Loss":
        """This loss checked against (and set up for) a network whose output activation is ``activation``."""
        self.check_output(activation)
        return self

    def check_output(self, activation: str) -> None:
        """Raise ``ValueError`` if this loss does not fit the output activation ``activation``."""
        if self.outputs is not None and activation not in self.outputs:
            raise ValueError(
                f"loss {self.name!r} needs a {' or '.join(self.outputs)} output activation, but the network's "
                f"output is {activation!r}; use {_SUGGEST.get(activation, 'a difference loss such as mse')} "
                "or change the last layer")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class MSE(Loss):
    """Mean squared error over all elements; potential ``½‖d‖²`` (the quadratic sheaf Laplacian)."""

    name = "mse"

    def elementwise(self, output, y):
        return (output - y) ** 2

    def potential(self):
        return cs.potentials.Quadratic()

    def scale(self, n_out):
        return 2.0 / n_out


class L1(Loss):
    """Mean absolute error; potential ``‖d‖₁`` (subgradient ``sign(d)``)."""

    name = "l1"

    def elementwise(self, output, y):
        return (output - y).abs()

    def potential(self):
        return cs.potentials.L1()


class Huber(Loss):
    """Huber loss with threshold ``tau`` (Eq. 44), mean over elements; equals ``torch.nn.HuberLoss(delta=tau)``."""

    name = "huber"

    def __init__(self, tau: float = 1.0):
        if not tau > 0:
            raise ValueError(f"Huber threshold tau must be positive, got {tau}")
        self.tau = float(tau)

    def elementwise(self, output, y):
        return F.huber_loss(output, y, reduction="none", delta=self.tau)

    def potential(self):
        return cs.potentials.Huber(self.tau)


class PNorm(Loss):
    """``mean |d|^p`` over elements for ``p > 1``; potential ``(1/p) Σ |d_i|^p`` (Eq. 43). ``p = 2`` is MSE."""

    name = "pnorm"

    def __init__(self, p: float = 1.5):
        if not p > 1:
            raise ValueError(f"the p-norm loss needs p > 1, got {p} (use 'l1' for p = 1)")
        self.p = float(p)

    def elementwise(self, output, y):
        return (output - y).abs() ** self.p

    def potential(self):
        return cs.potentials.PNorm(self.p)

    def scale(self, n_out):
        return self.p / n_out


class BCE(Loss):
    """Binary cross-entropy on sigmoid outputs, mean over elements (as ``torch.nn.BCELoss``).

    Targets are probabilities in ``[0, 1]`` (labels ``0``/``1``).
    """

    name = "bce"
    outputs = ("sigmoid",)
    logits = True

    def elementwise(self, output, y):
        return F.binary_cross_entropy(output, y, reduction="none")

    def target(self, Y, n_out, dtype=torch.float64):
        Y = super().target(Y, n_out, dtype)
        if bool(((Y < 0) | (Y > 1)).any()):
            raise ValueError(f"loss 'bce': targets must be labels 0/1 or probabilities in [0, 1]; got values in "
                             f"[{float(Y.min()):g}, {float(Y.max()):g}]")
        return Y

    def potential(self):
        return cs.potentials.CrossEntropy("sigmoid")


class CrossEntropy(Loss):
    """Cross-entropy ``−Σ_i y_i log p_i``, per sample then mean: ``torch.nn.CrossEntropyLoss``.

    On a logits model (no output activation) ``p = softmax(logits)``, exactly as
    ``nn.CrossEntropyLoss`` (no Softmax layer needed); on a softmax output ``p`` is that output
    (the loss of the logits before it). Targets are integer class indices ``(B,)`` in
    ``[0, n_out)`` or probability rows ``(B, n_out)``.

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> logits, y = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([1])
    >>> ce = csnn.losses.get("cross_entropy").bind("identity")
    >>> torch.allclose(ce(logits, y), torch.nn.CrossEntropyLoss()(logits, y))
    True
    """

    name = "cross_entropy"
    outputs = ("softmax", "identity")
    per_element = False
    logits = True
    from_logits = False

    def bind(self, activation):
        self.check_output(activation)
        out = type(self)()
        out.from_logits = activation == "identity"
        return out

    def elementwise(self, output, y):
        logp = torch.log_softmax(output, -1) if self.from_logits else torch.log(output)
        return -y * logp.clamp_min(_LOG_FLOOR)

    def target(self, Y, n_out, dtype=torch.float64):
        Y = torch.as_tensor(Y)
        if Y.dim() == 1 and not Y.is_floating_point():
            bad = (Y < 0) | (Y >= n_out)
            if bool(bad.any()):
                raise ValueError(f"loss {self.name!r}: label {int(Y[bad][0])} is outside the classes 0..{n_out - 1} "
                                 f"of a network with {n_out} outputs")
            return F.one_hot(Y, n_out).to(dtype)
        if Y.dim() == 1:
            raise ValueError(f"loss {self.name!r}: give integer class labels (B,) or probability rows (B, n_out)")
        Y = super().target(Y, n_out, dtype)
        if bool((Y < 0).any()) or not torch.allclose(Y.sum(1), torch.ones_like(Y[:, 0])):
            raise ValueError(f"loss {self.name!r}: target rows must be probability vectors (nonnegative, summing "
                             "to 1); for class labels pass an integer tensor of shape (B,)")
        return Y

    def potential(self):
        return cs.potentials.CrossEntropy("softmax")


class NLL(CrossEntropy):
    """``torch.nn.NLLLoss`` on a log-softmax output: ``−Σ_i y_i out_i``, the cross-entropy of the logits
    before the log-softmax."""

    name = "nll"
    outputs = ("log_softmax",)

    def bind(self, activation):
        self.check_output(activation)
        return self

    def elementwise(self, output, y):
        return -y * output


class BCEWithLogits(BCE):
    """``torch.nn.BCEWithLogitsLoss`` on a logits model (no output activation), mean over elements."""

    name = "bce_with_logits"
    outputs = ("identity",)

    def elementwise(self, output, y):
        return F.binary_cross_entropy_with_logits(output, y, reduction="none")


LOSSES: dict[str, type[Loss]] = {c.name: c for c in (MSE, L1, Huber, PNorm, BCE, CrossEntropy, NLL, BCEWithLogits)}
ALIASES = {"ce": "cross_entropy", "binary_cross_entropy": "bce", "mean_squared_error": "mse", "smooth_l1": "huber"}
_SUGGEST = {"sigmoid": "'bce'", "softmax": "'cross_entropy'", "log_softmax": "'nll'",
            "identity": "'mse', 'l1', 'huber', 'pnorm', 'cross_entropy' or 'bce_with_logits'"}


def get(loss: str | Loss, **kwargs) -> Loss:
    """A [`Loss`][cellsheaf_nn.losses.Loss] from its name: ``"mse"``, ``"l1"``, ``"huber"``, ``"pnorm"``, ``"bce"``, ``"bce_with_logits"``,
    ``"cross_entropy"`` (alias ``"ce"``), ``"nll"``.

    Examples
    --------
    >>> import cellsheaf_nn as csnn
    >>> csnn.losses.get("huber", tau=0.5)
    Huber(tau=0.5)
    """
    if isinstance(loss, Loss):
        if kwargs:
            raise TypeError("keyword arguments apply only when the loss is given by name")
        return loss
    name = ALIASES.get(loss, loss)
    if name not in LOSSES:
        raise KeyError(f"unknown loss {loss!r}; choose from {sorted(LOSSES)} (aliases {sorted(ALIASES)}) or pass "
                       "a csnn.losses.Loss")
    return LOSSES[name](**kwargs)


def accuracy(output: Tensor, target: Tensor) -> float:
    """Fraction of correct predictions: threshold ½ for one output, argmax for several.

    ``target`` holds labels ``(B,)``/``(B, 1)`` or one-hot/probability rows ``(B, C)``.

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> csnn.losses.accuracy(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 0]))
    0.5
    """
    target = torch.as_tensor(target)
    if output.shape[-1] == 1:
        pred, true = (output.reshape(-1) >= 0.5), (target.reshape(-1) >= 0.5)
    else:
        pred = output.argmax(-1)
        true = target.argmax(-1) if target.dim() == 2 else target
    return float((pred == true.to(pred.device)).double().mean())
