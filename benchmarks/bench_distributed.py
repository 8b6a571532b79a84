"""Data-parallel sheaf training: speed-up of nudged training with 1 and 2 processes (torch.distributed, gloo).

Digits [64, 64, 10], full batch (each rank holds half of the training set), float64, one thread per
process, Adam. Each configuration is launched with ``torch.distributed.run`` and reports the median
milliseconds per update over the timed updates; the speed-up is 1-process time / 2-process time.
On a machine with a GPU the script also prints ``ns.infer`` vs ``model(x)`` and a nudged update vs a
backprop step on that GPU.

Run: ``python benchmarks/bench_distributed.py`` (``--quick``: fewer updates; ``--device cuda`` or
``--device cpu``: only the figures against torch, on that device).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import cellsheaf_nn as csnn

SIZES = [64, 64, 10]


def worker(steps: int) -> None:
    """One rank: nudged updates on its shard of digits; rank 0 prints the median ms per update."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = csnn.distributed.rank(), csnn.distributed.world_size()
    task = csnn.datasets.digits(seed=0)
    X, Y = task.X_train[rank::world], task.Y_train[rank::world]
    ns = csnn.compile(csnn.mlp(SIZES, output="identity", seed=0))
    trainer = csnn.SheafTrainer(ns, mode="nudged", loss="cross_entropy", optimizer="adam", lr=1e-3)
    trainer.fit(X, Y, steps=2, progress=False, eval_every=10**9)          # warm-up
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        trainer.fit(X, Y, steps=1, progress=False, eval_every=10**9)
        times.append(time.perf_counter() - t0)
    if csnn.distributed.is_main():
        print(f"RESULT {world} {1e3 * statistics.median(times):.3f}", flush=True)
    dist.destroy_process_group()


def launch(procs: int, steps: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc_per_node={procs}", __file__, "--worker", "--steps", str(steps)],
                         capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"{procs}-process run failed:\n{res.stderr[-3000:]}")
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT"))
    return float(line.split()[2])


def device_figures(device: str | torch.device, repeats: int) -> dict[str, float]:
    """Inference and nudged training against torch on ``device`` (same model and batch, B = 256).

    Prints ``ns.infer / model(x)`` and ``nudged update / backprop step`` (median milliseconds and their
    ratio) and returns the four medians. Any device: ``"cuda"`` for the GPU figures, ``"cpu"`` too.
    """
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    task = csnn.datasets.digits(seed=0)
    X, Y = task.X_train[:256].to(dev), task.Y_train[:256].to(dev)
    model = csnn.mlp(SIZES, output="identity", seed=0).to(dev)
    ns = csnn.compile(model).to(dev)

    def median_ms(fn) -> float:
        out = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(out)

    fwd, inf = median_ms(lambda: model(X)), median_ms(lambda: ns.infer(X))
    name = dev.type.upper() if dev.type in ("cpu", "cuda") else str(dev)
    print(f"{name} ns.infer / model(x), B=256: {inf:.3f} / {fwd:.3f} ms = {inf / fwd:.2f}x")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def backprop():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()

    trainer = csnn.SheafTrainer(ns, mode="nudged", loss="cross_entropy", optimizer="adam", lr=1e-3)
    bp = median_ms(backprop)
    nudged = median_ms(lambda: trainer.fit(X, Y, steps=1, progress=False, eval_every=10**9))
    print(f"{name} nudged update / backprop step, B=256: {nudged:.3f} / {bp:.3f} ms = {nudged / bp:.2f}x")
    return {"infer_ms": inf, "forward_ms": fwd, "nudged_ms": nudged, "backprop_ms": bp}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--device", default=None,
                   help="only the inference and training figures against torch, on this device (cuda, cpu)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    steps = args.steps or (5 if args.quick else 30)
    if args.worker:
        return worker(steps)
    if args.device:
        torch.set_num_threads(1)
        device_figures(args.device, 10 if args.quick else 50)
        return
    one, two = launch(1, steps), launch(2, steps)
    print(f"nudged update, digits {SIZES}, full batch, float64, 1 thread per process (median of {steps})")
    print(f"  1 process : {one:8.2f} ms per update")
    print(f"  2 processes: {two:8.2f} ms per update   speed-up {one / two:.2f}x")
    if torch.cuda.is_available():
        device_figures("cuda", 10 if args.quick else 50)
    else:
        print("no CUDA device: GPU figures skipped")


if __name__ == "__main__":
    main()
