"""Fine-tuning heads (regionssl.modeling.roi_heads) built from the shipped configs, on CPU."""
import copy
import os

import pytest
import torch
from torch import nn

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import build_box_head, build_roi_heads
from detectron2.utils.events import EventStorage
from regionssl.config import add_regionssl_config
from regionssl.modeling.roi_heads import FastRCNNConvFCHeadExtraNorm, Res5ROIHeadsExtraNorm

from conftest import CONFIGS

C4_COCO = "quick_schedules/finetune_coco_mask_rcnn_R_50_C4_instant_test.yaml"
C4_VOC = "quick_schedules/finetune_voc_R_50_C4_instant_test.yaml"
FPN_COCO = "quick_schedules/finetune_coco_mask_rcnn_R_50_FPN_instant_test.yaml"
EXTRANORM_LEAF = "finetune/coco_mask_rcnn_R_50_FPN_4conv1fc_extranorm_1x.yaml"


def _cfg(name):
    cfg = get_cfg()
    add_regionssl_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, name))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _extranorm_cfg():
    """The FPN quick schedule with the box head of the InsLoc leaf (SyncBN -> BN for CPU)."""
    cfg = _cfg(FPN_COCO)
    cfg.MODEL.ROI_BOX_HEAD = copy.deepcopy(_cfg(EXTRANORM_LEAF).MODEL.ROI_BOX_HEAD)
    cfg.MODEL.ROI_BOX_HEAD.NORM = "BN"
    return cfg


def _param_names(model):
    return set(model.state_dict().keys())


def test_res5_extra_norm_names_and_shapes():
    torch.manual_seed(0)
    cfg = _cfg(C4_COCO)
    model = build_model(cfg)
    assert type(model.roi_heads) is Res5ROIHeadsExtraNorm
    norm = model.roi_heads.res5.norm
    assert list(model.roi_heads.res5.children())[-1] is norm  # last layer of res5
    assert type(norm) is nn.BatchNorm2d and norm.num_features == 2048
    cfg.MODEL.ROI_HEADS.NAME = "Res5ROIHeads"
    stock = build_model(cfg)
    extra = _param_names(model) - _param_names(stock)
    assert extra == {"roi_heads.res5.norm." + k for k in
                     ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert _param_names(stock) <= _param_names(model)
    assert {"roi_heads.res5.0.conv1.weight", "roi_heads.res5.2.conv3.norm.weight",
            "roi_heads.res5.0.shortcut.weight", "roi_heads.mask_head.deconv.weight"} <= _param_names(model)
    # A checkpoint of the stock detector (= what converted pretraining weights target) loads; only
    # the extra norm is left at its initialisation.
    missing, unexpected = model.load_state_dict(stock.state_dict(), strict=False)
    # (torch's BatchNorm fills a missing num_batches_tracked itself, so it is not reported.)
    assert unexpected == [] and set(missing) == extra - {"roi_heads.res5.norm.num_batches_tracked"}
    x = torch.randn(3, 1024, 14, 14)
    assert model.roi_heads.res5(x).shape == (3, 2048, 7, 7)


def test_extra_norm_box_head_names_and_shapes():
    cfg = _extranorm_cfg()
    model = build_model(cfg)
    head = model.roi_heads.box_head
    assert type(head) is FastRCNNConvFCHeadExtraNorm
    assert type(head.fc_extra_norm) is nn.BatchNorm2d and head.fc_extra_norm.num_features == 1024
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    stock = build_model(cfg)
    extra = _param_names(model) - _param_names(stock)
    assert extra == {"roi_heads.box_head.fc_extra_norm." + k for k in
                     ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert {"roi_heads.box_head.conv%d.weight" % i for i in (1, 2, 3, 4)} | {
        "roi_heads.box_head.conv4.norm.weight", "roi_heads.box_head.fc1.weight",
        "roi_heads.box_head.fc1.bias"} <= _param_names(model)
    assert "roi_heads.box_head.fc2.weight" not in _param_names(model)  # 4conv1fc
    assert head.output_shape.channels == 1024
    head.eval()
    stock_head = stock.roi_heads.box_head.eval()
    stock_head.load_state_dict({k: v for k, v in head.state_dict().items() if "extra" not in k})
    x = torch.randn(4, 256, 7, 7)
    # Eval with fresh running stats (mean 0, var 1): the norm is ~identity, so equals the stock head.
    torch.testing.assert_close(head(x), stock_head(x) / (1 + 1e-5) ** 0.5)
    # Training mode: the norm normalises each of the 1024 fc outputs over the RoIs.
    head.train()
    out = head(torch.randn(16, 256, 7, 7))
    assert out.shape == (16, 1024)
    torch.testing.assert_close(out.mean(0), torch.zeros(1024), atol=1e-5, rtol=0)


def test_full_recipe_heads_use_syncbn():
    """The GPU leaves build SyncBN extra norms (constructing them needs no GPU)."""
    leaf = _cfg(EXTRANORM_LEAF)
    head = build_box_head(leaf, ShapeSpec(channels=256, height=7, width=7))
    assert type(head) is FastRCNNConvFCHeadExtraNorm
    assert type(head.fc_extra_norm) is nn.SyncBatchNorm and type(head.conv1.norm) is nn.SyncBatchNorm
    voc = _cfg("finetune/voc_R_50_C4_24k.yaml")
    heads = build_roi_heads(voc, {"res4": ShapeSpec(channels=1024, stride=16)})
    assert type(heads) is Res5ROIHeadsExtraNorm and type(heads.res5.norm) is nn.SyncBatchNorm
    assert heads.box_predictor.cls_score.out_features == 21 and not heads.mask_on


@pytest.mark.parametrize("config", [C4_COCO, C4_VOC, "extranorm"])
def test_training_forward_returns_finite_losses(tiny_root, config):
    torch.manual_seed(0)
    cfg = _extranorm_cfg() if config == "extranorm" else _cfg(config)
    model = build_model(cfg)
    model.train()
    mapper = DatasetMapper(cfg, is_train=True)
    batch = [mapper(copy.deepcopy(d)) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:2]]
    with EventStorage(0):  # GeneralizedRCNN logs training statistics to the current storage
        losses = model(batch)
    expected = {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    assert set(losses) == (expected | {"loss_mask"} if cfg.MODEL.MASK_ON else expected)
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    if config == "extranorm":
        assert model.roi_heads.box_head.fc_extra_norm.weight.grad is not None
    else:
        assert model.roi_heads.res5.norm.weight.grad.abs().sum() > 0
