"""Slurm launcher: the job computes its distributed arguments from the job environment, and a
preempted job requeues itself and resumes exactly (submitit's local executor on CPU)."""
import os
import signal
import sys
import types

import pytest
import torch
from detectron2.engine import HookBase

submitit = pytest.importorskip("submitit")
import cloudpickle  # noqa: E402  (a submitit dependency)

from conftest import HANG_TIMEOUT, QS, ROOT  # noqa: E402

from regionssl_workbench.scripts import load_script  # noqa: E402

from regionssl.engine.slurm import TrainJob, dist_url_for  # noqa: E402
from regionssl.engine.trainer import PretrainTrainer  # noqa: E402

slurm_launch = load_script("tools/slurm_launch.py")
train_net = slurm_launch.train_net


def test_distributed_args_come_from_the_job_environment():
    env = types.SimpleNamespace(job_id="4242_3", hostnames=["node017", "node018"], num_nodes=2, num_tasks=16, node=1)
    args = slurm_launch.parse_args(["--config-file", "c.yaml", "--nodes", "2", "--gpus-per-node", "8", "SOLVER.MAX_ITER", "9"])
    job_args = TrainJob(print, args).distributed_args(env)
    assert (job_args.num_machines, job_args.machine_rank, job_args.num_gpus) == (2, 1, 8)
    assert job_args.dist_url == f"tcp://node017:{20000 + 42423 % 20000}" == dist_url_for(env)
    assert job_args.opts == ["SOLVER.MAX_ITER", "9"] and not job_args.resume
    # preemption/timeout: the same job again, resuming; the original args are left alone
    requeued = TrainJob(print, args, port=1234).checkpoint()
    assert requeued.function.args.resume and requeued.function.port == 1234 and not args.resume
    assert dist_url_for(env, 1234) == "tcp://node017:1234"


class PreemptAfterCheckpoint(HookBase):
    """Test-only hook: right after the checkpoint of iteration ``at_iter`` is written, the process
    receives the signal Slurm sends before preemption or the time limit (submitit: USR2)."""

    def __init__(self, at_iter):
        self.at_iter = at_iter

    def after_step(self):
        if self.trainer.iter + 1 == self.at_iter:
            os.kill(os.getpid(), getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG))


def preempted_main(args):
    """train_net.main, preempted once (first attempt only) after the checkpoint of iteration 2."""
    if not args.resume:
        build_hooks = PretrainTrainer.build_hooks
        PretrainTrainer.build_hooks = lambda self: build_hooks(self) + [PreemptAfterCheckpoint(2)]
    return train_net.main(args)


def _submit(out, main, tmp_path, name):
    args = slurm_launch.parse_args([
        "--config-file", os.path.join(QS, "mocov2_instant_test.yaml"), "--nodes", "1", "--gpus-per-node", "1",
        "--cluster", "local", "--timeout", str(HANG_TIMEOUT // 60), "--job-dir", str(tmp_path / f"jobs_{name}"),
        "OUTPUT_DIR", out, "SEED", "0", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4",
        "SOLVER.CHECKPOINT_PERIOD", "2", "INPUT.REGIONSSL.CROP_SIZE", "64", "MODEL.REGIONSSL.QUEUE.SIZE", "8",
        "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",  # small checkpoints, fast steps
    ])
    return slurm_launch.submit(args, main)


@pytest.mark.slow
def test_preempted_job_requeues_and_ends_with_the_uninterrupted_weights(tmp_path):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the job process cannot import this file
    ref_out, pre_out = str(tmp_path / "uninterrupted"), str(tmp_path / "preempted")
    ref = _submit(ref_out, None, tmp_path, "ref")
    pre = _submit(pre_out, preempted_main, tmp_path, "pre")
    ref.result()
    pre.result()
    stdout = pre.stdout() + (pre.stderr() or "")
    assert "Requeued job" in stdout, stdout[-3000:]
    with open(os.path.join(pre_out, "log.txt")) as f:
        log = f.read()
    assert "Starting training from iteration 0" in log and "Starting training from iteration 2" in log
    assert "Resumed the data stream at iteration 2" in log
    with open(os.path.join(pre_out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    final = torch.load(os.path.join(pre_out, "model_final.pth"), map_location="cpu", weights_only=False)
    expected = torch.load(os.path.join(ref_out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert final["iteration"] == expected["iteration"] == 3
    assert final["model"].keys() == expected["model"].keys()
    for key, value in expected["model"].items():  # bit for bit, queues included
        assert torch.equal(final["model"][key], value), key
    for key in ("backbone.stem.conv1.weight", "queues.queue"):  # and training did move them
        start = torch.load(os.path.join(pre_out, "model_0000001.pth"), map_location="cpu", weights_only=False)
        assert not torch.equal(start["model"][key], expected["model"][key])
