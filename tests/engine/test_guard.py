"""Collapse/stall guard (``CollapseGuard``, ``TEST.REGIONSSL.GUARD``): synthetic diagnostics through
the hook's own ``after_step``, and real short trainer runs (one that learns, one made to collapse)."""
import logging
import math
import os
from types import SimpleNamespace

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

import regionssl  # noqa: F401  (registers models and datasets)
from regionssl.engine import PretrainTrainer, get_regionssl_cfg
from regionssl.engine.hooks import CollapseGuard, TrainingCollapsed

from conftest import QS as QUICK, launch_cpu, r18_cfg as _cfg

LOGGER = "regionssl.engine.hooks"


@pytest.fixture(scope="module")
def insloc():
    """A real InsLoc-C4 model (K = 32): its learning_signals name what the guard reads."""
    torch.manual_seed(0)
    return build_model(_cfg("insloc_c4_instant_test.yaml"))


HEALTHY = {"loss_contrast_res4": 2.0, "regionssl/emb_std_res4": 0.05, "regionssl/emb_rank_res4": 4.0,
           "regionssl/pos_sim_res4": 0.8, "regionssl/neg_sim_res4": 0.3, "loss_other": 1.0}
# one embedding for every input: std ~0, every logit equal (loss = ln 33), positive = negatives
COLLAPSED = {"loss_contrast_res4": math.log(33), "regionssl/emb_std_res4": 0.002, "regionssl/pos_sim_res4": 0.99,
             "regionssl/neg_sim_res4": 0.99, "loss_other": 1.0}


def _drive(guard, model, values_at, iters):
    """Log ``values_at(it)`` as the trainer and model would, then run the hook, for each iteration."""
    guard.trainer = SimpleNamespace(iter=0, model=model)
    with EventStorage(0) as storage:
        for it in range(iters):
            storage.iter = guard.trainer.iter = it
            storage.put_scalars(**values_at(it))
            guard.after_step()
    return storage


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_insloc_signals(insloc):
    (s,) = insloc.learning_signals()
    assert (s.loss, s.emb_std, s.pos_sim, s.neg_sim, s.emb_rank) == (
        "loss_contrast_res4", "regionssl/emb_std_res4", "regionssl/pos_sim_res4", "regionssl/neg_sim_res4",
        "regionssl/emb_rank_res4")
    assert s.chance == pytest.approx(math.log(33)) and s.dim == 128 and s.weight == 1.0
    assert s.chance_text == "ln(K+1), K = 32 queue negatives"


def test_collapse_warns_once_with_the_numbers(insloc, caplog):
    guard = CollapseGuard(start_iter=40, period=20, window=20, repeat_period=1000, patience=1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _drive(guard, insloc, lambda it: HEALTHY if it < 60 else COLLAPSED, 200)
    (message,) = _warnings(caplog)  # checks at 59 (healthy), 79 (warns), 99..199 (repeats muted); 39 < start
    lines = [line.strip() for line in message.splitlines()]
    assert lines[0] == "regionssl guard: this run is not learning"
    assert lines[1].startswith(
        "COLLAPSED at iteration 79: regionssl/emb_std_res4 = 0.002 is below 0.05 x 1/sqrt(128) = 0.004419: "
        "the embeddings of different inputs are (nearly) one vector.")
    assert lines[2].startswith(
        "STALLED at iteration 79: loss_contrast_res4 = 3.4965 is not below its chance level 3.4965 "
        "(ln(K+1), K = 32 queue negatives) by 0.05")
    assert lines[3].startswith(
        "STALLED at iteration 79: regionssl/pos_sim_res4 - regionssl/neg_sim_res4 = 0.0000 is below 0.01")
    assert "[loss_contrast_res4: loss 3.497, emb_std 0.002, pos_sim 0.99, neg_sim 0.99, chance 3.4965; " \
           "medians over the last 20 iterations]" in lines[1]
    assert len(lines) == 5 and "repeated at most every 1000 iterations" in lines[4]


def test_embedding_rank_exact_values():
    from regionssl.modeling.meta_arch.base import RegionSSLBase as Base

    assert float(Base.embedding_rank(torch.eye(4, 8) * 3.0)) == pytest.approx(4.0)  # orthogonal rows
    v = torch.randn(128, generator=torch.Generator().manual_seed(0))
    signs = torch.tensor([1.0, -1, -1, 1, 1, -1, 1, -1])
    assert float(Base.embedding_rank(signs[:, None] * v)) == pytest.approx(1.0)  # +-v: one line
    # more rows than dimensions: e1, e2 three times each span both directions equally
    assert float(Base.embedding_rank(torch.eye(2).repeat(3, 1))) == pytest.approx(2.0)
    # four rows on one line, four on an orthogonal one: 64 / (16 + 16)
    two_lines = torch.cat([torch.eye(128)[0].expand(4, -1), -torch.eye(128)[1].expand(4, -1)])
    assert float(Base.embedding_rank(two_lines)) == pytest.approx(2.0)
    # R rows with one pairwise cosine c: R / (1 + (R - 1) c^2); e_i + 1 normalised in 3-D: c = 5/6
    rows = torch.eye(3) + 1.0
    assert float(rows[0] @ rows[1] / rows[0].norm() ** 2) == pytest.approx(5 / 6)
    assert float(Base.embedding_rank(rows)) == pytest.approx(3 / (1 + 2 * (5 / 6) ** 2))
    assert Base.embedding_rank(v[None]) is None  # one row: nothing to judge, not logged


def test_output_batchnorm_collapse_is_seen_by_rank_not_std():
    """Every input's embedding is +-v (a MoCo v3 output BN at batch 8, docs/learning.md): after the BN each dimension
    has unit std over the batch, so emb_std looks like uniformly spread vectors; emb_rank is ~1."""
    from regionssl.modeling.meta_arch.base import RegionSSLBase as Base

    g = torch.Generator().manual_seed(0)
    signs = torch.tensor([1.0, -1, -1, 1, 1, -1, 1, -1])
    z = signs[:, None] * torch.randn(128, generator=g) + 0.01 * torch.randn(8, 128, generator=g)
    z = torch.nn.functional.batch_norm(z, None, None, training=True)
    assert float(Base.embedding_std(z)) > 0.9 / math.sqrt(128)  # healthy-looking
    assert float(Base.embedding_rank(z)) < 1.05  # the guard's default threshold
    healthy = torch.nn.functional.batch_norm(torch.randn(8, 128, generator=g), None, None, training=True)
    assert float(Base.embedding_rank(healthy)) > 6


def test_rank_collapse_warns(insloc, caplog):
    guard = CollapseGuard(start_iter=0, period=20, window=20)
    line = {**HEALTHY, "regionssl/emb_rank_res4": 1.02}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _drive(guard, insloc, lambda it: HEALTHY if it < 20 else line, 40)
    (message,) = _warnings(caplog)
    assert message.splitlines()[1].strip() == (
        "COLLAPSED at iteration 39: regionssl/emb_rank_res4 = 1.02 is below 1.05 effective directions: the "
        "embeddings of different inputs lie on (nearly) one line, with either sign. [loss_contrast_res4: loss 2, "
        "emb_std 0.05, emb_rank 1.02, pos_sim 0.8, neg_sim 0.3, chance 3.4965; medians over the last 20 iterations]")


def test_repeat_period_and_recovery(insloc, caplog):
    guard = CollapseGuard(start_iter=0, period=20, window=20, repeat_period=100, patience=1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _drive(guard, insloc, lambda it: COLLAPSED if it < 150 else HEALTHY, 260)
    # collapsed checks at 19, 39, ..., 139 and the mixed window at 159: warned at 19 and 119 only
    assert [m.splitlines()[1].strip().split(":")[0] for m in _warnings(caplog)] == [
        "COLLAPSED at iteration 19", "COLLAPSED at iteration 119"]


def test_stop_raises_at_the_first_check_after_collapse(insloc):
    guard = CollapseGuard(start_iter=40, period=20, window=20, stop=True)
    with pytest.raises(TrainingCollapsed) as err:
        _drive(guard, insloc, lambda it: HEALTHY if it < 60 else COLLAPSED, 200)
    text = str(err.value)
    assert text.startswith("Pretraining stopped by TEST.REGIONSSL.GUARD.STOP:\nCOLLAPSED at iteration 79: ")
    assert "regionssl/emb_std_res4 = 0.002 is below" in text
    assert "STALLED" not in text  # the loss at chance has held at one check, not at the 3 a stall needs


STALL = {**HEALTHY, "loss_contrast_res4": math.log(33)}  # embeddings spread, positives not told apart


def test_a_stall_is_reported_once_it_has_held_at_three_checks(insloc, caplog):
    guard = CollapseGuard(start_iter=0, period=20, window=20)
    assert guard.patience == 3
    # checks at 19 (healthy), 39 (stall), 59 (healthy again: the count restarts), 79, 99, 119 (stall)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _drive(guard, insloc, lambda it: STALL if 20 <= it < 40 or it >= 60 else HEALTHY, 120)
    (message,) = _warnings(caplog)
    assert message.splitlines()[1].strip().startswith(
        "STALLED at iterations 79-119 (3 checks): loss_contrast_res4 = 3.4965 is not below its chance level 3.4965")


# loss_contrast_p5 of InsLoc-FPN's miniature recipe on a plain folder (docs/transfer.md), as the guard read it
# at its checks 399, 419, ..., 639 (the median of each 20-iteration window): P5 learns, noisily, over 7 keys.
FOLDER_P5 = [1.933, 1.870, 1.856, 2.024, 1.995, 1.748, 1.799, 1.497, 2.086, 1.654, 1.779, 1.535, 1.785]


@pytest.mark.parametrize("patience, warned_at", [(1, [559]), (2, []), (3, [])])
def test_one_noisy_window_of_a_learning_level_is_not_a_stall(caplog, patience, warned_at):
    from regionssl.modeling.signals import LearningSignal

    model = SimpleNamespace(learning_signals=lambda: [LearningSignal("loss_contrast_p5", chance=math.log(8))])
    guard = CollapseGuard(start_iter=399, period=20, window=20, patience=patience)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _drive(guard, model, lambda it: {"loss_contrast_p5": FOLDER_P5[max(it - 380, 0) // 20]}, 640)
    assert [int(m.splitlines()[1].split(":")[0].split()[-1]) for m in _warnings(caplog)] == warned_at


def test_healthy_run_with_noisy_steps_stays_silent(insloc, caplog):
    g = torch.Generator().manual_seed(0)

    def noisy(it):
        if it % 37 == 5:  # one collapsed-looking step now and then: the median ignores it
            return COLLAPSED
        jitter = float(torch.rand((), generator=g)) * 0.01
        return {k: v + jitter for k, v in HEALTHY.items()}

    guard = CollapseGuard(start_iter=0, period=20, window=20)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        storage = _drive(guard, insloc, noisy, 300)
    assert _warnings(caplog) == []
    # the guard did read the signals (medians present), and they are healthy
    med = guard.medians(storage, insloc.learning_signals()[0], 299)
    assert all(v is not None for v in med.values())


def test_weighted_loss_and_missing_keys(insloc):
    """The loss is compared as loss / weight; a signal whose keys were never logged is skipped;
    a model's only loss is read from total_loss (Detectron2 does not log it under its own key)."""
    from regionssl.modeling.signals import LearningSignal

    guard = CollapseGuard(start_iter=0, window=4)
    with EventStorage(0) as storage:
        for it in range(4):
            storage.iter = it
            storage.put_scalars(loss_a=0.5 * 2.0, total_loss=3.0)
    half = LearningSignal("loss_a", chance=2.0, chance_text="test", weight=0.5)
    (problem,) = guard.check(storage, [half, LearningSignal("loss_never_logged", chance=1.0, emb_std="x", dim=4)], 3)
    assert problem[:2] == ("stall_chance", "loss_a") and "loss_a / 0.5 = 2.0000 is not below its chance level 2.0000" in problem[2]
    assert guard.check(storage, [LearningSignal("loss_a", chance=2.06, weight=0.5)], 3) == []  # 2.0 < 2.06 - 0.05
    only = LearningSignal("loss_b", chance=3.0)  # absent: read from total_loss = 3.0
    assert guard.medians(storage, only, 3, only_loss=True)["loss"] == 3.0
    assert [p[0] for p in guard.check(storage, [only], 3)] == ["stall_chance"]
    assert guard.medians(storage, only, 3)["loss"] is None


def _two_rank_worker(out_dir):
    """Rank 0 sees a collapse in its storage, rank 1 nothing (the losses are gathered on rank 0):
    with STOP both must raise at the same iteration, or rank 1 would hang in the next collective."""
    from regionssl.modeling.signals import LearningSignal

    signal = LearningSignal("loss_a", emb_std="regionssl/emb_std", dim=128)
    model = SimpleNamespace(learning_signals=lambda: [signal])
    guard = CollapseGuard(start_iter=0, period=5, window=5, stop=True)
    guard.trainer = SimpleNamespace(iter=0, model=model)
    raised = None
    with EventStorage(0) as storage:
        for it in range(20):
            storage.iter = guard.trainer.iter = it
            if comm.get_rank() == 0:
                storage.put_scalars(loss_a=1.0, **{"regionssl/emb_std": 0.05 if it < 5 else 0.001})
            try:
                guard.after_step()
            except TrainingCollapsed as e:
                raised = (it, str(e))
                break
    torch.save(raised, os.path.join(out_dir, f"rank{comm.get_rank()}.pt"))


@pytest.mark.slow
def test_stop_raises_on_every_process(tmp_path):
    launch_cpu(_two_rank_worker, [str(tmp_path)])
    r0, r1 = (torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2))
    assert r0 == r1 and r0[0] == 9  # checks at 4 (healthy) and 9 (window 5..9 collapsed)
    assert r0[1].startswith("Pretraining stopped by TEST.REGIONSSL.GUARD.STOP:\nCOLLAPSED at iteration 9: "
                            "regionssl/emb_std = 0.001 is below 0.05 x 1/sqrt(128) = 0.004419")


def test_default_start_iteration():
    cfg = get_regionssl_cfg(os.path.join(QUICK, "mocov2_instant_test.yaml"))
    assert cfg.TEST.REGIONSSL.GUARD.ENABLED and not cfg.TEST.REGIONSSL.GUARD.STOP
    for warmup, max_iter, start in ((0, 4, 0), (10, 400, 80), (0, 1001000, 1000), (3128, 62557, 3128)):
        cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.MAX_ITER = warmup, max_iter
        assert CollapseGuard.from_config(cfg).start_iter == start
    cfg.TEST.REGIONSSL.GUARD.START_ITER = 7
    assert CollapseGuard.from_config(cfg).start_iter == 7


def _trainer_with_spy(cfg):
    """A PretrainTrainer whose own guard records, at each check, the medians it read and its verdict."""
    torch.manual_seed(0)
    trainer = PretrainTrainer(cfg)
    trainer.resume_or_load(resume=False)
    (guard,) = [h for h in trainer._hooks if isinstance(h, CollapseGuard)]
    guard.seen, check = [], guard.check

    def spy(storage, signals, iteration):
        problems = check(storage, signals, iteration)
        guard.seen.append((iteration, [guard.medians(storage, s, iteration, len(signals) == 1) for s in signals], problems))
        return problems

    guard.check = spy
    return trainer, guard


@pytest.mark.slow
def test_real_short_instant_run_is_silent(tmp_path, caplog):
    cfg = _cfg("mocov2_instant_test.yaml", "SOLVER.MAX_ITER", 8, "SOLVER.IMS_PER_BATCH", 3,
               "SOLVER.CHECKPOINT_PERIOD", 100, "OUTPUT_DIR", str(tmp_path),
               "TEST.REGIONSSL.GUARD.START_ITER", 3, "TEST.REGIONSSL.GUARD.PERIOD", 2, "TEST.REGIONSSL.GUARD.WINDOW", 4)
    trainer, guard = _trainer_with_spy(cfg)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer.train()
    assert _warnings(caplog) == []
    assert [it for it, _, _ in guard.seen] == [3, 5, 7]
    for it, (med,), problems in guard.seen:
        # the guard read every signal of the real run (the single loss via total_loss) and found it learning
        assert all(v is not None for v in med.values()), (it, med)
        assert problems == [], (it, med)


@pytest.mark.slow
def test_real_run_made_to_collapse_is_stopped(tmp_path):
    """InsLoc-FPN (narrow) at lr 0.3: within 10 steps every query is the same vector."""
    cfg = _cfg("insloc_fpn_instant_test.yaml", "SOLVER.MAX_ITER", 20, "SOLVER.IMS_PER_BATCH", 3, "SOLVER.BASE_LR", 0.3,
               "SOLVER.CHECKPOINT_PERIOD", 100, "OUTPUT_DIR", str(tmp_path),
               "MODEL.REGIONSSL.QUEUE.SIZE", 3, "MODEL.REGIONSSL.MOMENTUM.BASE", 0.99,
               "MODEL.FPN.OUT_CHANNELS", 64, "MODEL.ROI_BOX_HEAD.CONV_DIM", 64, "MODEL.ROI_BOX_HEAD.FC_DIM", 256,
               "TEST.REGIONSSL.GUARD.STOP", True, "TEST.REGIONSSL.GUARD.START_ITER", 9,
               "TEST.REGIONSSL.GUARD.PERIOD", 5, "TEST.REGIONSSL.GUARD.WINDOW", 5)
    trainer, guard = _trainer_with_spy(cfg)
    with pytest.raises(TrainingCollapsed) as err:
        trainer.train()
    (it, meds, problems), = guard.seen  # the first check (iteration 9) stops the run
    assert it == 9 and trainer.iter == 9
    threshold = 0.05 / math.sqrt(128)
    at_start = trainer.storage.history("regionssl/emb_std_p2").values()[0]
    assert at_start[1] == 0 and at_start[0] > 5 * meds[0]["emb_std"]  # it was made to collapse, not born so
    assert [p[:2] for p in problems if p[0] == "collapse"] == [
        ("collapse", f"loss_contrast_p{i}") for i in range(2, 6)]
    assert all(m["emb_std"] < threshold / 4 for m in meds), meds
    # the same queries seen by their spread over directions: one line on every level
    assert [p[:2] for p in problems if p[0] == "collapse_direction"] == [
        ("collapse_direction", f"loss_contrast_p{i}") for i in range(2, 6)]
    text = str(err.value)
    assert text.startswith("Pretraining stopped by TEST.REGIONSSL.GUARD.STOP:\nCOLLAPSED at iteration 9: "
                           f"regionssl/emb_std_p2 = {meds[0]['emb_std']:.4g} is below 0.05 x 1/sqrt(128) = 0.004419")
