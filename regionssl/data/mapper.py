"""The pretraining dataset mapper: one dataset dict -> one dict of views and aligned boxes.

Output (the contract, docs/design.md), for V views and R regions:

* ``"views"``: list of V uint8 tensors (3, H_v, W_v), RGB.
* ``"boxes"``: list of V float32 tensors (R, 4), XYXY in each view's pixels; row i of every view
  is the same region of the original image (except ``WholeView``/``PastedBox``, see regions.py).
* ``"valid"``: (R,) bool, region lies fully inside every view it must be checked in.
* ``"box_groups"``: (R,) int64 group of each region (ReSim: window set / FPN level).
* ``"jittered_boxes"``: (R, 4) float32, InsLoc's anchor-jittered query (view 0) boxes, if enabled.
* ``"masks"``: list of V float32 tensors (H_v, W_v), saliency masks, if the generator makes them.
* ``"photometric"``: (V, P) float32 drawn photometric parameters, only with
  ``INPUT.REGIONSSL.PHOTOMETRIC.ON_DEVICE`` (the views are then geometry only; the model applies
  them, ``photometric_batch.apply_photometric``).
* ``"height"``, ``"width"`` (original image), ``"image_id"``, ``"file_name"``.
* ``"skipped_files"``: list of the unreadable files this mapper copy (one per loader worker) met
  since its previous output, usually empty; the trainer counts them (``regionssl/skipped_images``).

Bad images (corrupt, unreadable, tiny) and pairs that yield no valid region after
``MAX_RESAMPLE`` re-draws return None with a warning naming the file; Detectron2's
``MapDataset`` then draws another image, so the training loop never dies on one bad file.
An unreadable file is warned about once per worker process (:class:`SkippedFiles`), not at every
epoch.

One sample flows one way: I/O (``image_io``: header, then one decode) -> views (the
``ViewGenerator``) -> regions (the ``RegionSampler``) -> photometric ops -> tensors. Decoding is
lazy: the generator plans its crops from the image size (read from the file header), then the image
is decoded once at the coarsest JPEG scale 1/r (r in 1, 2, 4, 8) at which every crop still has at
least its output resolution (``INPUT.REGIONSSL.JPEG_DRAFT``). Geometry is unaffected: transforms
stay in original-image pixels (views.py, augmentations.py).
"""
import copy
import logging

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import transforms as T

from .datasets import RecordField
from .image_io import BackgroundSource, SkippedFiles, UnreadableImageError, open_image_or_none
from .photometric import build_photometric_augmentations
from .photometric_batch import encode_photometric
from .regions import anchor_jitter, build_region_sampler
from .views import build_view_generator, max_reduction

__all__ = ["RegionSSLDatasetMapper"]

logger = logging.getLogger(__name__)

# A box counts as inside a view if it exceeds the view by at most this many pixels (float noise).
_INSIDE_TOL = 1e-3


class RegionSSLDatasetMapper:
    """Make views with ``view_generator``, regions with ``region_sampler``, then per-view
    photometric augmentations (``photometric[v]``, last list repeats for extra views)."""

    @configurable
    def __init__(self, *, view_generator, region_sampler, photometric, max_resample=10, jitter=None, jpeg_draft=True,
                 skipped=None, photometric_on_device=None):
        """``photometric_on_device``: None (apply the ops here), or ``dict(deepmind=bool, blur_first=bool)``
        to ship each view's drawn parameters instead (``encode_photometric``)."""
        self.photometric_on_device = photometric_on_device
        self.view_generator = view_generator
        self.region_sampler = region_sampler
        self.photometric = [T.AugmentationList(augs) for augs in photometric]
        self.max_resample = max_resample
        self.jitter = jitter
        self.jpeg_draft = jpeg_draft
        self.skipped = SkippedFiles() if skipped is None else skipped

    @classmethod
    def from_config(cls, cfg, dataset_dicts=None):
        c = cfg.INPUT.REGIONSSL
        skipped = SkippedFiles()
        background = BackgroundSource(RecordField(dataset_dicts, "file_name"), skipped=skipped) if dataset_dicts else None
        p = c.PHOTOMETRIC
        n = max(len(p.BLUR_PROB), len(p.SOLARIZE_PROB))
        photometric = []
        for v in range(n if p.ENABLED else 1):
            if not p.ENABLED:
                photometric.append([])
                continue
            photometric.append(
                build_photometric_augmentations(
                    jitter=tuple(p.COLOR_JITTER),
                    jitter_prob=p.COLOR_JITTER_PROB,
                    grayscale_prob=p.GRAYSCALE_PROB,
                    blur_prob=p.BLUR_PROB[min(v, len(p.BLUR_PROB) - 1)],
                    blur_sigma=tuple(p.BLUR_SIGMA),
                    blur_type=p.BLUR_TYPE,
                    solarize_prob=p.SOLARIZE_PROB[min(v, len(p.SOLARIZE_PROB) - 1)],
                    jitter_semantics=p.COLOR_JITTER_SEMANTICS,
                    blur_first=p.BLUR_FIRST,
                )
            )
        jitter = None
        if c.JITTER.ENABLED:
            j = c.JITTER
            jitter = dict(
                stride=j.ANCHOR_STRIDE, sizes=list(j.ANCHOR_SIZES), ratios=list(j.ANCHOR_RATIOS),
                iou_threshold=j.IOU_THRESHOLD, offset=j.ANCHOR_OFFSET, nms_threshold=j.NMS_THRESHOLD,
                fallback_topk=j.FALLBACK_TOPK,
            )
        return {
            "view_generator": build_view_generator(cfg, background_source=background),
            "region_sampler": build_region_sampler(cfg),
            "photometric": photometric,
            "max_resample": c.MAX_RESAMPLE,
            "jitter": jitter,
            "jpeg_draft": c.JPEG_DRAFT,
            "skipped": skipped,
            "photometric_on_device": dict(deepmind=p.COLOR_JITTER_SEMANTICS == "deepmind", blur_first=p.BLUR_FIRST)
            if p.ENABLED and p.ON_DEVICE else None,
        }

    def _make_views(self, image, file_name, decoded):
        """Views of ``image`` (an ``ImageFile``, or an (H, W, 3) uint8 array already decoded);
        ``decoded`` caches decodings of the file by reduction. Raises on undecodable data."""
        if isinstance(image, np.ndarray):
            return self.view_generator(image, file_name)
        plan = self.view_generator.plan(image.height, image.width)
        r = image.max_decode_reduction(max_reduction(plan)) if self.jpeg_draft and plan is not None else 1
        if r not in decoded:
            decoded[r] = image.decode(r, array=self.view_generator.reads_array(r))
        return self.view_generator.render(decoded[r], plan, file_name)

    def _views_and_regions(self, image, file_name=None):
        """Draw views and regions until at least one region is valid (bounded).

        ``image``: (H, W, 3) uint8 array, or an ``ImageFile`` decoded as coarsely as the views allow.
        """
        decoded = {}
        for _ in range(self.max_resample + 1):
            views = self._make_views(image, file_name, decoded)
            regions = self.region_sampler(views)
            if regions.view_boxes is not None:
                boxes = [b.astype(np.float64) for b in regions.view_boxes]
                valid = np.ones(len(boxes[0]), dtype=bool)
            else:
                boxes = [v.transform.apply_box(regions.boxes) if len(regions.boxes) else regions.boxes for v in views]
                valid = np.ones(len(regions.boxes), dtype=bool)
                for vi in regions.check_views or range(len(views)):
                    h, w = views[vi].image.shape[:2]
                    b = boxes[vi]
                    valid &= (b[:, 0] >= -_INSIDE_TOL) & (b[:, 1] >= -_INSIDE_TOL)
                    valid &= (b[:, 2] <= w + _INSIDE_TOL) & (b[:, 3] <= h + _INSIDE_TOL)
            if valid.any():
                return views, regions, boxes, valid
        return None

    def __call__(self, dataset_dict):
        dataset_dict = copy.copy(dataset_dict)
        file_name = dataset_dict["file_name"]
        image = open_image_or_none(file_name, self.skipped)  # header only; None if unreadable
        if image is None:
            return None
        try:
            drawn = self._views_and_regions(image, file_name)
        except UnreadableImageError as e:  # header fine, pixel data corrupt or truncated
            self.skipped.report(e.file_name, e.reason)
            return None
        if drawn is None:
            logger.warning(
                f"Skipping {file_name}: no valid region in {self.max_resample + 1} draws of views "
                f"(views do not overlap enough for {type(self.region_sampler).__name__})"
            )
            return None
        views, regions, boxes, valid = drawn
        out = {
            "file_name": file_name,
            "image_id": dataset_dict.get("image_id", file_name),
            "height": image.height,
            "width": image.width,
            "views": [],
            "boxes": [torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes],
            "valid": torch.as_tensor(valid),
            "box_groups": torch.as_tensor(regions.groups, dtype=torch.int64),
            "skipped_files": self.skipped.take_new(),
        }
        params = []
        for v, view in enumerate(views):
            aug = self.photometric[min(v, len(self.photometric) - 1)]
            pixels = view.image
            if self.photometric_on_device is not None:  # the same draws, applied by the model
                params.append(encode_photometric([a.get_transform(pixels) for a in aug.augs], **self.photometric_on_device))
            elif aug.augs:
                aug_input = T.AugInput(view.image)
                aug(aug_input)
                pixels = aug_input.image
            out["views"].append(torch.as_tensor(np.ascontiguousarray(pixels.transpose(2, 0, 1))))
        if params:
            out["photometric"] = torch.stack(params)
        if any(view.mask is not None for view in views):
            out["masks"] = [torch.as_tensor(view.mask, dtype=torch.float32) for view in views]
        if self.jitter is not None:
            h, w = views[0].image.shape[:2]
            jittered = [anchor_jitter(b, (h, w), **self.jitter) for b in boxes[0]]
            out["jittered_boxes"] = torch.as_tensor(np.stack(jittered), dtype=torch.float32).reshape(-1, 4)
        for key, value in regions.extras.items():
            out[key] = torch.as_tensor(value)
        return out
