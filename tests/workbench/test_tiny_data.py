"""The tiny synthetic COCO / VOC sets (tools/build_tiny_datasets.py) and the demo photo set."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from regionssl.data.demo_images import demo_image_files, register_demo_images

from regionssl_workbench import tiny_datasets as tiny
from conftest import HANG_TIMEOUT, ROOT as REPO


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_default_root_follows_environment(monkeypatch):
    monkeypatch.delenv("REGIONSSL_DATASETS", raising=False)
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    assert tiny.default_root() == os.path.join(REPO, "datasets", "regionssl_tiny")
    monkeypatch.setenv("DETECTRON2_DATASETS", "/d2")
    assert tiny.default_root() == os.path.join("/d2", "regionssl_tiny")
    monkeypatch.setenv("REGIONSSL_DATASETS", "/mine")
    assert tiny.default_root() == "/mine"


def test_builder_is_deterministic(tmp_path):
    a, b = tiny.build_tiny_coco(str(tmp_path / "a")), tiny.build_tiny_coco(str(tmp_path / "b"))
    for split in ("train", "val"):
        assert _read(a["coco_%s_json" % split]) == _read(b["coco_%s_json" % split])
        names = sorted(os.listdir(a["coco_%s_images" % split]))
        assert names == sorted(os.listdir(b["coco_%s_images" % split]))
        for n in names:
            assert _read(os.path.join(a["coco_%s_images" % split], n)) == _read(
                os.path.join(b["coco_%s_images" % split], n))
    va, vb = tiny.build_tiny_voc(str(tmp_path / "a")), tiny.build_tiny_voc(str(tmp_path / "b"))
    for sub in ("ImageSets/Main/trainval.txt", "ImageSets/Main/test.txt", "Annotations/test_000003.xml"):
        assert _read(os.path.join(va["voc_dirname"], sub)) == _read(os.path.join(vb["voc_dirname"], sub))


@pytest.mark.parametrize("split,num_images", [("train", 24), ("val", 8)])
def test_coco_json_is_consistent(tiny_root, split, num_images):
    tiny.ensure_tiny_datasets(tiny_root)
    paths = tiny.tiny_paths(tiny_root)
    with open(paths["coco_%s_json" % split]) as f:
        data = json.load(f)
    assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4]
    assert [c["name"] for c in data["categories"]] == list(tiny.CATEGORIES)
    assert [im["id"] for im in data["images"]] == list(range(1, num_images + 1))
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    images = {im["id"]: im for im in data["images"]}
    per_image = {i: 0 for i in images}
    sizes = set()
    for im in data["images"]:
        h, w = cv2.imread(os.path.join(paths["coco_%s_images" % split], im["file_name"])).shape[:2]
        assert (h, w) == (im["height"], im["width"])
        assert 128 <= w <= 200 and 128 <= h <= 160
        sizes.add((h, w))
    assert len(sizes) > num_images // 2  # varied sizes
    for a in data["annotations"]:
        im = images[a["image_id"]]
        per_image[a["image_id"]] += 1
        assert a["iscrowd"] == 0 and a["category_id"] in (1, 2, 3, 4)
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"] and w > 0 and h > 0
        (poly,) = a["segmentation"]
        xs, ys = np.array(poly[0::2]), np.array(poly[1::2])
        assert np.allclose([x, y, x + w, y + h], [xs.min(), ys.min(), xs.max(), ys.max()], atol=0.011)
        # The rasterised polygon covers about its analytic area (pycocotools' own rasteriser).
        rle = mask_util.frPyObjects([poly], im["height"], im["width"])
        assert abs(float(mask_util.area(rle).sum()) - a["area"]) <= 0.15 * a["area"] + 6
    assert min(per_image.values()) >= 1  # no empty image: FILTER_EMPTY_ANNOTATIONS keeps all
    areas = np.array([a["area"] for a in data["annotations"]])
    assert (areas < 32 ** 2).any() and (areas > 32 ** 2).any()  # small and medium/large objects


def test_objects_are_drawn_where_annotated(tiny_root):
    """Pixels inside a polygon have the saturated colour of its category family."""
    tiny.ensure_tiny_datasets(tiny_root)
    paths = tiny.tiny_paths(tiny_root)
    with open(paths["coco_train_json"]) as f:
        data = json.load(f)
    images = {im["id"]: im for im in data["images"]}
    for a in data["annotations"][:20]:
        im = images[a["image_id"]]
        bgr = cv2.imread(os.path.join(paths["coco_train_images"], im["file_name"]))
        rle = mask_util.frPyObjects(a["segmentation"], im["height"], im["width"])
        m = mask_util.decode(mask_util.merge(rle)).astype(bool)
        m = cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)  # skip AA edges
        hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV_FULL)[m].astype(np.float32)
        ang = hsv[:, 0] * (2 * np.pi / 256)
        hue = np.degrees(np.arctan2(np.sin(ang).mean(), np.cos(ang).mean())) % 360  # circular mean
        expected = (0.0, 220.0, 120.0, 50.0)[a["category_id"] - 1]
        assert min(abs(hue - expected), 360 - abs(hue - expected)) < 25
        assert np.median(hsv[:, 1]) > 120  # saturated objects on low-saturation backgrounds


def test_coco_loads_through_catalog(tiny_root):
    for split, num_images in (("train", 24), ("val", 8)):
        name = "regionssl_tiny_coco_" + split
        dicts = DatasetCatalog.get(name)
        with open(tiny.tiny_paths(tiny_root)["coco_%s_json" % split]) as f:
            data = json.load(f)
        assert len(dicts) == num_images
        assert sum(len(d["annotations"]) for d in dicts) == len(data["annotations"])
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "coco"
        assert meta.json_file == os.path.join(tiny_root, "coco", "annotations", "instances_%s.json" % split)
        assert meta.thing_classes == list(tiny.CATEGORIES)
        assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 4: 3}
        for d in dicts:
            assert os.path.isfile(d["file_name"]) and d["file_name"].startswith(tiny_root)
            for a in d["annotations"]:
                assert 0 <= a["category_id"] < 4 and a["bbox_mode"] == BoxMode.XYWH_ABS
                assert len(a["segmentation"]) == 1 and len(a["segmentation"][0]) >= 6


def test_voc_loads_through_catalog(tiny_root):
    coco = {d["image_id"]: d for d in DatasetCatalog.get("regionssl_tiny_coco_train")}
    assert len(coco) == 24
    for split, num_images in (("trainval", 24), ("test", 8)):
        name = "regionssl_tiny_voc_" + split
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == num_images
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "pascal_voc" and meta.year == 2007 and meta.split == split
        assert meta.thing_classes == list(tiny.CATEGORIES)
        assert meta.dirname == os.path.join(tiny_root, "VOC2007")
        for d in dicts:
            assert d["image_id"].startswith(split + "_") and d["annotations"]
            for a in d["annotations"]:
                x0, y0, x1, y1 = a["bbox"]
                assert a["bbox_mode"] == BoxMode.XYXY_ABS and 0 <= a["category_id"] < 4
                assert 0 <= x0 < x1 <= d["width"] and 0 <= y0 < y1 <= d["height"]
                assert float(x0).is_integer() and float(y1).is_integer()


def test_loader_builds_on_first_use_and_ensure_is_idempotent(tmp_path, monkeypatch):
    root = str(tmp_path / "fresh" / "regionssl_tiny")
    monkeypatch.setenv("REGIONSSL_DATASETS", root)
    try:
        tiny.register_tiny_datasets(force=True)
        assert not os.path.exists(root)  # registering builds nothing
        assert len(DatasetCatalog.get("regionssl_tiny_voc_test")) == 8  # builds everything
        stamp = os.path.join(root, "VERSION")
        json_file = tiny.tiny_paths(root)["coco_val_json"]
        assert os.path.isfile(json_file)
        before = (os.stat(stamp).st_mtime_ns, os.stat(json_file).st_mtime_ns, _read(json_file))
        assert tiny.ensure_tiny_datasets(root) == root
        assert (os.stat(stamp).st_mtime_ns, os.stat(json_file).st_mtime_ns, _read(json_file)) == before
        with open(stamp, "w") as f:  # a stale version is rebuilt, with identical content
            f.write("old\n")
        tiny.ensure_tiny_datasets(root)
        assert _read(stamp).decode().strip() == tiny._VERSION and _read(json_file) == before[2]
        leftovers = [n for n in os.listdir(os.path.dirname(root)) if ".tmp-" in n or ".old-" in n]
        assert leftovers == []
    finally:
        monkeypatch.undo()
        tiny.register_tiny_datasets(force=True)


@pytest.mark.slow
def test_concurrent_ensure(tmp_path):
    """Two processes building the same root at once both succeed and leave one complete copy."""
    root = str(tmp_path / "race" / "regionssl_tiny")
    code = "from regionssl_workbench.tiny_datasets import ensure_tiny_datasets; print(ensure_tiny_datasets(%r))" % root
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=HANG_TIMEOUT)[0].decode().strip().splitlines()[-1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == [root, root]
    assert sorted(os.listdir(os.path.dirname(root))) == [".regionssl_tiny.lock", "regionssl_tiny"]
    assert sorted(os.listdir(root)) == ["VERSION", "VOC2007", "coco"]
    with open(tiny.tiny_paths(root)["coco_train_json"]) as f:
        assert len(json.load(f)["images"]) == 24


def test_demo_images():
    files = demo_image_files()
    assert files == sorted(files) and len(files) >= 4
    assert all(os.path.isfile(p) and "-packages" + os.sep in p for p in files)  # read in place
    assert {"astronaut.png", "chelsea.png", "grace_hopper.jpg"} <= {os.path.basename(p) for p in files}
    register_demo_images()
    full = DatasetCatalog.get("regionssl_demo_images")
    train = DatasetCatalog.get("regionssl_demo_images_train")
    heldout = DatasetCatalog.get("regionssl_demo_images_heldout")
    assert [d["file_name"] for d in full] == files
    assert sorted(d["file_name"] for d in train + heldout) == files
    assert not {d["file_name"] for d in train} & {d["file_name"] for d in heldout}
    assert 1 <= len(heldout) <= 4 and len(train) >= len(heldout)
    for d in full:
        assert set(d) == {"file_name", "image_id", "height", "width"}  # image-only: no annotations
        img = cv2.imread(d["file_name"], cv2.IMREAD_COLOR)
        assert img.shape[:2] == (d["height"], d["width"])
    assert len({d["image_id"] for d in full}) == len(full)


def test_register_all_is_idempotent():
    tiny.register_all()
    tiny.register_all()
    for name in ("regionssl_tiny_coco_train", "regionssl_tiny_coco_val", "regionssl_tiny_voc_trainval",
                 "regionssl_tiny_voc_test", "regionssl_demo_images", "regionssl_demo_images_train",
                 "regionssl_demo_images_heldout"):
        assert name in DatasetCatalog.list()
