"""Fine-tunability signal: per-stage conv weight norm over its random-initialisation norm
(``WeightNormMonitor``, ``regionssl/weight_norm/<stage>``) and the guard's warning when a stage grows
past ``TEST.REGIONSSL.GUARD.MAX_WEIGHT_NORM_GROWTH``, on synthetic values and on real short runs."""
import logging
from types import SimpleNamespace

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import regionssl  # noqa: F401  (registers models and datasets)
from regionssl.engine import PretrainTrainer
from regionssl.engine.hooks import CollapseGuard
from regionssl.engine.weight_norms import WeightNormMonitor, stage_conv_weights, stage_of

from conftest import r18_cfg as _cfg

LOGGER = "regionssl.engine.hooks"


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_stage_names():
    assert stage_of("backbone.bottom_up.stem.conv1") == "stem"
    assert stage_of("backbone.res2.0.shortcut") == "res2"
    assert stage_of("backbone.bottom_up.res4.5.conv3") == "res4"
    assert stage_of("roi_heads.res5.2.conv1") == "res5"  # C4: res5 lives in the RoI head
    assert stage_of("backbone.fpn_lateral3") == "fpn" and stage_of("backbone.fpn_output5") == "fpn"
    assert stage_of("roi_heads.box_head.conv4") == "box_head"
    # momentum copies and projection heads are not the detector's
    assert stage_of("momentum.backbone.bottom_up.stem.conv1") is None
    assert stage_of("momentum.roi_heads.res5.0.conv1") is None
    assert stage_of("projector.0") is None


@pytest.mark.parametrize("config, stages, convs", [
    # R18: stem 1; res2 4; res3-res5 5 each (4 + shortcut); FPN 4 lateral + 4 output; box head 4 convs
    ("insloc_fpn_instant_test.yaml", {"stem", "res2", "res3", "res4", "res5", "fpn", "box_head"}, 1 + 4 + 15 + 8 + 4),
    # C4: Detectron2's Res5ROIHeads is three bottleneck blocks at any depth: 9 convs + shortcut
    ("insloc_c4_instant_test.yaml", {"stem", "res2", "res3", "res4", "res5"}, 1 + 4 + 5 + 5 + 10),
])
def test_stages_of_real_models(config, stages, convs):
    torch.manual_seed(0)
    model = build_model(_cfg(config))
    found = stage_conv_weights(model)
    assert set(found) == stages
    assert sum(len(ws) for ws in found.values()) == convs
    online = {id(p) for n, p in model.named_parameters() if not n.startswith("momentum")}
    assert all(id(w) in online for ws in found.values() for w in ws)


def test_monitor_ratios_are_norms_over_the_initial_norms():
    torch.manual_seed(0)
    model = build_model(_cfg("insloc_c4_instant_test.yaml"))
    monitor = WeightNormMonitor(model, period=1)
    assert monitor.ratios() == pytest.approx({s: 1.0 for s in monitor.initial})
    with torch.no_grad():
        model.backbone.stem.conv1.weight.mul_(3.0)
        for w in stage_conv_weights(model)["res3"]:
            w.mul_(0.5)
        # one conv of res5 scaled so that the stage's squared norm doubles: ratio sqrt(2)
        res5 = stage_conv_weights(model)["res5"]
        total, first = sum(float(w.pow(2).sum()) for w in res5), float(res5[0].pow(2).sum())
        res5[0].mul_(((total + first) / first) ** 0.5)
    expected = {s: 1.0 for s in monitor.initial}
    expected.update(stem=3.0, res3=0.5, res5=2 ** 0.5)
    assert monitor.ratios() == pytest.approx(expected, rel=1e-6)


def test_monitor_logs_every_period_and_after_the_last_iteration():
    torch.manual_seed(0)
    model = build_model(_cfg("insloc_c4_instant_test.yaml"))
    monitor = WeightNormMonitor(model, period=4)
    monitor.trainer = SimpleNamespace(iter=0, max_iter=10)
    with EventStorage(0) as storage:
        for it in range(10):
            storage.iter = monitor.trainer.iter = it
            monitor.after_step()
    history = storage.history("regionssl/weight_norm/stem").values()
    assert [it for _, it in history] == [3, 7, 9]
    assert all(v == pytest.approx(1.0) for v, _ in history)
    assert {k for k in storage.histories() if k.startswith("regionssl/weight_norm/")} == {
        f"regionssl/weight_norm/{s}" for s in ("stem", "res2", "res3", "res4", "res5")}


def _drive_guard(guard, ratios_at, iters):
    guard.trainer = SimpleNamespace(iter=0, model=SimpleNamespace())  # no learning_signals: growth only
    with EventStorage(0) as storage:
        for it in range(iters):
            storage.iter = guard.trainer.iter = it
            for stage, ratio in ratios_at(it).items():
                storage.put_scalar(f"regionssl/weight_norm/{stage}", ratio, smoothing_hint=False)
            guard.after_step()


def test_guard_warns_with_the_numbers_once_per_repeat_period(caplog):
    guard = CollapseGuard(start_iter=0, period=10, window=10, max_weight_norm_growth=4.0, repeat_period=100, stop=True)
    # stem grows by 0.5 per iteration from 1.0; res2 stays at exactly the limit (not above it)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _drive_guard(guard, lambda it: {"stem": 1.0 + 0.5 * it, "res2": 4.0}, 60)
    (message,) = _warnings(caplog)  # checks at 9 (5.5 > 4: warns), 19..59 muted; STOP does not stop for growth
    assert message == (
        "regionssl guard: these weights will fine-tune slowly\n"
        "  GREW at iteration 9: regionssl/weight_norm/stem = 5.50 is above 4: the stem conv weights are 5.50x "
        "their norm at random initialisation, so a detector fine-tuned from them moves this stage ~30x more "
        "slowly than a fresh one (the step on a scale-invariant weight's direction is ~lr / |w|^2)\n"
        "  (TEST.REGIONSSL.GUARD: lower SOLVER.BASE_LR or lengthen SOLVER.WARMUP_ITERS; "
        "MAX_WEIGHT_NORM_GROWTH 0 silences this; repeated at most every 100 iterations)")


def test_guard_reads_the_last_logged_ratio_and_can_be_turned_off(caplog):
    # logged at 4 (1.0) and 24 (3.9), checked every 10: 9 and 19 read 1.0, 29 reads 3.9 (logged 5 before)
    ratios = lambda it: {4: {"res4": 1.0}, 24: {"res4": 3.9}}.get(it, {})  # noqa: E731
    guard = CollapseGuard(start_iter=0, period=10, window=10, max_weight_norm_growth=3.5)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _drive_guard(guard, ratios, 40)
    assert [m.splitlines()[1].split(":")[0] + ":" + m.splitlines()[1].split(":")[1] for m in _warnings(caplog)] == [
        "  GREW at iteration 29: regionssl/weight_norm/res4 = 3.90 is above 3.5"]
    caplog.clear()
    off = CollapseGuard(start_iter=0, period=10, window=10, max_weight_norm_growth=0.0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _drive_guard(off, lambda it: {"stem": 100.0}, 40)
    assert _warnings(caplog) == []


def _real_run(tmp_path, *opts):
    cfg = _cfg("mocov2_instant_test.yaml", "SOLVER.MAX_ITER", 6, "SOLVER.IMS_PER_BATCH", 3,
               "SOLVER.CHECKPOINT_PERIOD", 100, "OUTPUT_DIR", str(tmp_path), "SOLVER.WARMUP_ITERS", 0,
               "TEST.REGIONSSL.WEIGHT_NORM_PERIOD", 2, "TEST.REGIONSSL.GUARD.START_ITER", 3,
               "TEST.REGIONSSL.GUARD.PERIOD", 2, "TEST.REGIONSSL.GUARD.WINDOW", 2, *opts)
    torch.manual_seed(0)
    trainer = PretrainTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


@pytest.mark.slow
def test_real_run_made_to_grow_warns_and_a_gentle_one_does_not(tmp_path, caplog):
    """The same 6 steps of MoCo-v2 (R18) at lr 1e-4 and at lr 3: the hot run's early stages grow past
    4x their initial norm and the guard names them; the gentle run stays within 1 % and is silent."""
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        gentle = _real_run(tmp_path / "gentle", "SOLVER.BASE_LR", 1e-4)
    assert _warnings(caplog) == []
    logged = gentle.storage.histories()
    stages = {k.rsplit("/", 1)[1] for k in logged if k.startswith("regionssl/weight_norm/")}
    assert stages == {"stem", "res2", "res3", "res4", "res5"}
    assert [it for _, it in logged["regionssl/weight_norm/stem"].values()] == [1, 3, 5]
    assert all(abs(v - 1) < 0.01 for s in stages for v, _ in logged[f"regionssl/weight_norm/{s}"].values())

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        hot = _real_run(tmp_path / "hot", "SOLVER.BASE_LR", 3.0)
    latest = {k.rsplit("/", 1)[1]: v.latest() for k, v in hot.storage.histories().items()
              if k.startswith("regionssl/weight_norm/")}
    grown = sorted(s for s, r in latest.items() if r > 4.0)
    assert grown, latest  # the run was made to grow
    # (at lr 3 the embeddings also collapse: that is the guard's other warning)
    (message,) = [m for m in _warnings(caplog) if "fine-tune slowly" in m]
    assert message.startswith("regionssl guard: these weights will fine-tune slowly\n  GREW at iteration 3: ")
    named = sorted(line.split("regionssl/weight_norm/")[1].split(" ")[0] for line in message.splitlines()[1:-1])
    ratios_at_3 = {s: [v for v, it in hot.storage.history(f"regionssl/weight_norm/{s}").values() if it == 3][0]
                   for s in latest}
    assert named == sorted(s for s, r in ratios_at_3.items() if r > 4.0)
