"""Can every method fit two fixed batches? The real model, mapper and optimizer of each method's
instant-test config, trained on two fixed batches of 3 demo photos (alternating), must

* bring each of its losses to a stated fraction of its initial value,
* send gradient from each loss alone to the online backbone (step 0), and move that backbone,
* and not look collapsed or stalled to the guard (``CollapseGuard``) at the end.

A detached query or predictor, a zeroed loss weight or a detached branch fails here (each was
injected once, per method, and failed). The shuffle-BN routing (a wrong unshuffle) is checked exactly by
``test_contrastive.py``: these fits run with BN_SPLITS 1, where nothing is shuffled in one process.

Small but real: ResNet-18 trunk, 64 px views, narrow heads, photometric ops off (the batches are
fixed anyway), constant learning rate, fixed seeds. The MoCo-rule queues hold exactly one batch of
keys, so the negatives of a step are the other batch's images (never stale, never the query's own
photo). ``initial`` is the mean loss of steps 1 and 2 (one step on each batch; at step 0 a queue
still holds random vectors), ``final`` the mean of the last two steps.
"""
import random

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import regionssl  # noqa: F401  (registers models and datasets)
from regionssl.data.build import get_pretrain_dataset_dicts
from regionssl.data.mapper import RegionSSLDatasetMapper
from regionssl.engine import PretrainTrainer, get_regionssl_cfg
from regionssl.engine.hooks import CollapseGuard
from regionssl_workbench.recipes import instant_test, recipes

pytestmark = pytest.mark.slow  # every method trains on two fixed batches

BATCH = 3  # images per batch: the 6 training demo photos make two disjoint batches
SMALL = [
    "MODEL.DEVICE", "cpu",
    "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.REGIONSSL.PROJECTOR.HIDDEN_DIM", 256, "MODEL.REGIONSSL.PREDICTOR.HIDDEN_DIM", 256,
    "INPUT.REGIONSSL.CROP_SIZE", 64, "INPUT.REGIONSSL.PHOTOMETRIC.ENABLED", False,
]
# MoCo rule: one batch of keys in the queue; m = 0.99 so that the keys follow the query encoder
# within a few dozen steps. BN_SPLITS 1: with one-process shuffle-BN over groups of 1-2 images each
# key depends on its random group partners (at initialisation the key of one image under two
# shuffles differs about half as much as the keys of two different images), so the targets are
# noisy and two batches are not fitted within this budget.
MOCO = ["MODEL.REGIONSSL.QUEUE.SIZE", BATCH, "MODEL.REGIONSSL.MOMENTUM.BASE", 0.99, "MODEL.REGIONSSL.BN_SPLITS", 1]
COPY_PASTE = ["INPUT.REGIONSSL.COPY_PASTE.FG_SIZE", [24, 60]]  # pasted boxes that fit a 64 px canvas
# InsLoc-FPN: narrow FPN and box head; lr 0.005 because at 0.01-0.03 (full width) every query
# collapses to one vector within 20 steps (emb_std ~2e-4, loss -> ln(K+1)) while C4 fits at 0.03.
INSLOC_FPN = ["SOLVER.BASE_LR", 0.005, "MODEL.FPN.OUT_CHANNELS", 64, "MODEL.ROI_BOX_HEAD.CONV_DIM", 64,
              "MODEL.ROI_BOX_HEAD.FC_DIM", 256]
# SwAV: 4 prototypes, so that the codes of 3 images can be sharp (with K_c >> batch, Sinkhorn's
# equipartition spreads every code over ~K_c / batch prototypes and the loss cannot fall far).
SWAV = ["MODEL.REGIONSSL.SWAV.NUM_PROTOTYPES", 4, "INPUT.REGIONSSL.MULTI_CROP.SIZES", [64, 32], "SOLVER.BASE_LR", 0.6]
BYOL_LR = ["SOLVER.BASE_LR", 0.5]  # LARS, as the method's config
REGION_ONLY = ["MODEL.REGIONSSL.RESIM.INSTANCE_WEIGHT", 0.0, "MODEL.REGIONSSL.MOMENTUM.BASE", 0.9]

FACTOR = 0.6
# ReSim's region negatives are the key map's positions, some of them overlapping the positive
# window, so its region loss has a floor far above 0: measured 0.48-0.64 x initial in 20-30 steps.
RESIM_REGION = 0.75
# The online backbone must move: ||theta_T - theta_0|| / ||theta_0|| measured 0.06-0.23 over these
# fits; a trunk that gets no gradient (only heads learning the fixed targets) moves by weight decay
# alone, ~1e-5.
MIN_MOVED = 0.01
# Every recipe of the roster (regionssl_workbench.recipes) is fitted from its instant-test config:
# case -> (recipe, extra options, steps, {loss: factor, or None if weighted 0}). A recipe without
# settings here fits with the defaults (its instant-test config, 20 steps, FACTOR for every loss).
CASES = {name: (name, [], 20, {}) for name in recipes()}
CASES.update({
    "insloc_c4": ("insloc_c4", MOCO + COPY_PASTE + ["SOLVER.BASE_LR", 0.03], 20, {}),
    "insloc_fpn": ("insloc_fpn", MOCO + COPY_PASTE + INSLOC_FPN, 40, {}),
    "resim_c4": ("resim_c4", MOCO + ["SOLVER.BASE_LR", 0.03], 30, {"loss_region_res4": RESIM_REGION}),
    "resim_c4_region_only": ("resim_c4", MOCO + ["SOLVER.BASE_LR", 0.03] + REGION_ONLY, 20,
                             {"loss_instance": None, "loss_region_res4": RESIM_REGION}),
    "resim_fpn": ("resim_fpn", MOCO + ["SOLVER.BASE_LR", 0.03], 30,
                  {"loss_region_p4": RESIM_REGION, "loss_region_p3": RESIM_REGION}),
    "resim_fpn_region_only": ("resim_fpn", MOCO + ["SOLVER.BASE_LR", 0.03] + REGION_ONLY, 20,
                              {"loss_instance": None, "loss_region_p4": RESIM_REGION, "loss_region_p3": RESIM_REGION}),
    "scrl": ("scrl", BYOL_LR, 20, {}),
    "swav": ("swav", SWAV, 20, {}),
    "swav_region": ("swav_region", SWAV, 20, {}),
    "cvsa": ("cvsa", BYOL_LR, 20, {}),
    "mocov2": ("mocov2", MOCO + ["SOLVER.BASE_LR", 0.03], 20, {}),
    "byol": ("byol", BYOL_LR, 20, {}),
})
assert {recipe for recipe, *_ in CASES.values()} == set(recipes()), "settings for a recipe that does not exist"


def _seed(s):
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def two_fixed_batches(cfg, seed=0):
    """Mapper output for photos 0-2 and 3-5 of the training demo set (views drawn once)."""
    dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
    assert len(dicts) >= 2 * BATCH, f"{cfg.DATASETS.TRAIN} has {len(dicts)} images, the fit test needs {2 * BATCH}"
    _seed(seed)
    mapper = RegionSSLDatasetMapper(cfg, dataset_dicts=dicts)
    batches = [[mapper(d) for d in dicts[b * BATCH : (b + 1) * BATCH]] for b in range(2)]
    assert all(x is not None for b in batches for x in b), "a demo photo gave no usable view pair"
    return batches


def fit(cfg, steps, seed=0):
    """Train ``build_model(cfg)`` with the trainer's optimizer (constant lr) on two fixed batches,
    alternating; returns the per-step loss dicts (floats), the EventStorage (losses logged as the
    trainer logs them), the model, how far its online backbone moved (||theta_T - theta_0|| / ||theta_0||)
    and, per loss, the norm of its own gradient on the backbone at step 0."""
    batches = two_fixed_batches(cfg, seed)
    _seed(seed)
    model = build_model(cfg).train()
    optimizer = PretrainTrainer.build_optimizer(cfg, model)
    start = [p.detach().clone() for p in model.backbone.parameters()]
    history, reach = [], {}
    with EventStorage(0) as storage:
        for it in range(steps):
            storage.iter = it
            model.before_step(it)  # the trainer's ModelStepHook: schedules (EMA, frozen prototypes) follow it
            losses = model(batches[it % 2])
            if it == 0:  # each loss alone must reach the trunk (a detached branch gives no gradient)
                params = [p for p in model.backbone.parameters() if p.requires_grad]
                for k, v in losses.items():
                    grads = torch.autograd.grad(v, params, retain_graph=True, allow_unused=True) if v.requires_grad else []
                    reach[k] = sum(float(g.norm()) for g in grads if g is not None)
            optimizer.zero_grad()
            total = sum(losses.values())
            if total.requires_grad:  # else nothing trains; the caller reports which loss is cut off
                total.backward()
                optimizer.step()
            model.after_step()  # the trainer's ModelStepHook: EMA of the target after the optimizer step
            history.append({k: float(v.detach()) for k, v in losses.items()})
            storage.put_scalars(total_loss=sum(history[-1].values()), **history[-1])
    moved = sum(float((p.detach() - p0).pow(2).sum()) for p, p0 in zip(model.backbone.parameters(), start))
    return history, storage, model, (moved / sum(float(p0.pow(2).sum()) for p0 in start)) ** 0.5, reach


def fit_case(method, seed=0):
    recipe, opts, steps, _ = CASES[method]
    cfg = get_regionssl_cfg(instant_test(recipe), SMALL + opts)
    return fit(cfg, steps, seed)


@pytest.mark.parametrize("method", list(CASES))
def test_every_loss_falls_on_two_fixed_batches(method):
    history, storage, model, moved, reach = fit_case(method)
    factors = CASES[method][3]
    for key in history[0]:
        initial = (history[1][key] + history[2][key]) / 2
        final = (history[-1][key] + history[-2][key]) / 2
        curve = " ".join(f"{h[key]:.3f}" for h in history)
        factor = factors.get(key, FACTOR)
        if factor is None:
            continue
        assert reach[key] > 0, f"{method}: {key} sends no gradient to the online backbone"
        assert final < factor * initial, (
            f"{method}: {key} went from {initial:.3f} to {final:.3f} (needs < {factor} x initial); curve: {curve}"
        )
    assert moved > MIN_MOVED, f"{method}: the online backbone moved by {moved:.2e} (relative L2), needs > {MIN_MOVED}"
    # The collapse/stall guard reads every signal the model names, and finds this run learning.
    guard = CollapseGuard(start_iter=0)
    last = len(history) - 1
    for signal in model.learning_signals():
        assert signal.loss in history[0], (signal.loss, list(history[0]))
        med = guard.medians(storage, signal, last)
        assert all(med[name] is not None for name in med if getattr(signal, name)), (signal, med)
    assert guard.check(storage, model.learning_signals(), last) == []
