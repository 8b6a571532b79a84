"""Benchmark neural-sheaf inference against torch (float64, CPU; ratios measured in one run).

1. ``ns.infer(x)`` (auto = the compiled propagation plan) vs ``model(x)``: MLPs [2, 10, 8, 1]
   (B = 256), [64, 128, 128, 10] (B = 1, 16, 256, 4096), [784, 512, 512, 10] (B = 1, 16, 256), and a
   residual MLP (4 blocks of width 256, B = 256). Each row is the median of per-pair ratios of
   interleaved runs, timed in thread CPU time (robust to a loaded machine); the worst ratio is
   printed last. Target: ≤ 1.5×, error ≤ 1e-10.
2. Per-layer overhead: MLPs of width 128 and depth 2 … 32 at B = 64; the slope of the median
   (sheaf − torch) time against depth, µs per layer. Target: ≤ 20 µs.
3. ``ns.infer(x, method="diffusion")`` (the paper's Euler heat equation, α = 1) from random
   starts to a gradient norm of 1e-10: steps and time for [2, 30, 1] and [2, 10, 8, 1].
4. Pinned inference on [64, 128, 128, 10], B = 256 (a hidden neuron hard-pinned, one soft-pinned,
   the output soft-pinned): Newton vs the Euler flow run until it reaches Newton's final energy.

Run: ``python benchmarks/bench_infer.py --threads 1`` (``--quick`` for a smaller, faster run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import cellsheaf as cs
import cellsheaf_nn as csnn

F64 = torch.float64


def mlp(widths, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers).double().eval()


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return torch.relu(x + self.fc2(torch.relu(self.fc1(x))))


def residual_mlp(n_in, d, blocks, n_out, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, d), nn.ReLU(), *[Block(d) for _ in range(blocks)],
                         nn.Linear(d, n_out)).double().eval()


def paired(f, g, reps: int) -> tuple[float, float, float]:
    """Median times of ``f`` and ``g`` and the median of their per-pair ratio (robust to machine load)."""
    f(), g()
    tf, tg, ratio = [], [], []
    for _ in range(reps):
        t0 = time.thread_time(); f(); t1 = time.thread_time(); g(); t2 = time.thread_time()
        tf.append(t1 - t0); tg.append(t2 - t1); ratio.append((t2 - t1) / (t1 - t0))
    return statistics.median(tf), statistics.median(tg), statistics.median(ratio)


def _reps(seconds: float, quick: bool) -> int:
    """Repetitions for a pair that takes about ``seconds``: ~1 s per row (~0.2 s with --quick)."""
    return int(min(400, max(5, (0.2 if quick else 1.0) / max(seconds, 1e-6))))


def compare(name: str, model: nn.Module, x: Tensor, quick: bool) -> float:
    """Print one row (torch and sheaf medians, their ratio, the error) and return the ratio."""
    ns = csnn.compile(model)
    with torch.no_grad():
        err = float((ns.infer(x) - model(x)).abs().max())
        t0 = time.perf_counter(); model(x); ns.infer(x); once = time.perf_counter() - t0
        tf, ti, r = paired(lambda: model(x), lambda: ns.infer(x), _reps(once, quick))
    print(f"  {name:34s} torch {tf * 1e3:8.3f} ms   sheaf {ti * 1e3:8.3f} ms   ratio {r:5.2f}x   "
          f"max error {err:.1e}")
    return r


def bench_forward(quick: bool) -> None:
    print("== 1. infer (compiled propagation) vs torch forward, float64 ==")
    g = torch.Generator().manual_seed(0)
    rows = [([2, 10, 8, 1], 256)] + [([64, 128, 128, 10], B) for B in (1, 16, 256, 4096)] + \
        [([784, 512, 512, 10], B) for B in (1, 16, 256)]
    ratios = {}
    for widths, B in rows:
        if quick and B > 256:
            continue
        x = torch.randn(B, widths[0], dtype=F64, generator=g)
        ratios[f"MLP {widths} B={B}"] = compare(f"MLP {widths}, B={B}", mlp(widths), x, quick)
    x = torch.randn(256, 256, dtype=F64, generator=g)
    ratios["residual MLP"] = compare("residual MLP 4x256, B=256", residual_mlp(256, 256, 4, 10), x, quick)
    worst = max(ratios, key=ratios.get)
    print(f"  worst ratio {ratios[worst]:.2f}x ({worst}); target <= 1.5x")


def bench_depth(quick: bool) -> None:
    print("== 2. per-layer overhead: width 128, B = 64, depth 2 ... 32 ==")
    depths = (2, 8, 32) if quick else (2, 4, 8, 16, 32)
    x = torch.randn(64, 128, dtype=F64, generator=torch.Generator().manual_seed(5))
    extra = []
    for depth in depths:
        model = mlp([128] * (depth + 1))
        ns = csnn.compile(model)
        with torch.no_grad():
            tf, ti, _ = paired(lambda: model(x), lambda: ns.infer(x), 40 if quick else 200)
        extra.append(ti - tf)
        print(f"  depth {depth:3d}: torch {tf * 1e3:7.3f} ms   sheaf {ti * 1e3:7.3f} ms   "
              f"overhead {(ti - tf) * 1e6:8.1f} us")
    n = len(depths)
    mx, my = sum(depths) / n, sum(extra) / n
    slope = sum((d - mx) * (e - my) for d, e in zip(depths, extra)) / sum((d - mx) ** 2 for d in depths)
    print(f"  per-layer overhead (least-squares slope): {slope * 1e6:.1f} us per layer; target <= 20 us")


def bench_diffusion(quick: bool) -> None:
    print("== 3. diffusion (Euler heat equation, alpha = 1, random start) to gradient norm 1e-10 ==")
    B = 16 if quick else 64
    for widths in ([2, 30, 1], [2, 10, 8, 1]):
        model = mlp(widths, seed=1)
        ns = csnn.compile(model)
        x = torch.randn(B, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
        t0 = time.perf_counter()
        y, state = ns.infer(x, method="diffusion", alpha=1.0, tol=1e-10, generator=torch.Generator().manual_seed(2),
                            return_state=True)
        dt = time.perf_counter() - t0
        with torch.no_grad():
            err = float((y - model(x)).abs().max())
        info = state.info
        print(f"  {str(widths):14s} B={B}: {info.iterations:6d} steps (dt = {info.t / max(info.iterations, 1):.3g}), "
              f"{dt:6.2f} s, converged={info.converged}, max error vs torch {err:.1e}")


def bench_pinned(quick: bool) -> None:
    print("== 4. pinned inference [64, 128, 128, 10]: Newton vs Euler flow to the same final energy ==")
    B = 32 if quick else 256
    model = mlp([64, 128, 128, 10], seed=3)
    ns = csnn.compile(model)
    x = torch.randn(B, 64, dtype=F64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        h = torch.relu(model[0](x))
        ns.pin("a1", [3], h[:, 3:4] + 1.0)                                   # hard pin of a hidden neuron
        ns.pin("a2", [7], torch.full((B, 1), 0.5, dtype=F64), strength=10.0)  # soft pin of another
        ns.pin("z3", None, model(x) + 0.5, strength=1.0)                      # soft pin of the output
    t0 = time.perf_counter()
    _, newton = ns.infer(x, method="newton", tol=1e-8, return_state=True, check=False)
    t_newton = time.perf_counter() - t0
    target = newton.info.energy
    print(f"  newton: {newton.info.iterations} iterations, {t_newton:.2f} s, converged={newton.info.converged} "
          f"(grad norm {newton.info.residual:.1e}), total energy {float(target.sum()):.10g}")
    # Euler flow from the same start (the unpinned forward pass), in chunks, until it matches Newton's energy
    S, bnd = ns.pinned_sheaf, ns.boundary(x)
    state = ns.infer(x, method="euler", max_steps=0, return_state=True, check=False)[1].cochain.flat
    dt = 1.0 / float(cs.lambda_max(S, boundary=bnd, at=state[0]))  # the default step 1/(α λ_max), computed once
    steps, t_euler, chunk, budget = 0, 0.0, 1000, 3_000 if quick else 10_000
    goal, reached = float(target.sum()), {}
    while steps < budget and 1e-6 not in reached:
        t0 = time.perf_counter()
        res = cs.diffuse(S, state, boundary=bnd, method="euler", dt=dt, max_steps=chunk, tol=1e-10)
        t_euler += time.perf_counter() - t0
        steps, state = steps + res.iterations, res.x.flat
        gap = (float(res.energy.sum()) - goal) / abs(goal)
        for level in (1e-3, 1e-6):
            if gap <= level and level not in reached:
                reached[level] = (steps, t_euler)
        if res.converged:
            break
    for level in (1e-3, 1e-6):
        if level in reached:
            n, t = reached[level]
            print(f"  euler:  relative energy gap {level:g} after {n} steps, {t:.2f} s "
                  f"({t / t_newton:.1f}x Newton's time)")
        else:
            print(f"  euler:  relative energy gap {level:g} not reached in {steps} steps ({t_euler:.2f} s); "
                  f"gap {gap:.2e}")


def zoo_models() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """The zoo's benchmark models (from the tests, found from this file's place in the repository)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.cellsheaf_nn.zoo import LeNet, ResCNN, TransformerBlock, randomise_batchnorm

    torch.manual_seed(0)
    return [("LeNet CNN, 1x28x28", LeNet(), (1, 28, 28)),
            ("residual CNN 3 blocks x 16 ch, 16x16", randomise_batchnorm(ResCNN(16, 3)), (3, 16, 16)),
            ("transformer block T=32, D=64", TransformerBlock(64, 4), (32, 64))]


def bench_zoo(quick: bool) -> None:
    print("== 5. the model zoo: infer vs torch forward, B = 256, float64 ==")
    for name, model, shape in zoo_models():
        model = model.double().eval()
        ns = csnn.compile(model, input_shape=shape)
        x = torch.randn(256, *shape, dtype=F64)
        with torch.no_grad():
            err = float((ns.infer(x) - model(x)).abs().max())
            tf, ti, r = paired(lambda: model(x), lambda: ns.infer(x), 3 if quick else 7)
        print(f"  {name:38s} torch {tf * 1e3:8.2f} ms   sheaf {ti * 1e3:8.2f} ms   ratio {r:5.2f}x   "
              f"max error {err:.1e}")
    print("  target <= 1.5x, error <= 1e-10")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches and fewer repetitions")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 gives stable ratios on a loaded machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_forward(args.quick)
    bench_depth(args.quick)
    bench_diffusion(args.quick)
    bench_pinned(args.quick)
    bench_zoo(args.quick)


if __name__ == "__main__":
    main()
