"""Config set-up shared by train_net.py, tools and tests."""
import logging
import os

import torch
from detectron2.config import get_cfg
from detectron2.utils import comm

from ..config import add_regionssl_config

__all__ = ["get_regionssl_cfg", "adapt_to_machine", "check_weights_path"]

logger = logging.getLogger(__name__)

_NORM_KEYS = ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD")


def get_regionssl_cfg(config_file=None, opts=()):
    """Detectron2 defaults + regionssl keys, merged with a file and ``KEY VALUE`` overrides.

    Unknown keys stop with Detectron2's "Non-existent config key" error naming the key.
    """
    cfg = get_cfg()
    add_regionssl_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"Config file {config_file!r} does not exist")
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


def adapt_to_machine(cfg, world_size=None):
    """Run a GPU config on a CPU machine: MODEL.DEVICE -> cpu, and with several CPU processes
    "SyncBN" -> "naiveSyncBN" (torch's SyncBatchNorm refuses CPU tensors across processes).
    Each change is logged."""
    world_size = comm.get_world_size() if world_size is None else world_size
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("No CUDA device: running on CPU (MODEL.DEVICE=cpu).")
        cfg.MODEL.DEVICE = "cpu"
    if cfg.MODEL.DEVICE == "cpu" and world_size > 1:
        for key in _NORM_KEYS:
            node = cfg.MODEL.get(key)
            if node is not None and node.get("NORM") == "SyncBN":
                logger.warning(f"MODEL.{key}.NORM: SyncBN -> naiveSyncBN for {world_size} CPU processes.")
                node.NORM = "naiveSyncBN"
        proj = cfg.MODEL.REGIONSSL.PROJECTOR  # BYOL/SCRL projector and predictor BN, MoCo v3 output BN
        for key in ("NORM", "OUT_NORM"):
            if proj.get(key) == "SyncBN":
                logger.warning(f"MODEL.REGIONSSL.PROJECTOR.{key}: SyncBN -> naiveSyncBN for {world_size} CPU processes.")
                proj[key] = "naiveSyncBN"
    return cfg


def check_weights_path(path):
    """Fail with one clear message if MODEL.WEIGHTS names a local file that does not exist."""
    if not path or "://" in path:
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"MODEL.WEIGHTS={path!r} does not exist. Give a pretraining checkpoint (e.g. "
            "output/insloc_fpn/model_final.pth) or a converted .pkl; see README 'Fine-tuning'."
        )
