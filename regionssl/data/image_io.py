"""Image I/O of the pretraining data path: everything that touches encoded image files.

One sample's pixels come from here and nowhere else (docs/design.md, "Mapper"):

1. :func:`open_image_or_none` reads a file's bytes and header: an :class:`ImageFile` with the
   size after EXIF orientation, or None with a warning naming the file (not a regular file, e.g. a
   named pipe or a device; not an image; too small; more pixels than :data:`MAX_IMAGE_PIXELS`, the
   one budget every decoder below obeys);
2. :meth:`ImageFile.decode` decodes at ``1 / r`` scale (JPEG DCT scaling, r in 1, 2, 4, 8), honouring
   EXIF orientation and converting any mode to RGB: a :class:`DecodedImage`, or
   :class:`UnreadableImageError` (corrupt or truncated data). Pixels wanted as an array (OpenCV or
   torch resampling, :func:`reads_array`) come from libjpeg-turbo straight into an array for plain
   JPEGs (simplejpeg, or OpenCV without it), the rest from PIL;
3. :meth:`DecodedImage.resized_crop` resamples a rectangle given in *original* pixels to a view:
   a rectangle of whole decoded pixels is cropped and resized (OpenCV bilinear as mmcv, or torch's
   antialiased bilinear/bicubic, PIL's filters, as torchvision's crop + resize), a fractional one
   (JPEG decoded at 1/r) is resampled from its exact source box (OpenCV affine warp, PIL box resize).

:class:`BackgroundSource` gives compositing view generators (CopyPaste, SaliencySwap) random other
images of the dataset through the same steps; :class:`SkippedFiles` counts what could not be read.
"""
import io
import logging
import os
import random
import stat
import warnings

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager
from PIL import Image

from .augmentations import CV2_BILINEAR
from .jpeg_header import read_jpeg_header

try:  # libjpeg-turbo without OpenCV's wrapper: the same pixels, 15-20% faster (docs/performance.md)
    import simplejpeg
except ImportError:  # pragma: no cover - a requirement; OpenCV decodes the same pixels without it
    simplejpeg = None

__all__ = [
    "MIN_IMAGE_SIDE",
    "MAX_IMAGE_PIXELS",
    "NotARegularFile",
    "file_kind",
    "ImageFile",
    "DecodedImage",
    "UnreadableImageError",
    "SkippedFiles",
    "image_file_from_bytes",
    "open_image_or_none",
    "decode_or_none",
    "read_rgb_or_none",
    "BackgroundSource",
    "ArrayBackgrounds",
    "as_background_source",
    "reads_array",
]

logger = logging.getLogger(__name__)

# Images with a side shorter than this are skipped: no crop of them carries information.
MIN_IMAGE_SIDE = 8
# Images with more pixels are skipped, whichever decoder would read them (PIL refuses them with its
# DecompressionBombError; libjpeg through simplejpeg/OpenCV has no such limit): 2 x PIL's
# MAX_IMAGE_PIXELS, about 179 million (e.g. 13400 x 13400), 537 MB as RGB.
MAX_IMAGE_PIXELS = 178956970

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

    def __init__(self, file_name, data, size, orientation, fmt, mode=None):
        self.file_name, self._data, self._orientation, self._format = file_name, data, orientation, fmt
        self._mode = mode
        w, h = size
        self.height, self.width = (w, h) if orientation in (5, 6, 7, 8) else (h, w)

    def max_decode_reduction(self, reduction):
        """The decode reduction :meth:`decode` would use for a requested maximum ``reduction``:
        the largest of 1, 2, 4, 8 not above it for JPEGs without EXIF rotation, else 1."""
        if self._format != "JPEG" or self._orientation not in (None, 1):
            return 1
        return max(r for r in (1, 2, 4, 8) if r <= max(reduction, 1))

    def decode(self, reduction=1, array=False):
        """Decode to a :class:`DecodedImage` at ``1 / max_decode_reduction(reduction)`` scale.

        ``array=True``: the pixels will be read as an array (OpenCV resampling, :meth:`DecodedImage.array`).
        A plain JPEG (YCbCr, no EXIF rotation, complete) is then decoded by libjpeg-turbo straight
        into one (simplejpeg, else OpenCV: the same library, the same pixels), without PIL's copy
        out of its image memory (2 ms of a 1280x960 photo).

        Raises :class:`UnreadableImageError` (naming the file) on corrupt or truncated data.
        """
        r = self.max_decode_reduction(reduction)
        try:
            if array and self._plain_jpeg():
                return self._decode_array(r)
            return self._decode(r)
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
            raise UnreadableImageError(self.file_name, f"unreadable image, {type(e).__name__}: {e}") from e

    def _plain_jpeg(self):
        # a missing end-of-image marker (truncated file) goes through PIL, which reports it
        return (self._format == "JPEG" and self._mode == "RGB" and self._orientation in (None, 1)
                and self._data.endswith(b"\xff\xd9"))

    def _decode_array(self, r):
        if simplejpeg is not None:
            # the smallest libjpeg scale whose output covers ceil(side / r) pixels is exactly 1/r
            pixels = simplejpeg.decode_jpeg(self._data, "RGB", min_height=-(-self.height // r),
                                            min_width=-(-self.width // r), strict=True)
            return DecodedImage(pixels, r, self.height, self.width)
        reduced = {1: 0, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}[r]
        flags = (reduced & ~cv2.IMREAD_COLOR) | cv2.IMREAD_IGNORE_ORIENTATION
        rgb = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.10
        pixels = cv2.imdecode(np.frombuffer(self._data, np.uint8), flags | (cv2.IMREAD_COLOR if rgb is None else rgb))
        if pixels is None:
            raise ValueError("OpenCV could not decode the JPEG data")
        if rgb is None:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
        return DecodedImage(pixels, r, self.height, self.width)

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
    Raises PIL's error if the header is not an image's. A JPEG's header is read from its markers
    (:func:`read_jpeg_header`, 15x faster than PIL); PIL reads any other file, or a JPEG header the
    marker walk is not sure of."""
    header = read_jpeg_header(data)
    if header is not None:
        return ImageFile(file_name, data, (header.width, header.height), header.orientation, "JPEG", header.mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = Image.open(io.BytesIO(data))
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION)
        except Exception:  # noqa: BLE001 - broken EXIF: ignore it, as Detectron2 does
            orientation = None
        return ImageFile(file_name, data, image.size, orientation, image.format, image.mode)


class NotARegularFile(OSError):
    """A local path that is a named pipe, a device, a socket or a directory: reading it would hang
    (a pipe) or never end (the zero device)."""


def file_kind(mode):
    """What an ``st_mode`` that is not a regular file is, in words."""
    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def _read_bytes(file_name):
    # a local file directly (iopath's handler lookup is a third of the cost of reading a header);
    # anything else (URLs, manifold://, ...) through Detectron2's PathManager, as read_image does
    try:
        mode = os.stat(file_name).st_mode
    except OSError:
        mode = None
    if mode is not None:
        if not stat.S_ISREG(mode):
            raise NotARegularFile(f"{file_kind(mode)}, not a regular file")
        with open(file_name, "rb") as f:
            return f.read()
    with PathManager.open(file_name, "rb") as f:
        return f.read()


def open_image_or_none(file_name, skipped=None, use=""):
    """Read ``file_name``'s bytes and header; an :class:`ImageFile`, or None with a warning naming
    the file if it is not an image or is smaller than ``MIN_IMAGE_SIDE`` (after EXIF rotation).
    With a :class:`SkippedFiles` ``skipped``, the warning comes once per file and ``use`` and the
    file is counted."""
    try:
        item = image_file_from_bytes(file_name, _read_bytes(file_name))
    except NotARegularFile as e:
        _skip(skipped, file_name, str(e), use)
        return None
    except Exception as e:  # noqa: BLE001 - any reader error means "skip this file"
        _skip(skipped, file_name, f"unreadable image, {type(e).__name__}: {e}", use)
        return None
    if min(item.height, item.width) < MIN_IMAGE_SIDE:
        _skip(skipped, file_name, f"image size {item.width}x{item.height} is below {MIN_IMAGE_SIDE} px", use)
        return None
    if item.height * item.width > MAX_IMAGE_PIXELS:
        _skip(skipped, file_name, f"image size {item.width}x{item.height} = {item.width * item.height} pixels is above "
                                  f"the budget of {MAX_IMAGE_PIXELS} (image_io.MAX_IMAGE_PIXELS)", use)
        return None
    return item


def decode_or_none(image_file, reduction=1, skipped=None, use="", array=False):
    """:meth:`ImageFile.decode`, or None with a warning naming the file (corrupt/truncated data)."""
    try:
        return image_file.decode(reduction, array)
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
    decoded = decode_or_none(item, skipped=skipped, use=use, array=True) if item is not None else None
    return None if decoded is None else decoded.array()


# PIL filters torch reproduces on uint8 arrays: antialiased when shrinking, within 2 grey levels of
# PIL's crop + resize (torchvision's RandomResizedCrop on PIL images), 4-5x faster.
_TORCH_FILTERS = {Image.BILINEAR: "bilinear", Image.BICUBIC: "bicubic"}


def reads_array(interp, reduction):
    """Whether :meth:`DecodedImage.resized_crop` with ``interp`` reads the pixels of a decode at
    ``1 / reduction`` as an array (so the decode should make one, ``ImageFile.decode(array=True)``):
    always for OpenCV bilinear; for PIL's bilinear and bicubic when the crops are whole decoded
    pixels (reduction 1: crops are integer boxes), which torch resamples; else PIL resamples."""
    return interp == CV2_BILINEAR or (interp in _TORCH_FILTERS and reduction == 1)


def _torch_resize(pixels, out_w, out_h, mode):
    """(h, w, 3) uint8 -> (out_h, out_w, 3) uint8 with torch's antialiased ``mode`` resize (PIL's filter)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a read-only array (from PIL): torch only reads it
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    # channels-last in and out: torch's vectorised uint8 path, and the result is the (H, W, 3) array
    x = x.contiguous(memory_format=torch.channels_last)
    y = F.interpolate(x, size=(out_h, out_w), mode=mode, antialias=True, align_corners=False)
    return y.contiguous(memory_format=torch.channels_last)[0].permute(1, 2, 0).numpy()


class DecodedImage:
    """Pixels of an (height, width) image, decoded at ``1 / reduction`` of its size.

    A JPEG decoded with libjpeg's DCT scaling (PIL ``draft``) at 1/r covers the original exactly:
    reduced pixel i spans original pixels [r i, r (i + 1)) (PIL's own ``draft`` returns the box
    (0, 0, w / r, h / r)), so original coordinates map by ``x / r``. Crops are resampled from the
    reduced pixels with fractional source boxes, which keeps every view's geometry exactly what its
    (original-coordinate) transform says.

    Args:
        image: PIL RGB image or (H, W, 3) uint8 array of size (ceil(width / r), ceil(height / r)).
        height, width: the original size (default: the image's times r).
    """

    def __init__(self, image, reduction=1, height=None, width=None):
        if isinstance(image, np.ndarray):
            assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8, (image.dtype, image.shape)
            self._array, self._pil = image, None
            h, w = image.shape[:2]
        else:
            self._array, self._pil = None, image
            w, h = image.size
        self.height = height if height is not None else h * reduction
        self.width = width if width is not None else w * reduction
        self.reduction = reduction

    @property
    def pil(self):
        if self._pil is None:
            self._pil = Image.fromarray(self._array)
        return self._pil

    def array(self):
        """(H / r, W / r, 3) uint8 (read-only when it comes from PIL)."""
        if self._array is None:
            self._array = np.asarray(self._pil)
        return self._array

    def resized_crop(self, box, out_w, out_h, interp=Image.BILINEAR):
        """(out_h, out_w, 3) uint8: original-pixel rectangle ``box = (x0, y0, w, h)`` resampled with
        ``interp`` (a PIL filter or ``CV2_BILINEAR``); see the module docstring for the routes."""
        r = self.reduction
        x0, y0, w, h = box
        if all(float(v / r).is_integer() for v in box):  # whole decoded pixels (any box at r = 1)
            x, y, cw, ch = (int(v // r) for v in box)
            crop = self.array()[y : y + ch, x : x + cw]
            if interp == CV2_BILINEAR:  # crop + resize, as mmcv: 3x faster than warpAffine
                return cv2.resize(crop, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
            if interp in _TORCH_FILTERS:
                return _torch_resize(crop, out_w, out_h, _TORCH_FILTERS[interp])
        if interp == CV2_BILINEAR:
            # fractional source box: the affine map of output pixel centres onto input pixel centres
            sx, sy = w / r / out_w, h / r / out_h
            m = np.array([[sx, 0, x0 / r + 0.5 * sx - 0.5], [0, sy, y0 / r + 0.5 * sy - 0.5]])
            flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
            return cv2.warpAffine(self.array(), m, (out_w, out_h), flags=flags, borderMode=cv2.BORDER_REPLICATE)
        src = (x0 / r, y0 / r, (x0 + w) / r, (y0 + h) / r)
        return np.asarray(self.pil.resize((out_w, out_h), interp, box=src))


class BackgroundSource:
    """Random images of the dataset, used as backgrounds by compositing view generators.

    The interface those generators call: :meth:`sample` (an image and its file name) and
    :meth:`resized` (an image resampled to a canvas). :class:`ArrayBackgrounds` gives the same
    interface over a function that returns arrays.
    """

    def __init__(self, file_names, max_tries=10, skipped=None):
        """``file_names``: a sequence (``len`` and indexing; kept, not copied: a ``RecordField`` over the
        loader's serialised records costs the workers nothing) or any iterable of paths."""
        if not hasattr(file_names, "__getitem__"):
            file_names = list(file_names)
        if not len(file_names):
            raise ValueError("BackgroundSource needs at least one image")
        self.file_names, self.max_tries = file_names, max_tries
        self.skipped = skipped  # SkippedFiles shared with the mapper: unreadable backgrounds count too

    def __call__(self):
        return self.sample()[0]

    def sample(self):
        """(image, file_name) of a random readable image (SaliencySwap needs the name for mask files)."""
        for _ in range(self.max_tries):
            file_name = random.choice(self.file_names)
            image = read_rgb_or_none(file_name, self.skipped, "a background")
            if image is not None:
                return image, file_name
        raise RuntimeError(f"No readable background image after {self.max_tries} tries")

    def resized(self, out_h, out_w, interp):
        """A random readable image resized to (out_h, out_w, 3) uint8 (aspect not kept, as InsLoc's
        ``mmcv.imresize``).

        A JPEG is always decoded at its pasted size: at the coarsest DCT scale 1/r whose pixels
        still outnumber the output's on both axes (whatever ``JPEG_DRAFT`` says, which governs the
        sample's own image). The whole image is shrunk anyway, so the DCT scaling only acts as an
        area pre-filter before the resize: on 1280x960 photos the canvas differs from full decode +
        resize by 0.6-2.5 grey levels on average, same mean, slightly less aliasing
        (tests/data/test_fast_paths.py), for a third of the decode.
        """
        for _ in range(self.max_tries):
            item = open_image_or_none(random.choice(self.file_names), self.skipped, "a background")
            if item is None:
                continue
            reduction = min(item.width / out_w, item.height / out_h)
            array = reads_array(interp, item.max_decode_reduction(reduction))
            decoded = decode_or_none(item, reduction, self.skipped, "a background", array=array)
            if decoded is not None:
                return decoded.resized_crop((0, 0, item.width, item.height), out_w, out_h, interp)
        raise RuntimeError(f"No readable background image after {self.max_tries} tries")


class ArrayBackgrounds(BackgroundSource):
    """:class:`BackgroundSource` over ``fn() -> (H, W, 3) uint8`` (fixed or generated backgrounds)."""

    def __init__(self, fn):
        self.fn = fn

    def sample(self):
        return self.fn(), None

    def resized(self, out_h, out_w, interp):
        image = np.asarray(self.fn())
        return DecodedImage(image).resized_crop((0, 0, image.shape[1], image.shape[0]), out_w, out_h, interp)


def as_background_source(source):
    """``source`` as a :class:`BackgroundSource`: itself, a callable returning arrays wrapped in
    :class:`ArrayBackgrounds`, or None."""
    if source is None or isinstance(source, BackgroundSource):
        return source
    if callable(source):
        return ArrayBackgrounds(source)
    raise TypeError(f"A background source is a BackgroundSource or a callable returning images, not {type(source)}")
