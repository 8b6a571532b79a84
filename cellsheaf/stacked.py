"""Stacked edge storage: many edges of one shape, their maps held as ``(E, d_e, d)`` tensors.

An [`EdgeStack`][cellsheaf.stacked.EdgeStack] is one of the two storages behind a [`cellsheaf.Sheaf`][cellsheaf.sheaf.Sheaf] (the
other keeps one [`cellsheaf.Edge`][cellsheaf.sheaf.Edge] record per edge). It is what
[`Sheaf.from_arrays`][cellsheaf.sheaf.Sheaf.from_arrays] and [`Sheaf.add_edges`][cellsheaf.sheaf.Sheaf.add_edges] create: endpoints as an
``(2, E)`` index (positions in the vertex order), restriction maps as stacked
tensors — dense ``(E, d_e, d_u)`` / ``(E, d_e, d_v)`` or diagonal ``(E, d)``
(applied elementwise, never densified) — and optional ``(E,)`` weights.
Operators use the stack as one unit of computation: index tensors once,
values per call.

Map tensors are held by reference (no copy), so maps that require grad keep
their autograd graph. Complex and non-finite values are refused; integer and
boolean maps are cast to float64 (exact for integers up to ``2**53``).

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf.from_arrays([2, 2, 2], torch.tensor([[0, 1], [1, 2]]),
...                          torch.eye(2).expand(2, 2, 2), torch.eye(2).expand(2, 2, 2))
>>> S.cohomology().h0
2
>>> S.edge(1).u, S.edge(1).v
(1, 2)
"""

from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np
import torch
from torch import Tensor

from . import maps as _maps

__all__ = ["EdgeStack", "check_map", "check_stack", "as_map_tensor", "first_bad_row", "bad_weight_row"]


def as_map_tensor(F, what: str) -> Tensor:
    """``F`` as a real floating tensor: integers and booleans cast to float64; complex refused."""
    if isinstance(F, np.ndarray) or isinstance(F, (list, tuple)):
        arr = np.asarray(F)
        if np.iscomplexobj(arr):
            raise TypeError(f"{what} is complex; restriction maps must be real (split real and imaginary parts "
                            "into a real map of twice the dimension)")
        F = torch.as_tensor(arr)
    if not isinstance(F, Tensor):
        raise TypeError(f"{what} must be a torch tensor or numpy array, got {type(F).__name__}")
    if F.is_complex():
        raise TypeError(f"{what} is complex; restriction maps must be real (split real and imaginary parts into a "
                        "real map of twice the dimension)")
    if not F.is_floating_point():
        F = F.to(torch.float64)
    return F


def first_bad_row(F: Tensor) -> int | None:
    """Index along the first axis of the first slice with a NaN or Inf entry (None if all are finite)."""
    values = F.detach()
    if values.is_sparse:
        values = values.coalesce().values()
    if values.numel() == 0:
        return None
    if values.dim() == 0:
        values = values.reshape(1)
    values = values.reshape(values.shape[0], -1)
    if values.device.type == "cpu" and values.dtype in (torch.float16, torch.float32, torch.float64):
        finite = np.isfinite(values.numpy()).all(1)  # numpy: a few µs on a small map, where torch takes ~100
        return None if finite.all() else int(np.nonzero(~finite)[0][0])
    finite = torch.isfinite(values).all(1)
    return None if bool(finite.all()) else int(torch.nonzero(~finite)[0])


def check_map(F, edge: Hashable, side: str) -> _maps.Map:
    """Coerce ``F`` into a map of edge ``edge`` (``side`` is ``"Fu"``/``"Fv"``), refusing complex and NaN/Inf values.

    Integer and boolean tensors/arrays are cast to float64.

    Examples
    --------
    >>> import torch
    >>> check_map(torch.tensor([[1, 2]]), "e", "Fu").matrix().dtype
    torch.float64
    """
    if not isinstance(F, _maps.Map) and not _is_scipy_sparse(F):
        F = as_map_tensor(F, f"edge {edge!r}: {side}")
    F = _maps.as_map(F)
    for t in F.tensors():
        if t.is_complex():
            raise TypeError(f"edge {edge!r}: {side} holds a complex tensor; restriction maps must be real")
        if t.is_floating_point() and t.numel() and first_bad_row(t.reshape(1, -1) if not t.is_sparse else t) \
                is not None:
            raise ValueError(f"edge {edge!r}: {side} has NaN or Inf entries; restriction maps must be finite")
    return F


def _is_scipy_sparse(F) -> bool:
    import scipy.sparse as sp

    return sp.issparse(F)


class EdgeStack:
    """``E`` edges of one shape: endpoints, stacked maps, weights and names.

    Parameters
    ----------
    index : (2, E) long tensor
        Positions (in the sheaf's vertex order) of the tails ``u`` and heads ``v``.
    Fu, Fv : tensors
        ``(E, d_e, d_u)`` and ``(E, d_e, d_v)`` dense maps, or ``(E, d)`` diagonal maps
        (then ``d_e = d_u = d_v = d``); both of the same kind.
    weights : (E,) tensor, optional
        Positive finite edge weights (all 1 when omitted).
    names : sequence, optional
        Edge names; by default the integers ``name0, name0 + 1, ...``.
    """

    __slots__ = ("index", "Fu", "Fv", "weights", "_names", "name0", "_rows", "version")

    def __init__(self, index: Tensor, Fu: Tensor, Fv: Tensor, weights: Tensor | None = None,
                 names: Sequence[Hashable] | None = None, name0: int = 0):
        self.index, self.Fu, self.Fv, self.weights = index, Fu, Fv, weights
        self._names = None if names is None else list(names)
        self.name0 = name0
        self._rows: dict | None = None
        self.version = 0

    # ---------------------------------------------------------------- shape
    @property
    def diagonal(self) -> bool:
        """Whether the maps are diagonal ``(E, d)`` stacks (applied elementwise)."""
        return self.Fu.dim() == 2

    def __len__(self) -> int:
        return self.index.shape[1]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(d_u, d_v, d_e)``."""
        if self.diagonal:
            d = self.Fu.shape[1]
            return d, d, d
        return self.Fu.shape[2], self.Fv.shape[2], self.Fu.shape[1]

    @property
    def requires_grad(self) -> bool:
        """Whether a map or weight tensor requires grad."""
        return self.Fu.requires_grad or self.Fv.requires_grad or (
            self.weights is not None and self.weights.requires_grad)

    def tensors(self) -> list[Tensor]:
        """The value tensors (maps, then weights if any)."""
        return [self.Fu, self.Fv] + ([] if self.weights is None else [self.weights])

    def token(self) -> tuple:
        """Identity and in-place version of the value tensors: equal tokens mean equal values."""
        return (self.version,) + tuple((id(t), t._version) for t in self.tensors())

    # ---------------------------------------------------------------- names
    def name(self, k: int) -> Hashable:
        """Name of row ``k``."""
        return self.name0 + k if self._names is None else self._names[k]

    def names(self) -> list[Hashable]:
        """All names in row order."""
        return list(range(self.name0, self.name0 + len(self))) if self._names is None else list(self._names)

    def row(self, name: Hashable) -> int | None:
        """Row of edge ``name`` (None if it is not in this stack)."""
        if self._names is None:
            if isinstance(name, (int, np.integer)) and not isinstance(name, bool) and \
                    self.name0 <= name < self.name0 + len(self):
                return int(name) - self.name0
            return None
        if self._rows is None:
            self._rows = {n: k for k, n in enumerate(self._names)}
        try:
            return self._rows.get(name)
        except TypeError:  # unhashable
            return None

    # ---------------------------------------------------------------- views
    def maps(self, k: int) -> tuple[_maps.Map, _maps.Map]:
        """The two maps of row ``k`` as map objects (views of the stacked tensors)."""
        if self.diagonal:
            return _maps.Diagonal(self.Fu[k]), _maps.Diagonal(self.Fv[k])
        return _maps.Linear(self.Fu[k]), _maps.Linear(self.Fv[k])

    def weight(self, k: int) -> float:
        """Weight of row ``k`` as a float."""
        return 1.0 if self.weights is None else float(self.weights[k])

    def select(self, keep: Tensor, index: Tensor | None = None) -> "EdgeStack":
        """A stack with the rows ``keep`` (a boolean mask), optionally with a new endpoint index."""
        names = self.names()
        kept = [names[k] for k in torch.nonzero(keep).flatten().tolist()]
        index = self.index if index is None else index
        w = None if self.weights is None else self.weights[keep]
        return EdgeStack(index[:, keep], self.Fu[keep], self.Fv[keep], w, names=kept)

    def to(self, dtype: torch.dtype | None = None, device=None) -> None:
        """Move the tensors in place (floating tensors take ``dtype``)."""
        self.index = self.index.to(device=device)
        self.Fu, self.Fv = (F.to(dtype=dtype or F.dtype, device=device) for F in (self.Fu, self.Fv))
        if self.weights is not None:
            self.weights = self.weights.to(dtype=dtype or self.weights.dtype, device=device)
        self.version += 1


def check_stack(Fu, Fv, E: int | None, where: str) -> tuple[Tensor, Tensor]:
    """Stacked maps as real tensors of matching shapes: ``(E, d_e, d_u)``/``(E, d_e, d_v)`` or diagonal ``(E, d)``.

    Finiteness is checked by the caller ([`first_bad_row`][cellsheaf.stacked.first_bad_row]), which knows the edge names.
    """
    Fu, Fv = as_map_tensor(Fu, f"{where}: Fu"), as_map_tensor(Fv, f"{where}: Fv")
    if Fu.dim() != Fv.dim() or Fu.dim() not in (2, 3):
        raise ValueError(f"{where}: Fu and Fv must both be (E, d_e, d) dense stacks or both (E, d) diagonal stacks, "
                         f"got shapes {tuple(Fu.shape)} and {tuple(Fv.shape)}")
    if Fu.shape[0] != Fv.shape[0] or (E is not None and Fu.shape[0] != E):
        raise ValueError(f"{where}: Fu has {Fu.shape[0]} maps and Fv {Fv.shape[0]}; expected one per edge"
                         + (f" ({E})" if E is not None else ""))
    if Fu.shape[1] != Fv.shape[1]:
        raise ValueError(f"{where}: Fu maps to dim {Fu.shape[1]} but Fv to dim {Fv.shape[1]}; edge stalks must agree")
    return Fu, Fv


def bad_weight_row(w: Tensor) -> int | None:
    """First row whose weight is not positive and finite (None if all are)."""
    ok = torch.isfinite(w.detach()) & (w.detach() > 0)
    return None if bool(ok.all()) else int(torch.nonzero(~ok)[0])
