"""No entry point runs code from a file it reads.

Each test gives one entry point a file whose unpickling (or YAML loading) would create a marker
file: the load must stop with a message naming the file, and the marker must not exist.
"""
import argparse
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import QS, SMALL_PRETRAIN

from regionssl_workbench.scripts import load_script

convert_to_detectron2 = load_script("tools/convert_to_detectron2.py")
import_tool = load_script("tools/import_checkpoint.py")
probe_tool = load_script("tools/probe.py")
rescale_conv_norms = load_script("tools/rescale_conv_norms.py")
train_net = load_script("train_net.py")
transfer_tool = load_script("tools/transfer.py")

from regionssl.checkpoint import RegionSSLCheckpointer
from regionssl.utils.safe_load import CheckpointReadError, load_pickle_file, load_torch_file


class Payload:
    """Unpickling this opens ``marker`` for writing, i.e. creates it: code from the file runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def payload_file(folder, name, marker):
    """A weights file (.pth via torch.save, .pkl via pickle) whose only model entry is a Payload."""
    path = str(folder / name)
    data = {"model": {"backbone.stem.conv1.weight": Payload(marker)}, "__author__": "x"}
    if name.endswith(".pkl"):
        with open(path, "wb") as f:
            pickle.dump(data, f)
    else:
        torch.save(data, path)
    return path


def payload_config(folder, marker):
    path = str(folder / "evil.yaml")
    with open(path, "w") as f:
        f.write(f'_BASE_: "{os.path.join(QS, "mocov2_instant_test.yaml")}"\n'
                f'OUTPUT_DIR: !!python/object/apply:builtins.open ["{marker}", "w"]\n')
    return path




def train_args(config, out, *opts, resume=False, eval_only=False):
    return argparse.Namespace(config_file=config, resume=resume, eval_only=eval_only, num_gpus=1, num_machines=1,
                              machine_rank=0, dist_url="auto", opts=["OUTPUT_DIR", str(out), *SMALL_PRETRAIN, *opts])


# ----------------------------------------------------------------------------- the readers
@pytest.mark.parametrize("name", ["w.pth", "w.pkl"])
def test_readers_refuse_code_and_name_the_file(tmp_path, name):
    marker = tmp_path / "marker"
    path = payload_file(tmp_path, name, marker)
    with pytest.raises(CheckpointReadError) as err:
        (load_pickle_file if name.endswith(".pkl") else load_torch_file)(path)
    assert str(err.value).startswith(f"Cannot read {path}: it names ")
    assert "open" in str(err.value) and "weights_only=False" not in str(err.value)
    assert not marker.exists()


def test_readers_admit_tensors_numpy_arrays_and_containers(tmp_path):
    data = {"model": {"a": torch.arange(3.0), "b": np.arange(4, dtype=np.int64), "c": np.float32(2.5)},
            "meta": [1, (2.0, "x"), None, {"k": True}]}
    with open(tmp_path / "w.pkl", "wb") as f:
        pickle.dump(data, f, protocol=2)  # Detectron2's model zoo files are protocol 2
    torch.save(data, tmp_path / "w.pth")
    for got in (load_pickle_file(str(tmp_path / "w.pkl")), load_torch_file(str(tmp_path / "w.pth"))):
        assert torch.equal(got["model"]["a"], data["model"]["a"])
        np.testing.assert_array_equal(got["model"]["b"], data["model"]["b"])
        assert got["model"]["c"] == np.float32(2.5) and got["meta"] == data["meta"]


@pytest.mark.parametrize("content,reason", [
    (b"", r"the file is empty \(0 bytes\)"),
    (b"PK\x03\x04" + b"\x00" * 64, "truncated or not a checkpoint"),
    (bytes(range(256)) * 8, "not a valid checkpoint"),
])
def test_damaged_files_are_named_with_the_reason(tmp_path, content, reason):
    path = tmp_path / "model_final.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointReadError, match=reason) as err:
        load_torch_file(str(path))
    assert str(path) in str(err.value) and "weights_only" not in str(err.value)


# ----------------------------------------------------------------------------- the tools
@pytest.mark.parametrize("tool", [
    lambda src, dst: import_tool.main([src, dst]),
    lambda src, dst: convert_to_detectron2.main([src, dst]),
    lambda src, dst: rescale_conv_norms.main([src, dst]),
], ids=["import_checkpoint", "convert_to_detectron2", "rescale_conv_norms"])
def test_tools_refuse_a_payload_checkpoint(tmp_path, tool):
    marker = tmp_path / "marker"
    src = payload_file(tmp_path, "official.pth", marker)
    with pytest.raises(SystemExit) as err:
        tool(src, str(tmp_path / "out.pth"))
    assert f"Cannot read {src}: it names " in str(err.value.code)
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


def test_probe_refuses_payload_weights(tmp_path):
    marker = tmp_path / "marker"
    weights = payload_file(tmp_path, "w.pkl", marker)
    with pytest.raises(CheckpointReadError, match=f"Cannot read {weights}: it names "):
        probe_tool.main(["--config-file", os.path.join(QS, "mocov2_instant_test.yaml"), "--weights", weights,
                         *SMALL_PRETRAIN])
    assert not marker.exists()


def test_checkpointer_refuses_payload_weights_of_a_detector(tmp_path):
    marker = tmp_path / "marker"
    for name in ("w.pkl", "w.pth"):
        path = payload_file(tmp_path, name, marker)
        with pytest.raises(CheckpointReadError, match=f"Cannot read {path}: it names "):
            RegionSSLCheckpointer(torch.nn.Linear(2, 2)).load(path)
    assert not marker.exists()


def test_transfer_refuses_a_payload_checkpoint_before_running(tmp_path):
    marker = tmp_path / "marker"
    weights = payload_file(tmp_path, "mocov2.pkl", marker)
    with pytest.raises(SystemExit) as err:
        transfer_tool.main(["--finetune-config", os.path.join(QS, "finetune_coco_mask_rcnn_R_50_FPN_instant_test.yaml"),
                            "--models", weights, "--seeds", "0", "--output", str(tmp_path / "out")])
    assert f"Cannot read {weights}: it names " in str(err.value.code)
    assert not marker.exists() and not (tmp_path / "out" / "finetune").exists()


# ----------------------------------------------------------------------------- train_net
@pytest.mark.parametrize("name", ["w.pkl", "w.pth"])
def test_train_net_refuses_payload_model_weights(tmp_path, name):
    marker = tmp_path / "marker"
    weights = payload_file(tmp_path, name, marker)
    with pytest.raises(CheckpointReadError, match=f"Cannot read {weights}: it names "):
        train_net.main(train_args(os.path.join(QS, "mocov2_instant_test.yaml"), tmp_path / "out",
                                  "MODEL.WEIGHTS", weights))
    assert not marker.exists()
    assert not (tmp_path / "out" / "last_checkpoint").exists()


def test_eval_only_refuses_payload_model_weights(tmp_path):
    marker = tmp_path / "marker"
    weights = payload_file(tmp_path, "w.pkl", marker)
    with pytest.raises(CheckpointReadError, match=f"Cannot read {weights}: it names "):
        train_net.main(train_args(os.path.join(QS, "mocov2_instant_test.yaml"), tmp_path / "out",
                                  "MODEL.WEIGHTS", weights, eval_only=True))
    assert not marker.exists()


def test_resume_refuses_a_payload_named_by_last_checkpoint(tmp_path):
    marker = tmp_path / "marker"
    out = tmp_path / "out"
    out.mkdir()
    weights = payload_file(out, "model_final.pkl", marker)
    (out / "last_checkpoint").write_text("model_final.pkl")
    with pytest.raises(CheckpointReadError) as err:
        train_net.main(train_args(os.path.join(QS, "mocov2_instant_test.yaml"), out, resume=True))
    assert f"Cannot read {weights}: it names " in str(err.value) and "Nothing was overwritten" in str(err.value)
    assert not marker.exists()


def test_configs_with_python_tags_are_refused_everywhere(tmp_path):
    marker = tmp_path / "marker"
    config = payload_config(tmp_path, marker)
    expected = f"Config file {config}, line 2: .*python/object/apply:builtins.open.* Python YAML tags are not read"
    with pytest.raises(ValueError, match=expected):
        train_net.main(train_args(config, tmp_path / "out"))
    with pytest.raises(ValueError, match=expected):
        probe_tool.main(["--config-file", config])
    with pytest.raises(SystemExit, match=expected):
        transfer_tool.main(["--finetune-config", config, "--models", "random", "--output", str(tmp_path / "t")])
    assert not marker.exists()
