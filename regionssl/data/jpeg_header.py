"""What the loader needs from a JPEG's header, read from its markers without an image library.

PIL's ``Image.open`` + ``getexif`` costs ~0.3 ms per file; a sample of InsLoc reads three files, so
PIL's header alone would be a sixth of the sample (docs/performance.md, "Mapper throughput"). Walking the
markers up to the start of scan takes ~0.02 ms. Anything this walk is not sure about (no SOF before
the scan, a malformed segment, an EXIF block it cannot parse) returns None and the caller asks PIL,
so an unusual file costs time, never a wrong size or orientation.
"""
from typing import NamedTuple, Optional

__all__ = ["JpegHeader", "read_jpeg_header"]

_SOI = b"\xff\xd8"
# start-of-frame markers carry the size: C0-CF except DHT (C4), JPG (C8) and DAC (CC)
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SOS, _EOI, _APP1 = 0xDA, 0xD9, 0xE1
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn, TEM: no length field
_ORIENTATION_TAG = 0x0112
_MODES = {1: "L", 3: "RGB", 4: "CMYK"}  # PIL's mode of a JPEG with that many components


class JpegHeader(NamedTuple):
    width: int
    height: int
    mode: str  # PIL's mode: "L", "RGB" (YCbCr or Adobe RGB) or "CMYK"
    orientation: Optional[int]  # EXIF orientation (1-8), None without EXIF or without the tag


def _exif_orientation(tiff: bytes):
    """Orientation from a TIFF block (EXIF APP1 payload after ``Exif\\0\\0``): an int, None when the
    block has no orientation tag; raises ValueError/IndexError when the block is malformed."""
    order = {b"II": "little", b"MM": "big"}[bytes(tiff[:2])]  # KeyError -> malformed
    ifd = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    if ifd + 2 + 12 * count > len(tiff):
        raise ValueError("IFD0 runs past the EXIF block")
    for k in range(count):
        entry = tiff[ifd + 2 + 12 * k : ifd + 14 + 12 * k]
        if int.from_bytes(entry[0:2], order) == _ORIENTATION_TAG:
            if int.from_bytes(entry[2:4], order) != 3:  # SHORT
                raise ValueError("orientation is not a SHORT")
            return int.from_bytes(entry[8:10], order)
    return None


def read_jpeg_header(data: bytes) -> Optional[JpegHeader]:
    """Size, PIL mode and EXIF orientation of JPEG ``data``; None if ``data`` is not a JPEG this
    walk reads with certainty (the caller then falls back to PIL)."""
    if not data.startswith(_SOI):
        return None
    size = mode = None
    orientation, exif_seen = None, False
    i, n = 2, len(data)
    try:
        while i + 4 <= n:
            if data[i] != 0xFF:
                return None  # not at a marker: let PIL judge the file
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in _STANDALONE:
                i += 2
                continue
            if marker in (_SOS, _EOI):
                break
            length = int.from_bytes(data[i + 2 : i + 4], "big")
            if length < 2 or i + 2 + length > n:
                return None
            segment = data[i + 4 : i + 2 + length]
            if marker in _SOF_MARKERS:
                if size is not None or len(segment) < 6:
                    return None  # two frames (multi-picture) or a short one: PIL's business
                size = (int.from_bytes(segment[3:5], "big"), int.from_bytes(segment[1:3], "big"))
                mode = _MODES.get(segment[5])
            elif marker == _APP1 and segment.startswith(b"Exif\x00\x00") and not exif_seen:
                exif_seen = True  # the first EXIF block counts, as in PIL
                orientation = _exif_orientation(memoryview(segment)[6:])
            i += 2 + length
    except (KeyError, ValueError, IndexError):
        return None
    if size is None or mode is None or min(size) == 0:
        return None  # no frame before the scan, an unusual component count, or a DNL height
    return JpegHeader(size[0], size[1], mode, orientation)
