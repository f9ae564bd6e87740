"""Per-level list settings of the wrong length stop at build time with a message naming the key
(never replaced silently, e.g. LEVEL_WEIGHTS by all ones)."""
import pytest
from detectron2.modeling import build_model
from PIL import Image

from regionssl.config import per_level
from regionssl.data import RegionSSLDatasetMapper
from regionssl.engine import get_regionssl_cfg

from conftest import qs_cfg as _cfg


@pytest.mark.parametrize(
    "config,opts,key,needed",
    [
        ("insloc_fpn_instant_test.yaml", ["MODEL.REGIONSSL.LEVEL_WEIGHTS", [1.0, 1.0]], "MODEL.REGIONSSL.LEVEL_WEIGHTS", 4),
        ("mocov2_instant_test.yaml", ["MODEL.REGIONSSL.LEVEL_WEIGHTS", [1.0, 0.5]], "MODEL.REGIONSSL.LEVEL_WEIGHTS", 1),
        ("resim_fpn_instant_test.yaml", ["MODEL.REGIONSSL.LEVEL_WEIGHTS", [1.0]], "MODEL.REGIONSSL.LEVEL_WEIGHTS", 2),
        ("resim_fpn_instant_test.yaml", ["MODEL.REGIONSSL.RESIM.GATHER_NEGATIVES", [True]], "MODEL.REGIONSSL.RESIM.GATHER_NEGATIVES", 2),
        ("resim_fpn_instant_test.yaml", ["INPUT.REGIONSSL.WINDOWS.SIZES", [24], "INPUT.REGIONSSL.WINDOWS.STRIDES", [16]],
         "INPUT.REGIONSSL.WINDOWS.SIZES", 2),
    ],
)
def test_model_keys_of_wrong_length_stop(config, opts, key, needed):
    cfg = _cfg(config, *opts)
    with pytest.raises(ValueError, match=rf"{key.replace('.', '[.]')} = .* it needs {needed}, one per entry of"):
        build_model(cfg)


@pytest.mark.parametrize(
    "opts,key",
    [
        (["INPUT.REGIONSSL.VIEW_GENERATOR", "TwoCropsSharedFlip", "INPUT.REGIONSSL.REGION_SAMPLER", "SlidingWindows",
          "INPUT.REGIONSSL.WINDOWS.SIZES", [48, 32], "INPUT.REGIONSSL.WINDOWS.STRIDES", [32]], "INPUT.REGIONSSL.WINDOWS.STRIDES"),
        (["INPUT.REGIONSSL.VIEW_GENERATOR", "MultiCrop", "INPUT.REGIONSSL.MULTI_CROP.MIN_SCALES", [0.14]],
         "INPUT.REGIONSSL.MULTI_CROP.MIN_SCALES"),
        (["INPUT.REGIONSSL.VIEW_GENERATOR", "MultiCrop", "INPUT.REGIONSSL.MULTI_CROP.SIZES", [224, 96, 64]],
         "INPUT.REGIONSSL.MULTI_CROP.SIZES"),
    ],
)
def test_input_keys_of_wrong_length_stop(tmp_path, opts, key):
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    cfg = get_regionssl_cfg(None, opts)
    with pytest.raises(ValueError, match=key.replace(".", "[.]")):
        RegionSSLDatasetMapper(cfg, dataset_dicts=[{"file_name": str(tmp_path / "a.png"), "image_id": 0}])


def test_per_level_message_and_pass_through():
    assert per_level("K", (1, 2), ["a", "b"]) == [1, 2]
    with pytest.raises(ValueError) as e:
        per_level("MODEL.REGIONSSL.LEVEL_WEIGHTS", [1.0], ["p2", "p3"])
    assert str(e.value) == ("MODEL.REGIONSSL.LEVEL_WEIGHTS = [1.0] has 1 entries; it needs 2, one per entry of "
                            "MODEL.REGIONSSL.IN_FEATURES = ['p2', 'p3'].")
