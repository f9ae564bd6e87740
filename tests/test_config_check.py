"""Config values out of range stop the build with one line naming the key and its allowed range."""
import glob
import os

import pytest

from conftest import CONFIGS, qs_cfg

from regionssl.config_check import ConfigValueError, check_config, crop_memory_bytes
from regionssl.engine.trainer import PretrainTrainer

GiB = 2**30

# (overrides, the line the error must hold)
CASES = [
    (["MODEL.REGIONSSL.TEMPERATURE", -0.2], "MODEL.REGIONSSL.TEMPERATURE = -0.2: allowed: a number > 0"),
    (["MODEL.REGIONSSL.MOMENTUM.BASE", 1.5], "MODEL.REGIONSSL.MOMENTUM.BASE = 1.5: allowed: a number in [0, 1]"),
    (["MODEL.REGIONSSL.PROJECTOR.OUT_DIM", 0], "MODEL.REGIONSSL.PROJECTOR.OUT_DIM = 0: allowed: an integer >= 1"),
    (["MODEL.REGIONSSL.QUEUE.SIZE", -5], "MODEL.REGIONSSL.QUEUE.SIZE = -5: allowed: an integer >= 0"),
    (["INPUT.REGIONSSL.CROP_SCALE", (1.0, 0.2)],
     "INPUT.REGIONSSL.CROP_SCALE = (1.0, 0.2): allowed: two values lo <= hi, each a number in (0, 1]"),
    (["INPUT.REGIONSSL.CROP_SCALE", (0.2,)],
     "INPUT.REGIONSSL.CROP_SCALE = (0.2,): allowed: two values lo <= hi, each a number in (0, 1]"),
    (["INPUT.REGIONSSL.FLIP_PROB", 2.0], "INPUT.REGIONSSL.FLIP_PROB = 2.0: allowed: a number in [0, 1]"),
    (["INPUT.REGIONSSL.INTERSECTION.MAX_BOXES", 0],
     "INPUT.REGIONSSL.INTERSECTION.MAX_BOXES = 0: allowed: an integer >= 1"),
    (["INPUT.REGIONSSL.CROP_SIZE", 0], "INPUT.REGIONSSL.CROP_SIZE = 0: allowed: an integer >= 32"),
    (["MODEL.REGIONSSL.SWAV.NUM_PROTOTYPES", 0], "MODEL.REGIONSSL.SWAV.NUM_PROTOTYPES = 0: allowed: an integer >= 1"),
    (["INPUT.REGIONSSL.CROP_SIZE", 2048],  # 4 images x 2 views x 2048^2 px x 2500 B = 78 GiB on a 24 GiB machine
     "INPUT.REGIONSSL.CROP_SIZE = 2048: allowed: at most about 1600 at SOLVER.IMS_PER_BATCH 4 (the views of one "
     "process's batch would need about 78 GiB to train, this device has 24 GiB; or raise "
     "SOLVER.REGIONSSL.ACCUMULATE)"),
    (["INPUT.REGIONSSL.PHOTOMETRIC.BLUR_PROB", [0.5, 1.2]],
     "INPUT.REGIONSSL.PHOTOMETRIC.BLUR_PROB = [0.5, 1.2]: allowed: each value a number in [0, 1]"),
    (["INPUT.REGIONSSL.MULTI_CROP.SIZES", [224]],
     "INPUT.REGIONSSL.MULTI_CROP.{NUM_CROPS,SIZES,MIN_SCALES,MAX_SCALES} = [[2, 6], [224], [0.14, 0.05], [1.0, 0.14]]"
     ": allowed: one entry per resolution in each"),
    (["SOLVER.REGIONSSL.ACCUMULATE", 0], "SOLVER.REGIONSSL.ACCUMULATE = 0: allowed: an integer >= 1"),
]


@pytest.mark.parametrize("opts,line", CASES, ids=[f"{c[0][0]}={c[0][1]}" for c in CASES])
def test_each_bad_value_is_named_with_its_range(opts, line):
    cfg = qs_cfg("mocov2_instant_test.yaml", *opts)
    with pytest.raises(ConfigValueError) as err:
        check_config(cfg, memory_bytes=24 * GiB)
    lines = str(err.value).splitlines()
    assert lines == ["Config values out of range:", "  " + line]


def test_the_trainer_checks_at_build_time():
    cfg = qs_cfg("mocov2_instant_test.yaml", "MODEL.REGIONSSL.TEMPERATURE", -0.2, "INPUT.REGIONSSL.FLIP_PROB", 2.0)
    with pytest.raises(ConfigValueError) as err:
        PretrainTrainer(cfg)
    assert str(err.value).splitlines()[1:] == [
        "  MODEL.REGIONSSL.TEMPERATURE = -0.2: allowed: a number > 0",
        "  INPUT.REGIONSSL.FLIP_PROB = 2.0: allowed: a number in [0, 1]",
    ]


def test_crop_memory_counts_every_view_of_a_process():
    cfg = qs_cfg("swav_instant_test.yaml", "SOLVER.IMS_PER_BATCH", 8, "INPUT.REGIONSSL.MULTI_CROP.NUM_CROPS", [2, 4],
                 "INPUT.REGIONSSL.MULTI_CROP.SIZES", [96, 48])
    assert crop_memory_bytes(cfg, world_size=2) == 4 * (2 * 96**2 + 4 * 48**2) * 2500


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)),
                         ids=lambda p: os.path.relpath(p, CONFIGS))
def test_shipped_configs_pass_on_their_gpus(path):
    """Every config passes on the processes it is written for (REFERENCE_WORLD_SIZE, else 8) with
    32 GiB each (the V100s of the official recipes)."""
    from regionssl.engine import get_regionssl_cfg

    cfg = get_regionssl_cfg(path)
    check_config(cfg, world_size=cfg.SOLVER.REFERENCE_WORLD_SIZE or 8, memory_bytes=32 * GiB)
