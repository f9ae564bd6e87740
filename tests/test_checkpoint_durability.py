"""Nothing lost: checkpoints are written atomically and verified; resume falls back to the newest
readable one; a run whose final checkpoint is missing is not finished; a full disk keeps the
previous files whole."""
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import QS, ROOT, SMALL_PRETRAIN
from regionssl_workbench.scripts import load_script

transfer_tool = load_script("tools/transfer.py")

from regionssl.checkpoint import NothingToResume, RegionSSLCheckpointer, read_checkpoint
from regionssl.utils import atomic_file
from regionssl.utils.atomic_file import atomic_write
from regionssl.utils.safe_load import CheckpointReadError

TINY = SMALL_PRETRAIN + ["SEED", "0", "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"]


def _disk_full_open(limit, code):
    """``open`` whose files raise OSError(code) once more than ``limit`` bytes were written to them."""

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > limit:
                self.f.write(bytes(data[: max(0, limit - (self.written - len(data)))]) if "b" in self.f.mode else "")
                raise OSError(code, os.strerror(code))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    return lambda path, mode="r", *a, **k: Full(open(path, mode, *a, **k))


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)


def _saved(folder, *names):
    """A checkpointer of a Small model in ``folder`` that saved ``names`` (weights differing per save)."""
    model = Small()
    ckp = RegionSSLCheckpointer(model, str(folder))
    for i, name in enumerate(names):
        with torch.no_grad():
            model.conv.weight.fill_(float(i + 1))
        ckp.save(name, iteration=i)
    return model, ckp


def _flip_inside_tensor(path, tensor):
    """Flip 16 bytes inside ``tensor``'s stored bytes in ``path`` (the zip stores them uncompressed)."""
    data = bytearray(open(path, "rb").read())
    at = data.find(tensor.numpy().tobytes())
    assert at >= 0
    data[at + 8: at + 24] = bytes(b ^ 0xFF for b in data[at + 8: at + 24])
    open(path, "wb").write(bytes(data))


# ----------------------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_a_failed_rewrite_keeps_the_old_file_whole(tmp_path, monkeypatch, code):
    path = tmp_path / "metrics_like.bin"
    with atomic_write(str(path)) as f:
        f.write(b"old contents" * 100)
    monkeypatch.setattr(atomic_file, "open", _disk_full_open(100, code), raising=False)
    with pytest.raises(OSError) as err:
        with atomic_write(str(path)) as f:
            f.write(b"new" * 1000)
    assert err.value.errno == code
    assert path.read_bytes() == b"old contents" * 100
    assert os.listdir(tmp_path) == ["metrics_like.bin"]  # no temporary file left


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_checkpointer_out_of_disk_keeps_model_final_and_last_checkpoint(tmp_path, monkeypatch, code):
    model, ckp = _saved(tmp_path, "model_0000001", "model_final")
    good = read_checkpoint(str(tmp_path / "model_final.pth"))
    monkeypatch.setattr(atomic_file, "open", _disk_full_open(4096, code), raising=False)
    with torch.no_grad():
        model.conv.weight.fill_(99.0)
    with pytest.raises(OSError) as err:
        ckp.save("model_final", iteration=5)
    assert err.value.errno == code
    monkeypatch.undo()
    again = read_checkpoint(str(tmp_path / "model_final.pth"))
    assert again["iteration"] == good["iteration"] == 1
    assert torch.equal(again["model"]["conv.weight"], good["model"]["conv.weight"])
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth", "model_final.pth"]


def test_out_of_disk_while_tagging_keeps_last_checkpoint(tmp_path, monkeypatch):
    _, ckp = _saved(tmp_path, "model_0000001")
    monkeypatch.setattr(atomic_file, "open", _disk_full_open(0, errno.ENOSPC), raising=False)
    with pytest.raises(OSError):
        ckp.tag_last_checkpoint("model_0000003.pth")
    monkeypatch.undo()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


# ----------------------------------------------------------------------------- verified reads, fallback
def test_a_flipped_region_inside_a_tensor_is_detected(tmp_path):
    model, _ = _saved(tmp_path, "model_final")
    path = str(tmp_path / "model_final.pth")
    _flip_inside_tensor(path, model.conv.weight.detach())
    torch.load(path, weights_only=True)  # torch itself reads it without complaint
    with pytest.raises(CheckpointReadError, match=f"Cannot read {path}: its contents differ from what was saved"):
        read_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped", "missing"])
def test_resume_falls_back_to_the_previous_readable_checkpoint(tmp_path, damage, caplog):
    model, ckp = _saved(tmp_path, "model_0000001", "model_0000003", "model_final")
    final = tmp_path / "model_final.pth"
    if damage == "truncated":
        final.write_bytes(final.read_bytes()[: final.stat().st_size // 2])
    elif damage == "empty":
        final.write_bytes(b"")
    elif damage == "flipped":
        _flip_inside_tensor(str(final), torch.full_like(model.conv.weight, 3.0))
    else:
        final.unlink()
    fresh = Small()
    ckp = RegionSSLCheckpointer(fresh, str(tmp_path))
    with caplog.at_level(logging.WARNING):
        extra = ckp.resume_or_load("", resume=True)
    assert ckp.resumed_from == str(tmp_path / "model_0000003.pth")
    assert extra["iteration"] == 1 and float(fresh.conv.weight[0, 0, 0, 0]) == 2.0
    text = caplog.text
    assert str(final) in text and "trying the previous checkpoint" in text
    assert f"Resumed from {tmp_path / 'model_0000003.pth'}, the newest readable checkpoint, instead of {final}" in text


def test_resume_stops_when_no_checkpoint_reads(tmp_path):
    _saved(tmp_path, "model_0000001", "model_final")
    for name in ("model_0000001.pth", "model_final.pth"):
        (tmp_path / name).write_bytes(b"garbage")
    with pytest.raises(CheckpointReadError) as err:
        RegionSSLCheckpointer(Small(), str(tmp_path)).resume_or_load("", resume=True)
    text = str(err.value)
    assert "no checkpoint to resume from can be read" in text and "Nothing was overwritten" in text
    assert str(tmp_path / "model_final.pth") in text and str(tmp_path / "model_0000001.pth") in text


def test_resume_without_last_checkpoint_beside_checkpoints_stops(tmp_path):
    _saved(tmp_path, "model_0000001", "model_0000003")
    (tmp_path / "last_checkpoint").unlink()
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    with pytest.raises(NothingToResume, match=r"holds checkpoints \(model_0000003.pth, model_0000001.pth\) but no "
                                              "last_checkpoint"):
        RegionSSLCheckpointer(Small(), str(tmp_path)).resume_or_load("", resume=True)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before


def test_resume_in_an_empty_folder_starts_from_the_weights(tmp_path):
    ckp = RegionSSLCheckpointer(Small(), str(tmp_path))
    assert ckp.resume_or_load("", resume=True) == {} and ckp.resumed_from == ""


def test_transfer_redoes_a_pretraining_whose_final_checkpoint_is_unreadable(tmp_path):
    _saved(tmp_path, "model_0000001", "model_final")
    assert transfer_tool.pretraining_finished(str(tmp_path))
    (tmp_path / "model_final.pth").write_bytes(b"PK\x03\x04torn")
    assert not transfer_tool.pretraining_finished(str(tmp_path))
    assert (tmp_path / "model_final.pth.unreadable").read_bytes() == b"PK\x03\x04torn"  # kept, not lost
    assert not (tmp_path / "model_final.pth").exists()


# ----------------------------------------------------------------------------- a real run killed in its final save
KILLED_RUN = textwrap.dedent("""
    import io, os, signal, sys
    import torch
    import train_net  # python -c in the repository: the current folder is on the path
    real_save = torch.save

    def save_then_die_in_final(obj, f, *a, **k):
        name = getattr(f, "name", "")
        if "model_final" not in str(name):
            return real_save(obj, f, *a, **k)
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half the final checkpoint is on disk
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_then_die_in_final
    args = train_net.default_argument_parser().parse_args(sys.argv[1:])
    train_net.main(args)
""")


def _train(out, *extra, script=None):
    """train_net.py in a subprocess: 2 iterations, a checkpoint after each, then model_final."""
    cmd = [sys.executable] + (["-c", script] if script else [os.path.join(ROOT, "train_net.py")])
    cmd += ["--config-file", os.path.join(QS, "mocov2_instant_test.yaml"), *extra, "OUTPUT_DIR", str(out), *TINY,
            "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


@pytest.mark.slow  # three train_net.py subprocesses
def test_run_killed_in_its_final_save_resumes_to_the_uninterrupted_weights(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "killed"
    done = _train(ref)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = _train(run, script=KILLED_RUN)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run / "model_final.pth").exists()  # the torn bytes never took its name
    assert (run / "last_checkpoint").read_text() == "model_0000001.pth"
    assert json.load(open(run / "run.lock"))["pid"]  # left by the killed run
    assert _metric_iterations(run) == [0]  # written with the checkpoint of iteration 0, before the kill
    resumed = _train(run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (run / "log.txt").read_text()
    assert "Taking over the lock of" in resumed.stderr + log and "no longer runs" in resumed.stderr + log
    assert "holds the state after the last iteration (1) but model_final.pth is missing or unreadable" in log
    assert (run / "last_checkpoint").read_text() == "model_final.pth"
    assert not (run / "run.lock").exists()
    assert not [n for n in os.listdir(run) if ".tmp." in n]
    final, expected = read_checkpoint(str(run / "model_final.pth")), read_checkpoint(str(ref / "model_final.pth"))
    assert final["iteration"] == expected["iteration"] == 1
    for key, value in expected["model"].items():  # bit for bit, queues included
        assert torch.equal(final["model"][key], value), key
    assert _metric_iterations(run) == [0]


def _metric_iterations(out):
    with open(out / "metrics.json") as f:
        return [json.loads(line)["iteration"] for line in f if line.strip()]
