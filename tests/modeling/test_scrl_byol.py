"""SCRL and BYOL: loss math, gradient routing, EMA schedule and resume, SCRL's box rules, smoke runs.

Math tests use a ResNet-18 trunk with small heads (fast); the smoke forward/backward uses the real
quick-schedule configs (ResNet-50) on the real mapper's output for the demo photos.
"""
import math
import os

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import regionssl  # noqa: F401  (registers models, samplers, datasets)
from regionssl.data.build import get_pretrain_dataset_dicts
from regionssl.data.mapper import RegionSSLDatasetMapper
from regionssl.data.regions import IntersectionBoxes, box_iou_np
from regionssl.data.views import TwoCrops, _crop_view
from regionssl.engine import PretrainTrainer, adapt_to_machine
from regionssl.modeling.encoders import RoIEncoder
from regionssl.modeling.momentum import momentum_at
from regionssl.modeling.heads import MLP, NaiveSyncBatchNorm1d
from regionssl.modeling.meta_arch import BYOL, SCRL
from regionssl.solver import LARS

from conftest import Interrupt, launch_cpu, qs_cfg

CROP = 64  # real-mapper smoke runs (ResNet-50)
TINY = 32  # ResNet-18 math tests: res5 is 1x1


def _cfg(name, *opts):
    return qs_cfg(name, *opts)


def _tiny_cfg(name, *opts):
    """ResNet-18 trunk, 32/16-wide heads: the learning rule on a model that runs in a blink."""
    small = [
        "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MODEL.REGIONSSL.PROJECTOR.HIDDEN_DIM", "32", "MODEL.REGIONSSL.PROJECTOR.OUT_DIM", "16",
        "MODEL.REGIONSSL.PREDICTOR.HIDDEN_DIM", "32", "SOLVER.MAX_ITER", "100",
        "INPUT.REGIONSSL.CROP_SIZE", str(TINY),
    ]
    return _cfg(name, *small, *opts)


def _set_seed(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)


def _synthetic_batch(n=2, boxes_per_image=2, size=TINY):
    """Mapper-shaped inputs: two random uint8 views, boxes placed identically in both views."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        b = torch.tensor([[2.0, 3.0, 20.0, 25.0], [10.0, 5.0, 30.0, 18.0], [0.0, 0.0, 16.0, 16.0]])[:boxes_per_image]
        out.append({
            "views": [torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8) for _ in range(2)],
            "boxes": [b.clone(), b.clone()],
            "valid": torch.ones(len(b), dtype=torch.bool),
        })
    return out


@pytest.fixture(scope="module")
def demo_batches():
    """Real mapper output on the demo photos, 64 px views: {config name: list of 2 dicts}."""
    out = {}
    for name in ("scrl_instant_test.yaml", "byol_instant_test.yaml"):
        cfg = _cfg(name, "INPUT.REGIONSSL.CROP_SIZE", str(CROP))
        dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
        _set_seed(3)
        mapper = RegionSSLDatasetMapper(cfg, dataset_dicts=dicts)
        batch = [m for m in (mapper(d) for d in dicts) if m is not None][:2]
        assert len(batch) == 2
        out[name] = batch
    return out


# ------------------------------------------------------------------------------------------ loss
def test_symmetric_regression_on_known_tensors():
    model = build_model(_tiny_cfg("byol_instant_test.yaml"))
    # row 0: p1 _|_ z2 -> l = 2; p2 at 45 deg to z1 -> l = 2 - sqrt(2)
    # row 1: p1 // z2 (scaled) -> l = 0; p2 opposite z1 -> l = 4
    p1 = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    z2 = torch.tensor([[0.0, 3.0], [1.0, 1.0]])
    p2 = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    z1 = torch.tensor([[5.0, 0.0], [0.0, -2.0]])
    with EventStorage(0) as storage:
        loss = model.symmetric_regression(p1, p2, z1, z2)
        pos_sim = storage.latest()["regionssl/pos_sim"][0]
    expected = ((2.0 + (2 - math.sqrt(2))) + (0.0 + 4.0)) / 2  # directions summed, rows averaged
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # mean cosine of the 4 (prediction, target) pairs: (0 + 1/sqrt2 + 1 - 1) / 4
    assert pos_sim == pytest.approx((1 / math.sqrt(2)) / 4, abs=1e-6)

    # random rows: || p/|p| - z/|z| ||^2 summed over both directions, averaged over rows
    g = torch.Generator().manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(7, 5, generator=g) for _ in range(4))
    n = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    direct = (((n(p1) - n(z2)) ** 2).sum(1) + ((n(p2) - n(z1)) ** 2).sum(1)).mean()
    assert model.symmetric_regression(p1, p2, z1, z2).item() == pytest.approx(direct.item(), rel=1e-5)


def test_heads_follow_byol():
    model = build_model(_tiny_cfg("scrl_instant_test.yaml"))
    for head, d_in in ((model.projector, 512), (model.predictor, 16)):
        assert isinstance(head, MLP)
        assert head[0].in_features == d_in and head[0].out_features == 32 and head[0].bias is not None
        assert isinstance(head[1], torch.nn.SyncBatchNorm)  # NORM "SyncBN" in the configs
        assert head[-1].out_features == 16 and head[-1].bias is None  # last layer without bias
    # the target starts as a copy of the online encoder and projector
    online = dict(model.named_parameters())
    for name, p in model.momentum.named_parameters():
        assert not p.requires_grad
        assert torch.equal(p, online[name]), name
    assert set(model.momentum.keys()) == {"backbone", "projector"}


def test_naive_sync_bn_1d_equals_bn_in_one_process():
    x = torch.randn(6, 4)
    a, b = torch.nn.BatchNorm1d(4).train(), NaiveSyncBatchNorm1d(4).train()
    assert torch.allclose(a(x), b(x), atol=1e-6)
    assert torch.allclose(a.running_mean, b.running_mean) and torch.allclose(a.running_var, b.running_var)
    assert set(a.state_dict()) == set(b.state_dict())


def test_cpu_multiprocess_turns_head_syncbn_naive():
    cfg = _cfg("scrl_instant_test.yaml")
    adapt_to_machine(cfg, world_size=2)
    assert cfg.MODEL.REGIONSSL.PROJECTOR.NORM == "naiveSyncBN"
    assert cfg.MODEL.RESNETS.NORM == "naiveSyncBN"


# ------------------------------------------------------------------------------------------ gradients & EMA
def _snapshot(params):
    return {k: v.detach().clone() for k, v in params}


@pytest.mark.parametrize("config", ["scrl_instant_test.yaml", "byol_instant_test.yaml"])
def test_gradients_reach_online_only_and_ema_follows_formula(config):
    _set_seed(0)
    model = build_model(_tiny_cfg(config))
    model.train()
    batch = _synthetic_batch()
    online_names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any(n.startswith("momentum.") for n in online_names)
    assert all(not p.requires_grad for p in model.momentum.parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)

    with EventStorage(0) as storage:
        model.before_step(0)  # what the trainer's ModelStepHook does around every step
        target_before = _snapshot(model.momentum.named_parameters())
        losses = model(batch)
        assert list(losses) == [f"loss_{model.loss_name}"]
        loss = losses[f"loss_{model.loss_name}"]
        assert torch.isfinite(loss) and 0 <= loss.item() <= 8
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        for prefix in ("backbone.stem.", "backbone.res5.", "projector.", "predictor."):
            assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix)), prefix
        assert all(p.grad is None for p in model.momentum.parameters())
        opt.step()
        # neither the forward nor the optimizer touch the target
        for name, p in model.momentum.named_parameters():
            assert torch.equal(p, target_before[name]), name
        assert storage.latest()["regionssl/num_pairs"][0] == (2 if model.is_global else 4)

        # iteration k: after the optimizer step, the EMA with tau_k (official order)
        k = 37
        storage.iter = k
        model.before_step(k)
        opt.zero_grad()
        sum(model(batch).values()).backward()
        opt.step()
        xi = _snapshot(model.momentum.named_parameters())
        theta = _snapshot(model.named_parameters())
        model.after_step()
        tau = momentum_at(k, 100, 0.97, "cosine")
        for name, p in model.momentum.named_parameters():
            torch.testing.assert_close(p, tau * xi[name] + (1 - tau) * theta[name], rtol=1e-5, atol=1e-6)
        assert storage.latest()["regionssl/momentum"][0] == pytest.approx(tau)


def test_ema_schedule_start_middle_end():
    model = build_model(_tiny_cfg("scrl_instant_test.yaml", "SOLVER.MAX_ITER", "200"))
    expected = {  # after optimizer step k: tau_k = 1 - (1 - 0.97)(cos(pi k/200) + 1)/2
        0: 0.97,  # start: tau_0 = tau_base
        100: 1 - 0.03 * 0.5,  # middle: cos(pi/2) = 0
        200: 1.0,  # end: tau_K = 1
        150: 1 - 0.03 * (math.cos(math.pi * 150 / 200) + 1) / 2,
    }
    for k, tau in expected.items():
        model.before_step(k)
        assert model.current_momentum() == pytest.approx(tau, abs=1e-12)


def test_resume_reproduces_the_uninterrupted_target():
    """Steps 0..2 in one go == steps 0..1, checkpoint, fresh model, step 2 (started at iteration 2)."""
    cfg = _tiny_cfg("scrl_instant_test.yaml", "SOLVER.MAX_ITER", "4")
    batch = _synthetic_batch()

    def run(model, start, stop):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        with EventStorage(start) as storage:
            for it in range(start, stop):
                storage.iter = it
                model.before_step(it)  # the trainer's ModelStepHook
                opt.zero_grad()
                sum(model(batch).values()).backward()
                opt.step()
                model.after_step()

    _set_seed(0)
    a = build_model(cfg).train()
    state0 = {k: v.clone() for k, v in a.state_dict().items()}
    run(a, 0, 3)
    b = build_model(cfg).train()
    b.load_state_dict(state0)
    run(b, 0, 2)
    c = build_model(cfg).train()
    c.load_state_dict(b.state_dict())  # "resume" from the iteration-1 checkpoint
    run(c, 2, 3)
    for (name, pa), pc in zip(a.momentum.state_dict().items(), c.momentum.state_dict().values()):
        torch.testing.assert_close(pa, pc, rtol=0, atol=0, msg=name)
    # and the target did move: EMA updates after steps 0, 1 and 2 with tau < 1. A target tensor can
    # only move where its online twin moved (a bias in front of a BatchNorm has a float-noise
    # gradient and may not move at all, depending on the CPU); every conv/linear weight must move.
    online = dict(a.named_parameters())
    for n, p in a.momentum.named_parameters():
        target_moved = not torch.equal(state0["momentum." + n], p)
        online_moved = not torch.equal(state0[n], online[n])
        assert online_moved or not target_moved, n
        if p.dim() > 1:
            assert target_moved, n


@pytest.mark.slow
def test_trainer_resume_with_the_cosine_ema_is_bit_exact(tmp_path):
    """Through PretrainTrainer and its hooks (iteration before the step, EMA after the optimizer step
    and before the checkpointer): BYOL, 4 steps in one go == 2 steps, preempted right after the
    checkpoint, a new trainer resumed for the other 2. The cosine tau changes every step."""
    from detectron2.utils.env import seed_all_rng

    def trainer(out):
        seed_all_rng(0)  # as train_net's default_setup does with SEED 0
        cfg = _tiny_cfg("byol_instant_test.yaml", "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2",
                        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out))
        return PretrainTrainer(cfg)

    uninterrupted = trainer(tmp_path / "a")
    start = {k: v.clone() for k, v in uninterrupted.model.state_dict().items()}
    uninterrupted.train()
    first = trainer(tmp_path / "b")
    first.register_hooks([Interrupt(1)])
    with pytest.raises(Interrupt.Stop):
        first.train()
    second = trainer(tmp_path / "b")
    second.resume_or_load(resume=True)
    assert second.start_iter == 2
    second.train()
    expected, final = uninterrupted.model.state_dict(), second.model.state_dict()
    for key, value in expected.items():
        assert torch.equal(final[key], value), key
    moved = [k for k, v in expected.items() if k.startswith("momentum.") and v.dim() > 1 and not torch.equal(v, start[k])]
    assert moved  # the EMA did run


# ------------------------------------------------------------------------------------------ few boxes
def test_single_box_and_no_box_batches():
    _set_seed(0)
    model = build_model(_tiny_cfg("scrl_instant_test.yaml")).train()
    one = _synthetic_batch(n=1, boxes_per_image=1)  # 1 pair: the heads' BN sees 2 rows (both views)
    with EventStorage(0):
        loss = model(one)["loss_scrl"]
        assert torch.isfinite(loss)
        loss.backward()
    none = _synthetic_batch(n=2, boxes_per_image=1)
    for d in none:
        d["valid"][:] = False
    with EventStorage(1):
        loss = model(none)["loss_scrl"]
        assert loss.item() == 0.0
        loss.backward()  # no crash; zero gradient
    invalid = _synthetic_batch(n=2, boxes_per_image=3)  # invalid rows are dropped in both views
    invalid[0]["valid"][1] = False
    with EventStorage(2) as storage:
        model(invalid)
        assert storage.latest()["regionssl/num_pairs"][0] == 5


# ------------------------------------------------------------------------------------------ SCRL boxes
def _views(box_a, box_b, size=96, flips=(False, False), image_hw=(300, 400)):
    image = np.zeros((*image_hw, 3), dtype=np.uint8)
    return [_crop_view(image, b, size, 2, f) for b, f in zip((box_a, box_b), flips)]  # 2 = PIL bilinear


def _sampler(**kw):
    args = dict(max_boxes=10, min_size=32, iou_threshold=0.5, max_tries=50)
    args.update(kw)
    return IntersectionBoxes(**args)


def test_intersection_scripted_rejection_and_forced_accept(monkeypatch):
    """Candidates with IoU >= 0.5 to an accepted box are redrawn; after max_tries the last one stays."""
    views = _views((0, 0, 200, 200), (0, 0, 200, 200))  # same view: coarse scale 96/200 = 0.48
    sampler = _sampler(max_boxes=3, max_tries=3)
    # coarse-pixel (start, length) per call, x then y: box A, then A again (IoU 1, rejected), then
    # B (disjoint, accepted), then A three times (forced accept of the third).
    script = [(0, 40), (0, 40), (0, 40), (0, 40), (50, 40), (50, 40)] + [(0, 40), (0, 40)] * 3
    calls = iter(script)
    monkeypatch.setattr(sampler, "_axis_candidate", lambda extent: next(calls))
    boxes = sampler(views).boxes
    with pytest.raises(StopIteration):
        next(calls)  # exactly 1 + 2 + 3 candidates were drawn
    s = 96 / 200
    a, b = np.array([0, 0, 40, 40]) / s, np.array([50, 50, 90, 90]) / s
    np.testing.assert_allclose(boxes, np.stack([a, b, a]), atol=1e-9)


def test_intersection_random_boxes_respect_the_rules():
    _set_seed(0)
    gen = TwoCrops(crop_size=96, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), interp=2, flip_prob=0.5)
    image = np.random.randint(0, 255, (300, 400, 3), dtype=np.uint8)
    sampler = _sampler(min_size=16)
    counts, forced = [], 0
    for _ in range(40):
        views = gen(image)
        boxes = sampler(views).boxes
        counts.append(len(boxes))
        if not len(boxes):
            continue
        assert len(boxes) == 10  # soft rejection: always max_boxes when the intersection is big enough
        iou = box_iou_np(boxes, boxes)
        # each box vs the boxes accepted before it: < 0.5 unless it was a forced accept
        forced += sum((iou[i, :i] >= 0.5).any() for i in range(1, len(boxes)))
        l, t = np.maximum(views[0].source_box[:2], views[1].source_box[:2])
        r, btm = np.minimum(views[0].source_box[2:], views[1].source_box[2:])
        assert (boxes[:, :2] >= [l, t]).all() and (boxes[:, 2:] <= np.array([r, btm]) + 1e-9).all()
        for v in views:  # inside every view, hence never dropped by the mapper
            vb = v.transform.apply_box(boxes)
            assert (vb >= -1e-6).all() and (vb[:, 2:] <= 96 + 1e-6).all()
    assert sum(c > 0 for c in counts) >= 20
    assert forced <= 0.05 * sum(counts)  # rare on large intersections (50 tries)


def test_min_size_is_measured_at_the_coarser_view():
    # view a: 100 px of the original -> 96 px (0.96 px/px); view b: 200 px -> 96 px (0.48, coarser)
    sampler = _sampler()
    # 60 x 60 px intersection: 57.6 px in view a, 28.8 -> 29 <= 32 in view b -> no box
    assert len(sampler(_views((0, 0, 100, 100), (40, 40, 200, 200))).boxes) == 0
    # 70 x 70: 33.6 -> 34 > 32 in view b -> boxes of side >= 32 coarse px (~66.7 original px)
    _set_seed(1)
    views = _views((0, 0, 100, 100), (30, 30, 200, 200), flips=(True, False))
    boxes = sampler(views).boxes
    assert len(boxes) == 10
    side_b = views[1].transform.apply_box(boxes)
    side_b = side_b[:, 2:] - side_b[:, :2]
    # 32 coarse px, less at most half a pixel clipped off at the intersection's far edge
    assert (side_b >= 31.5).all() and (side_b <= 34 + 1e-6).all()


@pytest.mark.parametrize("box_b", [(150, 0, 100, 100), (100, 0, 100, 100), (0, 100, 100, 100)])
def test_disjoint_or_touching_views_give_no_box(box_b):
    assert len(_sampler().__call__(_views((0, 0, 100, 100), box_b)).boxes) == 0


# ------------------------------------------------------------------------------------------ smoke
@pytest.mark.parametrize("config", ["scrl_instant_test.yaml", "byol_instant_test.yaml"])
def test_forward_backward_on_real_mapper_output(config, demo_batches):
    _set_seed(0)
    cfg = _cfg(config, "INPUT.REGIONSSL.CROP_SIZE", str(CROP))
    model = build_model(cfg).train()
    assert type(model) is {"scrl_instant_test.yaml": SCRL, "byol_instant_test.yaml": BYOL}[config]
    batch = demo_batches[config]
    if config.startswith("scrl"):
        assert isinstance(model.encoder, RoIEncoder) and all(d["valid"].any() for d in batch)
        align = model.encoder.pooler.aligners[0]
        assert align.output_size == (1, 1) and align.spatial_scale == 1 / 32 and align.aligned is False
        assert align.sampling_ratio == 0
    with EventStorage(0) as storage:
        losses = model(batch)
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        loss.backward()
        logged = storage.latest()
    for key in ("pos_sim", "emb_std", "num_pairs", "momentum"):
        assert f"regionssl/{key}" in logged
    assert logged["regionssl/num_pairs"][0] == (
        2 if model.is_global else sum(int(d["valid"].sum()) for d in batch)
    )


def test_trainer_uses_lars_without_the_target():
    cfg = _tiny_cfg("scrl_instant_test.yaml")
    model = build_model(cfg)
    opt = PretrainTrainer.build_optimizer(cfg, model)
    assert isinstance(opt, LARS)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in model.momentum.parameters())
    assert all(id(p) in in_opt for p in model.parameters() if p.requires_grad)
    assert {g["lars_exclude"] for g in opt.param_groups} == {True, False}
    assert all(g["weight_decay"] == (0.0 if g["lars_exclude"] else 1e-6) for g in opt.param_groups)


def test_scrl_checkpoint_hands_the_trunk_to_a_detector(tmp_path):
    """SCRL transfers the ResNet only (docs/finetune_protocols.md): every trunk tensor of the FPN detector, online copy."""
    from regionssl.checkpoint import FormatTag, RegionSSLCheckpointer, to_trunk_relative

    model = build_model(_cfg("scrl_instant_test.yaml"))
    with torch.no_grad():  # make the target differ from the online network
        for p in model.momentum.parameters():
            p.add_(1.0)
    RegionSSLCheckpointer(model, str(tmp_path), regionssl=FormatTag("SCRL")).save("model_final")
    det = build_model(_cfg("finetune_coco_mask_rcnn_R_50_FPN_instant_test.yaml"))
    RegionSSLCheckpointer(det).load(str(tmp_path / "model_final.pth"))
    pre = {to_trunk_relative(k): v for k, v in model.state_dict().items()
           if not k.startswith("momentum.") and to_trunk_relative(k)}
    got = {to_trunk_relative(k): v for k, v in det.state_dict().items() if to_trunk_relative(k)}
    assert set(pre) == set(got)
    for name, value in pre.items():
        assert torch.equal(got[name], value), name


def _sync_bn_worker(out_dir):
    from detectron2.utils import comm

    rank = comm.get_rank()
    x = torch.arange(24, dtype=torch.float32).view(6, 4) ** 1.5
    bn = NaiveSyncBatchNorm1d(4).train()
    y = bn(x[rank * 3:(rank + 1) * 3].clone().requires_grad_())
    torch.save({"y": y.detach(), "mean": bn.running_mean}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_naive_sync_bn_1d_uses_global_statistics_across_two_processes(tmp_path):
    launch_cpu(_sync_bn_worker, (str(tmp_path),))
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x = torch.arange(24, dtype=torch.float32).view(6, 4) ** 1.5
    ref = torch.nn.BatchNorm1d(4).train()
    expected = ref(x).detach()
    torch.testing.assert_close(torch.cat([o["y"] for o in outs]), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[0]["mean"], ref.running_mean)
