"""The data path's fast routes give what the plain ones give: the array decode (simplejpeg, or
OpenCV without it; for pipelines that resample arrays) against PIL's, at every DCT reduction, and
bad files still skipped."""
import io

import numpy as np
import pytest
from PIL import Image

from regionssl.data import image_io
from regionssl.data.image_io import UnreadableImageError, image_file_from_bytes


def _jpeg(h=120, w=168, **save):
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (3 * xx + 5 * yy) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


@pytest.mark.parametrize("decoder", ["simplejpeg", "opencv"])
@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_array_decode_equals_pil_decode(r, decoder, monkeypatch):
    if decoder == "opencv":  # the fallback when simplejpeg is not installed
        monkeypatch.setattr(image_io, "simplejpeg", None)
    else:
        assert image_io.simplejpeg is not None, "simplejpeg is a requirement"
    h, w = 121, 167  # odd sides: a decode at 1/r has ceil(side / r) pixels
    item = image_file_from_bytes("ramp.jpg", _jpeg(h, w))
    via_pil, via_array = item.decode(r), item.decode(r, array=True)
    assert via_array._pil is None, "a plain JPEG decoded for an array skips PIL"
    assert (via_array.height, via_array.width, via_array.reduction) == (via_pil.height, via_pil.width, via_pil.reduction)
    a, b = via_pil.array().astype(int), via_array.array().astype(int)
    assert a.shape == b.shape == (-(-h // r), -(-w // r), 3)
    # the same libjpeg-turbo decode in every wheel: identical here; a build difference stays tiny
    assert np.abs(a - b).max() <= 1 and np.abs(a - b).mean() < 0.05


@pytest.mark.parametrize("decoder", ["simplejpeg", "opencv"])
def test_truncated_jpeg_still_unreadable_with_array_decode(decoder, monkeypatch):
    if decoder == "opencv":
        monkeypatch.setattr(image_io, "simplejpeg", None)
    data = _jpeg()
    item = image_file_from_bytes("bad.jpg", data[: len(data) // 2])
    with pytest.raises(UnreadableImageError, match="bad.jpg"):
        item.decode(1, array=True)


def test_corrupt_scan_data_is_unreadable_not_garbage():
    """Bytes of the entropy-coded data overwritten (the file still ends with its EOI marker): the
    array decode reports the file instead of returning a smeared image."""
    data = bytearray(_jpeg())
    sos = data.index(b"\xff\xda")
    data[sos + 40 : sos + 60] = b"\xff\xd0" * 10  # restart markers where none belong
    item = image_file_from_bytes("corrupt.jpg", bytes(data))
    with pytest.raises(UnreadableImageError, match="corrupt.jpg"):
        item.decode(1, array=True)


def _photo_jpegs(folder, size=(1280, 960), count=4):
    """The first ``count`` demo photos resized to ``size`` (aspect not kept), saved as JPEG q90."""
    from regionssl.data.demo_images import demo_image_files

    paths = []
    for i, src in enumerate(demo_image_files()[:count]):
        path = folder / f"photo{i}.jpg"
        Image.open(src).convert("RGB").resize(size, Image.BICUBIC).save(path, quality=90)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("size, r", [((640, 480), 1), ((1280, 960), 2)])
def test_background_decoded_at_pasted_size_matches_full_decode(tmp_path, monkeypatch, size, r):
    """CopyPaste's backgrounds are decoded at the coarsest DCT scale still larger than the canvas
    on both axes (640x480 -> 256x256: r = 1, the same pixels; 1280x960: r = 2), then resized with
    OpenCV bilinear. Against InsLoc's full decode + the same resize at r = 2: 0.8-1.6 grey levels
    mean absolute difference on these photos (0.6-2.5 on the ten demo photos), the same mean
    brightness, spread lower by under half a level (the DCT scaling is an area pre-filter: it
    removes some of the bilinear shrink's aliasing)."""
    import cv2

    from regionssl.data.augmentations import CV2_BILINEAR
    from regionssl.data.image_io import BackgroundSource, ImageFile

    used = []
    real = ImageFile.decode
    monkeypatch.setattr(ImageFile, "decode", lambda self, r=1, *a, **kw: used.append(self.max_decode_reduction(r)) or real(self, r, *a, **kw))
    for path in _photo_jpegs(tmp_path, size):
        canvas = BackgroundSource([path]).resized(256, 256, CV2_BILINEAR).astype(np.float64)
        assert used[-1] == r
        full = image_file_from_bytes(path, open(path, "rb").read()).decode(1, array=True).array()
        ref = cv2.resize(full, (256, 256), interpolation=cv2.INTER_LINEAR).astype(np.float64)
        if r == 1:
            assert np.array_equal(canvas, ref)
            continue
        assert np.abs(canvas - ref).mean() < 3.0
        assert abs(canvas.mean() - ref.mean()) < 0.5
        assert -0.25 < ref.std() - canvas.std() < 1.0


@pytest.mark.parametrize("interp", [Image.BILINEAR, Image.BICUBIC])
def test_whole_pixel_crops_resample_as_pil_crop_then_resize(interp):
    """Crops on whole decoded pixels with PIL's bilinear or bicubic filter are resampled by torch's
    antialiased resize of the array: what torchvision's RandomResizedCrop computes on a PIL image
    (crop, then resize), within a grey level or two (measured max 1 bilinear, 2 bicubic; mean
    < 0.01), shrinking and enlarging, square and not."""
    from regionssl.data.demo_images import demo_image_files
    from regionssl.data.image_io import DecodedImage

    photo = Image.open(demo_image_files()[0]).convert("RGB").resize((640, 480), Image.BICUBIC)
    pixels = DecodedImage(np.array(photo))
    for box, (out_w, out_h) in [((100, 50, 400, 300), (224, 224)), ((200, 100, 150, 120), (224, 224)),
                                ((0, 0, 640, 480), (96, 96)), ((13, 7, 301, 77), (150, 90))]:
        got = pixels.resized_crop(box, out_w, out_h, interp)
        x0, y0, w, h = box
        ref = np.asarray(photo.crop((x0, y0, x0 + w, y0 + h)).resize((out_w, out_h), interp))
        assert got.shape == (out_h, out_w, 3) and got.dtype == np.uint8 and got.flags.c_contiguous
        diff = np.abs(got.astype(int) - ref.astype(int))
        assert diff.max() <= 3 and diff.mean() < 0.05, (box, diff.max(), diff.mean())
