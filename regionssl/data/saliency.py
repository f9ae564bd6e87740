"""Saliency sources and CVSA's ``SaliencySwap`` view generator.

Saliency sources (``INPUT.REGIONSSL.SALIENCY.SOURCE``, registered in ``SALIENCY_SOURCE_REGISTRY``)
are built from the config and called as ``source(image, file_name) -> (H, W) float32 in [0, 1]``:

* ``spectral_residual`` (default): Hou & Zhang, "Saliency Detection: A Spectral Residual
  Approach", CVPR'07, computed on the fly (opencv-python-headless has no ``cv2.saliency``).
* ``mask_files``: ``<MASK_DIR>/<image stem>.png`` per image (any saliency detector's output,
  0-255 grey levels). A missing or unreadable file is reported once with a warning naming it and
  that image falls back to ``spectral_residual``; training never stops on one mask.

``SaliencySwap`` (CVSA, arXiv 2106.15788) pastes the most salient window of the image being mapped
over the most salient window of another random image of the dataset, then crops and flips the
composite. Which parts follow the paper and which are ours: ``docs/methods/cvsa.md``.
"""
import logging
import os
from typing import List

import cv2
import numpy as np
from detectron2.config import configurable
from detectron2.data import transforms as T
from detectron2.utils.registry import Registry

from .augmentations import INTERPOLATIONS, PasteTransform, resized_crop_transform, sample_resized_crop
from .views import VIEW_GENERATOR_REGISTRY, CompositingViewGenerator, View

__all__ = [
    "SALIENCY_SOURCE_REGISTRY", "build_saliency_source", "spectral_residual_saliency", "SpectralResidualSaliency",
    "MaskFileSaliency", "window_side", "most_salient_window", "SaliencySwap",
]

logger = logging.getLogger(__name__)

SALIENCY_SOURCE_REGISTRY = Registry("REGIONSSL_SALIENCY_SOURCE")
SALIENCY_SOURCE_REGISTRY.__doc__ = "cfg -> callable(image, file_name) -> (H, W) float32 saliency in [0, 1]."


def build_saliency_source(cfg):
    name = cfg.INPUT.REGIONSSL.SALIENCY.SOURCE
    if name not in SALIENCY_SOURCE_REGISTRY:
        raise KeyError(
            f"INPUT.REGIONSSL.SALIENCY.SOURCE={name!r} is not a registered saliency source; "
            f"choose one of {sorted(k for k, _ in SALIENCY_SOURCE_REGISTRY)}"
        )
    return SALIENCY_SOURCE_REGISTRY.get(name)(cfg)


def spectral_residual_saliency(image, width=64, sigma=2.5):
    """Spectral residual saliency (Hou & Zhang, CVPR'07), resized back to the image size.

    On the grey image scaled to ``width`` px wide (aspect kept, as the authors' reference code
    ``imresize(img, 64/size(img,2))``): log amplitude spectrum L, phase P, residual
    ``R = L - mean3x3(L)``, saliency ``|IFFT(exp(R + iP))|^2`` smoothed with a Gaussian of
    ``sigma`` px (reference code: sigma 2.5), min-max normalised to [0, 1]. The amplitude has a
    small floor before the log (ours, see below).

    Args:
        image: (H, W, 3) uint8 RGB (or (H, W) grey).
    Returns:
        (H, W) float32 in [0, 1]; all zeros for a constant image.
    """
    h, w = image.shape[:2]
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    sw, sh = width, max(1, int(round(h * width / w)))
    small = cv2.resize(grey.astype(np.float32) / 255.0, (sw, sh), interpolation=cv2.INTER_AREA)
    spectrum = np.fft.fft2(small)
    amp = np.abs(spectrum)
    # Ours: a floor of 1e-3 x the mean amplitude. Exact spectral zeros (synthetic shapes: sinc
    # nulls) would give log -> -inf and periodic artefacts; on photos the map changes by < 1e-3.
    log_amp = np.log(amp + 1e-3 * amp.mean() + 1e-12)
    residual = log_amp - cv2.blur(log_amp, (3, 3), borderType=cv2.BORDER_REPLICATE)
    sal = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    sal = cv2.GaussianBlur(sal.astype(np.float32), (0, 0), sigma)
    lo, hi = float(sal.min()), float(sal.max())
    if hi - lo < 1e-12 or float(small.max() - small.min()) < 1e-6:
        return np.zeros((h, w), dtype=np.float32)
    sal = (sal - lo) / (hi - lo)
    return np.clip(cv2.resize(sal, (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


class SpectralResidualSaliency:
    """``spectral_residual_saliency`` as a saliency source (``file_name`` is ignored)."""

    def __init__(self, width=64, sigma=2.5):
        self.width, self.sigma = width, sigma

    def __call__(self, image, file_name=None):
        return spectral_residual_saliency(image, self.width, self.sigma)


class MaskFileSaliency:
    """Per-image masks ``<mask_dir>/<stem of file_name>.png``, grey levels / 255.

    A mask of another size than its image is resized to it (bilinear). A missing/unreadable mask
    (or an image without a file name) is reported once per file and ``fallback`` is used.
    """

    def __init__(self, mask_dir, fallback):
        if not mask_dir:
            raise ValueError('INPUT.REGIONSSL.SALIENCY.SOURCE "mask_files" needs INPUT.REGIONSSL.SALIENCY.MASK_DIR')
        if not os.path.isdir(mask_dir):
            raise FileNotFoundError(f"INPUT.REGIONSSL.SALIENCY.MASK_DIR={mask_dir!r} is not a directory")
        self.mask_dir, self.fallback = mask_dir, fallback
        self._warned = set()

    def path_for(self, file_name):
        return os.path.join(self.mask_dir, os.path.splitext(os.path.basename(file_name))[0] + ".png")

    def __call__(self, image, file_name=None):
        path = self.path_for(file_name) if file_name else None
        mask = cv2.imread(path, cv2.IMREAD_GRAYSCALE) if path and os.path.isfile(path) else None
        if mask is None:
            if path not in self._warned:
                self._warned.add(path)
                what = f"saliency mask {path!r} of {file_name!r}" if path else "an image without file name"
                logger.warning(f"No readable {what}: using spectral residual saliency instead.")
            return self.fallback(image, file_name)
        h, w = image.shape[:2]
        if mask.shape != (h, w):
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_LINEAR)
        return mask.astype(np.float32) / 255.0


@SALIENCY_SOURCE_REGISTRY.register()
def spectral_residual(cfg):
    return SpectralResidualSaliency()


@SALIENCY_SOURCE_REGISTRY.register()
def mask_files(cfg):
    return MaskFileSaliency(cfg.INPUT.REGIONSSL.SALIENCY.MASK_DIR, SpectralResidualSaliency())


def window_side(height, width, fraction):
    """Side of the square salient window: ``fraction`` x the shorter side, in [1, shorter side]."""
    short = min(height, width)
    return int(min(short, max(1, round(fraction * short))))


def most_salient_window(saliency, side):
    """Top-left (x0, y0) of the ``side x side`` window with the highest mean saliency.

    Window sums come from the integral image (``cv2.integral``), so the search is O(HW) with no
    Python loop. Ties go to the first window in row-major order.
    """
    ii = cv2.integral(np.ascontiguousarray(saliency, dtype=np.float64))  # (H+1, W+1)
    sums = ii[side:, side:] - ii[:-side, side:] - ii[side:, :-side] + ii[:-side, :-side]  # (H-s+1, W-s+1)
    y0, x0 = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(x0), int(y0)


_BACKGROUND_TRIES = 5


def _overlap(a, b):
    """Intersection area of two (x0, y0, w, h) rectangles."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(iw, 0) * max(ih, 0)


@VIEW_GENERATOR_REGISTRY.register()
class SaliencySwap(CompositingViewGenerator):
    """CVSA's Saliency Swap views (``docs/methods/cvsa.md``).

    For the image x being mapped (size H x W, saliency s(x)) the square window W_x of side
    ``window_fraction * min(H, W)`` with the highest mean saliency is found once. For each of the
    two views, independently:

    1. draw a background image b from the dataset (``background_source``) and find its own most
       salient window W_b (side from b's shorter side);
    2. crop W_x, resize it to W_b's size and paste it over W_b (the composite has b's size);
    3. RandomResizedCrop (scale s, ratio r) of the composite to ``crop_size``, re-drawn up to
       ``max_crop_tries`` times until the crop shows the pasted window substantially (overlap
       >= ``min_visible`` x the smaller of the two areas; else the whole composite), then a
       horizontal flip with ``flip_prob``. Without this the two views, whose backgrounds are
       different images, could share no content at all.

    The background is re-drawn (up to a few times) when it is the image itself.

    Every step is a Detectron2 transform, so ``view.transform`` maps coordinates of x to the
    view (meaningful inside W_x, whose content is what the view shows there). ``view.mask`` is
    s(x) moved by ``transform.apply_segmentation`` (nearest neighbour, 8-bit): s(x) inside the
    pasted window, 0 on the background (which is another image's content). ``view.source_box``
    = W_x in x's pixels, so ``PastedBox``/``IntersectionBoxes`` give the pasted window. The window
    depends on the pixels, so nothing is planned before decoding (:meth:`plan` is None); ``render``
    takes the ``file_name`` for ``mask_files`` saliency.
    """

    @configurable
    def __init__(self, *, saliency, window_fraction, crop_size, scale, ratio, interp, flip_prob,
                 background_source, max_crop_tries=10, min_visible=0.5):
        self.saliency, self.window_fraction = saliency, window_fraction
        self.crop_size, self.scale, self.ratio, self.interp = crop_size, scale, ratio, interp
        self.flip_prob, self.background_source, self.max_crop_tries = flip_prob, background_source, max_crop_tries
        self.min_visible = min_visible

    @classmethod
    def from_config(cls, cfg, background_source=None):
        c = cfg.INPUT.REGIONSSL
        return {
            "saliency": build_saliency_source(cfg),
            "window_fraction": c.SALIENCY.WINDOW_FRACTION,
            "crop_size": c.CROP_SIZE,
            "scale": tuple(c.CROP_SCALE),
            "ratio": tuple(c.CROP_RATIO),
            "interp": INTERPOLATIONS[c.INTERPOLATION],
            "flip_prob": c.FLIP_PROB,
            "background_source": background_source,
        }

    def salient_window(self, image, file_name=None):
        """(saliency (H, W) float32, (x0, y0, side, side)) of an image."""
        sal = np.asarray(self.saliency(image, file_name), dtype=np.float32)
        side = window_side(image.shape[0], image.shape[1], self.window_fraction)
        x0, y0 = most_salient_window(sal, side)
        return sal, (x0, y0, side, side)

    def _background(self, file_name):
        for _ in range(_BACKGROUND_TRIES):
            bg, bg_name = self.background_source.sample()
            if bg_name is None or bg_name != file_name:
                break  # pasting an image on itself would give an unchanged image
        return bg, bg_name

    def _crop(self, height, width, window):
        for _ in range(self.max_crop_tries):
            crop = sample_resized_crop(height, width, self.scale, self.ratio)
            if _overlap(crop, window) >= self.min_visible * min(crop[2] * crop[3], window[2] * window[3]):
                return crop
        return 0, 0, width, height

    def _one_view(self, image, sal, window, file_name):
        h, w = image.shape[:2]
        bg, bg_name = self._background(file_name)
        bh, bw = bg.shape[:2]
        _, (xb, yb, side_b, _) = self.salient_window(bg, bg_name)
        crop = self._crop(bh, bw, (xb, yb, side_b, side_b))
        tfms = [
            resized_crop_transform(h, w, window, side_b, side_b, self.interp),  # W_x -> size of W_b
            PasteTransform(bg, xb, yb, side_b, side_b),  # background_mask None: mask 0 off the paste
            resized_crop_transform(bh, bw, crop, self.crop_size, self.crop_size, self.interp),
        ]
        if np.random.rand() < self.flip_prob:
            tfms.append(T.HFlipTransform(self.crop_size))
        tfm = T.TransformList(tfms)
        x0, y0, side, _ = window
        box = np.array([x0, y0, x0 + side, y0 + side], dtype=np.float64)
        # The mask goes through as uint8: Detectron2 resizes uint8 with PIL's nearest (pixel-centre
        # aligned, like the image), float arrays with torch's legacy nearest (up to 1/2 px shifted).
        mask = tfm.apply_segmentation(np.round(sal * 255).astype(np.uint8)).astype(np.float32) / 255
        return View(tfm.apply_image(image), tfm, box, mask)

    def reads_array(self, reduction=1):
        return True  # saliency and compositing work on arrays

    def render(self, pixels, plan, file_name=None) -> List[View]:
        image = pixels.array()
        sal, window = self.salient_window(image, file_name)
        return [self._one_view(image, sal, window, file_name) for _ in range(2)]
