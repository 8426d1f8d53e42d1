"""Scale-out with torch.distributed (``torchrun ... -m diffplug run``).

Sampling shards whole batches, not seeds: batch j of the single-process run (seeds
j*B .. j*B+B-1) runs on rank j % world, with the same companions and batch size, so every
sample is computed exactly as it would be in one process. Rank 0 gathers the batches back
into seed order and writes the output. torchrun runs one thread per process by default: a
single process run with the same thread count gives bit-identical samples.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence

import torch


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when not distributed."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: torch.device) -> torch.device:
    """Each rank's own GPU (LOCAL_RANK) when sampling on CUDA."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA) for the block, if any."""
    _, size = world()
    if size == 1 or not torch.distributed.is_available():
        yield
        return
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if started:
            dist.destroy_process_group()


def batches(n: int, batch_size: int) -> list[range]:
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def shard(seeds: Sequence[int], batch_size: int, rank: int, size: int) -> list[int]:
    """The seeds of the batches rank ``rank`` runs: batches rank, rank+size, ..."""
    mine = batches(len(seeds), batch_size)[rank::size]
    return [seeds[i] for b in mine for i in b]


def gather(
    local: torch.Tensor, n: int, batch_size: int, rank: int, size: int
) -> torch.Tensor | None:
    """Rank 0 gets all ``n`` samples in seed order; other ranks get None."""
    if size == 1:
        return local
    import torch.distributed as dist

    all_batches = batches(n, batch_size)
    counts = [sum(len(b) for b in all_batches[r::size]) for r in range(size)]
    longest = max(counts)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    buckets = [torch.empty_like(padded) for _ in range(size)] if rank == 0 else None
    dist.gather(padded, buckets, dst=0)
    if rank != 0:
        return None
    assert buckets is not None
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype, device=local.device)
    offsets = [0] * size
    for j, b in enumerate(all_batches):
        r = j % size
        out[b.start : b.stop] = buckets[r][offsets[r] : offsets[r] + len(b)]
        offsets[r] += len(b)
    return out


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if world()[1] > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (every rank gets the same answer), so that all
    ranks stop at the same step when a signal reaches some of them first."""
    if world()[1] == 1 or not torch.distributed.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average gradients across ranks, for weights trained outside DDP's wrapper."""
    size = world()[1]
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= size
