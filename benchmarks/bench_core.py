"""Core benchmark: build a large random sheaf, assemble L, matrix-free Lx vs torch.sparse.mm, harmonic extension.

A random sheaf with 100 000 vertices (stalk dim 3) and 300 000 edges with random
3×3 maps (``--quick``: 10 000 and 30 000). Prints medians over repeats and the
ratio of matrix-free ``apply_laplacian`` to one ``torch.sparse.mm`` with the
assembled ``L`` (measured in the same process; target ≤ 2×).

Run::

    python benchmarks/bench_core.py [--quick] [--repeats 5] [--batch 16] [--threads N] [--clock wall|cpu]
                                    [--no-harmonic] [--harmonic-method auto|direct|cg]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch

import cellsheaf as cs
from cellsheaf.operators import apply_laplacian


CLOCK = time.perf_counter


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median time of ``fn()`` over ``repeats`` runs (on `CLOCK`), and its last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = CLOCK()
        out = fn()
        times.append(CLOCK() - t0)
    return statistics.median(times), out


def random_data(n: int, m: int, d: int, seed: int = 0):
    """Endpoints and stacked random maps of ``m >= n`` edges on ``n`` vertices.

    The first ``n`` edges form a random Hamiltonian cycle (so the graph is connected and
    the harmonic extension with some vertices fixed is unique); the others join random pairs.
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    u = np.concatenate([perm, rng.integers(0, n, m - n)])
    v = np.concatenate([np.roll(perm, -1), np.zeros(m - n, dtype=np.int64)])
    v[n:] = (u[n:] + rng.integers(1, n, m - n)) % n  # no self-loops
    Fu = torch.as_tensor(rng.standard_normal((m, d, d)))
    Fv = torch.as_tensor(rng.standard_normal((m, d, d)))
    return u.tolist(), v.tolist(), Fu, Fv


def build(n: int, d: int, u, v, Fu, Fv) -> cs.Sheaf:
    S = cs.Sheaf()
    for i in range(n):
        S.add_vertex(i, d)
    for k in range(len(u)):
        S.add_edge(u[k], v[k], Fu[k], Fv[k], name=k)
    return S


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10x smaller sheaf")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or process CPU time (steadier on a shared machine with --threads 1)")
    ap.add_argument("--harmonic-method", default="cg", choices=["auto", "direct", "cg"],
                    help="method of harmonic_extension; 'direct' (sparse LU) fills in on random expander graphs")
    ap.add_argument("--no-harmonic", action="store_true", help="skip the harmonic extension")
    ap.add_argument("--no-rank", action="store_true", help="skip cohomology, CG per iteration and eigenpairs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    n, m, d = (10_000, 30_000, 3) if args.quick else (100_000, 300_000, 3)
    r = args.repeats
    print(f"random sheaf: {n} vertices, stalk dim {d}, {m} edges with random {d}x{d} maps; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.clock} clock, medians of {r} repeats")

    u, v, Fu, Fv = random_data(n, m, d)
    t_build, S = timed(lambda: build(n, d, u, v, Fu, Fv), max(1, min(r, 3)))
    print(f"build (add_vertex/add_edge loop):      {t_build:8.3f} s   ({1e6 * t_build / m:.1f} µs per edge)")

    def assemble():
        S._cache.clear()
        return S.laplacian()  # plan + δ (scipy) + L = δᵀWδ + torch sparse export

    t_asm, L = timed(assemble, r)
    print(f"assemble L (torch sparse, {L._nnz()} nnz):  {t_asm:8.3f} s")

    for dtype in (torch.float64, torch.float32):
        X = torch.randn(args.batch, S.C0, dtype=dtype)
        Ld = L.to(dtype)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            Lcsr = Ld.to_sparse_csr()
        XT = X.T.contiguous()
        apply_laplacian(S, X)  # warm the plan and the stacked maps
        t_mf, Y = timed(lambda: apply_laplacian(S, X), r)
        t_coo, Z = timed(lambda: torch.sparse.mm(Ld, XT), r)
        t_csr, _ = timed(lambda: torch.sparse.mm(Lcsr, XT), r)
        err = float((Y - Z.T).abs().max() / Z.abs().max())
        print(f"[{str(dtype).removeprefix('torch.')}] B={args.batch}: matrix-free Lx {1e3 * t_mf:8.2f} ms | "
              f"torch.sparse.mm COO {1e3 * t_coo:8.2f} ms | CSR {1e3 * t_csr:8.2f} ms | "
              f"ratio matrix-free/COO {t_mf / t_coo:5.2f}x, /CSR {t_mf / t_csr:5.2f}x (target <= 2x) | "
              f"max rel diff {err:.1e}")

    if not args.no_rank:
        rank_rows(S, args)
    if args.no_harmonic:
        return
    rng = np.random.default_rng(1)
    fixed = rng.choice(n, n // 10, replace=False)
    b = cs.Boundary()
    for i in fixed.tolist():
        b.fix(i, torch.as_tensor(rng.standard_normal((args.batch, d))))
    rb = b.resolve(S)
    t_harm, sol = timed(lambda: cs.harmonic_extension(S, b, method=args.harmonic_method), max(1, min(r, 3)))
    x = sol.flat
    LOO_free = apply_laplacian(S, x)[:, rb.free]  # the free rows of L x vanish at the harmonic extension
    zero = torch.zeros_like(x)
    zero[:, rb.fixed] = rb.values.to(x.dtype)
    ref = apply_laplacian(S, zero)[:, rb.free]
    res = float(LOO_free.norm() / ref.norm())
    info = sol.info
    print(f"harmonic extension ({len(fixed)} of {n} vertices fixed, B={args.batch}): {t_harm:8.3f} s, "
          f"method={info.method}, iterations={info.iterations}, relative residual "
          f"||L[Ω,:]x||/||L[Ω,U]u|| = {res:.2e} (solver reports {info.residual:.2e})")


# ---------------------------------------------------------------------------- rank decisions, CG, spectra


def rank_rows(S: cs.Sheaf, args) -> None:
    """Cohomology of the big sheaf, CG per iteration against scipy's CG, eigenpairs of a 2k-node sheaf."""
    t, H = timed(lambda: S.cohomology(), 1)
    dec = H.decision
    print(f"cohomology ({S.C0} x {S.C1} coboundary): {t:8.3f} s, h0={H.h0} h1={H.h1}, certified={dec.certified} "
          f"({dec.certificate}), gap={H.gap:.3g}")
    bench_cg(S, args.batch, max(1, min(args.repeats, 3)))
    bench_eigenpairs(max(1, min(args.repeats, 3)))


def bench_cg(S: cs.Sheaf, batch: int, repeats: int, iters: int = 50) -> None:
    """``cellsheaf.linalg.cg`` on ``(L + I)`` with ``batch`` columns against scipy's CG column by column.

    Both run exactly ``iters`` iterations (tolerance 0) with the same CSR matrix (torch CSR for
    cellsheaf, scipy CSR for scipy); target: time per iteration <= 1.2x scipy's per column x columns.
    """
    import scipy.sparse as sp
    import scipy.sparse.linalg as spla

    from cellsheaf.linalg import cg
    from cellsheaf.operators import to_torch_sparse

    A = (S.laplacian(format="scipy") + sp.identity(S.C0, format="csr")).tocsr()
    At = to_torch_sparse(A, torch.float64, layout=torch.sparse_csr)
    dinv = torch.as_tensor(1.0 / A.diagonal())
    B = torch.randn(batch, S.C0, dtype=torch.float64)
    with torch.no_grad():
        t_cs, (_, info) = timed(lambda: cg(lambda w: (At @ w.T).T, B, precond=dinv, tol=0.0, maxiter=iters,
                                           restarts=0), repeats)
    M = sp.diags(1.0 / A.diagonal())
    b0 = B[0].numpy()
    t_sp, _ = timed(lambda: spla.cg(A, b0, rtol=0.0, atol=0.0, maxiter=iters, M=M), repeats)
    per_cs, per_sp = t_cs / info.iterations, t_sp / iters
    print(f"CG per iteration (B={batch}): cellsheaf {1e3 * per_cs:8.3f} ms | scipy per column x B "
          f"{1e3 * per_sp * batch:8.3f} ms | ratio {per_cs / (per_sp * batch):5.2f}x (target <= 1.2x)")


def bench_eigenpairs(repeats: int, n: int = 2000, m: int = 10_000, d: int = 3, k: int = 8) -> None:
    """The ``k`` smallest eigenpairs of the normalised Laplacian of a random sheaf with ``n`` vertices."""
    u, v, Fu, Fv = random_data(n, m, d, seed=2)
    S = build(n, d, u, v, Fu, Fv)
    t, pairs = timed(lambda: cs.eigenpairs(S, k, normalized=True), repeats)
    info = pairs.info
    print(f"eigenpairs ({k} smallest, normalised L, {n} vertices, d={d}, {m} edges): {t:8.3f} s, route={info.method}, "
          f"operator applications={info.iterations}, residual={info.residual:.1e}, "
          f"values {pairs.values[0]:.4f}..{pairs.values[-1]:.4f}")


if __name__ == "__main__":
    main()
