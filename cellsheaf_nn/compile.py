"""Compile a torch model into a neural sheaf: ``csnn.compile(model) -> NeuralSheaf``.

The compiler walks the model in eval semantics, one operation at a time, and
hands each to its registered op compiler (`cellsheaf_nn.ops`):

* a module with a compiler (``Linear``, ``ReLU``, a registered custom module) is compiled as one op;
* an ``nn.Sequential`` is compiled child by child, without tracing;
* any other module is traced with ``torch.fx`` (registered modules stay leaves)
  and its graph compiled node by node: ``call_module``, ``call_function`` and
  ``call_method`` nodes go to their compilers; shape queries and constants are
  evaluated.

Alongside, the real operations run on a small probe batch, which gives every
quantity its shape and checks each compiler's output size.

Vertex names
------------
``x`` is the input. An op registered with a prefix names its output after the
quantity and the layer ``ℓ`` (incremented at each ``Linear``): ``z{ℓ}`` for
Linear outputs, ``a{ℓ}`` for activations, ``bn{ℓ}`` for BatchNorm. An
activation that produces the model's output is renamed ``y`` (its edge becomes
the output edge ``out:y``); otherwise the output is the last ``z{k+1}``. Other
ops are named after the torch.fx node (``add``, ``cat``, ``add_1``, ...) or,
inside an ``nn.Sequential``, after the module class in lower case. Auxiliary
vertices of an op take its name plus a suffix (``add.in`` for the merge vertex
of ``add``). Names are made unique with ``_1``, ``_2``, ...

Edge names are ``"{kind}:{target vertex}"``: ``weight:z1``, ``act:a1``,
``out:y``, ``affine:bn1``, ``merge:add.in.0``, ``sum:add``, ``penalty:a1``.

Examples
--------
>>> import torch, cellsheaf_nn as csnn
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1), torch.nn.Sigmoid())
>>> ns = csnn.compile(model, dtype=torch.float64)
>>> ns.sheaf.vertices
['x', 'z1', 'a1', 'z2', 'y']
>>> ns.sheaf.edges
['weight:z1', 'act:a1', 'weight:z2', 'out:y']
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from .builder import Builder, Value
from .neural import NeuralSheaf
from .ops import HOW_TO_REGISTER, OpCompiler, UnsupportedOpError, lookup, supported_ops

__all__ = ["compile", "CompileError"]

_PROBE_BATCH = 2


class CompileError(RuntimeError):
    """The model cannot be compiled (untraceable, several inputs or outputs, unknown input size, ...)."""


@dataclass(frozen=True)
class _Q:
    """A quantity during compilation: its sheaf value (or a constant) and its value on the probe batch."""

    value: Any
    probe: Any


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps modules with a registered compiler as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return lookup(m) is not None or super().is_leaf_module(m, qualname)


def _unsupported(what: str) -> UnsupportedOpError:
    return UnsupportedOpError(f"{what} has no op compiler. Supported: {', '.join(supported_ops())}.\n"
                              f"To support it, {HOW_TO_REGISTER}")


class _Compiler:
    """Walks a model, keeps the layer counter and the names, and drives the builder."""

    def __init__(self, dtype: torch.dtype):
        self.b = Builder(dtype)
        self.names: set[str] = set()
        self.layer = 0

    def unique(self, name: str) -> str:
        out, k = name, 1
        while out in self.names:
            out, k = f"{name}_{k}", k + 1
        self.names.add(out)
        return out

    # ------------------------------------------------------------------ modules
    def module(self, module: nn.Module, path: str, args: list[_Q]) -> _Q:
        comp = lookup(module)
        where = f"module {path or '<root>'!r} ({type(module).__name__})"
        if comp is not None:
            return self.emit(comp, where, type(module).__name__.lower(), path, (module,), args, {}, module)
        if type(module).forward is nn.Sequential.forward:
            for name, child in module._modules.items():  # every position: a module reused twice runs twice
                args = [self.module(child, f"{path}.{name}" if path else name, args)]
            return args[0]
        if _is_torch_leaf(module):
            raise _unsupported(where)
        return self.graph(module, path, args)

    def graph(self, module: nn.Module, path: str, args: list[_Q]) -> _Q:
        try:
            graph = _Tracer().trace(module)
        except Exception as err:
            raise CompileError(
                f"torch.fx could not trace module {path or '<root>'!r} ({type(module).__name__}): "
                f"{type(err).__name__}: {err}\nData-dependent control flow cannot be traced. Make the offending "
                f"part a module of its own and {HOW_TO_REGISTER}") from err
        gm = fx.GraphModule(module, graph)
        env: dict[fx.Node, _Q] = {}
        inputs = iter(args)
        for node in graph.nodes:
            if node.op == "placeholder":
                try:
                    env[node] = next(inputs)
                except StopIteration:
                    raise CompileError(f"module {path or '<root>'!r} takes more inputs than it is given; "
                                       "only models with one input tensor are supported") from None
            elif node.op == "get_attr":
                const = _fetch_attr(gm, node.target)
                env[node] = _Q(const, const)
            elif node.op == "output":
                out = env[node.args[0]] if isinstance(node.args[0], fx.Node) else None
                if out is None or not isinstance(out.value, Value):
                    raise CompileError(f"module {path or '<root>'!r} must return one tensor computed from its "
                                       "input; several outputs or constant outputs are not supported")
                return out
            else:
                env[node] = self.node(gm, node, path, env)
        raise CompileError(f"module {path or '<root>'!r}: the traced graph has no output")  # pragma: no cover

    # ------------------------------------------------------------------ fx nodes
    def node(self, gm: fx.GraphModule, node: fx.Node, path: str, env: dict) -> _Q:
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        has_value = any(isinstance(q.value, Value) for q in _leaves((args, kwargs)))
        sub = f"{path}.{node.target}" if path and node.op == "call_module" else str(node.target)
        if node.op == "call_module":  # a leaf: a registered module or a torch.nn module
            module = gm.get_submodule(node.target)
            comp = lookup(module)
            where = f"module {sub!r} ({type(module).__name__})"
            if comp is None:
                raise _unsupported(where)
            return self.emit(comp, where, node.name, sub, (module,), args, kwargs, module)
        if node.op == "call_method":
            run = _method_runner(node.target)
            where, comp = f"method Tensor.{node.target} (node {node.name!r})", lookup(node.target)
        else:
            run = node.target
            where = f"function {getattr(node.target, '__name__', node.target)} (node {node.name!r})"
            comp = lookup(node.target)
        probe = _run(run, _probe(args), _probe(kwargs), where)
        if not has_value or not isinstance(probe, Tensor):
            return _Q(probe, probe)  # a constant, or a shape query such as x.size(0)
        if comp is None:
            raise _unsupported(where)
        return self.emit(comp, where, node.name, None, (), args, kwargs, run, probe)

    # ------------------------------------------------------------------ one op
    def emit(self, comp: OpCompiler, where: str, name: str, path: str | None, head: tuple,
             args: Sequence, kwargs: dict, run, probe: Any = None) -> _Q:
        """Run the op on the probes, call its compiler, check the output size and name the new vertex."""
        if probe is None:
            probe = _run(run, _probe(args), _probe(kwargs), where)
        if comp.layer:
            self.layer += 1
        b = self.b
        b.layer, b.module = self.layer or None, path
        mark = b.n_vertices
        try:
            out = comp.fn(b, *head, *_values(args), **_values(kwargs))
        except UnsupportedOpError as err:
            raise UnsupportedOpError(f"{where}: {err}") from None
        if not isinstance(out, Value):
            raise CompileError(f"the op compiler {comp.fn.__qualname__} for {where} returned "
                               f"{type(out).__name__}, not a csnn.Value")
        if not isinstance(probe, Tensor) or probe.dim() < 1:
            raise CompileError(f"{where} does not return a batched tensor; it cannot be a network quantity")
        shape = tuple(probe.shape[1:])
        if out.dim != math.prod(shape):
            raise CompileError(f"the op compiler {comp.fn.__qualname__} for {where} returned a quantity of size "
                               f"{out.dim}, but the op outputs per-sample shape {shape}")
        out = Value(out.vertex, out.dim, shape)
        if out.vertex >= mark:
            base = f"{comp.prefix}{self.layer}" if comp.prefix else name
            b.name(out, self.unique(base), since=mark)
        return _Q(out, probe)


def _leaves(tree) -> list[_Q]:
    out: list[_Q] = []
    fx.node.map_aggregate(tree, lambda a: out.append(a) if isinstance(a, _Q) else None)
    return out


def _probe(tree):
    return fx.node.map_aggregate(tree, lambda a: a.probe if isinstance(a, _Q) else a)


def _values(tree):
    return fx.node.map_aggregate(tree, lambda a: a.value if isinstance(a, _Q) else a)


def _method_runner(name: str):
    def run(self, *args, **kwargs):
        return getattr(self, name)(*args, **kwargs)

    return run


def _run(fn, args, kwargs, where: str):
    try:
        with torch.no_grad():
            return fn(*args, **kwargs)
    except Exception as err:
        raise CompileError(f"running {where} on a probe batch failed: {type(err).__name__}: {err}. "
                           "Is input_shape right?") from err


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj.detach() if isinstance(obj, Tensor) else obj


def _is_torch_leaf(module: nn.Module) -> bool:
    """A module from torch.nn that torch.fx would not trace into."""
    return type(module).__module__.startswith("torch.nn") and not isinstance(
        module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def _default_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _guess_input_shape(model: nn.Module) -> tuple[int, ...]:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return (m.in_features,)
        if isinstance(m, nn.BatchNorm1d):
            return (m.num_features,)
    raise CompileError(f"cannot tell the input size of {type(model).__name__} (no Linear or BatchNorm1d to read "
                       "it from); pass input_shape=(n_in,) — the per-sample shape, without the batch axis")


def compile(
    model: nn.Module,
    dtype: torch.dtype | None = None,
    *,
    input_shape: Sequence[int] | None = None,
) -> NeuralSheaf:
    """Compile ``model`` into a `NeuralSheaf` (the paper's construction, Sec. 3.1).

    Parameters
    ----------
    model : nn.Module
        An ``nn.Sequential`` or any module torch.fx can trace, with one input and
        one output tensor. It is copied and put in eval mode (dropout off,
        batch norm with running statistics); the original is not touched.
    dtype : torch dtype, optional
        Dtype of the sheaf's maps (default: the model's parameter dtype).
    input_shape : sequence of int, optional
        Per-sample input shape (no batch axis). Default: ``(in_features,)`` of the
        first ``Linear`` (or ``BatchNorm1d``).

    Returns
    -------
    NeuralSheaf
        The sheaf, its boundary (input and ones blocks), the vertex/edge layout,
        inference, pins and `to_module`.

    Raises
    ------
    UnsupportedOpError
        An op without a compiler (the message lists the supported ops and how to register one).
    CompileError
        An untraceable model, several inputs/outputs, an unknown input size.

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).double()
    >>> ns = csnn.compile(model)
    >>> x = torch.randn(5, 4, dtype=torch.float64)
    >>> torch.allclose(ns.infer(x), model(x))
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile() takes a torch.nn.Module, got {type(model).__name__}")
    dtype = dtype or _default_dtype(model)
    model = copy.deepcopy(model).eval().to(dtype)
    shape = tuple(int(s) for s in input_shape) if input_shape is not None else _guess_input_shape(model)
    probe = torch.randn(_PROBE_BATCH, *shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    c = _Compiler(dtype)
    x = c.b.input(math.prod(shape), shape, name=c.unique("x"))
    out = c.module(model, "", [_Q(x, probe)])
    y: Value = out.value
    if y.vertex == x.vertex:
        raise CompileError(f"{type(model).__name__} returns its input unchanged: there is nothing to compile")
    if c.b.kind(y) == "act":
        c.b.set_kind(y, "out")
        c.b.name(y, "y" if "y" not in c.names else c.unique("y"))
    built = c.b.finish()
    return NeuralSheaf(built, model=model, input_vertex="x", output=c.b.named(y), output_shape=y.shape,
                       input_shape=shape)
