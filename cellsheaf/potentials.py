"""Edge potentials ``U_e``: how an edge turns its two expressed values into energy.

A *difference* potential depends only on the discrepancy ``r = F_v x_v − F_u x_u``
(quadratic, L1, Huber, p-norm, elastic net, any convex function; App. B.3 of the
paper). A *two-argument* potential depends on both expressed values separately
(cross-entropy between a prediction and a target, Sec. 5.2.3).

Every potential gives its value, its gradient and a *curvature model*: a
positive semidefinite Hessian(-like) operator used by Newton-type solvers. For
twice-differentiable convex potentials the curvature is the Hessian; for L1 it is
the iteratively-reweighted-least-squares majoriser ``diag(1/|r|)``; for
cross-entropy it is the Hessian of the prediction block.

Examples
--------
>>> import torch, cellsheaf as cs
>>> cs.potentials.Quadratic().value(torch.tensor([3.0, 4.0]))
tensor(12.5000)
>>> cs.potentials.Huber(1.0).grad(torch.tensor([0.5, -3.0]))
tensor([ 0.5000, -1.0000])
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "Potential", "Quadratic", "L1", "Huber", "PNorm", "ElasticNet", "Convex", "Weighted", "CrossEntropy",
]


def _kink_eps(r: Tensor) -> Tensor:
    """Smallest magnitude used where a curvature model divides by ``|r|`` (√machine-epsilon)."""
    return torch.finfo(r.dtype).eps ** 0.5


class Potential:
    """Base class of edge potentials.

    Difference potentials implement [`value`][cellsheaf.potentials.Potential.value] and [`grad`][cellsheaf.potentials.Potential.grad] of ``r``
    (and [`curvature`][cellsheaf.potentials.Potential.curvature]; the default uses autograd). Two-argument potentials
    set ``difference = False`` and implement [`pair_value`][cellsheaf.potentials.Potential.pair_value],
    [`pair_grad`][cellsheaf.potentials.Potential.pair_grad] and [`pair_curvature`][cellsheaf.potentials.Potential.pair_curvature] of ``(a_v, a_u)`` where
    ``a_v = F_v x_v`` and ``a_u = F_u x_u``.

    Attributes
    ----------
    difference : whether the potential is a function of ``a_v − a_u`` only.
    quadratic : whether it is ``½‖r‖²`` (lets solvers use the linear theory).
    separable : whether it is a sum of one-dimensional functions of the coordinates
        of ``r`` (then its Hessian is diagonal).
    smooth : whether it is twice differentiable (L1 and elastic net are not).
    """

    difference: bool = True
    quadratic: bool = False
    separable: bool = False
    smooth: bool = True

    def value(self, r: Tensor) -> Tensor:
        """Energy of discrepancies ``r`` of shape ``(..., d)``; returns shape ``(...)``."""
        raise NotImplementedError

    def grad(self, r: Tensor) -> Tensor:
        """Gradient (a subgradient where not differentiable) of [`value`][cellsheaf.potentials.Potential.value] at ``r``."""
        with torch.enable_grad():
            r = r.detach().requires_grad_(True)
            return torch.autograd.grad(self.value(r).sum(), r)[0]

    def curvature(self, r: Tensor, v: Tensor) -> Tensor:
        """Positive semidefinite curvature model at ``r`` applied to ``v`` (the Hessian-vector product
        for smooth convex potentials)."""
        with torch.enable_grad():
            r = r.detach().requires_grad_(True)
            g = torch.autograd.grad(self.value(r).sum(), r, create_graph=True)[0]
            return torch.autograd.grad(g, r, grad_outputs=v)[0]

    def pair_value(self, a_v: Tensor, a_u: Tensor) -> Tensor:
        """Energy of the two expressed values ``a_v = F_v x_v``, ``a_u = F_u x_u``."""
        return self.value(a_v - a_u)

    def pair_grad(self, a_v: Tensor, a_u: Tensor) -> tuple[Tensor, Tensor]:
        """Gradients ``(∂U/∂a_v, ∂U/∂a_u)``."""
        g = self.grad(a_v - a_u)
        return g, -g

    def pair_curvature(self, a_v: Tensor, a_u: Tensor, d_v: Tensor, d_u: Tensor) -> tuple[Tensor, Tensor]:
        """Curvature model at ``(a_v, a_u)`` applied to the direction ``(d_v, d_u)``: ``(h_v, h_u)``."""
        h = self.curvature(a_v - a_u, d_v - d_u)
        return h, -h

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class _Separable(Potential):
    """``U(r) = Σ_i f(r_i)``: subclasses give ``f`` (`elementwise`), ``f'`` and ``f''``."""

    separable = True

    def elementwise(self, r: Tensor) -> Tensor:
        """The per-coordinate energies ``f(r_i)``, same shape as ``r``."""
        raise NotImplementedError

    def second(self, r: Tensor) -> Tensor:
        """The per-coordinate curvature model ``f''(r_i) >= 0``."""
        raise NotImplementedError

    def value(self, r):
        return self.elementwise(r).sum(-1)

    def curvature(self, r, v):
        return self.second(r) * v


class Quadratic(_Separable):
    """``U(r) = ½‖r‖²``: the default, whose gradient flow is sheaf diffusion.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> cs.potentials.Quadratic().grad(torch.tensor([1.0, -2.0]))
    tensor([ 1., -2.])
    """

    quadratic = True

    def elementwise(self, r):
        return 0.5 * r * r

    def value(self, r):
        return 0.5 * (r * r).sum(-1)

    def grad(self, r):
        return r

    def second(self, r):
        return torch.ones_like(r)

    def curvature(self, r, v):
        return v


class L1(_Separable):
    """``U(r) = ‖r‖₁`` with subgradient ``sign(r)`` (``sign(0) = 0``), App. B.3.

    Not differentiable at ``r_i = 0``; the curvature model is the IRLS majoriser
    ``1/max(|r_i|, ε)`` with ``ε = √machine-epsilon``.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> cs.potentials.L1().value(torch.tensor([1.0, -2.0]))
    tensor(3.)
    """

    smooth = False

    def elementwise(self, r):
        return r.abs()

    def grad(self, r):
        return torch.sign(r)

    def second(self, r):
        return 1.0 / r.abs().clamp_min(_kink_eps(r))


class Huber(_Separable):
    """Huber potential with threshold ``tau`` (Eqs. 44-45): quadratic for ``|r_i| <= tau``, linear beyond.

    Gradient ``clip(r, −tau, tau)``; curvature ``1`` inside the threshold, ``0`` outside.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> cs.potentials.Huber(1.0).value(torch.tensor([0.5, 3.0]))
    tensor(2.6250)
    """

    def __init__(self, tau: float = 1.0):
        tau = float(tau)
        if not tau > 0 or tau == float("inf"):
            raise ValueError(f"Huber threshold tau must be positive and finite, got {tau}")
        self.tau = tau

    def elementwise(self, r):
        a = r.abs()
        return torch.where(a <= self.tau, 0.5 * r * r, self.tau * (a - 0.5 * self.tau))

    def grad(self, r):
        return r.clamp(-self.tau, self.tau)

    def second(self, r):
        return (r.abs() <= self.tau).to(r.dtype)


class PNorm(_Separable):
    """``U(r) = (1/p) Σ |r_i|^p`` for ``p > 1`` (Eq. 43); gradient ``|r_i|^{p−2} r_i``.

    For ``p < 2`` the Hessian ``(p−1)|r_i|^{p−2}`` is infinite at 0; the
    curvature model evaluates it at ``max(|r_i|, ε)``.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> cs.potentials.PNorm(3).grad(torch.tensor([-2.0]))
    tensor([-4.])
    """

    def __init__(self, p: float = 2.0):
        p = float(p)
        if not (p > 1 and p < float("inf")):
            raise ValueError(f"PNorm needs 1 < p < inf, got p={p}; use L1() for p = 1")
        self.p = p

    def elementwise(self, r):
        return r.abs() ** self.p / self.p

    def grad(self, r):
        return torch.sign(r) * r.abs() ** (self.p - 1)

    def second(self, r):
        a = r.abs()
        if self.p < 2:
            a = a.clamp_min(_kink_eps(r))
        return (self.p - 1) * a ** (self.p - 2)


class ElasticNet(_Separable):
    """``U(r) = l1 ‖r‖₁ + (l2/2) ‖r‖²`` (Note 5.2): sparse and smooth regularisation combined.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> cs.potentials.ElasticNet(l1=1.0, l2=2.0).value(torch.tensor([1.0, -1.0]))
    tensor(4.)
    """

    def __init__(self, l1: float = 1.0, l2: float = 1.0):
        l1, l2 = float(l1), float(l2)
        if l1 < 0 or l2 < 0 or not l1 + l2 > 0:
            raise ValueError(f"ElasticNet needs l1, l2 >= 0, not both zero; got l1={l1}, l2={l2}")
        self.l1, self.l2 = l1, l2

    @property
    def smooth(self) -> bool:
        return self.l1 == 0

    def elementwise(self, r):
        return self.l1 * r.abs() + 0.5 * self.l2 * r * r

    def grad(self, r):
        return self.l1 * torch.sign(r) + self.l2 * r

    def second(self, r):
        return self.l1 / r.abs().clamp_min(_kink_eps(r)) + self.l2


class Convex(Potential):
    """Any user convex function ``fn: (..., d) -> (...)`` of the discrepancy; derivatives by autograd.

    Convexity is the caller's promise (it makes the energy's critical points
    minima); ``fn`` must be twice differentiable for Newton-type solvers.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> U = cs.potentials.Convex(lambda r: torch.logsumexp(r, -1), name="lse")
    >>> U.grad(torch.zeros(2))
    tensor([0.5000, 0.5000])
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str | None = None):
        if not callable(fn):
            raise TypeError(f"Convex needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "convex")

    def value(self, r):
        out = self.fn(r)
        if not isinstance(out, Tensor) or out.shape != r.shape[:-1]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"potential {self.name!r} returned {shape} for discrepancies of shape "
                             f"{tuple(r.shape)}; it must reduce the last axis, giving {tuple(r.shape[:-1])}")
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"potential {self.name!r} is not finite at this discrepancy (undefined there?)")
        return out

    def __repr__(self) -> str:
        return f"Convex({self.name!r})"


class Weighted(Potential):
    """A potential scaled by ``weights``: a scalar (any potential), or per coordinate ``(d,)`` for a
    separable potential, giving ``Σ_i w_i f(r_i)``.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> U = cs.potentials.Weighted(cs.potentials.L1(), torch.tensor([1.0, 10.0]))
    >>> U.value(torch.tensor([1.0, 1.0]))
    tensor(11.)
    """

    def __init__(self, potential: Potential, weights):
        if not isinstance(potential, Potential):
            raise TypeError("Weighted needs a cellsheaf.potentials.Potential to weight")
        w = torch.as_tensor(weights)
        if not w.is_floating_point():
            w = w.to(torch.get_default_dtype())
        if w.dim() > 1 or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("Weighted needs finite non-negative weights: a scalar or a (d,) vector")
        if w.dim() == 1 and not potential.separable:
            raise ValueError(f"per-coordinate weights need a separable potential; {potential!r} is not "
                             "(use a scalar weight)")
        self.potential, self.weights = potential, w

    @property
    def difference(self) -> bool:
        return self.potential.difference

    @property
    def separable(self) -> bool:
        return self.potential.separable

    @property
    def smooth(self) -> bool:
        return self.potential.smooth

    def _w(self, like: Tensor) -> Tensor:
        if self.weights.dim() == 1 and self.weights.shape[0] != like.shape[-1]:
            raise ValueError(f"Weighted: {self.weights.shape[0]} weights for an edge stalk of dim {like.shape[-1]}")
        return self.weights.to(dtype=like.dtype, device=like.device)

    def elementwise(self, r: Tensor) -> Tensor:
        """Per-coordinate energies ``w_i f(r_i)`` (separable potentials only)."""
        return self._w(r) * self.potential.elementwise(r)

    def value(self, r):
        if self.weights.dim() == 0:
            return self._w(r) * self.potential.value(r)
        return (self._w(r) * self.potential.elementwise(r)).sum(-1)

    def grad(self, r):
        return self._w(r) * self.potential.grad(r)

    def curvature(self, r, v):
        return self._w(r) * self.potential.curvature(r, v)

    def pair_value(self, a_v, a_u):
        return self._w(a_v) * self.potential.pair_value(a_v, a_u) if not self.difference \
            else self.value(a_v - a_u)

    def pair_grad(self, a_v, a_u):
        gv, gu = self.potential.pair_grad(a_v, a_u)
        w = self._w(a_v)
        return w * gv, w * gu

    def pair_curvature(self, a_v, a_u, d_v, d_u):
        hv, hu = self.potential.pair_curvature(a_v, a_u, d_v, d_u)
        w = self._w(a_v)
        return w * hv, w * hu

    def __repr__(self) -> str:
        w = self.weights.item() if self.weights.dim() == 0 else self.weights.tolist()
        return f"Weighted({self.potential!r}, {w!r})"

    def __eq__(self, other):
        return type(other) is Weighted and self.potential == other.potential and \
            torch.equal(self.weights, other.weights.to(self.weights.dtype))

    __hash__ = object.__hash__


class CrossEntropy(Potential):
    """Cross-entropy between a prediction and a target expressed on the two ends of an edge (Sec. 5.2.3).

    Parameters
    ----------
    activation : {"softmax", "sigmoid", None}
        How the prediction end is read: ``"softmax"`` takes logits ``z`` and gives
        ``−Σ y_i log softmax(z)_i``; ``"sigmoid"`` takes logits and gives the binary
        cross-entropy ``Σ −y_i log σ(z_i) − (1−y_i) log(1−σ(z_i))``; ``None`` takes
        probabilities ``p > 0`` and gives ``−Σ y_i log p_i``.
    prediction : {"u", "v"}
        Which end of the edge expresses the prediction (``"u"`` for an output
        edge ``z -> y``); the other end expresses the target ``y``.

    With an activation, the force on the logits is ``φ(z) − y`` (Eq. 27, for
    targets summing to one in the softmax case), computed in closed form.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> U = cs.potentials.CrossEntropy("softmax")
    >>> z, y = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0])
    >>> U.pair_grad(y, z)[1]          # force on the logits (a_u): softmax(z) - y
    tensor([-0.5000,  0.5000])
    """

    difference = False

    def __init__(self, activation: str | None = "softmax", prediction: str = "u"):
        if activation not in ("softmax", "sigmoid", None):
            raise ValueError(f"CrossEntropy activation must be 'softmax', 'sigmoid' or None, got {activation!r}")
        if prediction not in ("u", "v"):
            raise ValueError(f"CrossEntropy prediction end must be 'u' or 'v', got {prediction!r}")
        self.activation, self.prediction = activation, prediction

    def _split(self, a_v: Tensor, a_u: Tensor) -> tuple[Tensor, Tensor]:
        """``(prediction, target)`` from the two expressed values."""
        return (a_u, a_v) if self.prediction == "u" else (a_v, a_u)

    def _join(self, g_pred: Tensor, g_target: Tensor) -> tuple[Tensor, Tensor]:
        """``(g_v, g_u)`` from gradients on the prediction and the target."""
        return (g_target, g_pred) if self.prediction == "u" else (g_pred, g_target)

    def _check_probabilities(self, p: Tensor) -> None:
        if bool((p <= 0).any()) or not bool(torch.isfinite(p).all()):
            raise ValueError(f"cross-entropy needs positive finite predicted probabilities (log of p <= 0 is "
                             f"undefined); got min p = {float(p.min()):.3g}. Use activation='softmax' or "
                             "'sigmoid' on logits, or keep the prediction in (0, 1]")

    def log_prediction(self, z: Tensor) -> Tensor:
        """``log φ(z)`` (``log p`` when ``activation`` is None)."""
        if self.activation == "softmax":
            return torch.log_softmax(z, -1)
        if self.activation == "sigmoid":
            return torch.nn.functional.logsigmoid(z)
        self._check_probabilities(z)
        return torch.log(z)

    def pair_value(self, a_v, a_u):
        z, y = self._split(a_v, a_u)
        if self.activation == "sigmoid":
            return (torch.nn.functional.softplus(z) - y * z).sum(-1)
        return -(y * self.log_prediction(z)).sum(-1)

    def pair_grad(self, a_v, a_u):
        z, y = self._split(a_v, a_u)
        if self.activation == "softmax" and z.shape[-1]:
            # one normalisation for both ends, by elementwise kernels (torch's softmax and log-softmax are
            # slower on the short rows of a network's output); equal to them to rounding
            shifted = z - z.amax(-1, keepdim=True)
            e = torch.exp(shifted)
            total = e.sum(-1, keepdim=True)
            return self._join(e / total * y.sum(-1, keepdim=True) - y, torch.log(total) - shifted)
        if self.activation == "softmax":
            return self._join(torch.softmax(z, -1) * y.sum(-1, keepdim=True) - y, -torch.log_softmax(z, -1))
        if self.activation == "sigmoid":
            return self._join(torch.sigmoid(z) - y, -z)
        self._check_probabilities(z)
        return self._join(-y / z, -torch.log(z))

    def pair_curvature(self, a_v, a_u, d_v, d_u):
        z, y = self._split(a_v, a_u)
        dz, _ = self._split(d_v, d_u)
        if self.activation == "softmax":
            p = torch.softmax(z, -1)
            h = y.sum(-1, keepdim=True) * p * (dz - (p * dz).sum(-1, keepdim=True))
        elif self.activation == "sigmoid":
            s = torch.sigmoid(z)
            h = s * (1 - s) * dz
        else:
            self._check_probabilities(z)
            h = y.clamp_min(0) / (z * z) * dz
        return self._join(h, torch.zeros_like(h))

    def _not_difference(self, *args):
        raise TypeError("CrossEntropy is a two-argument potential: use pair_value / pair_grad / pair_curvature")

    value = grad = curvature = _not_difference
