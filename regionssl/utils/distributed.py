"""Collectives that work in one process, with gloo on CPU and with NCCL on GPU."""
import torch
import torch.distributed as dist
from detectron2.utils import comm

__all__ = ["world_size", "all_gather_cat", "all_reduce_sum", "broadcast_from_rank0"]


def world_size():
    return comm.get_world_size()


@torch.no_grad()
def all_gather_cat(x):
    """Concatenate ``x`` (N_r, ...) of every rank along dim 0, in rank order; N_r may differ.

    Returns ``(gathered, counts)`` with ``counts`` the list of N_r. Not differentiable.
    """
    if world_size() == 1:
        return x, [x.shape[0]]
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(counts, n)
    counts = [int(c.item()) for c in counts]
    padded = x.new_zeros((max(counts),) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    buffers = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(buffers, padded.contiguous())
    return torch.cat([b[:c] for b, c in zip(buffers, counts)]), counts


def all_reduce_sum(x):
    """In-place sum over ranks (no-op in one process); returns ``x``."""
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def broadcast_from_rank0(x):
    if world_size() > 1:
        dist.broadcast(x, 0)
    return x
