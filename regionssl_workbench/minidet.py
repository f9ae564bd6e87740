"""A small detection set of real objects on real photos, for transfer benchmarks on a CPU.

``regionssl_minidet_{train,val}`` (registered by ``regionssl.data.minidet_catalog``) is a COCO
instance-segmentation set built here (``python tools/build_detection_set.py``): photographic
cut-outs (RGBA stamps, e.g. Debian's ``tuxpaint-stamps-default``) pasted onto crops of real photos. Everything about an instance is
known by construction:

* its mask is the cut-out's alpha (``alpha >= 0.5`` after resizing) minus what objects pasted
  later cover (partial occlusion is allowed, at most ``MAX_OCCLUDED`` of each object);
* its box is the exact pixel extent of that visible mask (XYWH, ``x0 .. x1 + 1``);
* the mask is stored as COCO RLE, so Detectron2 and pycocotools read back exactly these pixels.

The train and val splits share nothing: each cut-out file belongs to one split only (a seeded
per-class split), and the two background lists must be disjoint (checked by path and by
content). Building is deterministic (seeded ``numpy`` generators over sorted inputs) and
idempotent (``atomic.build_once`` with a stamp of the generator version and every input).
"""
import hashlib
import json
import logging
import os
from collections import Counter

import cv2
import numpy as np

from regionssl.data.datasets import IMAGE_EXTENSIONS
from regionssl.data.image_io import read_rgb_or_none
from regionssl.data.minidet_catalog import CLASSES, SPLITS, default_root, minidet_paths
from regionssl.utils.files import file_sha1

from .atomic import build_once

__all__ = [
    "CLASSES", "STAMP_SOURCES", "STAMP_EXCLUDE", "SPLITS", "default_root", "minidet_paths", "list_cutouts",
    "split_cutouts", "check_disjoint_backgrounds", "compose_image", "build_minidet",
]

logger = logging.getLogger(__name__)

_VERSION = "regionssl_minidet v1"  # bump when the generator changes: a stale build is rebuilt
# Folders of photographic stamps per class (relative to the stamps root, searched recursively).
STAMP_SOURCES = {
    "mammal": ("animals/mammals",),
    "bird": ("animals/birds",),
    "flower": ("plants/flowers",),
    "produce": ("food/fruit", "food/vegetables"),
}
# Not photographs of the class (a drawing, a silhouette, a toy). Folders named "cartoon" and
# tuxpaint's "_mirror"/"_shadow" variants are skipped everywhere.
STAMP_EXCLUDE = ("animals/mammals/hedgehog.png", "animals/mammals/echidna.png",
                 "animals/mammals/bears/toys/edward_bear.png")

# Generator settings (part of the build stamp).
_PARAMS = {
    "long_side": 320, "short_side": (240, 320),  # canvas size, px
    "objects_per_image": (1, 4),                 # inclusive
    "object_long_side": (40, 0.8),               # px, fraction of the canvas' short side (log-uniform)
    "min_crop_area": 0.3,                        # background crop: fraction of the largest crop
    "brightness": (0.8, 1.2),                    # cut-out intensity scale
    "max_occluded": 0.5,                         # an object keeps at least half of its pixels visible
    "min_visible_pixels": 100,
    "val_fraction": 0.3,                         # of each class' cut-outs
}
MAX_OCCLUDED = _PARAMS["max_occluded"]


# ----------------------------------------------------------------------------- inputs
def list_cutouts(stamps_root, sources=None, exclude=STAMP_EXCLUDE):
    """Cut-out files per class: ``{class: sorted paths relative to stamps_root}``.

    Raises FileNotFoundError naming the folder if a source folder is missing or a class has fewer
    than two cut-outs (each split needs its own).
    """
    sources = sources or STAMP_SOURCES
    out = {}
    for cls, folders in sources.items():
        files = []
        for rel in folders:
            top = os.path.join(stamps_root, rel)
            if not os.path.isdir(top):
                raise FileNotFoundError(f"Cut-out folder {top!r} (class {cls!r}) does not exist.")
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = sorted(d for d in dirnames if d != "cartoon")
                for f in sorted(filenames):
                    stem = os.path.splitext(f)[0]
                    if not f.lower().endswith(".png") or stem.endswith(("_mirror", "_shadow")):
                        continue
                    path = os.path.relpath(os.path.join(dirpath, f), stamps_root).replace(os.sep, "/")
                    if path not in exclude:
                        files.append(path)
        if len(files) < 2:
            raise FileNotFoundError(f"Class {cls!r} has {len(files)} cut-out(s) under {stamps_root!r} "
                                    f"({', '.join(folders)}); need at least 2 (one per split).")
        out[cls] = sorted(files)
    return out


def split_cutouts(cutouts, val_fraction, seed):
    """Split each class' cut-outs between train and val (seeded; a file is in one split only).

    Returns:
        dict: ``{"train": {class: [paths]}, "val": {class: [paths]}}`` (each list sorted).
    """
    out = {s: {} for s in SPLITS}
    for k, (cls, files) in enumerate(sorted(cutouts.items())):
        order = np.random.default_rng([seed, 1000 + k]).permutation(len(files))
        n_val = min(len(files) - 1, max(1, int(round(val_fraction * len(files)))))
        out["val"][cls] = sorted(files[i] for i in order[:n_val])
        out["train"][cls] = sorted(files[i] for i in order[n_val:])
    return out


def check_disjoint_backgrounds(train_files, val_files):
    """Raise ValueError naming the file if a val background is also a train background (same
    path or same bytes). Returns ``{path: sha1}`` of every file (part of the build stamp)."""
    digests = {p: file_sha1(p) for p in list(train_files) + list(val_files)}
    train_real = {os.path.realpath(p): p for p in train_files}
    train_digest = {digests[p]: p for p in train_files}
    for p in val_files:
        other = train_real.get(os.path.realpath(p)) or train_digest.get(digests[p])
        if other is not None:
            raise ValueError(f"Validation background {p!r} is also a training background ({other!r}); "
                             "the splits must not share backgrounds.")
    return digests


def _load_cutout(path):
    """(h, w, 4) float32 RGBA in [0, 1] cropped to the alpha's extent, colour premultiplied."""
    from PIL import Image

    with Image.open(path) as im:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
    ys, xs = np.nonzero(rgba[..., 3] > 0)
    if len(ys) == 0:
        raise ValueError(f"Cut-out {path!r} is fully transparent.")
    rgba = rgba[ys.min():ys.max() + 1, xs.min():xs.max() + 1].copy()
    rgba[..., :3] *= rgba[..., 3:]  # premultiplied: resizing does not bleed hidden colours in
    return rgba


# ----------------------------------------------------------------------------- composition
def _background_crop(rng, photo, w, h):
    """A random crop of ``photo`` (H, W, 3) uint8 with aspect w/h, resized to (h, w), maybe flipped."""
    ph, pw = photo.shape[:2]
    scale = min(pw / w, ph / h)  # largest crop of this aspect
    s = scale * np.sqrt(rng.uniform(_PARAMS["min_crop_area"], 1.0))
    cw, ch = max(1, int(round(w * s))), max(1, int(round(h * s)))
    x0, y0 = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
    crop = cv2.resize(photo[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_AREA)
    return crop[:, ::-1] if rng.uniform() < 0.5 else crop


def _resize_cutout(rgba, long_side, flip):
    h, w = rgba.shape[:2]
    s = long_side / max(h, w)
    size = (max(1, int(round(w * s))), max(1, int(round(h * s))))
    out = cv2.resize(rgba, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    return out[:, ::-1] if flip else out


def compose_image(rng, background, cutouts):
    """Paste cut-outs, in order, onto a random crop of one background photo.

    Args:
        rng: numpy Generator (all randomness).
        background: (H, W, 3) uint8 RGB photo.
        cutouts: list of (category index, (h, w, 4) premultiplied RGBA float32) to paste.
    Returns:
        image: (h, w, 3) uint8 RGB, ``h, w`` from the canvas settings;
        objects: list of (category index, (h, w) bool visible mask, index into ``cutouts``) of the
        objects that were placed (an object that found no place within the occlusion limit is left
        out). Each mask is ``alpha >= 0.5`` of the pasted cut-out minus later objects' masks.
    """
    long_side = _PARAMS["long_side"]
    short = int(rng.integers(_PARAMS["short_side"][0], _PARAMS["short_side"][1] + 1))
    w, h = (long_side, short) if rng.uniform() < 0.7 else (short, long_side)
    img = _background_crop(rng, background, w, h).astype(np.float32) / 255.0
    lo, hi_frac = _PARAMS["object_long_side"]
    placed = []  # [category, visible mask, full area, cutout index]
    for idx, (cat, rgba) in enumerate(cutouts):
        side = float(np.exp(rng.uniform(np.log(lo), np.log(hi_frac * min(h, w)))))
        obj = _resize_cutout(rgba, side, rng.uniform() < 0.5)
        obj = np.concatenate([obj[..., :3] * rng.uniform(*_PARAMS["brightness"]), obj[..., 3:]], axis=2)
        oh, ow = obj.shape[:2]
        alpha = obj[..., 3]
        full = alpha >= 0.5
        area = int(full.sum())
        if area < _PARAMS["min_visible_pixels"] or oh > h or ow > w:
            continue
        for _try in range(20):
            x0, y0 = int(rng.integers(0, w - ow + 1)), int(rng.integers(0, h - oh + 1))
            mask = np.zeros((h, w), bool)
            mask[y0:y0 + oh, x0:x0 + ow] = full
            if all((p[1] & ~mask).sum() >= max((1 - MAX_OCCLUDED) * p[2], _PARAMS["min_visible_pixels"])
                   for p in placed):
                break
        else:
            continue
        a = alpha[..., None]
        region = img[y0:y0 + oh, x0:x0 + ow]
        img[y0:y0 + oh, x0:x0 + ow] = np.clip(region * (1 - a) + obj[..., :3], 0, 1)  # premultiplied "over"
        for p in placed:
            p[1] &= ~mask
        placed.append([cat, mask, area, idx])
    image = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return image, [(c, m, i) for c, m, _, i in placed]


def _mask_to_annotation(mask):
    """COCO fields of one instance from its (H, W) bool mask: exact box, area, compressed RLE."""
    from pycocotools import mask as mask_util

    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(mask.sum()), "segmentation": rle, "iscrowd": 0}


def _write_jpeg(path, rgb):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])


def _build_split(out_root, split, num_images, backgrounds, cutouts, stamps_root, seed):
    """Write one split's JPEGs and COCO json; returns its manifest entry."""
    paths = minidet_paths(out_root)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    classes = [c for c in CLASSES if c in cutouts]
    cache = {}
    images, annotations, bag = [], [], []
    used_bg, used_cut = Counter(), Counter()
    for image_id in range(1, num_images + 1):
        photo, failures = None, 0
        while photo is None:  # unreadable backgrounds are skipped with a warning (read_rgb_or_none)
            if failures > max(20, len(backgrounds)):
                raise ValueError(f"No readable background for split {split!r} in {failures} tries.")
            bg = backgrounds[int(rng.integers(len(backgrounds)))]
            photo = read_rgb_or_none(bg)
            failures += 1
        n = int(rng.integers(_PARAMS["objects_per_image"][0], _PARAMS["objects_per_image"][1] + 1))
        while len(bag) < n:  # categories from shuffled bags: splits stay nearly balanced
            bag += rng.permutation(len(classes)).tolist()
        chosen = []
        for k in bag[:n]:
            rel = cutouts[classes[k]][int(rng.integers(len(cutouts[classes[k]])))]
            if rel not in cache:
                cache[rel] = _load_cutout(os.path.join(stamps_root, rel))
            chosen.append((k, rel))
        bag = bag[n:]
        image, objects = compose_image(rng, photo, [(k, cache[rel]) for k, rel in chosen])
        file_name = "{:06d}.jpg".format(image_id)
        _write_jpeg(os.path.join(paths[split + "_images"], file_name), image)
        used_bg[bg] += 1
        images.append({"id": image_id, "file_name": file_name, "height": image.shape[0], "width": image.shape[1],
                       "background": bg})
        for k, mask, i in objects:
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": CLASSES.index(classes[k]) + 1}
            ann.update(_mask_to_annotation(mask))
            ann["cutout"] = chosen[i][1]
            annotations.append(ann)
            used_cut[chosen[i][1]] += 1
    categories = [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(CLASSES)]
    os.makedirs(os.path.dirname(paths[split + "_json"]), exist_ok=True)
    with open(paths[split + "_json"], "w") as f:
        json.dump({"info": {"description": "regionssl minidet: photographic cut-outs on real photos",
                            "version": _VERSION},
                   "licenses": [], "images": images, "annotations": annotations, "categories": categories}, f)
    per_class = Counter(CLASSES[a["category_id"] - 1] for a in annotations)
    return {"images": len(images), "instances": {c: per_class.get(c, 0) for c in CLASSES},
            "cutouts": {c: cutouts.get(c, []) for c in CLASSES}, "cutouts_used": len(used_cut),
            "backgrounds": sorted(backgrounds), "backgrounds_used": len(used_bg)}


def build_minidet(root, stamps_root, train_backgrounds, val_backgrounds, num_train=400, num_val=100, seed=0,
                  sources=None, force=False):
    """Build ``regionssl_minidet`` under ``root`` unless an identical build is there.

    Args:
        stamps_root: folder of RGBA cut-outs laid out as ``STAMP_SOURCES`` (or ``sources``) says.
        train_backgrounds, val_backgrounds: lists of photo paths; must not share a file.
    Returns:
        (dict manifest, bool built): the manifest (also ``root/manifest.json``) and whether this
        call built the data (False: an identical build was already complete).
    """
    root = os.path.abspath(root)
    train_backgrounds = sorted(set(train_backgrounds))
    val_backgrounds = sorted(set(val_backgrounds))
    for name, files in (("train", train_backgrounds), ("val", val_backgrounds)):
        if not files:
            raise ValueError(f"No {name} backgrounds given.")
        bad = [f for f in files if not f.lower().endswith(IMAGE_EXTENSIONS) or not os.path.isfile(f)]
        if bad:
            raise FileNotFoundError(f"{name} background {bad[0]!r} is not an image file.")
    digests = check_disjoint_backgrounds(train_backgrounds, val_backgrounds)
    cutouts = list_cutouts(stamps_root, sources)
    splits = split_cutouts(cutouts, _PARAMS["val_fraction"], seed)
    inputs = {
        "version": _VERSION, "params": _PARAMS, "seed": seed, "num": {"train": num_train, "val": num_val},
        "classes": CLASSES, "cutouts": {rel: os.path.getsize(os.path.join(stamps_root, rel))
                                        for files in cutouts.values() for rel in files},
        "stamps_root": os.path.abspath(stamps_root), "splits": splits,
        "backgrounds": {"train": [digests[p] for p in train_backgrounds],
                        "val": [digests[p] for p in val_backgrounds]},
    }
    stamp = _VERSION + " " + hashlib.sha1(json.dumps(inputs, sort_keys=True).encode()).hexdigest()

    def build(folder):
        manifest = {"version": _VERSION, "stamp": stamp, "classes": list(CLASSES), "seed": seed,
                    "stamps_root": os.path.abspath(stamps_root), "params": _PARAMS, "splits": {}}
        for split, num, bgs in (("train", num_train, train_backgrounds), ("val", num_val, val_backgrounds)):
            manifest["splits"][split] = _build_split(folder, split, num, bgs, splits[split], stamps_root, seed)
        with open(minidet_paths(folder)["manifest"], "w") as f:
            json.dump(manifest, f, indent=1)

    built = build_once(root, stamp, build, force=force)
    with open(minidet_paths(root)["manifest"]) as f:
        return json.load(f), built
