"""MoCo-v2 (Chen et al. 2020), docs/methods/mocov2.md: the global baseline on the shared machinery.

Global average pooled res5 -> MLP 2048-2048-128 -> InfoNCE against a queue of 65536 keys,
T = 0.2, m = 0.999, shuffle-BN. Views: ``TwoCrops`` with MoCo-v2's "aug+".
"""
from detectron2.modeling import META_ARCH_REGISTRY

from .contrastive import ContrastiveBase

__all__ = ["MoCoV2"]


@META_ARCH_REGISTRY.register()
class MoCoV2(ContrastiveBase):
    is_global = True
