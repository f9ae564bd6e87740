"""What every regionssl pretraining meta-architecture shares.

Module names (the checkpoint contract, DESIGN.md §3):

* online encoder: ``backbone.*`` and, when the variant pretrains them, ``roi_heads.res5.*`` (C4)
  or ``roi_heads.box_head.*`` (FPN) — exactly the detector's names, so a pretraining checkpoint
  is a valid ``MODEL.WEIGHTS`` for fine-tuning;
* everything else (``projector``, ``predictor``, ``momentum.*``, ``queues.*``, ``prototypes``)
  uses names no detector key ends with.

Subclasses implement ``losses(batched_inputs) -> dict`` and may override ``region_embedding``.
"""
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ROIAlign
from detectron2.modeling.poolers import convert_boxes_to_pooler_format
from detectron2.structures import Boxes
from detectron2.utils.events import get_event_storage
from torch import nn

from ..encoders import RegionPooler, build_trunk, ema_update, make_momentum_copy, momentum_at

__all__ = ["RegionSSLBase", "trunk_kind_from_cfg"]


def trunk_kind_from_cfg(cfg, default_global=False):
    """"fpn" if the backbone builder is an FPN, "c4" if the region features come from res4,
    "global" for image-level methods, otherwise "c5"."""
    if "fpn" in cfg.MODEL.BACKBONE.NAME:
        return "fpn"
    if default_global:
        return "global"
    return "c4" if list(cfg.MODEL.REGIONSSL.IN_FEATURES) == ["res4"] else "c5"


class RegionSSLBase(nn.Module):
    """Online encoder + region pooler + helpers; no learning rule.

    Args:
        backbone, roi_heads: the online encoder (see :func:`build_trunk`).
        pooler: :class:`RegionPooler` giving (L, R, C) region vectors.
        pixel_mean, pixel_std: (3,) RGB normalisation, the same as the detector's.
        max_iter: SOLVER.MAX_ITER, for schedules that are functions of the global iteration.
        momentum_base, momentum_schedule: EMA coefficient and its schedule.
    """

    # Methods that compare whole images set this to True (MoCo-v2, BYOL, SwAV).
    is_global = False

    @configurable
    def __init__(self, *, backbone, roi_heads, pooler, pixel_mean, pixel_std, max_iter,
                 momentum_base=0.999, momentum_schedule="constant", feature_dim=2048):
        super().__init__()
        self.backbone = backbone
        if roi_heads is not None:
            self.roi_heads = roi_heads
        self.pooler = pooler
        self.max_iter = max_iter
        self.momentum_base, self.momentum_schedule = momentum_base, momentum_schedule
        self.feature_dim = feature_dim
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self._fallback_iter = 0  # used only outside a trainer (no EventStorage)

    @classmethod
    def from_config(cls, cfg):
        r = cfg.MODEL.REGIONSSL
        kind = trunk_kind_from_cfg(cfg, default_global=cls.is_global)
        backbone, roi_heads, dim = build_trunk(cfg, kind)
        shapes = backbone.output_shape()
        in_features = ["res5"] if kind == "global" else list(r.IN_FEATURES)
        strides = {f: shapes[f].stride for f in in_features}
        pooler = RegionPooler(kind, in_features, strides, r.ROI.POOLER_RESOLUTION, r.ROI.SAMPLING_RATIO, r.ROI.ALIGNED)
        return {
            "backbone": backbone,
            "roi_heads": roi_heads,
            "pooler": pooler,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "max_iter": cfg.SOLVER.MAX_ITER,
            "momentum_base": r.MOMENTUM.BASE,
            "momentum_schedule": r.MOMENTUM.SCHEDULE,
            "feature_dim": dim,
        }

    # ---------------------------------------------------------------- helpers
    @property
    def device(self):
        return self.pixel_mean.device

    def online_modules(self, *extra):
        """{name: module} of the online encoder (+ ``extra`` head names) for EMA/momentum copies."""
        names = ("backbone", "roi_heads") + extra
        return {n: getattr(self, n) for n in names if hasattr(self, n)}

    def build_momentum(self, *extra):
        """Create ``self.momentum``: frozen copies of the online encoder and ``extra`` heads."""
        self.momentum = make_momentum_copy(self.online_modules(*extra))

    @property
    def iteration(self):
        """Global iteration (from the trainer's EventStorage; resumes exactly)."""
        try:
            return get_event_storage().iter
        except AssertionError:
            return self._fallback_iter

    def current_momentum(self):
        return momentum_at(self.iteration, self.max_iter, self.momentum_base, self.momentum_schedule)

    @torch.no_grad()
    def update_momentum(self):
        m = self.current_momentum()
        ema_update({name: getattr(self, name) for name in self.momentum.keys()}, self.momentum, m)
        return m

    def normalize(self, views):
        """List of (3, H, W) uint8 tensors (one size) -> (N, 3, H', W') float on the model device.

        Padded with zeros (= the mean pixel) at the bottom/right up to the backbone's
        ``size_divisibility`` (FPN: 32; a 112 px view would otherwise break the top-down sum).
        Box coordinates are unchanged by this padding.
        """
        x = torch.stack([v.to(self.device, non_blocking=True) for v in views]).float()
        x = (x - self.pixel_mean) / self.pixel_std
        d = getattr(self.backbone, "size_divisibility", 0)
        if d > 1:
            h, w = x.shape[-2:]
            x = F.pad(x, (0, (-w) % d, 0, (-h) % d))
        return x

    def view_batch(self, batched_inputs, v):
        """Images of view ``v`` of every input: (N, 3, H, W)."""
        return self.normalize([d["views"][v] for d in batched_inputs])

    def view_boxes(self, batched_inputs, v, key="boxes"):
        """Per-image (R_i, 4) boxes of view ``v`` on the model device, only valid rows."""
        out = []
        for d in batched_inputs:
            b = d[key][v] if key == "boxes" else d[key]
            out.append(b[d["valid"]].to(self.device) if "valid" in d else b.to(self.device))
        return out

    def log(self, **scalars):
        """Put diagnostics under ``regionssl/<name>`` in the EventStorage (if a trainer runs)."""
        try:
            storage = get_event_storage()
        except AssertionError:
            return
        for k, v in scalars.items():
            storage.put_scalar(f"regionssl/{k}", float(v.detach()) if torch.is_tensor(v) else float(v))

    @staticmethod
    def embedding_std(z):
        """Mean per-dimension std of L2-normalised embeddings; ~1/sqrt(D) healthy, ->0 on collapse."""
        return F.normalize(z.float(), dim=1).std(dim=0).mean()

    # ---------------------------------------------------------------- interface
    def region_embedding(self, images, boxes):
        """Online representation of regions (before any projector), for the retrieval probe.

        Args:
            images: (N, 3, H, W) normalised; boxes: list of N (R_i, 4) tensors.
        Returns:
            (sum R_i, C) for region methods; for global methods the same pooled on each box
            with the res5 RoI pooling, so every method is probed on the same regions.
        """
        features = self.backbone(images)
        if self.pooler.kind == "global":
            stride = self.backbone.output_shape()["res5"].stride
            rois = convert_boxes_to_pooler_format([Boxes(b) for b in boxes])
            return ROIAlign((7, 7), 1.0 / stride, 0, True)(features["res5"], rois).mean(dim=(2, 3))
        return self.pooler(self, features, boxes).mean(dim=0)

    def losses(self, batched_inputs):
        raise NotImplementedError

    def learning_signals(self):
        """List of :class:`~regionssl.modeling.signals.LearningSignal`: the losses the collapse/stall
        guard watches (chance level, embedding dim, diagnostic keys). Empty: nothing is watched."""
        return []

    def forward(self, batched_inputs):
        if not self.training:
            raise RuntimeError(
                f"{type(self).__name__} is a pretraining model: use region_embedding() for features; "
                "evaluation happens by fine-tuning a detector."
            )
        if not isinstance(batched_inputs[0], dict) or "views" not in batched_inputs[0]:
            raise ValueError("Pretraining models need the regionssl mapper's output (dicts with 'views')")
        losses = self.losses(batched_inputs)
        self._fallback_iter += 1
        return losses
