"""Image-only datasets for pretraining (reading the files: ``image_io.py``).

Registered names (files under ``$DETECTRON2_DATASETS``, Detectron2's convention, default
``./datasets``):

* ``coco_2017_train_images``      coco/train2017/*.jpg
* ``coco_2017_unlabeled_images``  coco/unlabeled2017/*.jpg
* ``imagenet_train_images``       imagenet/train/<class>/*.JPEG
* ``regionssl_minidet_train_images``  regionssl_minidet/train/*.jpg: the transfer benchmark's training
  images without their labels (``tools/build_detection_set.py``), for in-domain pretraining
* ``folder:<path>``               any folder of images (searched recursively), registered on use;
* ``filelist:<path>``             the image paths in a text file, one per line, registered on use.

Folder listings are cached (``listing.py``): one process lists, the others and later runs read the
list while no directory of the folder has changed.

Each record is ``{"file_name", "image_id"}``: no ``"annotations"`` key, so these images can
never be dropped by ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` (our loader does not filter anyway).
"""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from .listing import cached_listing, read_file_list

__all__ = [
    "IMAGE_EXTENSIONS",
    "list_image_files",
    "load_image_folder",
    "register_image_folder",
    "register_file_list",
    "load_file_list",
    "register_builtin_image_datasets",
    "ensure_registered",
    "RecordField",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

_BUILTIN_FOLDERS = {
    "coco_2017_train_images": "coco/train2017",
    "coco_2017_unlabeled_images": "coco/unlabeled2017",
    "imagenet_train_images": "imagenet/train",
    "regionssl_minidet_train_images": "regionssl_minidet/train",
}


def list_image_files(root, directories=None):
    """Sorted image paths under ``root`` (recursive; symlinked directories are not entered, so a
    link to a parent cannot list the tree again). Raises if ``root`` is missing or has none.
    ``directories``: a list to which every directory read is appended (the listing cache's validity)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Image folder {root!r} does not exist (or is not a directory).")
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        if directories is not None:
            directories.append(dirpath)
        dirnames.sort()
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"Image folder {root!r} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)}).")
    return files


def load_image_folder(root):
    """Image-only dataset dicts for every image under ``root`` (listing cached: ``listing.py``)."""
    return _records(cached_listing(root, list_image_files))


def load_file_list(list_file):
    """Image-only dataset dicts for the paths in the text file ``list_file`` (``listing.read_file_list``)."""
    return _records(read_file_list(list_file))


def _records(files):
    return [{"file_name": f, "image_id": i} for i, f in enumerate(files)]


def register_image_folder(name, root):
    """Register ``root`` as an image-only dataset called ``name`` (lazy: nothing is read now)."""
    DatasetCatalog.register(name, lambda: load_image_folder(root))
    MetadataCatalog.get(name).set(image_root=root, evaluator_type="none")


def register_file_list(name, list_file):
    """Register the image paths of the text file ``list_file`` as ``name`` (lazy)."""
    DatasetCatalog.register(name, lambda: load_file_list(list_file))
    MetadataCatalog.get(name).set(list_file=list_file, evaluator_type="none")


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
        elif name.startswith("filelist:"):
            register_file_list(name, os.path.expanduser(name[len("filelist:"):]))
        else:
            raise KeyError(
                f"Dataset {name!r} is not registered. Use a registered name, 'folder:/path/to/images' "
                f"for any folder of images, or 'filelist:/path/to/list.txt' for a text file of image paths. Registered: {', '.join(sorted(DatasetCatalog.list()))}"
            )


class RecordField:
    """The sequence of ``records[i][key]`` without copying it out (``records``: dataset dicts, e.g.
    the loader's serialised ``DatasetFromList``, whose one byte tensor loader workers share)."""

    def __init__(self, records, key):
        self.records, self.key = records, key

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i][self.key]
