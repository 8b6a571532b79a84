"""Diagnostics benchmark: the paper's Table 2 (λ₁ falls with depth at He initialisation) and batched spectra.

1. Table 2: for [2, 30, 1], [2, 10, 8, 1], [2, 8, 6, 4, 1] with He initialisation
   and zero biases, the median over 50 random inputs of the spectral gap λ₁ of
   ``L[Ω,Ω]``, per seed and averaged over seeds, next to the paper's values; also
   where the Fiedler vector lives (Fig. 15).
2. Speed: `cellsheaf_nn.diagnostics.spectrum` (one batched assembly of
   ``L[Ω,Ω]`` for all inputs, one batched ``eigvalsh``) against the baseline of one
   ``ns.restricted_laplacian(x)`` and ``eigvalsh`` per input, measured in the same
   process; prints the medians and their ratio, and checks both agree.

Run::

    python benchmarks/bench_diagnostics.py [--quick] [--seeds 10] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import cellsheaf_nn as csnn
from cellsheaf_nn import diagnostics as dg

PAPER = {(2, 30, 1): (0.2248, 0.0200), (2, 10, 8, 1): (0.0602, 0.0047), (2, 8, 6, 4, 1): (0.0281, 0.0060)}


def inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1000 + seed))


def table_2(seeds: int, n_inputs: int) -> None:
    print(f"Table 2: median λ₁ of L[Ω,Ω] over {n_inputs} inputs, He init, zero biases, {seeds} seeds")
    print(f"{'architecture':<18}{'mean of medians':>16}{'seed range':>22}{'std over inputs':>17}"
          f"{'paper':>9}{'ratio':>7}  Fiedler block (mean energy)")
    for sizes, (ref, ref_std) in PAPER.items():
        medians, stds, blocks = [], [], {}
        for s in range(seeds):
            summary = dg.spectral_summary(csnn.compile(csnn.mlp(list(sizes), seed=s)), inputs(n_inputs, s))
            medians.append(float(summary.lambda_1.median()))
            stds.append(float(summary.lambda_1.std()))
            b = summary.dominant_block("fiedler")
            blocks.setdefault(b, []).append(float(summary.block_energy["fiedler"][b].mean()))
        m = float(np.mean(medians))
        ranked = sorted(blocks.items(), key=lambda kv: -len(kv[1]))
        where = ", ".join(f"{b} ×{len(v)} ({np.mean(v):.0%})" for b, v in ranked)
        print(f"{str(list(sizes)):<18}{m:>16.4f}{f'[{min(medians):.4f}, {max(medians):.4f}]':>22}"
              f"{np.mean(stds):>17.4f}{ref:>9.4f}{m / ref:>7.2f}  {where}")


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def speed(n_inputs: int, repeats: int) -> None:
    ns = csnn.compile(csnn.mlp([2, 30, 30, 1], seed=0))
    X = inputs(n_inputs, 0)

    def per_input():
        return torch.stack([torch.linalg.eigvalsh(ns.restricted_laplacian(x)) for x in X])

    dg.spectrum(ns, X[:2])  # warm up
    t_batched, lam = timed(lambda: dg.spectrum(ns, X), repeats)
    t_loop, ref = timed(per_input, repeats)
    err = float((lam - ref).abs().max())
    print(f"\nspectrum of L[Ω,Ω] ([2, 30, 30, 1], {lam.shape[1]} free coordinates) for {n_inputs} inputs, "
          f"median of {repeats}:")
    print(f"  batched diagnostics.spectrum      {t_batched * 1e3:9.1f} ms")
    print(f"  per-input restricted_laplacian    {t_loop * 1e3:9.1f} ms   (baseline)")
    print(f"  speed-up {t_loop / t_batched:.1f}x, max |difference| {err:.1e}")
    if err > 1e-8:
        raise SystemExit("batched and per-input spectra disagree")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer seeds and inputs")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seeds = args.seeds or (3 if args.quick else 10)
    table_2(seeds, 50)
    speed(20 if args.quick else 100, 3 if args.quick else args.repeats)


if __name__ == "__main__":
    main()
