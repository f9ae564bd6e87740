"""View-matching retrieval probe: "is the pretraining learning?" without fine-tuning a detector.

For every held-out image, a **fixed** probe mapper (independent of the method's own input config)
draws ``PROBE_PAIRS_PER_IMAGE`` pairs of views — two RandomResizedCrops of side S
(``TEST.REGIONSSL.PROBE_CROP_SIZE``), area scale (0.3, 1), flip 0.5, MoCo-v2 photometric
augmentation (colour jitter 0.4/0.4/0.4/0.1 p=0.8, grayscale 0.2, blur sigma (0.1, 2) p=0.5) —
and up to 4 boxes inside the two views' intersection (SCRL's ``IntersectionBoxes``: min side S/4,
IoU < 0.5 between boxes), so box i covers the same original pixels in both views.

Every box of view 1 is embedded with the model's online encoder without projector
(``RegionSSLBase.region_embedding``), and so is every box of view 2; embeddings are
L2-normalised. A query (view-1 region) is correct if its nearest view-2 region (cosine) among
**all** N regions of all images is its own counterpart; the gallery thus also holds other crops
of the same image, some of which cover nearly the same pixels. Reported (dict of floats):

* ``top1``: mean of ``top1_v1_to_v2`` and ``top1_v2_to_v1`` (the symmetric direction);
* ``top1_iou50``: view-1 -> view-2 queries whose nearest region is from the same image and
  covers the same place (IoU >= 0.5 with the query region, in original-image pixels), which
  forgives near-duplicate regions of other view pairs;
* ``image_top1``: view-1 queries whose nearest view-2 region comes from the same image;
* ``num_regions``: N (gallery size), ``chance``: 1 / N.

Randomness is seeded (``seed``) and the global RNG states are restored afterwards, so a probe
during training does not perturb the training stream. The model runs in eval mode (BN with its
running statistics) under ``torch.no_grad`` and gets its training mode back.
"""
import random
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T

from .data.augmentations import INTERPOLATIONS
from .data.datasets import ensure_registered, read_rgb_or_none
from .data.photometric import build_photometric_augmentations
from .data.regions import IntersectionBoxes, box_iou_np
from .data.views import TwoCrops

__all__ = ["ProbeViews", "run_probe", "retrieval_accuracy"]

PROBE_CROP_SCALE = (0.3, 1.0)
PROBE_BOXES_PER_PAIR = 4
PROBE_BATCH = 16  # views embedded per forward


class ProbeViews:
    """The probe's fixed view pipeline: TwoCrops + IntersectionBoxes + MoCo-v2 photometric.

    ``__call__(image)`` returns ``(views, boxes, original_boxes)`` or None: two (3, S, S) uint8
    views, their (R, 4) float32 boxes in view pixels, and the (R, 4) boxes in original pixels.
    Geometry goes through each view's transform only (``apply_box``), as in the training mapper.
    """

    def __init__(self, crop_size, max_tries=11):
        self.crops = TwoCrops(crop_size=crop_size, scale=PROBE_CROP_SCALE, ratio=(3.0 / 4.0, 4.0 / 3.0),
                              interp=INTERPOLATIONS["bilinear"], flip_prob=0.5)
        self.boxes = IntersectionBoxes(max_boxes=PROBE_BOXES_PER_PAIR, min_size=max(crop_size // 4, 8),
                                       iou_threshold=0.5, max_tries=50)
        self.photometric = T.AugmentationList(build_photometric_augmentations())  # MoCo-v2 defaults
        self.max_tries = max_tries

    def __call__(self, image):
        for _ in range(self.max_tries):
            views = self.crops(image)
            regions = self.boxes(views)
            if len(regions.boxes):
                break
        else:
            return None
        pixels, boxes = [], []
        for v in views:
            h, w = v.image.shape[:2]
            b = v.transform.apply_box(regions.boxes).clip(0, [w, h, w, h])  # inside up to float noise
            aug = T.AugInput(v.image)
            self.photometric(aug)
            pixels.append(torch.as_tensor(np.ascontiguousarray(aug.image.transpose(2, 0, 1))))
            boxes.append(torch.as_tensor(b, dtype=torch.float32))
        return pixels, boxes, regions.boxes


@contextmanager
def _seeded(seed):
    """Seed python/numpy/torch RNGs inside, restore the previous states on exit."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def retrieval_accuracy(a, b, image_ids=None, original_boxes=None):
    """Top-1 retrieval between matched rows of ``a`` and ``b`` (N, C) (any scale).

    Args:
        image_ids: (N,) image of each row, adds ``image_top1``.
        original_boxes: (N, 4) region of each row in its original image, adds ``top1_iou50``.
    Returns:
        dict with ``top1_v1_to_v2`` (row i of a finds row i of b), ``top1_v2_to_v1``, ``top1``
        (their mean) and the optional entries.
    """
    a, b = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
    sim = a @ b.t()  # (N, N), positives on the diagonal
    target = torch.arange(len(a))
    nn12, nn21 = sim.argmax(dim=1), sim.argmax(dim=0)
    out = {
        "top1_v1_to_v2": (nn12 == target).float().mean().item(),
        "top1_v2_to_v1": (nn21 == target).float().mean().item(),
    }
    out["top1"] = 0.5 * (out["top1_v1_to_v2"] + out["top1_v2_to_v1"])
    if image_ids is not None:
        image_ids = torch.as_tensor(image_ids)
        same_image = image_ids[nn12] == image_ids
        out["image_top1"] = same_image.float().mean().item()
        if original_boxes is not None:
            boxes = np.asarray(original_boxes, dtype=np.float64)
            iou = np.array([box_iou_np(boxes[i], boxes[j])[0, 0] for i, j in enumerate(nn12.tolist())])
            out["top1_iou50"] = (same_image & torch.as_tensor(iou >= 0.5)).float().mean().item()
    return out


def _probe_samples(dicts, views, pairs_per_image):
    """View pairs: (view1, view2 (3,S,S) uint8, boxes1, boxes2 (R,4), original boxes (R,4), image index)."""
    samples = []
    for i, d in enumerate(dicts):
        image = read_rgb_or_none(d["file_name"])
        if image is None:
            continue
        for _ in range(pairs_per_image):
            out = views(image)
            if out is not None:
                (v1, v2), (b1, b2), orig = out
                samples.append((v1, v2, b1, b2, orig, i))
    return samples


@torch.no_grad()
def _embed(model, views, boxes):
    """Region embeddings (sum R_i, C) of a list of same-size views, in batches."""
    out = []
    for s in range(0, len(views), PROBE_BATCH):
        images = model.normalize(views[s : s + PROBE_BATCH])
        bx = [b.to(model.device) for b in boxes[s : s + PROBE_BATCH]]
        out.append(model.region_embedding(images, bx).float().cpu())
    return torch.cat(out)


def run_probe(model, cfg, dataset=None, max_images=None, seed=0):
    """Run the retrieval probe (see module docstring) and return its dict of floats.

    Args:
        model: a :class:`RegionSSLBase` (not DDP-wrapped).
        cfg: config; ``TEST.REGIONSSL.{PROBE_DATASET, PROBE_MAX_IMAGES, PROBE_CROP_SIZE,
            PROBE_PAIRS_PER_IMAGE}`` are used.
        dataset: image-only dataset name (default ``PROBE_DATASET``).
        max_images: at most this many images (default ``PROBE_MAX_IMAGES``).
        seed: fixes views, boxes and photometric draws; the same seed gives the same regions
            for every model, so numbers of two models are directly comparable.
    """
    t = cfg.TEST.REGIONSSL
    dataset = dataset or t.PROBE_DATASET
    max_images = max_images or t.PROBE_MAX_IMAGES
    ensure_registered([dataset])
    dicts = DatasetCatalog.get(dataset)[:max_images]
    if not dicts:
        raise ValueError(f"Probe dataset {dataset!r} has no images")
    with _seeded(seed):
        samples = _probe_samples(dicts, ProbeViews(t.PROBE_CROP_SIZE), t.PROBE_PAIRS_PER_IMAGE)
    if not samples:
        raise RuntimeError(f"The probe drew no valid region pair from {dataset!r}")
    v1, v2, b1, b2, orig, img = zip(*samples)
    image_ids = torch.cat([torch.full((len(b),), i) for b, i in zip(b1, img)])
    was_training = model.training
    model.eval()
    try:
        e1, e2 = _embed(model, list(v1), list(b1)), _embed(model, list(v2), list(b2))
    finally:
        model.train(was_training)
    out = retrieval_accuracy(e1, e2, image_ids, np.concatenate(orig))
    out.update(num_regions=float(len(e1)), chance=1.0 / len(e1))
    return out
