"""Photometric augmentations (MoCo-v2 / BYOL / SCRL) as Detectron2 ``Augmentation``s.

Every transform here changes pixel values only: ``apply_coords``, ``apply_box`` and
``apply_segmentation`` return their input unchanged, so boxes sampled before these ops stay valid.
Images are (H, W, 3) uint8 RGB arrays in and out. The colour ops follow the semantics of
``torchvision.transforms.functional`` (brightness = blend with black, contrast = blend with the
mean of the grayscale image, saturation = blend with the grayscale image, hue = rotation in HSV,
grayscale weights 0.2989/0.587/0.114) but round to nearest where torchvision truncates, so
results agree within 1-2 intensity levels. Brightness, contrast and solarize are uint8 lookup
tables; only the hue rotation goes through float32.

``semantics="deepmind"`` gives the colour jitter of DeepMind's BYOL instead
(google-deepmind/deepmind-research ``byol/utils/augmentations.py``, docs/methods/byol.md), on
float32 images in [0, 1], clipped after every op and rounded once at the end: brightness *adds*
a delta ~ U(-b, b); contrast blends each channel with its *own* mean; saturation scales the HSV
saturation by f ~ U(1 - s, 1 + s), clipped to [0, 1] (value and hue kept); hue as torchvision.

Augmentations draw their randomness from ``np.random`` (seeded per data-loader worker by Detectron2)
and return ``NoOpTransform`` when their probability test fails. Detectron2's own ``ColorTransform``
wraps an opaque callable; the transforms below keep their drawn factors as attributes instead, so
``repr`` shows what was applied.
"""
import cv2
import numpy as np
from detectron2.data.transforms import Augmentation, NoOpTransform, Transform
from PIL import Image

__all__ = [
    "ColorJitterTransform", "GrayscaleTransform", "GaussianBlurTransform", "ResizeBlurTransform",
    "SolarizeTransform", "RandomColorJitter", "RandomGrayscale", "RandomGaussianBlur",
    "RandomResizeBlur", "RandomSolarize", "build_photometric_augmentations", "adjust_brightness",
    "adjust_contrast", "adjust_saturation", "adjust_hue", "JITTER_SEMANTICS", "deepmind_brightness",
    "deepmind_contrast", "deepmind_saturation", "deepmind_hue",
]

JITTER_SEMANTICS = ("torchvision", "deepmind")

_GRAY_WEIGHTS = np.array([[0.2989, 0.587, 0.114]], dtype=np.float32)  # torchvision's (R, G, B)


def _check(img):
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, (
        f"expected an (H, W, 3) uint8 RGB image, got {img.dtype} {img.shape}"
    )


def _gray(img):
    """(H, W, 3) uint8 -> (H, W) uint8 luma with torchvision's weights (rounded)."""
    return cv2.transform(img, _GRAY_WEIGHTS).reshape(img.shape[:2])


def _mix(img, matrix):
    """Per-pixel colour matrix: (H, W, 3) uint8 -> ``matrix @ rgb``, rounded and saturated, one pass."""
    return cv2.transform(img, np.asarray(matrix, dtype=np.float32)).reshape(img.shape)


def _mean_luma(img):
    """Mean of the (unrounded) luma, as torchvision's contrast takes it: weights . channel means."""
    return float(_GRAY_WEIGHTS[0] @ np.array(cv2.mean(img)[:3], dtype=np.float32)) if img.size else 0.0


def _lut(values):
    """Float table over 0..255 -> rounded, saturated uint8 lookup table."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


_LEVELS = np.arange(256, dtype=np.float64)


def adjust_brightness(img, factor):
    """Blend with black: ``factor * img``."""
    return cv2.LUT(img, _lut(factor * _LEVELS))


def adjust_contrast(img, factor):
    """Blend with the image's mean luma m: ``factor * img + (1 - factor) * m``."""
    return cv2.LUT(img, _lut(factor * _LEVELS + (1.0 - factor) * _mean_luma(img)))


def adjust_saturation(img, factor):
    """Blend with the per-pixel luma: ``factor * img + (1 - factor) * gray``, i.e. the colour matrix
    ``factor * I + (1 - factor) * 1 w^T`` (w: luma weights), in one pass."""
    return _mix(img, factor * np.eye(3) + (1.0 - factor) * np.repeat(_GRAY_WEIGHTS, 3, axis=0))


def adjust_hue(img, factor):
    """Rotate the hue by ``factor`` turns (in [-0.5, 0.5]), keeping saturation and value."""
    rgb = _rotate_hue(img.astype(np.float32), factor)
    rgb += 0.5  # HSV -> RGB stays within [min_c, max_c] of the input: in [0, 255], no clipping needed
    return rgb.astype(np.uint8)


def _rotate_hue(x, delta):
    """(H, W, 3) float32 RGB of any scale -> the same with the HSV hue turned by ``delta`` turns.

    OpenCV's float HSV keeps the scale (V = max_c x) and wraps any hue in [0, 720) degrees back, so
    adding ``delta mod 1`` turns needs no modulo pass.
    """
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # H in degrees
    hsv[..., 0] += np.float32(360.0 * (delta % 1.0))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


# DeepMind BYOL's colour ops, on float32 (H, W, 3) RGB in [0, 1]; each result is clipped to [0, 1].
def deepmind_brightness(x, delta):
    """``x + delta`` (additive, unlike torchvision's ``factor * x``)."""
    return np.clip(x + np.float32(delta), 0.0, 1.0)


def deepmind_contrast(x, factor):
    """``factor * (x - m_c) + m_c`` with m_c the mean of channel c (torchvision: the luma mean)."""
    mean = x.mean(axis=(0, 1), keepdims=True) if x.size else np.zeros((1, 1, 3), np.float32)
    return np.clip(factor * (x - mean) + mean, 0.0, 1.0)


def deepmind_saturation(x, factor):
    """HSV saturation S -> clip(factor * S, 0, 1), hue and value V kept (torchvision: blend with luma).

    Without the HSV round trip: with V = max_c x and S = (V - min_c x) / V, every channel is
    V (1 - S w_c) with w_c depending on the hue only, so the new channel is
    ``V - (V - x_c) * S' / S`` with ``S' / S = min(factor, 1 / S)``; grey pixels (S = 0) stay.
    """
    v = x.max(axis=2, keepdims=True)
    spread = v - x.min(axis=2, keepdims=True)  # V * S
    ratio = np.where(spread > 0, np.minimum(np.float32(factor), v / np.maximum(spread, 1e-12)), 1.0)
    return np.clip(v - (v - x) * ratio, 0.0, 1.0)


def deepmind_hue(x, delta):
    """HSV hue H -> (H + delta) mod 1 turn (the same rotation as torchvision's ``adjust_hue``)."""
    return np.clip(_rotate_hue(np.ascontiguousarray(x, dtype=np.float32), delta), 0.0, 1.0)


class _PixelTransform(Transform):
    """Base class: geometry-free transforms (identity on coordinates, boxes and masks)."""

    def apply_coords(self, coords):
        return coords

    def apply_box(self, box):
        return box

    def apply_segmentation(self, segmentation):
        return segmentation

    def inverse(self):
        return NoOpTransform()


class ColorJitterTransform(_PixelTransform):
    """Brightness/contrast/saturation/hue with fixed factors (None = skip), applied in ``order``
    (a permutation of 0..3 = brightness, contrast, saturation, hue), as torchvision ColorJitter.

    ``semantics="deepmind"``: DeepMind BYOL's ops (module docstring); ``brightness`` is then the
    additive delta in [0, 1] units, the others are factors (hue: turns) as before.
    """

    def __init__(self, brightness=None, contrast=None, saturation=None, hue=None,
                 order=(0, 1, 2, 3), semantics="torchvision"):
        super().__init__()
        assert semantics in JITTER_SEMANTICS, f"unknown colour jitter semantics {semantics!r}"
        self._set_attributes(locals())

    def apply_image(self, img):
        _check(img)
        factors = (self.brightness, self.contrast, self.saturation, self.hue)
        if self.semantics == "deepmind":
            ops = (deepmind_brightness, deepmind_contrast, deepmind_saturation, deepmind_hue)
            img = img.astype(np.float32) * np.float32(1.0 / 255.0)
        else:
            ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        for i in self.order:
            if factors[i] is not None:
                img = ops[i](img, factors[i])
        if self.semantics == "deepmind":  # one rounding at the end; DeepMind stays in float
            img = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
        return img


class GrayscaleTransform(_PixelTransform):
    """Luma replicated to 3 channels (torchvision ``rgb_to_grayscale(num_output_channels=3)``)."""

    def apply_image(self, img):
        _check(img)
        return _mix(img, np.repeat(_GRAY_WEIGHTS, 3, axis=0))


class GaussianBlurTransform(_PixelTransform):
    """Gaussian blur with std ``sigma`` pixels; kernel 2*ceil(4 sigma)+1 with reflect-101 borders
    (torchvision's padding). MoCo uses PIL's blur of radius sigma, BYOL a 23-px kernel: beyond
    4 sigma the weights are < 1e-4, invisible in uint8."""

    def __init__(self, sigma):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        _check(img)
        # float separable filter: 2x OpenCV's bit-exact fixed-point GaussianBlur, within 1 level of it
        kernel = cv2.getGaussianKernel(2 * int(np.ceil(4.0 * self.sigma)) + 1, self.sigma, cv2.CV_32F)
        return cv2.sepFilter2D(img, -1, kernel, kernel, borderType=cv2.BORDER_REFLECT_101)


class ResizeBlurTransform(_PixelTransform):
    """SCRL's ``ResizeBlur`` (kakaobrain/scrl ``augment/gaussian_blur.py``): downscale by ``factor``
    (size ``int(side // factor)``), then upscale back, both PIL bicubic as torchvision's ``resize``
    of a PIL image does, so the downscale is antialiased (OpenCV's bicubic would not be)."""

    def __init__(self, factor):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        _check(img)
        h, w = img.shape[:2]
        small = (max(1, int(w // self.factor)), max(1, int(h // self.factor)))  # PIL takes (w, h)
        down = Image.fromarray(img).resize(small, Image.BICUBIC)
        return np.asarray(down.resize((w, h), Image.BICUBIC))


class SolarizeTransform(_PixelTransform):
    """Invert every value >= ``threshold`` (BYOL: 0.5 on [0, 1] images = 128 on uint8)."""

    def __init__(self, threshold=128):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        _check(img)
        return cv2.LUT(img, _lut(np.where(_LEVELS >= self.threshold, 255 - _LEVELS, _LEVELS)))


class RandomColorJitter(Augmentation):
    """With probability ``prob``, torchvision-style ColorJitter: factors for brightness, contrast,
    saturation ~ U(max(0, 1 - s), 1 + s), hue ~ U(-h, h); ops in a random order; a strength of 0
    disables its op. MoCo-v2/InsLoc/ReSim: (0.4, 0.4, 0.4, 0.1) p=0.8; BYOL/SCRL: (0.4, 0.4, 0.2,
    0.1) p=0.8; SwAV: (0.8, 0.8, 0.8, 0.2) p=0.8.

    ``semantics="deepmind"`` (BYOL): the brightness delta ~ U(-b, b) is additive; the other draws
    are the same, with DeepMind's ops (see :class:`ColorJitterTransform`).
    """

    def __init__(self, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, prob=0.8, semantics="torchvision"):
        super().__init__()
        assert 0 <= hue <= 0.5, "hue strength must be in [0, 0.5]"
        assert semantics in JITTER_SEMANTICS, f"unknown colour jitter semantics {semantics!r}"
        self._init(locals())

    def _factor(self, strength):
        if strength == 0:
            return None
        return float(np.random.uniform(max(0.0, 1 - strength), 1 + strength))

    def get_transform(self, image):
        if np.random.rand() >= self.prob:
            return NoOpTransform()
        order = tuple(int(i) for i in np.random.permutation(4))
        hue = None if self.hue == 0 else float(np.random.uniform(-self.hue, self.hue))
        if self.semantics == "deepmind":
            brightness = None if self.brightness == 0 else float(np.random.uniform(-self.brightness, self.brightness))
        else:
            brightness = self._factor(self.brightness)
        return ColorJitterTransform(
            brightness, self._factor(self.contrast), self._factor(self.saturation), hue, order, self.semantics,
        )


class RandomGrayscale(Augmentation):
    def __init__(self, prob=0.2):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        return GrayscaleTransform() if np.random.rand() < self.prob else NoOpTransform()


class RandomGaussianBlur(Augmentation):
    """With probability ``prob``, Gaussian blur with sigma ~ U(sigma) (MoCo-v2: (0.1, 2.0), 0.5)."""

    def __init__(self, sigma=(0.1, 2.0), prob=0.5):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        if np.random.rand() >= self.prob:
            return NoOpTransform()
        return GaussianBlurTransform(float(np.random.uniform(*self.sigma)))


class RandomResizeBlur(Augmentation):
    """With probability ``prob``, SCRL's resize blur with a factor drawn from ``factors``
    (SCRL ``max_level=3``: {1.1, 1.2, 1.5})."""

    def __init__(self, factors=(1.1, 1.2, 1.5), prob=0.5):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        if np.random.rand() >= self.prob:
            return NoOpTransform()
        return ResizeBlurTransform(float(self.factors[np.random.randint(len(self.factors))]))


class RandomSolarize(Augmentation):
    def __init__(self, threshold=128, prob=0.2):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        if np.random.rand() >= self.prob:
            return NoOpTransform()
        return SolarizeTransform(self.threshold)


def build_photometric_augmentations(
    jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5,
    blur_sigma=(0.1, 2.0), blur_type="gaussian", solarize_prob=0.0, jitter_semantics="torchvision",
    blur_first=False,
):
    """Photometric pipeline of one view in MoCo-v2/BYOL order: colour jitter (p), grayscale, blur,
    solarize; with ``blur_first`` ReSim's order (blur, then jitter and grayscale; Tete-Xiao/ReSim
    ``main_moco.py``).

    Args:
        jitter: (brightness, contrast, saturation, hue) strengths.
        jitter_prob, grayscale_prob, blur_prob, solarize_prob: probabilities; ops with
            probability 0 are left out of the list.
        blur_sigma: Gaussian sigma range in pixels.
        blur_type: "gaussian" (MoCo/BYOL) or "resize" (SCRL's ResizeBlur, factors 1.1/1.2/1.5).
        jitter_semantics: "torchvision" or "deepmind" (BYOL's colour ops, see the module docstring).
        blur_first: put the blur before the colour jitter (ReSim).

    Returns:
        list[Augmentation], for ``T.AugmentationList``.
    """
    assert blur_type in ("gaussian", "resize"), f"unknown blur_type {blur_type!r}"
    colour, blur = [], []
    if jitter_prob > 0 and any(s > 0 for s in jitter):
        colour.append(RandomColorJitter(*jitter, prob=jitter_prob, semantics=jitter_semantics))
    if grayscale_prob > 0:
        colour.append(RandomGrayscale(grayscale_prob))
    if blur_prob > 0:
        if blur_type == "gaussian":
            blur.append(RandomGaussianBlur(tuple(blur_sigma), blur_prob))
        else:
            blur.append(RandomResizeBlur(prob=blur_prob))
    augs = blur + colour if blur_first else colour + blur
    if solarize_prob > 0:
        augs.append(RandomSolarize(128, solarize_prob))
    return augs
