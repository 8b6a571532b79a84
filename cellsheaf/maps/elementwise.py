"""Elementwise activations: one map class driven by torch functions, with kinks declared.

[`Activation`][cellsheaf.maps.Activation] applies a named torch function coordinatewise; its derivative
comes from autograd (or a closed form where one is registered). Piecewise-smooth
functions (hardtanh, ReLU6, hardswish, hardsigmoid, ELU/SELU at 0) declare
their kinks: at a kink the derivative is the one on the right, the fast
selection rule that [`ReLU`][cellsheaf.maps.ReLU] uses at 0 (Eq. 12), and Newton's active set
([`cellsheaf.gauss_newton`][cellsheaf.gauss_newton]) holds coordinates that zigzag across a kink.

Examples
--------
>>> import torch, cellsheaf as cs
>>> F = cs.maps.Activation("relu6", 3)
>>> F.apply(torch.tensor([-1.0, 2.0, 7.0])), F.derivative(torch.tensor([0.0, 2.0, 6.0]))
(tensor([0., 2., 6.]), tensor([1., 1., 0.]))
>>> cs.maps.Activation("elu", 2, alpha=0.5).kinks
(0.0,)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as fn
from torch import Tensor

from .core import Elementwise, LeakyReLU, ReLU, Sigmoid, Structured, Tanh

__all__ = ["Activation", "ACTIVATIONS", "activation"]


@dataclass(frozen=True)
class _Kind:
    """A registered activation: ``fn(x, **options)``, optional closed-form derivative, kinks from the options."""

    fn: Callable[..., Tensor]
    derivative: Callable[..., Tensor] | None = None
    kinks: Callable[..., tuple[float, ...]] = lambda **_: ()
    defaults: tuple[tuple[str, float], ...] = ()


def _gelu_derivative(x: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _silu_derivative(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


ACTIVATIONS: dict[str, _Kind] = {
    "gelu": _Kind(fn.gelu, _gelu_derivative),
    "gelu_tanh": _Kind(lambda x: fn.gelu(x, approximate="tanh")),
    "silu": _Kind(fn.silu, _silu_derivative),
    "elu": _Kind(lambda x, alpha: fn.elu(x, alpha), kinks=lambda alpha: () if alpha == 1 else (0.0,),
                 defaults=(("alpha", 1.0),)),
    "celu": _Kind(lambda x, alpha: fn.celu(x, alpha), defaults=(("alpha", 1.0),)),
    "selu": _Kind(fn.selu, kinks=lambda: (0.0,)),
    "softplus": _Kind(lambda x, beta, threshold: fn.softplus(x, beta, threshold),
                      defaults=(("beta", 1.0), ("threshold", 20.0))),
    "mish": _Kind(fn.mish),
    "hardtanh": _Kind(lambda x, min_val, max_val: fn.hardtanh(x, min_val, max_val),
                      kinks=lambda min_val, max_val: (min_val, max_val),
                      defaults=(("min_val", -1.0), ("max_val", 1.0))),
    "relu6": _Kind(fn.relu6, kinks=lambda: (0.0, 6.0)),
    "hardswish": _Kind(fn.hardswish, kinks=lambda: (-3.0, 3.0)),
    "hardsigmoid": _Kind(fn.hardsigmoid, kinks=lambda: (-3.0, 3.0)),
    "tanh": _Kind(torch.tanh, lambda x: 1 - torch.tanh(x) ** 2),
    "sigmoid": _Kind(torch.sigmoid, lambda x: torch.sigmoid(x) * torch.sigmoid(-x)),
    "logsigmoid": _Kind(fn.logsigmoid, lambda x: torch.sigmoid(-x)),
    "softsign": _Kind(fn.softsign),
    "tanhshrink": _Kind(fn.tanhshrink),
}
"""The named activations `Activation` knows (extend it with `Activation.register`)."""


class Activation(Elementwise, Structured):
    """The named activation ``name`` (a key of [`ACTIVATIONS`][cellsheaf.maps.ACTIVATIONS]) applied to each of ``d`` coordinates.

    Parameters
    ----------
    name : str
        ``"gelu"``, ``"gelu_tanh"``, ``"silu"``, ``"elu"``, ``"celu"``, ``"selu"``, ``"softplus"``,
        ``"mish"``, ``"hardtanh"``, ``"relu6"``, ``"hardswish"``, ``"hardsigmoid"``, ``"tanh"``,
        ``"sigmoid"``, ``"logsigmoid"``, ``"softsign"``, ``"tanhshrink"``, or one added by [`register`][cellsheaf.maps.Activation.register].
    d : int
    options : the function's float options (``alpha`` of ELU, ``beta``/``threshold`` of softplus,
        ``min_val``/``max_val`` of hardtanh), as keywords or a dict.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> F = cs.maps.Activation("gelu", 2)
    >>> torch.allclose(F.apply(torch.ones(2)), torch.nn.functional.gelu(torch.ones(2)))
    True
    """

    _params = ("name", "d", "options")

    def __init__(self, name: str, d: int, options: dict | None = None, **kw):
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)} (or register one with "
                             "cs.maps.Activation.register, or use cs.maps.Function for any callable)")
        super().__init__(d)
        kind = ACTIVATIONS[name]
        given = {**(options or {}), **kw}
        unknown = set(given) - {k for k, _ in kind.defaults}
        if unknown:
            raise ValueError(f"activation {name!r} takes the options {[k for k, _ in kind.defaults]}, "
                             f"not {sorted(unknown)}")
        self.name, self.d = name, int(d)
        self.options = {k: float(given.get(k, v)) for k, v in kind.defaults}
        self._kind = kind
        self.kinks = tuple(float(c) for c in kind.kinks(**self.options))

    @staticmethod
    def register(name: str, fn: Callable[..., Tensor], derivative: Callable[..., Tensor] | None = None,
                 kinks: tuple[float, ...] = (), **defaults: float) -> None:
        """Add an activation ``fn(x, **options)`` under ``name`` (derivative by autograd unless given).

        Examples
        --------
        >>> import torch, cellsheaf as cs
        >>> cs.maps.Activation.register("cube", lambda x: x ** 3, lambda x: 3 * x ** 2)
        >>> cs.maps.Activation("cube", 1).derivative(torch.tensor([2.0]))
        tensor([12.])
        """
        ACTIVATIONS[name] = _Kind(fn, derivative, lambda **_: tuple(kinks), tuple(defaults.items()))

    def apply(self, x):
        return self._kind.fn(x, **self.options)

    def derivative(self, x):
        if self.kinks:  # the right derivative at a kink (the fast selection rule)
            at = torch.zeros_like(x, dtype=torch.bool)
            for c in self.kinks:
                at |= x == c
            x = torch.where(at, torch.nextafter(x, torch.full_like(x, math.inf)), x)
        if self._kind.derivative is not None:
            return self._kind.derivative(x, **self.options)
        with torch.enable_grad():
            z = x.detach().requires_grad_(True)
            (d,) = torch.autograd.grad(self._kind.fn(z, **self.options).sum(), z)
        return d

    def __repr__(self):
        opts = "".join(f", {k}={v}" for k, v in self.options.items())
        return f"Activation({self.name!r}, {self.d}{opts})"


_MODULES = {
    "GELU": lambda m: ("gelu_tanh" if m.approximate == "tanh" else "gelu", {}),
    "SiLU": lambda m: ("silu", {}), "Mish": lambda m: ("mish", {}), "SELU": lambda m: ("selu", {}),
    "ELU": lambda m: ("elu", {"alpha": m.alpha}), "CELU": lambda m: ("celu", {"alpha": m.alpha}),
    "Softplus": lambda m: ("softplus", {"beta": m.beta, "threshold": m.threshold}),
    "Hardtanh": lambda m: ("hardtanh", {"min_val": m.min_val, "max_val": m.max_val}),
    "ReLU6": lambda m: ("relu6", {}), "Hardswish": lambda m: ("hardswish", {}),
    "Hardsigmoid": lambda m: ("hardsigmoid", {}), "LogSigmoid": lambda m: ("logsigmoid", {}),
    "Softsign": lambda m: ("softsign", {}), "Tanhshrink": lambda m: ("tanhshrink", {}),
}


def activation(module, d: int) -> Elementwise:
    """The elementwise map of a torch activation module (``torch.nn.GELU()``, ``torch.nn.ELU(0.5)``, ...) or
    its name, on ``R^d``: [`ReLU`][cellsheaf.maps.ReLU], [`LeakyReLU`][cellsheaf.maps.LeakyReLU], [`Sigmoid`][cellsheaf.maps.Sigmoid], [`Tanh`][cellsheaf.maps.Tanh] or an [`Activation`][cellsheaf.maps.Activation].

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> cs.maps.activation(torch.nn.Hardtanh(-2.0, 2.0), 3)
    Activation('hardtanh', 3, min_val=-2.0, max_val=2.0)
    >>> cs.maps.activation(torch.nn.ReLU(), 3)
    ReLU(3 -> 3)
    """
    if isinstance(module, str):
        return Activation(module, d)
    kind = type(module).__name__
    if kind == "ReLU":
        return ReLU(d)
    if kind == "LeakyReLU":
        return LeakyReLU(d, module.negative_slope)
    if kind in ("Sigmoid", "Tanh"):
        return {"Sigmoid": Sigmoid, "Tanh": Tanh}[kind](d)
    if kind not in _MODULES:
        raise ValueError(f"no elementwise map for the module {kind}; known: ReLU, LeakyReLU, Sigmoid, Tanh, "
                         f"{', '.join(sorted(_MODULES))} (or wrap it: cs.maps.Function(module, d, d))")
    name, options = _MODULES[kind](module)
    return Activation(name, d, options)
