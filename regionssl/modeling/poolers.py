"""RoI pooling of boxes on feature maps, without device syncs and without parameters."""
import torch
from detectron2.layers import ROIAlign
from detectron2.structures import Boxes
from torch import nn

from ..utils.distributed import to_device

__all__ = ["as_box_tensor", "boxes_to_rois", "BoxPooler"]


def as_box_tensor(b):
    """(R, 4) tensor of a ``Boxes`` or of anything ``torch.as_tensor`` takes."""
    return b.tensor if isinstance(b, Boxes) else torch.as_tensor(b)


def boxes_to_rois(boxes):
    """Per-image boxes -> (sum R_i, 5) rows ``[i, x1, y1, x2, y2]`` (ROIAlign's format), no device sync.

    Detectron2's ``convert_boxes_to_pooler_format`` builds the image index with
    ``repeat_interleave`` over a device tensor of sizes, a GPU sync per call; here the index is
    made on the host from the (host-known) box counts and copied without blocking.
    """
    tensors = [as_box_tensor(b) for b in boxes]
    flat = torch.cat(tensors)
    index = torch.arange(len(tensors)).repeat_interleave(torch.tensor([len(t) for t in tensors]))
    return torch.cat([to_device(index.to(flat.dtype), flat.device)[:, None], flat], dim=1)


class BoxPooler(nn.Module):
    """RoIAlign (res x res) of the same boxes on **every** map of ``in_features`` (no size-based
    level assignment: InsLoc pools each box on every FPN level), or of one box list per map.

    Args:
        in_features: names of the maps, in output order.
        strides: {name: stride in pixels}.
        resolution, sampling_ratio, aligned: ROIAlign's output size, sampling ratio (0: adaptive)
            and alignment (SCRL: ``aligned=False``).
    """

    def __init__(self, in_features, strides, resolution, sampling_ratio, aligned):
        super().__init__()
        self.in_features = list(in_features)
        self.aligners = nn.ModuleList(
            ROIAlign((resolution, resolution), 1.0 / strides[f], sampling_ratio, aligned) for f in self.in_features
        )

    def forward(self, features, boxes):
        """features: {name: (N, C, H, W)}; boxes: list of N (R_i, 4) tensors (view pixels), or a
        list with one such list per map. Returns L tensors (sum R_i, C_l, res, res)."""
        per_level = boxes if isinstance(boxes[0], (list, tuple)) else [boxes] * len(self.in_features)
        rois = {}  # one conversion per distinct box list, not per level
        for bl in per_level:
            if id(bl) not in rois:
                rois[id(bl)] = boxes_to_rois(bl)
        return [align(features[f], rois[id(bl)]) for f, align, bl in zip(self.in_features, self.aligners, per_level)]
