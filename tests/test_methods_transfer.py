"""Every pretraining method, end to end: a few quick-schedule iterations with the real trainer,
then its model_final.pth as MODEL.WEIGHTS of a Mask R-CNN that trains with the fine-tune trainer."""
import math
import os

import pytest
import torch
from detectron2.utils.events import EventStorage

import regionssl  # noqa: F401
from regionssl.checkpoint import to_trunk_relative
from regionssl.engine import FinetuneTrainer, PretrainTrainer
from regionssl_workbench.recipes import instant_test, recipes

from conftest import qs_cfg

pytestmark = pytest.mark.slow  # every method pretrains, then a detector fine-tunes from it

FPN = "finetune_coco_mask_rcnn_R_50_FPN_instant_test.yaml"
C4 = "finetune_coco_mask_rcnn_R_50_C4_instant_test.yaml"

# recipe -> (detector protocol, parts beyond the trunk the detector must receive); every other
# recipe of the roster: the FPN protocol, the trunk only
PROTOCOLS = {
    "insloc_fpn": (FPN, ["backbone.fpn_", "roi_heads.box_head."]),
    "insloc_c4": (C4, []),
    "resim_fpn": (FPN, ["backbone.fpn_lateral3.weight", "backbone.fpn_output4.weight"]),
    "resim_c4": (C4, []),
}
assert set(PROTOCOLS) <= set(recipes())
METHODS = [(instant_test(r), *PROTOCOLS.get(r, (FPN, []))) for r in recipes()]


def _cfg(name, out, *opts):
    cfg = qs_cfg(name, *opts)
    cfg.OUTPUT_DIR = str(out)
    return cfg


@pytest.mark.parametrize("pre,fine,extra", METHODS, ids=recipes())
def test_pretrain_then_finetune(pre, fine, extra, tmp_path):
    pre_cfg = _cfg(pre, tmp_path / "pre", "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "100")
    trainer = PretrainTrainer(pre_cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    # Detectron2 logs the separate losses only when there are several; total_loss always
    losses = {k: v.latest() for k, v in trainer.storage.histories().items() if "loss" in k}
    assert "total_loss" in losses and all(math.isfinite(v) for v in losses.values()), losses
    weights = os.path.join(pre_cfg.OUTPUT_DIR, "model_final.pth")
    pre_sd = torch.load(weights, map_location="cpu", weights_only=False)["model"]

    opts = ["MODEL.WEIGHTS", weights, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()"]
    if "box_head." in "".join(extra):
        opts += ["MODEL.ROI_BOX_HEAD.NUM_CONV", "4", "MODEL.ROI_BOX_HEAD.NUM_FC", "1", "MODEL.ROI_BOX_HEAD.NORM", "BN"]
    fine_cfg = _cfg(fine, tmp_path / "fine", *opts)
    det_trainer = FinetuneTrainer(fine_cfg)
    det_trainer.resume_or_load(resume=False)
    det_sd = det_trainer.model.state_dict()
    # every online ResNet tensor landed in the detector, whatever its layout
    det_trunk = {to_trunk_relative(k): v for k, v in det_sd.items() if to_trunk_relative(k)}
    pre_trunk = {to_trunk_relative(k): v for k, v in pre_sd.items() if not k.startswith("momentum.") and to_trunk_relative(k)}
    assert pre_trunk
    for name, value in pre_trunk.items():
        assert torch.equal(det_trunk[name], value), name
    for prefix in extra:
        keys = [k for k in pre_sd if k.startswith(prefix)]
        assert keys, prefix
        for k in keys:
            if k in det_sd:  # FPN conv biases do not exist in a normed detector FPN
                assert torch.equal(det_sd[k], pre_sd[k]), k
    det_trainer.train()
    det_losses = {k: v.latest() for k, v in det_trainer.storage.histories().items() if k.startswith("loss_")}
    assert {"loss_cls", "loss_box_reg", "loss_rpn_cls"} <= set(det_losses)
    assert all(math.isfinite(v) for v in det_losses.values()), det_losses
