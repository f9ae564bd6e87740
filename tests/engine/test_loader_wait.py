"""The warning that the model waits for data (``LoaderWaitWarning``, ``TEST.REGIONSSL.LOADER_WAIT``):
synthetic timings through the hook's own ``after_step``, and a real trainer run with a slow loader on a
fake clock (no test depends on the machine's speed or load)."""
import logging
import os
from types import SimpleNamespace

import detectron2.engine.hooks as d2_hooks
import detectron2.engine.train_loop as train_loop
import fvcore.common.timer as fvcore_timer
import pytest
import torch
from detectron2.utils.events import EventStorage

import regionssl  # noqa: F401  (registers models and datasets)
from regionssl.engine import PretrainTrainer, get_regionssl_cfg
from regionssl.engine.hooks import LoaderWaitWarning, build_pretrain_hooks

from conftest import QS as QUICK

LOGGER = "regionssl.engine.hooks"


def _drive(hook, timings, iters, start_iter=0):
    """Log ``timings(it) = (data_time, time)`` as SimpleTrainer and IterationTimer do, run the hook."""
    hook.trainer = SimpleNamespace(iter=start_iter, start_iter=start_iter)
    with EventStorage(start_iter) as storage:
        for it in range(start_iter, start_iter + iters):
            storage.iter = hook.trainer.iter = it
            data_time, step_time = timings(it)
            storage.put_scalar("data_time", data_time)
            storage.put_scalar("time", step_time)
            hook.after_step()


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_warns_with_the_fraction_and_remedies_then_waits_ten_windows(caplog):
    hook = LoaderWaitWarning(max_fraction=0.2, window=10, num_workers=8, on_device_hint=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _drive(hook, lambda it: (0.25, 1.0), 150)
    # checks at 19, 29, ..., 149 (the first window is the workers' start-up); warned at 19 and 119
    assert _warnings(caplog) == [
        f"regionssl: the model waited for data 25% of the time of iterations {a}-{b} (data_time / time; above "
        "20%). Remedies: more loader workers per process if the node has idle cores (DATALOADER.NUM_WORKERS, "
        "now 8); INPUT.REGIONSSL.PHOTOMETRIC.ON_DEVICE True (the colour ops run on the GPU). "
        "TEST.REGIONSSL.LOADER_WAIT.MAX_FRACTION 0.0 silences this."
        for a, b in ((10, 19), (110, 119))
    ]


def test_fraction_is_summed_over_the_window_and_needs_both_timings():
    hook = LoaderWaitWarning(max_fraction=0.2, window=4, num_workers=2, on_device_hint=False)
    with EventStorage(0) as storage:
        for it, (data_time, step_time) in enumerate([(9.0, 10.0), (0.1, 1.0), (0.3, 1.0), (0.0, 1.0), (0.2, 1.0)]):
            storage.iter = it
            storage.put_scalar("data_time", data_time)
            if it != 3:  # IterationTimer skipped this one
                storage.put_scalar("time", step_time)
        assert hook.wait_fraction(storage, 4) == (0.1 + 0.3 + 0.2) / 3  # iterations 1, 2, 4
        assert hook.wait_fraction(storage, 1) == 9.1 / 11.0
        assert hook.wait_fraction(storage, 9) is None  # nothing logged in 6-9


def test_silent_below_the_threshold_before_the_second_window_and_when_off(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _drive(LoaderWaitWarning(max_fraction=0.2, window=10, num_workers=8, on_device_hint=True),
               lambda it: (0.2, 1.0), 100)  # at the threshold, not above it
        _drive(LoaderWaitWarning(max_fraction=0.2, window=10, num_workers=8, on_device_hint=True),
               lambda it: (0.9, 1.0), 19, start_iter=500)  # a resumed run: 500-518 is still start-up
    assert _warnings(caplog) == []
    cfg = get_regionssl_cfg(os.path.join(QUICK, "mocov2_instant_test.yaml"))
    trainer = SimpleNamespace(model=torch.nn.Linear(1, 1))  # the weight-norm monitor reads the model's convs
    assert any(isinstance(h, LoaderWaitWarning) for h in build_pretrain_hooks(cfg, trainer))
    cfg.TEST.REGIONSSL.LOADER_WAIT.MAX_FRACTION = 0.0
    assert not any(isinstance(h, LoaderWaitWarning) for h in build_pretrain_hooks(cfg, trainer))


def test_hint_for_the_device_only_on_cuda_models_without_it():
    cfg = get_regionssl_cfg(os.path.join(QUICK, "mocov2_instant_test.yaml"), ["MODEL.DEVICE", "cpu"])
    assert not LoaderWaitWarning.from_config(cfg).on_device_hint  # on CPU tensors the colour ops cost more
    cfg.MODEL.DEVICE = "cuda:0"
    assert LoaderWaitWarning.from_config(cfg).on_device_hint
    cfg.INPUT.REGIONSSL.PHOTOMETRIC.ON_DEVICE = True
    assert not LoaderWaitWarning.from_config(cfg).on_device_hint


class FakeClock:
    """The ``perf_counter`` behind Detectron2's ``data_time`` and ``time``, moved only by the test."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.mark.slow
def test_real_run_with_a_slow_loader_warns(tmp_path, caplog, monkeypatch):
    """A real PretrainTrainer on a fake clock: each batch arrives 0.5 s late and each forward takes
    1.5 s. Detectron2's own data_time (SimpleTrainer) and time (IterationTimer) feed the hook, which
    warns at its first check (iteration 5 with a window of 3) that the model waited 0.5 / 2.0 = 25%."""
    clock = FakeClock()
    monkeypatch.setattr(train_loop, "time", SimpleNamespace(perf_counter=clock))  # data_time
    monkeypatch.setattr(d2_hooks, "time", SimpleNamespace(perf_counter=clock))  # IterationTimer
    monkeypatch.setattr(fvcore_timer, "perf_counter", clock)  # IterationTimer's step Timer
    cfg = get_regionssl_cfg(os.path.join(QUICK, "mocov2_instant_test.yaml"), [
        "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "INPUT.REGIONSSL.CROP_SIZE", 64, "SOLVER.MAX_ITER", 6, "SOLVER.IMS_PER_BATCH", 2,
        "SOLVER.CHECKPOINT_PERIOD", 100, "OUTPUT_DIR", str(tmp_path), "TEST.REGIONSSL.LOADER_WAIT.WINDOW", 3])
    torch.manual_seed(0)
    trainer = PretrainTrainer(cfg)
    trainer.resume_or_load(resume=False)
    runner = trainer.step_runner
    batches = iter(runner.data_loader)

    def late():
        while True:
            batch = next(batches)
            clock.advance(0.5)
            yield batch

    runner._data_loader_iter_obj = late()
    trainer.model.register_forward_pre_hook(lambda module, inputs: clock.advance(1.5))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer.train()
    (message,) = [m for m in _warnings(caplog) if "waited for data" in m]
    assert message.startswith("regionssl: the model waited for data 25% of the time of iterations 3-5 "
                              "(data_time / time; above 20%). Remedies: more loader workers per process")
    assert "ON_DEVICE" not in message  # a CPU model
