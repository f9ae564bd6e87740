"""Negative-key queues kept as buffers, so they live in checkpoints and resume exactly."""
import torch
import torch.nn.functional as F
from torch import nn

from ..utils.distributed import all_gather_cat
from ..utils.micro_batch import rows_at_step_end

__all__ = ["KeyQueues"]


class KeyQueues(nn.Module):
    """``L`` FIFO queues of ``K`` L2-normalised ``D``-dim keys (MoCo's queue, one per FPN level).

    Buffers (all in the checkpoint):
        queue: (L, D, K), initialised with random unit vectors as MoCo does.
        ptr:   (L,) int64 next write position per level.
        fill:  (L,) int64 number of real keys written so far (saturates at K).

    ``enqueue`` all-gathers the keys of every process first, so every rank holds the same
    queue (a rank-0 checkpoint is complete). Writes wrap around; any batch size works. With
    gradient accumulation the keys of all micro-batches are written together after the last one.
    """

    def __init__(self, num_levels, dim, size):
        super().__init__()
        self.size = size
        self.register_buffer("queue", F.normalize(torch.randn(num_levels, dim, size), dim=1))
        self.register_buffer("ptr", torch.zeros(num_levels, dtype=torch.long))
        self.register_buffer("fill", torch.zeros(num_levels, dtype=torch.long))

    def negatives(self, level):
        """(D, K) negatives of ``level``."""
        return self.queue[level].clone().detach()

    @torch.no_grad()
    def enqueue(self, level, keys, counts=None):
        """Append ``keys`` (N, D) of this process (and of every other process) to queue ``level``.

        ``counts``: every rank's N if known (host ints); otherwise exchanged (one host read).
        Returns the counts, for the next call of the step. Under gradient accumulation the rows of
        earlier micro-batches wait and are written with the last one (then counts are exchanged).
        """
        n_given = keys.shape[0]
        keys = rows_at_step_end(self, level, keys.detach().to(self.queue.dtype))
        if keys is None:  # an earlier micro-batch of the step: written with the last one
            return counts
        if keys.shape[0] != n_given:  # rows of several micro-batches: the given counts do not apply
            counts = None
        keys, counts = all_gather_cat(keys, counts)
        n = keys.shape[0]
        if n == 0:
            return counts
        if n > self.size:  # only the newest K keys can stay
            keys, n = keys[-self.size :], self.size
        idx = (self.ptr[level] + torch.arange(n, device=keys.device)) % self.size
        self.queue[level][:, idx] = keys.t()
        self.ptr[level] = (self.ptr[level] + n) % self.size
        self.fill[level] = torch.clamp(self.fill[level] + n, max=self.size)
        return counts

    def fill_fraction(self, level):
        """Fraction of queue ``level`` holding real keys: a 0-dim tensor (read when logs are flushed)."""
        return self.fill[level].float() / self.size
