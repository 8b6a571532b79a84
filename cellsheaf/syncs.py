"""Host round trips: how often the iterative solvers read their convergence test, and which routes
copy a sheaf to the CPU.

Reading a tensor on the host (``.item()``, ``bool(t)``, ``float(t)``) makes the
CPU wait for the device: on a GPU a solver that tests convergence on every
iteration stalls the queue on every iteration. The loops of [`cellsheaf.linalg.cg`][cellsheaf.linalg.cg],
[`cellsheaf.diffuse`][cellsheaf.diffuse] and `cellsheaf.lobpcg` therefore fuse their tests into one
reduction and read it every `check_every` iterations: every iteration on the CPU
(where reading is free and an extra iteration is not), every 8 elsewhere. Checking
less often only adds iterations past convergence (counted in the reports); it
never stops a loop early.

The scipy routes (sparse LU factorisations, exact rank, ARPACK, the exact heat
kernel, ``format="scipy"`` exports) assemble the operator on the CPU whatever the
sheaf's device; `notice_cpu_route` warns once per process and device type when one
of them runs on a sheaf that lives elsewhere.

Set ``cellsheaf.syncs.CHECK_EVERY`` to an integer to override the choice for every
device (``None`` restores it). `count_syncs` counts the host reads of a block of code
(on any device, the CPU included), which is how `benchmarks/bench_syncs.py` audits
the loops.

Examples
--------
>>> import torch
>>> from cellsheaf import syncs
>>> syncs.check_every(torch.device("cpu")), syncs.check_every(torch.device("meta"))
(1, 8)
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch

__all__ = ["CHECK_EVERY", "DEVICE_CHECK_EVERY", "check_every", "count_syncs", "notice_cpu_route"]

_READS = ("item", "__bool__", "__float__", "__int__", "tolist", "nonzero")

CHECK_EVERY: int | None = None
"""Override: check convergence every this many iterations on every device (``None``: by device)."""

DEVICE_CHECK_EVERY = 8
"""Iterations between convergence checks off the CPU."""


_NOTICED: set[str] = set()


def notice_cpu_route(device) -> None:
    """Warn, once per process and device type, that a scipy route copies a sheaf on ``device`` to the CPU.

    Nothing happens for a CPU sheaf.

    Examples
    --------
    >>> import torch
    >>> from cellsheaf.syncs import notice_cpu_route
    >>> notice_cpu_route(torch.device("cpu"))  # silent
    """
    kind = torch.device(device).type
    if kind == "cpu" or kind in _NOTICED:
        return
    _NOTICED.add(kind)
    warnings.warn(f"cellsheaf: a scipy route (sparse LU, exact rank, ARPACK, the exact heat kernel or a "
                  f"format='scipy' export) assembles this {kind} sheaf's operator on the CPU and copies results "
                  "back; the matrix-free routes (method='cg', diffusion, Newton, eigenpairs(method='lobpcg')) stay "
                  "on the device (warned once per process)", UserWarning, stacklevel=3)


def check_every(device) -> int:
    """Iterations between two convergence checks (host syncs) of a loop running on ``device``."""
    if CHECK_EVERY is not None:
        return max(1, int(CHECK_EVERY))
    return 1 if torch.device(device).type == "cpu" else DEVICE_CHECK_EVERY


@contextlib.contextmanager
def count_syncs() -> Iterator[list[int]]:
    """Count the host reads of tensors while the block runs: ``.item()``, ``bool``, ``float``, ``int``,
    ``.tolist()`` and ``nonzero`` (each a device sync on a GPU; torch has no counter for them).

    Yields a one-item list that holds the count. It wraps methods of ``torch.Tensor`` for the
    duration of the block: for audits and tests in one thread, not for production code.

    Examples
    --------
    >>> import torch
    >>> from cellsheaf.syncs import count_syncs
    >>> with count_syncs() as n:
    ...     _ = float(torch.ones(3).sum()), bool(torch.ones(1) > 0)
    >>> n[0]
    2
    """
    count = [0]
    saved = {m: getattr(torch.Tensor, m) for m in _READS}
    saved_nonzero = torch.nonzero

    def counted(f):
        def read(*args, **kwargs):
            count[0] += 1
            return f(*args, **kwargs)
        return read

    try:
        for m, f in saved.items():
            setattr(torch.Tensor, m, counted(f))
        torch.nonzero = counted(saved_nonzero)
        yield count
    finally:
        for m, f in saved.items():
            setattr(torch.Tensor, m, f)
        torch.nonzero = saved_nonzero
