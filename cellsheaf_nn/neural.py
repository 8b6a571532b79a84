"""``NeuralSheaf``: a compiled network — its sheaf, boundary, named vertices, inference and pins.

Every solve goes through `cellsheaf` ([`cellsheaf.minimize`][cellsheaf.minimize.minimize],
[`cellsheaf.diffuse`][cellsheaf.diffusion.diffuse]); this module only lays out boundary data and reads
results back by vertex name.

Examples
--------
>>> import torch, cellsheaf_nn as csnn
>>> _ = torch.manual_seed(0); model = torch.nn.Sequential(
...     torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).double()
>>> ns = csnn.compile(model)
>>> x = torch.randn(6, 3, dtype=torch.float64)
>>> y, state = ns.infer(x, return_state=True)
>>> torch.allclose(y, model(x)), state["a1"].shape, state.info.method
(True, torch.Size([6, 4]), 'propagate')
>>> pin = ns.pin("a1", [0], torch.tensor([2.0], dtype=torch.float64))     # hard pin of neuron 0 of a1
>>> bool((ns.infer(x, return_state=True)[1]["a1"][:, 0] == 2.0).all())
True
"""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

import cellsheaf as cs
from cellsheaf.minimize import _verify_propagation, default_tol
from cellsheaf.operators import to_torch_sparse
from cellsheaf.validation import check_number

from . import distributed
from .builder import Built, EdgeInfo, VertexInfo

__all__ = ["NeuralSheaf", "NeuralState", "Pin", "ConvergenceError"]

_MINIMIZE_METHODS = ("auto", "propagate", "newton", "euler")
_INITS = ("random", "zeros", "forward_pass")


class ConvergenceError(RuntimeError):
    """A solve did not converge; ``.result`` holds the solver's report (and its last state)."""

    def __init__(self, message: str, result: cs.Result):
        super().__init__(message)
        self.result = result


class NeuralState(dict):
    """Values of the forward-pass quantities after a solve: ``state["a1"]`` is ``(B, n)`` (neural block only).

    Attributes
    ----------
    info
        The solver's [`cellsheaf.Result`][cellsheaf.results.Result] (method, converged, iterations, energy, residual, ...).
    cochain : the full 0-cochain (with ones blocks, merge vertices and pin anchors).
    """

    def __init__(self, values: dict[str, Tensor], info: cs.Result, cochain: cs.Cochain):
        super().__init__(values)
        self.info = info
        self.cochain = cochain


_PINS_LOCK = threading.RLock()  # serialises pin changes; readers take the current (never mutated) pins dict


@dataclass(frozen=True, eq=False)
class Pin:
    """Handle of a pin (``kind`` ``"hard"`` or ``"soft"``) or of freed input coordinates (``"free"``)."""

    id: int
    kind: str
    vertex: str
    coords: tuple[int, ...]
    values: Tensor | None = None
    strength: float | None = None


class NeuralSheaf:
    """A network compiled into a cellular sheaf (Sec. 3.1); made by [`cellsheaf_nn.compile`][cellsheaf_nn.compile.compile].

    Boundary data (Sec. 3.2): the input's neural block holds ``x``; every ones
    block holds ``1``. Pins add hard boundary coordinates or soft penalty edges
    ([`pinned_sheaf`][cellsheaf_nn.neural.NeuralSheaf.pinned_sheaf]).

    Attributes
    ----------
    sheaf : cellsheaf.Sheaf
        The network's sheaf (no pins): vertices ``x, z1, a1, ...``, edges ``weight:z1, act:a1, ...``.
    layout : dict[str, VertexInfo]
        Per vertex: kind, neural block and ones blocks within the stalk, per-sample shape, layer, module.
    edge_info : dict[str, EdgeInfo]
        Per edge: kind, endpoints, layer, module, the ones block its bias reads.
    inputs, outputs : list of str
        Names of the input and output vertices, in the order of the model's arguments and outputs.
    input_shapes, output_shapes : list of tuple of int
        Their per-sample shapes.
    input, output, input_shape, output_shape
        The first input and output and their shapes.
    """

    def __init__(self, built: Built, *, model: nn.Module, inputs: Sequence[str], outputs: Sequence[str],
                 input_shapes: Sequence[tuple[int, ...]], output_shapes: Sequence[tuple[int, ...]],
                 tuple_output: bool = False):
        self.sheaf = built.sheaf
        self.layout: dict[str, VertexInfo] = built.vertices
        self.edge_info: dict[str, EdgeInfo] = built.edges
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.input_shapes = [tuple(s) for s in input_shapes]
        self.output_shapes = [tuple(s) for s in output_shapes]
        self.input, self.output = self.inputs[0], self.outputs[0]
        self.input_shape, self.output_shape = self.input_shapes[0], self.output_shapes[0]
        self._tuple_output = bool(tuple_output)
        self._model = model
        self._writebacks = built.writebacks
        #: the learned tensors the maps hold (conv kernels, norm weights, shared weights, learned scalars), by
        #: their names in the model: the compiled copy's own parameters, trained in place by the local rule.
        #: They do not require grad, so inference builds no autograd graph; the local rule switches it on.
        self.parameters: dict[str, Tensor] = dict(built.parameters or {})
        for p in self.parameters.values():
            p.requires_grad_(False)
        self._pins: dict[int, Pin] = {}
        self._next_id = 0
        self._pinned: tuple | None = None  # (key, sheaf, penalties)
        self._ones = {  # vertex -> (ones coordinates in its stalk, a vector of ones)
            info.name: (idx, torch.ones(len(idx), dtype=torch.float64))
            for info in self.layout.values() if (idx := [c for sl in info.ones for c in range(sl.start, sl.stop)])}

    # ------------------------------------------------------------------ layout
    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the maps."""
        cache = self.sheaf._cache  # cleared whenever the maps change
        if "neural dtype" not in cache:
            cache["neural dtype"] = self.sheaf.dtype
        return cache["neural dtype"]

    @property
    def device(self) -> torch.device:
        """Device of the maps ([`to`][cellsheaf_nn.neural.NeuralSheaf.to] moves them)."""
        return self.sheaf.device

    def to(self, device=None, dtype: torch.dtype | None = None) -> "NeuralSheaf":
        """Move the sheaf (every map and cached operator) to ``device``/``dtype``, in place; returns ``self``.

        Inputs passed to [`infer`][cellsheaf_nn.neural.NeuralSheaf.infer] are moved to the same device and dtype. Create trainers after
        moving: a [`SheafTrainer`][cellsheaf_nn.train.SheafTrainer] holds the weight maps it was given.

        Examples
        --------
        >>> import torch, cellsheaf_nn as csnn
        >>> ns = csnn.compile(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)))
        >>> ns.to("cpu", torch.float64).dtype, ns.device
        (torch.float64, device(type='cpu'))
        """
        self._model.to(device=device, dtype=dtype)  # in place: the maps keep holding the model's parameters
        self.sheaf.to(device, dtype)
        self._pinned = None
        return self

    @property
    def n_in(self) -> int:
        """Size of the input (``prod(input_shape)``)."""
        return self.layout[self.input].n

    @property
    def n_out(self) -> int:
        """Size of the output (``prod(output_shape)``)."""
        return self.layout[self.output].n

    @property
    def edge_types(self) -> dict[str, str]:
        """``{edge name: kind}`` for every edge of [`pinned_sheaf`][cellsheaf_nn.neural.NeuralSheaf.pinned_sheaf] (``"weight"``, ``"act"``, ``"penalty"``, ...).

        The kind is the prefix of the name before ``":"``.
        """
        return {name: str(name).split(":", 1)[0] for name in self.pinned_sheaf.edges}

    def edges_of(self, kind: str) -> list[str]:
        """Names of the network edges of one kind, in order (e.g. ``edges_of("weight")``)."""
        return [n for n, e in self.edge_info.items() if e.kind == kind]

    def coords(self, vertex: str, coords=None) -> Tensor:
        """Flat indices in the 0-cochain of neural coordinates ``coords`` (default all) of ``vertex``.

        ``coords`` holds flat indices into the neural block, or index tuples into the vertex's
        per-sample shape (``(c, h, w)`` on a feature map), or a mix.

        Examples
        --------
        >>> import torch, cellsheaf_nn as csnn
        >>> ns = csnn.compile(torch.nn.Sequential(torch.nn.Linear(2, 6)).double())
        >>> ns.coords("x", [(1,)]).tolist() == ns.coords("x", [1]).tolist()
        True
        """
        info = self._info(vertex)
        idx = self._neural_coords(info, coords)
        return torch.as_tensor(idx, dtype=torch.long) + self.sheaf.vertex_slice(vertex).start

    def _info(self, vertex: str) -> VertexInfo:
        try:
            return self.layout[vertex]
        except KeyError:
            raise KeyError(f"unknown vertex {vertex!r}; the network's vertices are {list(self.layout)}") from None

    @staticmethod
    def _neural_coords(info: VertexInfo, coords) -> list[int]:
        if coords is None:
            return list(range(info.n))
        if isinstance(coords, Tensor):
            coords = coords.tolist()
        if isinstance(coords, tuple) and coords and all(isinstance(c, (int, np.integer)) for c in coords) \
                and len(coords) == len(info.shape) > 1:
            coords = [coords]  # one index tuple
        idx = [_flat_index(info, c) for c in coords]
        bad = [c for c in idx if not 0 <= c < info.n]
        if bad:
            raise IndexError(f"coordinates {bad} outside the {info.n} neurons of vertex {info.name!r}")
        if len(set(idx)) != len(idx):
            raise ValueError(f"repeated coordinates {idx} at vertex {info.name!r}")
        return idx

    def affine_parts(self, edge: str) -> tuple[Tensor, Tensor | None]:
        """The current ``(W, b)`` of an affine edge, read off its extended map ``W̄ = (W | diag(b))`` (Eq. 10).

        Examples
        --------
        >>> import torch, cellsheaf_nn as csnn
        >>> lin = torch.nn.Linear(2, 3).double()
        >>> W, b = csnn.compile(torch.nn.Sequential(lin)).affine_parts("weight:z1")
        >>> torch.equal(W, lin.weight.detach()), torch.equal(b, lin.bias.detach())
        (True, True)
        """
        info = self.edge_info[edge]
        M = self.sheaf.edge(edge).Fu.matrix().detach()
        W = M[:, : self.layout[info.u].n].clone()
        if info.ones is None:
            return W, None
        idx = torch.arange(M.shape[0])
        return W, M[idx, info.ones.start + idx].clone()

    # ------------------------------------------------------------------ boundary
    def _batch_input(self, x) -> tuple[list[Tensor], bool]:
        """The inputs as flat ``(B, n_i)`` tensors, one per input vertex, and whether they came unbatched."""
        xs = list(x) if isinstance(x, (tuple, list)) and len(self.inputs) > 1 else [x]
        if len(xs) != len(self.inputs):
            raise ValueError(f"the network takes {len(self.inputs)} inputs ({', '.join(self.inputs)}), got {len(xs)}")
        if len(self.inputs) == 1 and type(xs[0]) is Tensor and xs[0].dim() == 2 and xs[0].shape[1:] == self.input_shapes[0] \
                and xs[0].dtype == self.dtype and xs[0].device == self.device:
            return xs, False  # the common case, (B, n) as the network takes it: nothing to convert
        out, single = [], set()
        for name, shape, xi in zip(self.inputs, self.input_shapes, xs):
            xi = cs.cochain.as_real(xi, f"input {name!r}", finite=False).to(dtype=self.dtype, device=self.device)
            n = math.prod(shape)
            if tuple(xi.shape) == shape:
                out.append(xi.reshape(1, n))
                single.add(True)
            elif xi.dim() >= 1 and tuple(xi.shape[1:]) == shape:
                out.append(xi.reshape(xi.shape[0], n))  # B = 0 too
                single.add(False)
            else:
                raise ValueError(f"input {name!r} of shape {tuple(xi.shape)}; the network takes {shape} or "
                                 f"(B, {', '.join(map(str, shape))})")
        if len(single) > 1 or len({xi.shape[0] for xi in out}) > 1:
            raise ValueError(f"the inputs have batch sizes {[tuple(xi.shape) for xi in out]}; they must agree")
        return out, single.pop()

    def boundary(self, *x) -> cs.Boundary:
        """The boundary data for inputs ``x`` (``(B, *input_shape)`` each): inputs, ones blocks, hard pins, anchors.

        Freed input coordinates ([`free_input`][cellsheaf_nn.neural.NeuralSheaf.free_input]) are left out.
        """
        xs, _ = self._batch_input(x if len(x) > 1 else x[0])
        return self._boundary(xs, self._penalties())

    def _input_boundary(self, xs: list[Tensor], keep: list[int]) -> cs.Boundary:
        """The coordinates ``keep`` of the first input and every other input fixed to ``xs``, and every ones
        block fixed at 1 (in cochain order)."""
        b = cs.Boundary()
        if keep:
            b.fix(self.input, xs[0] if len(keep) == self.n_in else xs[0][:, keep], coords=keep)
        for name, xi in zip(self.inputs[1:], xs[1:]):
            b.fix(name, xi, coords=list(range(xi.shape[1])))
        for name, (idx, ones) in self._ones.items():
            b.fix(name, ones.to(xs[0].dtype), coords=idx)
        return b

    def _boundary(self, xs: list[Tensor], penalties, pins: dict[int, Pin] | None = None) -> cs.Boundary:
        pins = self._pins if pins is None else pins
        B = xs[0].shape[0]
        for p in pins.values():
            if p.values is not None and p.values.dim() == 2 and p.values.shape[0] not in (1, B):
                raise ValueError(f"{p.kind} pin {p.id} at vertex {p.vertex!r} (coords {list(p.coords)}) has values "
                                 f"for a batch of {p.values.shape[0]}, the inputs a batch of {B}; give "
                                 f"({len(p.coords)},) values or one row per input")
        freed = {c for p in pins.values() if p.kind == "free" for c in p.coords}
        b = self._input_boundary(xs, [c for c in range(self.n_in) if c not in freed])
        for p in pins.values():
            if p.kind == "hard":
                b.fix(p.vertex, p.values.to(self.dtype), coords=list(p.coords))
        for pen in penalties:
            pen.boundary(b)
        return b

    # ------------------------------------------------------------------ pins
    def pin(self, vertex: str, coords: Sequence[int] | None = None, values=None,
            strength: float | None = None) -> Pin:
        """Pin neurons ``coords`` of ``vertex`` to ``values`` (Sec. 5.1); returns a handle for [`unpin`][cellsheaf_nn.neural.NeuralSheaf.unpin].

        Parameters
        ----------
        vertex : any named vertex (``"a1"``, ``"z2"``, the output ``"y"``, the input ``"x"``).
        coords : neuron indices within the vertex's neural block (default: all).
        values : ``(k,)``, ``(B, k)`` (one pin set per batch item) or a number.
        strength : ``None`` for a hard pin (the coordinates join the boundary);
            ``γ > 0`` for a soft pin: a penalty edge ``√γ·P_J`` to a stubborn anchor (Eq. 23).

        Examples
        --------
        >>> import torch, cellsheaf_nn as csnn
        >>> ns = csnn.compile(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(),
        ...                                       torch.nn.Linear(2, 1)).double())
        >>> soft = ns.pin("z2", values=1.0, strength=10.0)    # pull the output toward 1
        >>> ns.edge_types["penalty:z2"]
        'penalty'
        >>> ns.unpin(soft)
        """
        info = self._info(vertex)
        idx = self._neural_coords(info, coords)
        if values is None:
            raise ValueError("pin() needs values")
        values = cs.cochain.as_real(values, f"pin values at vertex {vertex!r}", finite=False).to(self.dtype)
        values = values.expand(len(idx)) if values.dim() == 0 else values
        if values.dim() not in (1, 2) or values.shape[-1] != len(idx):
            raise ValueError(f"pin at vertex {vertex!r}: values of shape {tuple(values.shape)} for {len(idx)} "
                             f"coordinates; expected ({len(idx)},) or (B, {len(idx)})")
        cs.cochain.check_finite(values, f"pin values at vertex {vertex!r}")
        if strength is not None:
            strength = float(strength)
            if not (strength > 0 and math.isfinite(strength)):
                raise ValueError(f"pin strength must be positive and finite (or None for a hard pin), got {strength}")
        with _PINS_LOCK:
            if strength is None:
                self._check_free(vertex, idx)
            return self._add(Pin(-1, "hard" if strength is None else "soft", vertex, tuple(idx), values, strength))

    def clamp(self, vertex: str, values, coords: Sequence[int] | None = None) -> Pin:
        """Hard-pin (clamp) coordinates of ``vertex``: ``pin(vertex, coords, values)`` (Note 5.1).

        Together with [`free_input`][cellsheaf_nn.neural.NeuralSheaf.free_input] any mixture of inputs, hidden neurons and
        outputs can be fixed and the rest completed (imputation, label-conditioned
        reconstruction, neuron steering).
        """
        return self.pin(vertex, coords, values)

    def free_input(self, coords: Sequence[int] | None = None) -> Pin:
        """Free input coordinates (default: all): they are solved for instead of fixed to ``x``.

        The values of ``x`` at freed coordinates are then only a starting point. Undo with [`unpin`][cellsheaf_nn.neural.NeuralSheaf.unpin].
        """
        idx = self._neural_coords(self._info(self.input), coords)
        with _PINS_LOCK:
            taken = {c for p in self._pins.values() if p.kind in ("free", "hard") and p.vertex == self.input
                     for c in p.coords}
            if taken & set(idx):
                raise ValueError(f"input coordinates {sorted(taken & set(idx))} are already freed or pinned")
            return self._add(Pin(-1, "free", self.input, tuple(idx)))

    def _check_free(self, vertex: str, idx: list[int]) -> None:
        """A hard pin must not overlap another hard pin, nor the fixed part of the input."""
        taken = {c for p in self._pins.values() if p.kind == "hard" and p.vertex == vertex for c in p.coords}
        if vertex == self.input:
            freed = {c for p in self._pins.values() if p.kind == "free" for c in p.coords}
            taken |= set(range(self.n_in)) - freed
        clash = sorted(taken & set(idx))
        if clash:
            hint = "free them first with ns.free_input(...)" if vertex == self.input else "unpin the other pin first"
            raise ValueError(f"coordinates {clash} of vertex {vertex!r} are already fixed; {hint}")

    def _add(self, p: Pin) -> Pin:
        """Register ``p`` under a fresh id. Copy-on-write: a new pins dict replaces the old one, so an
        `infer` running in another thread keeps the consistent set of pins it started with."""
        with _PINS_LOCK:
            p = replace(p, id=self._next_id)
            self._pins = {**self._pins, p.id: p}
            self._next_id += 1
        return p

    def unpin(self, handle: Pin) -> None:
        """Remove a pin (or undo a [`free_input`][cellsheaf_nn.neural.NeuralSheaf.free_input])."""
        with _PINS_LOCK:
            if handle.id not in self._pins:
                raise KeyError(f"pin {handle.id} ({handle.kind} at {handle.vertex!r}) is not active")
            self._pins = {k: p for k, p in self._pins.items() if k != handle.id}

    def clear_pins(self) -> None:
        """Remove every pin and re-fix every input coordinate."""
        with _PINS_LOCK:
            self._pins = {}

    @property
    def pins(self) -> list[Pin]:
        """The active pins and freed inputs, in the order they were made."""
        return list(self._pins.values())

    @property
    def pinned_sheaf(self) -> cs.Sheaf:
        """`sheaf` plus the penalty edges and anchors of the soft pins (`sheaf` itself if none).

        Penalty edges and anchors are named ``"penalty:{vertex}"`` (numbered when several).
        The maps are shared with `sheaf`; the copy is rebuilt when the pins or the sheaf change.
        """
        return self._pinned_state()[0]

    def _penalties(self) -> list[cs.Penalty]:
        return self._pinned_state()[1]

    def _pinned_state(self, pins: dict[int, Pin] | None = None) -> tuple[cs.Sheaf, list[cs.Penalty]]:
        soft = [p for p in (self._pins if pins is None else pins).values() if p.kind == "soft"]
        if not soft:
            return self.sheaf, []
        key = (self.sheaf._version, tuple(p.id for p in soft))
        cached = self._pinned  # read once: another thread may replace it
        if cached is None or cached[0] != key:
            S = self.sheaf.copy()
            pens = []
            for p in soft:
                name, k = f"penalty:{p.vertex}", 1
                while name in S._dims:
                    name, k = f"penalty:{p.vertex}.{k}", k + 1
                pens.append(cs.soft_pin(S, p.vertex, p.values, coords=list(p.coords), strength=p.strength,
                                        name=name))
            self._pinned = cached = (key, S, pens)
        return cached[1], cached[2]

    # ------------------------------------------------------------------ inference
    def infer(
        self,
        *inputs,
        method: str = "auto",
        return_state: bool = False,
        init: str | None = None,
        tol: float | None = None,
        max_steps: int | None = None,
        alpha: float = 1.0,
        dt: float | None = None,
        generator: torch.Generator | None = None,
        record: bool | int = False,
        check: bool = True,
    ):
        """Run the network as a sheaf: the minimiser of the discord with the boundary data (Prop. 3.4).

        Parameters
        ----------
        *inputs : tensors ``(B, *input_shape)`` or ``input_shape``, or one iterable of batches
            The inputs, as ``model(*inputs)`` takes them (values at freed input coordinates
            serve only as a starting point). A single iterable of batches instead (a
            ``DataLoader``, a generator, a list of tensors or of tuples) streams: ``infer``
            then returns a generator with one result per batch, as [`infer_batches`][cellsheaf_nn.neural.NeuralSheaf.infer_batches] does.
        method : {"auto", "propagate", "newton", "euler", "diffusion"}
            ``"auto"``: propagation when the sheaf is determined (no pins: the forward
            pass, exact), Newton otherwise. ``"diffusion"``: the paper's Euler heat
            equation ([`cellsheaf.diffuse`][cellsheaf.diffusion.diffuse]) from ``init``; ``"euler"`` is the same
            flow through [`cellsheaf.minimize`][cellsheaf.minimize.minimize] (default start ``"forward_pass"``).
        return_state
            Also return the [`NeuralState`][cellsheaf_nn.neural.NeuralState] (values at every vertex, solver report).
        init : {"random", "zeros", "forward_pass"}
            Starting point of the iterative methods: standard normal (``generator``),
            zeros, or the unpinned forward pass. The denominators of quotients ``a / b`` start at their
            forward-pass values in every case (no gradient flow crosses the pole at ``b = 0``). Default: ``"random"`` for diffusion,
            ``"forward_pass"`` for ``newton``/``euler`` and for ``auto`` when pinned.
        tol : gradient-norm tolerance (default ``1e-10`` in float64, ``1e-4`` in float32).
        max_steps : step cap of ``euler``/``diffusion``, iteration cap of ``newton``.
        alpha, dt : the diffusion rate and Euler step (``dt`` default ``1/(α λ_max)``, ``λ_max`` of the
            linearised ``L[Ω,Ω]``, the largest over the batch at the start and at the forward pass).
        record : record per-edge energies every ``record`` steps (``state.info.extra["trajectory"]``).
        check
            Raise [`ConvergenceError`][cellsheaf_nn.neural.ConvergenceError] if the solver did not converge (else return what it found).
            By propagation: raise ``ValueError`` naming the edge or input where a non-finite output value
            arose (one fused reduction over the output; ``check=False`` skips it).

        Returns
        -------
        y : tensor ``(B, *output_shape)`` (``output_shape`` for unbatched inputs), or a tuple of them
            when the model returns a tuple: the structure of ``model(*inputs)``.
        state : NeuralState, only with ``return_state=True``.

        Examples
        --------
        >>> import torch, cellsheaf_nn as csnn
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).double()
        >>> ns = csnn.compile(model)
        >>> x = torch.randn(4, 2, dtype=torch.float64)
        >>> y, state = ns.infer(x, method="diffusion", return_state=True)
        >>> torch.allclose(y, model(x), atol=1e-8), state.info.converged
        (True, True)
        >>> [tuple(y.shape) for y in ns.infer(x.split(3))]  # an iterable of batches streams
        [(3, 1), (1, 1)]
        """
        for name, value, positive in (("tol", tol, False), ("dt", dt, True), ("alpha", alpha, True),
                                      ("max_steps", max_steps, False)):
            if value is not None or name == "alpha":
                check_number(value, name, positive=positive, integer=name == "max_steps", none=name != "alpha")
        if self._is_stream(inputs):
            return self.infer_batches(inputs[0], method=method, return_state=return_state, init=init, tol=tol,
                                      max_steps=max_steps, alpha=alpha, dt=dt, generator=generator, record=record,
                                      check=check)
        xs, single = self._batch_input(inputs if len(inputs) != 1 else inputs[0])
        pins = self._pins  # this call's pins: pin/unpin in other threads replace the dict, never change it
        if method in ("auto", "propagate") and not pins:
            compiled = self._forward_plan()
            if compiled is not None:
                return self._propagated(compiled, xs, single, return_state, check, method)
        S, penalties = self._pinned_state(pins)
        bnd = self._boundary(xs, penalties, pins)
        if method == "diffusion":
            x0 = self._start(init or "random", xs, S, bnd, generator)
            dt = self._diffusion_dt(S, bnd, x0, xs, alpha) if dt is None else dt
            res = cs.diffuse(S, x0, boundary=bnd, method="euler", dt=dt, alpha=alpha,
                             tol=default_tol(self.dtype) if tol is None else tol,
                             max_steps=100_000 if max_steps is None else max_steps, record=record)
        elif method in _MINIMIZE_METHODS:
            pinned = bool(pins)
            start = init or ("forward_pass" if method in ("newton", "euler") or pinned else None)
            x0 = None if start is None or method == "propagate" else self._start(start, xs, S, bnd, generator)
            res = cs.minimize(S, bnd, method=method, x0=x0, tol=tol, max_iter=max_steps, dt=dt, alpha=alpha,
                              record=record)
        else:
            raise ValueError(f"method must be one of {(*_MINIMIZE_METHODS, 'diffusion')}, got {method!r}")
        if check and not res.converged:
            raise ConvergenceError(f"infer(method={method!r}) did not converge: {res.message} "
                                   "(pass check=False to get the last state, or raise max_steps)", res)
        flat = res.x.flat if res.x.flat.dim() == 2 else res.x.flat.expand(xs[0].shape[0], -1)
        y = self._structured([flat[:, self.coords(v)] for v in self.outputs], single)
        if not return_state:
            return y
        values = {v: flat[:, self.coords(v)] for v in self.layout}
        if single:
            values = {v: t[0] for v, t in values.items()}
        return y, NeuralState(values, res, res.x)

    def _diffusion_dt(self, S: cs.Sheaf, bnd: cs.Boundary, x0: Tensor, xs: list[Tensor], alpha: float) -> float | None:
        """The default Euler step ``1/(α λ*)``: ``λ*`` is the largest ``λ_max`` of the linearised ``L[Ω,Ω]`` over
        every batch item, at the start and at the forward pass.

        The start alone is not enough for a nonlinear map whose Jacobian grows toward the answer (a LayerNorm
        of small pre-activations has ``‖J‖ ~ 1/σ``): a step stable at the start makes Euler circle the
        answer instead of reaching it. ``None`` (the solver's own default) when nothing is free.
        """
        fwd = self._start("forward_pass", xs, S, bnd, None)
        lam = max((float(cs.lambda_max(S, boundary=bnd, at=p[b])) for p in (x0, fwd) for b in range(p.shape[0])),
                  default=0.0)
        return 1.0 / (alpha * lam) if lam > 0 else None

    def _forward_plan(self) -> cs.propagation.PropagationPlan | None:
        """The compiled forward pass (`cellsheaf.propagation.plan`): input and ones fixed, the ones constant.

        ``None`` when the sheaf is not determined (a hand-built sheaf); cached with the sheaf's operators.
        """
        key = ("neural forward plan",)
        if key not in self.sheaf._cache:
            inputs, ones = self._fixed_pattern()
            try:
                compiled = cs.propagation.plan(self.sheaf, torch.cat([inputs, ones]).sort().values, ones,
                                               torch.ones(len(ones), dtype=torch.float64))
            except cs.NotDeterminedError:
                compiled = None
            self.sheaf._cache[key] = compiled
            self._io_slices = ([self._neural_slice(v) for v in self.inputs],
                               [self._neural_slice(v) for v in self.outputs])
        return self.sheaf._cache[key]

    def _fixed_pattern(self) -> tuple[Tensor, Tensor]:
        """The coordinates of every input and the ones coordinates (sorted) in the 0-cochain of `sheaf`."""
        inputs = [c for v in self.inputs for c in range(self._neural_slice(v).start, self._neural_slice(v).stop)]
        ones = sorted(self.sheaf.vertex_slice(v).start + c for v, (idx, _) in self._ones.items() for c in idx)
        return torch.as_tensor(inputs, dtype=torch.long), torch.as_tensor(ones, dtype=torch.long)

    def _propagated(self, compiled, xs: list[Tensor], single: bool, return_state: bool, check: bool, method: str):
        """``infer`` by the compiled forward pass: the input written into a cochain, one run of the plan.

        Without ``return_state`` the plan runs on its own buffer for this batch shape (views taken once)
        and only the output is copied out; ``check`` then tests that output for finiteness (a non-finite
        value is traced back to the edge or input where it arose), not the whole state.
        """
        ins, outs = self._io_slices
        xb = xs[0]
        if not return_state:
            bound = compiled.bound(xb.shape[0], xb.dtype, xb.device)
            for sl, xi in zip(ins, xs):
                bound.columns(sl).copy_(xi)
            bound.run(check, watch=outs)  # the check reads what is returned
            return self._structured([bound.columns(sl).clone() for sl in outs], single)
        S = self.sheaf
        x = torch.empty(xb.shape[0], S.C0, dtype=xb.dtype, device=xb.device)
        for sl, xi in zip(ins, xs):
            x[:, sl] = xi
        compiled.run(x, check=check)
        y = self._structured([x[:, sl] for sl in outs], False)
        why = "the sheaf is determined" if method == "auto" else ""
        res = _verify_propagation(S, x, compiled.free, default_tol(x.dtype), why, compiled.residuals(x))
        values = {v: x[:, self._neural_slice(v)] for v in self.layout}
        if single:
            y, values = _first(y), {v: t[0] for v, t in values.items()}
        return y, NeuralState(values, res, res.x)

    def _neural_slice(self, vertex: str) -> slice:
        """The neural block of ``vertex`` in the flat 0-cochain."""
        start = self.sheaf.vertex_slice(vertex).start
        return slice(start, start + self.layout[vertex].n)

    def _structured(self, flats: list[Tensor], single: bool):
        """The outputs ``(B, n_k)`` shaped as the model returns them: a tensor or a tuple of tensors."""
        ys = [f if f.shape[1:] == shape else f.reshape(-1, *shape) for f, shape in zip(flats, self.output_shapes)]
        if single:
            ys = [y[0] for y in ys]
        return tuple(ys) if self._tuple_output else ys[0]

    def _start(self, init: str, xs: list[Tensor], S: cs.Sheaf, bnd: cs.Boundary, generator) -> Tensor:
        """Initial cochain of ``S`` (the pinned sheaf) for a batch: random, zeros or the forward pass."""
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        B = xs[0].shape[0]
        if init == "random":
            x0 = torch.randn(B, S.C0, dtype=self.dtype, generator=generator).to(self.device)  # same draw anywhere
        else:
            x0 = torch.zeros(B, S.C0, dtype=self.dtype, device=self.device)
        poles = self._denominators()
        if init == "forward_pass" or len(poles):
            base = self._input_boundary(xs, list(range(self.n_in)))
            fwd = cs.minimize(self.sheaf, base, method="propagate").x.flat
            cols = slice(0, self.sheaf.C0) if init == "forward_pass" else poles
            x0[:, cols] = fwd[:, cols]
        return bnd.resolve(S, dtype=self.dtype).fill(x0)

    def _denominators(self) -> Tensor:
        """The coordinates of the denominators of quotients ``a / b`` (the ``b`` block of each
        [`Quotient`][cellsheaf.maps.Quotient] edge's merge vertex) in the 0-cochain.

        A random or zero start takes their forward-pass values: the energy is infinite at ``b = 0``, so a
        gradient flow (diffusion, Euler) never moves a denominator across zero, and a start on the other side
        of the pole than the answer would never reach it (nor would ``b = 0`` itself, where ``a / b`` is not
        defined). Every other coordinate keeps its random (or zero) start.
        """
        S, key = self.sheaf, ("neural denominators",)
        if key not in S._cache:
            cols = [torch.arange(S.vertex_slice(e.u).start + e.Fu.denominator.start,
                                 S.vertex_slice(e.u).start + e.Fu.denominator.stop)
                    for e in map(S.edge, S.edges) if isinstance(e.Fu, cs.maps.Quotient)]
            S._cache[key] = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long)
        return S._cache[key]

    # ------------------------------------------------------------------ structure at a point
    def _at(self, x) -> tuple[cs.Sheaf, cs.Boundary, Tensor]:
        xs, single = self._batch_input(x)
        if xs[0].shape[0] != 1:
            raise ValueError(f"structural checks take one input of shape {self.input_shape}, got a batch of "
                             f"{xs[0].shape[0]}")
        S, penalties = self._pinned_state()
        shaped = [xi.reshape(-1, *shape) for xi, shape in zip(xs, self.input_shapes)]
        state = self.infer(*shaped, return_state=True, check=False)[1]  # a pinned equilibrium may sit on a kink
        return S, self._boundary(xs, penalties), state.cochain.flat.reshape(-1)

    def restricted_coboundary(self, x, format: str = "dense"):
        """``δ_Ω``: the coboundary at the activation pattern of input ``x`` (shape ``input_shape``),
        restricted to the free coordinates (columns; all edges as rows).

        The pattern is the one at the point [`infer`][cellsheaf_nn.neural.NeuralSheaf.infer] returns for ``x`` with the
        current pins (the forward pass without pins; with pins, the solver's last
        point even if it stopped on a switching surface, Note 5.1).

        Square and lower unitriangular in vertex/edge order for a network without
        pins or penalty edges (Lemma 3.2); tall with soft pins.

        Parameters
        ----------
        format : {"dense", "torch", "scipy"}

        Examples
        --------
        >>> import torch, cellsheaf_nn as csnn
        >>> ns = csnn.compile(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(),
        ...                                       torch.nn.Linear(3, 1)).double())
        >>> D = ns.restricted_coboundary(torch.randn(2, dtype=torch.float64))
        >>> D.shape, ns.coboundary_determinant(torch.randn(2, dtype=torch.float64))
        (torch.Size([7, 7]), 1.0)
        """
        S, bnd, at = self._at(x)
        D = cs.operators.coboundary(S, at=at, format="scipy")
        D = D[:, bnd.resolve(S).free.numpy()]
        return _export(D, format, self.dtype)

    def coboundary_determinant(self, x) -> float:
        """``det δ_Ω`` at the activation pattern of ``x`` (Lemma 3.2: exactly 1 for a compiled network).

        When ``δ_Ω`` is lower triangular (always, for a network compiled without
        pins) the determinant is the exact product of its diagonal; otherwise it
        comes from an LU factorisation. Raises ``ValueError`` if ``δ_Ω`` is not square.
        """
        D = self.restricted_coboundary(x, format="scipy")
        if D.shape[0] != D.shape[1]:
            raise ValueError(f"δ_Ω is {D.shape[0]}×{D.shape[1]}, not square (penalty edges make it tall): it has "
                             "no determinant; check restricted_laplacian(x) for positive definiteness instead")
        if sp.triu(D, k=1).nnz == 0:
            return float(np.prod(D.diagonal()))
        sign, logdet = np.linalg.slogdet(D.toarray())
        return float(sign * np.exp(logdet))

    def restricted_laplacian(self, x, format: str = "dense"):
        """``L[Ω,Ω]`` at the activation pattern of input ``x`` (positive definite, Lemma 3.2).

        Built with [`cellsheaf.operators.restricted_laplacian`][cellsheaf.operators.restricted_laplacian]; ``format`` as there.

        Examples
        --------
        >>> import torch, cellsheaf_nn as csnn
        >>> ns = csnn.compile(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(),
        ...                                       torch.nn.Linear(3, 1)).double())
        >>> L = ns.restricted_laplacian(torch.randn(2, dtype=torch.float64))
        >>> bool(torch.linalg.eigvalsh(L).min() > 0)
        True
        """
        S, bnd, at = self._at(x)
        return cs.operators.restricted_laplacian(S, bnd, at=at, format=format, dtype=self.dtype)[0]

    # ------------------------------------------------------------------ back to torch
    def _is_stream(self, inputs: tuple) -> bool:
        """Whether `infer` was given one iterable of batches rather than the model's inputs.

        Tensors, arrays, numbers and nested lists of numbers are inputs (as before); so is a
        tuple/list of tensors for a model with several inputs. A list/tuple of non-scalar tensors
        (one input) or of tuples/lists starting with a tensor, and any other iterable (a
        ``DataLoader``, a generator), are batches."""
        if len(inputs) != 1:
            return False
        x = inputs[0]
        if isinstance(x, (Tensor, np.ndarray, str, bytes, Mapping)) or not isinstance(x, Iterable):
            return False
        if not isinstance(x, (list, tuple)):
            return True
        if not x:
            return False
        grouped = all(isinstance(b, (list, tuple)) and len(b) > 0 and isinstance(b[0], Tensor) for b in x)
        if len(self.inputs) > 1:
            return grouped
        return grouped or all(isinstance(b, Tensor) and b.dim() >= 1 and b.numel() > 1 for b in x)

    def infer_batches(self, batches: Iterable, shard: bool = True, **kwargs) -> Iterator:
        """[`infer`][cellsheaf_nn.neural.NeuralSheaf.infer] over an iterable of batches (e.g. a ``DataLoader``), yielding one result per batch.

        Memory stays bounded by one batch: results are produced as the batches arrive. A batch is
        a tensor (the model's input) or a tuple/list whose first items are the model's inputs;
        further items (labels, say) are ignored. ``ns.infer(batches)`` is the same call.
        Under torch.distributed each rank infers its own shard: a ``DataLoader`` with a
        ``DistributedSampler`` is taken as it is, any other iterable is dealt out round robin
        (rank ``r`` of ``W`` gets batches ``r, r + W, …``; [`cellsheaf_nn.distributed.shard`][cellsheaf_nn.distributed.shard]);
        ``shard=False`` infers every batch on every rank. ``kwargs`` are [`infer`][cellsheaf_nn.neural.NeuralSheaf.infer]'s options.

        Examples
        --------
        >>> import torch, cellsheaf_nn as csnn
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1)).double()
        >>> data = torch.utils.data.TensorDataset(torch.randn(10, 2, dtype=torch.float64), torch.zeros(10))
        >>> loader = torch.utils.data.DataLoader(data, batch_size=4)
        >>> [tuple(y.shape) for y in csnn.compile(model).infer_batches(loader)]
        [(4, 1), (4, 1), (2, 1)]
        """
        n_inputs = len(self.inputs)
        if shard:
            batches = distributed.shard(batches)
        for k, batch in enumerate(batches):
            if isinstance(batch, Tensor):
                batch = (batch,)
            if not isinstance(batch, (tuple, list)) or len(batch) < n_inputs:
                raise TypeError(f"batch {k} is a {type(batch).__name__}; infer_batches takes tensors or tuples "
                                f"whose first {n_inputs} item(s) are the model's inputs")
            yield self.infer(*batch[:n_inputs], **kwargs)

    def to_module(self) -> nn.Module:
        """A torch module (a copy of the compiled model) carrying the sheaf's current weights.

        Every affine edge compiled from module parameters writes its ``(W, b)``
        ([`affine_parts`][cellsheaf_nn.neural.NeuralSheaf.affine_parts]) back, and every parameter the maps hold
        (`parameters`: conv kernels, norm weights, shared weights, ...) is the module's own;
        ``compile(ns.to_module())`` gives the same sheaf.

        Examples
        --------
        >>> import torch, cellsheaf_nn as csnn
        >>> ns = csnn.compile(torch.nn.Sequential(torch.nn.Linear(2, 2)).double())
        >>> ns.parameters["0.weight"][0, 0] = 5.0      # the tensor the weight edge holds
        >>> float(ns.to_module()[0].weight.detach()[0, 0])
        5.0
        """
        model = copy.deepcopy(self._model)
        with torch.no_grad():
            for edge, path, writeback in self._writebacks:
                writeback(model.get_submodule(path or ""), *self.affine_parts(edge))
        for name in self.parameters:
            model.get_parameter(name).requires_grad_(True)
        return model

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for e in self.edge_info.values():
            kinds[e.kind] = kinds.get(e.kind, 0) + 1
        return (f"NeuralSheaf({self.input_shape} -> {self.output_shape}, {len(self.layout)} vertices, "
                f"edges {kinds}, {len(self._pins)} pins)")


def _first(y):
    """The first batch item of an output (a tensor or a tuple of tensors)."""
    return tuple(t[0] for t in y) if isinstance(y, tuple) else y[0]


def _flat_index(info: VertexInfo, c) -> int:
    """A flat index into the neural block of ``info`` from a flat index or an index tuple into its shape."""
    if isinstance(c, (tuple, list)):
        if len(c) != len(info.shape) or not all(-s <= int(i) < s for i, s in zip(c, info.shape)):
            raise IndexError(f"index {tuple(c)} does not fit the per-sample shape {info.shape} of vertex "
                             f"{info.name!r}")
        return int(np.ravel_multi_index(tuple(int(i) % s for i, s in zip(c, info.shape)), info.shape))
    return int(c)


def _export(D: sp.spmatrix, format: str, dtype: torch.dtype):
    if format == "scipy":
        return D.tocsr()
    if format == "torch":
        return to_torch_sparse(D, dtype)
    if format == "dense":
        return torch.as_tensor(D.toarray()).to(dtype)
    raise ValueError(f"format must be 'dense', 'torch' or 'scipy', got {format!r}")
