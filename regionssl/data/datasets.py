"""Image-only datasets for pretraining (reading the files: ``image_io.py``).

Registered names (files under ``$DETECTRON2_DATASETS``, Detectron2's convention, default
``./datasets``):

* ``coco_2017_train_images``      coco/train2017/*.jpg
* ``coco_2017_unlabeled_images``  coco/unlabeled2017/*.jpg
* ``imagenet_train_images``       imagenet/train/<class>/*.JPEG
* ``regionssl_minidet_train_images``  regionssl_minidet/train/*.jpg: the transfer benchmark's training
  images without their labels (``tools/build_detection_set.py``), for in-domain pretraining
* ``folder:<path>``               any folder of images (searched recursively), registered on use.

Each record is ``{"file_name", "image_id"}``: no ``"annotations"`` key, so these images can
never be dropped by ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` (our loader does not filter anyway).
"""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = [
    "IMAGE_EXTENSIONS",
    "list_image_files",
    "load_image_folder",
    "register_image_folder",
    "register_builtin_image_datasets",
    "ensure_registered",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

_BUILTIN_FOLDERS = {
    "coco_2017_train_images": "coco/train2017",
    "coco_2017_unlabeled_images": "coco/unlabeled2017",
    "imagenet_train_images": "imagenet/train",
    "regionssl_minidet_train_images": "regionssl_minidet/train",
}


def list_image_files(root):
    """Sorted image paths under ``root`` (recursive). Raises if ``root`` is missing or has none."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Image folder {root!r} does not exist (or is not a directory).")
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"Image folder {root!r} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)}).")
    return files


def load_image_folder(root):
    """Image-only dataset dicts for every image under ``root``."""
    return [{"file_name": f, "image_id": i} for i, f in enumerate(list_image_files(root))]


def register_image_folder(name, root):
    """Register ``root`` as an image-only dataset called ``name`` (lazy: nothing is read now)."""
    DatasetCatalog.register(name, lambda: load_image_folder(root))
    MetadataCatalog.get(name).set(image_root=root, evaluator_type="none")


def register_builtin_image_datasets(datasets_root=None):
    root = datasets_root or os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    for name, rel in _BUILTIN_FOLDERS.items():
        if name not in DatasetCatalog:
            register_image_folder(name, os.path.join(root, rel))


def ensure_registered(names):
    """Register every ``folder:<path>`` name on the fly; fail clearly on unknown names."""
    for name in names:
        if name in DatasetCatalog:
            continue
        if name.startswith("folder:"):
            register_image_folder(name, os.path.expanduser(name[len("folder:"):]))
        else:
            raise KeyError(
                f"Dataset {name!r} is not registered. Use a registered name, or 'folder:/path/to/images' "
                f"for any folder of images. Registered: {', '.join(sorted(DatasetCatalog.list()))}"
            )
