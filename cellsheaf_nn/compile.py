"""Compile a torch model into a neural sheaf: ``csnn.compile(model) -> NeuralSheaf``.

The compiler walks the model in eval semantics, one operation at a time, and
hands each to its registered op compiler ([`cellsheaf_nn.ops`][cellsheaf_nn.ops]):

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
import operator
import os
import traceback
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from .builder import Builder, Param, Value
from .neural import NeuralSheaf
from .ops import HOW_TO_REGISTER, OpCompiler, UnsupportedOpError, lookup, supported_ops

__all__ = ["compile", "CompileError"]

_PROBE_BATCH = 2


class CompileError(RuntimeError):
    """The model cannot be compiled (untraceable, unknown input size, integer inputs, ...)."""


@dataclass(frozen=True)
class _Q:
    """A quantity during compilation: its sheaf value (or a constant) and its value on the probe batch."""

    value: Any
    probe: Any


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps modules with a registered compiler as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return lookup(m) is not None or super().is_leaf_module(m, qualname)


_ELEMENTWISE_HINT = """An elementwise function f compiles as an activation edge:

    @csnn.register(MyActivation)             # or the function itself: @csnn.register(my_fn)
    def compile_my_activation(b, module, x):
        return b.activation(x, cs.maps.Function(f, x.dim, x.dim))"""


def _unsupported_message(missing: Sequence[tuple[str, str | None]]) -> str:
    """One line naming every operation that cannot be compiled, then why (for refusals) and how to fix it."""
    what = "an operation" if len(missing) == 1 else f"{len(missing)} operations"
    why = "".join(f"\n  - {where}: {reason}" for where, reason in missing if reason)
    return (f"{what} of the model cannot be compiled: {'; '.join(where for where, _ in missing)}{why}\n"
            f"Supported: {', '.join(supported_ops())}.\n{_ELEMENTWISE_HINT}\nOtherwise, {HOW_TO_REGISTER}")


def _user_line(err: BaseException) -> str:
    """``file:line: code`` of the innermost traceback frame outside torch (the line fx could not trace)."""
    root = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(root)
              and f.filename != __file__]
    if not frames:
        return "an unknown line"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


class _Compiler:
    """Walks a model, keeps the layer counter and the names, and drives the builder.

    Operations without a compiler are collected in ``missing`` (each gets a stand-in vertex of the right
    shape so that the walk goes on) and reported together at the end.
    """

    def __init__(self, dtype: torch.dtype):
        self.b = Builder(dtype)
        self.names: set[str] = set()
        self.layer = 0
        self.missing: list[tuple[str, str | None]] = []  # (operation, why its compiler refused it)

    def unique(self, name: str) -> str:
        out, k = name, 1
        while out in self.names:
            out, k = f"{name}_{k}", k + 1
        self.names.add(out)
        return out

    def stand_in(self, where: str, probe: Any, reason: str | None = None) -> _Q:
        """Record an operation that cannot be compiled; a vertex of its output's shape takes its place."""
        self.missing.append((where, reason))
        return self._placeholder(probe)

    def _placeholder(self, probe: Any) -> _Q:
        if isinstance(probe, (tuple, list)):
            return _Q(tuple(self._placeholder(p).value for p in probe), tuple(probe))
        if not isinstance(probe, Tensor) or probe.dim() < 1:
            raise UnsupportedOpError(_unsupported_message(self.missing))
        shape = tuple(probe.shape[1:])
        v = self.b.vertex(math.prod(shape), kind="unsupported", shape=shape)
        self.b.name(v, self.unique("unsupported"))
        return _Q(v, probe)

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
            return self.stand_in(where, _run(module, _probe(args), {}, where))
        out = self.graph(module, path, args)
        if not isinstance(out, _Q):
            raise CompileError(f"module {path!r} ({type(module).__name__}) returns several tensors; only the "
                               "model itself may (compile the part that uses them as one module)")
        return out

    def graph(self, module: nn.Module, path: str, args: list[_Q], graph: fx.Graph | None = None):
        """Compile a traced module; returns a `_Q` or, for several outputs, a tuple of them."""
        graph = graph if graph is not None else _trace(module, path)
        gm = fx.GraphModule(module, graph)
        env: dict[fx.Node, _Q] = {}
        inputs = iter(args)
        for node in graph.nodes:
            if node.op == "placeholder":
                q = next(inputs, None)
                if q is None:
                    if not node.args:
                        raise CompileError(f"module {path or '<root>'!r} takes more inputs than it is given")
                    q = _Q(node.args[0], node.args[0])  # an argument left at its default
                env[node] = q
            elif node.op == "get_attr":
                env[node] = self.attribute(gm, node.target, path)
            elif node.op == "output":
                return self.outputs(env, node.args[0], path)
            else:
                env[node] = self.node(gm, node, path, env)
        raise CompileError(f"module {path or '<root>'!r}: the traced graph has no output")  # pragma: no cover

    def attribute(self, gm: fx.GraphModule, target: str, path: str) -> _Q:
        """A ``get_attr`` node: a learned parameter becomes a parameter of the sheaf, anything else a constant."""
        obj = _fetch_attr(gm, target)
        if isinstance(obj, nn.Parameter) and obj.requires_grad:
            return _Q(Param(f"{path}.{target}" if path else target, obj), obj.detach())
        const = obj.detach() if isinstance(obj, Tensor) else obj
        return _Q(const, const)

    def outputs(self, env: dict, arg, path: str):
        if isinstance(arg, fx.Node):
            out = env[arg]
        elif isinstance(arg, (tuple, list)) and arg and all(isinstance(a, fx.Node) for a in arg):
            out = tuple(env[a] for a in arg)
        else:
            raise CompileError(f"module {path or '<root>'!r} must return a tensor or a tuple of tensors, got "
                               f"{type(arg).__name__}")
        for q in (out if isinstance(out, tuple) else (out,)):
            if not isinstance(q.value, Value):
                raise CompileError(f"module {path or '<root>'!r} returns a constant (not computed from its "
                                   "inputs); only network quantities can be outputs")
        return out

    # ------------------------------------------------------------------ fx nodes
    def node(self, gm: fx.GraphModule, node: fx.Node, path: str, env: dict) -> _Q:
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.target is operator.getitem and isinstance(args[0].value, tuple):  # one of several outputs
            i = args[1].value if isinstance(args[1], _Q) else args[1]
            return _Q(args[0].value[i], args[0].probe[i])
        has_value = any(isinstance(q.value, (Value, Param)) for q in _leaves((args, kwargs)))
        sub = f"{path}.{node.target}" if path and node.op == "call_module" else str(node.target)
        if node.op == "call_module":  # a leaf: a registered module or a torch.nn module
            module = gm.get_submodule(node.target)
            comp = lookup(module)
            where = f"module {sub!r} ({type(module).__name__})"
            if comp is None:
                return self.stand_in(where, _run(module, _probe(args), _probe(kwargs), where))
            return self.emit(comp, where, node.name, sub, (module,), args, kwargs, module)
        if node.op == "call_method":
            run = _method_runner(node.target)
            where, comp = f"method Tensor.{node.target} (node {node.name!r})", lookup(node.target)
        else:
            run = node.target
            where = f"function {getattr(node.target, '__name__', node.target)} (node {node.name!r})"
            comp = lookup(node.target)
        probe = _run(run, _probe(args), _probe(kwargs), where)
        if not has_value or not (isinstance(probe, Tensor) or isinstance(probe, (tuple, list))
                                 and any(isinstance(p, Tensor) for p in probe)):
            return _Q(probe, probe)  # a constant, or a shape query such as x.size(0)
        if comp is None:
            return self.stand_in(where, probe)
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
            return self.stand_in(where, probe, str(err))
        if isinstance(out, (tuple, list)) and isinstance(probe, (tuple, list)) and len(out) == len(probe):
            qs = [self.check(comp, where, o, p, f"{name}.{k}", mark, others=False) if o is not None
                  else _Q(None, None) for k, (o, p) in enumerate(zip(out, probe))]
            first = next(q.value for q in qs if q.value is not None)
            self.b.name(first, self.b.named(first), since=mark)  # the op's other vertices
            return _Q(tuple(q.value for q in qs), tuple(q.probe for q in qs))
        return self.check(comp, where, out, probe, name, mark)

    def check(self, comp: OpCompiler, where: str, out, probe, name: str, mark: int, others: bool = True) -> _Q:
        """Check a compiler's output against the probe, give it the probe's shape and name it (and, with
        ``others``, the other vertices the op created since ``mark``)."""
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
            self.b.set_shape(out)
        if out.vertex >= mark and self.b.named(out) is None:
            base = f"{comp.prefix}{self.layer}" if comp.prefix else name
            self.b.name(out, self.unique(base), since=mark if others else None)
        return _Q(out, probe)


def _trace(module: nn.Module, path: str) -> fx.Graph:
    try:
        return _Tracer().trace(module)
    except Exception as err:
        raise CompileError(
            f"torch.fx could not trace module {path or '<root>'!r} ({type(module).__name__}) at "
            f"{_user_line(err)}\n{type(err).__name__}: {err}\nData-dependent control flow (an if or a loop on "
            f"tensor values) cannot be traced. Make the offending part a module of its own and {HOW_TO_REGISTER}"
        ) from err


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
    return obj


def _is_torch_leaf(module: nn.Module) -> bool:
    """A module from torch.nn that torch.fx would not trace into."""
    return type(module).__module__.startswith("torch.nn") and not isinstance(
        module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def _default_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter, else of its first floating buffer, else torch's
    default dtype (``torch.get_default_dtype()``): a model with no tensors of its own has none to read."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _guess_input_shape(model: nn.Module) -> tuple[int, ...]:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return (m.in_features,)
        if isinstance(m, nn.BatchNorm1d):
            return (m.num_features,)
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            raise CompileError(f"cannot tell the input size of {type(model).__name__}: a convolution takes inputs "
                               f"of any length; pass input_shape=({m.in_channels}, H, W) (or (C, L) for Conv1d) — "
                               "the per-sample shape, without the batch axis")
    raise CompileError(f"cannot tell the input size of {type(model).__name__} (no Linear or BatchNorm1d to read "
                       "it from); pass input_shape=(n_in,) — the per-sample shape, without the batch axis")


def _check_real_inputs(model: nn.Module) -> None:
    """Integer inputs (token ids into an embedding) have no place in a sheaf of real stalks."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            raise CompileError(
                f"module {name!r} ({type(m).__name__}) reads integer token ids; a sheaf's stalks are real vectors, "
                "so integer inputs are not supported. Look the embeddings up outside the model "
                "(x = model.emb(ids)) and compile the rest of the model on x")


def _input_shapes(model: nn.Module, n_inputs: int, input_shape) -> list[tuple[int, ...]]:
    if input_shape is None:
        if n_inputs != 1:
            raise CompileError(f"{type(model).__name__} takes {n_inputs} inputs; pass input_shape=[shape_1, ..., "
                               f"shape_{n_inputs}] (per-sample shapes, without the batch axis)")
        return [_guess_input_shape(model)]
    shapes = list(input_shape)
    if all(isinstance(s, (int, torch.SymInt)) or (isinstance(s, Tensor) and s.dim() == 0) for s in shapes):
        shapes = [shapes]
    shapes = [tuple(int(d) for d in s) for s in shapes]
    if len(shapes) != n_inputs:
        raise CompileError(f"{type(model).__name__} takes {n_inputs} input(s) but input_shape gives "
                           f"{len(shapes)} shape(s): {shapes}")
    return shapes


def _root_inputs(model: nn.Module) -> tuple[list[str], fx.Graph | None]:
    """Names of the model's tensor inputs, and its traced graph (``None`` when it is not traced)."""
    if lookup(model) is not None or type(model).forward is nn.Sequential.forward:
        return ["x"], None
    graph = _trace(model, "")
    names = [n.name for n in graph.nodes if n.op == "placeholder" and not n.args]  # no default value
    return (["x"] if len(names) == 1 else names), graph


def compile(
    model: nn.Module,
    dtype: torch.dtype | None = None,
    *,
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
) -> NeuralSheaf:
    """Compile ``model`` into a [`NeuralSheaf`][cellsheaf_nn.neural.NeuralSheaf] (the paper's construction, Sec. 3.1).

    Parameters
    ----------
    model : nn.Module
        An ``nn.Sequential`` or any module torch.fx can trace, with one or several
        input tensors and a tensor or a tuple of tensors as output. It is copied and
        put in eval mode (dropout off, batch norm with running statistics); the
        original is not touched.
    dtype : torch dtype, optional
        Dtype of the sheaf's maps. Default: the dtype of the model's parameters (of its
        floating buffers if it has no parameters); a model with no tensors of its own
        (only functional and shape ops) compiles in ``torch.get_default_dtype()``, so
        pass ``dtype=torch.float64`` for such a model to infer in float64. Inputs are
        cast to this dtype.
    input_shape : sequence of int, or one per input, optional
        Per-sample input shape (no batch axis), e.g. ``(1, 28, 28)``; for a model
        with several inputs a list of shapes. Default (one input): ``(in_features,)``
        of the first ``Linear`` (or ``BatchNorm1d``).

    Returns
    -------
    NeuralSheaf
        The sheaf, its boundary (input and ones blocks), the vertex/edge layout,
        inference (``ns.infer(*inputs)`` mirrors ``model(*inputs)``), pins and
        `to_module`.

    Raises
    ------
    UnsupportedOpError
        Operations without a compiler: the message names every one of them, lists the
        supported ops and says how to register one.
    CompileError
        An untraceable model (the message names the line), an unknown input size,
        integer inputs.

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
    _check_real_inputs(model)
    names, graph = _root_inputs(model)
    shapes = _input_shapes(model, len(names), input_shape)
    gen = torch.Generator().manual_seed(0)
    c = _Compiler(dtype)
    inputs = [_Q(c.b.input(math.prod(shape), shape, name=c.unique(name)),
                 torch.randn(_PROBE_BATCH, *shape, dtype=dtype, generator=gen)) for name, shape in zip(names, shapes)]
    out = c.module(model, "", inputs) if graph is None else c.graph(model, "", inputs, graph)
    if c.missing:
        raise UnsupportedOpError(_unsupported_message(c.missing))
    outs: tuple[Value, ...] = tuple(q.value for q in (out if isinstance(out, tuple) else (out,)))
    if all(y.vertex in {q.value.vertex for q in inputs} for y in outs):
        raise CompileError(f"{type(model).__name__} returns its input unchanged: there is nothing to compile")
    for k, y in enumerate(outs):
        c.b.keep(y)
        if c.b.kind(y) == "act" and sum(o.vertex == y.vertex for o in outs) == 1:
            c.b.set_kind(y, "out")
            base = "y" if len(outs) == 1 else f"y{k}"
            c.b.name(y, base if base not in c.names else c.unique(base))
            c.names.add(base)
    built = c.b.finish()
    return NeuralSheaf(built, model=model, inputs=[c.b.named(q.value) for q in inputs],
                       input_shapes=shapes, outputs=[c.b.named(y) for y in outs],
                       output_shapes=[y.shape for y in outs], tuple_output=isinstance(out, tuple))
