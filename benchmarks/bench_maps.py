"""Benchmark structured restriction maps against the torch operations they wrap (ratios in one run).

For each map (float64, CPU, B = 256): the median over interleaved repeats of
``map.apply(x) / torch forward`` and ``map.adjoint(y) / torch backward (the vjp)``, and the
time of Newton's Gauss–Newton diagonal ``map.squared_vjp`` against the dense ``d @ (M ⊙ M)``
it replaces (the dense matrix built once, outside the timing). Target: apply and adjoint
within 1.2× of torch; nothing densified.

Run: ``python benchmarks/bench_maps.py --threads 1``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as fn

import cellsheaf as cs

F64 = torch.float64


def _time(f, repeats: int) -> float:
    t = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - t) / repeats


def ratio(a, b, rounds: int = 7, repeats: int = 5) -> tuple[float, float]:
    """Median of per-round ``time(a) / time(b)`` (interleaved) and the median time of ``b`` in ms."""
    a(), b()
    ra, tb = [], []
    for _ in range(rounds):
        ta, t = _time(a, repeats), _time(b, repeats)
        ra.append(ta / t)
        tb.append(t)
    return statistics.median(ra), 1e3 * statistics.median(tb)


def cases(B: int):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 1, 5, 5, generator=g, dtype=F64)
    lenet = cs.maps.Conv2d(W, (1, 28, 28))
    W2 = torch.randn(16, 16, 3, 3, generator=g, dtype=F64)
    res = cs.maps.Conv2d(W2, (16, 16, 16), padding=1)
    pool = cs.maps.AvgPool2d(2, (6, 24, 24))
    for name, F, fwd in [
        ("conv2d 1x28x28 -> 6x24x24", lenet, lambda x: fn.conv2d(x.view(-1, 1, 28, 28), W)),
        ("conv2d 16x16x16, 3x3 pad 1", res, lambda x: fn.conv2d(x.view(-1, 16, 16, 16), W2, padding=1)),
        ("avgpool2d 2 on 6x24x24", pool, lambda x: fn.avg_pool2d(x.view(-1, 6, 24, 24), 2)),
    ]:
        yield name, F, fwd, torch.randn(B, F.d_in, generator=g, dtype=F64)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"float64, B = {args.batch}, {args.threads} thread(s); ratios: median of interleaved rounds")
    print(f"{'map':32s} {'apply/torch':>12s} {'adjoint/vjp':>12s} {'GN diag/dense':>14s} {'torch fwd ms':>13s}")
    for name, F, fwd, x in cases(args.batch):
        y = F.apply(x)
        xr = x.clone().requires_grad_()
        out = fwd(xr)
        w = torch.randn_like(out)
        r_apply, t_fwd = ratio(lambda: F.apply(x), lambda: fwd(x))
        r_adj, _ = ratio(lambda: F.adjoint(y), lambda: torch.autograd.grad(out, xr, w, retain_graph=True))
        M2 = F.matrix() ** 2
        d = y.abs()
        r_gn, _ = ratio(lambda: F.squared_vjp(x, d), lambda: d @ M2)
        print(f"{name:32s} {r_apply:12.2f} {r_adj:12.2f} {r_gn:14.3f} {t_fwd:13.2f}")


if __name__ == "__main__":
    main()
