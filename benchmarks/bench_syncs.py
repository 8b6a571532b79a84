"""Host syncs per call: how often the hot loops convert a tensor to a Python value.

On a GPU every ``.item()``, ``bool(tensor)``, ``float(tensor)``, ``int(tensor)``,
``.tolist()`` and ``nonzero`` waits for the device. torch has no counter for
them on the CPU, so this script counts them by wrapping those methods of
``torch.Tensor`` (and ``torch.nonzero``) around a representative call of each
hot loop (`cellsheaf.syncs.count_syncs`): batched CG, Euler diffusion to a
tolerance, Newton inference with pins, propagation inference, and the LOBPCG
eigensolver. It prints the count, the iterations of the loop and their ratio
(a call's count includes its set-up: checks of the maps and the boundary, the
propagation attempt before Newton), and for Newton the reads inside its loop
and inside its CG solves; ``--check-every`` sets how often the loops check
convergence (the default off the CPU is 8; on the CPU 1).

Run::

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_syncs.py [--check-every 8]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator

import torch

import cellsheaf as cs
import cellsheaf_nn as csnn
from cellsheaf import syncs
from cellsheaf.linalg import cg

def cases() -> dict:
    """Representative calls of each hot loop: name -> (function returning its iteration count)."""
    g = torch.Generator().manual_seed(0)
    n = 400
    M = torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5
    A = M @ M.T + 0.05 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(16, n, generator=g, dtype=torch.float64)
    path = cs.Sheaf.from_arrays([1] * 60, torch.stack([torch.arange(59), torch.arange(1, 60)]),
                                torch.ones(59, 1, 1, dtype=torch.float64), torch.ones(59, 1, 1, dtype=torch.float64))
    x0 = torch.randn(4, 60, generator=g, dtype=torch.float64)
    bnd = cs.Boundary().fix(0, torch.zeros(4, 1, dtype=torch.float64)).fix(59, torch.ones(4, 1, dtype=torch.float64))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).double()
    ns = csnn.compile(model)
    X = torch.randn(64, 8, generator=g, dtype=torch.float64)
    pinned = csnn.compile(model)
    pinned.pin("z2", [0], torch.zeros(64, 1, dtype=torch.float64))
    deep = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 4)).double()
    two_pins = csnn.compile(deep)
    two_pins.pin("z3", [0, 1], torch.full((64, 2), 0.5, dtype=torch.float64))
    sheaf = cs.Sheaf.from_arrays([2] * 300, torch.randint(300, (2, 1200), generator=g),
                                 torch.randn(1200, 2, 2, generator=g, dtype=torch.float64),
                                 torch.randn(1200, 2, 2, generator=g, dtype=torch.float64))
    return {
        "cg (16 right-hand sides, n=400)": lambda: cg(lambda v: v @ A, b, tol=1e-10)[1].iterations,
        "diffuse to tol (path, 60 vertices, B=4)": lambda: cs.diffuse(path, x0, boundary=bnd, tol=1e-6,
                                                                       max_steps=200_000).iterations,
        "ns.infer, propagation (B=64)": lambda: ns.infer(X, return_state=True)[1].info.iterations,
        "ns.infer, Newton with a pin (B=64)": lambda: pinned.infer(X, return_state=True)[1].info.iterations,
        "ns.infer, Newton, tanh/ReLU, 2 pins (B=64)": lambda: two_pins.infer(X, return_state=True)[1].info.iterations,
        "eigenpairs lobpcg (8 smallest, C0=600)": lambda: cs.eigenpairs(sheaf, 8, normalized=True,
                                                                        method="lobpcg").info.iterations,
    }


@contextlib.contextmanager
def newton_reads() -> Iterator[dict]:
    """Count the host reads inside `cellsheaf.gauss_newton.newton` and inside the CG solves it runs."""
    counts = {"newton": 0, "cg": 0}
    minimize, gn = sys.modules["cellsheaf.minimize"], sys.modules["cellsheaf.gauss_newton"]
    saved_newton, saved_cg = minimize.newton, gn.cg

    def counted(f, key):
        def run(*args, **kwargs):
            with syncs.count_syncs() as n:
                out = f(*args, **kwargs)
            counts[key] += n[0]
            return out
        return run

    minimize.newton, gn.cg = counted(saved_newton, "newton"), counted(saved_cg, "cg")
    try:
        yield counts
    finally:
        minimize.newton, gn.cg = saved_newton, saved_cg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check-every", type=int, default=None,
                    help="convergence checks every this many iterations (default: 1 on the CPU, 8 elsewhere)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    syncs.CHECK_EVERY = args.check_every
    print(f"host syncs per call (check every {syncs.check_every('cpu')} iteration(s)):")
    for name, fn in cases().items():
        fn()  # warm-up: plans and caches
        with syncs.count_syncs() as count, newton_reads() as inner:
            its = fn()
        print(f"  {name:<42} {count[0]:6d} syncs   {its:6d} iterations   {count[0] / max(its, 1):6.2f} per iteration")
        if inner["newton"]:
            own = inner["newton"] - inner["cg"]
            print(f"    {'of which in the Newton loop, its CG aside':<40} {own:6d} syncs   {its:6d} iterations   "
                  f"{own / max(its, 1):6.2f} per iteration")
            print(f"    {'of which in its CG solves':<40} {inner['cg']:6d} syncs   {its:6d} iterations   "
                  f"{inner['cg'] / max(its, 1):6.2f} per iteration")


if __name__ == "__main__":
    main()
