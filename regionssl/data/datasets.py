"""Image-only datasets for pretraining (reading the files: ``image_io.py``).

Registered names (files under ``$DETECTRON2_DATASETS``, Detectron2's convention, default
``./datasets``):

* ``coco_2017_train_images``      coco/train2017/*.jpg
* ``coco_2017_unlabeled_images``  coco/unlabeled2017/*.jpg
* ``imagenet_train_images``       imagenet/train/<class>/*.JPEG
* ``regionssl_minidet_train_images``  regionssl_minidet/train/*.jpg: the transfer benchmark's training
  images without their labels (``tools/build_detection_set.py``), for in-domain pretraining
* ``folder:<path>``               any folder of images (searched recursively), registered on use;
* ``folder+links:<path>``         the same, entering symlinked directories too (each real directory once).
* ``filelist:<path>``             the image paths in a text file, one per line, registered on use.

Folder listings are cached (``listing.py``): one process lists, the others and later runs read the
list while no directory of the folder has changed (``folder+links:`` listings are not cached).

Each record is ``{"file_name", "image_id"}``: no ``"annotations"`` key, so these images can
never be dropped by ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` (our loader does not filter anyway).
"""
import logging
import os
import stat

from detectron2.data import DatasetCatalog, MetadataCatalog

from .image_io import file_kind
from .listing import cached_listing, read_file_list

logger = logging.getLogger(__name__)

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


def _is_regular(path):
    """True for a regular file (or a link to one); else False with a warning naming it (a named pipe
    would hang the loader, a link to the zero device would be read without end)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        logger.warning(f"Skipping {path}: {e.strerror or e} (a broken link?)")
        return False
    if not stat.S_ISREG(mode):
        logger.warning(f"Skipping {path}: {file_kind(mode)}, not a regular file")
        return False
    return True


def _is_dir(entry):
    try:
        return entry.is_dir()
    except OSError:
        return False


def list_image_files(root, directories=None, follow_symlinks=False):
    """Sorted image paths under ``root`` (recursive). Raises if ``root`` is missing or has none.

    Only regular files (or links to them) are listed; named pipes, devices, sockets and broken
    links are skipped with a warning naming each. Symlinked directories are not entered (a link to
    a parent cannot list the tree again) unless ``follow_symlinks``, and then every real directory
    once: a link loop (or two links to one folder) lists nothing twice, and a warning names the link.
    ``directories``: a list to which every directory read is appended (the listing cache's validity).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Image folder {root!r} does not exist (or is not a directory).")
    files, seen = [], set()
    pending = [root]  # depth first, each folder's files before its subfolders', names sorted (os.walk's order)
    while pending:
        dirpath = pending.pop()
        if follow_symlinks:
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:
                logger.warning(f"Not listing {dirpath} again: it is {os.path.realpath(dirpath)}, already listed "
                               "(a symlink loop or a second link to one folder)")
                continue
            seen.add((st.st_dev, st.st_ino))
        try:
            with os.scandir(dirpath) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            logger.warning(f"Skipping folder {dirpath}: {e.strerror or e}")
            continue
        if directories is not None:
            directories.append(dirpath)
        subdirs = []
        for entry in entries:
            if _is_dir(entry):
                if follow_symlinks or not entry.is_symlink():
                    subdirs.append(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and (
                entry.is_file(follow_symlinks=False) or _is_regular(entry.path)  # the directory entry's type
            ):  # answers without a stat for a plain file; links and special files are checked by _is_regular
                files.append(entry.path)
        pending.extend(reversed(subdirs))
    if not files:
        raise ValueError(f"Image folder {root!r} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)}).")
    return files


def load_image_folder(root, follow_symlinks=False):
    """Image-only dataset dicts for every image under ``root`` (listing cached, ``listing.py``, unless
    symlinked directories are followed)."""
    if follow_symlinks:
        return _records(list_image_files(root, follow_symlinks=True))
    return _records(cached_listing(root, list_image_files))


def load_file_list(list_file):
    """Image-only dataset dicts for the paths in the text file ``list_file`` (``listing.read_file_list``)."""
    return _records(read_file_list(list_file))


def _records(files):
    return [{"file_name": f, "image_id": i} for i, f in enumerate(files)]


def register_image_folder(name, root, follow_symlinks=False):
    """Register ``root`` as an image-only dataset called ``name`` (lazy: nothing is read now)."""
    DatasetCatalog.register(name, lambda: load_image_folder(root, follow_symlinks))
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
        elif name.startswith("folder+links:"):
            register_image_folder(name, os.path.expanduser(name[len("folder+links:"):]), follow_symlinks=True)
        elif name.startswith("filelist:"):
            register_file_list(name, os.path.expanduser(name[len("filelist:"):]))
        else:
            raise KeyError(
                f"Dataset {name!r} is not registered. Use a registered name, 'folder:/path/to/images' "
                "for any folder of images ('folder+links:/path' to enter symlinked directories too), or "
                f"'filelist:/path/to/list.txt' for a text file of image paths. Registered: "
                f"{', '.join(sorted(DatasetCatalog.list()))}"
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
