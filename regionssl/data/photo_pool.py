"""The photo pool: real photos and video frames that pip-downloadable packages ship.

Built once by ``python tools/build_photo_pool.py`` into ``$DETECTRON2_DATASETS/regionssl_photos``
(default ``./datasets/regionssl_photos``), described by its ``manifest.json``, and registered here as
three image-only datasets whose splits are fixed by *group* (a video clip or a stereo pair is one
group, so no clip has frames in two splits):

* ``regionssl_photos_train``    the pretraining pool;
* ``regionssl_photos_heldout``  the retrieval-probe split that no recipe is tuned on;
* ``regionssl_photos_detval``   backgrounds reserved for the validation split of a detection set,
  never in any pretraining split.

Records are ``{"file_name", "image_id", "height", "width"}``, read from the manifest when the
dataset is fetched (never at import or registration time).
"""
import json
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["SPLITS", "MANIFEST", "BUILD_COMMAND", "default_pool_root", "load_photo_pool", "register_photo_pool"]

SPLITS = ("train", "heldout", "detval")
MANIFEST = "manifest.json"
BUILD_COMMAND = "python tools/build_photo_pool.py"


def default_pool_root():
    """``$DETECTRON2_DATASETS/regionssl_photos`` (Detectron2's convention; default ``./datasets``)."""
    return os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "regionssl_photos")


def load_photo_pool(split, root=None):
    """Image-only dataset dicts of one split of the built pool under ``root``.

    Raises:
        FileNotFoundError: the pool (its manifest, or a file it lists) is missing; the message
            names the command that builds it.
    """
    root = os.path.abspath(root or default_pool_root())
    manifest = os.path.join(root, MANIFEST)
    hint = f"build it with `{BUILD_COMMAND}`"
    if root != os.path.abspath(default_pool_root()):
        hint += f" --root {root}"
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"The photo pool is not built ({manifest} is missing): {hint}.")
    with open(manifest) as f:
        images = [im for im in json.load(f)["images"] if im["split"] == split]
    if not images:
        raise FileNotFoundError(f"The photo pool at {root} has no '{split}' images: {hint}.")
    dicts = []
    for im in images:
        path = os.path.join(root, im["file"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"The photo pool at {root} is incomplete ({path} is missing): {hint}.")
        dicts.append({"file_name": path, "image_id": im["image_id"], "height": im["height"], "width": im["width"],
                      "group": im["group"]})
    return dicts


def register_photo_pool(root=None):
    """Register ``regionssl_photos_{train,heldout,detval}`` (lazy: nothing is read now).

    ``root=None`` resolves :func:`default_pool_root` when a dataset is fetched.
    """
    for split in SPLITS:
        name = "regionssl_photos_" + split
        if name not in DatasetCatalog:
            DatasetCatalog.register(name, lambda split=split: load_photo_pool(split, root))
            MetadataCatalog.get(name).set(evaluator_type="none")
