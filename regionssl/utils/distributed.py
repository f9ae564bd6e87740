"""Collectives that work in one process, with gloo on CPU and with NCCL on GPU.

Row counts are Python ints known on the host wherever the caller knows them (``counts=``): a
count exchange costs a collective *and* a device -> host read (a GPU sync), so it is done once
per step where it is needed (:func:`gather_ints`), never per call.
"""
import torch
import torch.distributed as dist
from detectron2.utils import comm

__all__ = [
    "world_size",
    "to_device",
    "gather_ints",
    "all_gather_cat",
    "all_to_all_rows",
    "all_reduce_sum",
    "broadcast_from_rank0",
    "broadcast_buffers_from_rank0",
]


def world_size():
    return comm.get_world_size()


def to_device(t, device):
    """Copy a host tensor to ``device`` without a stream sync (pinned + ``non_blocking`` on CUDA).

    A blocking host -> GPU copy waits for every queued kernel; pinning a small tensor comes from
    PyTorch's caching host allocator, and the allocator keeps the block until the copy is done.
    """
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def gather_ints(values, device):
    """Every rank's list of ``len(values)`` ints (equal length on every rank): list of lists.

    One all_gather and **one** host read. In one process: ``[list(values)]``, nothing read.
    """
    values = [int(v) for v in values]
    if world_size() == 1:
        return [values]
    local = to_device(torch.tensor(values, dtype=torch.long), device)
    out = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(out, local)
    return torch.stack(out).tolist()


@torch.no_grad()
def all_gather_cat(x, counts=None):
    """Concatenate ``x`` (N_r, ...) of every rank along dim 0, in rank order; N_r may differ.

    Args:
        counts: the N_r of every rank if the caller knows them (no exchange, no host read);
            None exchanges them (:func:`gather_ints`: one host read).
    Returns ``(gathered, counts)`` with ``counts`` the list of N_r. Not differentiable.
    """
    if world_size() == 1:
        return x, [x.shape[0]]
    if counts is None:
        counts = [c for (c,) in gather_ints([x.shape[0]], x.device)]
    assert counts[comm.get_rank()] == x.shape[0], f"counts {counts} do not match the {x.shape[0]} local rows"
    x = x.contiguous()
    padded = x if x.shape[0] == max(counts) else torch.cat([x, x.new_zeros((max(counts) - x.shape[0],) + x.shape[1:])])
    buffers = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(buffers, padded)
    return torch.cat([b[:c] for b, c in zip(buffers, counts)]), list(counts)


@torch.no_grad()
def all_to_all_rows(x, send_counts, recv_counts):
    """Send rows ``x`` (sum(send_counts), ...) grouped by destination rank; return the received rows.

    ``send_counts[r]`` consecutive rows go to rank r; the result holds ``recv_counts[r]`` rows from
    each rank r, in rank order. Keeps ``x``'s dtype. ``all_to_all_single`` with uneven splits runs
    on NCCL and on gloo (CPU); in one process it returns ``x``.
    """
    if world_size() == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((sum(recv_counts),) + x.shape[1:])
    dist.all_to_all_single(out, x, output_split_sizes=list(recv_counts), input_split_sizes=list(send_counts))
    return out


def all_reduce_sum(x):
    """In-place sum over ranks (no-op in one process); returns ``x``."""
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def broadcast_from_rank0(x):
    if world_size() > 1:
        dist.broadcast(x, 0)
    return x


@torch.no_grad()
def broadcast_buffers_from_rank0(module):
    """Give every rank rank 0's buffers (queues, BN running statistics, ...); no-op in one process.

    DistributedDataParallel broadcasts parameters at construction but buffers only with
    ``broadcast_buffers=True``, which would also overwrite them at every forward (and undo
    per-process BN statistics). Call once after the model is on its device.
    """
    if world_size() == 1:
        return module
    for b in module.buffers():
        dist.broadcast(b, 0)
    return module
