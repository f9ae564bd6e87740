"""InsLoc: Instance Localization (Yang et al., CVPR'21), METHODS.md §4.

Views are InsLoc's copy-paste composites (``CopyPaste`` + ``PastedBox``). The pasted box is
RoIAligned (7x7) from **every** level of the pyramid (P2-P5, no size-based assignment), passed
through the shared 4conv+fc box head (``roi_heads.box_head``, transferred to the detector) and a
projection to 128-d; one MoCo queue per level, T = 0.2, m = 0.999, L = sum_l w_l L_l. The
query's P5 feature uses the anchor-jittered box (box augmentation, ``INPUT.REGIONSSL.JITTER``).

C4 variant (``IN_FEATURES: ["res4"]``, not released officially): RoIAlign 14x14 on res4, then
``roi_heads.res5`` (transferred), spatial mean, projection; one queue.
"""
from detectron2.modeling import META_ARCH_REGISTRY

from .contrastive import ContrastiveBase

__all__ = ["InsLoc"]


@META_ARCH_REGISTRY.register()
class InsLoc(ContrastiveBase):
    def query_boxes(self, batched_inputs):
        boxes = self.view_boxes(batched_inputs, 0)
        if self.pooler.kind != "fpn" or "jittered_boxes" not in batched_inputs[0]:
            return boxes
        jittered = self.view_boxes(batched_inputs, 0, key="jittered_boxes")
        # the jittered box replaces the pasted box for the coarsest level only (official: P5)
        return [boxes] * (len(self.levels) - 1) + [jittered]
