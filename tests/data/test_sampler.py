"""The pretraining sampler: Detectron2's stream, each loader worker's share by arithmetic, resume
at any epoch without iterating (regionssl/data/sampler.py)."""
import itertools

import numpy as np
import pytest
import torch
from detectron2.data import common as d2_common
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm

from regionssl.data import sampler as sampler_module
from regionssl.data.sampler import ResumableTrainingSampler, worker_positions


def _as_rank(monkeypatch, rank, world):
    monkeypatch.setattr(comm, "get_rank", lambda: rank)
    monkeypatch.setattr(comm, "get_world_size", lambda: world)


def _detectron2_worker_stream(monkeypatch, sampler, worker, workers, chunk):
    """What Detectron2's ToIterableDataset gives loader worker ``worker`` (it iterates ``sampler``
    once per batch slot)."""
    info = type("Info", (), {"id": worker, "num_workers": workers})
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: info)
    return d2_common._shard_iterator_dataloader_worker(sampler, chunk)


@pytest.mark.parametrize("size,world,workers,chunk,skip", [
    (23, 1, 1, 4, 0), (23, 1, 3, 4, 0), (23, 2, 3, 4, 0), (50, 3, 2, 5, 7), (17, 4, 8, 3, 40), (9, 2, 2, 32, 3),
])
def test_each_workers_share_is_detectron2s(monkeypatch, size, world, workers, chunk, skip):
    for rank in range(world):
        _as_rank(monkeypatch, rank, world)
        ours = ResumableTrainingSampler(size, seed=11)
        ours.skip = skip
        reference = ResumableTrainingSampler(size, seed=11)
        reference.skip = skip
        for worker in range(workers):
            expected = list(itertools.islice(
                _detectron2_worker_stream(monkeypatch, _Iterating(reference), worker, workers, chunk), 3 * size))
            got = list(itertools.islice(ours.worker_stream(worker, workers, chunk), 3 * size))
            assert got == expected, (rank, worker)


class _Iterating(torch.utils.data.Sampler):
    """Detectron2's stream, iterated from the start and sliced: the behaviour before arithmetic."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        s = self.sampler
        base = TrainingSampler(s._size, seed=s.seed)
        base._rank, base._world_size = s._rank, s._world_size
        yield from itertools.islice(iter(base), s.skip, None)


def test_process_stream_is_detectron2s_from_any_skip():
    reference = list(itertools.islice(iter(TrainingSampler(13, seed=5)), 200))
    for skip in (0, 1, 12, 13, 14, 77):
        s = ResumableTrainingSampler(13, seed=5)
        s.resume(5, skip)
        assert list(itertools.islice(iter(s), 200 - skip)) == reference[skip:], skip


def test_workers_of_all_ranks_cover_each_epoch_once(monkeypatch):
    """Interleaving the workers' chunks and the ranks' positions rebuilds the global stream: every
    epoch is a permutation of all images, and it is randperm of the seeded generator."""
    size, world, workers, chunk = 61, 3, 4, 5
    per_rank = 3 * size // world
    rank_streams = []
    for rank in range(world):
        _as_rank(monkeypatch, rank, world)
        s = ResumableTrainingSampler(size, seed=2)
        shares = [s.worker_stream(w, workers, chunk) for w in range(workers)]
        stream = []
        while len(stream) < per_rank:  # the data loader returns the workers' batches in turn
            for share in shares:
                stream.extend(itertools.islice(share, chunk))
        rank_streams.append(stream[:per_rank])
    global_stream = [rank_streams[p % world][p // world] for p in range(3 * size)]
    g = torch.Generator()
    g.manual_seed(2)
    for epoch in range(3):
        drawn = global_stream[epoch * size : (epoch + 1) * size]
        assert sorted(drawn) == list(range(size))
        assert drawn == torch.randperm(size, generator=g).tolist()


def test_resume_at_a_late_epoch_is_exact_without_replaying(monkeypatch):
    size, skip = 1000, 437 * 1000 + 123
    fast = ResumableTrainingSampler(size, seed=9)
    fast.resume(9, skip)
    assert sampler_module._draw_counts_hold()  # the arithmetic path on this torch
    monkeypatch.setattr(sampler_module.ResumableTrainingSampler, "_draw_epoch", _counting(fast))
    got = list(itertools.islice(iter(fast), 2000))
    assert _counting.calls == 3  # epochs 437, 438, 439 drawn; the 437 before them skipped
    monkeypatch.undo()
    monkeypatch.setattr(sampler_module, "_draw_counts_hold", lambda: False)  # replay every epoch
    replayed = ResumableTrainingSampler(size, seed=9)
    replayed.resume(9, skip)
    assert list(itertools.islice(iter(replayed), 2000)) == got
    g = torch.Generator()
    g.manual_seed(9)
    for _ in range(437):
        torch.randperm(size, generator=g)
    assert got[:877] == torch.randperm(size, generator=g).tolist()[123:]


def _counting(sampler):
    real = type(sampler)._draw_epoch
    _counting.calls = 0

    def draw(self, g):
        _counting.calls += 1
        return real(self, g)

    return draw


def test_groups_resume_at_a_late_round_is_exact(monkeypatch):
    groups = [i // 3 for i in range(30)] + [f"single{i}" for i in range(7)]  # 10 clips of 3, 7 singles
    s = ResumableTrainingSampler(len(groups), groups=groups, seed=4)
    full = list(itertools.islice(iter(s), 17 * 40))
    late = ResumableTrainingSampler(len(groups), groups=groups, seed=4)
    late.resume(4, 17 * 31 + 5)
    assert list(itertools.islice(iter(late), 40)) == full[17 * 31 + 5 : 17 * 31 + 45]


def test_worker_positions_take_chunks_in_turn():
    assert worker_positions(0, 20, 1, 3, 2).tolist() == [2, 3, 8, 9, 14, 15]
    assert worker_positions(3, 17, 0, 3, 2).tolist() == [6, 7, 12, 13]
    assert worker_positions(5, 5, 0, 2, 4).tolist() == []


def test_share_memory_does_not_grow_with_the_batch_slots():
    """One epoch array per worker whatever the chunk: the number of epochs drawn for one epoch of
    a worker's share is 1 for chunk 1 and chunk 256."""
    for chunk in (1, 256):
        s = ResumableTrainingSampler(4096, seed=0)
        draws = []
        real = s._draw_epoch
        s._draw_epoch = lambda g: draws.append(1) or real(g)
        share = list(itertools.islice(s.worker_stream(2, 8, chunk), 4096 // 8))
        assert len(share) == 512 and len(draws) == 1, chunk
        assert len(np.unique(share)) == 512
