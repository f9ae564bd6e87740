"""Shared contrastive machinery (queues, EMA, shuffle-BN, InfoNCE) and InsLoc / MoCoV2 end to end.

Two-process tests run Detectron2's ``launch`` with gloo on CPU; the workers are module-level
functions that write their results to a file the test then compares.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.engine import HookBase
from detectron2.layers import ROIAlign
from detectron2.modeling import build_model
from detectron2.modeling.poolers import convert_boxes_to_pooler_format
from detectron2.structures import Boxes
from detectron2.utils import comm
from torch import nn

import regionssl  # noqa: F401  (registers models and datasets)
from regionssl.data.build import get_pretrain_dataset_dicts
from regionssl.data.mapper import RegionSSLDatasetMapper
from regionssl.engine import PretrainTrainer
from regionssl.modeling.momentum import ema_update, make_momentum_copy, momentum_at
from regionssl.modeling.shuffle import shuffled_forward, split_forward
from regionssl.modeling.losses import info_nce, info_nce_in_batch
from regionssl.modeling.queues import KeyQueues

from conftest import R18_TRUNK, Interrupt, launch_cpu, qs_cfg

# Tiny views keep every R50 forward/backward to about a second on CPU (FPN needs a multiple of 32).
TINY = ["MODEL.DEVICE", "cpu", "INPUT.REGIONSSL.CROP_SIZE", 64, "INPUT.REGIONSSL.COPY_PASTE.FG_SIZE", [24, 60]]


def _cfg(name, *opts):
    return qs_cfg(name, *TINY, *opts)


def _launch2(fn, out_dir):
    launch_cpu(fn, (str(out_dir),))
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]


# ----------------------------------------------------------------------------- queue
def test_queue_enqueue_wraps_around_with_exact_contents():
    torch.manual_seed(0)
    q = KeyQueues(num_levels=2, dim=3, size=5)
    init = q.queue.clone()
    assert torch.allclose(init.norm(dim=1), torch.ones(2, 5))  # random unit vectors, as MoCo
    a = torch.arange(1.0, 10.0).view(3, 3)  # 3 keys (rows)
    q.enqueue(0, a)
    assert q.ptr.tolist() == [3, 0] and q.fill.tolist() == [3, 0]
    assert torch.equal(q.queue[0][:, :3], a.t()) and torch.equal(q.queue[0][:, 3:], init[0][:, 3:])
    assert torch.equal(q.queue[1], init[1])  # other level untouched
    b = -torch.arange(1.0, 13.0).view(4, 3)  # 4 keys: written at 3, 4, then wrap to 0, 1
    q.enqueue(0, b)
    assert q.ptr.tolist() == [2, 0] and q.fill.tolist() == [5, 0] and q.fill_fraction(0) == 1.0
    expected = torch.stack([b[2], b[3], a[2], b[0], b[1]], dim=1)
    assert torch.equal(q.queue[0], expected)
    c = torch.arange(100.0, 121.0).view(7, 3)  # more keys than K: only the newest 5 stay
    q.enqueue(1, c)
    assert q.ptr.tolist() == [2, 0] and q.fill.tolist() == [5, 5]
    assert torch.equal(q.queue[1], c[2:].t())
    neg = q.negatives(0)
    neg.zero_()  # a copy: the autograd graph of a loss never sees later in-place enqueues
    assert torch.equal(q.queue[0], expected)


# ----------------------------------------------------------------------------- distributed
class _Probe(nn.Module):
    """conv + BN + RoIAlign mean: per-region vectors whose values depend on image and box."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.align = ROIAlign((2, 2), 1.0, 0, True)
        self.seen = []

    def forward(self, images, boxes):
        self.seen.append(images[:, 0, 0, 0].round().long())  # image ids, written in pixel (0, 0, 0)
        x = self.bn(self.conv(images))
        rois = convert_boxes_to_pooler_format([Boxes(b) for b in boxes])
        return self.align(x, rois).flatten(1)


def _dist_worker(out_dir):
    rank = comm.get_rank()
    torch.manual_seed(0)  # identical modules and queue initialisation on both ranks
    queues = KeyQueues(num_levels=2, dim=4, size=16)
    net = _Probe().eval()  # eval: no BN-statistics dependence, so shuffling must be invisible
    keys = torch.arange(12.0).view(3, 4) + 100 * (rank + 1)
    queues.enqueue(1, keys)
    queues.enqueue(1, keys[:1] + 0.5)  # a second write, different count per call

    torch.manual_seed(10 + rank)  # rank-specific data; the permutation comes from rank 0
    n, calls = 3, []
    for _ in range(3):
        images = torch.randn(n, 3, 16, 16)
        images[:, 0, 0, 0] = torch.arange(n) + n * rank  # global image id
        counts = [1, 2, 3] if rank == 0 else [3, 1, 2]  # different R_i per image and rank
        boxes = [torch.tensor([[1.0 + i, 2.0, 9.0 + i, 12.0]]).repeat(c, 1) + torch.rand(c, 4)
                 for i, c in enumerate(counts)]
        net.seen.clear()
        out = shuffled_forward(net, images, boxes)
        seen = net.seen[0].clone()
        calls.append({"out": out, "ref": net(images, boxes), "seen": seen})

    # a real model step with shuffle-BN: MoCo-v2 on ResNet-18, different views on each rank
    cfg = _cfg("mocov2_instant_test.yaml", *R18_TRUNK, "MODEL.REGIONSSL.QUEUE.SIZE", 8)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    rec = {}
    key_embed = model.key_embed

    def spy(*args):
        rec["k"] = key_embed(*args).clone()
        return rec["k"]

    model.key_embed = spy
    torch.manual_seed(20 + rank)
    batch = [{"views": [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8) for _ in range(2)],
              "boxes": [torch.tensor([[0.0, 0.0, 64.0, 64.0]])] * 2, "valid": torch.tensor([True])}
             for _ in range(2)]
    losses = model(batch)

    # no queue (QUEUE.SIZE 0): the negatives are the other keys of the global batch (both ranks)
    cfg0 = _cfg("mocov2_instant_test.yaml", *R18_TRUNK, "MODEL.REGIONSSL.QUEUE.SIZE", 0)
    torch.manual_seed(0)
    model0 = build_model(cfg0).train()
    assert model0.queues is None and not any(k.startswith("queues.") for k in model0.state_dict())
    for name in ("key_embed", "query_embed"):
        def spy(*args, _fn=getattr(model0, name), _name=name):
            rec[_name] = _fn(*args)
            return rec[_name]
        setattr(model0, name, spy)
    loss0 = model0(batch)["loss_contrast_global"]
    torch.save({"queue": queues.queue, "ptr": queues.ptr, "fill": queues.fill, "keys": keys, "calls": calls,
                "model_queue": model.queues.queue, "model_ptr": model.queues.ptr, "model_keys": rec["k"],
                "loss": {k: float(v) for k, v in losses.items()},
                "in_batch": {"q": rec["query_embed"][0].detach(), "k": rec["key_embed"][0], "loss": loss0.detach()}},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_processes_queues_and_shuffle_bn(tmp_path):
    r0, r1 = _launch2(_dist_worker, tmp_path)
    # identical queues holding both ranks' keys, in rank order
    assert torch.equal(r0["queue"], r1["queue"]) and torch.equal(r0["ptr"], r1["ptr"])
    written = torch.cat([r0["keys"], r1["keys"], r0["keys"][:1] + 0.5, r1["keys"][:1] + 0.5])
    assert torch.equal(r0["queue"][1][:, :8], written.t())
    assert r0["ptr"].tolist() == [0, 8] and r0["fill"].tolist() == [0, 8]
    # shuffled_forward: per-rank outputs equal the unshuffled ones (eval mode), and each call's
    # images are a permutation of all 6 images spread over the ranks
    crossed = False
    for c0, c1 in zip(r0["calls"], r1["calls"]):
        for c in (c0, c1):
            assert c["out"].shape == c["ref"].shape == (6, 16)
            torch.testing.assert_close(c["out"], c["ref"], rtol=1e-5, atol=1e-6)
        seen = torch.cat([c0["seen"], c1["seen"]])
        assert sorted(seen.tolist()) == list(range(6)) and len(c0["seen"]) == len(c1["seen"]) == 3
        crossed |= sorted(c0["seen"].tolist()) != [0, 1, 2]
    assert crossed, "the key batch was never shuffled across processes"
    # model step: identical queues containing both processes' keys
    assert torch.equal(r0["model_queue"], r1["model_queue"]) and r0["model_ptr"].tolist() == [4]
    both = torch.cat([r0["model_keys"][0], r1["model_keys"][0]])  # (4, 128)
    torch.testing.assert_close(r0["model_queue"][0][:, :4], both.t())
    assert all(math.isfinite(v) for r in (r0, r1) for v in r["loss"].values())
    # in-batch negatives: each rank's query i is scored against all 4 keys of both ranks, its own
    # key (global row 2 * rank + i) positive, the other 3 negatives (T = 0.2)
    keys = torch.cat([r0["in_batch"]["k"], r1["in_batch"]["k"]])  # (4, 128)
    for rank, r in enumerate((r0, r1)):
        logits = r["in_batch"]["q"] @ keys.t() / 0.2  # (2, 4)
        expected = F.cross_entropy(logits, torch.tensor([2 * rank, 2 * rank + 1]))
        torch.testing.assert_close(r["in_batch"]["loss"], expected, rtol=1e-5, atol=1e-6)


def test_one_process_split_and_shuffle():
    """BN_SPLITS in one process: groups see only their images (per-group BN statistics); the
    shuffled key batch is routed back to input order."""
    torch.manual_seed(0)
    net = _Probe()
    images = torch.randn(6, 3, 16, 16)
    images[:, 0, 0, 0] = torch.arange(6.0)
    boxes = [torch.tensor([[1.0, 2.0, 9.0, 12.0]]).repeat(c, 1) + torch.rand(c, 4) for c in [1, 2, 3, 1, 2, 3]]
    net.train()  # batch statistics: group outputs equal separate calls on each group
    with torch.no_grad():
        split = split_forward(net, images, boxes, splits=2)
        torch.testing.assert_close(split, torch.cat([net(images[:3], boxes[:3]), net(images[3:], boxes[3:])]))
        per_level = [boxes, [b + 1 for b in boxes]]  # a per-level list of per-image lists is split too
        assert split_forward(lambda im, bx: torch.stack([net(im, b) for b in bx]), images, per_level, 3, dim=1).shape == (2, 12, 16)
        net.eval()  # no statistics dependence: the shuffle must be invisible
        net.seen.clear()
        out = shuffled_forward(net, images, boxes, splits=2)
        torch.testing.assert_close(out, net(images, boxes))
    seen = torch.cat(net.seen[:2])
    assert [len(x) for x in net.seen[:2]] == [3, 3] and sorted(seen.tolist()) == list(range(6))
    assert shuffled_forward(net, images, boxes).shape == (12, 16)  # splits=1: plain call


# ----------------------------------------------------------------------------- EMA / momentum
def test_ema_update_momentum_zero_copies_and_one_freezes():
    torch.manual_seed(0)
    online = {"a": nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), "b": nn.Linear(4, 2)}
    target = make_momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    with torch.no_grad():
        for m in online.values():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    ema_update(online, target, 1.0)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    ema_update(online, target, 0.0)
    for name, mod in online.items():
        for p, t in zip(mod.parameters(), target[name].parameters()):
            assert torch.equal(p, t)
    # BN running statistics are the target's own (not averaged), as in MoCo/BYOL
    assert torch.equal(target["a"][1].running_mean, before["a.1.running_mean"])
    ema_update(online, target, 0.25)  # target = online now, so any m keeps it equal
    for p, t in zip(online["b"].parameters(), target["b"].parameters()):
        torch.testing.assert_close(p, t)


@pytest.mark.parametrize("base", [0.0, 1.0])
def test_model_update_momentum(base):
    torch.manual_seed(0)
    model = build_model(_cfg("mocov2_instant_test.yaml", *R18_TRUNK, "MODEL.REGIONSSL.MOMENTUM.BASE", base))
    with torch.no_grad():
        for p in model.projector.parameters():
            p.mul_(2.0).add_(1.0)
        model.backbone.stem.conv1.weight.add_(1.0)
    before = {k: v.clone() for k, v in model.momentum.state_dict().items()}
    assert model.update_momentum() == base
    online = dict(model.named_parameters())
    for k, v in model.momentum.named_parameters():
        assert torch.equal(v, online[k] if base == 0.0 else before[k]), k


def test_momentum_at_constant_and_cosine():
    assert momentum_at(0, 100, 0.999, "constant") == momentum_at(73, 100, 0.999, "constant") == 0.999
    assert momentum_at(0, 100, 0.99, "cosine") == pytest.approx(0.99)
    assert momentum_at(50, 100, 0.99, "cosine") == pytest.approx(0.995)
    assert momentum_at(100, 100, 0.99, "cosine") == pytest.approx(1.0)
    assert momentum_at(25, 100, 0.99, "cosine") == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    with pytest.raises(ValueError):
        momentum_at(0, 100, 0.99, "linear")


# ----------------------------------------------------------------------------- InfoNCE
def test_info_nce_hand_numbers():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    negatives = torch.eye(2)  # (D, K): columns are the negatives
    loss, logits = info_nce(q, k, negatives, temperature=0.5)
    # row 0: logits (0.6, 1, 0) / 0.5 -> log(e^1.2 + e^2 + 1) - 1.2; row 1: (1, 0, 1) / 0.5
    expected_rows = [math.log(math.exp(1.2) + math.exp(2.0) + 1.0) - 1.2, math.log(2 * math.exp(2.0) + 1.0) - 2.0]
    torch.testing.assert_close(logits, torch.tensor([[1.2, 2.0, 0.0], [2.0, 0.0, 2.0]]))
    assert loss.item() == pytest.approx(sum(expected_rows) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(1.0094981146, abs=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, logits16 = info_nce(q.bfloat16(), k.bfloat16(), negatives.bfloat16(), 0.5)
    assert logits16.dtype == torch.float32 and loss16.dtype == torch.float32


def test_info_nce_in_batch_hand_numbers():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])  # (M = 3, D)
    own = torch.tensor([0, 2])  # query 0's key is row 0, query 1's key is row 2
    loss, logits = info_nce_in_batch(q, keys, own, temperature=0.5)
    # row 0: positive 0.6, negatives (1, 0); row 1: positive 1, negatives (0.8, 0); all / 0.5
    torch.testing.assert_close(logits, torch.tensor([[1.2, 2.0, 0.0], [2.0, 1.6, 0.0]]))
    expected_rows = [math.log(math.exp(1.2) + math.exp(2.0) + 1.0) - 1.2,
                     math.log(math.exp(2.0) + math.exp(1.6) + 1.0) - 2.0]
    assert loss.item() == pytest.approx(sum(expected_rows) / 2, abs=1e-6)
    # the same as info_nce with each row's negatives given explicitly
    for i, negs in enumerate((keys[[1, 2]], keys[[0, 1]])):
        li, _ = info_nce(q[i : i + 1], keys[own[i]][None], negs.t(), 0.5)
        assert li.item() == pytest.approx(expected_rows[i], abs=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, logits16 = info_nce_in_batch(q.bfloat16(), keys.bfloat16(), own, 0.5)
    assert logits16.dtype == torch.float32


# ----------------------------------------------------------------------------- end to end
def _real_batch(cfg, n=2):
    dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
    mapper = RegionSSLDatasetMapper(cfg, dataset_dicts=dicts)
    return [mapper(dicts[i]) for i in range(n)]


@pytest.mark.parametrize(
    "config,losses",
    [
        ("insloc_c4_instant_test.yaml", ["loss_contrast_res4"]),
        ("insloc_fpn_instant_test.yaml", [f"loss_contrast_p{i}" for i in range(2, 6)]),
        ("mocov2_instant_test.yaml", ["loss_contrast_global"]),
    ],
)
def test_forward_backward_gradients(config, losses):
    cfg = _cfg(config)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = _real_batch(cfg)
    if "fpn" in config:  # the query's P5 pools the anchor-jittered box, P2-P4 the pasted box
        per_level = model.query_boxes(batch)
        assert len(per_level) == 4 and torch.equal(per_level[0][0], batch[0]["boxes"][0])
        assert torch.equal(per_level[3][0], batch[0]["jittered_boxes"])
    out = model(batch)
    assert sorted(out) == sorted(losses)
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.values())
    sum(out.values()).backward()
    online = [n for n, p in model.named_parameters() if p.requires_grad]
    prefixes = {n.split(".")[0] for n in online}
    assert prefixes == ({"backbone", "projector"} | ({"roi_heads"} if "insloc" in config else set()))
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    for group in prefixes:
        assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith(group + "."))
    momentum = list(model.momentum.parameters())
    assert momentum and all(not p.requires_grad and p.grad is None for p in momentum)
    assert int(model.queues.fill.sum()) == len(model.levels) * len(batch)


class _RecordIters(HookBase):
    def __init__(self):
        self.iters = []

    def before_step(self):
        self.iters.append((self.trainer.iter, self.trainer.model.iteration))


@pytest.mark.slow
def test_resume_restores_queues_pointer_and_momentum_exactly(tmp_path):
    cfg = _cfg("insloc_c4_instant_test.yaml", "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2,
               "SOLVER.IMS_PER_BATCH", 2, "OUTPUT_DIR", str(tmp_path))
    first = PretrainTrainer(cfg)
    first.register_hooks([Interrupt(1)])
    first.resume_or_load(resume=False)
    with pytest.raises(Interrupt.Stop):
        first.train()  # interrupted after iteration 1, i.e. after 2 steps and the checkpoint
    saved = torch.load(os.path.join(str(tmp_path), "model_0000001.pth"), weights_only=False)
    assert saved["iteration"] == 1
    at_stop = first.model.state_dict()
    assert at_stop.keys() == saved["model"].keys()
    assert all(torch.equal(v, saved["model"][k]) for k, v in at_stop.items())

    second = PretrainTrainer(cfg)
    record = _RecordIters()
    second.register_hooks([record])
    second.resume_or_load(resume=True)
    assert second.start_iter == 2
    resumed = second.model.state_dict()
    state_keys = [k for k in saved["model"] if k.startswith(("queues.", "momentum."))]
    assert {"queues.queue", "queues.ptr", "queues.fill"} <= set(state_keys)
    assert any(k.startswith("momentum.roi_heads.res5") for k in state_keys)
    for k, v in saved["model"].items():
        assert torch.equal(resumed[k], v), k
    assert second.model.queues.ptr.tolist() == [4] and second.model.queues.fill.tolist() == [4]
    second.train()
    assert record.iters == [(2, 2), (3, 3)]  # (trainer iteration, model.iteration) of each resumed step
    assert second.model.queues.ptr.tolist() == [8] and second.model.queues.fill.tolist() == [8]
    assert os.path.isfile(os.path.join(str(tmp_path), "model_final.pth"))


# ----------------------------------------------------------------------------- probe
def test_retrieval_accuracy_known_tensors():
    from regionssl.probe import image_tiles, retrieval_accuracy

    a = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.2, 1.0]])
    out = retrieval_accuracy(a, b, image_ids=[0, 0, 1])
    # a -> b: 0 -> 0 (right), 1 -> 0 (same image), 2 -> 1 (other image); b -> a: 0 -> 0, 1 -> 2, 2 -> 2
    assert out["top1_v1_to_v2"] == pytest.approx(1 / 3) and out["top1_v2_to_v1"] == pytest.approx(2 / 3)
    assert out["top1"] == pytest.approx(0.5) and out["image_top1"] == pytest.approx(2 / 3)
    image = torch.arange(7 * 9 * 3).view(7, 9, 3).numpy()
    tiles = image_tiles(image, 2)  # disjoint and covering
    assert [t.shape[:2] for t in tiles] == [(3, 4), (3, 5), (4, 4), (4, 5)]
    assert sorted(v for t in tiles for v in t.reshape(-1).tolist()) == list(range(7 * 9 * 3))


def test_probe_keeps_one_frame_per_clip():
    from regionssl.probe import one_per_group

    clip = [{"file_name": f"f{i}.jpg", "group": "video:clip"} for i in range(5)]
    photos = [{"file_name": "a.jpg", "group": "photo:a"}, {"file_name": "b.jpg"}, {"file_name": "c.jpg"}]
    kept = one_per_group([photos[0]] + clip[:3] + [photos[1]] + clip[3:] + [photos[2]])
    # the clip's middle frame stands for it; records without a group are each their own place
    assert [d["file_name"] for d in kept] == ["a.jpg", "f2.jpg", "b.jpg", "c.jpg"]


def test_run_probe_is_seeded_and_restores_state(monkeypatch):
    import numpy as np
    from regionssl import probe
    from regionssl.probe import run_probe

    monkeypatch.setattr(probe, "PROBE_MIN_GALLERY", 16)  # 4 x 4 tiles of one image keep it fast
    cfg = _cfg("mocov2_instant_test.yaml", *R18_TRUNK, "TEST.REGIONSSL.PROBE_CROP_SIZE", 64, "TEST.REGIONSSL.PROBE_ROUNDS", 1)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    torch.manual_seed(123)
    np.random.seed(123)
    expected = torch.rand(1), np.random.rand()
    torch.manual_seed(123)
    np.random.seed(123)
    first = run_probe(model, cfg, max_images=1)
    assert (torch.rand(1), np.random.rand()) == expected  # the training stream is not perturbed
    assert model.training
    assert first == run_probe(model, cfg, max_images=1)  # same seed -> same regions, same numbers
    assert first["num_regions"] == 16 and first["chance"] == 1 / 16  # 1 image -> 4 x 4 tiles
    assert set(first) >= {"top1", "top1_v1_to_v2", "top1_v2_to_v1", "image_top1", "num_queries"}
    assert 0.0 <= first["top1"] <= 1.0 and first["image_top1"] == 1.0
    # an explicit grid overrides the automatic one: 2 images x 3 x 3 tiles = 18 places per round
    cfg.TEST.REGIONSSL.PROBE_GRID = 3
    gridded = run_probe(model, cfg, max_images=2)
    assert gridded["num_regions"] == 18 and gridded["chance"] == 1 / 18
    assert gridded["num_queries"] == 18 and 0.0 <= gridded["image_top1"] <= 1.0


def test_projector_output_norm_removes_the_shared_direction():
    from regionssl.modeling.heads import MLP

    torch.manual_seed(0)
    plain, normed = MLP(16, 32, 8), MLP(16, 32, 8, out_norm="BN")
    normed.load_state_dict(plain.state_dict(), strict=False)  # same Linear weights
    x = torch.rand(64, 16) + 3.0  # non-negative inputs with a large common part, like pooled ReLU features
    z_plain, z_normed = plain(x), normed(x)
    # MoCo v3's output BN has no scale/shift: per dimension, zero mean and unit (biased) variance
    assert not any(p.requires_grad for p in normed[-1].parameters()) and len(list(normed[-1].parameters())) == 0
    torch.testing.assert_close(z_normed.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    v = z_plain.var(0, unbiased=False)
    torch.testing.assert_close(z_normed.var(0, unbiased=False), v / (v + 1e-5), atol=1e-4, rtol=0)  # BN's eps
    torch.testing.assert_close(z_normed, (z_plain - z_plain.mean(0)) / (z_plain.var(0, unbiased=False) + 1e-5).sqrt(),
                               atol=1e-4, rtol=0)
    # the common direction dominates the plain head's unit embeddings and is gone after the norm
    cos = lambda z: (F.normalize(z, dim=1) @ F.normalize(z, dim=1).t()).mean().item()  # noqa: E731
    assert cos(z_plain) > 0.9 and abs(cos(z_normed)) < 0.05
    assert normed.out_features == plain.out_features == 8
    # the official head (no output norm) keeps exactly its checkpoint keys
    assert list(plain.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
