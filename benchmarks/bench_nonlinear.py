"""Nonlinear solvers on a sheaf of the neural shape: Euler gradient flow vs Gauss–Newton vs propagation.

The sheaf is written by hand (no compiler): the path ``x - z1 - a1 - z2 - a2 - z3 - y``
(7 vertices) of a ReLU network with three dense ``width x width`` layers, the paper's
extended stalks (ones blocks as stubborn coordinates, Eqs. 10-17), the input fixed,
a batch of ``B`` inputs, float64. Each method runs to a free-gradient norm of
``1e-10`` (the Euler flow with its default step ``1/λ_max``); the report gives median
wall times, iterations, the final gradient norm, the agreement of the solutions and
the ratios against the Euler baseline measured in the same process.

Run ``python benchmarks/bench_nonlinear.py`` (width 256, B = 256) or ``--quick``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import cellsheaf as cs
from cellsheaf import maps as M


def neural_path(width: int, batch: int, seed: int = 0) -> tuple[cs.Sheaf, cs.Boundary]:
    """The 3-layer ReLU network ``width -> width -> width -> width`` as a sheaf, and its boundary data."""
    rng = np.random.default_rng(seed)
    n = width
    S = cs.Sheaf()
    S.add_vertex("x", 2 * n)
    for ell in (1, 2):
        S.add_vertex(f"z{ell}", n)
        S.add_vertex(f"a{ell}", 2 * n)
    S.add_vertex("z3", n)
    S.add_vertex("y", n)
    for ell, prev in ((1, "x"), (2, "a1"), (3, "a2")):
        W = rng.standard_normal((n, n)) * np.sqrt(1.0 / n)
        b = 0.1 * rng.standard_normal(n)
        S.add_edge(prev, f"z{ell}", torch.as_tensor(np.hstack([W, np.diag(b)])), M.Identity(n), name=f"w{ell}")
        if ell < 3:
            S.add_edge(f"z{ell}", f"a{ell}", M.ReLU(n), M.Select(range(n), 2 * n), name=f"r{ell}")
    S.add_edge("z3", "y", M.Identity(n), M.Identity(n), name="out")
    X = torch.as_tensor(rng.standard_normal((batch, n)))
    ones = torch.ones(n, dtype=torch.float64)
    boundary = cs.Boundary().fix("x", torch.cat([X, ones.expand(batch, n)], 1))
    for ell in (1, 2):
        boundary.fix(f"a{ell}", ones, coords=range(n, 2 * n))
    return S, boundary


def run(method: str, S, boundary, repeats: int) -> tuple[float, cs.Result]:
    times, res = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = cs.minimize(S, boundary, method=method, tol=1e-10, max_iter=200_000 if method == "euler" else None)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="width 64, B = 32 (seconds instead of minutes)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the fast methods (Euler runs once)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    width = args.width or (64 if args.quick else 256)
    batch = args.batch or (32 if args.quick else 256)
    S, boundary = neural_path(width, batch)
    print(f"neural path sheaf: 7 vertices, width {width}, B = {batch}, float64, C0 = {S.C0}, "
          f"{torch.get_num_threads()} torch thread(s)", flush=True)
    results = {}
    for method in ("euler", "newton", "propagate"):
        results[method] = run(method, S, boundary, 1 if method == "euler" else args.repeats)
        print(f"  {method}: {results[method][0]:.3f} s", flush=True)
    base_t, base = results["euler"]
    print(f"{'method':<10} {'median s':>10} {'iterations':>11} {'grad norm':>10} {'max |x - x_euler|':>18} "
          f"{'speed-up vs euler':>18}")
    for method, (t, res) in results.items():
        diff = float((res.x.flat - base.x.flat).abs().max())
        print(f"{method:<10} {t:>10.4f} {res.iterations:>11d} {res.residual:>10.2e} {diff:>18.2e} "
              f"{base_t / t:>17.1f}x" + ("" if res.converged else "  (NOT converged)"))
    extra = results["newton"][1].extra
    print(f"newton: {extra['cg_iterations']} CG iterations in total (each one matrix-free product with J^T J)")


if __name__ == "__main__":
    main()
