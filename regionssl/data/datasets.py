"""Image-only datasets for pretraining, and safe image reading.

Registered names (files under ``$DETECTRON2_DATASETS``, Detectron2's convention, default
``./datasets``):

* ``coco_2017_train_images``      coco/train2017/*.jpg
* ``coco_2017_unlabeled_images``  coco/unlabeled2017/*.jpg
* ``imagenet_train_images``       imagenet/train/<class>/*.JPEG
* ``folder:<path>``               any folder of images (searched recursively), registered on use.

Each record is ``{"file_name", "image_id"}``: no ``"annotations"`` key, so these images can
never be dropped by ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` (our loader does not filter anyway).
"""
import io
import logging
import os
import warnings

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager
from PIL import Image

from .augmentations import DecodedImage

__all__ = [
    "IMAGE_EXTENSIONS",
    "list_image_files",
    "load_image_folder",
    "register_image_folder",
    "register_builtin_image_datasets",
    "ensure_registered",
    "read_rgb_or_none",
    "open_image_or_none",
    "image_file_from_bytes",
    "decode_or_none",
    "ImageFile",
    "UnreadableImageError",
    "SkippedFiles",
    "MIN_IMAGE_SIDE",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Images with a side shorter than this are skipped: no crop of them carries information.
MIN_IMAGE_SIDE = 8

_BUILTIN_FOLDERS = {
    "coco_2017_train_images": "coco/train2017",
    "coco_2017_unlabeled_images": "coco/unlabeled2017",
    "imagenet_train_images": "imagenet/train",
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


_EXIF_ORIENTATION = 0x0112
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _to_rgb(image):
    """Any PIL mode -> RGB. Grayscale, CMYK, palette and RGBA convert as in Detectron2's
    ``read_image`` (alpha dropped); 16-bit and float grayscale are scaled to 8 bits (PIL's own
    conversion would clip them to 255, i.e. a white image)."""
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        a = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if a.size and a.max() <= 1.0 else 255.0
        else:
            top = 65535.0 if image.mode.startswith("I;16") or (a.size and a.max() > 255) else 255.0
        return Image.fromarray(np.clip(a * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


class UnreadableImageError(Exception):
    """The file's header was readable but its pixel data is not (corrupt or truncated)."""

    def __init__(self, file_name, reason):
        super().__init__(f"{file_name}: {reason}")
        self.file_name, self.reason = file_name, reason


class SkippedFiles:
    """The unreadable files one process met (one data-loader worker has its own copy).

    Each file is warned about once per use (as the sample itself, or as a background drawn by a
    compositing view generator), however often the sampler returns to it (every epoch);
    :meth:`take_new` hands the names not yet handed out to the mapper's output, which carries
    them to the main process, where the trainer counts distinct files over all workers.

    Attributes:
        reasons (dict): file name -> why it was skipped, for every file skipped so far.
    """

    def __init__(self):
        self.reasons, self._warned, self._new = {}, set(), []

    def report(self, file_name, reason, use=""):
        """Record ``file_name`` as unusable; warn unless it was already reported for ``use``."""
        if (file_name, use) not in self._warned:
            self._warned.add((file_name, use))
            where = f" (drawn as {use})" if use else ""
            logger.warning(f"Skipping {file_name}{where}: {reason} (said once per file; the run counts skipped files)")
        if file_name not in self.reasons:
            self.reasons[file_name] = reason
            self._new.append(file_name)

    def take_new(self):
        """Names skipped since the previous call (list of str)."""
        new, self._new = self._new, []
        return new

    def __len__(self):
        return len(self.reasons)


def _skip(skipped, file_name, reason, use=""):
    """Warn about an unusable file: once per file and use through ``skipped``, or every time without it."""
    if skipped is None:
        logger.warning(f"Skipping {file_name}: {reason}")
    else:
        skipped.report(file_name, reason, use)


class ImageFile:
    """An image file whose header has been read; pixels are decoded on demand.

    Attributes:
        file_name: the path.
        height, width: size after EXIF orientation (what every coordinate refers to).
    """

    def __init__(self, file_name, data, size, orientation, fmt):
        self.file_name, self._data, self._orientation, self._format = file_name, data, orientation, fmt
        w, h = size
        self.height, self.width = (w, h) if orientation in (5, 6, 7, 8) else (h, w)

    def max_decode_reduction(self, reduction):
        """The decode reduction :meth:`decode` would use for a requested maximum ``reduction``:
        the largest of 1, 2, 4, 8 not above it for JPEGs without EXIF rotation, else 1."""
        if self._format != "JPEG" or self._orientation not in (None, 1):
            return 1
        return max(r for r in (1, 2, 4, 8) if r <= max(reduction, 1))

    def decode(self, reduction=1):
        """Decode to a :class:`DecodedImage` at ``1 / max_decode_reduction(reduction)`` scale.

        Raises :class:`UnreadableImageError` (naming the file) on corrupt or truncated data.
        """
        try:
            return self._decode(self.max_decode_reduction(reduction))
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
            raise UnreadableImageError(self.file_name, f"unreadable image, {type(e).__name__}: {e}") from e

    def _decode(self, r):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBomb/EXIF chatter
            image = Image.open(io.BytesIO(self._data))
            if r > 1:
                # PIL picks scale min(W // w_req, H // h_req) rounded down to 8/4/2/1: asking for
                # (W // r, H // r) gives exactly r. The returned box is the original in reduced pixels.
                _, box = image.draft("RGB", (self.width // r, self.height // r))
                assert abs(box[2] * r - self.width) < 1e-6 and abs(box[3] * r - self.height) < 1e-6, (box, r)
            image.load()
            if r == 1:
                image = utils._apply_exif_orientation(image)
            image = _to_rgb(image)
        return DecodedImage(image, r, self.height, self.width)


def image_file_from_bytes(file_name, data):
    """An :class:`ImageFile` from encoded bytes (``file_name`` only names it in messages).
    Raises PIL's error if the header is not an image's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = Image.open(io.BytesIO(data))
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION)
        except Exception:  # noqa: BLE001 - broken EXIF: ignore it, as Detectron2 does
            orientation = None
        return ImageFile(file_name, data, image.size, orientation, image.format)


def open_image_or_none(file_name, skipped=None, use=""):
    """Read ``file_name``'s bytes and header; an :class:`ImageFile`, or None with a warning naming
    the file if it is not an image or is smaller than ``MIN_IMAGE_SIDE`` (after EXIF rotation).
    With a :class:`SkippedFiles` ``skipped``, the warning comes once per file and ``use`` and the
    file is counted."""
    try:
        with PathManager.open(file_name, "rb") as f:
            item = image_file_from_bytes(file_name, f.read())
    except Exception as e:  # noqa: BLE001 - any reader error means "skip this file"
        _skip(skipped, file_name, f"unreadable image, {type(e).__name__}: {e}", use)
        return None
    if min(item.height, item.width) < MIN_IMAGE_SIDE:
        _skip(skipped, file_name, f"image size {item.width}x{item.height} is below {MIN_IMAGE_SIDE} px", use)
        return None
    return item


def decode_or_none(image_file, reduction=1, skipped=None, use=""):
    """:meth:`ImageFile.decode`, or None with a warning naming the file (corrupt/truncated data)."""
    try:
        return image_file.decode(reduction)
    except UnreadableImageError as e:
        _skip(skipped, e.file_name, e.reason, use)
        return None


def read_rgb_or_none(file_name, skipped=None, use=""):
    """Decode ``file_name`` to (H, W, 3) uint8 RGB, honouring EXIF orientation.

    Grayscale, CMYK, palette and RGBA images are converted to RGB (Detectron2's ``read_image``),
    16-bit grayscale scaled to 8 bits. A file that cannot be decoded (corrupt, truncated, not an
    image) or is smaller than ``MIN_IMAGE_SIDE`` gives a warning naming the file (once per file
    with a :class:`SkippedFiles`) and returns None, so the loader skips it.
    """
    item = open_image_or_none(file_name, skipped, use)
    decoded = decode_or_none(item, skipped=skipped, use=use) if item is not None else None
    return None if decoded is None else decoded.array()
