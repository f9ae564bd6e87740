"""The pretraining data loader: Detectron2's train loader over image-only dicts + our mapper."""
import itertools
import logging

import torch
from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.samplers import TrainingSampler

from .datasets import ensure_registered
from .mapper import RegionSSLDatasetMapper

__all__ = ["get_pretrain_dataset_dicts", "build_pretrain_train_loader", "ResumableTrainingSampler", "group_balanced_weights"]

logger = logging.getLogger(__name__)


class ResumableTrainingSampler(TrainingSampler):
    """Detectron2's ``TrainingSampler`` (same infinite shuffled stream, same seed rule) whose stream
    can start after the ``skip`` indices this process consumed before a resume.

    :meth:`resume` sets ``skip`` and the seed (:class:`regionssl.engine.resume.DataStateHook`, from
    the checkpoint) before the loader's iterator is created (the loader iterates lazily).

    With ``weights`` (one per image) the stream instead draws images independently with
    probability proportional to their weight (e.g. :func:`group_balanced_weights`).
    """

    skip = 0

    def __init__(self, size, weights=None, **kwargs):
        super().__init__(size, **kwargs)
        self._weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        assert self._weights is None or self._weights.shape == (size,), "one weight per image"

    @property
    def seed(self):
        """The seed of the stream (Detectron2's ``TrainingSampler`` keeps it in ``_seed``)."""
        return self._seed

    def resume(self, seed, skip):
        """Continue the stream of ``seed`` after the first ``skip`` indices of this process."""
        self._seed, self.skip = int(seed), int(skip)

    def _infinite_indices(self):
        if self._weights is None:
            yield from super()._infinite_indices()
            return
        g = torch.Generator()
        g.manual_seed(self._seed)
        while True:
            yield from torch.multinomial(self._weights, self._size, replacement=True, generator=g).tolist()

    def __iter__(self):
        start = self._rank + self.skip * self._world_size
        yield from itertools.islice(self._infinite_indices(), start, None, self._world_size)


def group_balanced_weights(dicts):
    """Per-image sampling weights ``1 / |group|``: every group (a video clip, a stereo pair; records
    without ``"group"`` are groups of one) is drawn equally often, so one long clip cannot fill the
    batches with near-identical frames (false negatives for the contrastive methods)."""
    groups = [d.get("group", d["file_name"]) for d in dicts]
    sizes = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    return [1.0 / sizes[g] for g in groups]


def get_pretrain_dataset_dicts(names):
    """Dataset dicts of ``names``, never filtering images without annotations."""
    names = [names] if isinstance(names, str) else list(names)
    ensure_registered(names)
    dicts = get_detection_dataset_dicts(names, filter_empty=False)
    if not dicts:
        raise ValueError(f"Datasets {names} contain no images")
    return dicts


def build_pretrain_train_loader(cfg, mapper=None):
    """Infinite loader of lists of mapped dicts (``cfg.SOLVER.IMS_PER_BATCH`` in total per step).

    Aspect-ratio grouping is off: every view has a fixed size, so grouping would only reorder.
    Batches are pinned when the model runs on CUDA, so the model's non-blocking copies of views
    and boxes are asynchronous; on CPU nothing is pinned (and PyTorch has nothing to warn about).
    """
    dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
    if mapper is None:
        mapper = RegionSSLDatasetMapper(cfg, dataset_dicts=dicts)
    logger.info(f"Pretraining on {len(dicts)} images from {list(cfg.DATASETS.TRAIN)}")
    return build_detection_train_loader(
        dataset=dicts,
        mapper=mapper,
        sampler=ResumableTrainingSampler(
            len(dicts), weights=group_balanced_weights(dicts) if cfg.INPUT.REGIONSSL.BALANCE_GROUPS else None
        ),
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=False,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        pin_memory=cfg.MODEL.DEVICE.startswith("cuda") and torch.cuda.is_available(),
    )
