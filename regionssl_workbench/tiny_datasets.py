"""Build the tiny synthetic COCO and VOC sets used by tests, fine-tuning quick schedules and the demo.

    python tools/build_tiny_datasets.py                 # into the default root (see below)
    python tools/build_tiny_datasets.py --root /data/regionssl_tiny --force

Test and demo data, not part of the ``regionssl`` package: the tests register these sets in
``tests/conftest.py``, the demo's fine-tuning through ``tools/train_net_tiny.py``.

* ``regionssl_tiny_coco_{train,val}``: a COCO-format instance-segmentation set (24 / 8 JPEG images,
  128-200 px wide, 128-160 px high) of synthetic filled shapes, one category per shape, each with a
  distinct colour family, drawn on low-saturation gradient / noise / stripe / checker backgrounds.
  Boxes are the exact extent of the polygon that was rasterised, so masks and boxes agree.
* ``regionssl_tiny_voc_{trainval,test}``: the same kind of images as a VOC2007-style folder.

Default root: $REGIONSSL_DATASETS, else $DETECTRON2_DATASETS/regionssl_tiny, else
<repo>/datasets/regionssl_tiny. Registered sets build on first use (not at registration time);
building is deterministic (seeded ``numpy`` generators) and safe when several processes ask for it
at once (``regionssl_workbench.atomic.build_once``: file lock, build in a temporary folder, rename).
Running this script is only needed to inspect the data or to prepare a shared, read-only copy.
"""
import argparse
import json
import os

import cv2
import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_pascal_voc

from regionssl.data.demo_images import demo_image_files, register_demo_images

from .atomic import build_once

__all__ = [
    "CATEGORIES", "default_root", "tiny_paths", "build_tiny_coco", "build_tiny_voc", "ensure_tiny_datasets",
    "register_tiny_datasets", "register_all",
]

_VERSION = "regionssl_tiny v1"  # bump when the generator changes: stale folders are rebuilt
_SEED = 20240417
CATEGORIES = ("circle", "rectangle", "triangle", "star")  # COCO ids 1..4, VOC names
# (split name, number of images, seed offset) per set.
_COCO_SPLITS = (("train", 24, 0), ("val", 8, 1))
_VOC_SPLITS = (("trainval", 24, 2), ("test", 8, 3))
# Hue (degrees) of each category's colour family: red, blue, green, yellow.
_HUES = (0.0, 220.0, 120.0, 50.0)


def default_root():
    """``$REGIONSSL_DATASETS``, else ``$DETECTRON2_DATASETS/regionssl_tiny``, else
    ``<repo>/datasets/regionssl_tiny`` (repo = parent folder of ``regionssl_workbench/``)."""
    if os.environ.get("REGIONSSL_DATASETS"):
        return os.environ["REGIONSSL_DATASETS"]
    if os.environ.get("DETECTRON2_DATASETS"):
        return os.path.join(os.environ["DETECTRON2_DATASETS"], "regionssl_tiny")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(repo, "datasets", "regionssl_tiny")


def tiny_paths(root=None):
    """Where each part of the tiny sets lives under ``root`` (built or not).

    Returns:
        dict: ``coco_{train,val}_json``, ``coco_{train,val}_images``, ``voc_dirname`` -> path.
    """
    root = os.path.abspath(root or default_root())
    out = {"voc_dirname": os.path.join(root, "VOC2007")}
    for split, _, _ in _COCO_SPLITS:
        out["coco_%s_json" % split] = os.path.join(root, "coco", "annotations", "instances_%s.json" % split)
        out["coco_%s_images" % split] = os.path.join(root, "coco", split)
    return out


# ----------------------------------------------------------------------------- drawing
def _hsv_to_rgb(h, s, v):
    """h in degrees, s and v in [0, 1] -> (3,) float RGB in [0, 255]."""
    c = v * s
    x = c * (1 - abs((h / 60.0) % 2 - 1))
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h // 60) % 6]
    return np.array([r, g, b]) * 255.0 + (v - c) * 255.0


def _background(rng, h, w):
    """A (h, w, 3) float32 RGB background: gradient, noise, stripes or checker, low saturation."""
    c0 = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0, 0.25), rng.uniform(0.3, 0.8))
    c1 = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0, 0.25), rng.uniform(0.3, 0.8))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:  # linear gradient in a random direction
        a = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(a) + yy * np.sin(a)
        t = (t - t.min()) / max(t.max() - t.min(), 1.0)
    elif kind == 1:  # smooth noise: upsampled coarse random grid
        t = cv2.resize(rng.uniform(0, 1, (4, 4)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
        t = np.clip(t, 0, 1)
    elif kind == 2:  # stripes
        a, period = rng.uniform(0, np.pi), rng.uniform(8, 24)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period)
    else:  # checkerboard
        cell = int(rng.integers(8, 24))
        t = ((xx // cell + yy // cell) % 2).astype(np.float32)
    return (c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.float32)


def _shape_polygon(rng, category, size):
    """Vertices (V, 2) of one object centred at 0 whose larger extent is about ``size`` px."""
    r, rot = size / 2.0, rng.uniform(0, 2 * np.pi)
    if category == "circle":  # ellipse, 32 vertices
        a = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([r * np.cos(a), r * rng.uniform(0.6, 1.0) * np.sin(a)], 1)
    elif category == "rectangle":  # aspect 1:2..2:1, tilted at most 30 degrees
        hw, hh = r, r * rng.uniform(0.5, 1.0)
        pts = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
        rot = rng.uniform(-np.pi / 6, np.pi / 6)
    elif category == "triangle":
        a = np.array([0.0, 2.0, 4.0]) * np.pi / 3 + rng.uniform(-0.25, 0.25, 3)
        pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    else:  # five-pointed star, inner radius 0.45 r
        a = np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        pts = np.stack([rad * np.cos(a), rad * np.sin(a)], 1)
    c, s = np.cos(rot), np.sin(rot)
    return pts @ np.array([[c, s], [-s, c]])


def _draw_image(rng, categories):
    """Draw one image with (at most) one object per entry of ``categories`` (category indices).

    Returns (H, W, 3) uint8 RGB image and a list of (category index, (V, 2) polygon) objects.

    Polygons are in continuous pixel coordinates (pixel (i, j) covers [j, j+1) x [i, i+1)), rounded
    to 0.1 px, lie inside the image and do not overlap (boxes 2 px apart), so no mask is occluded.
    """
    w, h = int(rng.integers(128, 201)), int(rng.integers(128, 161))
    img = _background(rng, h, w)
    objects, boxes = [], []
    for cat in categories:
        # Half the objects small (COCO "small": < 32^2 px), half medium/large.
        size = rng.uniform(12, 26) if rng.uniform() < 0.5 else rng.uniform(30, 0.6 * min(h, w))
        poly = _shape_polygon(rng, CATEGORIES[cat], size)
        lo, hi = poly.min(0), poly.max(0)
        for _try in range(50):
            centre = rng.uniform(1 - lo, np.array([w, h]) - 1 - hi)
            p = np.round(poly + centre, 1)
            box = np.concatenate([p.min(0), p.max(0)])
            if all(box[0] > b[2] + 2 or box[2] < b[0] - 2 or box[1] > b[3] + 2 or box[3] < b[1] - 2
                   for b in boxes):
                break
        else:
            continue  # no free room for this one
        hue = (_HUES[cat] + rng.uniform(-12, 12)) % 360
        colour = _hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.7, 1.0))
        # cv2 puts integer coordinates on pixel centres: subtract 0.5, draw with 4 sub-pixel bits.
        cv2.fillPoly(img, [np.round((p - 0.5) * 16).astype(np.int32)], colour.tolist(),
                     lineType=cv2.LINE_AA, shift=4)
        objects.append((cat, p))
        boxes.append(box)
    img = img + rng.normal(0, 6, img.shape)  # sensor-like noise over objects and background
    return np.clip(img, 0, 255).astype(np.uint8), objects


def _split_samples(seed_offset, num_images):
    """Yield (index from 1, image, objects) for one split; each split has its own RNG stream."""
    rng = np.random.default_rng([_SEED, seed_offset])
    bag = []  # categories drawn from shuffled bags so that every split is nearly balanced
    for i in range(1, num_images + 1):
        n = int(rng.integers(2, 6))
        while len(bag) < n:
            bag += rng.permutation(len(CATEGORIES)).tolist()
        img, objects = _draw_image(rng, bag[:n])
        bag = bag[n:]
        assert objects, "every image has at least its first object"
        yield i, img, objects


def _write_jpeg(path, rgb):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])


def _r2(x):
    return round(float(x), 2)


# ----------------------------------------------------------------------------- builders
def build_tiny_coco(root):
    """Write ``root/coco/{train,val}/*.jpg`` and ``root/coco/annotations/instances_{split}.json``.

    Returns:
        dict: ``coco_{train,val}_json`` and ``coco_{train,val}_images`` -> path.
    """
    paths = tiny_paths(root)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CATEGORIES)]
    for split, num_images, seed_offset in _COCO_SPLITS:
        image_dir = paths["coco_%s_images" % split]
        images, annotations = [], []
        for i, img, objects in _split_samples(seed_offset, num_images):
            file_name = "{:06d}.jpg".format(i)
            _write_jpeg(os.path.join(image_dir, file_name), img)
            images.append({"id": i, "file_name": file_name, "height": img.shape[0], "width": img.shape[1]})
            for cat, p in objects:
                (x0, y0), (x1, y1) = p.min(0), p.max(0)
                x, y = p[:, 0], p[:, 1]
                area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))  # shoelace
                annotations.append({
                    "id": len(annotations) + 1,  # from 1: pycocotools treats id 0 as "unmatched"
                    "image_id": i,
                    "category_id": cat + 1,
                    "bbox": [_r2(x0), _r2(y0), _r2(x1 - x0), _r2(y1 - y0)],  # XYWH
                    "area": _r2(area),
                    "segmentation": [[_r2(v) for v in p.reshape(-1)]],
                    "iscrowd": 0,
                })
        ann_file = paths["coco_%s_json" % split]
        os.makedirs(os.path.dirname(ann_file), exist_ok=True)
        data = {"info": {"description": "regionssl tiny synthetic shapes", "version": _VERSION},
                "licenses": [], "images": images, "annotations": annotations, "categories": categories}
        with open(ann_file, "w") as f:
            json.dump(data, f)
    return {k: v for k, v in paths.items() if k.startswith("coco_")}


_VOC_XML = """<annotation>
  <folder>VOC2007</folder>
  <filename>{}.jpg</filename>
  <size><width>{}</width><height>{}</height><depth>3</depth></size>
  <segmented>0</segmented>
{}</annotation>
"""
_VOC_OBJECT = """  <object>
    <name>{}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>
    <bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox>
  </object>
"""


def build_tiny_voc(root):
    """Write a VOC2007-style folder ``root/VOC2007`` (JPEGImages, Annotations, ImageSets/Main).

    Boxes are written 1-based inclusive as VOC does: Detectron2 reads them back as the integer
    box ``[floor(x0), floor(y0), ceil(x1), ceil(y1)]`` enclosing the drawn polygon.

    Returns:
        dict: ``voc_dirname`` -> folder, ``voc_{trainval,test}`` -> image-set file.
    """
    dirname = tiny_paths(root)["voc_dirname"]
    out = {"voc_dirname": dirname}
    for split, num_images, seed_offset in _VOC_SPLITS:
        ids = []
        for i, img, objects in _split_samples(seed_offset, num_images):
            fileid = "{}_{:06d}".format(split, i)
            _write_jpeg(os.path.join(dirname, "JPEGImages", fileid + ".jpg"), img)
            objs = []
            for cat, p in objects:
                (x0, y0), (x1, y1) = p.min(0), p.max(0)
                box = (int(np.floor(x0)) + 1, int(np.floor(y0)) + 1, int(np.ceil(x1)), int(np.ceil(y1)))
                objs.append(_VOC_OBJECT.format(CATEGORIES[cat], *box))
            xml = _VOC_XML.format(fileid, img.shape[1], img.shape[0], "".join(objs))
            os.makedirs(os.path.join(dirname, "Annotations"), exist_ok=True)
            with open(os.path.join(dirname, "Annotations", fileid + ".xml"), "w") as f:
                f.write(xml)
            ids.append(fileid)
        set_file = out["voc_" + split] = os.path.join(dirname, "ImageSets", "Main", split + ".txt")
        os.makedirs(os.path.dirname(set_file), exist_ok=True)
        with open(set_file, "w") as f:
            f.write("\n".join(ids) + "\n")
    return out


def ensure_tiny_datasets(root=None, force=False):
    """Build both tiny sets under ``root`` unless a complete build of this version is there.

    Idempotent and safe under concurrency (``regionssl_workbench.atomic.build_once``: lock, temporary
    folder, rename; the ``VERSION`` stamp is written last).

    Returns:
        str: the root folder.
    """
    root = os.path.abspath(root or default_root())

    def build(folder):
        build_tiny_coco(folder)
        build_tiny_voc(folder)

    build_once(root, _VERSION, build, force=force)
    return root


# ----------------------------------------------------------------------------- registration
def _replace_loader(name, root):
    """Wrap the loader Detectron2 registered for ``name`` so that it builds the data first."""
    loader = DatasetCatalog.pop(name)

    def load():
        ensure_tiny_datasets(root)
        return loader()

    DatasetCatalog.register(name, load)


def register_tiny_datasets(root=None, force=False):
    """Register ``regionssl_tiny_coco_{train,val}`` and ``regionssl_tiny_voc_{trainval,test}``.

    Uses Detectron2's own ``register_coco_instances`` / ``register_pascal_voc``; builds nothing
    (the loaders build on first use). Names already registered are skipped, unless ``force``
    re-registers them (e.g. after changing ``$REGIONSSL_DATASETS``).
    """
    root = os.path.abspath(root or default_root())
    paths = tiny_paths(root)
    names = ["regionssl_tiny_coco_" + s for s, _, _ in _COCO_SPLITS]
    names += ["regionssl_tiny_voc_" + s for s, _, _ in _VOC_SPLITS]
    for name in names if force else ():
        DatasetCatalog.pop(name, None)
        MetadataCatalog.pop(name, None)
    # Category metadata is set now, not only when the json is first read: a COCOEvaluator built
    # before the loader ran must still map contiguous ids back to the json's category ids.
    meta = {"thing_classes": list(CATEGORIES),
            "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(len(CATEGORIES))}}
    for split, _, _ in _COCO_SPLITS:
        name = "regionssl_tiny_coco_" + split
        if name not in DatasetCatalog:
            register_coco_instances(name, dict(meta), paths["coco_%s_json" % split],
                                    paths["coco_%s_images" % split])
            _replace_loader(name, root)
    for split, _, _ in _VOC_SPLITS:
        name = "regionssl_tiny_voc_" + split
        if name not in DatasetCatalog:
            register_pascal_voc(name, paths["voc_dirname"], split, 2007, list(CATEGORIES))
            MetadataCatalog.get(name).evaluator_type = "pascal_voc"  # as detectron2's builtin.py
            _replace_loader(name, root)
    return root


def register_all(root=None):
    """Register the tiny sets and the demo photos (idempotent; nothing is built or read now)."""
    register_tiny_datasets(root)
    register_demo_images()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="output folder (default: {})".format(default_root()))
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    args = parser.parse_args(argv)

    root = ensure_tiny_datasets(args.root, force=args.force)
    print("tiny COCO (regionssl_tiny_coco_{train,val}):")
    for split in ("train", "val"):
        print("  {:5s} json   {}".format(split, os.path.join(root, "coco", "annotations", "instances_%s.json" % split)))
        print("  {:5s} images {}".format(split, os.path.join(root, "coco", split)))
    print("tiny VOC (regionssl_tiny_voc_{trainval,test}):")
    print("  dirname      {}".format(os.path.join(root, "VOC2007")))
    print("demo photos (regionssl_demo_images, read in place):")
    for path in demo_image_files():
        print("  " + path)
    return root


if __name__ == "__main__":
    main()
