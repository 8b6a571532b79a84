"""The registry of op compilers: how each module, function and tensor method becomes sheaf pieces.

An *op compiler* turns one operation of the forward pass into vertices and
edges through a `Builder` and returns the
`Value` of its output. Its signature is

* ``fn(b, module, *args, **kwargs)`` for a module type (``@register(nn.Linear)``),
* ``fn(b, *args, **kwargs)`` for a function (``@register(operator.add)``),
* ``fn(b, self, *args, **kwargs)`` for a tensor method (``@register("relu")`` or
  ``@register(torch.Tensor.relu)``),

where tensor arguments arrive as `Value` handles and everything else
(numbers, constant tensors, ``dim=``) as it is. Registering is all it takes to
support a new architecture: nothing in the compiler core changes.

Built in: ``Linear`` (with and without bias), ``ReLU``, ``LeakyReLU``,
``Sigmoid``, ``Tanh``, ``Softmax`` (modules, functions and methods),
``Identity``, ``Dropout`` and ``Flatten`` (aliases: no vertex), ``BatchNorm1d``
in eval mode (an affine edge), ``+``/``-`` of two tensors (a merge vertex,
docs: Architecture, "Skip connections"), adding or multiplying by constants, and
``torch.cat`` along the feature axis.

Examples
--------
>>> import torch, cellsheaf_nn as csnn
>>> class Double(torch.nn.Module):
...     def forward(self, x):
...         return 2 * x
>>> @csnn.register(Double)
... def compile_double(b, module, x):
...     return b.affine(x, 2 * torch.eye(x.dim), kind="scale", trainable=False)
>>> ns = csnn.compile(torch.nn.Sequential(torch.nn.Linear(3, 2), Double()).double())
>>> ns.sheaf.edges
['weight:z1', 'scale:double']
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellsheaf import maps as M

from .builder import Builder, Value

__all__ = ["register", "OpCompiler", "lookup", "supported_ops", "UnsupportedOpError", "HOW_TO_REGISTER"]

HOW_TO_REGISTER = """register a compiler for it (no change to cellsheaf_nn needed):

    import cellsheaf_nn as csnn

    @csnn.register(MyModule)                 # or a function: @csnn.register(my_fn); a method: @csnn.register("name")
    def compile_my_module(b, module, x):     # b: csnn.Builder, x: csnn.Value (the input quantity)
        return b.affine(x, module.weight, module.bias)   # or b.activation / b.combine / b.concat / b.vertex + b.edge

See cellsheaf_nn.ops and examples/custom_op.py."""


class UnsupportedOpError(TypeError):
    """An operation of the model has no op compiler, or one its compiler cannot handle."""


@dataclass(frozen=True)
class OpCompiler:
    """A registered op compiler.

    ``prefix`` names the output vertex after the quantity (``"z"`` gives ``z{ℓ}``,
    ``"a"`` gives ``a{ℓ}``); ``layer=True`` starts a new layer ``ℓ`` (Linear).
    Without a prefix the output vertex takes the node's name.
    """

    fn: Callable[..., Value]
    target: Any
    prefix: str | None = None
    layer: bool = False

    @property
    def label(self) -> str:
        """A readable name of the target (``Linear``, ``operator.add``, ``Tensor.relu``)."""
        t = self.target
        if isinstance(t, str):
            return f"Tensor.{t}"
        if isinstance(t, type):
            return t.__name__
        if _key(t) != t:
            return f"Tensor.{t.__name__}"
        module = (getattr(t, "__module__", None) or "torch").lstrip("_")
        return f"{module}.{getattr(t, '__name__', repr(t))}"


_REGISTRY: dict[Any, OpCompiler] = {}


def _key(target) -> Any:
    if isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise TypeError(f"register() takes an nn.Module subclass, a function or a method name, got {target!r}")
        return target
    if isinstance(target, str):
        return ("method", target)
    if getattr(target, "__objclass__", None) is torch._C.TensorBase or \
            getattr(target, "__qualname__", "").startswith(("Tensor.", "TensorBase.")):
        return ("method", target.__name__)
    if callable(target):
        return target
    raise TypeError(f"register() takes an nn.Module subclass, a function or a method name, got {target!r}")


def _register_all(targets, fn: Callable[..., Value], **kwargs) -> None:
    """Register ``fn`` for several targets, once per distinct key (``F.tanh`` may be ``torch.tanh``)."""
    for t in {_key(t): t for t in targets}.values():
        register(t, **kwargs)(fn)


def register(target, *, prefix: str | None = None, layer: bool = False, override: bool = False):
    """Decorator: register ``fn`` as the op compiler of ``target``.

    Parameters
    ----------
    target : nn.Module subclass, function (e.g. ``operator.add``, ``torch.cat``) or tensor method
        (its name ``"relu"`` or ``torch.Tensor.relu``).
    prefix : name the output vertex ``{prefix}{ℓ}`` (``"z"``, ``"a"``, ...) instead of after the node.
    layer : the op starts a new layer (increments ``ℓ`` before naming), like ``Linear``.
    override : replace an existing registration (otherwise registering twice raises).

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> class Shift(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x + 1
    >>> @csnn.register(Shift)
    ... def compile_shift(b, module, x):
    ...     return b.affine(x, torch.eye(x.dim), torch.ones(x.dim), kind="affine", trainable=False)
    >>> csnn.compile(Shift(), input_shape=(2,), dtype=torch.float64).infer(torch.zeros(1, 2))
    tensor([[1., 1.]], dtype=torch.float64)
    """
    key = _key(target)

    def deco(fn: Callable[..., Value]) -> Callable[..., Value]:
        if key in _REGISTRY and not override:
            raise ValueError(f"{OpCompiler(fn, target).label} already has an op compiler "
                             f"({_REGISTRY[key].fn.__qualname__}); pass override=True to replace it")
        _REGISTRY[key] = OpCompiler(fn, target, prefix, layer)
        return fn

    return deco


def lookup(target) -> OpCompiler | None:
    """The compiler of a module instance, function or method name (``None`` if there is none).

    Module types are looked up along their MRO, so subclasses inherit compilers.
    """
    if isinstance(target, nn.Module):
        for cls in type(target).__mro__:
            if cls in _REGISTRY:
                return _REGISTRY[cls]
        return None
    try:
        return _REGISTRY.get(_key(target))
    except TypeError:  # unhashable or not a valid target
        return None


def supported_ops() -> list[str]:
    """Readable names of every target with a compiler, sorted.

    Examples
    --------
    >>> import cellsheaf_nn as csnn
    >>> "Linear" in csnn.supported_ops()
    True
    """
    return sorted({c.label for c in _REGISTRY.values()})


# ---------------------------------------------------------------------------- helpers


def _flat(x: Value, what: str) -> None:
    if len(x.shape) != 1:
        raise UnsupportedOpError(f"{what} acts on per-sample vectors, got per-sample shape {x.shape}; "
                                 "flatten the input first (nn.Flatten)")


def _feature_dim(x: Value, dim: int | None, what: str) -> None:
    _flat(x, what)
    if dim not in (None, -1, 1):
        raise UnsupportedOpError(f"{what} over dim={dim}: only the feature axis (dim=1 or -1) is supported")


def _constant(c, x: Value, what: str) -> Tensor:
    """A constant broadcast to one sample of ``x``, flattened."""
    c = torch.as_tensor(c)
    try:
        return torch.broadcast_to(c, (1, *x.shape)).reshape(-1)
    except RuntimeError:
        raise UnsupportedOpError(f"{what}: constant of shape {tuple(c.shape)} does not broadcast to one sample "
                                 f"of shape {x.shape} (batch-dependent constants are not supported)") from None


def _linear_terms(b: Builder, terms: list[tuple[Any, float]], what: str) -> Value:
    """``Σ c_i t_i`` for tensors (Values) and constants: a merge vertex, or one affine edge for one tensor."""
    values = [(t, c) for t, c in terms if isinstance(t, Value)]
    if not values:
        raise UnsupportedOpError(f"{what} of constants only")
    x = values[0][0]
    consts = [_constant(t, x, what).to(b.dtype) * c for t, c in terms if not isinstance(t, Value)]
    const = sum(consts[1:], consts[0]) if consts else None
    if len(values) == 1:
        c = values[0][1]
        return b.affine(x, c * torch.eye(x.dim), const, kind="affine" if const is not None else "scale",
                        trainable=False)
    return b.combine([t for t, _ in values], [None if c == 1 else c * torch.eye(t.dim) for t, c in values],
                     const)


# ---------------------------------------------------------------------------- modules


def _writeback_linear(module: nn.Linear, W: Tensor, b: Tensor | None) -> None:
    module.weight.copy_(W)
    if module.bias is not None:
        module.bias.copy_(b)


@register(nn.Linear, prefix="z", layer=True)
def linear(b: Builder, module: nn.Linear, x: Value) -> Value:
    """``z = W x + b``: a weight edge with ``W̄ = (W | diag(b))`` (Eqs. 10, 15)."""
    _flat(x, "Linear")
    return b.affine(x, module.weight, module.bias, writeback=_writeback_linear)


def _bn_scale(module: nn.BatchNorm1d) -> Tensor:
    return torch.rsqrt(module.running_var + module.eps)


def _writeback_batchnorm(module: nn.BatchNorm1d, W: Tensor, t: Tensor | None) -> None:
    s = torch.diagonal(W)
    sigma = 1 / _bn_scale(module)
    if module.affine:
        module.weight.copy_(s * sigma)
        module.bias.copy_(t + s * module.running_mean)
    elif not (torch.allclose(s * sigma, torch.ones_like(s)) and torch.allclose(t, -s * module.running_mean)):
        raise ValueError("BatchNorm1d(affine=False) cannot hold changed maps; compile it with affine=True")


@register(nn.BatchNorm1d, prefix="bn")
def batchnorm1d(b: Builder, module: nn.BatchNorm1d, x: Value) -> Value:
    """Eval-mode batch norm ``y = s ⊙ x + t`` with ``s = γ/√(var+ε)``, ``t = β − s ⊙ mean``: one affine edge."""
    _flat(x, "BatchNorm1d")
    if module.running_mean is None:
        raise UnsupportedOpError("BatchNorm1d without running statistics (track_running_stats=False) normalises "
                                 "with batch statistics even in eval mode; it has no fixed affine map")
    s = _bn_scale(module)
    gamma = module.weight if module.affine else torch.ones_like(s)
    beta = module.bias if module.affine else torch.zeros_like(s)
    s = gamma * s
    return b.affine(x, torch.diag(s), beta - s * module.running_mean, kind="affine", trainable=module.affine,
                    mask=torch.eye(x.dim), writeback=_writeback_batchnorm)


@register(nn.ReLU, prefix="a")
def relu_module(b: Builder, module: nn.Module, x: Value) -> Value:
    """``a = R^z z`` with the fast selection rule (Eqs. 12, 16)."""
    return b.activation(x, M.ReLU(x.dim))


@register(nn.LeakyReLU, prefix="a")
def leaky_relu_module(b: Builder, module: nn.LeakyReLU, x: Value) -> Value:
    """Leaky ReLU with the module's slope."""
    return b.activation(x, M.LeakyReLU(x.dim, module.negative_slope))


@register(nn.Sigmoid, prefix="a")
def sigmoid_module(b: Builder, module: nn.Module, x: Value) -> Value:
    """The logistic sigmoid (a nonlinear map; on the output it is the edge of Eq. 17)."""
    return b.activation(x, M.Sigmoid(x.dim))


@register(nn.Tanh, prefix="a")
def tanh_module(b: Builder, module: nn.Module, x: Value) -> Value:
    """The hyperbolic tangent."""
    return b.activation(x, M.Tanh(x.dim))


@register(nn.Softmax, prefix="a")
def softmax_module(b: Builder, module: nn.Softmax, x: Value) -> Value:
    """Softmax over the feature axis."""
    _feature_dim(x, module.dim, "Softmax")
    return b.activation(x, M.Softmax(x.dim))


@register(nn.Identity)
def identity_module(b: Builder, module: nn.Module, x: Value, *args, **kwargs) -> Value:
    """No computation: the output is the input's vertex."""
    return b.alias(x)


_register_all((nn.Dropout, nn.AlphaDropout, nn.Dropout1d), identity_module)  # eval semantics: the identity


@register(nn.Flatten)
def flatten_module(b: Builder, module: nn.Flatten, x: Value) -> Value:
    """Flattening the per-sample axes: stalks are flat already, so no vertex is added."""
    if module.start_dim not in (1, -len(x.shape) - 1) or module.end_dim != -1:
        raise UnsupportedOpError(f"Flatten(start_dim={module.start_dim}, end_dim={module.end_dim}): only "
                                 "Flatten(1, -1) (keep the batch axis) is supported")
    return b.alias(x)


# ---------------------------------------------------------------------------- functions and methods


def _activation_fn(map_cls) -> Callable[..., Value]:
    def compile_fn(b: Builder, x: Value, *args, **kwargs) -> Value:
        return b.activation(x, map_cls(x.dim))

    compile_fn.__doc__ = f"Elementwise {map_cls.__name__}."
    return compile_fn


_register_all((torch.relu, F.relu, "relu"), _activation_fn(M.ReLU), prefix="a")
_register_all((torch.sigmoid, F.sigmoid, "sigmoid"), _activation_fn(M.Sigmoid), prefix="a")
_register_all((torch.tanh, F.tanh, "tanh"), _activation_fn(M.Tanh), prefix="a")


@register(F.leaky_relu, prefix="a")
def leaky_relu_fn(b: Builder, x: Value, negative_slope: float = 0.01, inplace: bool = False) -> Value:
    """``F.leaky_relu``."""
    return b.activation(x, M.LeakyReLU(x.dim, negative_slope))


@register(torch.softmax, prefix="a")
@register(F.softmax, prefix="a")
@register("softmax", prefix="a")
def softmax_fn(b: Builder, x: Value, dim: int | None = None, *args, **kwargs) -> Value:
    """Softmax over the feature axis."""
    _feature_dim(x, dim, "softmax")
    return b.activation(x, M.Softmax(x.dim))


@register(torch.flatten)
@register("flatten")
def flatten_fn(b: Builder, x: Value, start_dim: int = 0, end_dim: int = -1) -> Value:
    """``torch.flatten(x, 1)``: no vertex."""
    if start_dim != 1 or end_dim != -1:
        raise UnsupportedOpError(f"flatten(start_dim={start_dim}, end_dim={end_dim}): only flatten(x, 1) "
                                 "(keep the batch axis) is supported")
    return b.alias(x)


@register("view")
@register("reshape")
@register(torch.reshape)
def reshape_fn(b: Builder, x: Value, *shape) -> Value:
    """Reshapes that keep the batch axis (the compiler checks the per-sample size): no vertex."""
    return b.alias(x)


@register(operator.add)
@register(operator.iadd)
@register(torch.add)
@register("add")
def add(b: Builder, x, y, *, alpha: float = 1) -> Value:
    """``x + alpha·y``: a merge vertex and a sum edge for two tensors (docs: Architecture), an affine edge for a constant."""
    return _linear_terms(b, [(x, 1.0), (y, float(alpha))], "add")


@register(operator.sub)
@register(operator.isub)
@register(torch.sub)
@register("sub")
def sub(b: Builder, x, y, *, alpha: float = 1) -> Value:
    """``x − alpha·y``."""
    return _linear_terms(b, [(x, 1.0), (y, -float(alpha))], "sub")


@register(operator.neg)
@register(torch.neg)
@register("neg")
def neg(b: Builder, x: Value) -> Value:
    """``−x``."""
    return _linear_terms(b, [(x, -1.0)], "neg")


@register(operator.mul)
@register(torch.mul)
@register("mul")
def mul(b: Builder, x, y) -> Value:
    """Multiplication by a constant (number or tensor broadcast to one sample): a diagonal ``scale`` edge."""
    if isinstance(x, Value) and isinstance(y, Value):
        raise UnsupportedOpError("the product of two network quantities is bilinear, not a restriction map of "
                                 "one vertex; register a compiler for the module that computes it")
    v, c = (x, y) if isinstance(x, Value) else (y, x)
    return b.affine(v, torch.diag(_constant(c, v, "mul").to(b.dtype)), kind="scale", trainable=False)


@register(operator.truediv)
@register(torch.div)
@register("div")
def div(b: Builder, x: Value, y) -> Value:
    """Division by a constant."""
    if isinstance(y, Value):
        raise UnsupportedOpError("division by a network quantity is not a restriction map of one vertex")
    return mul(b, x, 1.0 / torch.as_tensor(y, dtype=b.dtype))


@register(torch.cat)
@register(torch.concat)
def cat(b: Builder, tensors, dim: int = 0) -> Value:
    """Concatenation along the feature axis: the output vertex is a merge vertex (one copy edge per input)."""
    tensors = list(tensors)
    if not all(isinstance(t, Value) for t in tensors):
        raise UnsupportedOpError("torch.cat of a constant and a network quantity is not supported")
    for t in tensors:
        _feature_dim(t, dim, "torch.cat")
    return b.concat(tensors)
