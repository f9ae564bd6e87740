"""The pretraining loader's plumbing: mapped samples of one process's stream, each loader worker
its share, packed into a few tensors per batch, workers started by fork.

Replaces what Detectron2's ``build_detection_train_loader`` assembles for a map-style dataset
(``MapDataset`` + ``ToIterableDataset`` + ``DataLoader``), keeping its stream and batch order:

* :class:`MappedStream`: loader worker w maps the indices :meth:`ResumableTrainingSampler.worker_stream`
  gives it (chunks of B in turn, Detectron2's sharding) instead of iterating the whole stream once
  per batch slot. An image the mapper rejects (unreadable, no valid region) is replaced by a random
  other one, as Detectron2's ``MapDataset`` does, but drawn in O(1) (``MapDataset`` rebuilds a list
  of all N indices per retry and keeps a set of all N per worker);
* :func:`~regionssl.data.batching.pack_batch` as ``collate_fn``: a handful of shared-memory
  descriptors per batch instead of one per tensor;
* :class:`PretrainBatches`: the iterable the trainer reads, giving lists of dicts as before.
"""
import logging
import multiprocessing
import random

import torch
from detectron2.data.build import worker_init_reset_seed

from .batching import pack_batch

__all__ = ["MappedStream", "PretrainBatches", "worker_start_method"]

logger = logging.getLogger(__name__)


def worker_start_method(requested):
    """The multiprocessing start method for loader workers: ``requested`` if this platform has it,
    ``""`` for Python's default. ``fork`` is safe here: loader workers never touch CUDA (the
    photometric ops on the device run in the training process), and it starts a process's workers
    at once, sharing its memory, where ``spawn`` (the default inside ``launch``'d processes)
    re-imports torch, Detectron2 and regionssl in every worker, one after another."""
    if requested and requested not in multiprocessing.get_all_start_methods():
        logger.warning(f"Loader worker start method {requested!r} is not available here; using Python's default.")
        return ""
    return requested


class MappedStream(torch.utils.data.IterableDataset):
    """``mapper(dataset[i])`` for the indices ``i`` of this loader worker's share of the stream.

    Args:
        dataset: indexable records (Detectron2's ``DatasetFromList``).
        mapper: record -> sample dict, or None to reject the record.
        sampler: a :class:`~regionssl.data.sampler.ResumableTrainingSampler`.
        chunk: images per worker batch (the workers take chunks of the stream in turn).
        max_rejected: consecutive rejected records after which the worker stops with an error
            naming the last one (a dataset with nothing usable fails instead of spinning).
    """

    def __init__(self, dataset, mapper, sampler, chunk, max_rejected=100):
        self.dataset, self.mapper, self.sampler = dataset, mapper, sampler
        self.chunk, self.max_rejected = chunk, max_rejected

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        s = self.sampler
        rng = random.Random(f"{s.seed}/{s._rank}/{worker}/{s.skip}")  # replacement draws, per worker
        rejected = set()
        for index in s.worker_stream(worker, workers, self.chunk):
            yield self._map(index, rng, rejected)

    def _map(self, index, rng, rejected):
        """The sample of ``index``, or of random replacements while the mapper rejects them."""
        n = len(self.dataset)
        for _ in range(self.max_rejected):
            record = self.dataset[index]
            sample = self.mapper(record)
            if sample is not None:
                return sample
            rejected.add(index)
            if len(rejected) >= n:
                break
            index = rng.randrange(n)
            while index in rejected:  # expected tries n / (n - rejected): O(1) unless most are rejected
                index = rng.randrange(n)
        raise RuntimeError(
            f"The pretraining mapper rejected {self.max_rejected} records in a row (the last: "
            f"{record.get('file_name', record)!r}; {len(rejected)} of {n} rejected by this loader worker so far). "
            "The warnings above say why (unreadable files, images too small for the views)."
        )


class PretrainBatches:
    """Iterable of lists of mapped dicts (one per worker batch) over a ``DataLoader`` of
    :func:`pack_batch` batches; exposes the ``sampler``, the ``dataset`` and ``pin_memory``."""

    def __init__(self, stream, batch_size, num_workers, pin_memory=False, start_method="fork"):
        self.stream, self.sampler, self.pin_memory = stream, stream.sampler, pin_memory
        self.dataset = stream.dataset
        context = worker_start_method(start_method) if num_workers > 0 else ""
        self.loader = torch.utils.data.DataLoader(
            stream,
            batch_size=batch_size,
            drop_last=True,
            num_workers=num_workers,
            collate_fn=pack_batch,
            worker_init_fn=worker_init_reset_seed,
            pin_memory=pin_memory,
            multiprocessing_context=context or None,
        )

    def __iter__(self):
        # the DataLoader's iterator is made now, as iter(DataLoader) does (it draws the workers' base
        # seed from the global generator then: DataStateHook restores the saved random state after it)
        return self._unpacked(iter(self.loader))

    @staticmethod
    def _unpacked(batches):
        for packed in batches:
            yield packed.unpack()
