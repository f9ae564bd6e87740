"""One run per OUTPUT_DIR: a second run stops naming the first; a lock left by a run that is gone
is taken over with a warning."""
import argparse
import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from conftest import QS

from regionssl_workbench.scripts import load_script

train_net = load_script("train_net.py")

from regionssl.engine import run_lock
from regionssl.engine.run_lock import LOCK_FILE, OutputDirLocked, acquire, release

# run_lock.py needs only the standard library: loaded alone, the holder starts in a blink
HOLDER = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('run_lock', {path!r}); "
          "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
          "m.acquire({out!r}); print('locked', flush=True); sys.stdin.read()")


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of ``tmp_path/out`` until its stdin closes."""
    out = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(path=run_lock.__file__, out=out)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"  # blocks until the lock is held: no timing
    yield out, proc
    if proc.poll() is None:
        proc.stdin.close()
        proc.wait()


def test_second_run_stops_naming_the_first(holder):
    out, proc = holder
    with pytest.raises(OutputDirLocked) as err:
        acquire(out)
    text = str(err.value)
    assert f"OUTPUT_DIR {out} is in use by another run (host {socket.gethostname()}, pid {proc.pid}," in text
    assert f"delete {os.path.join(out, LOCK_FILE)}" in text


def test_train_net_in_a_locked_folder_writes_nothing(holder):
    out, _ = holder
    args = argparse.Namespace(config_file=os.path.join(QS, "mocov2_instant_test.yaml"), resume=False, eval_only=False,
                              num_gpus=1, num_machines=1, machine_rank=0, dist_url="auto",
                              opts=["OUTPUT_DIR", out, "MODEL.DEVICE", "cpu"])
    with pytest.raises(OutputDirLocked, match="is in use by another run"):
        train_net.main(args)
    assert os.listdir(out) == [LOCK_FILE]  # no config.yaml, no log.txt of the second run


def test_lock_of_a_killed_run_is_taken_over_with_a_warning(holder, caplog):
    out, proc = holder
    proc.kill()
    proc.wait()
    assert json.load(open(os.path.join(out, LOCK_FILE)))["pid"] == proc.pid  # the file stays
    with caplog.at_level(logging.WARNING):
        path = acquire(out)
    assert f"Taking over the lock of {out} from a run that is gone (pid {proc.pid} no longer runs" in caplog.text
    assert json.load(open(path))["pid"] == os.getpid()
    release(path)
    assert not os.path.exists(path)


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("owner,taken", [
    ({"host": socket.gethostname(), "pid": "dead"}, "no longer runs"),
    ({"host": socket.gethostname(), "pid": os.getppid(), "pid_start": -1}, "now belongs to another program"),
    ({"host": "node-elsewhere", "pid": 12345, "slurm_job_id": "777"}, "an earlier attempt of this Slurm job"),
    ({"host": "node-elsewhere", "pid": 12345, "slurm_job_id": "778"}, None),
    ({"host": socket.gethostname(), "pid": os.getppid()}, None),
])
def test_without_flock_the_owner_in_the_file_decides(tmp_path, monkeypatch, caplog, owner, taken):
    monkeypatch.setattr(run_lock, "_try_flock", lambda f: None)  # a file system without flock
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    owner = dict(owner, pid=_dead_pid() if owner["pid"] == "dead" else owner["pid"])
    (tmp_path / LOCK_FILE).write_text(json.dumps(owner))
    if taken is None:
        with pytest.raises(OutputDirLocked, match=f"host {owner['host']}, pid {owner['pid']}"):
            acquire(str(tmp_path))
        return
    with caplog.at_level(logging.WARNING):
        release(acquire(str(tmp_path)))
    assert taken in caplog.text
