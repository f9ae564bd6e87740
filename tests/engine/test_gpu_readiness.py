"""What only shows on GPUs, checked on CPU: host syncs per step, AMP precision, RNG, buffers, hangs.

* Sync budget: every method's trainer step (``bench/sync_counts.py``, real ``PretrainTrainer``)
  makes a fixed number of host reads of device tensors, with 1 and 2 gloo processes, whatever the
  batch size; the 2-process runs also check that the trainers start with equal state on both ranks
  and train two steps with the chosen ``find_unused_parameters``.
* SwAV's queue scores reach Sinkhorn in fp32 under autocast; the probe reseeds no device RNG;
  a rank without any region pair neither hangs nor diverges; shuffle routing keeps dtypes.
"""
import json
import os
import random
import warnings
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

import regionssl  # noqa: F401
from regionssl.data.build import build_pretrain_train_loader
from regionssl.engine import adapt_to_machine, get_regionssl_cfg
from regionssl.engine.trainer import wrap_ddp
from regionssl.modeling.meta_arch import ContrastiveBase
from regionssl.modeling.shuffle import shuffled_forward
from regionssl_workbench.host_reads import HostReadCounter
from regionssl_workbench.recipes import instant_test, recipes
from regionssl_workbench.scripts import load_script

from conftest import HANG_TIMEOUT, QS, R18_TRUNK, launch_cpu



def _bench():
    """``bench/sync_counts.py`` as a module (loaded again by path in each spawned worker)."""
    return load_script("bench/sync_counts.py")


def expected_reads(recipe, processes):
    """Host reads per training step. Every step reads its losses and logged diagnostics once (one
    stacked copy); a cross-process shuffle-BN (a contrastive model with SHUFFLE_BN) adds one read for
    its plan (the permutation and the box counts together). Nothing depends on the batch size or the boxes."""
    cfg = get_regionssl_cfg(instant_test(recipe))
    arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    shuffles = issubclass(arch, ContrastiveBase) and cfg.MODEL.REGIONSSL.SHUFFLE_BN
    return 1 + int(processes > 1 and shuffles)


BUDGET = {recipe: (expected_reads(recipe, 1), expected_reads(recipe, 2)) for recipe in recipes()}


def _two_process_worker(out_dir):
    """Every two-process check of this file in one launch (spawning costs more than some checks)."""
    bench = _bench()
    budget = {name: bench.measure(name, os.path.join(out_dir, f"{name}{comm.get_rank()}")) for name in BUDGET}
    with open(os.path.join(out_dir, f"budget{comm.get_rank()}.json"), "w") as f:
        json.dump(budget, f)
    _route_check(out_dir)
    _no_pair_check(out_dir)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_processes")
    # timeout: a collective that one rank skips fails within it instead of hanging
    launch_cpu(_two_process_worker, (str(out),), timeout=timedelta(seconds=HANG_TIMEOUT))
    return out


# ----------------------------------------------------------------------------- the counter itself
def test_counter_counts_device_reads_and_not_host_reads():
    host = {"x": torch.arange(4.0), "m": torch.tensor([True, False, True, False])}
    device = torch.arange(4.0).to(torch.device("cpu"))  # made before: stands for a parameter
    with HostReadCounter(host_tensors=host, simulate=True) as c:
        host["x"][host["m"]].tolist()  # host data, host mask: free
        y = host["x"].to(torch.device("cpu"), non_blocking=True)  # now on the "device"
        float(y.sum())  # 1
        y[y > 1]  # 2: mask on the device
        torch.tensor([1, 2], device=y.device)  # 3: blocking copy
        host["x"].to(y.device)  # 4: blocking copy
        device.nonzero()  # 5
        z = device.cpu()  # 6
        z.tolist()  # the host copy: free
        torch.arange(3).tolist()  # host factory: free
    assert c.total == 6, c.where


# ----------------------------------------------------------------------------- sync budget
def _assert_budget(results, processes):
    for name, (one, two) in BUDGET.items():
        counts = [total for _, total, _ in results[name]["counts"]]
        where = [w for _, _, w in results[name]["counts"]]
        assert counts == [one if processes == 1 else two] * 2, (name, processes, where)


def test_sync_budget_one_process():
    bench = _bench()
    _assert_budget(bench.run(list(BUDGET), 1)[0], 1)


@pytest.mark.slow
def test_sync_budget_two_processes_equal_start_and_find_unused_choice(two_process_results):
    """Two gloo processes per method: the budget on both ranks; model state (weights, momentum
    encoders, queues, BN statistics) equal on both ranks at step 0 although each rank built its
    model from a different seed; two DDP steps with the model's find_unused_parameters setting."""
    ranks = [json.loads((two_process_results / f"budget{r}.json").read_text()) for r in range(2)]
    for results in ranks:
        _assert_budget(results, 2)
    for name in BUDGET:
        s0, s1 = ranks[0][name]["state"], ranks[1][name]["state"]
        assert s0.keys() == s1.keys()
        differ = [k for k in s0 if s0[k] != s1[k]]
        assert not differ, (name, differ[:5])


def test_find_unused_parameters_only_for_swav_while_freezing():
    for recipe in recipes():
        cfg = get_regionssl_cfg(instant_test(recipe), ["MODEL.DEVICE", "cpu"] + R18_TRUNK)
        model = build_model(cfg)
        expected = cfg.MODEL.META_ARCHITECTURE == "SwAV" and cfg.MODEL.REGIONSSL.SWAV.FREEZE_PROTOTYPES_ITERS > 0
        assert model.needs_find_unused_parameters() == expected, recipe
    cfg = get_regionssl_cfg(os.path.join(QS, "swav_instant_test.yaml"),
                            ["MODEL.DEVICE", "cpu", "MODEL.REGIONSSL.SWAV.FREEZE_PROTOTYPES_ITERS", 0] + R18_TRUNK)
    assert not build_model(cfg).needs_find_unused_parameters()


# ----------------------------------------------------------------------------- SwAV under AMP
def test_swav_queue_scores_are_fp32_under_autocast(monkeypatch):
    from regionssl.modeling.meta_arch import swav as swav_module

    cfg = get_regionssl_cfg(os.path.join(QS, "swav_instant_test.yaml"), R18_TRUNK + [
        "MODEL.DEVICE", "cpu", "MODEL.REGIONSSL.SWAV.NUM_PROTOTYPES", 30, "MODEL.REGIONSSL.SWAV.QUEUE_LENGTH", 16,
        "MODEL.REGIONSSL.SWAV.QUEUE_START_ITER", 0, "MODEL.REGIONSSL.SWAV.FREEZE_PROTOTYPES_ITERS", 0])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    state = model.state_dict()  # a full queue of unit rows, as a resumed checkpoint has it
    state["queue"], state["queue_fill"] = F.normalize(torch.randn_like(model.queue), dim=-1), torch.tensor(16)
    model.load_state_dict(state)
    seen = []
    real = swav_module.sinkhorn_knopp
    monkeypatch.setattr(swav_module, "sinkhorn_knopp", lambda s, *a, **k: seen.append(s) or real(s, *a, **k))
    z = F.normalize(torch.randn(2, 3, 128), dim=-1)
    queue = model.queue.clone()  # the step writes its batch after taking the scores
    model.iteration = 5
    with EventStorage(5), torch.autocast("cpu", dtype=torch.bfloat16):
        model.swapped_prediction(z)
    C = model.prototypes.weight.detach()
    assert len(seen) == 2
    for i, s in enumerate(seen):
        assert s.dtype == torch.float32 and s.shape == (16 + 3, 30)
        exact = F.linear(queue[i].float(), C.float())
        torch.testing.assert_close(s[:16], exact, rtol=1e-6, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what an autocast product would give
            low = F.linear(queue[i], C).float()
        assert (low - exact).abs().max() > 1e-4  # the check above can tell them apart


# ----------------------------------------------------------------------------- probe RNG
def test_probe_reseeds_and_restores_host_generators_only(monkeypatch):
    from regionssl.probe import _seeded

    touched = []
    for fn in ("manual_seed", "manual_seed_all", "seed", "seed_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, fn, lambda *a, _fn=fn, **k: touched.append(_fn))

    def seed_all(s):
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s)

    def draws():
        return torch.rand(2).tolist(), random.random(), np.random.rand()

    seed_all(7)
    expected = draws()
    seed_all(7)
    touched.clear()  # the test's own seeding reached the (mocked) GPU calls; the probe's must not
    with _seeded(3):
        inside = draws()
    with _seeded(3):
        again = draws()
    assert draws() == expected  # the outer streams continue as if no probe had run
    assert inside == again and inside != expected  # seeded inside
    assert touched == []  # no GPU generator reseeded (or queued to be) by the probe


# ----------------------------------------------------------------------------- loader
def test_pretrain_loader_pins_only_for_cuda(monkeypatch, tmp_path):
    cfg = get_regionssl_cfg(os.path.join(QS, "byol_instant_test.yaml"), ["MODEL.DEVICE", "cpu"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = build_pretrain_train_loader(cfg)
        batch = next(iter(loader))
    assert loader.pin_memory is False and len(batch) == cfg.SOLVER.IMS_PER_BATCH
    assert not [w for w in caught if "pin" in str(w.message).lower()]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg.MODEL.DEVICE = "cuda"
    assert build_pretrain_train_loader(cfg).pin_memory is True  # not iterated: no GPU here


# ----------------------------------------------------------------------------- a rank without pairs
def _no_pair_check(out_dir):
    rank = comm.get_rank()
    cfg = get_regionssl_cfg(os.path.join(QS, "scrl_instant_test.yaml"), R18_TRUNK + [
        "MODEL.DEVICE", "cpu",
        "MODEL.REGIONSSL.PROJECTOR.HIDDEN_DIM", 32, "MODEL.REGIONSSL.PROJECTOR.OUT_DIM", 16,
        "MODEL.REGIONSSL.PREDICTOR.HIDDEN_DIM", 32])
    adapt_to_machine(cfg, 2)  # SyncBN -> naiveSyncBN: backbone, projector and predictor synchronise
    torch.manual_seed(rank)
    model = build_model(cfg).train()
    model = wrap_ddp(model, model.needs_find_unused_parameters())  # the trainer's choice (False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    box = torch.tensor([[2.0, 3.0, 20.0, 25.0], [10.0, 5.0, 30.0, 18.0]])
    batch = [{"views": [torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8) for _ in range(2)],
              "boxes": [box, box], "valid": torch.tensor([rank == 0, rank == 0])} for _ in range(2)]
    losses = []
    for it in range(2):
        model.module.before_step(it)
        with EventStorage(it):
            loss = model(batch)["loss_scrl"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.module.after_step()
        losses.append(float(loss))
    module = model.module
    torch.save({"losses": losses,
                "params": {k: v.detach() for k, v in module.named_parameters()},
                "bn": {k: v for k, v in module.state_dict().items() if "running_mean" in k and ("projector" in k or "predictor" in k)}},
               os.path.join(out_dir, f"no_pair{rank}.pt"))


@pytest.mark.slow
def test_rank_without_pairs_neither_hangs_nor_diverges(two_process_results):
    r0, r1 = (torch.load(two_process_results / f"no_pair{r}.pt") for r in range(2))
    assert all(np.isfinite(r0["losses"])) and min(r0["losses"]) > 0 and r1["losses"] == [0.0, 0.0]
    for k, v in r0["params"].items():  # DDP kept the processes identical
        assert torch.equal(v, r1["params"][k]), k
    assert r0["bn"].keys() == r1["bn"].keys() and len(r0["bn"]) >= 2
    for k, v in r0["bn"].items():  # statistics of rank 0's rows reached rank 1; nothing became NaN
        assert torch.isfinite(v).all() and torch.equal(v, r1["bn"][k]) and v.abs().sum() > 0, k


# ----------------------------------------------------------------------------- shuffle routing
def _route_check(out_dir):
    rank = comm.get_rank()
    g = torch.Generator().manual_seed(rank)
    images = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8, generator=g)
    images[:, 0, 0, 0] = torch.arange(3) + 3 * rank  # global image id
    boxes = [torch.rand(c, 4, generator=g) for c in ([2, 0, 1] if rank == 0 else [1, 3, 2])]
    seen = {}

    def fn(im, bx):  # per box: its image id (fp16) and its coordinates (fp32), and a per-image map
        seen["dtype"], seen["ids"] = im.dtype, im[:, 0, 0, 0].tolist()
        ids = torch.cat([im[i, 0, 0, 0].repeat(len(b)) for i, b in enumerate(bx)])
        return ids.half()[:, None], torch.cat(bx)

    randperm = torch.randperm
    torch.randperm = lambda n, **kw: torch.tensor([4, 0, 5, 1, 3, 2])  # a fixed cross-rank shuffle
    try:
        ids, coords = shuffled_forward(fn, images, boxes)
    finally:
        torch.randperm = randperm
    torch.save({"dtype": seen["dtype"], "seen": seen["ids"], "ids": ids, "coords": coords, "boxes": boxes},
               os.path.join(out_dir, f"route{rank}.pt"))


@pytest.mark.slow
def test_shuffle_routes_rows_back_with_their_dtype(two_process_results):
    res = [torch.load(two_process_results / f"route{r}.pt") for r in range(2)]
    assert [r["seen"] for r in res] == [[4, 0, 5], [1, 3, 2]]  # encoded as the permutation says
    for rank, r in enumerate(res):
        assert r["dtype"] == torch.uint8  # images travel as uint8
        expected_ids = torch.cat([torch.full((len(b), 1), 3 * rank + i) for i, b in enumerate(r["boxes"])])
        assert r["ids"].dtype == torch.float16 and torch.equal(r["ids"].float(), expected_ids.float())
        assert torch.equal(r["coords"], torch.cat(r["boxes"]))  # every box back at its own row
