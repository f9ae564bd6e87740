"""InsLoc: Instance Localization (Yang et al., CVPR'21), docs/methods/insloc.md.

Views are InsLoc's copy-paste composites (``CopyPaste`` + ``PastedBox``): view 0 gives the query,
view 1 the key, each a 256x256 canvas with one pasted foreground box (R = 1 box per image).

FPN variant (official, ``limbo0000/InstanceLoc`` ``configs/FPN/insloc_fpn_200ep.py``):
    the pasted box is RoIAligned 7x7 (adaptive sampling, aligned) from **every** level P2-P5
    (no size-based level assignment; ``MomentumRoIPool`` has one extractor per level), the
    4L RoIs go through the shared 4conv(BN)+fc1 box head in one call (``roi_heads.box_head``,
    transferred to the detector; BN statistics are shared by all levels, as in the official
    head which stacks the levels), then the projection fc 1024 -> fc 128 (``projector``):
    q_l, k_l in R^128, l in {P2..P5}. One queue per level (K = 65536), T = 0.2, m = 0.999,
    L = sum_l w_l L_l with w = 1. Box augmentation (``INPUT.REGIONSSL.JITTER``): the query's P5
    RoI uses an anchor-jittered box, P2-P4 and the key use the pasted box
    (``box_replaced_with_gt = [True, True, True, False]``).
C4 variant (``IN_FEATURES: ["res4"]``, never released officially, InstanceLoc issue #14):
    RoIAlign 14x14 on res4, ``roi_heads.res5`` (transferred, Detectron2 ``Res5ROIHeads``
    layout), spatial mean (2048), MLP 2048-2048-128; one queue.

Key-encoder BatchNorm: the momentum encoder runs in training mode (batch statistics), on a
batch shuffled across processes together with its boxes (``shuffled_forward``, MoCo's
shuffle-BN; InsLoc ``shuffle_data=['img', 'bbox']``), so a query and its key are normalised
with statistics of different image subsets and cannot match through them. With one process
there is nothing to shuffle with: the intra-batch statistics shortcut remains, exactly as in
MoCo on one GPU, unless ``MODEL.REGIONSSL.BN_SPLITS`` > 1 runs query and key batches in groups
with the keys shuffled across groups (MoCo's 1-GPU demo; ``split_forward``). Multi-process runs
use per-process BN ("BN", not SyncBN) for this reason.
"""
from detectron2.modeling import META_ARCH_REGISTRY

from .contrastive import ContrastiveBase

__all__ = ["InsLoc"]


@META_ARCH_REGISTRY.register()
class InsLoc(ContrastiveBase):
    def query_boxes(self, batched_inputs):
        """Per-level query boxes: the pasted box, except the anchor-jittered one for the last
        (coarsest, P5) level when the FPN variant has ``jittered_boxes``."""
        boxes = self.view_boxes(batched_inputs, 0)
        if self.pooler.kind != "fpn" or "jittered_boxes" not in batched_inputs[0]:
            return boxes
        jittered = self.view_boxes(batched_inputs, 0, key="jittered_boxes")
        return [boxes] * (len(self.levels) - 1) + [jittered]
