"""The real-object detection set: its builder (regionssl_workbench.minidet) on fake cut-outs and photos,
and its registration (regionssl.data.minidet_catalog)."""
import json
import os
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectron2.data import DatasetCatalog, MetadataCatalog
from regionssl.data import minidet_catalog
from regionssl_workbench import minidet

from conftest import CONFIGS

# fake cut-outs: per class a folder with 3 stamps, plus files the lister must skip
_COLOURS = {"mammal": (200, 120, 40), "bird": (40, 40, 200), "flower": (220, 40, 160), "produce": (60, 200, 60)}
SOURCES = {c: ("fake/" + c,) for c in minidet.CLASSES}


def _stamp(path, colour, shape, size=(90, 70)):
    """An RGBA png: a filled ellipse (or rectangle) with a soft edge, transparent around it."""
    w, h = size
    a = np.zeros((h + 10, w + 10), np.uint8)
    if shape == "ellipse":
        cv2.ellipse(a, (w // 2 + 5, h // 2 + 5), (w // 2, h // 2), 0, 0, 360, 255, -1, lineType=cv2.LINE_AA)
    else:
        a[5:h + 5, 5:w + 5] = 255
    rgb = np.zeros(a.shape + (3,), np.uint8)
    rgb[:] = colour
    rgb[::4] = (np.array(colour) * 0.7).astype(np.uint8)  # some texture
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.dstack([rgb, a]), "RGBA").save(path)


def _photo(path, seed):
    rng = np.random.default_rng(seed)
    t = cv2.resize(rng.uniform(0, 255, (6, 8, 3)).astype(np.float32), (400, 300), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(path, np.clip(t, 0, 255).astype(np.uint8))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("minidet_inputs")
    stamps = base / "stamps"
    for c, colour in _COLOURS.items():
        for i, shape in enumerate(("ellipse", "rect", "ellipse")):
            _stamp(str(stamps / "fake" / c / f"{c}{i}.png"), colour, shape, size=(60 + 20 * i, 50 + 10 * i))
        _stamp(str(stamps / "fake" / c / "cartoon" / "drawn.png"), colour, "rect")
        _stamp(str(stamps / "fake" / c / f"{c}0_mirror.png"), colour, "rect")
    os.makedirs(base / "photos")
    train = [_photo(str(base / "photos" / f"train{i}.jpg"), i) for i in range(4)]
    val = [_photo(str(base / "photos" / f"val{i}.jpg"), 100 + i) for i in range(2)]
    return str(stamps), train, val


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory):
    stamps, train, val = inputs
    root = str(tmp_path_factory.mktemp("minidet") / "regionssl_minidet")
    manifest, did_build = minidet.build_minidet(root, stamps, train, val, num_train=12, num_val=6, seed=3,
                                                sources=SOURCES)
    assert did_build
    return root, manifest


def _load(root, split):
    with open(minidet.minidet_paths(root)[split + "_json"]) as f:
        return json.load(f)


def test_lister_skips_cartoons_mirrors_and_exclusions(inputs):
    stamps, _, _ = inputs
    cut = minidet.list_cutouts(stamps, SOURCES, exclude=("fake/bird/bird2.png",))
    assert cut["mammal"] == ["fake/mammal/mammal0.png", "fake/mammal/mammal1.png", "fake/mammal/mammal2.png"]
    assert cut["bird"] == ["fake/bird/bird0.png", "fake/bird/bird1.png"]
    with pytest.raises(FileNotFoundError, match="nothere"):
        minidet.list_cutouts(stamps, {"bird": ("nothere",)})


def test_split_of_cutouts_is_disjoint_and_complete():
    cut = {"a": [f"a{i}" for i in range(10)], "b": ["b0", "b1"]}
    s = minidet.split_cutouts(cut, 0.3, seed=0)
    for c in cut:
        assert not set(s["train"][c]) & set(s["val"][c])
        assert sorted(s["train"][c] + s["val"][c]) == cut[c]
    assert len(s["val"]["a"]) == 3 and len(s["val"]["b"]) == 1
    assert s == minidet.split_cutouts(cut, 0.3, seed=0)


def test_masks_are_the_pasted_pixels():
    """One opaque green disk on a grey photo: the mask is exactly where alpha >= 0.5, i.e. where
    red fell to at most half of the grey (outside a 1-level rounding band)."""
    a = np.zeros((80, 80), np.float32)
    cv2.circle(a, (40, 40), 39, 1.0, -1)
    rgba = np.dstack([np.zeros_like(a), a, np.zeros_like(a), a])  # premultiplied green
    grey = np.full((300, 400, 3), 128, np.uint8)
    for seed in range(5):
        image, objects = minidet.compose_image(np.random.default_rng(seed), grey, [(0, rgba)])
        assert len(objects) == 1
        cat, mask, index = objects[0]
        assert (cat, index) == (0, 0) and mask.shape == image.shape[:2]
        red = image[..., 0].astype(int)
        sure = np.abs(red - 64) > 1
        assert np.array_equal(mask[sure], red[sure] < 64)
        assert mask.sum() >= 100


@pytest.mark.parametrize("split,num", [("train", 12), ("val", 6)])
def test_annotations_are_exact_and_ids_start_at_1(built, split, num):
    root, _ = built
    data = _load(root, split)
    assert [im["id"] for im in data["images"]] == list(range(1, num + 1))
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    assert [c["name"] for c in data["categories"]] == list(minidet.CLASSES)
    by_image = {}
    for a in data["annotations"]:
        m = mask_util.decode(a["segmentation"]).astype(bool)
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        assert a["area"] == m.sum() >= 100
        by_image.setdefault(a["image_id"], []).append(m)
    for im in data["images"]:
        h, w = cv2.imread(os.path.join(root, split, im["file_name"])).shape[:2]
        assert (h, w) == (im["height"], im["width"]) and max(h, w) == 320
        masks = by_image.get(im["id"], [])
        assert masks, "every image has an object"
        # occlusion: visible masks never overlap
        assert np.sum(masks, axis=0).max() <= 1


def test_some_objects_are_partly_occluded_by_at_most_half(inputs):
    """Objects pasted later hide earlier ones, never more than MAX_OCCLUDED of them. The first
    object's draws come first, so the same seed with that object alone gives its full mask."""
    stamps, train, _ = inputs
    rgba = minidet._load_cutout(os.path.join(stamps, minidet.list_cutouts(stamps, SOURCES)["bird"][2]))
    photo = cv2.imread(train[0])[:, :, ::-1]
    fractions = []
    for seed in range(12):
        _, objects = minidet.compose_image(np.random.default_rng(seed), photo, [(1, rgba)] * 4)
        _, alone = minidet.compose_image(np.random.default_rng(seed), photo, [(1, rgba)])
        first = [m for _, m, i in objects if i == 0]
        if first and alone:
            assert not (first[0] & ~alone[0][1]).any()  # visible part lies inside the full mask
            fractions.append(first[0].sum() / alone[0][1].sum())
    assert fractions and min(fractions) >= 1 - minidet.MAX_OCCLUDED - 1e-9
    assert min(fractions) < 1  # occlusion happens


def test_splits_share_no_cutout_and_no_background(built, inputs):
    root, manifest = built
    _, train_bgs, val_bgs = inputs
    used = {s: {a["cutout"] for a in _load(root, s)["annotations"]} for s in minidet.SPLITS}
    bgs = {s: {im["background"] for im in _load(root, s)["images"]} for s in minidet.SPLITS}
    assert used["train"] and used["val"] and not used["train"] & used["val"]
    assert bgs["train"] <= set(train_bgs) and bgs["val"] <= set(val_bgs)
    for s in minidet.SPLITS:
        listed = {f for files in manifest["splits"][s]["cutouts"].values() for f in files}
        assert used[s] <= listed
    assert not ({f for v in manifest["splits"]["train"]["cutouts"].values() for f in v}
                & {f for v in manifest["splits"]["val"]["cutouts"].values() for f in v})
    counts = manifest["splits"]["train"]["instances"]
    assert sum(counts.values()) == len(_load(root, "train")["annotations"])


def test_shared_background_is_refused_naming_it(inputs, tmp_path):
    stamps, train, val = inputs
    copy = str(tmp_path / "renamed_copy.jpg")
    shutil.copy(train[1], copy)  # same bytes under another name
    with pytest.raises(ValueError, match="renamed_copy.jpg"):
        minidet.build_minidet(str(tmp_path / "out"), stamps, train, val + [copy], 2, 2, sources=SOURCES)
    with pytest.raises(ValueError, match="train0.jpg"):
        minidet.build_minidet(str(tmp_path / "out"), stamps, train, [train[0]], 2, 2, sources=SOURCES)
    assert not os.path.exists(tmp_path / "out")


def test_build_is_idempotent_and_deterministic(built, inputs, tmp_path):
    root, manifest = built
    stamps, train, val = inputs
    paths = minidet.minidet_paths(root)
    before = {p: os.path.getmtime(paths[p]) for p in ("train_json", "val_json", "manifest")}
    again, did_build = minidet.build_minidet(root, stamps, train, val, num_train=12, num_val=6, seed=3,
                                             sources=SOURCES)
    assert not did_build and again == manifest
    assert before == {p: os.path.getmtime(paths[p]) for p in before}
    other = str(tmp_path / "copy")
    minidet.build_minidet(other, stamps, train, val, num_train=12, num_val=6, seed=3, sources=SOURCES)
    for split in minidet.SPLITS:
        with open(paths[split + "_json"], "rb") as f, open(minidet.minidet_paths(other)[split + "_json"], "rb") as g:
            assert f.read() == g.read()
        a, b = os.path.join(root, split, "000002.jpg"), os.path.join(other, split, "000002.jpg")
        assert open(a, "rb").read() == open(b, "rb").read()
    # a changed input rebuilds
    _, did_build = minidet.build_minidet(other, stamps, train[:3], val, num_train=12, num_val=6, seed=3,
                                         sources=SOURCES)
    assert did_build


def test_loads_with_detectron2_and_pycocotools(built):
    root, _ = built
    try:
        minidet_catalog.register_minidet(root, force=True)
        dicts = DatasetCatalog.get("regionssl_minidet_val")
        assert len(dicts) == 6
        assert MetadataCatalog.get("regionssl_minidet_val").thing_classes == list(minidet.CLASSES)
        data = _load(root, "val")
        n = sum(len(d["annotations"]) for d in dicts)
        assert n == len(data["annotations"])
        rec = dicts[0]
        anns = [a for a in data["annotations"] if a["image_id"] == rec["image_id"]]
        for got, want in zip(rec["annotations"], anns):
            assert got["category_id"] == want["category_id"] - 1  # contiguous ids
            assert np.array_equal(mask_util.decode(got["segmentation"]), mask_util.decode(want["segmentation"]))
        # pycocotools: the ground truth scored as detections gives AP 1 for boxes and masks
        gt = COCO(minidet.minidet_paths(root)["val_json"])
        dets = [dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"],
                     segmentation=a["segmentation"], score=1.0) for a in data["annotations"]]
        for kind in ("bbox", "segm"):
            ev = COCOeval(gt, gt.loadRes([dict(d) for d in dets]), kind)
            ev.evaluate(), ev.accumulate(), ev.summarize()
            assert ev.stats[1] == pytest.approx(1.0)  # AP50
    finally:
        minidet_catalog.register_minidet(force=True)


def test_unbuilt_split_names_the_build_command(tmp_path):
    try:
        minidet_catalog.register_minidet(str(tmp_path / "none"), force=True)
        with pytest.raises(FileNotFoundError, match="build_detection_set.py"):
            DatasetCatalog.get("regionssl_minidet_train")
    finally:
        minidet_catalog.register_minidet(force=True)


def test_protocol_config_reads_the_masks_as_bitmasks(built):
    """The miniature protocol's mapper turns the RLE masks into BitMasks whose extents are the
    boxes (after its resize and flip, to within the 1-px resampling of a mask edge)."""
    import torch
    from detectron2.data import DatasetMapper
    from detectron2.structures import BitMasks

    from regionssl.engine import get_regionssl_cfg

    root, _ = built
    cfg = get_regionssl_cfg(os.path.join(CONFIGS,
                                         "finetune", "minidet_mask_rcnn_R_50_FPN_mini.yaml"))
    assert cfg.DATASETS.TRAIN == ("regionssl_minidet_train",) and cfg.MODEL.ROI_HEADS.NUM_CLASSES == len(minidet.CLASSES)
    try:
        minidet_catalog.register_minidet(root, force=True)
        mapper = DatasetMapper(cfg, is_train=True)
        for record in DatasetCatalog.get("regionssl_minidet_train")[:4]:
            inst = mapper(record)["instances"]
            assert isinstance(inst.gt_masks, BitMasks) and len(inst) == len(record["annotations"])
            extent = inst.gt_masks.get_bounding_boxes().tensor
            assert torch.allclose(extent, inst.gt_boxes.tensor, atol=1.5)
    finally:
        minidet_catalog.register_minidet(force=True)
