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
