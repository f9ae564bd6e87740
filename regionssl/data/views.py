"""View generators: one decoded image in, several geometric views out.

Every generator is a :class:`ViewGenerator` and returns a list of :class:`View`. Each view carries
the Detectron2 transform that maps original-image coordinates to view coordinates; nothing else
about geometry is stored, so region samplers and the mapper move boxes with
``view.transform.apply_box`` only. Photometric ops are applied later by the mapper (per-view
probabilities), never here.

Registered generators (``INPUT.REGIONSSL.VIEW_GENERATOR``):

* ``TwoCrops``           two independent RandomResizedCrops, each flipped with p=0.5 (MoCo/BYOL/SCRL).
* ``TwoCropsSharedFlip`` the same, but one flip decision for both views (ReSim, docs/methods/resim.md).
* ``MultiCrop``          N_i crops of side S_i per resolution i (SwAV: 2x224 + 6x96).
* ``CopyPaste``          InsLoc: a foreground crop rescaled to a random size and pasted on another
                         image of the dataset resized to the canvas; one composite per view.
``SaliencySwap`` (CVSA) is registered in ``saliency.py``.

The interface the mapper calls has two steps, so it can decode as little as needed: ``plan`` draws
the geometry from the image size alone (a list of :class:`CropSpec`), then ``render`` resamples
every crop from a :class:`~regionssl.data.image_io.DecodedImage`, which may be a JPEG decoded at
1/r scale when every crop of the plan shrinks by at least r (:func:`max_reduction`). A generator
whose geometry depends on the pixels (SaliencySwap) plans nothing (``None``) and gets the full
decode. Calling a generator on an array does both steps.
"""
import abc
from dataclasses import dataclass
from typing import List, Optional, Tuple

import cv2
import numpy as np
from detectron2.config import configurable
from detectron2.data import transforms as T
from detectron2.utils.registry import Registry

from ..config import per_level
from .augmentations import INTERPOLATIONS, PasteTransform, resized_crop_transform, sample_resized_crop
from .image_io import DecodedImage, as_background_source, reads_array

__all__ = [
    "View", "CropSpec", "ViewGenerator", "CompositingViewGenerator", "VIEW_GENERATOR_REGISTRY",
    "build_view_generator", "max_reduction", "TwoCrops", "TwoCropsSharedFlip", "MultiCrop", "CopyPaste",
]

VIEW_GENERATOR_REGISTRY = Registry("REGIONSSL_VIEW_GENERATOR")
VIEW_GENERATOR_REGISTRY.__doc__ = "ViewGenerator subclasses: views of one image; see regionssl/data/views.py."


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


@dataclass
class CropSpec:
    """The geometry of one view, drawn before decoding: original rectangle ``box = (x0, y0, w, h)``
    resampled to ``out_w x out_h``, then flipped if ``flip``; ``paste = (x, y)`` places it on a
    canvas (CopyPaste)."""

    box: Tuple[int, int, int, int]
    out_w: int
    out_h: int
    flip: bool = False
    paste: Optional[Tuple[int, int]] = None


def max_reduction(plan):
    """Smallest shrink factor over the crops of ``plan``: decoding at 1/r with r up to this value
    still leaves every crop at least its output resolution."""
    return min(min(s.box[2] / s.out_w, s.box[3] / s.out_h) for s in plan)


def build_view_generator(cfg, background_source=None):
    """Build the generator named by ``cfg.INPUT.REGIONSSL.VIEW_GENERATOR``.

    ``background_source``: random images of the dataset (a ``BackgroundSource``, or a callable
    returning (H, W, 3) uint8 arrays); generators that composite images (CopyPaste, SaliencySwap)
    need it.
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


def _flip_pixels(img, flip):
    return cv2.flip(img, 1) if flip else img  # 30x numpy's contiguous copy of img[:, ::-1]


def _source_box(box):
    x0, y0, w, h = box
    return np.array([x0, y0, x0 + w, y0 + h], dtype=np.float64)


def _render_crop(pixels, spec, interp):
    """A plain resized-crop view of ``pixels`` (a DecodedImage) as drawn in ``spec``."""
    tfm = resized_crop_transform(pixels.height, pixels.width, spec.box, spec.out_h, spec.out_w, interp)
    image = pixels.resized_crop(spec.box, spec.out_w, spec.out_h, interp)
    return View(_flip_pixels(image, spec.flip), _maybe_flip(tfm, spec.out_w, spec.flip), _source_box(spec.box))


def _crop_view(image, box, out_size, interp, flip):
    """View of the (H, W, 3) uint8 ``image`` showing ``box = (x0, y0, w, h)`` at ``out_size``."""
    return _render_crop(DecodedImage(np.asarray(image)), CropSpec(tuple(box), out_size, out_size, bool(flip)), interp)


class ViewGenerator(abc.ABC):
    """Makes the geometric views of one image; what the mapper calls.

    Subclasses implement :meth:`render` and, when their geometry can be drawn from the image size
    alone, :meth:`plan` (then the mapper decodes JPEGs at a reduced scale the plan allows).
    """

    def reads_array(self, reduction=1) -> bool:
        """Whether :meth:`render` reads the pixels of a decode at ``1 / reduction`` as an array
        (OpenCV or torch resampling, ``image_io.reads_array``) rather than as a PIL image; the
        mapper then has JPEGs decoded straight to an array (``ImageFile.decode``)."""
        return reads_array(getattr(self, "interp", None), reduction)

    def plan(self, height, width) -> Optional[List[CropSpec]]:
        """The views' geometry for an (height, width) image, drawn before decoding; None (the
        default) when it depends on the pixels, which are then decoded at full scale."""
        return None

    @abc.abstractmethod
    def render(self, pixels: DecodedImage, plan: Optional[List[CropSpec]], file_name: Optional[str] = None) -> List[View]:
        """The views of ``pixels`` following ``plan`` (from :meth:`plan` for the same image size).

        ``file_name`` names the image (generators that look files up by name use it: SaliencySwap's
        mask files); None for images that come without one.
        """

    def __call__(self, image, file_name=None) -> List[View]:
        """Views of an (H, W, 3) uint8 array or a ``DecodedImage``: :meth:`plan`, then :meth:`render`."""
        pixels = image if isinstance(image, DecodedImage) else DecodedImage(np.asarray(image))
        return self.render(pixels, self.plan(pixels.height, pixels.width), file_name)


class _CropViews(ViewGenerator):
    """Views that are plain resized crops (+ flip) of the image, one per :class:`CropSpec`."""

    def render(self, pixels, plan, file_name=None) -> List[View]:
        return [_render_crop(pixels, spec, self.interp) for spec in plan]


class CompositingViewGenerator(ViewGenerator):
    """A generator that pastes content on other images of the dataset (``background_source``,
    turned into a ``BackgroundSource`` whenever it is set)."""

    @property
    def background_source(self):
        return self._background_source

    @background_source.setter
    def background_source(self, source):
        if source is None:
            raise ValueError(f"{type(self).__name__} needs a background_source (random images of the dataset)")
        self._background_source = as_background_source(source)


@VIEW_GENERATOR_REGISTRY.register()
class TwoCrops(_CropViews):
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

    def plan(self, height, width):
        flips = np.random.rand(2) < self.flip_prob
        if self.shared_flip:
            flips[1] = flips[0]
        s = self.crop_size
        return [CropSpec(sample_resized_crop(height, width, self.scale, self.ratio), s, s, bool(f)) for f in flips]


@VIEW_GENERATOR_REGISTRY.register()
class TwoCropsSharedFlip(TwoCrops):
    """ReSim's views: one flip decision for both crops (no cross-view flip to undo)."""

    @classmethod
    def from_config(cls, cfg, background_source=None):
        return dict(super().from_config(cfg), shared_flip=True)


@VIEW_GENERATOR_REGISTRY.register()
class MultiCrop(_CropViews):
    """SwAV multi-crop: for each resolution i, ``num_crops[i]`` crops of side ``sizes[i]`` with
    area fraction in ``[min_scales[i], max_scales[i]]``. Large crops come first."""

    @configurable
    def __init__(self, *, num_crops, sizes, min_scales, max_scales, ratio, interp, flip_prob):
        for key, values in (("SIZES", sizes), ("MIN_SCALES", min_scales), ("MAX_SCALES", max_scales)):
            per_level(f"INPUT.REGIONSSL.MULTI_CROP.{key}", values, num_crops, "INPUT.REGIONSSL.MULTI_CROP.NUM_CROPS")
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

    def plan(self, height, width):
        plan = []
        for n, size, lo, hi in self.specs:
            for _ in range(n):
                box = sample_resized_crop(height, width, (lo, hi), self.ratio)
                plan.append(CropSpec(box, size, size, bool(np.random.rand() < self.flip_prob)))
        return plan


@VIEW_GENERATOR_REGISTRY.register()
class CopyPaste(CompositingViewGenerator):
    """InsLoc's composites (docs/methods/insloc.md).

    For each of the two views: crop the foreground image with RandomResizedCrop's rule
    (scale s, ratio r), rescale the crop, keeping its aspect, so that it fits a random target
    (w, h) with w, h ~ U[fg_size) (mmcv ``imrescale``: factor = min(long_t / long, short_t / short)),
    paste it at a uniformly random position on another random dataset image resized to
    ``canvas x canvas``, then flip the composite with ``flip_prob``. The pasted rectangle is
    the crop rectangle moved by the view's transform. The official pipeline resizes with OpenCV
    bilinear (mmcv), i.e. ``INPUT.REGIONSSL.INTERPOLATION "cv2_bilinear"``.

    Canvases come from ``background_source.resized`` (a large JPEG is decoded at the coarsest scale
    still at least the canvas size).
    """

    @configurable
    def __init__(self, *, canvas, scale, ratio, fg_size, interp, flip_prob, background_source, shared_crop=False):
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
        # mmcv's rescale_size: int(x + 0.5), half rounded up (Python's round() goes to even)
        nw = int(np.clip(int(w * factor + 0.5), 1, self.canvas))
        nh = int(np.clip(int(h * factor + 0.5), 1, self.canvas))
        return nw, nh

    def plan(self, height, width):
        crops = [sample_resized_crop(height, width, self.scale, self.ratio) for _ in range(2)]
        if self.shared_crop:
            crops[1] = crops[0]
        plan = []
        for crop in crops:
            nw, nh = self._fit_size(crop[2], crop[3])
            px = np.random.randint(0, self.canvas - nw + 1)
            py = np.random.randint(0, self.canvas - nh + 1)
            plan.append(CropSpec(crop, nw, nh, bool(np.random.rand() < self.flip_prob), (int(px), int(py))))
        return plan

    def _background(self):
        """(canvas, canvas, 3) uint8, writable."""
        return np.array(self.background_source.resized(self.canvas, self.canvas, self.interp))

    def render(self, pixels, plan, file_name=None) -> List[View]:
        views = []
        for spec in plan:
            (px, py), nw, nh = spec.paste, spec.out_w, spec.out_h
            bg = self._background()
            paste = PasteTransform(bg, px, py, nw, nh)
            tfm = T.TransformList(
                [resized_crop_transform(pixels.height, pixels.width, spec.box, nh, nw, self.interp), paste]
            )
            canvas = bg.copy()  # PasteTransform keeps bg for apply_image/inverse
            canvas[py : py + nh, px : px + nw] = pixels.resized_crop(spec.box, nw, nh, self.interp)
            views.append(
                View(_flip_pixels(canvas, spec.flip), _maybe_flip(tfm, self.canvas, spec.flip), _source_box(spec.box))
            )
        return views
