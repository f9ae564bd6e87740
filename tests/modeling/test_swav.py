"""Tests for the SwAV meta-architecture (regionssl/modeling/meta_arch/swav.py)."""
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.engine import launch
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.events import EventStorage
from torch.nn.parallel import DistributedDataParallel

import regionssl  # noqa: F401
from regionssl.data.build import get_pretrain_dataset_dicts
from regionssl.data.mapper import RegionSSLDatasetMapper
from regionssl.engine import get_regionssl_cfg
from regionssl.solver import LARS, build_lars_param_groups

from conftest import QS

CONFIG = os.path.join(QS, "swav_instant_test.yaml")


def _cfg(*opts):
    base = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN", "MODEL.REGIONSSL.PROJECTOR.NORM", "BN",
            "MODEL.REGIONSSL.SWAV.NUM_PROTOTYPES", "20",
            "INPUT.REGIONSSL.MULTI_CROP.SIZES", "[32, 16]"]
    return get_regionssl_cfg(CONFIG, base + list(opts))


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return META_ARCH_REGISTRY.get("SwAV")(cfg).train()


def _batch(cfg, n=2, seed=0):
    np.random.seed(seed)
    random.seed(seed)
    dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
    mapper = RegionSSLDatasetMapper(cfg, dataset_dicts=dicts)
    out = [mapper(d) for d in dicts[:n]]
    assert all(o is not None for o in out)
    return out


def _official_sinkhorn(out, epsilon, num_iters):
    """One-process re-implementation of the official ``distributed_sinkhorn`` (float64)."""
    Q = torch.exp(out.double() / epsilon).t()  # (K, B)
    K, B = Q.shape
    Q /= Q.sum()
    for _ in range(num_iters):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    return (Q * B).t().float()


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _step(model, z, it):
    model.iteration = it  # what the trainer's ModelStepHook sets before step ``it``
    with EventStorage(it):
        return model.swapped_prediction(z)


# ------------------------------------------------------------------ loss and prototypes
def test_loss_equals_direct_computation():
    cfg = _cfg("MODEL.REGIONSSL.SWAV.FREEZE_PROTOTYPES_ITERS", "3", "MODEL.REGIONSSL.SWAV.QUEUE_LENGTH", "0")
    model = _model(cfg)
    V, N, tau = 4, 6, 0.1
    z = _unit(V, N, 128, seed=1).requires_grad_()  # stands in for the encoder output
    model.iteration = 5
    with EventStorage(5):  # not frozen: the gradient reaches the prototypes
        loss, codes = model.swapped_prediction(z)
        loss.backward()
    C = model.prototypes.weight.detach()
    torch.testing.assert_close(C.norm(dim=1), torch.ones(20))  # unit rows from construction on
    ref, ref_codes = 0.0, []
    for s in (0, 1):
        q = _official_sinkhorn(z[s] @ C.t(), 0.05, 3)
        ref_codes.append(q)
        sub = sum(-(q * F.log_softmax(z[v] @ C.t() / tau, dim=1)).sum(dim=1).mean() for v in range(V) if v != s)
        ref += sub / (V - 1)
    ref /= 2
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for q, r in zip(codes, ref_codes):
        torch.testing.assert_close(q, r, atol=1e-6, rtol=1e-4)
    assert model.prototypes.weight.grad is not None and model.prototypes.weight.grad.abs().sum() > 0
    model.prototypes.weight.grad = None
    model.iteration = 2
    with EventStorage(2):  # frozen: scores use C.detach(), the weight gets no gradient at all
        loss2, _ = model.swapped_prediction(z)
        loss2.backward()
    assert model.prototypes.weight.grad is None
    torch.testing.assert_close(loss2, loss)


def test_training_steps_prototypes_unit_frozen_then_moving():
    """Real forward/backward/LARS steps (recipe: lr 0.6, wd 1e-6, nothing excluded): the prototypes
    are unit rows after each step's normalisation, do not move while frozen (no weight decay
    either), and move once unfrozen."""
    cfg = _cfg("MODEL.REGIONSSL.SWAV.FREEZE_PROTOTYPES_ITERS", "1")
    model = _model(cfg)
    batch = _batch(cfg)
    opt = LARS(build_lars_param_groups(model, 0.6, 1e-6, False), lr=0.6, momentum=0.9, eta=1e-3)
    w0 = model.prototypes.weight.detach().clone()
    for it in range(2):
        model.before_step(it)  # the trainer's ModelStepHook: iteration, prototype normalisation
        with EventStorage(it):
            losses = model(batch)
        assert set(losses) == {"loss_swav"} and torch.isfinite(losses["loss_swav"])
        w_step = model.prototypes.weight.detach().clone()
        torch.testing.assert_close(w_step.norm(dim=1), torch.ones(20), atol=1e-6, rtol=0)
        opt.zero_grad()
        losses["loss_swav"].backward()
        opt.step()
        w_after = model.prototypes.weight.detach()
        if it < 1:
            assert model.prototypes.weight.grad is None
            torch.testing.assert_close(w_after, w0, atol=1e-7, rtol=0)
        else:
            assert torch.isfinite(model.prototypes.weight.grad).all()
            assert (w_after - w_step).abs().max() > 1e-5


def test_forward_backward_two_plus_six_crops():
    cfg = _cfg("INPUT.REGIONSSL.MULTI_CROP.NUM_CROPS", "[2, 6]")
    model = _model(cfg)
    batch = _batch(cfg)
    assert len(batch[0]["views"]) == 8 and batch[0]["views"][2].shape[-1] == 16
    model.before_step(10)
    with EventStorage(10) as storage:
        losses = model(batch)
        losses["loss_swav"].backward()
        logged = {k: v[0] for k, v in storage.latest().items()}
    assert set(losses) == {"loss_swav"} and torch.isfinite(losses["loss_swav"])
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    assert model.backbone.stem.conv1.weight.grad.abs().sum() > 0
    assert logged["regionssl/num_crops"] == 8
    assert 0 < logged["regionssl/code_entropy"] <= math.log(20) + 1e-5
    assert logged["regionssl/emb_std"] > 0 and logged["regionssl/prototypes_frozen"] == 0


def test_region_variant_forward_backward():
    cfg = _cfg(
        "MODEL.REGIONSSL.SWAV.REGION", "True", "INPUT.REGIONSSL.REGION_SAMPLER", "IntersectionBoxes",
        "INPUT.REGIONSSL.INTERSECTION.MIN_SIZE", "16", "MODEL.REGIONSSL.ROI.POOLER_RESOLUTION", "1",
        "MODEL.REGIONSSL.ROI.ALIGNED", "False", "INPUT.REGIONSSL.MULTI_CROP.SIZES", "[64, 16]",
    )
    model = _model(cfg)
    batch = _batch(cfg)
    model.before_step(10)
    with EventStorage(10) as storage:
        losses = model(batch)
        total = sum(losses.values())
        total.backward()
        num_pairs = storage.history("regionssl/num_pairs").latest()
    assert set(losses) == {"loss_swav", "loss_swav_region"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert num_pairs == sum(int(d["valid"].sum()) for d in batch) >= 2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------ queue
QUEUE_OPTS = ("MODEL.REGIONSSL.SWAV.QUEUE_LENGTH", "6", "MODEL.REGIONSSL.SWAV.QUEUE_START_ITER", "2")


def test_queue_start_fifo_and_use():
    model = _model(_cfg(*QUEUE_OPTS))
    C = model.prototypes.weight.detach()
    zs = [_unit(3, 3, 128, seed=10 + t) for t in range(5)]  # V = 3 crops, N = 3 images
    for t, z in enumerate(zs):
        before = model.queue.clone()
        _, codes = _step(model, z, t)
        for i, s in enumerate((0, 1)):
            out = z[s] @ C.t()
            if t == 4:  # full since t = 3: the queue's scores join the Sinkhorn problem
                out = torch.cat([before[i] @ C.t(), out])
            torch.testing.assert_close(codes[i], _official_sinkhorn(out, 0.05, 3)[-3:], atol=1e-6, rtol=1e-4)
        if t < 2:
            assert int(model.queue_fill) == 0 and not model.queue.any()
    # FIFO, newest first: after t = 2, 3, 4 (length 6 = two batches) it holds z_4 then z_3.
    assert int(model.queue_fill) == 6
    for i, s in enumerate((0, 1)):
        torch.testing.assert_close(model.queue[i], torch.cat([zs[4][s], zs[3][s]]), atol=0, rtol=0)


def test_queue_resume_is_exact():
    cfg = _cfg(*QUEUE_OPTS)
    a = _model(cfg, seed=0)
    zs = [_unit(3, 3, 128, seed=20 + t) for t in range(6)]
    for t in range(5):
        _step(a, zs[t], t)
    b = _model(cfg, seed=1)  # different random prototypes before loading
    b.load_state_dict(a.state_dict())
    assert int(b.queue_fill) == 6 and torch.equal(b.queue, a.queue)
    loss_a, codes_a = _step(a, zs[5], 5)
    loss_b, codes_b = _step(b, zs[5], 5)
    assert torch.equal(loss_a, loss_b) and all(torch.equal(x, y) for x, y in zip(codes_a, codes_b))
    assert torch.equal(a.queue, b.queue)
    fresh = _model(cfg, seed=0)  # same prototypes, empty queue: different codes
    _, codes_fresh = _step(fresh, zs[5], 5)
    assert not torch.allclose(codes_fresh[0], codes_a[0])


# ------------------------------------------------------------------ two processes
TWO_PROC_OPTS = ("MODEL.REGIONSSL.SWAV.QUEUE_LENGTH", "8", "MODEL.REGIONSSL.SWAV.QUEUE_START_ITER", "1",
                 "MODEL.REGIONSSL.SWAV.FREEZE_PROTOTYPES_ITERS", "5")


def _two_process_worker(zs, prototypes, out_dir):
    rank = dist.get_rank()
    model = _model(_cfg(*TWO_PROC_OPTS))
    with torch.no_grad():
        model.prototypes.weight.copy_(prototypes)
    result = {"codes": [], "loss": []}
    for t, z in enumerate(zs):
        loss, codes = _step(model, z[:, rank * 2 : (rank + 1) * 2], t)  # this rank's 2 of 4 images
        result["codes"].append(torch.stack(codes))
        result["loss"].append(loss.detach())
    result["queue"], result["fill"] = model.queue.clone(), int(model.queue_fill)
    # DDP of the real model (naiveSyncBN across the 2 CPU processes, the projector's too): while
    # frozen the prototypes get no gradient at all (grad None -> the optimizer skips them).
    cfg = _cfg("MODEL.RESNETS.NORM", "naiveSyncBN", "MODEL.REGIONSSL.PROJECTOR.NORM", "naiveSyncBN",
               "MODEL.REGIONSSL.SWAV.FREEZE_PROTOTYPES_ITERS", "1",
               "INPUT.REGIONSSL.MULTI_CROP.SIZES", "[32, 16]")
    ddp = DistributedDataParallel(_model(cfg), find_unused_parameters=True)
    g = torch.Generator().manual_seed(rank)
    batch = [{"views": [torch.randint(0, 255, (3, s, s), dtype=torch.uint8, generator=g) for s in (32, 32, 16, 16)]}
             for _ in range(2)]
    grads = []
    for it in range(2):
        ddp.module.before_step(it)
        with EventStorage(it):
            loss = ddp(batch)["loss_swav"]
        ddp.zero_grad(set_to_none=True)
        loss.backward()
        grads.append(ddp.module.prototypes.weight.grad)
    result["projector_norm"] = type(ddp.module.projector[1]).__name__
    result["frozen_grad_is_none"] = grads[0] is None
    result["unfrozen_grad"] = grads[1]
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_processes_share_the_queue_and_equal_one_process(tmp_path):
    zs = [_unit(3, 4, 128, seed=30 + t) for t in range(4)]  # global batch of 4 images per step
    single = _model(_cfg(*TWO_PROC_OPTS))
    launch(_two_process_worker, 2, dist_url="auto", args=(zs, single.prototypes.weight.detach().clone(), str(tmp_path)))
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # identical global queue on both ranks: written from t = 1 on, used (full) at t = 3
    assert res[0]["fill"] == res[1]["fill"] == 8
    assert torch.equal(res[0]["queue"], res[1]["queue"])
    for i, s in enumerate((0, 1)):  # both processes' embeddings, global order, newest first
        torch.testing.assert_close(res[0]["queue"][i], torch.cat([zs[3][s], zs[2][s]]), atol=0, rtol=0)
    # one process with the whole batch and the same queue: same codes and (mean) loss
    for t, z in enumerate(zs):
        loss, codes = _step(single, z, t)
        two = torch.cat([res[0]["codes"][t], res[1]["codes"][t]], dim=1)  # (|S|, 4, K)
        torch.testing.assert_close(two, torch.stack(codes), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close((res[0]["loss"][t] + res[1]["loss"][t]) / 2, loss.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(single.queue, res[0]["queue"])
    assert res[0]["projector_norm"] == "NaiveSyncBatchNorm1d"
    assert res[0]["frozen_grad_is_none"] and res[1]["frozen_grad_is_none"]
    assert res[0]["unfrozen_grad"] is not None and torch.equal(res[0]["unfrozen_grad"], res[1]["unfrozen_grad"])
