"""Online/momentum encoder machinery shared by every pretraining method.

* :func:`build_trunk` builds the online encoder with exactly the module names a Detectron2
  detector has (``backbone.*``; C4: ``roi_heads.res5``; FPN box head: ``roi_heads.box_head``).
* :func:`momentum_at` gives the EMA coefficient as a function of the global iteration.
* :func:`make_momentum_copy` / :func:`ema_update` keep the target (key) encoder.
* :func:`shuffled_forward` is MoCo's shuffle-BN generalised to images *and* their boxes;
  :func:`split_forward` runs a batch in groups (per-group BatchNorm, one-process shuffle-BN).
* :class:`RegionPooler` turns backbone features and boxes into one vector per region and level.
"""
import copy
import math

import torch
from detectron2.layers import ROIAlign, ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.poolers import convert_boxes_to_pooler_format
from detectron2.modeling.roi_heads import Res5ROIHeads
from detectron2.modeling.roi_heads.box_head import build_box_head
from detectron2.structures import Boxes
from torch import nn

from ..utils.distributed import all_gather_cat, broadcast_from_rank0, world_size

__all__ = [
    "build_trunk",
    "momentum_at",
    "make_momentum_copy",
    "ema_update",
    "split_forward",
    "shuffled_forward",
    "RegionPooler",
]


def build_trunk(cfg, kind):
    """Online encoder modules named as in the detector.

    Args:
        kind: "global"/"c5": ``backbone`` only (ResNet up to res5).
              "c4": ``backbone`` (up to res4) and ``roi_heads.res5`` (Res5ROIHeads' block).
              "fpn": ``backbone`` (ResNet + FPN) and ``roi_heads.box_head`` (MODEL.ROI_BOX_HEAD).
    Returns:
        (backbone, roi_heads or None, region feature dim)
    """
    backbone = build_backbone(cfg)
    roi_heads = None
    if kind in ("global", "c5"):
        dim = backbone.output_shape()["res5"].channels
    elif kind == "c4":
        roi_heads = nn.Module()
        roi_heads.res5, dim = Res5ROIHeads._build_res5_block(cfg)
    elif kind == "fpn":
        roi_heads = nn.Module()
        res = cfg.MODEL.REGIONSSL.ROI.POOLER_RESOLUTION
        channels = cfg.MODEL.FPN.OUT_CHANNELS
        roi_heads.box_head = build_box_head(cfg, ShapeSpec(channels=channels, height=res, width=res))
        dim = roi_heads.box_head.output_shape.channels
    else:
        raise ValueError(f"Unknown trunk kind {kind!r}")
    return backbone, roi_heads, dim


def momentum_at(iteration, max_iter, base, schedule):
    """EMA coefficient at global iteration k.

    "constant": ``m = base`` (MoCo/InsLoc/ReSim: 0.999).
    "cosine":   ``tau_k = 1 - (1 - tau_0) * (cos(pi k / K) + 1) / 2`` (BYOL/SCRL), tau_K = 1.
    """
    if schedule == "constant":
        return base
    if schedule == "cosine":
        k = min(max(iteration, 0), max_iter)
        return 1.0 - (1.0 - base) * (math.cos(math.pi * k / max(max_iter, 1)) + 1.0) / 2.0
    raise ValueError(f"Unknown MODEL.REGIONSSL.MOMENTUM.SCHEDULE {schedule!r}")


def make_momentum_copy(modules):
    """``nn.ModuleDict`` of frozen deep copies of ``{name: module}`` (target initialised from online)."""
    target = nn.ModuleDict({name: copy.deepcopy(m) for name, m in modules.items() if m is not None})
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(online, target, m):
    """``xi <- m * xi + (1 - m) * theta`` for parameters of matching entries of two name->module maps.

    Buffers (BN running statistics) are not averaged: the target keeps its own, as in MoCo/BYOL.
    m = 0 copies the online weights, m = 1 freezes the target.
    """
    for name, t_mod in target.items():
        t_params = list(t_mod.parameters())
        o_params = list(online[name].parameters())
        assert len(t_params) == len(o_params), name
        if not t_params:
            continue
        # one fused pass, xi + (1 - m)(theta - xi); exact at both ends (m = 0 gives theta, m = 1 xi)
        torch._foreach_lerp_(t_params, [p.detach() for p in o_params], 1.0 - m)


def _take(boxes, idx):
    """Rows ``idx`` of a per-image box list, or of every level of a per-level list of such lists."""
    if boxes and isinstance(boxes[0], (list, tuple)):
        return [[level[i] for i in idx] for level in boxes]
    return [boxes[i] for i in idx]


def split_forward(fn, images, boxes, splits=1, dim=0):
    """Run ``fn`` on ``splits`` consecutive groups of the batch and concatenate along ``dim``.

    Each call sees only its group, so BatchNorm statistics are per group: MoCo's 1-GPU demo
    (``facebookresearch/moco`` ``colab/moco_cifar10_demo.ipynb``, ``SplitBatchNorm``) simulates
    the per-GPU BN of an 8-GPU run this way. ``splits <= 1`` is ``fn(images, boxes)``.

    Args:
        images: (N, 3, H, W); boxes: list of N (R_i, 4), or a list over levels of such lists.
        dim: axis of ``fn``'s output that runs over regions (0 for (R, D), 1 for (L, R, D)).
    """
    if splits <= 1:
        return fn(images, boxes)
    n = images.shape[0]
    assert n >= splits, f"MODEL.REGIONSSL.BN_SPLITS={splits} needs at least {splits} images per process, got {n}"
    groups = torch.arange(n).tensor_split(splits)
    return torch.cat([fn(images[g], _take(boxes, g.tolist())) for g in groups], dim=dim)


@torch.no_grad()
def shuffled_forward(fn, images, boxes, splits=1):
    """Run ``fn(images, boxes) -> (R, D)`` on a shuffled batch, then unshuffle the rows.

    MoCo's shuffle-BN: the key encoder's BatchNorm then sees statistics of a random subset of the
    global batch, not of the images its queries came from, which closes the intra-batch
    statistics shortcut. Boxes travel with their images (InsLoc shuffles both). Across processes
    the whole global batch is permuted; with ``splits > 1`` each process then runs its share in
    ``splits`` groups (:func:`split_forward`), which also gives one process a shuffle-BN over
    ``splits`` virtual devices. One process with ``splits <= 1`` is ``fn(images, boxes)``.

    Args:
        images: (N, 3, H, W), N equal on every rank.
        boxes: list of N Boxes / (R_i, 4) tensors, in the same order.
    Returns:
        (sum_i R_i, D) outputs for this rank's own images, in input order.
    """
    n = images.shape[0]
    if world_size() == 1:
        if splits <= 1:
            return fn(images, boxes)
        perm = torch.randperm(n, device=images.device)
        out = split_forward(fn, images[perm], _take(boxes, perm.tolist()), splits)
        per_image = torch.split(out, [len(boxes[i]) for i in perm.tolist()])
        return torch.cat([per_image[j] for j in torch.argsort(perm).tolist()])
    all_images, _ = all_gather_cat(images)
    counts = torch.tensor([len(b) for b in boxes], device=images.device)
    flat = torch.cat([_as_tensor(b) for b in boxes]).to(images.device)
    all_counts, _ = all_gather_cat(counts)
    all_flat, _ = all_gather_cat(flat)
    all_boxes = list(torch.split(all_flat, all_counts.tolist()))
    perm = broadcast_from_rank0(torch.randperm(all_images.shape[0], device=images.device))
    rank = torch.distributed.get_rank()
    mine = perm[rank * n : (rank + 1) * n]  # global indices of the images this rank encodes
    out = split_forward(fn, all_images[mine], [all_boxes[i] for i in mine.tolist()], splits)
    # send each output row back to the rank that owns its image
    owners, _ = all_gather_cat(mine)
    outs, out_counts = all_gather_cat(out)
    per_image = list(torch.split(outs, all_counts[owners].tolist()))
    order = torch.argsort(owners)  # global image index -> position in `per_image`
    start = rank * n
    return torch.cat([per_image[j] for j in order[start : start + n].tolist()])


def _as_tensor(b):
    return b.tensor if isinstance(b, Boxes) else torch.as_tensor(b)


class RegionPooler(nn.Module):
    """Per-region vectors from backbone features (no parameters of its own).

    kind "fpn": RoIAlign(res x res) of every box on **every** level in ``in_features`` (InsLoc;
        no size-based level assignment), then ``roi_heads.box_head`` -> (L, R, C).
    kind "c4": RoIAlign on res4, then ``roi_heads.res5`` and spatial mean -> (1, R, 2048).
    kind "c5": RoIAlign on res5 (SCRL: 1x1, aligned=False), flattened/averaged -> (1, R, 2048).
    kind "global": spatial mean of res5 per image (boxes ignored) -> (1, N, 2048).

    ``net`` passed to ``forward`` is any object with ``.roi_heads`` (the model itself or its
    momentum ModuleDict), so online and target encoders share this code.
    """

    def __init__(self, kind, in_features, strides, resolution, sampling_ratio, aligned):
        super().__init__()
        self.kind, self.in_features = kind, list(in_features)
        self.aligners = nn.ModuleList(
            ROIAlign((resolution, resolution), 1.0 / strides[f], sampling_ratio, aligned) for f in self.in_features
        )

    def forward(self, net, features, boxes):
        """features: dict name -> (N, C, H, W); boxes: list of N (R_i, 4) tensors, or per level a list.

        ``boxes`` may also be a list over levels of such lists (InsLoc's P5 jittered query box).
        Returns (L, R, C).
        """
        if self.kind == "global":
            return features["res5"].mean(dim=(2, 3))[None]
        per_level = boxes if isinstance(boxes[0], (list, tuple)) else [boxes] * len(self.in_features)
        pooled = [
            align(features[f], convert_boxes_to_pooler_format([Boxes(_as_tensor(b)) for b in bl]))
            for f, align, bl in zip(self.in_features, self.aligners, per_level)
        ]
        if self.kind == "fpn":
            num = pooled[0].shape[0]
            out = net.roi_heads.box_head(torch.cat(pooled))  # one head call for all levels
            return out.view(len(pooled), num, -1)
        if self.kind == "c4":
            return net.roi_heads.res5(pooled[0]).mean(dim=(2, 3))[None]
        if self.kind == "c5":
            return pooled[0].mean(dim=(2, 3))[None]
        raise ValueError(self.kind)
