"""Encoders: one module per trunk layout, ``forward(images, boxes) -> (L, R, C)``.

An encoder is the network a method trains and transfers: a Detectron2 backbone and, for the
layouts that pretrain one, the detector's region head. The online and the target (momentum)
network of a method are two instances of the same encoder. Registered in ``ENCODER_REGISTRY`` and
chosen by ``MODEL.REGIONSSL.ENCODER`` (empty: :func:`default_encoder_name`, from the backbone and
the method):

=================  ====================================  ===============================  ==========================
encoder            trunk                                 parts (the detector's names)     rows of (L, R, C)
=================  ====================================  ===============================  ==========================
``GlobalEncoder``  ResNet, or ResNet + FPN (its res5)     ``backbone``                     images: mean of res5
``RoIEncoder``     ResNet                                ``backbone``                     boxes: RoIAlign on one map
                                                                                          (SCRL: res5, 1x1), mean
``C4Encoder``      ResNet to res4 + Res5ROIHeads' block  ``backbone``, ``roi_heads.res5``  boxes: RoIAlign on res4 ->
                                                                                          res5 -> mean; images
                                                                                          (boxes None): res5 of the
                                                                                          whole map, mean
``FPNEncoder``     ResNet + FPN + box head               ``backbone``,                    boxes on every level L:
                                                         ``roi_heads.box_head``           RoIAlign -> box head
=================  ====================================  ===============================  ==========================

The parts carry exactly the module names of a Detectron2 detector, so a pretraining checkpoint is
a detector's ``MODEL.WEIGHTS``. A model registers its encoders' parts under those names itself
(the online encoder's as ``backbone``/``roi_heads``, the target's under ``momentum``); the encoder
objects are held as plain attributes, so every parameter has one name.
"""
import copy

import torch
from detectron2.config import configurable
from detectron2.layers import ROIAlign, ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone import FPN
from detectron2.modeling.roi_heads import Res5ROIHeads
from detectron2.modeling.roi_heads.box_head import build_box_head
from detectron2.utils.registry import Registry
from torch import nn

from .poolers import BoxPooler, boxes_to_rois

__all__ = [
    "ENCODER_REGISTRY", "Encoder", "GlobalEncoder", "RoIEncoder", "C4Encoder", "FPNEncoder", "build_encoder",
    "default_encoder_name", "features_with_bottom_up",
]

ENCODER_REGISTRY = Registry("REGIONSSL_ENCODER")
ENCODER_REGISTRY.__doc__ = "Encoder subclasses, one per trunk layout; see regionssl/modeling/encoders.py."


def default_encoder_name(cfg, image_level=False):
    """The encoder for a config without ``MODEL.REGIONSSL.ENCODER``.

    Image-level methods (whole views): ``C4Encoder`` when the regions are on res4 (a C4 trunk, whose
    res5 is the region head), else ``GlobalEncoder``. Region methods: ``FPNEncoder`` with an FPN
    backbone, ``C4Encoder`` when ``IN_FEATURES`` is ``["res4"]``, else ``RoIEncoder``.
    """
    c4 = list(cfg.MODEL.REGIONSSL.IN_FEATURES) == ["res4"]
    if image_level:
        return "C4Encoder" if c4 else "GlobalEncoder"
    if "fpn" in cfg.MODEL.BACKBONE.NAME:
        return "FPNEncoder"
    return "C4Encoder" if c4 else "RoIEncoder"


def build_encoder(cfg, image_level=False):
    """The encoder named by ``MODEL.REGIONSSL.ENCODER`` (or :func:`default_encoder_name`), built from ``cfg``."""
    name = cfg.MODEL.REGIONSSL.ENCODER or default_encoder_name(cfg, image_level)
    if name not in ENCODER_REGISTRY:
        raise KeyError(f"MODEL.REGIONSSL.ENCODER={name!r} is not a registered encoder; "
                       f"choose one of {sorted(k for k, _ in ENCODER_REGISTRY)}")
    return ENCODER_REGISTRY.get(name)(cfg)


def features_with_bottom_up(backbone, images):
    """Every map of one forward pass: the backbone's outputs, and for an FPN also the bottom-up
    ResNet maps (``res*``), which Detectron2's ``FPN.forward`` does not return (a forward hook on
    ``bottom_up`` keeps them)."""
    if not isinstance(backbone, FPN):
        return backbone(images)
    captured = {}
    handle = backbone.bottom_up.register_forward_hook(lambda _m, _i, out: captured.update(out))
    try:
        out = backbone(images)
    finally:
        handle.remove()
    return {**captured, **out}


def _res5_shape(backbone):
    shapes = backbone.bottom_up.output_shape() if isinstance(backbone, FPN) else backbone.output_shape()
    assert "res5" in shapes, f"the encoder pools res5: add res5 to MODEL.RESNETS.OUT_FEATURES (have {list(shapes)})"
    return shapes["res5"]


def _box_pooler(cfg, backbone, in_features):
    r, shapes = cfg.MODEL.REGIONSSL, backbone.output_shape()
    missing = [f for f in in_features if f not in shapes]
    assert not missing, f"MODEL.REGIONSSL.IN_FEATURES {missing} not produced by the backbone ({list(shapes)})"
    strides = {f: shapes[f].stride for f in in_features}
    return BoxPooler(in_features, strides, r.ROI.POOLER_RESOLUTION, r.ROI.SAMPLING_RATIO, r.ROI.ALIGNED)


class Encoder(nn.Module):
    """Base: ``backbone`` (+ ``roi_heads`` holding the region head) -> (L, R, C) region features.

    Attributes:
        levels: names of the L output levels (``["global"]`` for whole images).
        out_channels: C.
        pools_boxes: False when the rows are images whatever the boxes (GlobalEncoder).
    """

    pools_boxes = True

    def __init__(self, backbone, roi_heads=None):
        super().__init__()
        self.backbone = backbone
        self.roi_heads = roi_heads

    def parts(self):
        """{detector name: module} of the trainable parts (``backbone``, ``roi_heads`` if any)."""
        return {n: m for n, m in (("backbone", self.backbone), ("roi_heads", self.roi_heads)) if m is not None}

    def with_parts(self, parts):
        """A copy of this encoder made of ``parts`` ({name: module}, e.g. the target network's
        modules) instead of its own; everything else (poolers, settings) is copied."""
        memo = {id(getattr(self, name)): module for name, module in parts.items()}
        return copy.deepcopy(self, memo)

    def features(self, images):
        """{name: (N, C, H, W)} maps of the (N, 3, H, W) normalised ``images``."""
        return self.backbone(images)

    def pool(self, features, boxes):
        """(L, R, C) features of ``boxes`` (list of N (R_i, 4) in view pixels, R = sum R_i, or one
        such list per level) from :meth:`features`; boxes None: one row per image."""
        raise NotImplementedError

    def forward(self, images, boxes=None):
        return self.pool(self.features(images), boxes)

    def probe_regions(self, images, boxes):
        """(sum R_i, C) features of ``boxes`` for the retrieval probe: the mean over the levels."""
        return self(images, boxes).mean(dim=0)


@ENCODER_REGISTRY.register()
class GlobalEncoder(Encoder):
    """Whole images: spatial mean of res5 -> (1, N, C) (MoCo-v2, BYOL, SwAV, CVSA, ReSim-FPN's
    instance branch, res5 read from the FPN's bottom-up pass). Boxes are ignored, except by the
    probe, which pools every method on boxes: RoIAlign 7x7 of res5, mean."""

    pools_boxes = False
    levels = ["global"]

    @configurable
    def __init__(self, *, backbone):
        super().__init__(backbone)
        res5 = _res5_shape(backbone)
        self.out_channels = res5.channels
        self.probe_pooler = ROIAlign((7, 7), 1.0 / res5.stride, 0, True)

    @classmethod
    def from_config(cls, cfg):
        return {"backbone": build_backbone(cfg)}

    def features(self, images):
        return features_with_bottom_up(self.backbone, images)

    def pool(self, features, boxes=None):
        return features["res5"].mean(dim=(2, 3))[None]

    def probe_regions(self, images, boxes):
        return self.probe_pooler(self.features(images)["res5"], boxes_to_rois(boxes)).mean(dim=(2, 3))


@ENCODER_REGISTRY.register()
class RoIEncoder(Encoder):
    """Boxes on one backbone map (``IN_FEATURES``): RoIAlign (``ROI.*``; SCRL: res5, 1x1, adaptive
    sampling, ``aligned=False``), spatial mean -> (1, R, C)."""

    @configurable
    def __init__(self, *, backbone, pooler):
        super().__init__(backbone)
        assert len(pooler.in_features) == 1, f"RoIEncoder pools one map, IN_FEATURES={pooler.in_features}"
        self.pooler, self.levels = pooler, list(pooler.in_features)
        self.out_channels = backbone.output_shape()[self.levels[0]].channels

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        return {"backbone": backbone, "pooler": _box_pooler(cfg, backbone, cfg.MODEL.REGIONSSL.IN_FEATURES)}

    def pool(self, features, boxes):
        return self.pooler(features, boxes)[0].mean(dim=(2, 3))[None]


@ENCODER_REGISTRY.register()
class C4Encoder(Encoder):
    """C4: ``backbone`` up to res4 and ``roi_heads.res5`` (Detectron2's ``Res5ROIHeads`` block).
    Boxes: RoIAlign on res4 (InsLoc: 14x14), res5, spatial mean -> (1, R, 2048). Boxes None: res5
    of the whole res4 map, which is exactly ResNet's stage 5, mean -> (1, N, 2048)."""

    @configurable
    def __init__(self, *, backbone, res5, out_channels, pooler):
        roi_heads = nn.Module()
        roi_heads.res5 = res5
        super().__init__(backbone, roi_heads)
        self.pooler, self.levels, self.out_channels = pooler, list(pooler.in_features), out_channels

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        res5, out_channels = Res5ROIHeads._build_res5_block(cfg)
        in_features = list(cfg.MODEL.REGIONSSL.IN_FEATURES)
        assert in_features == ["res4"], f"C4Encoder pools res4 (MODEL.REGIONSSL.IN_FEATURES={in_features})"
        return {"backbone": backbone, "res5": res5, "out_channels": out_channels,
                "pooler": _box_pooler(cfg, backbone, in_features)}

    def pool(self, features, boxes):
        if boxes is None:
            return self.roi_heads.res5(features[self.levels[0]]).mean(dim=(2, 3))[None]
        return self.roi_heads.res5(self.pooler(features, boxes)[0]).mean(dim=(2, 3))[None]


@ENCODER_REGISTRY.register()
class FPNEncoder(Encoder):
    """FPN: ``backbone`` (ResNet + FPN) and ``roi_heads.box_head`` (``MODEL.ROI_BOX_HEAD``). Every box
    is RoIAligned on **every** level of ``IN_FEATURES`` (InsLoc: P2-P5, 7x7; no size-based level
    assignment) and the L R RoIs go through the shared box head in one call -> (L, R, C)."""

    @configurable
    def __init__(self, *, backbone, box_head, pooler):
        roi_heads = nn.Module()
        roi_heads.box_head = box_head
        super().__init__(backbone, roi_heads)
        self.pooler, self.levels = pooler, list(pooler.in_features)
        self.out_channels = box_head.output_shape.channels

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        res, channels = cfg.MODEL.REGIONSSL.ROI.POOLER_RESOLUTION, cfg.MODEL.FPN.OUT_CHANNELS
        return {"backbone": backbone, "box_head": build_box_head(cfg, ShapeSpec(channels=channels, height=res, width=res)),
                "pooler": _box_pooler(cfg, backbone, cfg.MODEL.REGIONSSL.IN_FEATURES)}

    def pool(self, features, boxes):
        assert boxes is not None, "FPNEncoder pools boxes"
        pooled = self.pooler(features, boxes)
        out = self.roi_heads.box_head(torch.cat(pooled))  # one head call for all levels
        return out.view(len(pooled), pooled[0].shape[0], -1)
