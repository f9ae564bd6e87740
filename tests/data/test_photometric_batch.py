"""Photometric ops on the model's device (INPUT.REGIONSSL.PHOTOMETRIC.ON_DEVICE) against the mapper's:
for fixed parameters every op gives the mapper's uint8 result within 1 grey level, batched with
different parameters per image; the mapper ships the same draws; a training step runs with it."""
import numpy as np
import pytest
import torch

from regionssl.data import photometric as P
from regionssl.data.photometric_batch import NUM_PARAMS, apply_photometric, encode_photometric


def _images(n=3, h=40, w=56):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([xx * 255 / (w - 1), yy * 255 / (h - 1), 255 - xx * 255 / (w - 1)], -1).astype(np.uint8)
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    dark = (noise // 4).astype(np.uint8)
    return [smooth, noise, dark][:n]


def _both(transforms_per_image, deepmind=False, blur_first=False):
    """(mapper results, device results) for one transform list per image."""
    imgs = _images(len(transforms_per_image))
    mapper = []
    for img, tfms in zip(imgs, transforms_per_image):
        out = img
        for t in tfms:
            out = t.apply_image(out)
        mapper.append(out)
    params = torch.stack([encode_photometric(t, deepmind, blur_first) for t in transforms_per_image])
    assert params.shape == (len(imgs), NUM_PARAMS)
    batch = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    device = apply_photometric(batch, params).permute(0, 2, 3, 1).numpy()
    return np.stack(mapper), device


def _maxdiff(a, b):
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


J = P.ColorJitterTransform
# factors as drawn (continuous): round decimal ones make exact .5 ties, where float32 and float64 differ
CASES = {
    "brightness": [[J(brightness=f)] for f in (0.613, 1.0, 1.377)],
    "contrast": [[J(contrast=f)] for f in (0.641, 1.289, 1.0)],
    "saturation": [[J(saturation=f)] for f in (0.0, 0.717, 1.763)],
    "hue": [[J(hue=f)] for f in (-0.41, 0.093, 0.5)],
    "grayscale": [[P.GrayscaleTransform()], [], [J(1.217), P.GrayscaleTransform()]],
    "gaussian blur": [[P.GaussianBlurTransform(s)] for s in (0.1, 1.0, 2.0)],
    "resize blur": [[P.ResizeBlurTransform(f)] for f in (1.1, 1.5, 1.2)],
    "solarize": [[P.SolarizeTransform(128)], [], [J(0.821), P.SolarizeTransform(128)]],
}
CHAINS = {
    "jitter, three orders": [[J(1.313, 0.687, 1.219, 0.093, order)] for order in ((0, 1, 2, 3), (3, 1, 0, 2), (2, 3, 1, 0))],
    "all, per image": [[J(0.823, 1.211, 0.537, -0.187, (1, 0, 3, 2)), P.GrayscaleTransform(), P.GaussianBlurTransform(1.5),
                        P.SolarizeTransform(128)], [P.GaussianBlurTransform(0.7)], [J(1.107, None, 1.291, None)]],
}


@pytest.mark.parametrize("case", list(CASES))
def test_device_ops_equal_mapper_ops(case):
    mapper, device = _both(CASES[case])
    assert device.dtype == np.uint8 and device.shape == mapper.shape
    assert _maxdiff(mapper, device) <= 1, case


@pytest.mark.parametrize("case", list(CHAINS))
def test_device_op_chains_equal_mapper_chains(case):
    # a rare 1-level tie difference after one op is scaled by the later factors (as between the
    # mapper and torchvision, tests/data/test_photometric.py): bounded, and almost every pixel equal
    mapper, device = _both(CHAINS[case])
    assert _chain_close(mapper, device), case


def _chain_close(a, b):
    diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return diff.max() <= 4 and (diff > 1).mean() < 0.005


def test_deepmind_jitter_and_blur_first_order():
    dm = [[J(0.2, 0.7, 1.5, 0.1, (0, 1, 2, 3), "deepmind")], [J(-0.3, 1.4, 0.4, -0.3, (3, 2, 1, 0), "deepmind")],
          [J(None, 0.5, None, 0.25, (2, 0, 3, 1), "deepmind")]]
    mapper, device = _both(dm, deepmind=True)
    assert _maxdiff(mapper, device) <= 1
    # ReSim: blur before the colour ops (the mapper applies the list in that order)
    first = [[P.GaussianBlurTransform(1.5), J(1.393, 0.611, 1.0, 0.207), P.GrayscaleTransform()]] * 3
    mapper, device = _both(first, blur_first=True)
    assert _maxdiff(mapper, device) <= 1


def test_mapper_ships_the_same_draws_and_a_step_runs(tmp_path):
    from detectron2.modeling import build_model
    from PIL import Image

    from regionssl.data import RegionSSLDatasetMapper
    from regionssl.engine import get_regionssl_cfg

    img = _images(1, 120, 160)[0]
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=95)
    dicts = [{"file_name": str(tmp_path / "a.jpg"), "image_id": 0}]
    opts = ["MODEL.DEVICE", "cpu", "INPUT.REGIONSSL.CROP_SIZE", 64, "MODEL.RESNETS.DEPTH", 18,
            "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.REGIONSSL.QUEUE.SIZE", 0, "SOLVER.IMS_PER_BATCH", 2,
            "INPUT.REGIONSSL.PHOTOMETRIC.COLOR_JITTER_PROB", 1.0, "INPUT.REGIONSSL.PHOTOMETRIC.BLUR_PROB", [1.0]]
    outs = {}
    for on in (False, True):
        cfg = get_regionssl_cfg("configs/mocov2.yaml", opts + ["INPUT.REGIONSSL.PHOTOMETRIC.ON_DEVICE", on])
        mapper = RegionSSLDatasetMapper(cfg, dataset_dicts=dicts)
        np.random.seed(3)
        outs[on] = [mapper(dicts[0]) for _ in range(2)]
    assert "photometric" not in outs[False][0] and outs[True][0]["photometric"].shape == (2, NUM_PARAMS)
    for off, on in zip(outs[False], outs[True]):
        applied = apply_photometric(torch.stack(on["views"]), on["photometric"])
        assert _chain_close(applied.numpy(), torch.stack(off["views"]).numpy())  # jitter + blur drawn
        assert torch.equal(on["boxes"][0], off["boxes"][0])
    model = build_model(cfg).train()
    losses = model(outs[True])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
