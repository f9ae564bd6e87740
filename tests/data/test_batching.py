"""Worker batches as a few tensors (regionssl/data/batching.py) and the loader around them
(regionssl/data/stream.py): same samples, same order as Detectron2's loader, four buffers a batch."""
import itertools
import logging

import pytest
import torch
from detectron2.data import DatasetFromList

from regionssl.data.batching import pack_batch, stacked_rows
from regionssl.data.sampler import ResumableTrainingSampler
from regionssl.data.stream import MappedStream, PretrainBatches


def _sample(i, regions=3):
    g = torch.Generator().manual_seed(i)
    return {
        "file_name": f"img{i}.jpg",
        "image_id": i,
        "height": 100 + i,
        "views": [torch.randint(0, 255, (3, 8, 6), dtype=torch.uint8, generator=g),
                  torch.randint(0, 255, (3, 4, 4), dtype=torch.uint8, generator=g)],
        "boxes": [torch.rand(regions, 4, generator=g), torch.rand(regions, 4, generator=g)],
        "valid": torch.rand(regions, generator=g) > 0.5,
        "box_groups": torch.arange(regions),
        "skipped_files": [f"bad{i}.jpg"] if i % 2 else [],
    }


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        elif isinstance(a[k], list) and a[k] and torch.is_tensor(a[k][0]):
            assert len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k])), k
        else:
            assert a[k] == b[k], k


def test_pack_unpack_round_trip_one_buffer_per_dtype():
    samples = [_sample(i, regions=2 + i) for i in range(5)]  # regions per sample differ
    packed = pack_batch(samples)
    assert sorted(map(str, packed.buffers)) == ["torch.bool", "torch.float32", "torch.int64", "torch.uint8"]
    assert packed.buffers[torch.uint8].numel() == 5 * (3 * 8 * 6 + 3 * 4 * 4)
    for got, want in zip(packed.unpack(), samples):
        _assert_same(got, want)


def test_views_of_all_samples_are_one_block():
    samples = [_sample(i) for i in range(4)]
    batch = pack_batch(samples).unpack()
    for v in range(2):
        rows = stacked_rows([d["views"][v] for d in batch])
        assert rows is not None and rows.shape == (4, *samples[0]["views"][v].shape)
        assert torch.equal(rows, torch.stack([s["views"][v] for s in samples]))
    separate = [s["views"][0] for s in samples]
    assert stacked_rows(separate) is None  # not one storage: the model stacks them itself
    assert stacked_rows([batch[0]["views"][0], batch[2]["views"][0]]) is None  # not adjacent


def test_pinned_batch_keeps_layout():
    if not torch.cuda.is_available():
        pytest.skip("pinning needs a CUDA runtime")
    packed = pack_batch([_sample(i) for i in range(2)]).pin_memory()
    assert all(b.is_pinned() for b in packed.buffers.values())


class _IndexMapper:
    """Record -> sample carrying the record's index; rejects the records in ``bad``."""

    def __init__(self, bad=()):
        self.bad = set(bad)

    def __call__(self, record):
        if record["image_id"] in self.bad:
            return None
        return {"image_id": record["image_id"], "views": [torch.full((3, 2, 2), record["image_id"] % 256, dtype=torch.uint8)]}


def _records(n):
    return DatasetFromList([{"file_name": f"f{i}.jpg", "image_id": i} for i in range(n)], copy=False)


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_loader_yields_the_process_stream_in_order(workers):
    """Whatever the number of workers, the batches follow the sampler's stream of this process
    (Detectron2's order), forked workers included."""
    n, batch = 37, 4
    sampler = ResumableTrainingSampler(n, seed=3)
    loader = PretrainBatches(MappedStream(_records(n), _IndexMapper(), sampler, chunk=batch), batch_size=batch,
                             num_workers=workers, start_method="fork")
    got = [d["image_id"] for b in itertools.islice(iter(loader), 12) for d in b]
    assert got == list(itertools.islice(iter(ResumableTrainingSampler(n, seed=3)), 48))


def test_rejected_records_are_replaced_and_a_hopeless_dataset_fails_clearly():
    n = 50
    stream = MappedStream(_records(n), _IndexMapper(bad={0, 1, 2, 3, 4}), ResumableTrainingSampler(n, seed=0), chunk=5)
    ids = [d["image_id"] for d in itertools.islice(iter(stream), 3 * n)]
    assert len(ids) == 3 * n and not set(ids) & {0, 1, 2, 3, 4}
    hopeless = MappedStream(_records(n), _IndexMapper(bad=range(n)), ResumableTrainingSampler(n, seed=0), chunk=5)
    with pytest.raises(RuntimeError, match=r"rejected .* in a row \(the last: 'f\d+\.jpg'; 50 of 50"):
        next(iter(hopeless))


def test_unavailable_start_method_falls_back_with_a_warning(caplog, monkeypatch):
    from regionssl.data import stream as stream_module

    monkeypatch.setattr(stream_module.multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    with caplog.at_level(logging.WARNING):
        assert stream_module.worker_start_method("fork") == ""
    assert "'fork' is not available" in caplog.text
    assert stream_module.worker_start_method("spawn") == "spawn"


def test_loader_iterator_draws_its_seed_when_made():
    """iter() makes the DataLoader's iterator at once (it draws its base seed from the global
    generator), as iter(DataLoader) does: DataStateHook restores the saved random state right after."""
    n = 8
    loader = PretrainBatches(MappedStream(_records(n), _IndexMapper(), ResumableTrainingSampler(n, seed=0), chunk=2),
                             batch_size=2, num_workers=0)
    torch.manual_seed(5)
    iter(loader)
    after_iter = torch.rand(1)
    torch.manual_seed(5)
    torch.empty((), dtype=torch.int64).random_()  # the DataLoader's one draw
    assert torch.equal(after_iter, torch.rand(1))


def test_workers_are_forked_whatever_the_default():
    """Inside launch()'d processes Python's default start method is spawn; the loader asks for fork."""
    n = 8
    stream = MappedStream(_records(n), _IndexMapper(), ResumableTrainingSampler(n, seed=0), chunk=2)
    loader = PretrainBatches(stream, batch_size=2, num_workers=2, start_method="fork")
    assert loader.loader.multiprocessing_context.get_start_method() == "fork"
    assert PretrainBatches(stream, batch_size=2, num_workers=2, start_method="").loader.multiprocessing_context is None
