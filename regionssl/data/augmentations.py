"""Geometric augmentations Detectron2 lacks, as ``Augmentation``/``Transform`` subclasses.

Every geometric change of a view is expressed with Detectron2/fvcore transforms, so a view's
``TransformList`` is the single source of truth for where original pixels went: boxes move with
``apply_box``, saliency masks with ``apply_segmentation``, and the inverse exists for the
query -> original -> key mapping of ReSim.

Pixels of a resized crop are made by ``image_io.DecodedImage.resized_crop`` in one resampling step
from the decoded image (no intermediate copies), possibly from a JPEG decoded at 1/r scale; the
result is the same geometry as ``transform.apply_image`` (tests/data/test_mapper_geometry.py checks every
pixel).

Photometric augmentations (which never move boxes) live in ``photometric.py``.
"""
import math

import cv2
import numpy as np
from detectron2.data import transforms as T
from PIL import Image

__all__ = [
    "sample_resized_crop",
    "RandomResizedCrop",
    "PasteTransform",
    "ResizeTransform",
    "resized_crop_transform",
    "INTERPOLATIONS",
    "CV2_BILINEAR",
]

# OpenCV bilinear without antialiasing: what mmcv.imresize/imrescale do (InsLoc's copy-paste).
CV2_BILINEAR = "cv2_bilinear"
# Config name -> filter. PIL's bilinear/bicubic antialias when downscaling (torchvision's
# RandomResizedCrop on PIL images: MoCo, ReSim, SwAV, BYOL); "nearest" keeps pixel values exact.
INTERPOLATIONS = {
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "nearest": Image.NEAREST,
    "cv2_bilinear": CV2_BILINEAR,
}


def sample_resized_crop(height, width, scale, ratio, rng=np.random, max_tries=10):
    """torchvision's RandomResizedCrop sampling rule.

    Draws an area fraction ``s ~ U(scale)`` and a log-uniform aspect ratio ``r ~ ratio`` up to
    ``max_tries`` times; falls back to the largest centred crop whose ratio is clamped to
    ``ratio`` (torchvision's fallback).

    Returns:
        (x0, y0, w, h) integers, the crop rectangle in image pixels.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(max_tries):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(rng.randint(0, height - h + 1))
            x0 = int(rng.randint(0, width - w + 1))
            return x0, y0, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = max(1, min(height, int(round(w / min(ratio)))))
    elif in_ratio > max(ratio):
        h = height
        w = max(1, min(width, int(round(h * max(ratio)))))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class ResizeTransform(T.ResizeTransform):
    """Detectron2's ``ResizeTransform`` that also accepts ``interp=CV2_BILINEAR`` (same geometry:
    OpenCV and PIL both map output pixel centres to ``(x + 0.5) * w / new_w`` in the input)."""

    def apply_image(self, img, interp=None):
        if (interp if interp is not None else self.interp) == CV2_BILINEAR:
            assert img.shape[:2] == (self.h, self.w)
            return cv2.resize(img, (self.new_w, self.new_h), interpolation=cv2.INTER_LINEAR)
        return super().apply_image(img, interp)

    def inverse(self):
        return ResizeTransform(self.new_h, self.new_w, self.h, self.w, self.interp)


def resized_crop_transform(height, width, box, out_h, out_w, interp=Image.BILINEAR):
    """TransformList cropping ``box = (x0, y0, w, h)`` of an (height, width) image to (out_h, out_w)."""
    x0, y0, w, h = box
    return T.TransformList(
        [
            T.CropTransform(x0, y0, w, h, orig_w=width, orig_h=height),
            ResizeTransform(h, w, out_h, out_w, interp),
        ]
    )


class RandomResizedCrop(T.Augmentation):
    """Crop a random area fraction ``scale`` with aspect ``ratio`` and resize to ``size x size``.

    The transform is ``TransformList([CropTransform, ResizeTransform])`` with the crop's
    original size recorded, so it is invertible.
    """

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interp=Image.BILINEAR):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        box = sample_resized_crop(h, w, self.scale, self.ratio)
        return resized_crop_transform(h, w, box, self.size, self.size, self.interp)


class PasteTransform(T.Transform):
    """Paste an image at ``(x0, y0)`` onto a copy of ``background`` (InsLoc's copy-paste).

    Coordinates shift by ``(x0, y0)``. Segmentation masks are pasted onto ``background_mask``
    (zeros if not given), so a saliency mask of the pasted content travels with it.
    """

    def __init__(self, background, x0, y0, fg_w, fg_h, background_mask=None):
        super().__init__()
        bh, bw = background.shape[:2]
        assert 0 <= x0 and x0 + fg_w <= bw and 0 <= y0 and y0 + fg_h <= bh, "paste out of canvas"
        self._set_attributes(locals())

    def apply_image(self, img):
        assert img.shape[:2] == (self.fg_h, self.fg_w), (img.shape, self.fg_h, self.fg_w)
        canvas = self.background.copy()
        canvas[self.y0 : self.y0 + self.fg_h, self.x0 : self.x0 + self.fg_w] = img
        return canvas

    def apply_segmentation(self, segmentation):
        bh, bw = self.background.shape[:2]
        if self.background_mask is None:
            canvas = np.zeros((bh, bw) + segmentation.shape[2:], dtype=segmentation.dtype)
        else:
            canvas = self.background_mask.astype(segmentation.dtype, copy=True)
        canvas[self.y0 : self.y0 + self.fg_h, self.x0 : self.x0 + self.fg_w] = segmentation
        return canvas

    def apply_coords(self, coords):
        coords = np.asarray(coords, dtype=np.float64).copy()
        coords[:, 0] += self.x0
        coords[:, 1] += self.y0
        return coords

    def inverse(self):
        bh, bw = self.background.shape[:2]
        return T.CropTransform(self.x0, self.y0, self.fg_w, self.fg_h, orig_w=bw, orig_h=bh)
