"""The spine: configs merge, weights hand over to detectors, converter, errors that name the thing."""
import glob
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

import regionssl  # noqa: F401
from regionssl.checkpoint import FormatTag, RegionSSLCheckpointer

from conftest import HANG_TIMEOUT, QS, ROOT, cfg_of
from regionssl_workbench.scripts import load_script

convert = load_script("tools/convert_to_detectron2.py").convert


ALL_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_merges(path):
    cfg = cfg_of(path)
    # every config shares the input contract of Base-RegionSSL.yaml
    assert cfg.INPUT.FORMAT == "RGB"
    assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False


def test_unknown_config_key_is_named():
    with pytest.raises((KeyError, AssertionError), match="MODEL.REGIONSSL.NOT_A_KEY"):
        cfg_of("mocov2.yaml", "MODEL.REGIONSSL.NOT_A_KEY", "1")


def test_warmup_longer_than_schedule_is_named():
    from regionssl.engine.trainer import PretrainTrainer

    cfg = cfg_of(os.path.join(QS, "byol_instant_test.yaml"), "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "4")
    assert cfg.SOLVER.RESCALE_INTERVAL
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"SOLVER.WARMUP_ITERS \(4\) must be smaller than SOLVER.MAX_ITER \(4\)"):
        PretrainTrainer.build_lr_scheduler(cfg, optimizer)
    cfg.defrost()
    cfg.SOLVER.WARMUP_ITERS = 3
    scheduler = PretrainTrainer.build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # linear warmup from 0 (WARMUP_FACTOR 0) over 3 iterations, then the rescaled cosine starts at the full lr
    assert lrs == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])


def _pretrained_model(config, tmp_path):
    """Build a pretraining model, make momentum weights differ from online ones, save as the trainer does."""
    cfg = cfg_of(os.path.join(QS, config))
    model = build_model(cfg)
    with torch.no_grad():
        for t in list(model.momentum.parameters()) + list(model.momentum.buffers()):
            if t.dtype.is_floating_point:
                t.add_(1.0)
    ckpt = RegionSSLCheckpointer(model, str(tmp_path), regionssl=FormatTag(cfg.MODEL.META_ARCHITECTURE))
    ckpt.save("model_final")
    return model, os.path.join(str(tmp_path), "model_final.pth")


def _online_trunk(model_sd):
    """{trunk-relative name: tensor} of the online ResNet trunk of a pretraining model."""
    from regionssl.checkpoint import to_trunk_relative

    return {to_trunk_relative(k): v for k, v in model_sd.items() if not k.startswith("momentum.") and to_trunk_relative(k)}


def _detector_trunk(det_sd):
    from regionssl.checkpoint import to_trunk_relative

    return {to_trunk_relative(k): v for k, v in det_sd.items() if to_trunk_relative(k)}


HANDOFFS = [
    # (pretraining quick schedule, fine-tuning quick schedule + opts, extra prefixes that must transfer)
    ("insloc_fpn_instant_test.yaml", "finetune_coco_mask_rcnn_R_50_FPN_instant_test.yaml",
     ["MODEL.ROI_BOX_HEAD.NUM_CONV", "4", "MODEL.ROI_BOX_HEAD.NUM_FC", "1", "MODEL.ROI_BOX_HEAD.NORM", "BN"],
     ["backbone.fpn_", "roi_heads.box_head."]),
    ("insloc_c4_instant_test.yaml", "finetune_coco_mask_rcnn_R_50_C4_instant_test.yaml", [], []),
    ("mocov2_instant_test.yaml", "finetune_coco_mask_rcnn_R_50_FPN_instant_test.yaml", [], []),
    ("mocov2_instant_test.yaml", "finetune_coco_mask_rcnn_R_50_C4_instant_test.yaml", [], []),
]


def _check_handoff(pre_model, det, extra_prefixes):
    pre_sd, det_sd = pre_model.state_dict(), det.state_dict()
    pre_trunk, det_trunk = _online_trunk(pre_sd), _detector_trunk(det_sd)
    assert set(pre_trunk) <= set(det_trunk), "every pretrained ResNet tensor has a counterpart"
    # the only trunk tensors a detector may have beyond them: the extra norm of Res5ROIHeadsExtraNorm
    assert {k.split(".")[1] for k in set(det_trunk) - set(pre_trunk)} <= {"norm"}
    for name, value in pre_trunk.items():
        assert torch.equal(det_trunk[name], value), name
    for prefix in extra_prefixes:
        keys = [k for k in pre_sd if k.startswith(prefix)]
        assert keys
        for k in keys:
            assert torch.equal(det_sd[k], pre_sd[k]), k
    # nothing from the momentum encoder: its weights were made different from the online ones
    mom = {k[len("momentum."):]: v for k, v in pre_sd.items() if k.startswith("momentum.")}
    for k, v in mom.items():
        if v.dtype.is_floating_point and k in det_sd and v.shape == det_sd[k].shape:
            assert not torch.equal(det_sd[k], v), k


@pytest.mark.parametrize("pre,fine,opts,extra", HANDOFFS, ids=[f"{h[0]}->{h[1]}" for h in HANDOFFS])
def test_pretraining_checkpoint_loads_into_detector(pre, fine, opts, extra, tmp_path):
    pre_model, path = _pretrained_model(pre, tmp_path)
    det = build_model(cfg_of(os.path.join(QS, fine), *opts))
    RegionSSLCheckpointer(det).load(path)
    _check_handoff(pre_model, det, extra)


@pytest.mark.parametrize("pre,fine,opts,extra", HANDOFFS[:2], ids=[f"{h[0]}->{h[1]}" for h in HANDOFFS[:2]])
def test_converted_pkl_loads_into_stock_detectron2(pre, fine, opts, extra, tmp_path):
    pre_model, path = _pretrained_model(pre, tmp_path)
    pkl = str(tmp_path / "converted.pkl")
    written, _ = convert(path, pkl)
    assert not any(k.startswith(("momentum", "projector", "queues")) for k in written)
    with open(pkl, "rb") as f:
        assert pickle.load(f)["matching_heuristics"] is True
    det = build_model(cfg_of(os.path.join(QS, fine), *opts))
    DetectionCheckpointer(det).load(pkl)  # stock Detectron2 loader
    _check_handoff(pre_model, det, extra)


def _run(args, timeout=HANG_TIMEOUT):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_net.py")] + args, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_missing_weights_file_is_named(tmp_path):
    r = _run(["--config-file", os.path.join(QS, "finetune_coco_mask_rcnn_R_50_FPN_instant_test.yaml"),
              "MODEL.WEIGHTS", "/nonexistent/model_final.pth", "OUTPUT_DIR", str(tmp_path)])
    assert r.returncode != 0
    assert "MODEL.WEIGHTS='/nonexistent/model_final.pth' does not exist" in r.stderr


@pytest.mark.slow
def test_missing_dataset_folder_is_named(tmp_path):
    r = _run(["--config-file", os.path.join(QS, "mocov2_instant_test.yaml"),
              "DATASETS.TRAIN", "('folder:/nonexistent/images',)", "OUTPUT_DIR", str(tmp_path)])
    assert r.returncode != 0
    assert "Image folder '/nonexistent/images' does not exist" in r.stderr


@pytest.mark.slow
def test_two_process_cpu_pretraining_and_resume(tmp_path):
    """--num-gpus 2 on CPU runs two gloo processes; --resume continues at the saved iteration."""
    out = str(tmp_path / "run")
    common = ["--config-file", os.path.join(QS, "mocov2_instant_test.yaml"), "OUTPUT_DIR", out,
              "SOLVER.IMS_PER_BATCH", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "INPUT.REGIONSSL.CROP_SIZE", "64"]
    r = _run(["--num-gpus", "2"] + common + ["SOLVER.MAX_ITER", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    # resume the interrupted 4-iteration schedule in one process
    r = _run(["--resume"] + common + ["SOLVER.MAX_ITER", "4"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Starting training from iteration 2" in r.stdout + r.stderr
    ckpt = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 3


def test_probe_command_line_takes_overrides_after_seeds():
    # Detectron2 users append config overrides at the end; --seeds must not swallow them.
    parse_args = load_script("tools/probe.py").parse_args

    args = parse_args(["--config-file", "c.yaml", "--seeds", "0", "1", "2", "MODEL.WEIGHTS", "w.pth"])
    assert args.seeds == [0, 1, 2] and args.opts == ["MODEL.WEIGHTS", "w.pth"]
    args = parse_args(["--config-file", "c.yaml", "--seed", "3", "--random-init"])  # abbreviation
    assert args.seeds == [3] and args.opts == [] and args.random_init
    assert parse_args(["--config-file", "c.yaml"]).seeds == [0]
    with pytest.raises(SystemExit):
        parse_args(["--config-file", "c.yaml", "--seeds", "MODEL.X", "1"])


def test_probe_json_feeds_the_demo_summary(tmp_path):
    """tools/probe.py --random-init --output-json (the demo's probe step) writes both columns per seed,
    and tools/summarize_run.py reads the paired gain from exactly those numbers."""
    probe_main = load_script("tools/probe.py").main
    probe_gain = load_script("tools/summarize_run.py").probe_gain

    small = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
             "MODEL.REGIONSSL.PROJECTOR.HIDDEN_DIM", "64", "TEST.REGIONSSL.PROBE_CROP_SIZE", "64",
             "TEST.REGIONSSL.PROBE_ROUNDS", "1"]
    config = os.path.join(QS, "mocov2_instant_test.yaml")
    torch.manual_seed(5)  # another construction seed than the random-init column's 0: another network
    weights = tmp_path / "model_final.pth"
    torch.save({"model": build_model(cfg_of(config, *small)).state_dict()}, weights)
    out = tmp_path / "probe" / "probe.json"
    results = probe_main(["--config-file", config, "--weights", str(weights), "--random-init", "--max-images", "3",
                          "--seeds", "0", "1", "--output-json", str(out)] + small)
    data = json.loads(out.read_text())
    assert data["seeds"] == [0, 1] and data["weights"] == str(weights)
    assert sorted(data["results"]) == ["checkpoint", "random init"]
    assert data["results"]["checkpoint"]["1"]["top1"] == results["checkpoint"][1]["top1"]
    ours = [results["checkpoint"][s]["top1"] for s in (0, 1)]
    rand = [results["random init"][s]["top1"] for s in (0, 1)]
    lines = probe_gain(str(out))
    assert f"pretrained {sum(ours) / 2:.3f}, random init {sum(rand) / 2:.3f}" in lines[0]
    assert lines[1].startswith(f"pretraining bought {(ours[0] - rand[0] + ours[1] - rand[1]) / 2:+.3f} region top-1")
