"""View generators: one decoded image in, several geometric views out.

A generator returns a list of :class:`View`. Each view carries the Detectron2 transform that maps
original-image coordinates to view coordinates; nothing else about geometry is stored, so region
samplers and the mapper move boxes with ``view.transform.apply_box`` only. Photometric ops are
applied later by the mapper (per-view probabilities), never here.

Registered generators (``INPUT.REGIONSSL.VIEW_GENERATOR``):

* ``TwoCrops``           two independent RandomResizedCrops, each flipped with p=0.5 (MoCo/BYOL/SCRL).
* ``TwoCropsSharedFlip`` the same, but one flip decision for both views (ReSim, METHODS §6.1).
* ``MultiCrop``          N_i crops of side S_i per resolution i (SwAV: 2x224 + 6x96).
* ``CopyPaste``          InsLoc: a foreground crop rescaled to a random size and pasted on another
                         image of the dataset resized to the canvas; one composite per view.
``SaliencySwap`` (CVSA) is registered in ``saliency.py``.
"""
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
from detectron2.config import configurable
from detectron2.data import transforms as T
from detectron2.utils.registry import Registry

from .augmentations import INTERPOLATIONS, PasteTransform, resized_crop_transform, sample_resized_crop

__all__ = ["View", "VIEW_GENERATOR_REGISTRY", "build_view_generator", "TwoCrops", "MultiCrop", "CopyPaste"]

VIEW_GENERATOR_REGISTRY = Registry("REGIONSSL_VIEW_GENERATOR")
VIEW_GENERATOR_REGISTRY.__doc__ = "Makes a list of `View`s from one image; see regionssl/data/views.py."


@dataclass
class View:
    """One geometric view of an image.

    Attributes:
        image: (H, W, 3) uint8 RGB, geometry applied, photometric ops not yet applied.
        transform: maps original-image coordinates to this view's pixel coordinates.
        source_box: (4,) float XYXY, the rectangle of the original image the view shows.
        mask: optional (H, W) float32 saliency mask in view coordinates (CVSA).
    """

    image: np.ndarray
    transform: T.Transform
    source_box: np.ndarray
    mask: Optional[np.ndarray] = None


def build_view_generator(cfg, background_source=None):
    """Build the generator named by ``cfg.INPUT.REGIONSSL.VIEW_GENERATOR``.

    ``background_source`` is a callable ``() -> (H, W, 3) uint8`` returning a random image of the
    dataset; generators that composite images (CopyPaste, SaliencySwap) need it.
    """
    name = cfg.INPUT.REGIONSSL.VIEW_GENERATOR
    if name not in VIEW_GENERATOR_REGISTRY:
        raise KeyError(
            f"INPUT.REGIONSSL.VIEW_GENERATOR={name!r} is not a registered view generator; "
            f"choose one of {sorted(k for k, _ in VIEW_GENERATOR_REGISTRY)}"
        )
    return VIEW_GENERATOR_REGISTRY.get(name)(cfg, background_source=background_source)


def _maybe_flip(view_tfm, out_w, flip):
    if not flip:
        return view_tfm
    return T.TransformList([view_tfm, T.HFlipTransform(out_w)])


def _crop_view(image, box, out_size, interp, flip):
    h, w = image.shape[:2]
    tfm = _maybe_flip(resized_crop_transform(h, w, box, out_size, out_size, interp), out_size, flip)
    x0, y0, cw, ch = box
    return View(tfm.apply_image(image), tfm, np.array([x0, y0, x0 + cw, y0 + ch], dtype=np.float64))


@VIEW_GENERATOR_REGISTRY.register()
class TwoCrops:
    """Two RandomResizedCrops of side ``crop_size`` (scale s, ratio r), flipped with ``flip_prob``."""

    @configurable
    def __init__(self, *, crop_size, scale, ratio, interp, flip_prob, shared_flip=False):
        self.crop_size, self.scale, self.ratio = crop_size, scale, ratio
        self.interp, self.flip_prob, self.shared_flip = interp, flip_prob, shared_flip

    @classmethod
    def from_config(cls, cfg, background_source=None):
        c = cfg.INPUT.REGIONSSL
        return {
            "crop_size": c.CROP_SIZE,
            "scale": tuple(c.CROP_SCALE),
            "ratio": tuple(c.CROP_RATIO),
            "interp": INTERPOLATIONS[c.INTERPOLATION],
            "flip_prob": c.FLIP_PROB,
        }

    def __call__(self, image) -> List[View]:
        h, w = image.shape[:2]
        flips = np.random.rand(2) < self.flip_prob
        if self.shared_flip:
            flips[1] = flips[0]
        return [
            _crop_view(image, sample_resized_crop(h, w, self.scale, self.ratio), self.crop_size, self.interp, f)
            for f in flips
        ]


@VIEW_GENERATOR_REGISTRY.register()
class TwoCropsSharedFlip(TwoCrops):
    """ReSim's views: one flip decision for both crops (no cross-view flip to undo)."""

    @classmethod
    def from_config(cls, cfg, background_source=None):
        return dict(super().from_config(cfg), shared_flip=True)


@VIEW_GENERATOR_REGISTRY.register()
class MultiCrop:
    """SwAV multi-crop: for each resolution i, ``num_crops[i]`` crops of side ``sizes[i]`` with
    area fraction in ``[min_scales[i], max_scales[i]]``. Large crops come first."""

    @configurable
    def __init__(self, *, num_crops, sizes, min_scales, max_scales, ratio, interp, flip_prob):
        assert len(num_crops) == len(sizes) == len(min_scales) == len(max_scales)
        self.specs = list(zip(num_crops, sizes, min_scales, max_scales))
        self.ratio, self.interp, self.flip_prob = ratio, interp, flip_prob

    @classmethod
    def from_config(cls, cfg, background_source=None):
        c = cfg.INPUT.REGIONSSL
        m = c.MULTI_CROP
        return {
            "num_crops": list(m.NUM_CROPS),
            "sizes": list(m.SIZES),
            "min_scales": list(m.MIN_SCALES),
            "max_scales": list(m.MAX_SCALES),
            "ratio": tuple(c.CROP_RATIO),
            "interp": INTERPOLATIONS[c.INTERPOLATION],
            "flip_prob": c.FLIP_PROB,
        }

    def __call__(self, image) -> List[View]:
        h, w = image.shape[:2]
        views = []
        for n, size, lo, hi in self.specs:
            for _ in range(n):
                box = sample_resized_crop(h, w, (lo, hi), self.ratio)
                views.append(_crop_view(image, box, size, self.interp, np.random.rand() < self.flip_prob))
        return views


@VIEW_GENERATOR_REGISTRY.register()
class CopyPaste:
    """InsLoc's composites (METHODS §4.1).

    For each of the two views: crop the foreground image with RandomResizedCrop's rule
    (scale s, ratio r), rescale the crop, keeping its aspect, so that it fits a random target
    (w, h) with w, h ~ U[fg_size) (mmcv ``imrescale``: factor = min(long_t / long, short_t / short)),
    paste it at a uniformly random position on another random dataset image resized to
    ``canvas x canvas``, then flip the composite with ``flip_prob``. The pasted rectangle is
    the crop rectangle moved by the view's transform.
    """

    @configurable
    def __init__(self, *, canvas, scale, ratio, fg_size, interp, flip_prob, background_source, shared_crop=False):
        if background_source is None:
            raise ValueError("CopyPaste needs a background_source (random images of the dataset)")
        self.canvas, self.scale, self.ratio, self.fg_size = canvas, scale, ratio, fg_size
        self.interp, self.flip_prob, self.background_source = interp, flip_prob, background_source
        self.shared_crop = shared_crop

    @classmethod
    def from_config(cls, cfg, background_source=None):
        c = cfg.INPUT.REGIONSSL
        return {
            "canvas": c.CROP_SIZE,
            "scale": tuple(c.CROP_SCALE),
            "ratio": tuple(c.CROP_RATIO),
            "fg_size": tuple(c.COPY_PASTE.FG_SIZE),
            "interp": INTERPOLATIONS[c.INTERPOLATION],
            "flip_prob": c.FLIP_PROB,
            "background_source": background_source,
            "shared_crop": c.COPY_PASTE.SHARED_CROP,
        }

    def _fit_size(self, w, h):
        lo, hi = self.fg_size
        tw, th = np.random.randint(lo, hi, size=2)
        factor = min(max(tw, th) / max(w, h), min(tw, th) / min(w, h))
        nw = int(np.clip(round(w * factor), 1, self.canvas))
        nh = int(np.clip(round(h * factor), 1, self.canvas))
        return nw, nh

    def _one_view(self, image, crop):
        h, w = image.shape[:2]
        x0, y0, cw, ch = crop
        nw, nh = self._fit_size(cw, ch)
        bg = self.background_source()
        bg = T.ResizeTransform(bg.shape[0], bg.shape[1], self.canvas, self.canvas, self.interp).apply_image(bg)
        px = np.random.randint(0, self.canvas - nw + 1)
        py = np.random.randint(0, self.canvas - nh + 1)
        tfm = T.TransformList(
            [resized_crop_transform(h, w, (x0, y0, cw, ch), nh, nw, self.interp), PasteTransform(bg, px, py, nw, nh)]
        )
        tfm = _maybe_flip(tfm, self.canvas, np.random.rand() < self.flip_prob)
        return View(tfm.apply_image(image), tfm, np.array([x0, y0, x0 + cw, y0 + ch], dtype=np.float64))

    def __call__(self, image) -> List[View]:
        h, w = image.shape[:2]
        crops = [sample_resized_crop(h, w, self.scale, self.ratio) for _ in range(2)]
        if self.shared_crop:
            crops[1] = crops[0]
        return [self._one_view(image, crop) for crop in crops]
