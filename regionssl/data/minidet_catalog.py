"""The registered real-object detection set ``regionssl_minidet_{train,val}`` (built by
``python tools/build_detection_set.py``, see ``regionssl_workbench/minidet.py``): its classes, where
its files live, and its registration with Detectron2 (nothing is read until a split is fetched)."""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = ["CLASSES", "SPLITS", "default_root", "minidet_paths", "register_minidet"]

SPLITS = ("train", "val")
CLASSES = ("mammal", "bird", "flower", "produce")  # COCO category ids 1..4


def default_root():
    """``$DETECTRON2_DATASETS/regionssl_minidet`` (Detectron2's convention, default ``./datasets``)."""
    return os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "regionssl_minidet")


def minidet_paths(root=None):
    """Where each part of the set lives under ``root``: ``{split}_json``, ``{split}_images``, ``manifest``."""
    root = os.path.abspath(root or default_root())
    out = {"manifest": os.path.join(root, "manifest.json")}
    for split in SPLITS:
        out[split + "_json"] = os.path.join(root, "annotations", "instances_%s.json" % split)
        out[split + "_images"] = os.path.join(root, split)
    return out


def _require_built(name, json_file, loader):
    def load():
        if not os.path.isfile(json_file):
            raise FileNotFoundError(
                f"Dataset {name!r}: {json_file} does not exist. Build it once with "
                "`python tools/build_detection_set.py` (needs the photo pool and tuxpaint-stamps-default).")
        return loader()

    return load


def register_minidet(root=None, force=False):
    """Register ``regionssl_minidet_{train,val}`` with Detectron2's ``register_coco_instances``.

    Nothing is read or built now; loading an unbuilt split stops with one message naming the
    build command. ``force`` re-registers (e.g. after changing the root).
    """
    root = os.path.abspath(root or default_root())
    paths = minidet_paths(root)
    meta = {"thing_classes": list(CLASSES),
            "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(len(CLASSES))}}
    for split in SPLITS:
        name = "regionssl_minidet_" + split
        if force:
            DatasetCatalog.pop(name, None)
            MetadataCatalog.pop(name, None)
        if name in DatasetCatalog:
            continue
        register_coco_instances(name, dict(meta), paths[split + "_json"], paths[split + "_images"])
        DatasetCatalog.register(name, _require_built(name, paths[split + "_json"], DatasetCatalog.pop(name)))
    return root
