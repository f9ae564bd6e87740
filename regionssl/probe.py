"""View-matching retrieval probe: "is the pretraining learning?" without fine-tuning a detector.

Protocol (fixed, independent of the method's own input config, the same for every model):

0. Records that share a ``group`` (the frames of one video clip) are one place: with
   ``TEST.REGIONSSL.PROBE_ONE_PER_GROUP`` only the middle one is kept. Consecutive frames are near
   duplicates, so without this a region whose nearest neighbour is the same place one frame later
   counts as a miss, and a gallery made mostly of one clip caps top-1 near (distinct places) / N.
1. Each held-out image is cut into a g x g grid of disjoint **tiles**, g = ``TEST.REGIONSSL.PROBE_GRID``
   or, when that is 0, g = ceil(sqrt(64 / images)) (4 images -> 4 x 4 tiles, >= 64 images -> the
   whole images), so the gallery has >= 64 distinct places even with a handful of photos, and no
   two gallery regions share pixels. With g > 1 a region must be told apart from the other places
   of its own image, not only from other images (region-level, not image-level retrieval).
2. One **round** draws, for every tile, two views — RandomResizedCrops of side S
   (``TEST.REGIONSSL.PROBE_CROP_SIZE``), area scale (0.3, 1), flip 0.5, MoCo-v2 photometric
   augmentation (colour jitter 0.4/0.4/0.4/0.1 p=0.8, grayscale 0.2, blur sigma (0.1, 2) p=0.5)
   — and **one** box inside the views' intersection (SCRL's ``IntersectionBoxes``, min side S/4),
   so the box covers the same original pixels in both views.
3. Every box is embedded with the model's online encoder without projector
   (``RegionSSLBase.region_embedding``, eval mode, no_grad) and L2-normalised. A view-1 region is
   correct if its nearest view-2 region (cosine) among the N regions of the round is its own
   counterpart, and symmetrically. Accuracies are averaged over ``TEST.REGIONSSL.PROBE_ROUNDS``.

Returned dict of floats: ``top1`` (mean of ``top1_v1_to_v2`` and ``top1_v2_to_v1``),
``image_top1`` (view-1 queries whose nearest region is from the same image, any tile),
``num_regions`` (N, gallery size of a round), ``num_queries`` (over all rounds), ``chance`` (1/N).

Randomness is seeded (``seed``): every model sees the same views, boxes and photometric draws.
The global RNG states are restored afterwards, so a probe during training does not perturb the
training stream, and the model gets its training mode back.
"""
import math
import random
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T

from .data.augmentations import INTERPOLATIONS
from .data.datasets import ensure_registered
from .data.image_io import read_rgb_or_none
from .data.photometric import build_photometric_augmentations
from .data.regions import IntersectionBoxes
from .data.views import TwoCrops

__all__ = ["ProbeViews", "image_tiles", "one_per_group", "run_probe", "retrieval_accuracy"]

PROBE_CROP_SCALE = (0.3, 1.0)
PROBE_MIN_GALLERY = 64  # tiles per round at least (when the images allow it)
PROBE_BATCH = 16  # views embedded per forward


class ProbeViews:
    """The probe's fixed view pipeline: TwoCrops + IntersectionBoxes(1 box) + MoCo-v2 photometric.

    ``__call__(image)`` returns ``(views, boxes)`` or None: two (3, S, S) uint8 views and their
    (1, 4) float32 boxes in view pixels, moved from the original image by each view's transform.
    """

    def __init__(self, crop_size, max_tries=11):
        self.crops = TwoCrops(crop_size=crop_size, scale=PROBE_CROP_SCALE, ratio=(3.0 / 4.0, 4.0 / 3.0),
                              interp=INTERPOLATIONS["bilinear"], flip_prob=0.5)
        self.boxes = IntersectionBoxes(max_boxes=1, min_size=max(crop_size // 4, 8), iou_threshold=0.5, max_tries=50)
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
        return pixels, boxes


def one_per_group(dicts):
    """The dataset dicts with one record per ``group`` (its middle one, in dataset order); records
    without a group are each their own. Order follows each kept record's first group appearance."""
    groups = {}
    for i, d in enumerate(dicts):
        groups.setdefault(d.get("group", ("record", i)), []).append(d)
    return [members[len(members) // 2] for members in groups.values()]


def image_tiles(image, grid):
    """``grid x grid`` disjoint tiles (H/g, W/g, 3) of an (H, W, 3) image, row-major."""
    h, w = image.shape[:2]
    ys, xs = np.linspace(0, h, grid + 1).astype(int), np.linspace(0, w, grid + 1).astype(int)
    return [image[ys[i]:ys[i + 1], xs[j]:xs[j + 1]] for i in range(grid) for j in range(grid)]


@contextmanager
def _seeded(seed):
    """Seed the python, numpy and torch CPU generators inside; restore their states on exit.

    Only host generators are seeded: the probe draws its views on the CPU. ``torch.manual_seed``
    would also reseed every GPU generator (or, before CUDA starts, queue that seed for it) without
    restoring them, so GPU draws of the training (shuffle-BN permutations) would restart from the
    same sequence after every probe, and a resumed run would differ from an uninterrupted one.
    ``fork_rng(devices=[])`` saves and restores the CPU generator only, and touches no device.
    """
    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])


def retrieval_accuracy(a, b, image_ids=None):
    """Top-1 retrieval between matched rows of ``a`` and ``b`` (N, C) (any scale).

    Returns dict with ``top1_v1_to_v2`` (row i of a finds row i of b), ``top1_v2_to_v1``,
    ``top1`` (their mean) and, if ``image_ids`` (N,) is given, ``image_top1``.
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
        out["image_top1"] = (image_ids[nn12] == image_ids).float().mean().item()
    return out


@torch.no_grad()
def _embed(model, views, boxes):
    """Region embeddings (sum R_i, C) of a list of same-size views, in batches."""
    out = []
    for s in range(0, len(views), PROBE_BATCH):
        images = model.normalize(views[s : s + PROBE_BATCH])
        bx = [b.to(model.device) for b in boxes[s : s + PROBE_BATCH]]
        out.append(model.region_embedding(images, bx).float().cpu())
    return torch.cat(out)


def _draw_rounds(images, crop_size, rounds, grid=0):
    """Per round, a list of (view1, view2, box1, box2, image index) over all tiles (``grid`` x
    ``grid`` per image; 0 = the smallest grid giving ``PROBE_MIN_GALLERY`` tiles)."""
    grid = grid or max(1, math.ceil(math.sqrt(PROBE_MIN_GALLERY / len(images))))
    tiles = [(i, t) for i, im in enumerate(images) for t in image_tiles(im, grid)]
    views = ProbeViews(crop_size)
    out = []
    for _ in range(rounds):
        pairs = [(views(t), i) for i, t in tiles]
        out.append([(v[0], v[1], b[0], b[1], i) for (v, b), i in (p for p in pairs if p[0] is not None)])
    return out


def run_probe(model, cfg, dataset=None, max_images=None, seed=0):
    """Run the retrieval probe (see module docstring) and return its dict of floats.

    Args:
        model: a :class:`RegionSSLBase` (not DDP-wrapped).
        cfg: config; ``TEST.REGIONSSL.{PROBE_DATASET, PROBE_ONE_PER_GROUP, PROBE_MAX_IMAGES,
            PROBE_CROP_SIZE, PROBE_ROUNDS, PROBE_GRID}`` are used.
        dataset: image-only dataset name (default ``PROBE_DATASET``).
        max_images: at most this many images (default ``PROBE_MAX_IMAGES``).
        seed: fixes tiles' views, boxes and photometric draws (the same for every model).
    """
    t = cfg.TEST.REGIONSSL
    dataset = dataset or t.PROBE_DATASET
    ensure_registered([dataset])
    dicts = DatasetCatalog.get(dataset)
    if t.PROBE_ONE_PER_GROUP:
        dicts = one_per_group(dicts)
    dicts = dicts[: max_images or t.PROBE_MAX_IMAGES]
    images = [im for im in (read_rgb_or_none(d["file_name"]) for d in dicts) if im is not None]
    if not images:
        raise ValueError(f"Probe dataset {dataset!r} has no readable images")
    with _seeded(seed):
        rounds = _draw_rounds(images, t.PROBE_CROP_SIZE, t.PROBE_ROUNDS, t.PROBE_GRID)
    was_training = model.training
    model.eval()
    results = []
    try:
        for samples in rounds:
            v1, v2, b1, b2, img = zip(*samples)
            e1, e2 = _embed(model, list(v1), list(b1)), _embed(model, list(v2), list(b2))
            results.append((retrieval_accuracy(e1, e2, img), len(samples)))
    finally:
        model.train(was_training)
    out = {k: float(np.mean([r[k] for r, _ in results])) for k in results[0][0]}
    n = float(np.mean([m for _, m in results]))
    out.update(num_regions=n, num_queries=float(sum(m for _, m in results)), chance=1.0 / n)
    return out
