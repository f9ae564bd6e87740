"""SCRL — Spatially Consistent Representation Learning (Roh et al., CVPR 2021; docs/methods/scrl.md).

BYOL's regression applied to matched boxes instead of whole views (official ``kakaobrain/scrl``,
``models/backbone.py``, ``trainer/base.py``):

* boxes: ``IntersectionBoxes`` in the mapper (``models/box_generator.py``): up to 10 random boxes inside the two
  views' intersection, row i of view 0 and of view 1 covering the same original pixels; only rows
  with ``valid`` are used; an image contributes as many pairs as it has valid rows.
* features: RoIAlign of each box on res5 (stride 32), output 1x1, adaptive sampling
  (``ROI.SAMPLING_RATIO`` 0 = torchvision's -1), ``aligned=False`` (SCRL's ``detectron_aligned``),
  giving f(v, b) in R^2048 -> projector g (2048-4096-256) -> predictor q (256-4096-256).
* loss (box term only; no image-level term in SCRL mode)::

      L = mean_boxes[ l(q(g(f(v1, b1))), g'(f'(v2, b2))) + l(q(g(f(v2, b2))), g'(f'(v1, b1))) ]

  with l = 2 - 2 cos, the two directions summed (SCRL ``_criterion``), see :class:`BYOLBase`.

Config: ``MODEL.REGIONSSL.IN_FEATURES ["res5"]``, ``ROI {POOLER_RESOLUTION: 1, SAMPLING_RATIO: 0,
ALIGNED: False}``; ``INPUT.REGIONSSL.REGION_SAMPLER "IntersectionBoxes"`` (configs/scrl.yaml).

Small batches: the projector's BatchNorm1d sees the boxes of both views together (2R rows), so a
batch with a single pair still trains (2 rows). A batch without pairs cannot come out of the mapper
(it re-draws views or skips the image); for hand-made inputs it yields a zero loss (BYOLBase).
"""
from detectron2.modeling import META_ARCH_REGISTRY

from .byol import BYOLBase

__all__ = ["SCRL"]


@META_ARCH_REGISTRY.register()
class SCRL(BYOLBase):
    """BYOL on RoIAligned res5 box features of spatially matched boxes (see module docstring)."""

    loss_name = "scrl"

    def batch_coupling(self):
        return ["the loss averages over the matched boxes of the batch and images have different numbers "
                "of boxes: the mean of micro-batch means weighs boxes differently from the batch mean"]

    @classmethod
    def from_config(cls, cfg):
        args = super().from_config(cfg)
        kind = args["pooler"].kind
        assert kind == "c5", (
            "SCRL pools its boxes on res5: set MODEL.REGIONSSL.IN_FEATURES ['res5'] with a ResNet "
            f"backbone (got pooler kind {kind!r})"
        )
        return args
