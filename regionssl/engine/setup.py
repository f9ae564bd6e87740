"""Config set-up shared by train_net.py, tools and tests."""
import functools
import logging
import os

import torch
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm

from ..config import add_regionssl_config
from ..modeling.meta_arch.base import RegionSSLBase

__all__ = ["get_regionssl_cfg", "adapt_to_machine", "check_weights_path", "method_iteration_keys", "auto_scale_workers"]

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
            "output/insloc_fpn/model_final.pth) or a converted .pkl; see README 'Usage'."
        )


def method_iteration_keys(cfg):
    """The iteration-valued config keys the configured pretraining method declares
    (``RegionSSLBase.iteration_keys``); () for a detector."""
    name = cfg.MODEL.META_ARCHITECTURE
    arch = META_ARCH_REGISTRY.get(name) if name in META_ARCH_REGISTRY else None
    return tuple(arch.iteration_keys) if isinstance(arch, type) and issubclass(arch, RegionSSLBase) else ()


def auto_scale_workers(cfg, num_workers):
    """Detectron2's ``DefaultTrainer.auto_scale_workers`` plus the keys it does not know.

    With ``SOLVER.REFERENCE_WORLD_SIZE`` R > 0 and ``num_workers`` n != R, Detectron2 keeps
    ``IMS_PER_BATCH / R`` images per process and scales batch and BASE_LR by s = n / R, MAX_ITER,
    WARMUP_ITERS, STEPS, CHECKPOINT_PERIOD and TEST.EVAL_PERIOD by 1 / s. Scaled here as well, so a
    recipe keeps its shape in epochs: ``SOLVER.BASE_LR_END`` (x s: a final lr relative to the base),
    ``TEST.REGIONSSL.PROBE_PERIOD`` and the iteration-valued keys the configured method declares
    (``RegionSSLBase.iteration_keys``) (x 1 / s). The trainers pass n = processes x
    ``SOLVER.REGIONSSL.ACCUMULATE``: each process with k micro-batches stands for k processes.
    """
    reference = cfg.SOLVER.REFERENCE_WORLD_SIZE
    scaled = DefaultTrainer.auto_scale_workers(cfg, num_workers)
    if scaled is cfg:
        return cfg
    s = num_workers / reference
    frozen = scaled.is_frozen()
    scaled.defrost()
    scaled.SOLVER.BASE_LR_END = cfg.SOLVER.BASE_LR_END * s
    for key in method_iteration_keys(scaled):
        *parents, leaf = key.split(".")
        node = functools.reduce(getattr, parents, scaled)
        node[leaf] = int(round(node[leaf] / s))
    scaled.TEST.REGIONSSL.PROBE_PERIOD = int(round(scaled.TEST.REGIONSSL.PROBE_PERIOD / s))
    if frozen:
        scaled.freeze()
    return scaled
