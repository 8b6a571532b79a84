"""Data parallelism through ``torch.distributed``: every rank trains on its own shard.

When a process group is initialised (``torchrun``, or ``torch.distributed.init_process_group``
with gloo on CPUs or NCCL on GPUs), [`SheafTrainer.fit`][cellsheaf_nn.train.SheafTrainer.fit] and [`NeuralSheaf.infer`][cellsheaf_nn.neural.NeuralSheaf.infer]
treat the data each rank passes as that rank's shard (the ``DistributedSampler``
convention). The sheaf updates stay local: each rank computes the local updates of
its own items, and the ranks add them up, weighted by how many items each holds, so
that every rank applies the same update and the weights stay identical. Only rank 0
prints progress and writes checkpoints.

Without a process group (or with one process) every function here is the identity
and training runs exactly as in one process.

Examples
--------
>>> import cellsheaf_nn as csnn
>>> csnn.distributed.world_size(), csnn.distributed.rank(), csnn.distributed.is_main()
(1, 0, True)
"""

from __future__ import annotations

from itertools import islice
from typing import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["active", "world_size", "rank", "is_main", "all_sum", "union_mean", "union_count", "shard",
           "is_sharded"]


def active() -> bool:
    """Whether a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Whether this process prints and writes files (rank 0)."""
    return rank() == 0


def all_sum(tensors: list[Tensor]) -> list[Tensor]:
    """The element-wise sums over all ranks of ``tensors`` (one collective for all of them).

    The tensors are flattened into one buffer, so a dictionary of gradients costs one
    ``all_reduce``. Returns new tensors; the inputs are unchanged. The identity without
    a process group.

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> csnn.distributed.all_sum([torch.ones(2)])
    [tensor([1., 1.])]
    """
    if not active() or not tensors:
        return list(tensors)
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, k = [], 0
    for t in tensors:
        out.append(flat[k: k + t.numel()].view_as(t))
        k += t.numel()
    return out


def union_count(n_local: int, device=None) -> int:
    """The number of items in the union of the ranks' batches.

    Examples
    --------
    >>> import cellsheaf_nn as csnn
    >>> csnn.distributed.union_count(7)
    7
    """
    if not active():
        return int(n_local)
    return int(all_sum([torch.tensor([float(n_local)], dtype=torch.float64, device=device)])[0].item())


def union_mean(means: Mapping[str, Tensor], n_local: int) -> dict[str, Tensor]:
    """Means over the union of the ranks' batches, from each rank's means over its own ``n_local`` items.

    ``Σ_r n_r m_r / Σ_r n_r`` for every entry, in one collective (the item count travels
    with the values). The identity without a process group.

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> csnn.distributed.union_mean({"w": torch.tensor([2.0])}, n_local=4)
    {'w': tensor([2.])}
    """
    if not active():
        return dict(means)
    keys = list(means)
    if not keys:
        return {}
    like = means[keys[0]]
    count = torch.tensor([float(n_local)], dtype=like.dtype, device=like.device)
    # a rank with an empty shard contributes zeros (its means over no items may be NaN)
    sums = all_sum([count] + [float(n_local) * means[k] if n_local else torch.zeros_like(means[k]) for k in keys])
    total = sums[0]
    if float(total) <= 0:
        raise ValueError("every rank passed an empty batch: give each rank at least one item of its shard")
    return {k: s / total for k, s in zip(keys, sums[1:])}


def is_sharded(batches) -> bool:
    """Whether ``batches`` is a ``DataLoader`` that already gives each rank its own shard (its sampler, or
    its batch sampler's, is a ``DistributedSampler``)."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    if not isinstance(batches, DataLoader):
        return False
    samplers = (getattr(batches, "sampler", None), getattr(getattr(batches, "batch_sampler", None), "sampler", None))
    return any(isinstance(s, DistributedSampler) for s in samplers)


def shard(batches: Iterable) -> Iterable:
    """This rank's share of an iterable of batches: batches ``rank, rank + W, rank + 2W, …`` (``W`` ranks).

    A ``DataLoader`` whose sampler is a ``DistributedSampler`` is already this rank's shard and is
    returned as it is; so is everything without a process group. Lazy: batches of other ranks
    are skipped as they arrive, never held.

    Examples
    --------
    >>> import cellsheaf_nn as csnn
    >>> list(csnn.distributed.shard(range(5)))  # one process: everything
    [0, 1, 2, 3, 4]
    """
    if not active() or is_sharded(batches):
        return batches
    return islice(batches, rank(), None, world_size())
