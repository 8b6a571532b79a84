"""The registry of op compilers: how each module, function and tensor method becomes sheaf pieces.

An *op compiler* turns one operation of the forward pass into vertices and
edges through a [`Builder`][cellsheaf_nn.builder.Builder] and returns the
[`Value`][cellsheaf_nn.builder.Value] of its output. Its signature is

* ``fn(b, module, *args, **kwargs)`` for a module type (``@register(nn.Linear)``),
* ``fn(b, *args, **kwargs)`` for a function (``@register(operator.add)``),
* ``fn(b, self, *args, **kwargs)`` for a tensor method (``@register("relu")`` or
  ``@register(torch.Tensor.relu)``),

where tensor arguments arrive as [`Value`][cellsheaf_nn.builder.Value] handles and everything else
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

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellsheaf import maps as M

from .builder import Builder, Param, Value

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
        name = getattr(t, "__name__", repr(t))
        for prefix, home in (("torch", torch), ("torch.nn.functional", F), ("operator", operator)):
            if getattr(home, name, None) is t:
                return f"{prefix}.{name}"
            alias = next((n for n, obj in vars(home).items() if obj is t and not n.startswith("_")), None)
            if alias is not None:  # F.logsigmoid is torch._C._nn.log_sigmoid
                return f"{prefix}.{alias}"
        return f"{(getattr(t, '__module__', None) or 'torch').lstrip('_')}.{name}"

    @property
    def group(self) -> str:
        """``"modules"``, ``"functions"`` or ``"tensor methods"``: what kind of target this compiles."""
        if isinstance(self.target, type):
            return "modules"
        return "tensor methods" if self.label.startswith("Tensor.") else "functions"


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


def supported_ops(grouped: bool = False) -> list[str] | dict[str, list[str]]:
    """Readable names of every target with a compiler, sorted; with ``grouped=True`` a mapping
    ``{"modules": [...], "functions": [...], "tensor methods": [...]}``.

    Modules are ``nn.Module`` classes (``"Conv2d"``; subclasses inherit their compiler), functions are
    named where torch users call them (``"torch.matmul"``, ``"torch.nn.functional.gelu"``,
    ``"operator.add"`` for ``+``), tensor methods as ``"Tensor.view"``. Compilers registered with
    `register` are listed too.

    Examples
    --------
    >>> import cellsheaf_nn as csnn
    >>> "Linear" in csnn.supported_ops()
    True
    >>> ops = csnn.supported_ops(grouped=True)
    >>> "Conv2d" in ops["modules"], "torch.matmul" in ops["functions"], "Tensor.transpose" in ops["tensor methods"]
    (True, True, True)
    """
    if not grouped:
        return sorted({c.label for c in _REGISTRY.values()})
    out: dict[str, set[str]] = {"modules": set(), "functions": set(), "tensor methods": set()}
    for c in _REGISTRY.values():
        out[c.group].add(c.label)
    return {k: sorted(v) for k, v in out.items()}


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
    """A constant broadcast to one sample of ``x``, flattened (a Python number is read in float64, exactly)."""
    c = c if isinstance(c, Tensor) else torch.as_tensor(c, dtype=torch.float64)
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
    params = [(t, c) for t, c in terms if isinstance(t, Param)]
    if params:  # a learned shift: x + p through the ones block, p held by the map
        (x, cx), (p, cp) = values[0], params[0]
        if len(terms) != 2 or cx != 1 or cp != 1 or not _broadcasts(p.tensor, x.shape):
            raise UnsupportedOpError(f"{what} with the learned parameter {p.name!r} of shape {tuple(p.tensor.shape)}: "
                                     f"only x + p with p broadcasting to one sample of shape {x.shape} is supported")
        return b.affine(x, M.Identity(x.dim), b.use(p), kind="affine", trainable=False, shape=x.shape)
    x = values[0][0]
    consts = [_constant(t, x, what).to(b.dtype) * c for t, c in terms if not isinstance(t, Value)]
    const = sum(consts[1:], consts[0]) if consts else None
    if len(values) == 1:
        c = values[0][1]
        return b.affine(x, M.Scaled(c, x.dim), const, kind="affine" if const is not None else "scale",
                        trainable=False, shape=x.shape)
    return b.combine([t for t, _ in values], [None if c == 1 else c * torch.eye(t.dim) for t, c in values],
                     const)


def _broadcasts(t: Tensor, shape: tuple[int, ...]) -> bool:
    """Whether ``t`` broadcasts to one sample of ``shape`` (as torch broadcasts it against ``(B, *shape)``)."""
    try:
        M.Diagonal(t, shape)
    except ValueError:
        return False
    return True


def _spread(bias: Tensor | None, shape: tuple[int, ...], axis: int) -> Tensor | None:
    """A constant bias with one value per entry of ``axis`` spread over ``shape`` (flattened); a learned
    parameter as it is (its map broadcasts it, so that the parameter itself learns)."""
    if bias is None or isinstance(bias, nn.Parameter):
        return bias
    view = [1] * len(shape)
    view[axis] = -1
    return bias.reshape(view).expand(shape).reshape(-1)


# ---------------------------------------------------------------------------- modules


@register(nn.Linear, prefix="z", layer=True)
def linear(b: Builder, module: nn.Linear, x: Value) -> Value:
    """``z = W x + b``: a weight edge ``(W | diag(b))`` (Eqs. 10, 15) holding the module's own weight and bias
    ([`cellsheaf.maps.Affine`][cellsheaf.maps.Affine]); on ``(..., T, D)`` the same map on every token
    ([`cellsheaf.maps.TokenLinear`][cellsheaf.maps.TokenLinear]). The parameters are trained by the local
    rule ([`cellsheaf.learning.local_gradients`][cellsheaf.learning.local_gradients]), summed over the uses of a module used more than once (tied
    weights); a frozen one (``requires_grad=False``) stays a constant."""
    W, bias = b.parameter(module, "weight"), b.parameter(module, "bias")
    if len(x.shape) == 1:
        return b.affine(x, M.Linear(W), bias, trainable=False)
    shape = (*x.shape[:-1], module.out_features)
    return b.affine(x, M.TokenLinear(W, math.prod(x.shape[:-1])), _spread(bias, shape, -1), trainable=False,
                    shape=shape, bias_axis=-1)


@register(nn.BatchNorm1d, prefix="bn")
@register(nn.BatchNorm2d, prefix="bn")
def batchnorm(b: Builder, module: nn.BatchNorm1d | nn.BatchNorm2d, x: Value) -> Value:
    """Eval-mode batch norm over channels (axis 0 of ``(C,)``, ``(C, L)`` or ``(C, H, W)``):
    ``y = γ ⊙ (x − mean)/√(var + ε) + β``, one fixed affine edge ([`cellsheaf.maps.Diagonal`][cellsheaf.maps.Diagonal] centred at the
    running mean) holding the learned ``γ`` and ``β``; the running statistics stay constants."""
    if module.running_mean is None:
        raise UnsupportedOpError(f"{type(module).__name__} without running statistics (track_running_stats=False) "
                                 "normalises with batch statistics even in eval mode; it has no fixed affine map")
    r = torch.rsqrt(module.running_var + module.eps)
    gamma = b.parameter(module, "weight") if module.affine else None
    beta = b.parameter(module, "bias") if module.affine else None
    A = M.Diagonal(torch.ones_like(r) if gamma is None else gamma, x.shape, axis=0, factor=r)
    return b.affine(x, A, _spread(torch.zeros_like(r) if beta is None else beta, x.shape, 0), kind="affine",
                    trainable=False, shape=x.shape, bias_axis=0, center=_spread(module.running_mean, x.shape, 0))


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
    """Softmax along the module's dim."""
    return b.activation(x, _softmax_map(x, module.dim if module.dim is not None else -1, False))


@register(nn.Identity)
def identity_module(b: Builder, module: nn.Module, x: Value, *args, **kwargs) -> Value:
    """No computation: the output is the input's vertex."""
    return b.alias(x)


_register_all((nn.Dropout, nn.AlphaDropout, nn.Dropout1d, nn.Dropout2d), identity_module)  # eval semantics: the identity


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
    """Softmax along ``dim``."""
    return b.activation(x, _softmax_map(x, dim, False))


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
    """Multiplication by a constant (number or tensor broadcast to one sample): a diagonal ``scale`` edge;
    the product of two quantities (a gate): a merge vertex and a [`Product`][cellsheaf.maps.Product] edge."""
    if isinstance(x, Value) and isinstance(y, Value):  # a gate: x ⊙ y through a merge vertex
        _same_shape(x, y, "the product")
        return _pair(b, x, y, M.Product(x.dim), x.shape)
    v, c = (x, y) if isinstance(x, Value) else (y, x)
    if isinstance(c, Param):  # a learned scale or gate: a diagonal map holding the parameter itself
        p = c.tensor
        if not _broadcasts(p, v.shape):
            raise UnsupportedOpError(f"a learned parameter {c.name!r} of shape {tuple(p.shape)} multiplying a "
                                     f"quantity of per-sample shape {v.shape}: it must broadcast to one sample")
        return b.affine(v, M.Diagonal(b.use(c), shape=v.shape), kind="scale", trainable=False, shape=v.shape)
    return b.affine(v, M.Diagonal(_constant(c, v, "mul").to(b.dtype)), kind="scale", trainable=False, shape=v.shape)


@register(operator.truediv)
@register(torch.div)
@register("div")
def div(b: Builder, x: Value, y) -> Value:
    """Division by a constant, or ``x / y`` of two quantities (a merge vertex and a [`Quotient`][cellsheaf.maps.Quotient] edge)."""
    if isinstance(y, Value):
        _same_shape(x, y, "the quotient")
        return _pair(b, x, y, M.Quotient(x.dim), x.shape)
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


# ---------------------------------------------------------------------------- the model zoo: structured ops


@register(nn.Conv1d, prefix="z", layer=True)
@register(nn.Conv2d, prefix="z", layer=True)
def conv(b: Builder, module: nn.Conv1d | nn.Conv2d, x: Value) -> Value:
    """A convolution: the matrix-free [`cellsheaf.maps.Conv1d`][cellsheaf.maps.Conv1d]/[`Conv2d`][cellsheaf.maps.Conv2d] with its bias through a ones block."""
    if module.padding_mode != "zeros":
        raise UnsupportedOpError(f"{type(module).__name__}(padding_mode={module.padding_mode!r}): only zero "
                                 "padding is supported")
    cls = M.Conv1d if isinstance(module, nn.Conv1d) else M.Conv2d
    F = cls(b.parameter(module, "weight"), in_shape=x.shape, stride=module.stride, padding=module.padding,
            dilation=module.dilation, groups=module.groups)
    bias = _spread(b.parameter(module, "bias"), F.out_shape, 0)
    return b.affine(x, F, bias, trainable=False, shape=F.out_shape, bias_axis=0)


def _pool_args(module, what: str) -> None:
    if getattr(module, "ceil_mode", False) or getattr(module, "divisor_override", None) is not None \
            or getattr(module, "return_indices", False):
        raise UnsupportedOpError(f"{what} with ceil_mode, divisor_override or return_indices is not supported")


@register(nn.AvgPool1d)
@register(nn.AvgPool2d)
def avg_pool(b: Builder, module: nn.AvgPool1d | nn.AvgPool2d, x: Value) -> Value:
    """Average pooling: a fixed linear map ([`cellsheaf.maps.AvgPool1d`][cellsheaf.maps.AvgPool1d]/[`AvgPool2d`][cellsheaf.maps.AvgPool2d])."""
    _pool_args(module, type(module).__name__)
    cls = M.AvgPool1d if isinstance(module, nn.AvgPool1d) else M.AvgPool2d
    F = cls(module.kernel_size, x.shape, module.stride, module.padding, module.count_include_pad)
    return b.affine(x, F, kind="pool", trainable=False, shape=F.out_shape)


@register(nn.AdaptiveAvgPool1d)
@register(nn.AdaptiveAvgPool2d)
def adaptive_avg_pool(b: Builder, module, x: Value) -> Value:
    """Adaptive average pooling: a fixed linear map."""
    cls = M.AdaptiveAvgPool1d if isinstance(module, nn.AdaptiveAvgPool1d) else M.AdaptiveAvgPool2d
    F = cls(module.output_size, x.shape)
    return b.affine(x, F, kind="pool", trainable=False, shape=F.out_shape)


@register(nn.MaxPool1d, prefix="a")
@register(nn.MaxPool2d, prefix="a")
def max_pool(b: Builder, module, x: Value) -> Value:
    """Max pooling: a piecewise-linear selection map (kinks like ReLU's)."""
    _pool_args(module, type(module).__name__)
    cls = M.MaxPool1d if isinstance(module, nn.MaxPool1d) else M.MaxPool2d
    return b.activation(x, cls(module.kernel_size, x.shape, module.stride, module.padding, module.dilation),
                        kind="pool")


@register(nn.LayerNorm, prefix="ln")
def layer_norm(b: Builder, module: nn.LayerNorm, x: Value) -> Value:
    """Layer norm over the trailing axes: a nonlinear map on the stalk."""
    return b.activation(x, M.LayerNorm(x.shape, module.normalized_shape, b.parameter(module, "weight"),
                                       b.parameter(module, "bias"), module.eps), kind="norm")


@register(nn.RMSNorm, prefix="ln")
def rms_norm(b: Builder, module: nn.RMSNorm, x: Value) -> Value:
    """RMS norm over the trailing axes: a nonlinear map on the stalk."""
    return b.activation(x, M.RMSNorm(x.shape, module.normalized_shape, b.parameter(module, "weight"), None,
                                     module.eps), kind="norm")


@register(nn.GroupNorm, prefix="ln")
def group_norm(b: Builder, module: nn.GroupNorm, x: Value) -> Value:
    """Group norm over ``(C, *spatial)``: a nonlinear map on the stalk."""
    return b.activation(x, M.GroupNorm(x.shape, module.num_groups, b.parameter(module, "weight"),
                                       b.parameter(module, "bias"), module.eps), kind="norm")


def _smooth_module(b: Builder, module: nn.Module, x: Value) -> Value:
    """An elementwise activation module (GELU, SiLU, ELU, Softplus, ...): `cellsheaf.maps.activation`."""
    return b.activation(x, M.activation(module, x.dim))


_register_all((nn.GELU, nn.SiLU, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.Hardswish,
               nn.Hardsigmoid, nn.ReLU6, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink), _smooth_module, prefix="a")


def _smooth_fn(name: str, options: Callable[..., dict]) -> Callable[..., Value]:
    def compile_fn(b: Builder, x: Value, *args, **kwargs) -> Value:
        return b.activation(x, M.Activation(name, x.dim, options(*args, **kwargs)))

    compile_fn.__doc__ = f"Elementwise {name}."
    return compile_fn


def _no_options(*args, **kwargs) -> dict:
    return {}


@register(F.gelu, prefix="a")
def gelu_fn(b: Builder, x: Value, approximate: str = "none") -> Value:
    """``F.gelu`` (exact or ``approximate="tanh"``)."""
    return b.activation(x, M.Activation("gelu_tanh" if approximate == "tanh" else "gelu", x.dim))


_register_all((F.silu, "silu"), _smooth_fn("silu", _no_options), prefix="a")
_register_all((F.mish, "mish"), _smooth_fn("mish", _no_options), prefix="a")
_register_all((F.softplus, "softplus"),
              _smooth_fn("softplus", lambda beta=1.0, threshold=20.0: {"beta": beta, "threshold": threshold}),
              prefix="a")
_register_all((F.elu, "elu"), _smooth_fn("elu", lambda alpha=1.0, inplace=False: {"alpha": alpha}), prefix="a")
_register_all((F.logsigmoid,), _smooth_fn("logsigmoid", _no_options), prefix="a")
_register_all((F.hardswish,), _smooth_fn("hardswish", lambda inplace=False: {}), prefix="a")
_register_all((F.relu6,), _smooth_fn("relu6", lambda inplace=False: {}), prefix="a")


def _softmax_map(x: Value, dim: int | None, log: bool) -> M.Map:
    """Softmax (or log-softmax) of a ``(B, *shape)`` tensor along ``dim`` (not the batch axis)."""
    if dim is None:
        raise UnsupportedOpError("softmax without dim: give the axis explicitly")
    axis = dim - 1 if dim > 0 else dim
    if dim == 0 or not -len(x.shape) <= axis < len(x.shape):
        raise UnsupportedOpError(f"softmax over dim={dim}: only axes after the batch axis are supported")
    if len(x.shape) == 1 and not log:
        return M.Softmax(x.dim)
    return M.SoftmaxAlong(x.shape, axis, log)


@register(nn.LogSoftmax, prefix="a")
def log_softmax_module(b: Builder, module: nn.LogSoftmax, x: Value) -> Value:
    """Log-softmax along the module's dim."""
    return b.activation(x, _softmax_map(x, module.dim, True))


@register(torch.log_softmax, prefix="a")
@register(F.log_softmax, prefix="a")
@register("log_softmax", prefix="a")
def log_softmax_fn(b: Builder, x: Value, dim: int | None = None, *args, **kwargs) -> Value:
    """Log-softmax along ``dim``."""
    return b.activation(x, _softmax_map(x, dim, True))


# ---------------------------------------------------------------------------- shape ops: coordinate selections


def _index_op(run: Callable[..., Any]) -> Callable[..., Value]:
    """The compiler of a shape op (view, permute, getitem, chunk, ...): each output coordinate copies one input
    coordinate, found by running the op on coordinate numbers. No vertex for a plain reshape, a `Select`
    edge otherwise."""

    def compile_fn(b: Builder, x: Value, *args, **kwargs):
        if any(isinstance(a, Value) for a in (*args, *kwargs.values())):
            raise UnsupportedOpError("a shape op with a network quantity as an argument")
        n = x.dim
        numbers = torch.arange(2 * n, dtype=torch.float64).reshape(2, *x.shape)  # two samples: keep the batch
        out = run(numbers, *args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        values = []
        for t in outs:
            if not isinstance(t, Tensor) or t.dim() < 1 or t.shape[0] != 2 or not bool((t[1] - t[0] == n).all()):
                raise UnsupportedOpError("the op mixes the batch axis with the others; only ops that keep the "
                                         "batch axis first are supported")
            idx = t[0].reshape(-1).long()
            shape = tuple(t.shape[1:])
            if len(idx) == n and bool((idx == torch.arange(n)).all()):
                values.append(Value(x.vertex, n, shape))  # a reshape: the same coordinates
            else:
                values.append(b.select(x, idx, shape))
        return tuple(values) if isinstance(out, (tuple, list)) else values[0]

    return compile_fn


def _method(name: str) -> Callable[..., Any]:
    def run(t, *args, **kwargs):
        return getattr(t, name)(*args, **kwargs)

    return run


for _name in ("view", "reshape", "flatten", "unflatten", "permute", "transpose", "unsqueeze", "squeeze",
              "contiguous", "chunk", "split", "narrow", "select", "expand", "repeat", "movedim", "swapaxes"):
    register(_name)(_index_op(_method(_name)))
for _fn in (torch.reshape, torch.flatten, torch.permute, torch.transpose, torch.unsqueeze, torch.squeeze,
            torch.chunk, torch.split, torch.narrow, torch.movedim, operator.getitem):
    register(_fn)(_index_op(_fn))


@register(nn.Flatten)
def flatten_module(b: Builder, module: nn.Flatten, x: Value) -> Value:
    """``nn.Flatten``: a reshape (no vertex) when it keeps the batch axis."""
    return _index_op(module)(b, x)


@register(nn.Unflatten)
def unflatten_module(b: Builder, module: nn.Unflatten, x: Value) -> Value:
    """``nn.Unflatten``: a reshape (no vertex)."""
    return _index_op(module)(b, x)


def _reduction(mean: bool, what: str) -> Callable[..., Value]:
    """``sum``/``mean`` over per-sample axes: a sparse linear map (each input coordinate adds to one output)."""

    def compile_fn(b: Builder, x: Value, dim=None, keepdim: bool = False, *, dtype=None) -> Value:
        dims = [dim] if isinstance(dim, int) else list(dim or [])
        if not dims or any(d % (len(x.shape) + 1) == 0 for d in dims):
            raise UnsupportedOpError(f"{what} over the batch axis (give dim= of the per-sample axes)")
        n = x.dim
        ones = torch.ones(1, *x.shape)
        kept = tuple(ones.sum(dim, keepdim=True).shape[1:])
        shape = tuple(ones.sum(dim, keepdim=keepdim).shape[1:])
        m = math.prod(shape)
        rows = torch.arange(m).reshape(kept).expand(x.shape).reshape(-1)
        vals = torch.full((n,), m / n if mean else 1.0, dtype=b.dtype)
        A = torch.sparse_coo_tensor(torch.stack([rows, torch.arange(n)]), vals, (m, n)).coalesce()
        return b.affine(x, M.Linear(A), kind="reduce", trainable=False, shape=shape)

    compile_fn.__doc__ = f"``{what}`` over per-sample axes: a fixed sparse linear map."
    return compile_fn


_register_all((torch.sum, "sum"), _reduction(False, "sum"))
_register_all((torch.mean, "mean"), _reduction(True, "mean"))


# ---------------------------------------------------------------------------- products of two quantities


def _pair(b: Builder, x: Value, y: Value, F: M.Map, shape: Sequence[int], role: str | None = None) -> Value:
    """``f(x, y)`` through a merge vertex ``[x; y]`` and one ``product`` edge with the two-block map ``F``
    (docs: Architecture, "Skip connections": ``δ_Ω`` stays square and unitriangular). With ``role``, the two
    vertices are labelled ``role`` and ``"{role}.in"`` ([`Builder.label`][cellsheaf_nn.builder.Builder.label])."""
    m = b.concat([x, y], kind="merge")
    out = b.vertex(F.d_out, kind="product", shape=tuple(shape))
    b.edge(m, out, F, kind="product")
    if role:
        b.label(m, f"{role}.in")
        b.label(out, role)
    return out


def _same_shape(x: Value, y: Value, what: str) -> None:
    if x.shape != y.shape:
        raise UnsupportedOpError(f"{what} of quantities of per-sample shapes {x.shape} and {y.shape}: only equal "
                                 "shapes are supported (expand the smaller one first)")


@register(torch.matmul)
@register(operator.matmul)
@register(torch.bmm)
@register("matmul")
@register("bmm")
def matmul(b: Builder, x, y) -> Value:
    """``x @ y`` of two network quantities (attention scores, ``att @ v``): a merge vertex and a [`MatMul`][cellsheaf.maps.MatMul] edge."""
    if not (isinstance(x, Value) and isinstance(y, Value)):
        raise UnsupportedOpError("matmul with a constant matrix: use nn.Linear (a constant is not trainable)")
    return _matmul(b, x, y)


def _matmul(b: Builder, x: Value, y: Value, role: str | None = None) -> Value:
    F = M.MatMul(x.shape, y.shape)
    return _pair(b, x, y, F, F.out_shape, role)


@register(torch.where)
def where(b: Builder, condition, x, y) -> Value:
    """``torch.where(mask, x, y)`` with a constant mask: a coordinate selection from ``[x; y]``."""
    if isinstance(condition, Value) or not (isinstance(x, Value) and isinstance(y, Value)):
        raise UnsupportedOpError("torch.where needs a constant mask and two network quantities")
    _same_shape(x, y, "torch.where")
    mask = torch.broadcast_to(torch.as_tensor(condition, dtype=torch.bool), (1, *x.shape)).reshape(-1)
    return _pair(b, x, y, M.Where(mask), x.shape)


@register(nn.MultiheadAttention)
def multihead_attention(b: Builder, module: nn.MultiheadAttention, query: Value, key: Value, value: Value,
                        key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                        average_attn_weights: bool = True, is_causal: bool = False):
    """``nn.MultiheadAttention`` (``batch_first=True``, no masks) expanded into per-token linear maps, head
    reshapes, [`MatMul`][cellsheaf.maps.MatMul] edges for ``q kᵀ`` and ``att v``, and a softmax along the keys. Returns
    ``(output, None)``: the attention weights are not an output."""
    if not module.batch_first or key_padding_mask is not None or attn_mask is not None or is_causal \
            or module.bias_k is not None or module.add_zero_attn or not module._qkv_same_embed_dim:
        raise UnsupportedOpError("MultiheadAttention is supported with batch_first=True, no masks, no bias_kv or "
                                 "zero attention, and equal query/key/value sizes")
    E, H = module.embed_dim, module.num_heads
    d = E // H
    W, bias = b.parameter(module, "in_proj_weight"), b.parameter(module, "in_proj_bias")
    packed: dict[tuple, Value] = {}  # the packed projection [q; k; v] of each distinct input, made once

    def project(x: Value, k: int) -> Value:
        T = x.shape[0]
        if (x.vertex, x.shape) not in packed:  # the in-projection holds the whole parameter
            packed[(x.vertex, x.shape)] = b.label(b.affine(x, M.TokenLinear(W, T), _spread(bias, (T, 3 * E), -1),
                                                           trainable=False, shape=(T, 3 * E), bias_axis=-1),
                                                  "in_proj")
        z = packed[(x.vertex, x.shape)]
        return _index_op(lambda t: t[..., k * E:(k + 1) * E].reshape(t.shape[0], T, H, d).transpose(1, 2))(b, z)

    q, k, v = project(query, 0), project(key, 1), project(value, 2)
    kt = _index_op(lambda t: t.transpose(-2, -1))(b, k)
    scores = b.label(mul(b, _matmul(b, q, kt, "scores"), 1.0 / math.sqrt(d)), "scaled_scores")
    att = b.label(b.activation(scores, M.SoftmaxAlong(scores.shape, -1), kind="act"), "softmax")
    heads = _matmul(b, att, v, "weighted_sum")  # (H, T, d)
    T = heads.shape[1]
    merged = b.label(_index_op(lambda t: t.transpose(1, 2).reshape(t.shape[0], T, E))(b, heads), "heads")
    ob = _spread(b.parameter(module, "out_proj.bias"), (T, E), -1)
    out = b.affine(merged, M.TokenLinear(b.parameter(module, "out_proj.weight"), T), ob, trainable=False,
                   shape=(T, E), bias_axis=-1)
    return out, None
