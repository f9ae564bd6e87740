"""The pretraining data loader: Detectron2's train loader over image-only dicts + our mapper."""
import logging

import torch
from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts

from .datasets import ensure_registered
from .mapper import RegionSSLDatasetMapper

__all__ = ["get_pretrain_dataset_dicts", "build_pretrain_train_loader"]

logger = logging.getLogger(__name__)


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
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=False,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        pin_memory=cfg.MODEL.DEVICE.startswith("cuda") and torch.cuda.is_available(),
    )
