"""Core benchmark: bulk construction and operators of a large random sheaf, against baselines in the same process.

A random sheaf with 100 000 vertices (stalk dim 3) and 300 000 edges with random 3×3 maps
(``--quick``: 10 000 and 30 000), built with ``Sheaf.from_arrays``. Every row prints medians over
repeats and the ratio to its baseline measured in the same process (the machine may be loaded:
ratios, not absolute times, are the figures to quote; a row and its baseline are timed alternately). Rows, one function each (``ROWS``):

- ``build``: ``from_arrays`` (time, bytes held per edge) vs an ``add_edge`` loop on a slice of the edges;
- ``assembly``: ``S.laplacian(format="scipy")`` from scratch vs a vectorised numpy/scipy build of ``δᵀδ``;
- ``lx``: ``apply_laplacian`` on ``B`` columns vs ``torch.sparse.mm`` with the same ``L`` in CSR, without
  gradients and with maps that require grad (the sheaf-neural-network path, through the maps);
- ``spec``: JSON dump and load of 50 000 stacked edges vs the per-edge spec of the same sheaf;
- ``cohomology``, ``cg``, ``eigenpairs``: cohomology of the big sheaf, CG per iteration against scipy's CG,
  eigenpairs of a 2k-vertex sheaf (``--no-rank`` skips them);
- ``harmonic``: harmonic extension with a tenth of the vertices fixed;
- ``uniqueness``: ``Boundary.resolve`` and the relative H⁰ of that boundary: propagation from the boundary
  (the default) against the full rank decision (``method="sparse"``);
- ``nonunique``: a harmonic extension by CG whose free part has one large component (a quarter of ``n``
  vertices, a planted section) touching no boundary: ``NonUniqueError``, then ``allow_nonunique=True``;
- ``kernel``: cohomology of the big random sheaf with one planted global section (h0 = 1): a large
  component with a kernel and no small separators, decided without a factorisation;
- ``grid``: cohomology of a 200×200 grid with O(2) maps (``--quick``: 60×60), flat (a gauge of the constant
  sheaf, h0 = 2) and generic (random rotations, h0 = 0), on the default route;
- ``million`` (only with ``--big``, it takes minutes): a 10⁶-vertex, 3·10⁶-edge sheaf (``--quick``: 10⁵):
  build, harmonic extension by CG (uniqueness certified first), peak RSS of the process
  (``--big --rows million`` alone for a clean peak).

Run::

    python benchmarks/bench_core.py [--quick] [--rows build,assembly,lx,spec,cohomology,kernel,cg,eigenpairs,harmonic,uniqueness,nonunique,grid] [--big]
                                    [--repeats 5] [--batch 16] [--threads 1] [--clock wall|cpu] [--harmonic-method cg]
                                    [--no-rank] [--no-harmonic]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
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


def timed_pair(fn, base, repeats: int) -> tuple[tuple[float, object], tuple[float, object]]:
    """`timed` for ``fn`` and its baseline ``base``, run alternately (a load that comes and goes on a shared
    machine then hits both alike): the median time and last result of each."""
    times, outs = ([], []), [None, None]
    for _ in range(repeats):
        for k, f in enumerate((fn, base)):
            t0 = CLOCK()
            outs[k] = f()
            times[k].append(CLOCK() - t0)
    return (statistics.median(times[0]), outs[0]), (statistics.median(times[1]), outs[1])


def random_data(n: int, m: int, d: int, seed: int = 0):
    """``edge_index (2, m)`` and stacked random maps of ``m >= n`` edges on ``n`` vertices.

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
    return torch.as_tensor(np.stack([u, v])), Fu, Fv


def per_edge_build(n: int, d: int, index: torch.Tensor, Fu, Fv) -> cs.Sheaf:
    """The same sheaf built one ``add_edge`` at a time (the baseline of ``build`` and ``spec``)."""
    S = cs.Sheaf()
    for i in range(n):
        S.add_vertex(i, d)
    u, v = index.tolist()
    for k, (Mu, Mv) in enumerate(zip(Fu.unbind(0), Fv.unbind(0))):
        S.add_edge(u[k], v[k], Mu, Mv, name=k)
    return S


def scipy_laplacian(n: int, d: int, index: torch.Tensor, Fu, Fv) -> sp.csr_matrix:
    """A vectorised numpy/scipy build of ``L = δᵀδ`` (the baseline of ``assembly``)."""
    u, v = index.numpy()
    m = u.size
    e = np.arange(m * d).reshape(m, d)
    rows = np.broadcast_to(e[:, :, None], (m, d, d)).ravel()
    cu = np.broadcast_to((u[:, None] * d + np.arange(d))[:, None, :], (m, d, d)).ravel()
    cv = np.broadcast_to((v[:, None] * d + np.arange(d))[:, None, :], (m, d, d)).ravel()
    D = sp.csr_matrix((np.concatenate([-Fu.numpy().ravel(), Fv.numpy().ravel()]),
                       (np.concatenate([rows, rows]), np.concatenate([cu, cv]))), shape=(m * d, n * d))
    return (D.T @ D).tocsr()


def torch_csr(L: sp.csr_matrix, dtype) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(torch.as_tensor(L.indptr.astype(np.int64)),
                                       torch.as_tensor(L.indices.astype(np.int64)),
                                       torch.as_tensor(L.data).to(dtype), L.shape)


def held_bytes(S: cs.Sheaf) -> int:
    """Bytes the sheaf holds: stacked tensors and the vertex table (no cached operators)."""
    tensors = sum(t.numel() * t.element_size() for st in S.stacks for t in [st.index] + st.tensors())
    table = sys.getsizeof(S._dims) + sum(sys.getsizeof(k) for k in S._dims if not (isinstance(k, int) and k < 257))
    return tensors + table


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is in KiB on Linux


@dataclass
class Context:
    """What the rows share: arguments, sizes, the random data and the sheaf (built on first use)."""

    args: argparse.Namespace
    n: int
    m: int
    d: int = 3
    _cache: dict = field(default_factory=dict)

    @property
    def data(self):
        if "data" not in self._cache:
            self._cache["data"] = random_data(self.n, self.m, self.d)
        return self._cache["data"]

    @property
    def sheaf(self) -> cs.Sheaf:
        if "sheaf" not in self._cache:
            self._cache["sheaf"] = cs.Sheaf.from_arrays([self.d] * self.n, *self.data)
        return self._cache["sheaf"]


def row_build(ctx: Context) -> None:
    index, Fu, Fv = ctx.data
    r = max(1, min(ctx.args.repeats, 3))
    t, S = timed(lambda: cs.Sheaf.from_arrays([ctx.d] * ctx.n, index, Fu, Fv), r)
    k = min(ctx.m, 30_000)
    t_loop, _ = timed(lambda: per_edge_build(ctx.n, ctx.d, index[:, :k], Fu[:k], Fv[:k]), 1)
    per, per_loop = t / ctx.m, t_loop / k
    print(f"build: from_arrays {t:7.3f} s ({1e6 * per:.2f} µs/edge, {held_bytes(S) / ctx.m:.0f} bytes/edge held; "
          f"targets 0.5 s at 3e5 edges, 300 B/edge) | add_edge loop {1e6 * per_loop:.1f} µs/edge on {k} edges | "
          f"ratio {per / per_loop:.3f}")


def row_assembly(ctx: Context) -> None:
    S, (index, Fu, Fv) = ctx.sheaf, ctx.data
    r = ctx.args.repeats

    def ours():
        S._cache.clear()  # plan, coboundary and L from scratch
        return S.laplacian(format="scipy")

    (t_ours, L), (t_base, Lb) = timed_pair(ours, lambda: scipy_laplacian(ctx.n, ctx.d, index, Fu, Fv), r)
    diff = abs(L - Lb).max() / abs(Lb).max()
    print(f"assembly: S.laplacian(format='scipy') {t_ours:7.3f} s | vectorised scipy δᵀδ {t_base:7.3f} s | "
          f"ratio {t_ours / t_base:.2f} (target <= 1.2) | {L.nnz} nnz, max rel diff {diff:.1e}")


def row_lx(ctx: Context) -> None:
    S = ctx.sheaf
    L = S.laplacian(format="scipy")
    r = ctx.args.repeats
    for dtype in (torch.float64, torch.float32):
        X = torch.randn(ctx.args.batch, S.C0, dtype=dtype)
        XT = X.T.contiguous()
        Lcsr = torch_csr(L, dtype)
        apply_laplacian(S, X)  # warm: plan, blocks, CSR structure
        (t_mf, Y), (t_csr, Z) = timed_pair(lambda: apply_laplacian(S, X), lambda: torch.sparse.mm(Lcsr, XT), r)
        err = float((Y - Z.T).abs().max() / Z.abs().max())
        line = (f"lx [{str(dtype).removeprefix('torch.')}] B={ctx.args.batch}: apply_laplacian {1e3 * t_mf:8.2f} ms | "
                f"torch CSR {1e3 * t_csr:8.2f} ms | ratio {t_mf / t_csr:5.2f} (target <= 1.2) | max rel diff {err:.1e}")
        st = S.stacks[0]
        Fu, Fv = st.Fu, st.Fv
        S.update_maps(Fu.to(dtype).clone().requires_grad_(), Fv.to(dtype).clone().requires_grad_(), check=False)
        t_grad, _ = timed(lambda: apply_laplacian(S, X), max(1, r // 2))
        S.update_maps(Fu, Fv, check=False)
        print(line + f" | through maps requiring grad {1e3 * t_grad:8.2f} ms ({t_grad / t_csr:.2f}x CSR)")


def row_spec(ctx: Context) -> None:
    m = 50_000 if not ctx.args.quick else 5_000
    n, d = m // 3, ctx.d
    index, Fu, Fv = random_data(n, m, d, seed=2)
    S = cs.Sheaf.from_arrays([d] * n, index, Fu, Fv)
    P = per_edge_build(n, d, index, Fu, Fv)
    r = max(1, min(ctx.args.repeats, 3))
    t_dump, text = timed(lambda: S.to_spec().model_dump_json(), r)
    t_load, T = timed(lambda: cs.Sheaf.from_spec(text), r)
    t_dump0, text0 = timed(lambda: P.to_spec().model_dump_json(), 1)
    t_load0, _ = timed(lambda: cs.Sheaf.from_spec(text0), 1)
    assert T.edges == S.edges and torch.equal(T.stacks[0].Fu, Fu)
    print(f"spec ({m} edges): arrays dump {t_dump:6.3f} s, load {t_load:6.3f} s ({len(text) / 1e6:.1f} MB) | "
          f"per-edge dump {t_dump0:6.3f} s, load {t_load0:6.3f} s ({len(text0) / 1e6:.1f} MB) | "
          f"speed-up dump {t_dump0 / t_dump:.0f}x, load {t_load0 / t_load:.0f}x (target >= 10x)")


def harmonic(S: cs.Sheaf, n: int, d: int, batch: int, method: str, repeats: int, seed: int = 1):
    """Harmonic extension with a tenth of the vertices fixed to random values; time, result, residual."""
    rng = np.random.default_rng(seed)
    fixed = rng.choice(n, n // 10, replace=False)
    values = torch.as_tensor(rng.standard_normal((len(fixed), batch, d)))
    b = cs.Boundary()
    for i, val in zip(fixed.tolist(), values):
        b.fix(i, val)
    t, sol = timed(lambda: cs.harmonic_extension(S, b, method=method), repeats)
    rb = b.resolve(S)
    x = sol.flat
    zero = torch.zeros_like(x)
    zero[:, rb.fixed] = rb.values.to(x.dtype)
    res = float(apply_laplacian(S, x)[:, rb.free].norm() / apply_laplacian(S, zero)[:, rb.free].norm())
    return t, sol.info, res, len(fixed)


def row_harmonic(ctx: Context) -> None:
    t, info, res, k = harmonic(ctx.sheaf, ctx.n, ctx.d, ctx.args.batch, ctx.args.harmonic_method,
                               max(1, min(ctx.args.repeats, 3)))
    print(f"harmonic extension ({k} of {ctx.n} vertices fixed, B={ctx.args.batch}): {t:8.3f} s, method={info.method}, "
          f"iterations={info.iterations}, relative residual ||L[Ω,:]x||/||L[Ω,U]u|| = {res:.2e} "
          f"(solver reports {info.residual:.2e})")


def row_million(ctx: Context) -> None:
    n = 100_000 if ctx.args.quick else 1_000_000
    m, d = 3 * n, ctx.d
    index, Fu, Fv = random_data(n, m, d, seed=3)
    t_build, S = timed(lambda: cs.Sheaf.from_arrays([d] * n, index, Fu, Fv), 1)
    t, info, res, k = harmonic(S, n, d, 1, "cg", 1)
    print(f"million ({n} vertices, {m} edges): build {t_build:6.2f} s | harmonic extension by CG ({k} vertices "
          f"fixed) {t:7.1f} s, iterations={info.iterations}, converged={info.converged}, relative residual "
          f"{res:.1e} | peak RSS of the process {peak_rss_gib():.2f} GiB (limit 24)")


def o2_grid(n: int, flat: bool, seed: int = 0) -> cs.Sheaf:
    """An ``n × n`` grid with O(2) maps: flat (``Fu = R(θ_u)``, ``Fv = R(θ_v)``: h0 = 2) or generic (h0 = 0)."""
    rng = np.random.default_rng(seed)
    ids = np.arange(n * n).reshape(n, n)
    u = np.concatenate([ids[:, :-1].ravel(), ids[:-1, :].ravel()])
    v = np.concatenate([ids[:, 1:].ravel(), ids[1:, :].ravel()])

    def rot(t: np.ndarray) -> torch.Tensor:
        c, s = np.cos(t), np.sin(t)
        return torch.as_tensor(np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2))

    if flat:
        theta = rng.uniform(0, 2 * np.pi, n * n)
        Fu, Fv = rot(theta[u]), rot(theta[v])
    else:
        Fu, Fv = rot(rng.uniform(0, 2 * np.pi, u.size)), torch.eye(2, dtype=torch.float64).expand(u.size, 2, 2)
    return cs.Sheaf.from_arrays([2] * (n * n), torch.as_tensor(np.stack([u, v])), Fu, Fv)


def row_grid(ctx: Context) -> None:
    n = 60 if ctx.args.quick else 200
    for flat in (True, False):
        S = o2_grid(n, flat)
        t, H = timed(lambda: S.cohomology(), 1)
        dec = H.decision
        gap = "None" if H.gap is None else f"{H.gap:.3g}"
        print(f"grid {n}x{n} O(2) {'flat' if flat else 'generic'} (expected h0={2 if flat else 0}): {t:8.3f} s, "
              f"h0={H.h0} h1={H.h1}, route={dec.method}, certified={dec.certified} ({dec.certificate}), gap={gap}")


def planted_section(index: torch.Tensor, Fu: torch.Tensor, Fv: torch.Tensor, n: int, d: int, seed: int = 4):
    """``Fv`` corrected by a rank-one term on every edge so that a random ``x`` is a global section (h0 >= 1)."""
    x = torch.as_tensor(np.random.default_rng(seed).standard_normal((n, d)))
    xu, xv = x[index[0]], x[index[1]]
    miss = torch.einsum("eij,ej->ei", Fu, xu) - torch.einsum("eij,ej->ei", Fv, xv)
    return Fv + miss[:, :, None] * xv[:, None, :] / (xv * xv).sum(1)[:, None, None]


def row_kernel(ctx: Context) -> None:
    index, Fu, Fv = ctx.data
    S = cs.Sheaf.from_arrays([ctx.d] * ctx.n, index, Fu, planted_section(index, Fu, Fv, ctx.n, ctx.d))
    t, H = timed(lambda: S.cohomology(), 1)
    dec = H.decision
    gap = "None" if H.gap is None else f"{H.gap:.3g}"
    res = float(np.abs(S.coboundary(format="scipy") @ H.H0.numpy()).max()) if H.h0 else float("nan")
    print(f"kernel ({S.C0} x {S.C1}, one planted section, expected h0=1): {t:8.3f} s, h0={H.h0}, "
          f"certified={dec.certified} ({dec.certificate}), gap={gap}, max |δ H0| = {res:.1e}")


def row_uniqueness(ctx: Context) -> None:
    """Uniqueness of the harmonic extension of the ``harmonic`` row: propagation vs the full rank decision."""
    rng = np.random.default_rng(1)
    b = cs.Boundary()
    for i in rng.choice(ctx.n, ctx.n // 10, replace=False).tolist():
        b.fix(i, torch.as_tensor(rng.standard_normal(ctx.d)))
    t_resolve, rb = timed(lambda: b.resolve(ctx.sheaf), max(1, min(ctx.args.repeats, 3)))
    t_prop, R = timed(lambda: cs.relative_cohomology(ctx.sheaf, rb), 1)
    t_full, F = timed(lambda: cs.relative_cohomology(ctx.sheaf, rb, method="sparse"), 1)
    print(f"uniqueness ({rb.free.numel()} free coordinates, {len(b)} fixed vertices): Boundary.resolve {t_resolve:6.3f} s | "
          f"relative H⁰ by propagation {t_prop:7.2f} s (dim {R.dim}: {R.decision.certificate}) | full rank decision "
          f"{t_full:7.2f} s (dim {F.dim}: {F.decision.certificate}) | speed-up {t_full / t_prop:.0f}x")


def row_nonunique(ctx: Context) -> None:
    """A harmonic extension by CG with one large free component that touches no boundary (a planted section)."""
    n_a, n_b, d = ctx.n // 10, ctx.n // 4, ctx.d
    iA, FuA, FvA = random_data(n_a, 3 * n_a, d, seed=5)
    iB, FuB, FvB = random_data(n_b, 3 * n_b, d, seed=6)
    S = cs.Sheaf.from_arrays([d] * (n_a + n_b), torch.cat([iA, iB + n_a], 1), torch.cat([FuA, FuB]),
                             torch.cat([FvA, planted_section(iB, FuB, FvB, n_b, d)]))
    rng = np.random.default_rng(1)
    b = cs.Boundary()
    for i in rng.choice(n_a, n_a // 10, replace=False).tolist():
        b.fix(i, torch.as_tensor(rng.standard_normal(d)))
    t0 = CLOCK()
    try:
        cs.harmonic_extension(S, b, method="cg")
        raised = "no error (wrong)"
    except cs.NonUniqueError as err:
        raised = "NonUniqueError naming vertices " + str(err).split("vertices ")[1].split(" can move")[0]
    t_error = CLOCK() - t0
    t, x = timed(lambda: cs.harmonic_extension(S, b, method="cg", allow_nonunique=True), 1)
    N = x.info.extra["nullspace"]
    N = (N.to_dense() if N.is_sparse else N).double()
    print(f"nonunique ({S.C0 - b.resolve(S).fixed.numel()} free coordinates, free component of {n_b * d} with a planted "
          f"section): {raised} in {t_error:6.1f} s | allow_nonunique {t:6.1f} s (relative H⁰ cached), nullity "
          f"{x.info.extra['nullity']}, converged={x.info.converged}, residual {x.info.residual:.1e}, "
          f"|<x, null>| = {float((x.flat.double() @ N).abs().max()):.1e}")


def row_cohomology(ctx: Context) -> None:
    S = ctx.sheaf
    t, H = timed(lambda: S.cohomology(), 1)
    dec = H.decision
    print(f"cohomology ({S.C0} x {S.C1} coboundary): {t:8.3f} s, h0={H.h0} h1={H.h1}, certified={dec.certified} "
          f"({dec.certificate}), gap={H.gap:.3g}")


def row_cg(ctx: Context) -> None:
    bench_cg(ctx.sheaf, ctx.args.batch, max(1, min(ctx.args.repeats, 3)))


def row_eigenpairs(ctx: Context) -> None:
    bench_eigenpairs(max(1, min(ctx.args.repeats, 3)))


# ---------------------------------------------------------------------------- rank decisions, CG, spectra


def bench_cg(S: cs.Sheaf, batch: int, repeats: int, iters: int = 50) -> None:
    """``cellsheaf.linalg.cg`` on ``(L + I)`` with ``batch`` columns against scipy's CG column by column.

    Both run exactly ``iters`` iterations (tolerance 0) with the same CSR matrix (torch CSR given to
    cellsheaf's CG as the matrix, scipy CSR for scipy), timed alternately (`timed_pair`); target: time per
    iteration <= 1.2x scipy's per column x columns. The route cellsheaf's CG takes is printed
    (`cellsheaf.linalg.by_columns`).
    """
    import scipy.sparse as sp
    import scipy.sparse.linalg as spla

    from cellsheaf.linalg import by_columns, cg
    from cellsheaf.operators import to_torch_sparse

    A = (S.laplacian(format="scipy") + sp.identity(S.C0, format="csr")).tocsr()
    At = to_torch_sparse(A, torch.float64, layout=torch.sparse_csr)
    dinv = torch.as_tensor(1.0 / A.diagonal())
    B = torch.randn(batch, S.C0, dtype=torch.float64)
    M = sp.diags(1.0 / A.diagonal())
    b0 = B[0].numpy()
    with torch.no_grad():
        (t_cs, (_, info)), (t_sp, _) = timed_pair(
            lambda: cg(At, B, precond=dinv, tol=0.0, maxiter=iters, restarts=0),
            lambda: spla.cg(A, b0, rtol=0.0, atol=0.0, maxiter=iters, M=M), repeats)
        route = "column by column, sparse matrix-vector products" if by_columns(At, B) else "all columns at once"
    per_cs, per_sp = t_cs / info.iterations, t_sp / iters
    print(f"CG per iteration (B={batch}, {route}): cellsheaf {1e3 * per_cs:8.3f} ms | scipy per column x B "
          f"{1e3 * per_sp * batch:8.3f} ms | ratio {per_cs / (per_sp * batch):5.2f}x (target <= 1.2x)")


def bench_eigenpairs(repeats: int, n: int = 2000, m: int = 10_000, d: int = 3, k: int = 8) -> None:
    """The ``k`` smallest eigenpairs of the normalised Laplacian of a random sheaf with ``n`` vertices."""
    S = cs.Sheaf.from_arrays([d] * n, *random_data(n, m, d, seed=2))
    t, pairs = timed(lambda: cs.eigenpairs(S, k, normalized=True), repeats)
    info = pairs.info
    print(f"eigenpairs ({k} smallest, normalised L, {n} vertices, d={d}, {m} edges): {t:8.3f} s, route={info.method}, "
          f"operator applications={info.iterations}, residual={info.residual:.1e}, "
          f"values {pairs.values[0]:.4f}..{pairs.values[-1]:.4f}")


ROWS = {"build": row_build, "assembly": row_assembly, "lx": row_lx, "spec": row_spec, "cohomology": row_cohomology,
        "kernel": row_kernel, "cg": row_cg, "eigenpairs": row_eigenpairs, "harmonic": row_harmonic, "grid": row_grid,
        "uniqueness": row_uniqueness, "nonunique": row_nonunique, "million": row_million}
RANK_ROWS = ("cohomology", "kernel", "cg", "eigenpairs", "grid")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10x smaller sheaves")
    ap.add_argument("--rows", default=",".join(r for r in ROWS if r != "million"),
                    help=f"comma-separated subset of {', '.join(ROWS)}")
    ap.add_argument("--big", action="store_true", help="add the 10⁶-vertex harmonic extension (row 'million')")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or process CPU time (steadier on a shared machine with --threads 1)")
    ap.add_argument("--harmonic-method", default="cg", choices=["auto", "direct", "cg"],
                    help="method of harmonic_extension; 'direct' (sparse LU) fills in on random expander graphs")
    ap.add_argument("--no-harmonic", action="store_true", help="skip the harmonic extension rows")
    ap.add_argument("--no-rank", action="store_true", help="skip cohomology, CG per iteration and eigenpairs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    n, m = (10_000, 30_000) if args.quick else (100_000, 300_000)
    ctx = Context(args, n, m)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if args.big and "million" not in rows:
        rows.append("million")
    skip = (RANK_ROWS if args.no_rank else ()) + (("harmonic", "uniqueness", "nonunique", "million") if args.no_harmonic else ())
    rows = [r for r in rows if r not in skip]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    print(f"random sheaf: {n} vertices, stalk dim 3, {m} edges with random 3x3 maps; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.clock} clock, medians of {args.repeats} repeats")
    for name in rows:
        ROWS[name](ctx)


if __name__ == "__main__":
    main()
