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

__all__ = ["as_real", "check_finite", "check_number"]


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
