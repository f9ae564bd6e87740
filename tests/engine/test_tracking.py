"""Experiment tracking: W&B (offline) and MLflow (file store) writers receive the trainer's scalars."""
import glob
import json
import os
import struct
import subprocess
import sys

import pytest

from conftest import HANG_TIMEOUT, QS, ROOT, cfg_of


def test_tracking_is_off_by_default_and_imports_nothing():
    code = (
        "import sys, regionssl, regionssl.engine.trainer\n"
        "from regionssl.engine import get_regionssl_cfg\n"
        "from regionssl.engine.tracking import build_tracking_writers\n"
        "cfg = get_regionssl_cfg(sys.argv[1])\n"
        "assert not cfg.TEST.REGIONSSL.WANDB.ENABLED and not cfg.TEST.REGIONSSL.MLFLOW.ENABLED\n"
        "assert build_tracking_writers(cfg) == []\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'mlflow')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "configs", "insloc_fpn.yaml")], cwd=ROOT,
                       capture_output=True, text=True, timeout=HANG_TIMEOUT, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def wandb_history(run_file):
    """History rows of a W&B ``.wandb`` transaction log (LevelDB log format: 32 KiB blocks of
    records with a 7-byte header, the file starting with ``:W&B`` + magic + version)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(run_file, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, records, partial = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full
            records.append(chunk)
        elif kind in (2, 3):  # first, middle
            partial = chunk if kind == 2 else partial + chunk
        elif kind == 4:  # last
            records.append(partial + chunk)
    rows = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


@pytest.mark.slow
def test_trainer_scalars_reach_wandb_and_mlflow(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from regionssl.engine import PretrainTrainer
    from regionssl.engine.tracking import MLflowWriter

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind a flag
    monkeypatch.setenv("WANDB_SILENT", "true")
    uri = f"file:{tmp_path / 'mlruns'}"
    cfg = cfg_of(os.path.join(QS, "mocov2_instant_test.yaml"), "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2",
                 "SOLVER.CHECKPOINT_PERIOD", "100", "INPUT.REGIONSSL.CROP_SIZE", "64",
                 "TEST.REGIONSSL.WANDB.ENABLED", "True", "TEST.REGIONSSL.WANDB.MODE", "offline",
                 "TEST.REGIONSSL.MLFLOW.ENABLED", "True", "TEST.REGIONSSL.MLFLOW.TRACKING_URI", uri,
                 "OUTPUT_DIR", str(tmp_path / "run"))
    trainer = PretrainTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    # what Detectron2's own JSON writer wrote for the last iteration (smoothed as in TensorBoard)
    with open(tmp_path / "run" / "metrics.json") as f:
        last = [json.loads(line) for line in f][-1]
    assert last["iteration"] == 2
    expected = {name: last[name] for name in ("total_loss", "lr", "regionssl/acc_global")}

    # W&B: the offline run under OUTPUT_DIR/wandb holds the last iteration's scalars (PeriodicWriter
    # writes every 20 iterations and at the end)
    (run_file,) = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = [row for row in wandb_history(run_file) if "total_loss" in row]
    assert rows and rows[-1]["_step"] == 2
    for name, value in expected.items():
        assert rows[-1][name] == pytest.approx(value, rel=1e-6), name
    with open(tmp_path / "run" / "wandb_run_id") as f:
        assert os.path.basename(run_file) == f"run-{f.read().strip()}.wandb"

    # MLflow: metric histories in the file store, run id kept in OUTPUT_DIR for a resumed job
    with open(tmp_path / "run" / "mlflow_run_id") as f:
        run_id = f.read().strip()
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    for name, value in expected.items():
        (metric,) = client.get_metric_history(run_id, name)
        assert metric.step == 2 and metric.value == pytest.approx(value, rel=1e-6), name
    assert client.get_run(run_id).data.params["MODEL.META_ARCHITECTURE"] == "MoCoV2"
    resumed = MLflowWriter(trainer.cfg)
    assert resumed._run_id == run_id
    resumed.close()
