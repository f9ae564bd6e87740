"""Pictures of mapped samples (regionssl/data/visualize.py), the tools command and the VIS_PERIOD hook."""
import glob
import os

import numpy as np
import pytest
import torch
from PIL import Image

import regionssl  # noqa: F401
from regionssl.data import RegionSSLDatasetMapper
from regionssl.data.demo_images import demo_image_files
from regionssl.engine import PretrainTrainer, adapt_to_machine, get_regionssl_cfg
from regionssl.data.visualize import _HEADER, _PALETTE, draw_sample

from conftest import ROOT
from regionssl_workbench.scripts import load_script

visualize_views = load_script("tools/visualize_views.py")

CASES = {
    "insloc": ("configs/insloc_fpn.yaml", ["INPUT.REGIONSSL.CROP_SIZE", 128, "INPUT.REGIONSSL.COPY_PASTE.FG_SIZE", [48, 100]]),
    "resim": ("configs/mocov2.yaml", ["INPUT.REGIONSSL.VIEW_GENERATOR", "TwoCropsSharedFlip",
                                      "INPUT.REGIONSSL.REGION_SAMPLER", "SlidingWindows"]),
    "scrl": ("configs/mocov2.yaml", ["INPUT.REGIONSSL.REGION_SAMPLER", "IntersectionBoxes"]),
    "swav": ("configs/mocov2.yaml", ["INPUT.REGIONSSL.VIEW_GENERATOR", "MultiCrop", "INPUT.REGIONSSL.MULTI_CROP.SIZES", [96, 48]]),
}


def _mapped(case, seed=0):
    config, opts = CASES[case]
    cfg = get_regionssl_cfg(os.path.join(ROOT, config), opts + ["INPUT.REGIONSSL.PHOTOMETRIC.ENABLED", False])
    files = demo_image_files()[:3]
    mapper = RegionSSLDatasetMapper(cfg, dataset_dicts=[{"file_name": f, "image_id": i} for i, f in enumerate(files)])
    np.random.seed(seed)
    return mapper({"file_name": files[0], "image_id": 0})


@pytest.mark.parametrize("case", sorted(CASES))
def test_draw_sample_shape_and_colours(case):
    out = _mapped(case)
    pic = draw_sample(out)
    n = len(out["views"])
    height = max(256, max(v.shape[1] for v in out["views"]))
    widths = [round(v.shape[2] * height / v.shape[1]) for v in out["views"]]
    assert pic.dtype == np.uint8 and pic.ndim == 3 and pic.shape[2] == 3
    assert pic.shape[0] == height + _HEADER and pic.shape[1] == sum(widths) + 6 * (n - 1)
    # the first drawn region has the same colour in views 0 and 1
    i = int(np.flatnonzero(out["valid"].numpy())[0])
    colour = np.rint(_PALETTE[i % len(_PALETTE)]).astype(np.uint8)
    x = 0
    for v in (0, 1):
        tile = pic[_HEADER:, x : x + widths[v]]
        assert (np.abs(tile.astype(int) - colour).sum(-1) <= 3).sum() > 20, f"row {i} colour missing in view {v}"
        x += widths[v] + 6


def test_draw_sample_with_masks_jitter_and_invalid_rows():
    out = _mapped("insloc")
    out["masks"] = [torch.rand(v.shape[1:]) for v in out["views"]]
    out["boxes"] = [torch.cat([b, torch.tensor([[-20.0, -20.0, 30.0, 30.0]])]) for b in out["boxes"]]
    out["valid"] = torch.tensor([True, False])
    out["box_groups"] = torch.tensor([0, 0])
    out["jittered_boxes"] = torch.cat([out["jittered_boxes"], torch.zeros(1, 4)])
    pic = draw_sample(out)
    assert pic.dtype == np.uint8 and np.isfinite(pic).all()


def test_visualize_views_command_writes_pngs(tmp_path):
    written = visualize_views.main([
        "--config-file", os.path.join(ROOT, "configs/mocov2.yaml"), "--num", "3", "--output", str(tmp_path),
        "DATASETS.TRAIN", "('regionssl_demo_images',)", "INPUT.REGIONSSL.REGION_SAMPLER", "IntersectionBoxes",
        "INPUT.REGIONSSL.CROP_SIZE", "96", "INPUT.REGIONSSL.INTERSECTION.MIN_SIZE", "16",
    ])
    assert len(written) == 3 and sorted(glob.glob(str(tmp_path / "*.png"))) == sorted(written)
    assert Image.open(written[0]).mode == "RGB"


@pytest.mark.slow
def test_vis_period_puts_view_pictures_into_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = get_regionssl_cfg(os.path.join(ROOT, "configs/quick_schedules/mocov2_instant_test.yaml"), [
        "VIS_PERIOD", 2, "SOLVER.MAX_ITER", 2, "SOLVER.IMS_PER_BATCH", 2, "INPUT.REGIONSSL.CROP_SIZE", 64,
        "SOLVER.CHECKPOINT_PERIOD", 1000, "OUTPUT_DIR", str(tmp_path),
    ])
    adapt_to_machine(cfg)
    trainer = PretrainTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    events = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    assert events, os.listdir(tmp_path)
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    assert "regionssl/views" in acc.Tags()["images"]
    image = acc.Images("regionssl/views")[-1]
    assert image.step == 1 and image.width > image.height > 64
