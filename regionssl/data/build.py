"""The pretraining data loader: Detectron2's train loader over image-only dicts + our mapper."""
import logging

import torch
from detectron2.data import DatasetFromList, get_detection_dataset_dicts
from detectron2.utils import comm

from .datasets import ensure_registered
from .mapper import RegionSSLDatasetMapper
from .sampler import ResumableTrainingSampler
from .stream import MappedStream, PretrainBatches

__all__ = ["get_pretrain_dataset_dicts", "build_pretrain_train_loader", "ResumableTrainingSampler", "image_groups"]

logger = logging.getLogger(__name__)


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

    Detectron2's stream and batch order (``stream.py``), each loader worker taking its share of
    the sampler by arithmetic and shipping a batch as a few tensors; workers are forked
    (``INPUT.REGIONSSL.LOADER.START_METHOD``). The records are serialised once into one byte
    tensor (Detectron2's ``DatasetFromList``) that every worker shares.

    Aspect-ratio grouping is off: every view has a fixed size, so grouping would only reorder.
    Batches are pinned when the model runs on CUDA, so the model's non-blocking copies of views
    and boxes are asynchronous; on CPU nothing is pinned (and PyTorch has nothing to warn about).
    """
    dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
    logger.info(f"Pretraining on {len(dicts)} images from {list(cfg.DATASETS.TRAIN)}")
    sampler = ResumableTrainingSampler(
        len(dicts), groups=image_groups(dicts) if cfg.INPUT.REGIONSSL.BALANCE_GROUPS else None
    )
    dataset = DatasetFromList(dicts, copy=False)
    del dicts  # the serialised copy is what the workers share
    if mapper is None:
        mapper = RegionSSLDatasetMapper(cfg, dataset_dicts=dataset)
    world = comm.get_world_size()
    total = cfg.SOLVER.IMS_PER_BATCH
    if total % world:
        raise ValueError(f"SOLVER.IMS_PER_BATCH = {total} is not divisible by the number of processes ({world}).")
    return PretrainBatches(
        MappedStream(dataset, mapper, sampler, chunk=total // world),
        batch_size=total // world,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        pin_memory=cfg.MODEL.DEVICE.startswith("cuda") and torch.cuda.is_available(),
        start_method=cfg.INPUT.REGIONSSL.LOADER.START_METHOD,
    )
