"""The importer checks the trunk against the detector's before writing, names what it cannot read,
and records the input format; the checkpointer warns when a config disagrees with it."""
import logging
import pickle

import pytest
import torch
import torchvision

from conftest import cfg_of

from regionssl_workbench.scripts import load_script

convert_to_detectron2 = load_script("tools/convert_to_detectron2.py")
import_tool = load_script("tools/import_checkpoint.py")

from regionssl.checkpoint import TORCHVISION_INPUT, RegionSSLCheckpointer, input_format_of, read_checkpoint
from regionssl.checkpoint_import import TrunkMismatchError, UnplacedKeysError, import_checkpoint


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tv") / "resnet50.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), path)
    return str(path)


def test_a_wide_resnet_stops_before_anything_is_written(tmp_path):
    src, dst = str(tmp_path / "rn50w2.pth"), tmp_path / "imported.pth"
    wide = torchvision.models.wide_resnet50_2().state_dict()  # the inner width of every bottleneck doubled
    torch.save({"state_dict": {f"module.{k}": v for k, v in wide.items() if not k.startswith("fc.")}}, src)
    with pytest.raises(TrunkMismatchError) as err:
        import_checkpoint(src, str(dst), "swav")
    text = str(err.value)
    assert text.startswith(f"{src}: layout 'swav' gives a ResNet that does not fit the target ResNet-50 of "
                           "configs/Base-RegionSSL.yaml: 176 with other shapes (res2.0.conv1.weight (128, 64, 1, 1) "
                           "vs (64, 64, 1, 1),")
    assert "give the detector config it is for (--config-file)" in text
    assert not dst.exists()


def test_a_deeper_resnet_is_accepted_with_its_config(tmp_path):
    src, dst = str(tmp_path / "rn101.pth"), str(tmp_path / "imported.pth")
    torch.save(torchvision.models.resnet101().state_dict(), src)
    # 17 more res4 blocks than a ResNet-50, 18 tensors each (3 convs, 3 x 5 BN tensors)
    with pytest.raises(TrunkMismatchError, match=r"306 the target lacks \(res4\.6\.conv1\.weight"):
        import_checkpoint(src, dst, "byol")
    result = import_checkpoint(src, dst, "byol", target_cfg=cfg_of("Base-RegionSSL.yaml", "MODEL.RESNETS.DEPTH", 101))
    assert len(result["converted"]) == len(torchvision.models.resnet101().state_dict()) - 2  # fc dropped


def test_incomplete_trunk_in_auto_mode_is_named(resnet50_file, tmp_path):
    sd = {k: v for k, v in torch.load(resnet50_file, weights_only=True).items() if not k.startswith("layer4.")}
    src = str(tmp_path / "no_layer4.pth")
    torch.save(sd, src)
    with pytest.raises(UnplacedKeysError, match=f"{src}: layout 'byol' places every key but finds no ResNet res5 keys "
                                                r"\(incomplete trunk\)"):
        import_checkpoint(src, str(tmp_path / "x.pth"))


def test_a_detectron2_pkl_is_recognised(resnet50_file, tmp_path):
    src = str(tmp_path / "R-50.pkl")
    with open(src, "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": torch.zeros(1).numpy()}, "__author__": "Detectron2",
                     "matching_heuristics": True}, f)
    with pytest.raises(SystemExit, match=f"{src} is a Detectron2 .pkl .* give it as MODEL.WEIGHTS directly"):
        import_tool.main([src, str(tmp_path / "x.pth")])


def test_a_truncated_file_is_named(resnet50_file, tmp_path):
    src = tmp_path / "cut.pth"
    data = open(resnet50_file, "rb").read()
    src.write_bytes(data[: len(data) // 3])
    with pytest.raises(SystemExit, match=f"Cannot read {src}: the file is truncated"):
        import_tool.main([str(src), str(tmp_path / "x.pth")])


def test_input_format_is_written_printed_and_checked(resnet50_file, tmp_path, capsys, caplog):
    dst, pkl = str(tmp_path / "imported.pth"), str(tmp_path / "imported.pkl")
    import_tool.main([resnet50_file, dst, "--pkl", pkl])
    out = capsys.readouterr().out
    assert ("a fine-tuning config needs: INPUT.FORMAT RGB MODEL.PIXEL_MEAN [123.675, 116.28, 103.53] "
            "MODEL.PIXEL_STD [58.395, 57.12, 57.375] MODEL.RESNETS.STRIDE_IN_1X1 False") in out
    assert read_checkpoint(dst)["regionssl"]["input_format"] == TORCHVISION_INPUT
    with open(pkl, "rb") as f:
        assert pickle.load(f)["regionssl_input_format"] == TORCHVISION_INPUT
    stock = cfg_of("Base-RegionSSL.yaml", "INPUT.FORMAT", "BGR", "MODEL.PIXEL_MEAN", [103.53, 116.28, 123.675],
                   "MODEL.PIXEL_STD", [1.0, 1.0, 1.0], "MODEL.RESNETS.STRIDE_IN_1X1", True)
    for path in (dst, pkl):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            RegionSSLCheckpointer(torch.nn.Linear(2, 2), input_format=input_format_of(stock)).load(path)
        assert ("These weights were trained on another input than this config gives: INPUT.FORMAT RGB in the "
                "weights, BGR in this config; MODEL.PIXEL_MEAN [123.675, 116.28, 103.53] in the weights, "
                "[103.53, 116.28, 123.675] in this config; MODEL.PIXEL_STD [58.395, 57.12, 57.375] in the weights, "
                "[1.0, 1.0, 1.0] in this config; MODEL.RESNETS.STRIDE_IN_1X1 False in the weights, True in this "
                "config") in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            RegionSSLCheckpointer(torch.nn.Linear(2, 2),
                                  input_format=input_format_of(cfg_of("Base-RegionSSL.yaml"))).load(path)
        assert "trained on another input" not in caplog.text
