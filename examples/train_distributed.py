"""Data-parallel sheaf training with torch.distributed: each process trains on its own shard.

Run it on two CPU processes (gloo) with torch's own launcher::

    torchrun --nproc_per_node=2 examples/train_distributed.py

or as one ordinary process (``python examples/train_distributed.py``): the same script,
the same result up to the order of floating-point additions. Each rank keeps every
``world_size``-th training item (the ``DistributedSampler`` convention), the trainer adds
up the ranks' local updates weighted by their shard sizes, and only rank 0 prints and
writes files.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

import cellsheaf_nn as csnn


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="nudged", choices=["nudged", "equilibrium", "joint"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=None, help="per-rank minibatch (default: the full shard)")
    p.add_argument("--tol", type=float, default=None, help="relaxation tolerance of the local modes")
    p.add_argument("--out", type=Path, default=None, help="folder for the trained weights (rank 0 writes)")
    p.add_argument("--quick", action="store_true", help="a few steps only")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(1)
    if "RANK" in os.environ and not dist.is_initialized():  # started by torchrun
        dist.init_process_group("gloo")
    rank, world = csnn.distributed.rank(), csnn.distributed.world_size()

    task = csnn.datasets.paraboloid(seed=0)
    X, Y = task.X_train[rank::world], task.Y_train[rank::world]        # this rank's shard
    ns = csnn.compile(csnn.mlp(task.sizes("1H"), seed=0))                # the same start on every rank
    options = {} if args.mode == "joint" else {"optimizer": "adam", "lr": 0.01}
    trainer = csnn.SheafTrainer(ns, mode=args.mode, loss="mse", init="forward_pass",
                                batch_size=args.batch_size, tol=args.tol, **options)
    history = trainer.fit(X, Y, steps=5 if args.quick else args.steps, progress=False)

    if csnn.distributed.is_main():
        print(f"{world} process(es), mode={args.mode}: training loss {history.train_loss[0]:.4f} -> "
              f"{history.train_loss[-1]:.4f} after {trainer.step} updates")
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            torch.save(ns.to_module().state_dict(), args.out / f"weights-{args.mode}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
