"""The JPEG marker walk gives exactly what PIL gives (size, mode, EXIF orientation), and hands
every file it is not sure of back to PIL instead of guessing."""
import io

import numpy as np
import pytest
from PIL import Image

from regionssl.data.image_io import image_file_from_bytes
from regionssl.data.jpeg_header import read_jpeg_header


def _image(mode="RGB", size=(37, 23)):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(rgb).convert(mode)


def _save(image, **kwargs):
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _exif(orientation):
    exif = Image.Exif()
    exif[0x010F] = "regionssl"  # Make: an entry before the orientation
    if orientation is not None:
        exif[0x0112] = orientation
    return exif


def _pil_header(data):
    image = Image.open(io.BytesIO(data))
    return image.size[0], image.size[1], image.mode, image.getexif().get(0x0112)


CASES = {
    "baseline": lambda: _save(_image()),
    "progressive": lambda: _save(_image(), progressive=True),
    "grayscale": lambda: _save(_image("L")),
    "cmyk": lambda: _save(_image("CMYK")),
    "icc profile before exif": lambda: _save(_image(), icc_profile=b"\x00" * 3000, exif=_exif(6)),
    "exif without orientation": lambda: _save(_image(), exif=_exif(None)),
    "wide": lambda: _save(_image(size=(1031, 7))),
    **{f"exif orientation {o}": (lambda o=o: _save(_image(), exif=_exif(o))) for o in range(1, 9)},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_header_equals_pil(case):
    data = CASES[case]()
    header = read_jpeg_header(data)
    assert header is not None, "the walk reads every file PIL writes"
    assert tuple(header) == _pil_header(data)
    item = image_file_from_bytes("x.jpg", data)
    w, h = _pil_header(data)[:2]
    rotated = header.orientation in (5, 6, 7, 8)
    assert (item.width, item.height) == ((h, w) if rotated else (w, h))


def _big_endian_exif_jpeg(orientation):
    """A JPEG whose EXIF block is written by hand: Motorola byte order (``MM``), one entry."""
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + (1).to_bytes(2, "big")
    tiff += (0x0112).to_bytes(2, "big") + (3).to_bytes(2, "big") + (1).to_bytes(4, "big")
    tiff += orientation.to_bytes(2, "big") + b"\x00\x00" + b"\x00\x00\x00\x00"
    payload = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    plain = _save(_image())
    return plain[:2] + app1 + plain[2:]


def test_hand_written_exif():
    data = _big_endian_exif_jpeg(8)
    assert read_jpeg_header(data).orientation == 8 == _pil_header(data)[3]


def test_unsure_files_go_back_to_pil():
    good = _save(_image(), exif=_exif(6))
    assert read_jpeg_header(b"\x89PNG\r\n\x1a\n" + good[2:]) is None  # not a JPEG
    assert read_jpeg_header(good[:40]) is None  # header cut before the frame
    at = good.index(b"Exif\x00\x00") + 6
    broken_exif = good[:at] + b"XX" + good[at + 2 :]  # unknown TIFF byte order
    assert read_jpeg_header(broken_exif) is None
    # what PIL then makes of it is what the loader uses: the size, and no orientation
    item = image_file_from_bytes("broken_exif.jpg", broken_exif)
    assert (item.width, item.height) == (37, 23)
    garbage_between_segments = good[:2] + b"\x00\x00" + good[2:]
    assert read_jpeg_header(garbage_between_segments) is None
