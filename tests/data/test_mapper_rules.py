"""Region samplers' rules, the mapper's output contract and its bounded re-drawing."""
import logging
import random

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import Boxes, pairwise_iou
from PIL import Image

from regionssl.data import RegionSSLDatasetMapper
from regionssl.data import regions as R
from regionssl.data.augmentations import resized_crop_transform
from regionssl.data.views import View
from regionssl.engine import get_regionssl_cfg

IMG_H, IMG_W = 400, 600


def crop_view(box, size=224, flip=False):
    """A view of an IMG_H x IMG_W image showing ``box = (x0, y0, w, h)`` at ``size x size``."""
    tfm = resized_crop_transform(IMG_H, IMG_W, box, size, size)
    if flip:
        tfm = T.TransformList([tfm, T.HFlipTransform(size)])
    x0, y0, w, h = box
    return View(np.zeros((size, size, 3), np.uint8), tfm, np.array([x0, y0, x0 + w, y0 + h], dtype=np.float64))


def intersection_sampler(**kw):
    args = dict(max_boxes=10, min_size=32, iou_threshold=0.5, max_tries=50)
    args.update(kw)
    return R.IntersectionBoxes(**args)


# ----------------------------------------------------------------------------- IntersectionBoxes
def test_intersection_boxes_lie_in_intersection_with_min_size():
    np.random.seed(0)
    views = [crop_view((100, 50, 300, 250)), crop_view((200, 100, 350, 280), flip=True)]
    sampler = intersection_sampler()
    sw = min(224 / 300, 224 / 350)  # the coarser view's magnification (view px per original px)
    sh = min(224 / 250, 224 / 280)
    for _ in range(50):
        rs = sampler(views)
        b = rs.boxes
        assert b.shape == (10, 4) and (rs.groups == 0).all() and rs.check_views == [0, 1]
        assert (b[:, 0] >= 200 - 1e-9).all() and (b[:, 1] >= 100 - 1e-9).all()
        assert (b[:, 2] <= 400 + 1e-9).all() and (b[:, 3] <= 300 + 1e-9).all()
        assert ((b[:, 2] - b[:, 0]) * sw >= 32 - 1e-6).all() and ((b[:, 3] - b[:, 1]) * sh >= 32 - 1e-6).all()
        for v in views:  # hence >= 32 px in every view
            vb = v.transform.apply_box(b)
            assert (vb[:, 2:] - vb[:, :2] >= 32 - 1e-6).all()


def test_intersection_boxes_reject_overlaps():
    """With tries to spare, accepted boxes overlap each other with IoU < threshold."""
    np.random.seed(1)
    views = [crop_view((0, 0, 600, 400)), crop_view((0, 0, 600, 400))]
    sampler = intersection_sampler(max_tries=10000)
    for _ in range(20):
        b = sampler(views).boxes
        iou = R.box_iou_np(b, b)
        np.fill_diagonal(iou, 0)
        assert iou.max() < 0.5


def test_intersection_boxes_tries_are_bounded(monkeypatch):
    """Every candidate rejected (threshold 0): box 1 takes 1 try, each other box exactly max_tries,
    then the last candidate is accepted anyway (SCRL's soft rejection)."""
    np.random.seed(2)
    views = [crop_view((0, 0, 600, 400)), crop_view((50, 0, 500, 400))]
    sampler = intersection_sampler(max_boxes=6, max_tries=7, iou_threshold=0.0)
    calls = []
    orig = sampler._axis_candidate
    monkeypatch.setattr(sampler, "_axis_candidate", lambda extent: calls.append(extent) or orig(extent))
    b = sampler(views).boxes
    assert len(b) == 6
    assert len(calls) == 2 * (1 + 5 * 7)


@pytest.mark.parametrize(
    "b",
    [(400, 0, 200, 200), (300, 300, 300, 100), (172, 0, 200, 200)],  # no overlap, too thin, 28 x 1.12 < 32 px
)
def test_intersection_boxes_empty_without_enough_overlap(b):
    views = [crop_view((0, 0, 200, 200)), crop_view(b)]
    rs = intersection_sampler()(views)
    assert rs.boxes.shape == (0, 4) and rs.groups.shape == (0,)


# ----------------------------------------------------------------------------- SlidingWindows
@pytest.mark.parametrize("size,stride,count,last", [(48, 32, 36, 160), (32, 24, 64, 168)])
def test_sliding_window_counts(size, stride, count, last):
    """ReSim keeps a window while x0 + size < 224: 36 windows of 48/32 and 64 of 32/24."""
    g = R.SlidingWindows.grid(224, 224, size, stride)
    assert len(g) == count
    assert g[:, 0].max() == last and g[:, 1].max() == last
    assert (g[:, 2] - g[:, 0] == size).all() and (g[:, 3] - g[:, 1] == size).all()
    np.testing.assert_array_equal(g[1], [stride, 0, stride + size, size])  # row-major


def test_sliding_windows_map_through_query_and_mark_validity():
    np.random.seed(3)
    sampler = R.SlidingWindows(sizes=[48, 32], strides=[32, 24])
    views = [crop_view((100, 50, 300, 250), flip=True), crop_view((150, 80, 300, 260), flip=True)]
    rs = sampler(views)
    assert rs.boxes.shape == (100, 4) and rs.groups.tolist() == [0] * 36 + [1] * 64
    assert rs.check_views == [0, 1]
    q = views[0].transform.apply_box(rs.boxes)
    grid = np.concatenate([R.SlidingWindows.grid(224, 224, 48, 32), R.SlidingWindows.grid(224, 224, 32, 24)])
    np.testing.assert_allclose(q, grid, atol=1e-9)
    # in the mapper, validity = inside every view; compare with ReSim's rule (all mapped coords in [0, 224))
    k = views[1].transform.apply_box(rs.boxes)
    resim_valid = ((k >= 0) & (k < 224)).all(1)
    mapper = RegionSSLDatasetMapper(view_generator=lambda im, file_name=None: views, region_sampler=sampler, photometric=[[]])
    _, _, boxes, valid = mapper._views_and_regions(np.zeros((IMG_H, IMG_W, 3), np.uint8))
    assert 0 < valid.sum() < 100
    np.testing.assert_array_equal(valid, resim_valid)


# ----------------------------------------------------------------------------- anchor jitter
def _iou(a, b):
    return pairwise_iou(Boxes(torch.as_tensor(a).reshape(-1, 4)), Boxes(torch.as_tensor(b).reshape(-1, 4)))


def test_anchor_jitter_iou_above_half():
    """The jittered box is a random anchor with IoU > 0.5; if none qualifies, the best anchor
    (uniform pick, no NMS, best-anchor fallback, centres at +0.5 stride: the non-official switches)."""
    np.random.seed(4)
    grid = dict(stride=16, sizes=[32, 64, 128, 256], ratios=[0.5, 0.75, 1.0, 1.5, 2.0], offset=0.5)
    kw = dict(grid, iou_threshold=0.5, nms_threshold=1.0, fallback_topk=1)
    anchors = R.anchor_grid((256, 256), **grid)
    fallbacks = 0
    for _ in range(200):
        w, h = np.random.randint(20, 255, size=2)
        x0, y0 = np.random.randint(0, 256 - w + 1), np.random.randint(0, 256 - h + 1)
        box = np.array([x0, y0, x0 + w, y0 + h], dtype=np.float64)
        j = R.anchor_jitter(box, (256, 256), **kw)
        best = float(_iou(box, anchors.double()).max())
        iou = float(_iou(box, j)[0, 0])
        if best > 0.5:
            assert iou > 0.5
        else:
            fallbacks += 1
            assert iou == pytest.approx(best)
    assert fallbacks < 20
    # a pasted-size box gets different anchors on different draws (it is a jitter)
    box = np.array([60, 40, 200, 190], dtype=np.float64)
    picks = {tuple(R.anchor_jitter(box, (256, 256), **kw)) for _ in range(30)}
    assert len(picks) > 3


def _pick_frequencies(box, anchors, n=2000, **kw):
    np.random.seed(0)
    counts = np.bincount([R.pick_jittered_anchor(box, anchors, **kw) for _ in range(n)], minlength=len(anchors))
    return counts / n


def test_anchor_jitter_official_nms_with_random_scores():
    """InsLoc's rule: NMS 0.7 with random scores among anchors of IoU > 0.5, then a uniform survivor.
    A1, A2 overlap with IoU 100/105 > 0.7 (one suppresses the other), A3 overlaps both by <= 0.7,
    A4 is far: survivors are always {A3, A1 or A2}, so P(A3) = 1/2, P(A1) = P(A2) = 1/4, P(A4) = 0,
    where a uniform draw over the candidates gives 1/3 each."""
    box = np.array([0, 10, 100, 110], dtype=np.float64)
    anchors = torch.tensor([[0, 0, 100, 100], [0, 0, 100, 105], [0, 25, 100, 125], [300, 300, 400, 400]], dtype=torch.float32)
    iou = _iou(box, anchors.double())[0]
    assert (iou[:3] > 0.5).all() and iou[3] == 0
    assert float(_iou(anchors[0].double(), anchors[1].double())) > 0.7
    assert float(_iou(anchors[2].double(), anchors[:2].double()).max()) <= 0.7
    official = _pick_frequencies(box, anchors, iou_threshold=0.5, nms_threshold=0.7, fallback_topk=4000)
    np.testing.assert_allclose(official, [0.25, 0.25, 0.5, 0.0], atol=0.04)  # 2000 draws: std <= 0.011
    uniform = _pick_frequencies(box, anchors, iou_threshold=0.5, nms_threshold=1.0, fallback_topk=1)
    np.testing.assert_allclose(uniform, [1 / 3, 1 / 3, 1 / 3, 0.0], atol=0.04)


def test_anchor_jitter_fallback_top_k():
    """No anchor above 0.5: the official rule draws among the top-k anchors by IoU (through the same
    NMS), not only the best; fallback_topk 1 always gives the best anchor."""
    box = np.array([0, 0, 100, 100], dtype=np.float64)
    # IoU with the box: 0.4, 0.3, 0.1, 0.0; pairwise IoU among the first three <= 0.7
    anchors = torch.tensor([[0, 0, 100, 40], [0, 70, 100, 100], [90, 0, 100, 100], [500, 500, 600, 600]], dtype=torch.float32)
    np.testing.assert_allclose(_iou(box, anchors.double())[0].numpy(), [0.4, 0.3, 0.1, 0.0], atol=1e-6)
    top2 = _pick_frequencies(box, anchors, n=400, iou_threshold=0.5, nms_threshold=0.7, fallback_topk=2)
    assert top2[0] > 0.3 and top2[1] > 0.3 and top2[2] == top2[3] == 0
    best = _pick_frequencies(box, anchors, n=50, iou_threshold=0.5, nms_threshold=0.7, fallback_topk=1)
    assert best.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_numpy_iou_to_anchors_is_detectron2s_bit_for_bit():
    """The jitter's IoU (numpy, no Boxes) equals Detectron2's pairwise_iou exactly, so the candidate
    set above the 0.5 threshold, and with it the random stream of the draws, is unchanged: boxes of
    every size on the real grid, touching, disjoint and degenerate (zero width) ones included."""
    anchors = R.anchor_grid((256, 256), stride=16, sizes=[32, 64, 128, 256], ratios=[0.5, 0.75, 1.0, 1.5, 2.0], offset=0.0)
    rng = np.random.default_rng(0)
    xy = rng.uniform(-20, 270, size=(300, 2))
    wh = rng.uniform(0, 260, size=(300, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    boxes[:5, 2] = boxes[:5, 0]  # zero width
    boxes[5] = [300, 300, 400, 400]  # off the canvas: IoU 0 everywhere
    for box in boxes:
        ours = R._iou_to_anchors(box, anchors.numpy())
        theirs = _iou(box, anchors)[0].numpy()
        assert ours.dtype == theirs.dtype == np.float32
        np.testing.assert_array_equal(ours, theirs)


def test_insloc_anchor_grid_is_mmdet_with_center_offset_zero():
    """configs/insloc_fpn.yaml: P4 anchors of a 256 canvas centred at 0, 16, ..., 240 (mmdet
    AnchorGenerator, center_offset 0), 16 x 16 positions x 20 shapes; width = size / sqrt(h/w)."""
    cfg = get_regionssl_cfg("configs/insloc_fpn.yaml", [])
    j = cfg.INPUT.REGIONSSL.JITTER
    assert (j.ANCHOR_OFFSET, j.NMS_THRESHOLD, j.FALLBACK_TOPK, j.IOU_THRESHOLD) == (0.0, 0.7, 4000, 0.5)
    anchors = R.anchor_grid((256, 256), stride=j.ANCHOR_STRIDE, sizes=j.ANCHOR_SIZES, ratios=j.ANCHOR_RATIOS,
                            offset=j.ANCHOR_OFFSET).double()
    assert anchors.shape == (16 * 16 * 20, 4)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert sorted(set(centres[:, 0].round(decimals=3).tolist())) == [16.0 * k for k in range(16)]
    wh = anchors[:, 2:] - anchors[:, :2]
    expected = {(round(s / r ** 0.5, 4), round(s * r ** 0.5, 4)) for s in (32, 64, 128, 256) for r in (0.5, 0.75, 1.0, 1.5, 2.0)}
    assert {(round(w, 2), round(h, 2)) for w, h in wh.tolist()} == {(round(w, 2), round(h, 2)) for w, h in expected}


# ----------------------------------------------------------------------------- mapper contract
CASES = [
    ("TwoCrops", "WholeView", []),
    ("TwoCrops", "IntersectionBoxes", []),
    ("TwoCropsSharedFlip", "SlidingWindows", ["INPUT.REGIONSSL.WINDOWS.SIZES", [48, 32], "INPUT.REGIONSSL.WINDOWS.STRIDES", [32, 24]]),
    ("MultiCrop", "WholeView", ["INPUT.REGIONSSL.MULTI_CROP.SIZES", [96, 48]]),
    ("CopyPaste", "PastedBox", ["INPUT.REGIONSSL.CROP_SIZE", 128, "INPUT.REGIONSSL.COPY_PASTE.FG_SIZE", [48, 96], "INPUT.REGIONSSL.JITTER.ENABLED", True]),
]


@pytest.fixture
def photo(tmp_path):
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[0:240, 0:320]
    img = np.stack([xx * 255 / 319, yy * 255 / 239, rng.randint(0, 256, (240, 320))], -1).astype(np.uint8)
    path = tmp_path / "photo.jpg"
    Image.fromarray(img).save(path, quality=90)
    return str(path)


def _mapper(generator, sampler, opts, files):
    cfg = get_regionssl_cfg(None, ["INPUT.REGIONSSL.VIEW_GENERATOR", generator, "INPUT.REGIONSSL.REGION_SAMPLER", sampler, *opts])
    return RegionSSLDatasetMapper(cfg, dataset_dicts=[{"file_name": f, "image_id": i} for i, f in enumerate(files)])


@pytest.mark.parametrize("generator,sampler,opts", CASES)
def test_output_contract(photo, generator, sampler, opts):
    np.random.seed(5)
    random.seed(5)
    mapper = _mapper(generator, sampler, opts, [photo])
    for _ in range(3):
        out = mapper({"file_name": photo, "image_id": 7})
        assert isinstance(out, dict)
        assert {"views", "boxes", "valid", "box_groups", "height", "width", "image_id"} <= set(out)
        assert (out["height"], out["width"], out["image_id"]) == (240, 320, 7)
        n = len(out["views"])
        assert n == len(out["boxes"]) >= 2
        r = len(out["valid"])
        assert r >= 1 and out["valid"].dtype == torch.bool and out["valid"].any()
        assert out["box_groups"].shape == (r,) and out["box_groups"].dtype == torch.int64
        for view, boxes in zip(out["views"], out["boxes"]):
            assert view.dtype == torch.uint8 and view.ndim == 3 and view.shape[0] == 3
            assert boxes.dtype == torch.float32 and boxes.shape == (r, 4)  # row i present in every view
            assert torch.isfinite(boxes).all()
            h, w = view.shape[1:]
            vb = boxes[out["valid"]]
            if sampler != "IntersectionBoxes" or n == 2:
                assert (vb[:, :2] >= -1e-3).all() and (vb[:, 2] <= w + 1e-3).all() and (vb[:, 3] <= h + 1e-3).all()
        if "jittered_boxes" in out:
            assert out["jittered_boxes"].shape == (r, 4) and out["jittered_boxes"].dtype == torch.float32


def test_unusable_pair_is_redrawn_then_skipped_with_warning(photo, caplog):
    mapper = _mapper("TwoCrops", "IntersectionBoxes", ["INPUT.REGIONSSL.MAX_RESAMPLE", 4], [photo])
    calls = []

    def never(views):
        calls.append(len(views))
        return R.RegionSet(boxes=np.zeros((0, 4)), groups=np.zeros(0, dtype=np.int64), check_views=[0, 1])

    mapper.region_sampler = never
    with caplog.at_level(logging.WARNING, logger="regionssl"):
        assert mapper({"file_name": photo, "image_id": 0}) is None
    assert len(calls) == 1 + 4  # the first draw and MAX_RESAMPLE re-draws
    assert any(photo in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_invalid_rows_do_not_trigger_redraw(photo):
    """A pair with at least one valid row is kept; invalid rows stay, marked valid=False."""
    mapper = _mapper("TwoCrops", "IntersectionBoxes", [], [photo])

    def half_outside(views):
        inside = views[0].source_box + np.array([1, 1, -1, -1])
        outside = np.array([-50, -50, -10, -10], dtype=np.float64)
        return R.RegionSet(boxes=np.stack([inside, outside]), groups=np.zeros(2, dtype=np.int64), check_views=[0])

    mapper.region_sampler = half_outside
    out = mapper({"file_name": photo, "image_id": 0})
    assert out["valid"].tolist() == [True, False] and out["boxes"][0].shape == (2, 4)
