"""The data path's fast routes give what the plain ones give: OpenCV's JPEG decode (for pipelines
that resample with OpenCV) against PIL's, at every DCT reduction, and bad files still skipped."""
import io

import numpy as np
import pytest
from PIL import Image

from regionssl.data.image_io import UnreadableImageError, image_file_from_bytes


def _jpeg(h=120, w=168, **save):
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (3 * xx + 5 * yy) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_opencv_decode_equals_pil_decode(r):
    item = image_file_from_bytes("ramp.jpg", _jpeg())
    via_pil, via_cv2 = item.decode(r), item.decode(r, array=True)
    assert via_cv2._pil is None, "a plain JPEG decoded for an array goes through OpenCV"
    assert (via_cv2.height, via_cv2.width, via_cv2.reduction) == (via_pil.height, via_pil.width, via_pil.reduction)
    a, b = via_pil.array().astype(int), via_cv2.array().astype(int)
    assert a.shape == b.shape == (-(-120 // r), -(-168 // r), 3)
    # the same libjpeg-turbo decode in both wheels: identical here; a build difference stays tiny
    assert np.abs(a - b).max() <= 1 and np.abs(a - b).mean() < 0.05


def test_truncated_jpeg_still_unreadable_with_array_decode():
    data = _jpeg()
    item = image_file_from_bytes("bad.jpg", data[: len(data) // 2])
    with pytest.raises(UnreadableImageError, match="bad.jpg"):
        item.decode(1, array=True)
