"""Fine-tuning heads that published self-supervised detection protocols need.

Both classes extend Detectron2's heads by one normalisation layer and keep every other parameter
name unchanged (``roi_heads.res5.{0,1,2}.*``, ``roi_heads.box_head.conv{1..4}.*``,
``roi_heads.box_head.fc1.*``), so checkpoints converted for stock Detectron2 load into them.
Importing this module registers them; select them by name in the config.
"""
import torch
from detectron2.config import configurable
from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import (
    ROI_BOX_HEAD_REGISTRY,
    ROI_HEADS_REGISTRY,
    FastRCNNConvFCHead,
    Res5ROIHeads,
)

__all__ = ["Res5ROIHeadsExtraNorm", "FastRCNNConvFCHeadExtraNorm"]


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """``Res5ROIHeads`` with one extra normalisation layer appended to the res5 stage.

    MoCo's detection transfer (``facebookresearch/moco``, ``detection/train_net.py``; "an extra BN
    layer following the res5 stage" in the MoCo paper) and its followers (DenseCL, PixPro, ReSim,
    DetCo) fine-tune C4 detectors this way: a backbone pretrained with BN everywhere feeds the box
    predictor and mask head through a normalised res5 output. The layer is ``res5.norm``
    (``get_norm(cfg.MODEL.RESNETS.NORM, 2048)`` for R50): per RoI, (R, 2048, 7, 7) -> same shape.
    It is freshly initialised: pretraining checkpoints have no ``res5.norm``.
    """

    @configurable
    def __init__(self, *, res5_extra_norm, **kwargs):
        """
        Args:
            res5_extra_norm (str or callable): the norm appended to res5, see
                :func:`detectron2.layers.get_norm`; must not be empty.
            kwargs: the arguments of :class:`Res5ROIHeads`.
        """
        super().__init__(**kwargs)
        norm = get_norm(res5_extra_norm, self.res5[-1].out_channels)
        assert norm is not None, "Res5ROIHeadsExtraNorm needs a norm (MODEL.RESNETS.NORM is empty)"
        self.res5.add_module("norm", norm)  # runs after block 2 since res5 is an nn.Sequential

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["res5_extra_norm"] = cfg.MODEL.RESNETS.NORM
        return ret


@ROI_BOX_HEAD_REGISTRY.register()
class FastRCNNConvFCHeadExtraNorm(FastRCNNConvFCHead):
    """``FastRCNNConvFCHead`` followed by one normalisation layer after the last fc (+ ReLU).

    InsLoc's fine-tuning head (``limbo0000/InstanceLoc``, ``transfer/detection/train_net.py``): the
    4conv1fc head with ``cfg.MODEL.ROI_BOX_HEAD.NORM`` (SyncBN) in the convs and once more on the
    1024-d fc output. Shapes: (R, C, 7, 7) -> convs -> flatten -> fc1 + ReLU -> (R, 1024) -> norm
    -> (R, 1024). The norm is ``box_head.fc_extra_norm`` (the name InsLoc uses); conv and fc names
    are Detectron2's, so InsLoc/SoCo checkpoints with ``box_head.conv1..4`` and ``fc1`` load.
    """

    @configurable
    def __init__(self, input_shape, *, conv_dims, fc_dims, conv_norm="", fc_extra_norm="BN"):
        """
        Args:
            input_shape, conv_dims, fc_dims, conv_norm: as :class:`FastRCNNConvFCHead`.
            fc_extra_norm (str or callable): norm applied to the output of the last fc layer.
        """
        super().__init__(input_shape, conv_dims=conv_dims, fc_dims=fc_dims, conv_norm=conv_norm)
        assert len(fc_dims) > 0, "FastRCNNConvFCHeadExtraNorm normalises an fc output: NUM_FC must be > 0"
        norm = get_norm(fc_extra_norm, fc_dims[-1])
        assert norm is not None, "FastRCNNConvFCHeadExtraNorm needs MODEL.ROI_BOX_HEAD.NORM to be set"
        self.fc_extra_norm = norm  # registered last, so it is skipped by the loop in forward

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["fc_extra_norm"] = cfg.MODEL.ROI_BOX_HEAD.NORM
        return ret

    def forward(self, x):
        """(R, C, H, W) pooled features -> (R, FC_DIM) box features."""
        for name, layer in self.named_children():
            if name != "fc_extra_norm":
                x = layer(x)
        # Detectron2's BN / SyncBN / GN / LN expect NCHW: view the (R, D) vectors as (R, D, 1, 1).
        return torch.flatten(self.fc_extra_norm(x[:, :, None, None]), 1)
