"""Region samplers: which regions are matched across the views of one image.

A sampler is a :class:`RegionSampler`, called on the views of one image; it returns a
:class:`RegionSet` with boxes in **original-image** coordinates and the mapper moves them into every
view with that view's ``transform.apply_box``. So row i of every view's
boxes covers the same original pixels by construction. Exceptions are documented per sampler.

Registered samplers (``INPUT.REGIONSSL.REGION_SAMPLER``):

* ``WholeView``         each view's full extent (global methods; rows are *not* the same pixels).
* ``PastedBox``         the foreground crop of a CopyPaste view pair (InsLoc).
* ``IntersectionBoxes`` SCRL's random boxes inside the views' intersection (docs/methods/scrl.md).
* ``SlidingWindows``    ReSim's windows laid on the query view (view 0) (docs/methods/resim.md).

Also :func:`anchor_jitter`, InsLoc's box augmentation for the query view (docs/methods/insloc.md).
"""
import abc
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.utils.registry import Registry
from torchvision.ops import nms

from ..config import per_level

__all__ = [
    "RegionSet", "RegionSampler", "REGION_SAMPLER_REGISTRY", "build_region_sampler", "anchor_grid", "pick_jittered_anchor",
    "anchor_jitter", "box_iou_np",
]

REGION_SAMPLER_REGISTRY = Registry("REGIONSSL_REGION_SAMPLER")
REGION_SAMPLER_REGISTRY.__doc__ = "RegionSampler subclasses: regions matched across views; see regionssl/data/regions.py."


@dataclass
class RegionSet:
    """Regions of one image.

    Attributes:
        boxes: (R, 4) float64 XYXY in original-image pixels, or None when ``view_boxes`` is given.
        view_boxes: per view (R, 4) boxes already in view pixels (WholeView only).
        groups: (R,) int64 group id of each row (e.g. ReSim's window set: 0 = P4, 1 = P3).
        check_views: indices of the views a region must lie fully inside to be valid.
    """

    boxes: Optional[np.ndarray]
    groups: np.ndarray
    view_boxes: Optional[List[np.ndarray]] = None
    check_views: Optional[List[int]] = None
    extras: Dict[str, np.ndarray] = field(default_factory=dict)


class RegionSampler(abc.ABC):
    """Picks the regions matched across the views of one image; what the mapper calls."""

    @abc.abstractmethod
    def __call__(self, views) -> RegionSet:
        """Regions of ``views`` (the list a ``ViewGenerator`` made for one image)."""


def build_region_sampler(cfg):
    name = cfg.INPUT.REGIONSSL.REGION_SAMPLER
    if name not in REGION_SAMPLER_REGISTRY:
        raise KeyError(
            f"INPUT.REGIONSSL.REGION_SAMPLER={name!r} is not a registered region sampler; "
            f"choose one of {sorted(k for k, _ in REGION_SAMPLER_REGISTRY)}"
        )
    return REGION_SAMPLER_REGISTRY.get(name)(cfg)


def box_iou_np(a, b):
    """IoU matrix (len(a), len(b)) of XYXY boxes."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def _iou(a, b):
    """IoU of two XYXY boxes given as tuples of floats (box_iou_np for one pair, without numpy)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = iw * ih if iw > 0 and ih > 0 else 0.0
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / max(union, 1e-12)


def _empty(n=0):
    return np.zeros((n, 4), dtype=np.float64)


@REGION_SAMPLER_REGISTRY.register()
class WholeView(RegionSampler):
    """One region per view: the whole view. Rows are NOT the same original pixels across views."""

    def __init__(self, cfg=None):
        pass

    def __call__(self, views):
        boxes = [np.array([[0, 0, v.image.shape[1], v.image.shape[0]]], dtype=np.float64) for v in views]
        return RegionSet(boxes=None, view_boxes=boxes, groups=np.zeros(1, dtype=np.int64))


@REGION_SAMPLER_REGISTRY.register()
class PastedBox(RegionSampler):
    """InsLoc: the pasted foreground rectangle of each CopyPaste view.

    The official data pipeline (InstanceLoc ``copy_and_paste.py``) draws an *independent* crop of
    the foreground image for each composite, so the two boxes show two crops of one image (as in
    MoCo), not the same pixels; with ``INPUT.REGIONSSL.COPY_PASTE.SHARED_CROP`` both composites
    paste the same crop and the rows do cover the same original pixels. Either way view v's box
    is its own ``source_box`` moved by its own transform.
    """

    def __init__(self, cfg=None):
        pass

    def __call__(self, views):
        boxes = [v.transform.apply_box(v.source_box[None])[0:1] for v in views]
        return RegionSet(boxes=None, view_boxes=boxes, groups=np.zeros(1, dtype=np.int64))


@REGION_SAMPLER_REGISTRY.register()
class IntersectionBoxes(RegionSampler):
    """SCRL's boxes in the intersection of views 0 and 1 (docs/methods/scrl.md; official code after its box fixes).

    In original coordinates the intersection is ``[l, r] x [t, b]``; measured at the coarser
    view's magnification ``s = min(S/w_0, S/w_1)`` (per axis) it is ``W x H`` px. If ``W`` or ``H``
    is ``<= min_size`` there are no boxes. Otherwise up to ``max_boxes`` boxes are drawn on a
    random grid (``div ~ U{1..floor(W/min_size)}`` cells per axis, a random cell, a random box of
    side ``>= min_size`` inside it), rejected while IoU with an accepted box is ``>= iou_threshold``,
    and after ``max_tries`` failed tries the last candidate is accepted anyway (soft rejection).

    IoU is computed in original coordinates; it equals the official IoU in view-0 pixels because a
    view is a per-axis scale + shift (+ flip) of the original, which leaves IoU unchanged.
    Candidates are clipped to the intersection in original coordinates: rounding ``W`` up can
    push a box up to half a coarse pixel past it (official: clipped to [0, S] in each view
    separately), and the mapper would then drop the row as outside a view (~3% of boxes at 224 px).
    """

    @configurable
    def __init__(self, *, max_boxes, min_size, iou_threshold, max_tries):
        self.max_boxes, self.min_size = max_boxes, min_size
        self.iou_threshold, self.max_tries = iou_threshold, max_tries

    @classmethod
    def from_config(cls, cfg):
        c = cfg.INPUT.REGIONSSL.INTERSECTION
        return {
            "max_boxes": c.MAX_BOXES,
            "min_size": c.MIN_SIZE,
            "iou_threshold": c.IOU_THRESHOLD,
            "max_tries": c.MAX_TRIES,
        }

    def _axis_candidate(self, extent):
        """One box side on an axis of ``extent`` px (coarse-view pixels): returns (start, length)."""
        div = np.random.randint(1, int(extent // self.min_size) + 1)
        cell = extent / div
        length = np.random.randint(self.min_size, int(cell) + 1)
        start = np.random.randint(0, int(cell) - length + 1) + int(np.floor(np.random.randint(div) * cell))
        return start, length

    def __call__(self, views):
        a, b = views[0], views[1]
        l, t = np.maximum(a.source_box[:2], b.source_box[:2])
        r, btm = np.minimum(a.source_box[2:], b.source_box[2:])
        groups = np.zeros(0, dtype=np.int64)
        if r <= l or btm <= t:
            return RegionSet(boxes=_empty(), groups=groups, check_views=[0, 1])
        # coarser magnification per axis (view pixels per original pixel)
        sw = min(v.image.shape[1] / (v.source_box[2] - v.source_box[0]) for v in (a, b))
        sh = min(v.image.shape[0] / (v.source_box[3] - v.source_box[1]) for v in (a, b))
        W, H = int(round((r - l) * sw)), int(round((btm - t) * sh))
        if W <= self.min_size or H <= self.min_size:
            return RegionSet(boxes=_empty(), groups=groups, check_views=[0, 1])
        l, t, r, btm = float(l), float(t), float(r), float(btm)
        accepted = []  # up to 10 boxes x 50 tries: plain floats, numpy's per-call cost would dominate
        for _ in range(self.max_boxes):
            for _ in range(self.max_tries):
                x, w = self._axis_candidate(W)
                y, h = self._axis_candidate(H)
                # clipped: see docstring (rounding of W, H)
                cand = (min(l + x / sw, r), min(t + y / sh, btm), min(l + (x + w) / sw, r), min(t + (y + h) / sh, btm))
                if all(_iou(cand, box) < self.iou_threshold for box in accepted):
                    break
            accepted.append(cand)
        boxes = np.array(accepted, dtype=np.float64)
        return RegionSet(boxes=boxes, groups=np.zeros(len(boxes), dtype=np.int64), check_views=[0, 1])


@REGION_SAMPLER_REGISTRY.register()
class SlidingWindows(RegionSampler):
    """ReSim's windows (docs/methods/resim.md): for each group g, windows of side ``sizes[g]`` every
    ``strides[g]`` px on the query view (view 0), kept while ``x0 + size < S`` (36 windows of 48/32
    and 64 of 32/24 on a 224 view), mapped to the original image with the query's inverse
    transform. The mapper marks a window invalid unless it lies fully inside the key view."""

    @configurable
    def __init__(self, *, sizes, strides):
        self.sizes = list(sizes)
        self.strides = per_level("INPUT.REGIONSSL.WINDOWS.STRIDES", strides, self.sizes, "INPUT.REGIONSSL.WINDOWS.SIZES")

    @classmethod
    def from_config(cls, cfg):
        c = cfg.INPUT.REGIONSSL.WINDOWS
        return {"sizes": c.SIZES, "strides": c.STRIDES}

    @staticmethod
    def grid(view_h, view_w, size, stride):
        """(N, 4) XYXY windows in view pixels, row-major."""
        xs = np.arange(0, view_w, stride)
        ys = np.arange(0, view_h, stride)
        xs, ys = xs[xs + size < view_w], ys[ys + size < view_h]
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        x0, y0 = xx.reshape(-1).astype(np.float64), yy.reshape(-1).astype(np.float64)
        return np.stack([x0, y0, x0 + size, y0 + size], axis=1)

    def __call__(self, views):
        q = views[0]
        h, w = q.image.shape[:2]
        windows = [self.grid(h, w, s, st) for s, st in zip(self.sizes, self.strides)]
        groups = np.concatenate([np.full(len(win), g, dtype=np.int64) for g, win in enumerate(windows)])
        boxes = q.transform.inverse().apply_box(np.concatenate(windows))
        return RegionSet(boxes=boxes, groups=groups, check_views=list(range(len(views))))


_ANCHOR_CACHE = {}


def anchor_grid(view_hw, *, stride, sizes, ratios, offset):
    """(A, 4) XYXY anchors of Detectron2's ``DefaultAnchorGenerator`` on one grid of ``stride`` px
    over a view of size ``view_hw``: centres at ``(offset + k) * stride``, every size x ratio (h/w).
    InsLoc's mmdet ``AnchorGenerator`` has ``center_offset=0``: centres at 0, 16, 32, ... Cached."""
    key = (tuple(view_hw), stride, tuple(sizes), tuple(ratios), offset)
    if key not in _ANCHOR_CACHE:
        gen = DefaultAnchorGenerator(sizes=[list(sizes)], aspect_ratios=[list(ratios)], strides=[stride], offset=offset)
        grid = [(int(np.ceil(view_hw[0] / stride)), int(np.ceil(view_hw[1] / stride)))]
        _ANCHOR_CACHE[key] = gen._grid_anchors(grid)[0]
    return _ANCHOR_CACHE[key]


def _iou_to_anchors(box, anchors):
    """(A,) float32 IoU of one XYXY ``box`` (4,) with ``anchors`` (A, 4), both float32.

    Detectron2's ``pairwise_iou`` in numpy, with its float32 operations in its order (so the same
    values bit for bit, tested), without the ``Boxes`` and torch dispatch overhead: a sample of
    InsLoc calls it once against 5120 anchors (0.05 instead of 0.18 ms)."""
    wh = np.minimum(anchors[:, 2:], box[2:]) - np.maximum(anchors[:, :2], box[:2])
    np.clip(wh, 0, None, out=wh)
    inter = wh[:, 0] * wh[:, 1]
    area_box = (box[2] - box[0]) * (box[3] - box[1])
    area_anchors = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(inter > 0, inter / (area_box + area_anchors - inter), np.float32(0))


def pick_jittered_anchor(box, anchors, *, iou_threshold, nms_threshold, fallback_topk):
    """Index of the anchor InsLoc's box augmentation draws for ``box`` (XYXY, (4,)).

    Official rule (``AnchorAugHead.get_fixed_bboxes`` + ``InsLocFPN.get_stage2_bboxes``):
    candidates = anchors with IoU > ``iou_threshold`` to the box, or, if there is none, the
    ``fallback_topk`` anchors of highest IoU; NMS at ``nms_threshold`` with uniformly random scores
    (a random maximal set of candidates overlapping each other by at most that IoU); one survivor
    drawn uniformly. So a crowd of near-identical anchors is as likely as one isolated anchor.
    ``nms_threshold >= 1`` suppresses nothing (uniform over the candidates) and ``fallback_topk
    = 1`` takes the best anchor when none qualifies. Scores come from ``np.random``, as every
    other draw of the mapper (seeded per data-loader worker).
    """
    iou = _iou_to_anchors(np.asarray(box, dtype=np.float32), anchors.numpy())
    candidates = np.flatnonzero(iou > iou_threshold)
    if len(candidates) == 0:
        candidates = torch.topk(torch.from_numpy(iou), min(fallback_topk, len(iou))).indices.numpy()
    if nms_threshold < 1 and len(candidates) > 1:
        scores = torch.as_tensor(np.random.rand(len(candidates)), dtype=torch.float32)
        keep = nms(anchors[torch.from_numpy(candidates)].float(), scores, nms_threshold)  # suppresses IoU > thr
        candidates = candidates[keep.numpy()]
    return int(candidates[np.random.randint(len(candidates))])


def anchor_jitter(box, view_hw, *, stride, sizes, ratios, iou_threshold, offset, nms_threshold, fallback_topk):
    """InsLoc's box augmentation: a random anchor near ``box`` (see :func:`pick_jittered_anchor`),
    from the anchors of :func:`anchor_grid` over a view of size ``view_hw``.

    Args:
        box: (4,) XYXY in view pixels.
    Returns:
        (4,) float64 XYXY, the chosen anchor.
    """
    anchors = anchor_grid(view_hw, stride=stride, sizes=sizes, ratios=ratios, offset=offset)
    pick = pick_jittered_anchor(
        box, anchors, iou_threshold=iou_threshold, nms_threshold=nms_threshold, fallback_topk=fallback_topk
    )
    return anchors[pick].double().numpy()
