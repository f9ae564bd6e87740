"""Image folders: regular files only, symlinked directories entered only on request (each real
directory once), and one pixel budget for every decode path; each skip names the file."""
import io
import logging
import os
import socket
import threading

import numpy as np
import pytest
from PIL import Image

from regionssl.data import image_io
from regionssl.data.datasets import ensure_registered, list_image_files
from regionssl.data.image_io import (
    MAX_IMAGE_PIXELS, BackgroundSource, SkippedFiles, open_image_or_none, read_rgb_or_none,
)


def _jpeg(path, size=(32, 24)):
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(path, "JPEG")
    return str(path)


@pytest.fixture
def fifo(tmp_path):
    """A named pipe called ``pipe.jpg``. A writer thread feeds it one byte if anything ever opens it
    for reading, so a reader that wrongly opens it gets an unreadable image instead of hanging."""
    path = tmp_path / "pipe.jpg"
    os.mkfifo(path)

    def feed():
        with open(path, "wb") as f:
            f.write(b"x")

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    yield str(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # releases the writer if nobody read
    writer.join()
    os.close(fd)


def test_listing_keeps_regular_files_and_names_what_it_skips(tmp_path, fifo, caplog):
    good = _jpeg(tmp_path / "a.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "broken.jpg")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "sock.jpg"))
        with caplog.at_level(logging.WARNING):
            files = list_image_files(str(tmp_path))
    assert files == [good]
    text = caplog.text
    assert f"Skipping {fifo}: a named pipe, not a regular file" in text
    assert f"Skipping {tmp_path / 'zero.jpg'}: a character device, not a regular file" in text
    assert f"Skipping {tmp_path / 'sock.jpg'}: a socket, not a regular file" in text
    assert f"Skipping {tmp_path / 'broken.jpg'}: No such file or directory" in text


def test_listing_order_is_depth_first_with_each_folders_files_first(tmp_path):
    for rel in ["b/z/1.jpg", "b/2.JPEG", "a.png", "a/3.jpg", "a/y/4.jpg", "b.txt", "c/notes.md", "0.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    expected = ["0.jpg", "a.png", "a/3.jpg", "a/y/4.jpg", "b/2.JPEG", "b/z/1.jpg"]
    assert list_image_files(str(tmp_path)) == [str(tmp_path / rel) for rel in expected]


@pytest.mark.parametrize("name,kind", [("pipe.jpg", "a named pipe"), ("zero.jpg", "a character device")])
def test_reading_a_pipe_or_device_listed_earlier_skips_it(tmp_path, fifo, name, kind):
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    skipped = SkippedFiles()
    path = str(tmp_path / name)
    assert open_image_or_none(path, skipped) is None  # returns: neither blocks nor reads without end
    assert skipped.reasons == {path: f"{kind}, not a regular file"}


def test_symlinked_directories_are_entered_only_on_request_and_once(tmp_path, caplog):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    a = _jpeg(root / "sub" / "a.jpg")
    b = _jpeg(outside / "b.jpg")
    os.symlink(root, root / "sub" / "loop")  # a loop back to the top
    os.symlink(outside, root / "linked")
    os.symlink(outside, root / "linked_again")
    assert list_image_files(str(root)) == [a]
    with caplog.at_level(logging.WARNING):
        files = list_image_files(str(root), follow_symlinks=True)
    assert files == [str(root / "linked" / "b.jpg"), a]  # b once, a once (os.walk's sorted order)
    assert os.path.realpath(files[0]) == b
    assert f"Not listing {root / 'linked_again'} again: it is {outside}, already listed" in caplog.text
    assert f"Not listing {root / 'sub' / 'loop'} again: it is {root}, already listed" in caplog.text


def test_folder_links_dataset_name_follows_links(tmp_path):
    from detectron2.data import DatasetCatalog

    (tmp_path / "in").mkdir()
    _jpeg(tmp_path / "real.jpg")
    os.symlink(tmp_path, tmp_path / "in" / "up")
    ensure_registered([f"folder:{tmp_path / 'in'}", f"folder+links:{tmp_path / 'in'}"])
    with pytest.raises(ValueError, match="contains no images"):
        DatasetCatalog.get(f"folder:{tmp_path / 'in'}")
    assert [d["file_name"] for d in DatasetCatalog.get(f"folder+links:{tmp_path / 'in'}")] == [
        str(tmp_path / "in" / "up" / "real.jpg")]


def _huge_header_jpeg(path, width=20000, height=20000):
    """A small JPEG whose frame header claims ``width`` x ``height`` (what a decoder would allocate)."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5: sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.write_bytes(bytes(data))
    return str(path)


def test_one_pixel_budget_on_every_decode_path(tmp_path, monkeypatch):
    big = _huge_header_jpeg(tmp_path / "big.jpg")
    expected = f"image size 20000x20000 = 400000000 pixels is above the budget of {MAX_IMAGE_PIXELS}"
    decoded = []
    monkeypatch.setattr(image_io.ImageFile, "decode", lambda self, *a, **k: decoded.append(self.file_name))
    skipped = SkippedFiles()
    assert open_image_or_none(big, skipped) is None  # the mapper's own image (MoCo, InsLoc, ...)
    assert read_rgb_or_none(big, skipped, "a background") is None  # BackgroundSource.sample (CVSA)
    with pytest.raises(RuntimeError, match="No readable background"):
        BackgroundSource([big], max_tries=2, skipped=skipped).resized(64, 64, Image.BILINEAR)  # InsLoc's canvas
    assert skipped.reasons[big].startswith(expected) and decoded == []
