"""The pretraining data loader: Detectron2's train loader over image-only dicts + our mapper."""
import itertools
import logging

import torch
from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.samplers import TrainingSampler

from .datasets import ensure_registered
from .mapper import RegionSSLDatasetMapper

__all__ = ["get_pretrain_dataset_dicts", "build_pretrain_train_loader", "ResumableTrainingSampler", "image_groups"]

logger = logging.getLogger(__name__)


class ResumableTrainingSampler(TrainingSampler):
    """Detectron2's ``TrainingSampler`` (same infinite shuffled stream, same seed rule) whose stream
    can start after the ``skip`` indices this process consumed before a resume.

    ``skip`` and the seed are set by :class:`regionssl.engine.resume.DataStateHook` from the
    checkpoint before the loader's iterator is created (the loader iterates lazily).

    With ``groups`` (one label per image: a video clip, a stereo pair) the stream instead goes
    through the groups in rounds, each round a random order of all groups and one random member
    of each: every group is drawn equally often, and G consecutive draws never repeat a group
    (fewer near-duplicates in a batch, which are false negatives for the contrastive methods).
    """

    skip = 0

    def __init__(self, size, groups=None, **kwargs):
        super().__init__(size, **kwargs)
        self._groups = None
        if groups is not None:
            assert len(groups) == size, "one group label per image"
            members = {}
            for i, g in enumerate(groups):
                members.setdefault(g, []).append(i)
            self._groups = list(members.values())  # in order of first appearance

    def _infinite_indices(self):
        if self._groups is None:
            yield from super()._infinite_indices()
            return
        g = torch.Generator()
        g.manual_seed(self._seed)
        while True:
            for group in torch.randperm(len(self._groups), generator=g).tolist():
                members = self._groups[group]
                yield members[int(torch.randint(len(members), (1,), generator=g))]

    def __iter__(self):
        start = self._rank + self.skip * self._world_size
        yield from itertools.islice(self._infinite_indices(), start, None, self._world_size)


def image_groups(dicts):
    """The group label of every record (``"group"``; records without one are groups of one)."""
    return [d.get("group", d["file_name"]) for d in dicts]


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
            len(dicts), groups=image_groups(dicts) if cfg.INPUT.REGIONSSL.BALANCE_GROUPS else None
        ),
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=False,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        pin_memory=cfg.MODEL.DEVICE.startswith("cuda") and torch.cuda.is_available(),
    )
