"""The pretraining sampler: Detectron2's infinite shuffled stream, sharded and resumed by arithmetic.

The stream is Detectron2's ``TrainingSampler``'s (same seed rule, same indices): one
``torch.Generator`` seeded once draws ``randperm(N)`` for epoch 0, 1, 2, ... and rank r of W takes
the stream's positions r, r + W, r + 2W, ... Detectron2's ``ToIterableDataset`` then gives loader
worker w of n_w the chunks w, w + n_w, ... of B consecutive rank positions (B: images per worker
batch); the data loader returns the workers' batches in turn, so the rank sees its stream in order.

Detectron2 reaches each worker's share by iterating the whole stream once per batch slot (B
private copies of every epoch's list per worker) and resumes by iterating past everything already
consumed. Here a worker draws one epoch as one compact array (``randperm`` in int32, 4 B per image,
dropped once its share is taken) and selects its own positions by arithmetic; resume at
(epoch, offset) moves the generator to the epoch's start by drawing and discarding exactly the random
numbers the earlier epochs consumed (``randperm(n)`` draws n - 1 32-bit numbers; checked against
this torch at first use, replayed epoch by epoch if that ever changes), about 1 ns per skipped image.
"""
import functools
import logging

import numpy as np
import torch
from detectron2.data.samplers import TrainingSampler

__all__ = ["ResumableTrainingSampler", "worker_positions"]

logger = logging.getLogger(__name__)

# torch's CPU randperm(n) draws one 32-bit number per swap below this n (64-bit ones above).
_RANDPERM_ONE_DRAW_LIMIT = (2**32 - 1) // 20

# Random numbers drawn and discarded per call when moving a generator forward (16 MiB of uint8).
_SKIP_BLOCK = 1 << 24


def _ceil_div(a, b):
    return -(-a // b)


def _discard_draws(generator, count):
    """Advance ``generator`` by ``count`` 32-bit draws (a uint8 ``random_`` draws one per element)."""
    block = torch.empty(min(count, _SKIP_BLOCK), dtype=torch.uint8)
    while count > 0:
        block[: min(count, _SKIP_BLOCK)].random_(generator=generator)
        count -= _SKIP_BLOCK


@functools.lru_cache(maxsize=None)
def _draw_counts_hold():
    """True if this torch draws n - 1 numbers in ``randperm(n)`` and one in ``randint(k, (1,))``,
    so that :func:`_discard_draws` reaches the state an epoch of draws leaves (tested)."""
    drawn, skipped = torch.Generator(), torch.Generator()
    drawn.manual_seed(1), skipped.manual_seed(1)
    torch.randperm(1000, generator=drawn, dtype=torch.int32)
    for high in (1, 3, 1000):
        torch.randint(high, (1,), generator=drawn)
    _discard_draws(skipped, 999 + 3)
    return torch.equal(drawn.get_state(), skipped.get_state())


def worker_positions(begin, end, worker, num_workers, chunk):
    """Positions j in [begin, end) of a stream that loader worker ``worker`` of ``num_workers``
    takes when the workers take chunks of ``chunk`` consecutive positions in turn (worker w: chunks
    w, w + num_workers, ...; Detectron2's ``_shard_iterator_dataloader_worker``), ascending.

    Returns an int64 array of about (end - begin) / num_workers positions.
    """
    period = chunk * num_workers
    first = begin // period * period + worker * chunk  # this worker's chunk in begin's period
    starts = np.arange(first, end, period, dtype=np.int64)
    positions = (starts[:, None] + np.arange(chunk, dtype=np.int64)).ravel()
    # ascending: only the first and the last chunk can stick out of [begin, end); a view, no mask
    return positions[np.searchsorted(positions, begin) : np.searchsorted(positions, end)]


class ResumableTrainingSampler(TrainingSampler):
    """Detectron2's ``TrainingSampler`` (same infinite shuffled stream, same seed rule) whose stream
    can start after the ``skip`` indices this process consumed before a resume, at no cost growing
    with ``skip``, and whose share for one loader worker (:meth:`worker_stream`) is computed without
    walking the other workers' indices.

    :meth:`resume` sets ``skip`` and the seed (:class:`regionssl.engine.resume.DataStateHook`, from
    the checkpoint) before the loader's iterator is created (the loader iterates lazily).

    With ``groups`` (one label per image: a video clip, a stereo pair) the stream instead goes
    through the groups in rounds, each round a random order of all groups and one random member
    of each: every group is drawn equally often, and G consecutive draws never repeat a group
    (fewer near-duplicates in a batch, which are false negatives for the contrastive methods).
    A round plays the part of an epoch.
    """

    skip = 0

    def __init__(self, size, groups=None, **kwargs):
        super().__init__(size, **kwargs)
        self._members = self._member_starts = None
        if groups is not None:
            assert len(groups) == size, "one group label per image"
            codes = {}
            labels = np.empty(size, dtype=np.int64)
            for i, g in enumerate(groups):
                if g not in codes:
                    codes[g] = len(codes)
                labels[i] = codes[g]
            # members of group k (in order of first appearance): _members[_member_starts[k]:_member_starts[k + 1]]
            self._members = np.argsort(labels, kind="stable")
            self._member_starts = np.concatenate([[0], np.cumsum(np.bincount(labels))])
        self._start_state = None  # (seed, epoch, generator state at that epoch's start)

    @property
    def seed(self):
        """The seed of the stream (Detectron2's ``TrainingSampler`` keeps it in ``_seed``)."""
        return self._seed

    @property
    def epoch_length(self):
        """Indices per epoch of the global stream (N images, or G groups per round)."""
        return self._size if self._members is None else len(self._member_starts) - 1

    def resume(self, seed, skip):
        """Continue the stream of ``seed`` after the first ``skip`` indices of this process.

        Moves a generator to the start of the resumed epoch here, once, so that loader workers
        created afterwards (forked or pickled) start from its state."""
        self._seed, self.skip = int(seed), int(skip)
        self._generator_at(self._first_epoch())

    # ------------------------------------------------------------------ the global stream
    def _draws_per_epoch(self):
        if not self._shuffle:
            return 0
        if self._members is None:
            return self._size - 1
        return 2 * self.epoch_length - 1  # randperm(G), then one randint per group

    def _generator_at(self, epoch):
        """A generator in the state the stream's generator has at the start of ``epoch``."""
        g = torch.Generator()
        cached = self._start_state
        if cached is not None and cached[:2] == (self._seed, epoch):
            g.set_state(cached[2])
            return g
        g.manual_seed(self._seed)
        if epoch > 0 and self.epoch_length < _RANDPERM_ONE_DRAW_LIMIT and _draw_counts_hold():
            _discard_draws(g, epoch * self._draws_per_epoch())
        else:
            for _ in range(epoch):  # exact on any torch, O(epoch x N)
                self._draw_epoch(g)
        self._start_state = (self._seed, epoch, g.get_state())
        return g

    def _draw_epoch(self, g):
        """The next epoch of the global stream from generator ``g``: an array of ``epoch_length`` indices."""
        n = self.epoch_length
        dtype = torch.int32 if n < 2**31 else torch.int64
        if not self._shuffle:
            order = torch.arange(n, dtype=dtype)
        else:
            order = torch.randperm(n, generator=g, dtype=dtype)
        if self._members is None:
            return order.numpy()
        picks = np.empty(n, dtype=np.int64)
        for i, group in enumerate(order.tolist()):
            start, end = self._member_starts[group], self._member_starts[group + 1]
            picks[i] = self._members[start + int(torch.randint(int(end - start), (1,), generator=g))]
        return picks

    def _first_epoch(self):
        return (self._rank + self.skip * self._world_size) // self.epoch_length

    # ------------------------------------------------------------------ one process, one worker
    def worker_stream(self, worker=0, num_workers=1, chunk=1, block=4096):
        """The indices loader worker ``worker`` of ``num_workers`` maps: this process's stream from
        ``skip`` on, cut into chunks of ``chunk`` taken by the workers in turn (Detectron2's
        ``ToIterableDataset`` sharding with ``shard_chunk_size=chunk``). Infinite iterator of ints.

        Memory: one epoch's array (4 B per image) while the worker's share of it is selected (8 B
        per image of the share: 8 B / (world size x workers) per image), then that share.
        """
        r, w, n = self._rank, self._world_size, self.epoch_length
        epoch = self._first_epoch()
        g = self._generator_at(epoch)
        while True:
            begin, end = epoch * n, (epoch + 1) * n  # global positions of this epoch
            # this process's positions k (global r + k w) in the epoch, from skip on; sharded relative to skip
            k_begin = max(self.skip, _ceil_div(begin - r, w))
            k_end = _ceil_div(end - r, w)
            mine = worker_positions(k_begin - self.skip, k_end - self.skip, worker, num_workers, chunk)
            mine += self.skip  # in place: positions in the epoch's array are r + (j + skip) w - begin
            mine *= w
            mine += r - begin
            indices = self._draw_epoch(g)[mine]
            del mine
            for i in range(0, len(indices), block):
                yield from indices[i : i + block].tolist()
            epoch += 1

    def __iter__(self):
        yield from self.worker_stream()
