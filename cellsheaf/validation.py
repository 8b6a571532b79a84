"""The checks of the public boundary, in one place: arrays (`as_real`, `check_finite`) and numbers
(`check_number`). Every entry point of cellsheaf and cellsheaf_nn validates its arguments with these, so a bad
value gives the same clear message, naming the argument, wherever it enters.

Examples
--------
>>> from cellsheaf.validation import check_number
>>> check_number(0.5, "dt")
0.5
>>> check_number(-1, "max_steps", integer=True, none=False)
Traceback (most recent call last):
...
ValueError: max_steps must be a non-negative int, got -1
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["as_real", "check_finite", "check_number", "overflow_message", "check_laplacian_finite",
           "tolerance_scale"]


def check_finite(t: Tensor, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` if ``t`` has NaN or Inf entries."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains NaN or Inf values")


def as_real(values, what: str, dtype: torch.dtype | None = None, finite: bool = True) -> Tensor:
    """``values`` as a real tensor: the one check of numeric input at the public boundary.

    * complex values raise ``TypeError`` (stalks are real; nothing is silently cut to its real part);
    * booleans and integers are cast to ``dtype`` (callers pass the sheaf's or network's dtype;
      ``None`` keeps them as they are, for a caller that casts later); floating values keep their dtype;
    * what ``torch.as_tensor`` cannot read (strings, ragged lists, objects) raises ``TypeError``;
    * NaN and Inf raise ``ValueError`` (unless ``finite=False``).

    Every message names ``what``.

    Examples
    --------
    >>> import torch
    >>> as_real([1, 2], "values", torch.float64)
    tensor([1., 2.], dtype=torch.float64)
    >>> as_real(torch.tensor([1 + 2j]), "values")
    Traceback (most recent call last):
    ...
    TypeError: values must be real, got torch.complex64 values; pass x.real, or split real and imaginary parts into twice the coordinates
    """
    if not isinstance(values, Tensor):
        try:
            values = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            raise TypeError(f"{what} must be a real tensor, array or number, got {type(values).__name__} "
                            f"({err})") from None
    if values.is_complex():
        raise TypeError(f"{what} must be real, got {values.dtype} values; pass x.real, or split real and "
                        "imaginary parts into twice the coordinates")
    if not values.is_floating_point():
        if values.dtype not in _CASTABLE:
            raise TypeError(f"{what} has dtype {values.dtype}; give real numbers")
        if dtype is not None:
            values = values.to(dtype)
    elif values.is_sparse:
        values = values.to_dense()
    if finite:
        check_finite(values, what)
    return values


_CASTABLE = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_number(value, name: str, positive: bool = False, integer: bool = False, none: bool = True):
    """``value`` if it is a finite number ``>= 0`` (``> 0`` with ``positive``; an int with ``integer``),
    else ``ValueError`` naming ``name``; ``None`` passes when ``none``.

    Booleans, strings, complex numbers, NaN and Inf are refused; numpy and 0-d torch scalars are accepted.
    """
    if value is None and none:
        return None
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    ok = isinstance(value, kinds) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value) \
        and value >= 0 and not (positive and value == 0)
    if not ok:
        what = ("a positive" if positive else "a non-negative") + (" int" if integer else " finite number")
        raise ValueError(f"{name} must be {what}{' or None' if none else ''}, got {value!r}")
    return int(value) if integer else value


def _largest_map_entry(S) -> tuple[float, object]:
    """The largest absolute map entry of ``S`` and the edge holding it."""
    worst, name = 0.0, None
    for seg in S._segments:
        if isinstance(seg, dict):
            for e in seg.values():
                for t in e.Fu.tensors() + e.Fv.tensors():
                    t = t.detach().coalesce().values() if t.is_sparse else t.detach()
                    m = float(t.abs().max()) if t.numel() else 0.0
                    if m > worst:
                        worst, name = m, e.name
        else:
            for F in (seg.Fu, seg.Fv):
                if F.numel():
                    per = F.detach().abs().reshape(F.shape[0], -1).amax(1)
                    i = int(per.argmax())
                    if float(per[i]) > worst:
                        worst, name = float(per[i]), seg.name(i)
    return worst, name


def overflow_message(S, dtype) -> str:
    """Why the solve is not finite: name the edge with the largest map entry (its square overflows first)."""
    worst, name = _largest_map_entry(S)
    return (f"the solve is not finite in {dtype}: the Laplacian overflows or cancels catastrophically; edge "
            f"{name!r} has a map entry of size {worst:.3g} (its square enters the Laplacian). Rescale the maps")


def check_laplacian_finite(S, dtype) -> None:
    """Raise ``FloatingPointError`` naming the edge when the assembled Laplacian of a linear sheaf has Inf or
    NaN entries (a map entry beyond the square root of the largest float)."""
    from .operators import _laplacian_csr

    with np.errstate(over="ignore", invalid="ignore"):
        L = _laplacian_csr(S)
    if not np.isfinite(L.data).all():
        raise FloatingPointError(overflow_message(S, dtype))


def tolerance_scale(S, dtype) -> float:
    """``min(1, largest diagonal entry of L)`` for a linear sheaf (1 for a nonlinear one): the factor that makes
    an absolute gradient tolerance meaningful on a sheaf with small maps, where every gradient is small and an
    unscaled ``tol`` would certify the starting point.

    Maps so small that the Laplacian's entries are below ``tiny ** 0.45`` of ``dtype`` (about 1e-139 in
    float64) raise ``FloatingPointError`` naming the edge: the squares in every gradient norm underflow to
    zero there. Multiplying every map by one constant does not change a minimiser, so rescale them.
    """
    if not S.linear or S.C0 == 0:
        return 1.0
    from .operators import _laplacian_csr

    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        d = float(np.abs(_laplacian_csr(S).diagonal()).max(initial=0.0))
    if not math.isfinite(d):
        return 1.0
    floor = float(torch.finfo(dtype).tiny) ** 0.45
    if d < floor:
        worst, name = _largest_map_entry(S)
        if worst > 0:
            raise FloatingPointError(f"the maps are too small for {dtype}: the Laplacian's largest entry is "
                                     f"{d:.3g} (edge {name!r} has the largest map entry, {worst:.3g}), so gradient "
                                     "norms underflow to zero. Multiply every map by one constant (the "
                                     "minimiser does not change)")
    return min(1.0, d)
