"""Fine-tuning end to end on CPU: Detectron2's DefaultTrainer on the tiny sets, then its evaluators.

A few iterations from random initialisation: AP values are ~0; the point is that the quick-schedule
configs, the tiny datasets' registration/metadata and Detectron2's COCO / VOC evaluators fit.
"""
import math
import os

import pytest
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from regionssl.config import add_regionssl_config
import regionssl.modeling.roi_heads  # noqa: F401  (registers Res5ROIHeadsExtraNorm)

from conftest import CONFIGS

pytestmark = pytest.mark.slow  # detectors train and evaluate



class Trainer(DefaultTrainer):
    """DefaultTrainer with evaluators picked by ``evaluator_type``, as a train_net.py does.
    The end-of-training EvalHook is dropped: the test calls ``Trainer.test`` itself."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        from detectron2.data import MetadataCatalog

        if MetadataCatalog.get(dataset_name).evaluator_type == "coco":
            return COCOEvaluator(dataset_name, output_dir=output_folder or cfg.OUTPUT_DIR)
        return PascalVOCDetectionEvaluator(dataset_name)

    def build_hooks(self):
        return [h for h in super().build_hooks() if not isinstance(h, hooks.EvalHook)]


def _train(config, output_dir, max_iter):
    cfg = get_cfg()
    add_regionssl_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, "quick_schedules", config))
    cfg.MODEL.DEVICE = "cpu"
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.WARMUP_ITERS = 1
    # Near-random models score every class about equally: keep all boxes so AP is computed, not NaN.
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.OUTPUT_DIR = str(output_dir)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.iter == max_iter  # (incremented after the last step)
    assert math.isfinite(trainer.storage.history("total_loss").latest())
    assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    return cfg, trainer


def test_coco_mask_rcnn_fpn_train_and_coco_eval(tiny_root, tmp_path):
    cfg, trainer = _train("finetune_coco_mask_rcnn_R_50_FPN_instant_test.yaml", tmp_path, 3)
    results = Trainer.test(cfg, trainer.model)  # builds the loader, then the evaluator
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert {"AP", "AP50", "AP75", "AP-circle", "AP-star"} <= set(results[task])
        assert math.isfinite(results[task]["AP"]) and 0 <= results[task]["AP"] <= 100
        assert math.isfinite(results[task]["AP50"])
    # The evaluator read the tiny json (8 images) and wrote Detectron2-format predictions.
    assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "coco_instances_results.json"))
    assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "instances_predictions.pth"))


def test_voc_c4_train_and_voc_eval(tiny_root, tmp_path):
    cfg, trainer = _train("finetune_voc_R_50_C4_instant_test.yaml", tmp_path, 2)
    results = Trainer.test(cfg, trainer.model)
    assert set(results) == {"bbox"}
    assert set(results["bbox"]) == {"AP", "AP50", "AP75"}
    assert all(math.isfinite(v) and 0 <= v <= 100 for v in results["bbox"].values())
