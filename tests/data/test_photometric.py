"""Tests for the photometric augmentations (regionssl/data/photometric.py)."""
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from detectron2.data import transforms as T

from regionssl.data import photometric as P


def _images():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    # A smooth, saturated image (colour gradients) exercises hue/saturation more than noise.
    yy, xx = np.mgrid[0:40, 0:56]
    smooth = np.stack([xx * 255 / 55, yy * 255 / 39, 255 - xx * 255 / 55], -1).astype(np.uint8)
    return [noise, smooth]


def _tv(img, fn, *args):
    """Apply a torchvision functional op to an HWC uint8 array through the tensor path."""
    out = fn(torch.from_numpy(img).permute(2, 0, 1).contiguous(), *args)
    return out.permute(1, 2, 0).numpy()


def _maxdiff(a, b):
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


@pytest.mark.parametrize("factor", [0.2, 0.6, 0.85, 1.0, 1.3, 1.8])
@pytest.mark.parametrize(
    "ours,theirs",
    [
        (P.adjust_brightness, TF.adjust_brightness),
        (P.adjust_contrast, TF.adjust_contrast),
        (P.adjust_saturation, TF.adjust_saturation),
    ],
)
def test_blend_ops_match_torchvision(ours, theirs, factor):
    for img in _images():
        out = ours(img, factor)
        assert out.dtype == np.uint8 and out.shape == img.shape
        # We round where torchvision truncates (and our luma is rounded): <= 2 levels apart.
        assert _maxdiff(out, _tv(img, theirs, factor)) <= 2


@pytest.mark.parametrize("hue", [-0.5, -0.3, -0.1, 0.0, 0.05, 0.25, 0.5])
def test_hue_matches_torchvision(hue):
    for img in _images():
        out = P.adjust_hue(img, hue)
        assert out.dtype == np.uint8 and out.shape == img.shape
        assert _maxdiff(out, _tv(img, TF.adjust_hue, hue)) <= 2


def test_jitter_transform_applies_ops_in_given_order():
    img = _images()[1]
    t = P.ColorJitterTransform(
        brightness=1.3, contrast=0.7, saturation=None, hue=0.1, order=(3, 1, 0, 2)
    )
    expected = P.adjust_brightness(P.adjust_contrast(P.adjust_hue(img, 0.1), 0.7), 1.3)
    assert np.array_equal(t.apply_image(img), expected)
    # Same factors in torchvision, same order: the <= 1-level per-op differences compound through
    # the later factors (1 -> 0.7 * 1 + 1 -> 1.3 * 1.7 + 1), so allow 4 levels after three ops.
    tv = _tv(_tv(_tv(img, TF.adjust_hue, 0.1), TF.adjust_contrast, 0.7), TF.adjust_brightness, 1.3)
    assert _maxdiff(t.apply_image(img), tv) <= 4


def test_grayscale_matches_torchvision_and_channels_equal():
    for img in _images():
        out = P.GrayscaleTransform().apply_image(img)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
        assert _maxdiff(out, _tv(img, TF.rgb_to_grayscale, 3)) <= 1


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 2.0])
def test_gaussian_blur_matches_torchvision(sigma):
    # torchvision with BYOL's 23-px kernel; ours truncates at 4 sigma (kernel 2*ceil(4s)+1).
    for img in _images():
        out = P.GaussianBlurTransform(sigma).apply_image(img)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert _maxdiff(out, _tv(img, TF.gaussian_blur, [23, 23], [sigma, sigma])) <= 2


def test_solarize_inverts_exactly_pixels_from_128():
    img = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    out = P.SolarizeTransform(128).apply_image(img)
    v = img.astype(np.int32)
    assert np.array_equal(out, np.where(v >= 128, 255 - v, v).astype(np.uint8))
    assert out[8, 0, 0] == 127 and out[7, 15, 0] == 127  # 128 -> 127 and 127 stays 127
    assert np.array_equal(out, _tv(img, TF.solarize, 128))


def test_resize_blur_smooths_and_keeps_shape():
    img = _images()[0]
    for factor in (1.1, 1.2, 1.5):
        out = P.ResizeBlurTransform(factor).apply_image(img)
        assert out.shape == img.shape and out.dtype == np.uint8
        # Less high-frequency energy (neighbour differences) than the noise input.
        hf = lambda x: np.abs(np.diff(x.astype(np.float32), axis=1)).mean()  # noqa: E731
        assert hf(out) < 0.9 * hf(img)
        assert abs(out.astype(np.float32).mean() - img.astype(np.float32).mean()) < 3


ALL_TRANSFORMS = [
    P.ColorJitterTransform(1.2, 0.8, 1.3, -0.05, (2, 0, 3, 1)),
    P.GrayscaleTransform(),
    P.GaussianBlurTransform(1.5),
    P.ResizeBlurTransform(1.2),
    P.SolarizeTransform(128),
]


@pytest.mark.parametrize("t", ALL_TRANSFORMS, ids=lambda t: type(t).__name__)
def test_geometry_untouched_and_dtype_shape_kept(t):
    boxes = np.array([[1.5, 2.0, 30.25, 40.0], [0.0, 0.0, 64.0, 48.0]], dtype=np.float32)
    coords = np.array([[3.0, 4.0], [10.5, 0.25]])
    seg = np.arange(48 * 64, dtype=np.uint8).reshape(48, 64)
    assert t.apply_box(boxes) is boxes
    assert t.apply_coords(coords) is coords
    assert t.apply_segmentation(seg) is seg
    assert np.array_equal(t.apply_polygons([coords])[0], coords)
    for img in _images() + [np.full((7, 5, 3), 200, np.uint8), np.zeros((1, 1, 3), np.uint8)]:
        out = t.apply_image(img)
        assert out.dtype == np.uint8 and out.shape == img.shape


def _augs(prob):
    return [
        P.RandomColorJitter(prob=prob),
        P.RandomGrayscale(prob),
        P.RandomGaussianBlur(prob=prob),
        P.RandomResizeBlur(prob=prob),
        P.RandomSolarize(prob=prob),
    ]


@pytest.mark.parametrize("idx", range(5))
def test_probability_zero_is_identity_one_changes(idx):
    np.random.seed(0)
    img = _images()[0]
    t0 = _augs(0.0)[idx].get_transform(img)
    assert isinstance(t0, T.NoOpTransform) and t0.apply_image(img) is img
    t1 = _augs(1.0)[idx].get_transform(img)
    assert not isinstance(t1, T.NoOpTransform)
    out = t1.apply_image(img)
    assert out.dtype == np.uint8 and out.shape == img.shape and not np.array_equal(out, img)


def test_jitter_factor_ranges_and_random_order():
    np.random.seed(0)
    aug = P.RandomColorJitter(0.4, 0.4, 0.2, 0.1, prob=1.0)
    orders = set()
    for _ in range(200):
        t = aug.get_transform(None)
        assert 0.6 <= t.brightness <= 1.4 and 0.6 <= t.contrast <= 1.4
        assert 0.8 <= t.saturation <= 1.2 and -0.1 <= t.hue <= 0.1
        assert sorted(t.order) == [0, 1, 2, 3]
        orders.add(t.order)
    assert len(orders) > 12  # random order, not fixed
    t = P.RandomColorJitter(0.4, 0.0, 0.0, 0.0, prob=1.0).get_transform(None)
    assert t.contrast is None and t.saturation is None and t.hue is None


def test_builder_order_and_options():
    augs = P.build_photometric_augmentations()
    assert [type(a) for a in augs] == [P.RandomColorJitter, P.RandomGrayscale, P.RandomGaussianBlur]
    assert augs[0].prob == 0.8 and augs[1].prob == 0.2 and augs[2].prob == 0.5
    j = augs[0]
    assert (j.brightness, j.contrast, j.saturation, j.hue) == (0.4, 0.4, 0.4, 0.1)
    augs = P.build_photometric_augmentations(
        jitter=(0.4, 0.4, 0.2, 0.1), blur_prob=1.0, blur_type="resize", solarize_prob=0.2
    )
    assert [type(a) for a in augs] == [
        P.RandomColorJitter, P.RandomGrayscale, P.RandomResizeBlur, P.RandomSolarize
    ]
    assert P.build_photometric_augmentations(
        jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0
    ) == []
    with pytest.raises(AssertionError):
        P.build_photometric_augmentations(blur_type="median")


def test_augmentation_list_keeps_boxes():
    np.random.seed(1)
    img = _images()[0]
    boxes = np.array([[1.0, 2.0, 20.0, 30.0]], dtype=np.float32)
    aug_input = T.AugInput(img.copy(), boxes=boxes.copy())
    tfms = T.AugmentationList(
        P.build_photometric_augmentations(jitter_prob=1.0, grayscale_prob=1.0, blur_prob=1.0,
                                          solarize_prob=1.0)
    )(aug_input)
    assert np.array_equal(aug_input.boxes, boxes)
    assert np.array_equal(tfms.apply_box(boxes), boxes)
    assert aug_input.image.dtype == np.uint8 and aug_input.image.shape == img.shape


# ----------------------------------------------------------------------------- official variants
def test_resize_blur_is_torchvision_resize_of_a_pil_image():
    """SCRL's ResizeBlur = torchvision ``F.resize`` of a PIL image, bicubic, down then up (PIL
    antialiases the downscale): equal pixel for pixel."""
    from PIL import Image

    img = _images()[0]
    for factor in (1.1, 1.2, 1.5):
        h, w = img.shape[:2]
        pil = Image.fromarray(img)
        down = TF.resize(pil, [int(h // factor), int(w // factor)], interpolation=TF.InterpolationMode.BICUBIC)
        ref = np.asarray(TF.resize(down, [h, w], interpolation=TF.InterpolationMode.BICUBIC))
        assert np.array_equal(P.ResizeBlurTransform(factor).apply_image(img), ref)


def _f(pixels):
    return np.asarray(pixels, dtype=np.float32).reshape(1, -1, 3) / np.float32(255.0)


def _u8(x):
    return np.rint(np.asarray(x) * 255.0).astype(np.int64).reshape(-1, 3).tolist()


def test_deepmind_colour_ops_pinned():
    """DeepMind BYOL's ops (byol/utils/augmentations.py) on fixed pixels, worked by hand:
    brightness +0.2 = +51 levels, clipped; contrast 0.5 towards each channel's own mean
    (R 150, G 50, B 100); saturation f scales S = (max - min) / max, keeping max, clipped at S = 1:
    (200, 100, 50) has S = 0.75, f = 1.2 -> S = 0.9 -> (200, 80, 20); f = 2 -> S = 1 -> (200, 67, 0);
    f = 0.5 -> (200, 150, 125); grey stays grey."""
    assert _u8(P.deepmind_brightness(_f([[100, 230, 0]]), 0.2)) == [[151, 255, 51]]
    assert _u8(P.deepmind_brightness(_f([[100, 230, 0]]), -0.2)) == [[49, 179, 0]]
    two = _f([[200, 0, 50], [100, 100, 150]])
    assert _u8(P.deepmind_contrast(two, 0.5)) == [[175, 25, 75], [125, 75, 125]]
    px = _f([[200, 100, 50], [90, 90, 90]])
    assert _u8(P.deepmind_saturation(px, 1.2)) == [[200, 80, 20], [90, 90, 90]]
    assert _u8(P.deepmind_saturation(px, 2.0)) == [[200, 67, 0], [90, 90, 90]]
    assert _u8(P.deepmind_saturation(px, 0.5)) == [[200, 150, 125], [90, 90, 90]]
    # the torchvision semantics give other numbers on the same pixels (blend with luma / black)
    assert P.adjust_saturation(np.uint8([[[200, 100, 50]]]), 1.2).tolist() == [[[215, 95, 35]]]
    assert P.adjust_brightness(np.uint8([[[100, 230, 0]]]), 1.2).tolist() == [[[120, 255, 0]]]


def test_deepmind_saturation_matches_hsv_round_trip():
    """The closed form equals HSV (colorsys) -> S * f clipped to [0, 1] -> RGB, on random pixels."""
    import colorsys

    rng = np.random.default_rng(0)
    x = rng.random((1, 400, 3), dtype=np.float32)
    x[0, :20] = x[0, :20, :1]  # some grey pixels
    for factor in (0.0, 0.6, 1.0, 1.3, 3.0):
        ours = P.deepmind_saturation(x, factor)[0]
        ref = []
        for r, g, b in x[0].astype(np.float64):
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            ref.append(colorsys.hsv_to_rgb(h, min(max(s * factor, 0.0), 1.0), v))
        np.testing.assert_allclose(ours, np.array(ref), atol=2e-6)


def test_deepmind_jitter_transform_rounds_once():
    """Contrast 0.5 then brightness +0.2 in float, one rounding at the end (levels are exact here)."""
    img = np.uint8([[[200, 0, 50], [100, 100, 150]]])
    t = P.ColorJitterTransform(brightness=0.2, contrast=0.5, order=(1, 0, 2, 3), semantics="deepmind")
    assert t.apply_image(img).tolist() == [[[226, 76, 126], [176, 126, 176]]]
    with pytest.raises(AssertionError):
        P.ColorJitterTransform(semantics="pil")


def test_deepmind_brightness_is_additive_in_distribution():
    """On a dark image (level 20) DeepMind's brightness delta ~ U(-0.4, 0.4) reaches level 100 with
    probability (0.4 - 80/255) / 0.8 = 0.108 and clips to 0 with probability (0.4 - 20/255) / 0.8
    = 0.402; torchvision's factor ~ U(0.6, 1.4) keeps it within 12..28."""
    img = np.full((4, 4, 3), 20, np.uint8)
    np.random.seed(0)
    for semantics, p100, p0 in (("deepmind", 0.108, 0.402), ("torchvision", 0.0, 0.0)):
        aug = P.RandomColorJitter(0.4, 0.0, 0.0, 0.0, prob=1.0, semantics=semantics)
        levels = np.array([aug.get_transform(img).apply_image(img)[0, 0, 0] for _ in range(2000)])
        assert abs((levels >= 100).mean() - p100) < 0.03 and abs((levels == 0).mean() - p0) < 0.04
        if semantics == "torchvision":
            assert levels.min() >= 12 and levels.max() <= 28


def test_configs_choose_official_photometric_variants(tmp_path):
    """byol.yaml (and cvsa.yaml, stage 2 of BYOL) use DeepMind's colour ops; ReSim blurs first;
    the others keep torchvision's jitter after which the blur comes."""
    from PIL import Image

    from regionssl.data import RegionSSLDatasetMapper
    from regionssl.engine import get_regionssl_cfg

    path = tmp_path / "a.png"
    Image.fromarray(_images()[1]).save(path)
    dicts = [{"file_name": str(path), "image_id": 0}]

    def pipeline(config):
        mapper = RegionSSLDatasetMapper(get_regionssl_cfg(config, []), dataset_dicts=dicts)
        return mapper.photometric[0].augs

    for config, semantics, blur_first in (("configs/byol.yaml", "deepmind", False), ("configs/cvsa.yaml", "deepmind", False),
                                          ("configs/scrl.yaml", "torchvision", False), ("configs/resim_fpn.yaml", "torchvision", True),
                                          ("configs/resim_c4.yaml", "torchvision", True), ("configs/mocov2.yaml", "torchvision", False)):
        augs = pipeline(config)
        jitter = next(a for a in augs if isinstance(a, P.RandomColorJitter))
        assert jitter.semantics == semantics, config
        blur = next(i for i, a in enumerate(augs) if isinstance(a, (P.RandomGaussianBlur, P.RandomResizeBlur)))
        assert (blur < augs.index(jitter)) == blur_first, config
