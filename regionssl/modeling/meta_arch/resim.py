"""ReSim: Region Similarity Representation Learning (Xiao et al., ICCV'21), docs/methods/resim.md.

Two views with one shared flip (``TwoCropsSharedFlip``); sliding windows laid on the query view
(``SlidingWindows``: group g <-> ``MODEL.REGIONSSL.IN_FEATURES[g]``) and moved into the key view;
a window counts only if it lies fully inside the key view (``valid``). Loss (Tete-Xiao/ReSim
``main_moco.py``)::

    L = w_inst * L_inst + sum_l w_l * L_l

* ``L_inst``: MoCo-v2 on the whole view — global average pooled res5 -> MLP 2048-2048-128,
  queue K = 65536, m = 0.999, shuffle-BN, T = 0.2 (the :class:`ContrastiveBase` rule, one
  "instance" level).
* ``L_l``: for every valid window i of level l, ``q_i`` = PrRoIPool 1x1 of the query's level-l
  map over the window, ``k_i`` = the same on the key map over the mapped window, both
  L2-normalised, **no projection head**; negatives ``n_j`` = every position of the key map after
  a 3x3 average pooling with stride 1 and no padding (P4 of a 224 view: 14 - 3 + 1 = 12, i.e.
  12x12 per image), L2-normalised, all-gathered over processes where
  ``RESIM.GATHER_NEGATIVES[l]`` (official: P4 yes, P3 no). Logits
  ``[q_i.k_i, q_i.n_1, ...] / T``, InfoNCE averaged over the valid windows. No region queue.

Variants (chosen by the backbone config, one class):

* **FPN** (the released code, ``moco/models.py``): ResNet + FPN on res3-res5 without norm;
  windows 48/32 px on P4 (stride 16) and 32/24 px on P3 (stride 8). The FPN convs keep the
  detector's names (``backbone.fpn_lateral3..5``, ``backbone.fpn_output3..5``) and transfer.
  Detectron2's FPN also builds ``fpn_output5`` and a max-pool P6, which the official model lacks;
  they get no gradient (unused) and are harmless. res5 for the instance branch is read from the
  FPN's bottom-up pass (no second trunk pass).
* **C4** (checkpoint released, code not): ``backbone`` up to res4 and ``roi_heads.res5`` built
  as Detectron2's ``Res5ROIHeads`` block. The region branch works on the res4 map (stride 16,
  1024-d; windows 48/32 only); the instance branch applies ``roi_heads.res5`` to the *whole* res4
  map, which is exactly ResNet's res5 stage (first block stride 2). So res5 is pretrained by the
  instance loss and transfers as ``roi_heads.res5`` into a C4 detector, as in MoCo's C4 recipe.
  Whether the authors' C4 model had an extra conv on res4 for the region branch is unknown
  (the released code carries a commented-out ``mocodet_conv``); here there is none.

Key features are computed by the momentum encoder on a batch shuffled across processes
(shuffle-BN, as the official ``_batch_shuffle_ddp``) and routed back per image, dense maps
included; windows and negatives are then taken from the unshuffled maps.
"""
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from ...config import per_level
from ...utils.distributed import all_gather_cat, to_device, world_size
from ..losses import info_nce
from ..poolers import boxes_to_rois
from ..prroi_pool import prroi_pool_1x1
from ..shuffle import shuffled_forward
from ..signals import LearningSignal, info_nce_chance
from .contrastive import ContrastiveBase

__all__ = ["ReSim", "window_rois", "pooled_negatives", "region_similarity_loss"]


def window_rois(batched_inputs, group, view, device):
    """(R, 5) rows ``[image index, x1, y1, x2, y2]`` (view pixels) of the valid windows of ``group``,
    grouped by image, and the list of R_i per image (host ints).

    Rows are in the same order for every ``view``, so row r of view 0 and of view 1 is one pair.
    Built on the host from the loader's tensors and moved in one non-blocking copy (no sync).
    """
    rows = []
    for i, d in enumerate(batched_inputs):
        sel = d["valid"] & (d["box_groups"] == group)
        b = d["boxes"][view][sel].float()
        rows.append(torch.cat([b.new_full((len(b), 1), float(i)), b], dim=1))
    rois = torch.cat(rows) if rows else torch.zeros(0, 5)
    return to_device(rois, device), [len(r) for r in rows]


@torch.no_grad()
def pooled_negatives(key_map, kernel, gather):
    """ReSim's negatives: the key map average-pooled ``kernel x kernel`` (stride 1, no padding).

    Args:
        key_map: (N, C, H, W) momentum-encoder map of one level (N and map size equal on every
            process, so the gather needs no count exchange).
        gather: concatenate the negatives of every process (rank order), else local only.
    Returns:
        (C, K) L2-normalised columns, K = N (H - k + 1)(W - k + 1) [x world size if gather];
        column n*h*w + y*w + x is position (y, x) of image n.
    """
    pooled = F.avg_pool2d(key_map.float(), kernel, stride=1)  # (N, C, h, w)
    flat = F.normalize(pooled, dim=1).permute(0, 2, 3, 1).reshape(-1, pooled.shape[1])  # (N h w, C)
    if gather:
        flat, _ = all_gather_cat(flat.contiguous(), [flat.shape[0]] * world_size())
    return flat.t()


def region_similarity_loss(query_map, key_map, rois_q, rois_k, negatives, spatial_scale, temperature,
                           rows_per_image=None):
    """InfoNCE of window pairs against key-map negatives (one level).

    Args:
        query_map, key_map: (N, C, H, W) online / momentum maps (key map: no gradient).
        rois_q, rois_k: (R, 5) paired windows, ``[image, x1, y1, x2, y2]`` in view pixels, R > 0.
        negatives: (C, K) from :func:`pooled_negatives`.
        spatial_scale: 1 / stride of the level.
        rows_per_image: windows per image (host ints) when the rows are grouped by image, as
            :func:`window_rois` makes them (saves :func:`prroi_pool_1x1` a host read).
    Returns:
        loss (mean over the R windows), logits (R, 1 + K), queries (R, C).
    """
    q = F.normalize(prroi_pool_1x1(query_map, rois_q, spatial_scale, rows_per_image), dim=1)  # (R, C)
    with torch.no_grad():
        k = F.normalize(prroi_pool_1x1(key_map, rois_k, spatial_scale, rows_per_image), dim=1)  # (R, C)
    loss, logits = info_nce(q, k, negatives, temperature)
    return loss, logits, q


@META_ARCH_REGISTRY.register()
class ReSim(ContrastiveBase):
    """ReSim-FPN / ReSim-C4 (see the module docstring).

    The encoder encodes whole views (the instance branch): ``GlobalEncoder`` on the FPN (res5 of its
    bottom-up pass), ``C4Encoder`` on the C4 trunk (res5 of the whole res4 map). The region branch
    reads the region levels from the same forward pass (``encoder.features``).

    Extra args:
        region_features: levels of the region branch, ``IN_FEATURES`` (["p4", "p3"] or ["res4"]).
        region_strides: their strides (16, 8).
        region_weights: w_l per level (``LEVEL_WEIGHTS``; ReSim: 1).
        gather_negatives: per level, all-gather the negatives (official: [True, False]).
        negative_pool: kernel of the negatives' average pooling (3).
    """

    is_global = True  # the encoder pools whole views; windows are pooled from its dense maps

    @configurable
    def __init__(self, *, region_features, region_strides, region_weights, gather_negatives, negative_pool, **kwargs):
        super().__init__(**kwargs)
        self.levels = ["instance"]  # the ContrastiveBase branch: one queue of whole-view keys
        self.region_features, self.region_strides = list(region_features), list(region_strides)
        self.region_weights, self.gather_negatives = list(region_weights), list(gather_negatives)
        self.negative_pool = negative_pool
        self._num_negatives = {}  # level -> K of the last forward (for learning_signals)
        self.is_fpn = hasattr(self.backbone, "bottom_up")
        if self.is_fpn:
            # Detectron2's FPN has an output conv per input level; those of levels without a loss
            # (fpn_output5 for P4+P3) would only shrink under weight decay and then transfer as
            # such: keep them at their initialisation, like the detector's own.
            used = {f"fpn_output{f[1:]}." for f in self.region_features}
            for name, p in self.backbone.named_parameters():
                if name.startswith("fpn_output") and not name.startswith(tuple(used)):
                    p.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg):
        args = super().from_config(cfg)  # encoder, projector, queue, temperature, shuffle-BN
        r = cfg.MODEL.REGIONSSL
        levels = list(r.IN_FEATURES)
        shapes = args["encoder"].backbone.output_shape()
        missing = [f for f in levels if f not in shapes]
        assert not missing, f"MODEL.REGIONSSL.IN_FEATURES {missing} not produced by the backbone ({list(shapes)})"
        if cfg.INPUT.REGIONSSL.REGION_SAMPLER == "SlidingWindows":  # window group g <-> IN_FEATURES[g]
            per_level("INPUT.REGIONSSL.WINDOWS.SIZES", cfg.INPUT.REGIONSSL.WINDOWS.SIZES, levels)
        args.update(
            region_features=levels,
            region_strides=[shapes[f].stride for f in levels],
            region_weights=per_level("MODEL.REGIONSSL.LEVEL_WEIGHTS", r.LEVEL_WEIGHTS, levels),
            gather_negatives=per_level("MODEL.REGIONSSL.RESIM.GATHER_NEGATIVES", r.RESIM.GATHER_NEGATIVES, levels),
            negative_pool=r.RESIM.NEGATIVE_POOL,
        )
        return args

    @classmethod
    def level_weights_from_config(cls, cfg, encoder):
        """The InfoNCE branch is the instance loss: its one weight is ``RESIM.INSTANCE_WEIGHT``
        (``LEVEL_WEIGHTS`` weigh the region levels)."""
        return [cfg.MODEL.REGIONSSL.RESIM.INSTANCE_WEIGHT]

    # ---------------------------------------------------------------- features
    @staticmethod
    def instance_embedding(encoder, projector, features):
        """(1, N, D) L2-normalised MoCo embedding of whole views from ``encoder``'s ``features``."""
        z = projector(encoder.pool(features, None)[0])  # (N, D)
        return F.normalize(z, dim=1)[None]

    @torch.no_grad()
    def key_features(self, images):
        """Momentum encoder on the key views, through shuffle-BN.

        ``images``: uint8 pixels (exchanged as such and normalised after the shuffle) or a
        normalised batch. Each image's key and maps go back to the rank that owns it only, in the
        dtype they were computed in (fp16 maps under AMP).

        Returns:
            k: (1, N, D) instance keys; maps: {level: (N, C, H_l, W_l)} key maps, in input order.
        """

        def encode(im, _boxes):  # one row per image, so shuffled_forward routes it back
            feats = self.target_encoder.features(self.model_input(im))
            k = self.instance_embedding(self.target_encoder, self.momentum.projector, feats)[0]  # (N, D)
            return (k,) + tuple(feats[f] for f in self.region_features)

        if self.shuffle_bn:
            k, *maps = shuffled_forward(encode, images, None)
        else:
            k, *maps = encode(images, None)
        return k[None], dict(zip(self.region_features, maps))

    def batch_coupling(self):
        return super().batch_coupling() + ["the region negatives are the key maps of the (gathered) batch: a micro-batch has k times fewer, "
                "and the loss averages over the batch's valid windows, whose number varies per image"]

    # ---------------------------------------------------------------- losses
    def region_losses(self, batched_inputs, query_maps, key_maps):
        """``{"loss_region_<level>": w_l L_l}`` over the valid windows of every level.

        A level without any valid window in this batch gives ``0 * sum(query map)``: a zero that
        keeps the level's parameters in the graph (DDP) and the collectives in step (the
        negatives are gathered on every rank regardless).
        """
        losses = {}
        for g, (level, stride) in enumerate(zip(self.region_features, self.region_strides)):
            negatives = pooled_negatives(key_maps[level], self.negative_pool, self.gather_negatives[g])  # (C, K)
            rois_q, per_image = window_rois(batched_inputs, g, 0, self.device)
            rois_k, _ = window_rois(batched_inputs, g, 1, self.device)
            if len(rois_q) == 0:
                losses[f"loss_region_{level}"] = query_maps[level].sum() * 0.0
                self.log(**{f"num_pairs_{level}": 0})
                continue
            loss, logits, q = region_similarity_loss(
                query_maps[level], key_maps[level], rois_q, rois_k, negatives, 1.0 / stride, self.temperature,
                per_image,
            )
            losses[f"loss_region_{level}"] = self.region_weights[g] * loss
            self._num_negatives[level] = negatives.shape[1]
            self.log_contrast(level, logits, q, num_pairs=len(rois_q), num_neg=negatives.shape[1])
        return losses

    def losses(self, batched_inputs):
        query = self.encoder.features(self.view_batch(batched_inputs, 0))
        q = self.instance_embedding(self.encoder, self.projector, query)
        with torch.no_grad():
            k, key_maps = self.key_features(self.view_uint8(batched_inputs, 1))
        counts = [k.shape[1]] * world_size()  # one key per image, N on every rank
        (instance,) = self.contrastive_losses(q, k, key_counts=counts).values()  # already weighted by w_inst
        return {"loss_instance": instance, **self.region_losses(batched_inputs, query, key_maps)}

    def learning_signals(self):
        """The instance InfoNCE (queue) and, per level, the region InfoNCE against the K key-map
        positions of the last step (chance unknown before the first step)."""
        shapes = self.backbone.output_shape()
        signals = [self.queue_signal(0, "instance", "loss_instance")]
        for level, w in zip(self.region_features, self.region_weights):
            k = self._num_negatives.get(level)
            signals.append(LearningSignal(
                f"loss_region_{level}", None if k is None else info_nce_chance(k),
                f"ln(K+1), K = {k} key-map negatives", w, f"regionssl/emb_std_{level}", shapes[level].channels,
                f"regionssl/pos_sim_{level}", f"regionssl/neg_sim_{level}", f"regionssl/emb_rank_{level}",
            ))
        return signals

    def region_embedding(self, images, boxes):
        """Online PrRoIPool 1x1 features of ``boxes`` averaged over the region levels: (sum R_i, C)."""
        feats = self.encoder.features(images)
        rois, counts = boxes_to_rois(boxes), [len(b) for b in boxes]
        pooled = [prroi_pool_1x1(feats[f], rois, 1.0 / s, counts) for f, s in zip(self.region_features, self.region_strides)]
        return torch.stack(pooled).mean(dim=0)
