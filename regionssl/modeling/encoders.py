"""Online/momentum encoder machinery shared by every pretraining method.

* :func:`build_trunk` builds the online encoder with exactly the module names a Detectron2
  detector has (``backbone.*``; C4: ``roi_heads.res5``; FPN box head: ``roi_heads.box_head``).
* :func:`momentum_at` gives the EMA coefficient as a function of the global iteration.
* :func:`make_momentum_copy` / :func:`ema_update` keep the target (key) encoder.
* :func:`shuffled_forward` is MoCo's shuffle-BN generalised to images *and* their boxes, routed
  by a :class:`ShufflePlan` with ``all_to_all``; :func:`split_forward` runs a batch in groups
  (per-group BatchNorm, one-process shuffle-BN).
* :class:`RegionPooler` turns backbone features and boxes into one vector per region and level
  (:func:`boxes_to_rois`: RoI rows without a device sync).
"""
import copy
import math

import torch
from detectron2.layers import ROIAlign, ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.roi_heads import Res5ROIHeads
from detectron2.modeling.roi_heads.box_head import build_box_head
from detectron2.structures import Boxes
from detectron2.utils import comm
from torch import nn

from ..utils.distributed import all_to_all_rows, broadcast_from_rank0, to_device, world_size

__all__ = [
    "build_trunk",
    "momentum_at",
    "make_momentum_copy",
    "ema_update",
    "split_forward",
    "shuffled_forward",
    "ShufflePlan",
    "boxes_to_rois",
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
    if boxes is None:
        return None
    if boxes and isinstance(boxes[0], (list, tuple)):
        return [[level[i] for i in idx] for level in boxes]
    return [boxes[i] for i in idx]


def _cat(outs, dim=0):
    """Concatenate a list of outputs that are tensors or tuples of tensors (element-wise)."""
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts, dim=dim) for parts in zip(*outs))
    return torch.cat(outs, dim=dim)


def _rows(out, index):
    """``out`` (or every tensor of a tuple) at the rows ``index`` (host list), gathered on its device."""
    if isinstance(out, tuple):
        return tuple(_rows(o, index) for o in out)
    return out.index_select(0, to_device(torch.tensor(index, dtype=torch.long), out.device))


def split_forward(fn, images, boxes, splits=1, dim=0):
    """Run ``fn`` on ``splits`` consecutive groups of the batch and concatenate along ``dim``.

    Each call sees only its group, so BatchNorm statistics are per group: MoCo's 1-GPU demo
    (``facebookresearch/moco`` ``colab/moco_cifar10_demo.ipynb``, ``SplitBatchNorm``) simulates
    the per-GPU BN of an 8-GPU run this way. ``splits <= 1`` is ``fn(images, boxes)``.

    Args:
        images: (N, 3, H, W); boxes: list of N (R_i, 4), or a list over levels of such lists, or None.
        dim: axis of ``fn``'s output that runs over regions (0 for (R, D), 1 for (L, R, D)).
            ``fn`` may return a tuple of tensors: each is concatenated.
    """
    if splits <= 1:
        return fn(images, boxes)
    n = images.shape[0]
    assert n >= splits, f"MODEL.REGIONSSL.BN_SPLITS={splits} needs at least {splits} images per process, got {n}"
    groups = [g.tolist() for g in torch.arange(n).tensor_split(splits)]  # host indices
    return _cat([fn(images[g[0] : g[-1] + 1], _take(boxes, g)) for g in groups], dim=dim)


class ShufflePlan:
    """Who encodes which image in a cross-process shuffle, and how many output rows each image has.

    Global image ``g = r * n + i`` is image i of rank r (n images on every rank). ``perm``, rank 0's
    random permutation of the G = W n global images, gives rank r the images
    ``perm[r n : (r + 1) n]`` to encode (MoCo's ``idx_shuffle``). Everything here is host ints.

    Attributes:
        n, rank, world: images per rank, this rank, world size.
        perm: list of G global image indices.
        rows: list of G ints, rows of ``fn``'s output per global image (its boxes; 1 without boxes).
    """

    def __init__(self, perm, rows, n, rank, world):
        self.perm, self.rows, self.n, self.rank, self.world = list(perm), list(rows), n, rank, world

    @classmethod
    def draw(cls, n, rows_per_image=None, device="cpu"):
        """Draw the permutation on rank 0 and learn every rank's rows per image.

        One broadcast (+ one all_gather when ``rows_per_image``, this rank's host list of n ints,
        is given) and **one** host read for both. The permutation comes from the host generator.
        """
        world, rank = world_size(), comm.get_rank()
        perm = broadcast_from_rank0(to_device(torch.randperm(world * n), device))
        if rows_per_image is None:
            values = perm.tolist()
            return cls(values, [1] * len(values), n, rank, world)
        assert len(rows_per_image) == n, f"{len(rows_per_image)} row counts for {n} images"
        local = to_device(torch.tensor(list(rows_per_image), dtype=torch.long), device)
        counts = [torch.empty_like(local) for _ in range(world)]
        torch.distributed.all_gather(counts, local)
        values = torch.cat([perm.to(local.dtype)] + counts).tolist()  # the one host read
        return cls(values[: world * n], values[world * n :], n, rank, world)

    def encoded_by(self, r):
        """Global images rank r encodes, in encoding order."""
        return self.perm[r * self.n : (r + 1) * self.n]

    def own(self, r):
        return list(range(r * self.n, (r + 1) * self.n))

    def rows_per_rank(self):
        """Output rows of every rank's own images: list of W ints (the keys each rank enqueues)."""
        return [sum(self.rows[g] for g in self.own(r)) for r in range(self.world)]

    def route(self, x, have, send, recv, want, rows=None):
        """Move per-image row blocks between ranks (one ``all_to_all``) and order them as ``want``.

        Args:
            x: rows of the global images ``have``, in that order, ``rows[g]`` rows per image g
               (default :attr:`rows`); a tuple of such tensors is routed element-wise.
            send: per destination rank, the images of ``have`` it gets, in its order.
            recv: per source rank, the images that arrive from it, in order.
            want: the received images in the order to return.
        """
        rows = self.rows if rows is None else rows
        if isinstance(x, tuple):
            return tuple(self.route(t, have, send, recv, want, rows) for t in x)
        out_rows = _block_rows(have, [g for dest in send for g in dest], rows)
        if out_rows != list(range(x.shape[0])):
            x = _rows(x, out_rows)
        got = all_to_all_rows(x, [sum(rows[g] for g in d) for d in send], [sum(rows[g] for g in s) for s in recv])
        in_rows = _block_rows([g for src in recv for g in src], want, rows)
        return got if in_rows == list(range(got.shape[0])) else _rows(got, in_rows)

    def _owner(self, g):
        return g // self.n

    def to_encoders(self, x, rows=None):
        """This rank's own rows ``x`` -> the rows of the images this rank encodes (encoding order)."""
        send = [[g for g in self.encoded_by(r) if self._owner(g) == self.rank] for r in range(self.world)]
        mine = self.encoded_by(self.rank)
        recv = [[g for g in mine if self._owner(g) == s] for s in range(self.world)]
        return self.route(x, self.own(self.rank), send, recv, mine, rows)

    def to_owners(self, x, rows=None):
        """Rows of the images this rank encoded -> this rank's own rows, in input order."""
        mine = self.encoded_by(self.rank)
        send = [[g for g in mine if self._owner(g) == r] for r in range(self.world)]
        recv = [[g for g in self.encoded_by(s) if self._owner(g) == self.rank] for s in range(self.world)]
        return self.route(x, mine, send, recv, self.own(self.rank), rows)


def _block_rows(have, want, rows):
    """Row indices, in a tensor holding the blocks of images ``have`` (``rows[g]`` rows each, in that
    order), of the blocks of images ``want``, in that order."""
    start, pos = {}, 0
    for g in have:
        start[g], pos = pos, pos + rows[g]
    return [i for g in want for i in range(start[g], start[g] + rows[g])]


@torch.no_grad()
def shuffled_forward(fn, images, boxes, splits=1, plan=None):
    """Run ``fn(images, boxes)`` on a shuffled batch, then unshuffle its output rows.

    MoCo's shuffle-BN: the key encoder's BatchNorm then sees statistics of a random subset of the
    global batch, not of the images its queries came from, which closes the intra-batch
    statistics shortcut. Boxes travel with their images (InsLoc shuffles both). Across processes
    the whole global batch is permuted; with ``splits > 1`` each process then runs its share in
    ``splits`` groups (:func:`split_forward`), which also gives one process a shuffle-BN over
    ``splits`` virtual devices. One process with ``splits <= 1`` is ``fn(images, boxes)``.

    Traffic: images (in their own dtype: send uint8 views and normalise inside ``fn``), boxes and
    outputs each go once to the one rank that needs them (``all_to_all``), not to every rank;
    outputs keep ``fn``'s dtype. Host reads: the plan's one (none in one process).

    Args:
        images: (N, 3, H, W), N equal on every rank.
        boxes: list of N Boxes / (R_i, 4) tensors in the same order, or None: ``fn`` then returns
            one row per image.
        plan: a :class:`ShufflePlan` drawn for these images and boxes (drawn here if None).
    Returns:
        ``fn``'s output rows (a tensor or a tuple of tensors, rows = regions, or images without
        boxes) for this rank's own images, in input order.
    """
    n = images.shape[0]
    rows = None if boxes is None else [len(b) for b in boxes]
    if world_size() == 1:
        if splits <= 1:
            return fn(images, boxes)
        perm = torch.randperm(n).tolist()  # host generator: no device sync
        out = split_forward(fn, _rows(images, perm), _take(boxes, perm), splits)
        return _rows(out, _block_rows(perm, range(n), [1] * n if rows is None else rows))
    if plan is None:
        plan = ShufflePlan.draw(n, rows, images.device)
    mine = plan.encoded_by(plan.rank)
    my_images = plan.to_encoders(images, rows=[1] * len(plan.perm))
    my_boxes = None
    if boxes is not None:
        flat = torch.cat([_as_tensor(b) for b in boxes]).to(images.device, non_blocking=True)
        my_boxes = list(torch.split(plan.to_encoders(flat), [plan.rows[g] for g in mine]))
    out = split_forward(fn, my_images, my_boxes, splits)
    return plan.to_owners(out)


def _as_tensor(b):
    return b.tensor if isinstance(b, Boxes) else torch.as_tensor(b)


def boxes_to_rois(boxes):
    """Per-image boxes -> (sum R_i, 5) rows ``[i, x1, y1, x2, y2]`` (ROIAlign's format), no device sync.

    Detectron2's ``convert_boxes_to_pooler_format`` builds the image index with
    ``repeat_interleave`` over a device tensor of sizes, a GPU sync per call; here the index is
    made on the host from the (host-known) box counts and copied without blocking.
    """
    tensors = [_as_tensor(b) for b in boxes]
    flat = torch.cat(tensors)
    index = torch.arange(len(tensors)).repeat_interleave(torch.tensor([len(t) for t in tensors]))
    return torch.cat([to_device(index.to(flat.dtype), flat.device)[:, None], flat], dim=1)


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
        rois = {}  # one conversion per distinct box list, not per level
        for bl in per_level:
            if id(bl) not in rois:
                rois[id(bl)] = boxes_to_rois(bl)
        pooled = [
            align(features[f], rois[id(bl)]) for f, align, bl in zip(self.in_features, self.aligners, per_level)
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
