"""Sheaf neural networks: the `cellsheaf.layers.SheafDiffusion` layer against a hand-written one, and spectra.

One step of neural sheaf diffusion, ``X ← X − ELU(Δ (I ⊗ W1) X W2)`` with
``d × d`` maps (general, diagonal or orthogonal) predicted by a linear map learner
on the endpoint features and ``Δ = (D + I)^{-1/2} L (D + I)^{-1/2}``, forward and
backward (to the features, the map learner, ``W1`` and ``W2``), float32, one
thread. The hand-written layer below is the minimal torch implementation
(index_select + bmm + index_add; the degree blocks by index_add and their inverse
square roots by ``eigh``, elementwise for diagonal maps, by the scalar degree for
orthogonal maps); both use the same parameters and are checked to agree before
timing. Ratios are medians
measured in the same process, the two layers interleaved.

The same layer built the way a user writes it without `update_maps`
(``Sheaf.from_arrays`` on every forward pass), with the index plan reused from
the structure cache and with it rebuilt every step.

Then the 8 smallest eigenpairs of the normalised Laplacian of a random sheaf
with 2,000 vertices (time, iterations, operator applications, residual) by
scipy's Lanczos (ARPACK, ``method="sparse"``), the pure-torch thick-restart
Lanczos (``"lanczos"``, the default above ``DENSE_LIMIT`` and off the CPU) and
the pure-torch block LOBPCG (``"lobpcg"``), interleaved, medians.

Run::

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_learning.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

import cellsheaf as cs
from cellsheaf import operators as ops
from cellsheaf.layers import SheafDiffusion

D, CHANNELS = 3, 8
SIZES = [(2_000, 10_000), (20_000, 100_000)]


def random_graph(N: int, E: int, seed: int = 0) -> torch.Tensor:
    """``E`` random oriented edges between distinct vertices, ``(2, E)``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(N, (E,), generator=g)
    v = (u + torch.randint(1, N, (E,), generator=g)) % N
    return torch.stack([u, v])


def handwritten(layer: SheafDiffusion, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
    """The same layer written directly in torch (reads `layer`'s parameters); general, diagonal or
    orthogonal maps, each normalised the way one writes it by hand."""
    N, d, c = x.shape
    E, n_in = edge_index.shape[1], d * c
    u, v = edge_index
    W, b = layer.learner.first.weight, layer.learner.first.bias
    maps = layer.learner.maps
    xf = x.reshape(N, n_in)
    own, other = xf @ W[:, :n_in].T + b, xf @ W[:, n_in:].T
    Fu = maps(torch.tanh(own[u] + other[v]))
    Fv = maps(torch.tanh(own[v] + other[u]))
    if maps.diagonal:  # (E, d) diagonals: elementwise products, degrees (N, d)
        apply, adjoint = (lambda F, y: F.unsqueeze(2) * y), (lambda F, y: F.unsqueeze(2) * y)
        deg = torch.ones(N, d).index_add(0, u, Fu * Fu).index_add(0, v, Fv * Fv)
        R = lambda y: deg.rsqrt().unsqueeze(2) * y  # noqa: E731
    else:
        apply, adjoint = torch.bmm, (lambda F, y: torch.bmm(F.transpose(1, 2), y))
        if maps.orthogonal:  # the degree blocks are (deg + 1)·I
            deg = torch.ones(N).index_add(0, u, torch.ones(E)).index_add(0, v, torch.ones(E))
            R = lambda y: deg.rsqrt().view(N, 1, 1) * y  # noqa: E731
        else:  # (D + I)^{-1/2} per vertex by eigh
            deg = torch.eye(d).repeat(N, 1, 1)
            deg = deg.index_add(0, u, Fu.transpose(1, 2) @ Fu).index_add(0, v, Fv.transpose(1, 2) @ Fv)
            lam, Q = torch.linalg.eigh(deg)
            root = (Q * lam.rsqrt().unsqueeze(1)) @ Q.transpose(1, 2)
            R = lambda y: root @ y  # noqa: E731
    y = R(torch.einsum("ij,njc->nic", layer.W1, x) @ layer.W2)
    r = apply(Fv, y.index_select(0, v)) - apply(Fu, y.index_select(0, u))
    z = torch.zeros_like(y).index_add(0, v, adjoint(Fv, r)).index_add(0, u, -adjoint(Fu, r))
    return x - F.elu(R(z))


class RebuiltEachStep(SheafDiffusion):
    """The layer as a user writes it without `update_maps`: ``Sheaf.from_arrays`` on every forward pass
    (the index plan comes from the structure cache of `cellsheaf.operators` unless ``reuse=False``)."""

    def __init__(self, *args, reuse: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.reuse = reuse

    def _sheaf(self, graph, edge_index, N, Fu, Fv):
        if not self.reuse:
            ops._TEMPLATES.clear()
        self.sheaf = cs.Sheaf.from_arrays([self.d] * N, edge_index, Fu, Fv)
        return self.sheaf


def step(fn, layer, x, edge_index) -> float:
    """Seconds for one forward and backward pass."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    t = time.perf_counter()
    fn(x, edge_index).square().sum().backward()
    return time.perf_counter() - t


def bench_layer(N: int, E: int, reps: int, maps: str = "general", build: str = "update") -> dict:
    """``build``: ``"update"`` (the layer's own `update_maps`), ``"from_arrays"`` (a new sheaf every step,
    plan reused) or ``"rebuild"`` (a new sheaf and a new plan every step)."""
    torch.manual_seed(0)
    layer = SheafDiffusion(D, CHANNELS, maps=maps) if build == "update" else \
        RebuiltEachStep(D, CHANNELS, maps=maps, reuse=build == "from_arrays")
    with torch.no_grad():  # away from the identity, so that W1 and W2 matter
        layer.W1.add_(0.1 * torch.randn(D, D))
        layer.W2.add_(0.1 * torch.randn(CHANNELS, CHANNELS))
    x = torch.randn(N, D, CHANNELS, requires_grad=True)
    edge_index = random_graph(N, E)
    ours = lambda x, ei: layer(x, ei)  # noqa: E731
    hand = lambda x, ei: handwritten(layer, x, ei)  # noqa: E731
    with torch.no_grad():
        err = (ours(x, edge_index) - hand(x, edge_index)).abs().max().item()
    assert err < 1e-4, f"the layers disagree by {err}"
    for fn in (ours, hand):  # warm-up (the first call builds the sheaf and its plan)
        step(fn, layer, x, edge_index)
    t_ours, t_hand = [], []
    for _ in range(reps):
        t_ours.append(step(ours, layer, x, edge_index))
        t_hand.append(step(hand, layer, x, edge_index))
    mo, mh = statistics.median(t_ours), statistics.median(t_hand)
    return {"maps": maps, "build": build, "N": N, "E": E, "ours_ms": 1e3 * mo, "hand_ms": 1e3 * mh, "ratio": mo / mh,
            "max_abs_diff": err}


METHODS = ("sparse", "lanczos", "lobpcg")


def bench_eigenpairs(N: int = 2_000, k: int = 8, reps: int = 3) -> list[dict]:
    """The ``k`` smallest eigenpairs of the normalised Laplacian of a random general sheaf on ``N`` vertices by
    scipy (``"sparse"``: ARPACK's Lanczos) and the pure-torch routes (``"lanczos"``: thick restarts, the default
    above `DENSE_LIMIT` and off the CPU; ``"lobpcg"``), interleaved, on a new sheaf each time (the operator is
    assembled inside the timing). Medians of ``reps``; values checked against each other."""
    g = torch.Generator().manual_seed(1)
    edge_index = random_graph(N, 5 * N, seed=1)
    E = edge_index.shape[1]
    Fu = torch.randn(E, D, D, generator=g, dtype=torch.float64)
    Fv = torch.randn(E, D, D, generator=g, dtype=torch.float64)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    results = {}
    for _ in range(reps):
        for method in METHODS:
            S = cs.Sheaf.from_arrays([D] * N, edge_index, Fu, Fv)
            t = time.perf_counter()
            results[method] = cs.eigenpairs(S, k, normalized=True, method=method)
            times[method].append(time.perf_counter() - t)
    ref = results["sparse"].values
    return [{"N": N, "k": k, "method": m, "route": results[m].info.method, "seconds": statistics.median(times[m]),
             "iterations": results[m].info.iterations, "applications": results[m].info.extra.get(
                 "applications", results[m].info.iterations), "residual": results[m].info.residual,
             "max_value_diff": float((results[m].values - ref).abs().max()), "smallest": float(ref[0]),
             "largest": float(ref[-1])} for m in METHODS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small size only, few repetitions")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--eig-reps", type=int, default=5, help="repetitions of each eigensolver")
    ap.add_argument("--maps", nargs="+", default=["general", "diagonal", "orthogonal"],
                    choices=["general", "diagonal", "orthogonal"], help="map parametrisations to time")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = SIZES[:1] if args.quick else SIZES
    reps = 5 if args.quick else args.reps
    print(f"SheafDiffusion (d={D}, {CHANNELS} channels, float32, forward + backward), median of {reps}:")
    for maps in args.maps:
        for N, E in sizes:
            r = bench_layer(N, E, reps, maps)
            print(f"  {maps:<10} N={r['N']:>6} E={r['E']:>7}: cellsheaf {r['ours_ms']:8.1f} ms   hand-written {r['hand_ms']:8.1f} ms"
                  f"   ratio {r['ratio']:.2f}x   (outputs agree to {r['max_abs_diff']:.1e})")
    print("A layer that builds its sheaf with Sheaf.from_arrays on every forward pass (general maps):")
    for N, E in sizes:
        for build in ("from_arrays", "rebuild"):
            r = bench_layer(N, E, reps, "general", build)
            what = "plan reused " if build == "from_arrays" else "plan rebuilt"
            print(f"  {what} N={r['N']:>6} E={r['E']:>7}: cellsheaf {r['ours_ms']:8.1f} ms   hand-written "
                  f"{r['hand_ms']:8.1f} ms   ratio {r['ratio']:.2f}x")
    rows = bench_eigenpairs(reps=args.eig_reps)
    print(f"eigenpairs: {rows[0]['k']} smallest of the normalised Laplacian, N={rows[0]['N']} "
          f"(λ from {rows[0]['smallest']:.3g} to {rows[0]['largest']:.3g}), median of {args.eig_reps}:")
    base = rows[0]["seconds"]
    for r in rows:
        print(f"  {r['method']:<8} ({r['route']:<7}) {r['seconds']:6.3f} s  ({r['seconds'] / base:4.2f}x scipy)   "
              f"iterations {r['iterations']:>4}   operator applications {r['applications']:>5}   "
              f"residual {r['residual']:.1e}   values differ by {r['max_value_diff']:.1e}")


if __name__ == "__main__":
    main()
