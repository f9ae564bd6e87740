"""Resume never silently ignores a solver key, and diverged weights are never saved."""
import logging
import os

import pytest
import torch
from detectron2.engine import HookBase

from conftest import SMALL_PRETRAIN, qs_cfg

from regionssl.checkpoint import read_checkpoint
from regionssl.engine.resume_checks import ResumeConfigError
from regionssl.engine.trainer import PretrainTrainer
from regionssl.engine.weights_guard import WeightsDiverged, check_weights

TINY = SMALL_PRETRAIN + ["SEED", "0", "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"]


def _trainer(out, *opts, extra_hook=None):
    cfg = qs_cfg("mocov2_instant_test.yaml", *TINY, "OUTPUT_DIR", str(out), *opts)

    class Trainer(PretrainTrainer):
        def build_hooks(self):
            return ([extra_hook] if extra_hook else []) + super().build_hooks()

    return Trainer(cfg)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    trainer = _trainer(out)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return out


def _copy(src, dst):
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    return dst


@pytest.mark.parametrize("key,old,new", [
    ("SOLVER.BASE_LR", 0.01, 0.02), ("SOLVER.WEIGHT_DECAY", 0.0001, 0.001), ("SOLVER.MOMENTUM", 0.9, 0.5),
])
def test_resume_refuses_solver_keys_the_checkpoint_would_override(finished_run, tmp_path, key, old, new):
    out = _copy(finished_run, tmp_path / "out")
    trainer = _trainer(out, key, str(new), "SOLVER.MAX_ITER", "6")
    with pytest.raises(ResumeConfigError) as err:
        trainer.resume_or_load(resume=True)
    assert f"Changed on resume: {key}: {old!r} in the checkpoint, {new!r} now." in str(err.value)
    assert "the new one would be ignored" in str(err.value)


@pytest.mark.slow  # a real training run, resumed
def test_resume_applies_and_reports_a_longer_schedule(finished_run, tmp_path, caplog):
    out = _copy(finished_run, tmp_path / "out")
    trainer = _trainer(out, "SOLVER.MAX_ITER", "6")
    with caplog.at_level(logging.WARNING):
        trainer.resume_or_load(resume=True)
    assert "SOLVER.MAX_ITER changed on resume: 4 in the checkpoint, 6 now (applied)." in caplog.text
    assert trainer.start_iter == 4
    trainer.train()
    assert read_checkpoint(os.path.join(out, "model_final.pth"))["iteration"] == 5


class Diverge(HookBase):
    """At the end of iteration ``at``, before the guard and the checkpointer: the update blew up."""

    def __init__(self, at, how):
        self.at, self.how = at, how

    def after_step(self):
        if self.trainer.iter != self.at:
            return
        model = getattr(self.trainer.model, "module", self.trainer.model)
        with torch.no_grad():
            if self.how == "nan":
                model.backbone.res3[0].conv1.weight[0, 0, 0, 0] = float("nan")
            else:
                for p in model.parameters():
                    p.mul_(1000.0)


@pytest.mark.parametrize("how,message", [
    ("nan", "Iteration 3: backbone.res3.0.conv1.weight holds 1 non-finite values"),
    ("explode", "Iteration 3: the parameters' total norm grew 1e\\+03x since the start of the run"),
])
def test_diverged_weights_stop_the_run_before_they_are_saved(tmp_path, how, message):
    trainer = _trainer(tmp_path, extra_hook=Diverge(3, how))
    trainer.resume_or_load(resume=False)
    with pytest.raises(WeightsDiverged, match=message):
        trainer.train()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".pth")) == ["model_0000001.pth"]


def test_check_weights_thresholds():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    start = check_weights(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(99.0)
    check_weights(model, start, 100.0)  # 99x: below the limit
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    with pytest.raises(WeightsDiverged, match="most: 0.weight"):
        check_weights(model, start, 100.0)
    check_weights(model, start, 0.0)  # growth check off
    model[1].running_var[2] = float("inf")  # buffers are checked too
    with pytest.raises(WeightsDiverged, match="1.running_var holds 1 non-finite values"):
        check_weights(model, start, 0.0)
