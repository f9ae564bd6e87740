"""The miniature recipes (configs/miniature) and tools/miniature_benchmark.py: one shared budget, a
constant learning rate after warm-up (so a checkpoint after B steps is the B-step budget), budget
checkpoints by name, the scaling curve's table and the report, from synthetic benchmark results."""
import json
import os
import struct

import pytest
import torch
from detectron2.solver import build_lr_scheduler

from regionssl import transfer
from regionssl.engine import get_regionssl_cfg
from regionssl.engine.hooks import CollapseGuard
from regionssl_workbench.scripts import load_script

mini = load_script("tools/miniature_benchmark.py")

RECIPES = ["insloc_fpn", "mocov2", "resim_fpn", "scrl"]


def _cfg(recipe):
    return get_regionssl_cfg(os.path.join(mini.RECIPES_DIR, recipe + ".yaml"))


def test_the_roster_is_the_config_folder():
    assert mini.recipe_names() == RECIPES
    assert mini.parse_args([]).recipes == RECIPES
    with pytest.raises(SystemExit):
        mini.parse_args(["--recipes", "mocov2", "nonexistent"])


def test_every_recipe_has_the_same_budget():
    budget = {r: (c.SOLVER.MAX_ITER, c.SOLVER.IMS_PER_BATCH, c.INPUT.REGIONSSL.CROP_SIZE, c.DATASETS.TRAIN,
                  c.SOLVER.WARMUP_ITERS, c.SOLVER.CHECKPOINT_PERIOD, c.MODEL.BACKBONE.FREEZE_AT,
                  c.SOLVER.REFERENCE_WORLD_SIZE, c.TEST.REGIONSSL.GUARD.START_ITER)
              for r, c in ((r, _cfg(r)) for r in RECIPES)}
    assert set(budget.values()) == {(2000, 8, 128, ("regionssl_minidet_train_images",), 100, 250, 1, 0, 400)}


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_shortened_recipe_keeps_the_guard_start(recipe):
    """A user who shortens a recipe to 1,000 steps gets the guard's first check at step 400, after the
    ~250 steps the recipes take to leave chance, not at the default MAX_ITER / 5 = 200."""
    cfg = _cfg(recipe)
    cfg.SOLVER.MAX_ITER = 1000
    assert CollapseGuard.from_config(cfg).start_iter == 400
    cfg.TEST.REGIONSSL.GUARD.START_ITER = -1
    assert CollapseGuard.from_config(cfg).start_iter == 200


@pytest.mark.parametrize("recipe", RECIPES)
def test_learning_rate_is_constant_after_warmup(recipe):
    """The scaling curve reads the checkpoint after B steps as the B-step budget: true only if no step
    of the schedule depends on MAX_ITER after warm-up."""
    cfg = _cfg(recipe)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    sched = build_lr_scheduler(cfg, opt)
    lrs = []
    for _ in range(cfg.SOLVER.MAX_ITER):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < cfg.SOLVER.BASE_LR and lrs[cfg.SOLVER.WARMUP_ITERS - 1] < cfg.SOLVER.BASE_LR
    assert lrs[cfg.SOLVER.WARMUP_ITERS:] == pytest.approx([cfg.SOLVER.BASE_LR] * (cfg.SOLVER.MAX_ITER - cfg.SOLVER.WARMUP_ITERS))


def test_budget_checkpoints_are_named_by_their_last_iteration(tmp_path):
    args = mini.parse_args(["--output", str(tmp_path)])
    assert mini.budget_checkpoint(args, "mocov2", 250) == str(tmp_path / "pretrain" / "mocov2" / "model_0000249.pth")
    assert mini.budget_checkpoint(args, "insloc_fpn", 1000).endswith("model_0000999.pth")
    with pytest.raises(transfer.TransferError, match="Budget 300 of 'mocov2' is not a checkpoint"):
        mini.budget_checkpoint(args, "mocov2", 300)
    with pytest.raises(transfer.TransferError, match="Budget 2000 of 'mocov2'.*below MAX_ITER 2000"):
        mini.budget_checkpoint(args, "mocov2", 2000)
    assert mini.scaling_models(mini.parse_args(["--output", str(tmp_path), "--scaling-recipes", "mocov2",
                                                "--budgets", "250", "500"])) == [
        f"mocov2_b250={tmp_path}/pretrain/mocov2/model_0000249.pth",
        f"mocov2_b500={tmp_path}/pretrain/mocov2/model_0000499.pth"]


def _model(name, box_aps):
    runs = {s: {"bbox": {"AP": ap}, "segm": {"AP": ap / 2}} for s, ap in enumerate(box_aps)}
    return {"name": name, "runs": {str(s): {} for s in runs}, "summary": transfer.summarize(runs)}


MODELS = [_model("random", [2.0, 3.0, 4.0]), _model("mocov2", [5.0, 6.0, 7.0]), _model("mocov2_b250", [1.0, 2.0, 3.0]),
          _model("mocov2_b500", [3.0, 4.0])]


def test_scaling_points_and_table():
    points = transfer.scaling_points(MODELS, "mocov2", [250, 500, 1000], 2000)
    assert [(b, s and s["mean"]) for b, s in points] == [(0, 3.0), (250, 2.0), (500, 3.5), (1000, None), (2000, 6.0)]
    table = transfer.scaling_table({"mocov2": points, "insloc_fpn": transfer.scaling_points(MODELS, "insloc_fpn", [250], 2000)})
    assert table.splitlines()[:7] == [
        "| pretraining steps | mocov2 | insloc_fpn |",
        "|---:|---:|---:|",
        "| 0 (random init) | 3.0 (2.0–4.0) [3] | 3.0 (2.0–4.0) [3] |",
        "| 250 | 2.0 (1.0–3.0) [3] |  |",
        "| 500 | 3.5 (3.0–4.0) [2] |  |",
        "| 1000 |  |  |",
        "| 2000 | 6.0 (5.0–7.0) [3] |  |",
    ]


def test_paired_gains_compare_the_same_fine_tuning_seed():
    nan = float("nan")
    base = {"0": {"bbox": {"AP": 2.14}}, "1": {"bbox": {"AP": 3.82}}, "2": {"bbox": {"AP": 2.68}}, "3": {"bbox": {"AP": 1.0}}}
    runs = {"2": {"bbox": {"AP": 3.44}}, "0": {"bbox": {"AP": 4.35}}, "1": {"bbox": {"AP": 4.41}}, "3": {"bbox": {"AP": nan}},
            "4": {"bbox": {"AP": 9.0}}}  # seed 3: no detection at all; seed 4: random init not run
    gains = transfer.paired_gains(runs, base)
    assert list(gains) == ["0", "1", "2"]
    assert [round(g, 2) for g in gains.values()] == [2.21, 0.59, 0.76]
    assert transfer.paired_cell(gains) == "+1.19 (+2.21, +0.59, +0.76; 3 of 3 above)"
    assert transfer.paired_cell(transfer.paired_gains({"0": {"bbox": {"AP": 1.5}}}, base)) == "-0.64 (-0.64; 0 of 1 above)"
    assert transfer.paired_cell({}) == ""


def test_report_from_finished_results(tmp_path):
    out, report = tmp_path / "out", tmp_path / "report"
    args = mini.parse_args(["--output", str(out), "--report", str(report), "--recipes", "mocov2",
                            "--scaling-recipes", "mocov2", "--budgets", "250", "500"])
    for model in MODELS:  # finished runs as tools/transfer.py leaves them, whichever call made them
        for seed, box in enumerate(model["summary"]["box AP"]["values"]):
            run = out / "full" / "finetune" / model["name"] / f"seed{seed}"
            run.mkdir(parents=True)
            (run / transfer.METRICS_FILE).write_text(json.dumps({"results": {"bbox": {"AP": box}, "segm": {"AP": box / 2}}}))
    probe_dir = out / "pretrain" / "mocov2"
    probe_dir.mkdir(parents=True)
    top1 = {"checkpoint": [0.3, 0.2, 0.25], "random init": [0.1, 0.15, 0.2]}
    (probe_dir / "probe.json").write_text(json.dumps({"results": {
        col: {str(s): {"top1": v} for s, v in enumerate(vals)} for col, vals in top1.items()}}))
    mini.write_report(args)
    assert sorted(os.listdir(report)) == ["full.md", "probe.md", "results.json", "scaling.md", "scaling.png"]
    full = (report / "full.md").read_text().splitlines()
    table = full[:full.index("mean (min–max) over fine-tuning seeds; COCO AP in percent.")]
    assert [line.split(" |")[0] for line in table if line.startswith("| ") and "seeds" not in line] == [
        "| random", "| mocov2"]  # the budget rows belong to the scaling table only
    assert "| 500 | 3.5 (3.0–4.0) [2] |" in (report / "scaling.md").read_text()
    assert "| mocov2 | 0.250 (0.200-0.300) | 0.150 (0.100-0.200) | +0.200, +0.050, +0.050 |" in (
        report / "probe.md").read_text()
    assert "| mocov2 | +3.00 (+3.00, +3.00, +3.00; 3 of 3 above) |" in full  # paired with random init, seed by seed
    scaling = (report / "scaling.md").read_text().splitlines()
    assert scaling[-3:] == ["| 250 | -1.00 (-1.00, -1.00, -1.00; 0 of 3 above) |",
                            "| 500 | +1.00 (+1.00, +1.00; 2 of 2 above) |",  # seed 2 of the 500-step budget not run
                            "| 2000 | +3.00 (+3.00, +3.00, +3.00; 3 of 3 above) |"]
    png = (report / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">I", png[16:20])[0] == 1248  # two panels side by side
    results = json.loads((report / "results.json").read_text())
    assert results["full"]["mocov2"]["box AP"]["values"] == [5.0, 6.0, 7.0]
    assert results["full"]["mocov2_b500"]["box AP minus random init"] == {"0": 1.0, "1": 1.0}
    assert [p["steps"] for p in results["scaling"]["mocov2"]] == [0, 250, 500, 2000]
    assert results["frozen"] == {}  # not run: nothing is made up


def test_frozen_protocol_keeps_the_pretrained_trunk_and_trains_the_rest(tmp_path):
    """The frozen-trunk protocol: a MoCo-v2 (ResNet backbone) checkpoint lands in the FPN detector's trunk,
    its BN statistics become FrozenBatchNorm buffers, no trunk parameter trains; FPN and heads do."""
    from detectron2.layers import FrozenBatchNorm2d
    from detectron2.modeling import build_model

    from regionssl.checkpoint import FormatTag, RegionSSLCheckpointer

    root = os.path.dirname(mini.RECIPES_DIR)
    torch.manual_seed(0)
    pretrain = build_model(get_regionssl_cfg(os.path.join(mini.RECIPES_DIR, "mocov2.yaml"), ["MODEL.DEVICE", "cpu"]))
    state = pretrain.state_dict()
    state["backbone.res2.0.conv1.norm.running_mean"] = torch.arange(64, dtype=torch.float32)
    state["backbone.stem.conv1.weight"] = torch.full_like(state["backbone.stem.conv1.weight"], 0.5)
    path = tmp_path / "model_final.pth"
    torch.save({"model": state, "regionssl": FormatTag("MoCoV2").state_dict()}, path)

    cfg = get_regionssl_cfg(os.path.join(root, "finetune", "minidet_mask_rcnn_R_50_FPN_mini_frozen.yaml"),
                            ["MODEL.DEVICE", "cpu"])
    detector = build_model(cfg)
    RegionSSLCheckpointer(detector).load(str(path))
    trunk = detector.backbone.bottom_up
    assert isinstance(trunk.res2[0].conv1.norm, FrozenBatchNorm2d)
    assert torch.equal(trunk.res2[0].conv1.norm.running_mean, torch.arange(64, dtype=torch.float32))
    assert torch.equal(trunk.stem.conv1.weight, torch.full_like(trunk.stem.conv1.weight, 0.5))
    assert not any(p.requires_grad for p in trunk.parameters())
    trainable = {n.split(".")[0] for n, p in detector.named_parameters() if p.requires_grad}
    assert trainable == {"backbone", "proposal_generator", "roi_heads"}
    assert all(n.startswith("backbone.fpn_") for n, p in detector.named_parameters()
               if p.requires_grad and n.startswith("backbone."))
