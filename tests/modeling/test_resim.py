"""ReSim (regionssl/modeling/meta_arch/resim.py): windows, query->key mapping, region loss, model."""
import json
import math
import os

import numpy as np
import pytest
import torch
from detectron2.engine import launch
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

import regionssl  # noqa: F401
from regionssl.data.mapper import RegionSSLDatasetMapper
from regionssl.data.regions import SlidingWindows
from regionssl.data.demo_images import demo_image_files
from regionssl.modeling.meta_arch.resim import pooled_negatives, region_similarity_loss

from conftest import cfg_of

SMALL = ["INPUT.REGIONSSL.CROP_SIZE", "64"]  # P4 4x4 -> 2x2 negatives, P3 8x8 -> 6x6


def mapped_batch(cfg, n, seed):
    """``n`` mapper outputs of the demo photos (real mapper, real photos)."""
    np.random.seed(seed)
    mapper = RegionSSLDatasetMapper(cfg)
    files = demo_image_files()
    return [mapper({"file_name": files[i % len(files)], "image_id": i}) for i in range(n)]


# ------------------------------------------------------------------ windows and mapping
def test_window_counts_official_sizes():
    p4 = SlidingWindows.grid(224, 224, 48, 32)
    p3 = SlidingWindows.grid(224, 224, 32, 24)
    assert len(p4) == 36 and len(p3) == 64  # 6x6 and 8x8 (docs/methods/resim.md)
    assert p4[0].tolist() == [0, 0, 48, 48] and p4[-1].tolist() == [160, 160, 208, 208]
    assert p3[-1].tolist() == [168, 168, 200, 200]


def _official_mapping(win, loc_q, loc_k, size=224.0):
    """ReSim's formula: X = (r_q - l_q) x / S + l_q, x' = (X - l_k) S / (r_k - l_k) (y alike)."""
    (x0, y0, x1, y1), (lq, tq, rq, bq), (lk, tk, rk, bk) = win, loc_q, loc_k
    fx = lambda x: ((rq - lq) * x / size + lq - lk) * size / (rk - lk)  # noqa: E731
    fy = lambda y: ((bq - tq) * y / size + tq - tk) * size / (bk - tk)  # noqa: E731
    return np.array([fx(x0), fy(y0), fx(x1), fy(y1)])


@pytest.mark.parametrize("flip", [False, True])
def test_query_to_key_mapping_matches_official_formula(flip):
    cfg = cfg_of("resim_fpn.yaml", "INPUT.REGIONSSL.PHOTOMETRIC.ENABLED", "False",
                 "INPUT.REGIONSSL.FLIP_PROB", "1.0" if flip else "0.0")
    mapper = RegionSSLDatasetMapper(cfg)
    image = np.random.RandomState(0).randint(0, 255, (300, 410, 3), dtype=np.uint8)
    width = image.shape[1]
    expected_q = np.concatenate([SlidingWindows.grid(224, 224, 48, 32), SlidingWindows.grid(224, 224, 32, 24)])
    np.random.seed(1)
    checked_valid = 0
    for _ in range(20):
        views, regions, boxes, valid = mapper._views_and_regions(image)
        assert regions.groups.tolist() == [0] * 36 + [1] * 64
        np.testing.assert_allclose(boxes[0], expected_q, atol=1e-6)
        loc_q, loc_k = views[0].source_box, views[1].source_box
        if flip:  # the official code flips the image first, then crops: mirror the crop boxes
            loc_q, loc_k = (np.array([width - b[2], b[1], width - b[0], b[3]]) for b in (loc_q, loc_k))
        official = np.stack([_official_mapping(w, loc_q, loc_k) for w in expected_q])
        np.testing.assert_allclose(boxes[1], official, atol=1e-6 * 224 * 10)
        # validity: official label -1 iff x0 < 0 or y0 < 0 or x1 >= 224 or y1 >= 224
        off_valid = (official[:, :2] >= 0).all(1) & (official[:, 2:] < 224).all(1)
        away = (np.abs(official) > 1e-3).all(1) & (np.abs(official - 224) > 1e-3).all(1)
        np.testing.assert_array_equal(valid[away], off_valid[away])
        checked_valid += int(valid.sum())
    assert checked_valid > 0


# ------------------------------------------------------------------ region loss
def _trapezoid(lo, hi, n):
    """Weights of the hat-function integral over [lo, hi] for integer lo < hi (per axis), / (hi - lo)."""
    w = torch.zeros(n, dtype=torch.float64)
    for i in range(lo, hi + 1):
        w[i] = 0.5 if i in (lo, hi) else 1.0
    return w / (hi - lo)


def test_region_loss_equals_direct_computation():
    g = torch.Generator().manual_seed(0)
    qmap = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)
    kmap = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)
    stride, T = 16, 0.2
    # integer-aligned windows in pixels -> feature cells: (image, x0, y0, x1, y1)
    cells_q = [(0, 0, 0, 2, 2), (1, 1, 0, 3, 3), (1, 0, 1, 1, 3)]
    cells_k = [(0, 1, 1, 3, 3), (1, 0, 0, 2, 2), (1, 2, 1, 3, 2)]
    rois_q = torch.tensor(cells_q, dtype=torch.float64) * torch.tensor([1, stride, stride, stride, stride])
    rois_k = torch.tensor(cells_k, dtype=torch.float64) * torch.tensor([1, stride, stride, stride, stride])
    negatives = pooled_negatives(kmap, 3, gather=False)
    loss, logits, _ = region_similarity_loss(qmap, kmap, rois_q, rois_k, negatives, 1.0 / stride, T)

    def pool(fmap, n, x0, y0, x1, y1):
        wy, wx = _trapezoid(y0, y1, fmap.shape[2]), _trapezoid(x0, x1, fmap.shape[3])
        v = (fmap[n] * wy[None, :, None] * wx[None, None, :]).sum(dim=(1, 2))
        return v / v.norm()

    negs = []
    for n in range(2):
        for y in range(2):  # 4 - 3 + 1 positions, no padding
            for x in range(2):
                v = kmap[n, :, y:y + 3, x:x + 3].mean(dim=(1, 2))
                negs.append(v / v.norm())
    assert negatives.shape == (5, 8)
    terms = []
    for cq, ck in zip(cells_q, cells_k):
        q, k = pool(qmap, *cq), pool(kmap, *ck)
        row = torch.stack([q @ k] + [q @ nv for nv in negs]) / T
        terms.append(torch.logsumexp(row, 0) - row[0])
    assert logits.shape == (3, 9)
    assert float(loss) == pytest.approx(float(torch.stack(terms).mean()), abs=1e-5)


def _hand_batch(n_windows, groups, valid):
    boxes = torch.tensor([[8.0 * i, 4.0, 8.0 * i + 24, 28.0] for i in range(n_windows)])
    return {"boxes": [boxes, boxes + 3.0], "valid": torch.tensor(valid), "box_groups": torch.tensor(groups)}


@pytest.fixture(scope="module")
def fpn_model():
    torch.manual_seed(0)
    return build_model(cfg_of("quick_schedules/resim_fpn_instant_test.yaml", *SMALL))


@pytest.fixture(scope="module")
def c4_model():
    torch.manual_seed(0)
    return build_model(cfg_of("quick_schedules/resim_c4_instant_test.yaml", *SMALL))


def test_invalid_windows_are_ignored(fpn_model):
    g = torch.Generator().manual_seed(1)
    maps = lambda: {"p4": torch.randn(2, 6, 4, 4, generator=g), "p3": torch.randn(2, 6, 8, 8, generator=g)}  # noqa
    query, key = maps(), maps()
    batch = [_hand_batch(4, [0, 0, 1, 1], [True, True, True, False]), _hand_batch(3, [0, 1, 1], [True, True, True])]
    base = fpn_model.region_losses(batch, query, key)
    # an extra invalid window (here even outside the view) in each group changes nothing
    extra = dict(batch[0])
    extra["boxes"] = [torch.cat([b, torch.tensor([[-50.0, -50.0, 500.0, 500.0]])]) for b in batch[0]["boxes"]]
    extra["valid"] = torch.cat([batch[0]["valid"], torch.tensor([False])])
    extra["box_groups"] = torch.cat([batch[0]["box_groups"], torch.tensor([0])])
    again = fpn_model.region_losses([extra, batch[1]], query, key)
    for name in ("loss_region_p4", "loss_region_p3"):
        assert float(again[name]) == float(base[name])


def test_level_without_valid_window_gives_connected_zero(fpn_model):
    query = {"p4": torch.randn(1, 6, 4, 4, requires_grad=True), "p3": torch.randn(1, 6, 8, 8, requires_grad=True)}
    key = {"p4": torch.randn(1, 6, 4, 4), "p3": torch.randn(1, 6, 8, 8)}
    batch = [_hand_batch(3, [0, 1, 1], [True, False, False])]
    losses = fpn_model.region_losses(batch, query, key)
    assert float(losses["loss_region_p3"]) == 0.0 and losses["loss_region_p3"].grad_fn is not None
    sum(losses.values()).backward()
    assert query["p3"].grad is not None and float(query["p3"].grad.abs().sum()) == 0.0
    assert float(query["p4"].grad.abs().sum()) > 0


# ------------------------------------------------------------------ model forward/backward
@pytest.mark.parametrize("variant", ["fpn", "c4"])
def test_forward_backward_finite_and_gradients_only_online(variant, fpn_model, c4_model):
    model = {"fpn": fpn_model, "c4": c4_model}[variant]
    model.train()
    model.zero_grad(set_to_none=True)
    cfg = cfg_of(f"quick_schedules/resim_{variant}_instant_test.yaml", *SMALL, "INPUT.REGIONSSL.CROP_SCALE", "(0.9, 1.0)")
    batch = mapped_batch(cfg, 2, seed=0)
    levels = ["p4", "p3"] if variant == "fpn" else ["res4"]
    for g in range(len(levels)):  # large overlapping crops: every level has pairs
        assert sum(int((d["valid"] & (d["box_groups"] == g)).sum()) for d in batch) > 0
    with EventStorage():
        losses = model(batch)
    assert sorted(losses) == sorted(["loss_instance"] + [f"loss_region_{l}" for l in levels])
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in losses.values())
    sum(losses.values()).backward()
    online = dict(model.named_parameters())
    must = ["projector.0.weight"]
    if variant == "fpn":
        must += ["backbone.bottom_up.stem.conv1.weight", "backbone.bottom_up.res5.2.conv3.weight",
                 "backbone.fpn_lateral3.weight", "backbone.fpn_lateral4.weight", "backbone.fpn_lateral5.weight",
                 "backbone.fpn_output3.weight", "backbone.fpn_output4.weight"]
    else:
        must += ["backbone.stem.conv1.weight", "backbone.res4.5.conv3.weight", "roi_heads.res5.2.conv3.weight"]
    for name in must:
        assert online[name].grad is not None and float(online[name].grad.abs().sum()) > 0, name
    momentum = [p for n, p in model.named_parameters() if n.startswith("momentum.")]
    assert momentum and all(p.grad is None and not p.requires_grad for p in momentum)
    # online encoder under detector names, everything else under prefixes no detector key has
    assert {k.split(".")[0] for k in model.state_dict()} <= {"backbone", "roi_heads", "projector", "momentum", "queues"}


# ------------------------------------------------------------------ two processes
def _two_process_worker(out_dir):
    rank = comm.get_rank()
    result = {}
    # 1) negatives on hand-made maps: gathered = [rank 0's, rank 1's]; local = own only
    own = [torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(100 + r)) for r in range(2)]
    gathered = pooled_negatives(own[rank], 3, gather=True)
    local = pooled_negatives(own[rank], 3, gather=False)
    expected = torch.cat([pooled_negatives(own[r], 3, gather=False) for r in range(2)], dim=1)
    result["gathered_shape"], result["local_shape"] = list(gathered.shape), list(local.shape)
    result["gathered_is_both"] = bool(torch.allclose(gathered, expected))
    result["local_is_own"] = bool(torch.allclose(local, expected[:, rank * 18:(rank + 1) * 18]))
    # 2) the model: identical weights and buffers on both ranks, different images
    torch.manual_seed(0)
    cfg = cfg_of("quick_schedules/resim_fpn_instant_test.yaml", *SMALL, "INPUT.REGIONSSL.CROP_SCALE", "(0.9, 1.0)")
    model = build_model(cfg)
    batch = mapped_batch(cfg, 2, seed=10 + rank)
    # shuffle-BN routing: with fixed (identical) BN statistics the shuffled key features equal the
    # local ones. Checked before any training step: train-mode steps give each rank its own key
    # encoder running statistics (buffers are not synchronised, as in MoCo).
    model.momentum.eval()
    images = model.view_batch(batch, 1)
    randperm = torch.randperm
    torch.randperm = lambda n, **kw: torch.tensor([3, 0, 1, 2])  # force a cross-rank shuffle
    try:
        k_sh, maps_sh = model.key_features(images)
    finally:
        torch.randperm = randperm
    model.shuffle_bn = False
    k_loc, maps_loc = model.key_features(images)
    result["shuffle_routes_back"] = bool(
        torch.allclose(k_sh, k_loc, atol=1e-5) and all(torch.allclose(maps_sh[f], maps_loc[f], atol=1e-4) for f in maps_loc)
    )
    result["debug"] = [float((k_sh - k_loc).abs().max())] + [float((maps_sh[f] - maps_loc[f]).abs().max()) for f in maps_loc]
    model.momentum.train()
    model.shuffle_bn = True
    with EventStorage() as storage:
        losses = model(batch)
        latest = {k: v[0] for k, v in storage.latest().items()}
    result["finite"] = all(math.isfinite(float(v.detach())) for v in losses.values())
    result["num_neg_p4"], result["num_neg_p3"] = latest["regionssl/num_neg_p4"], latest["regionssl/num_neg_p3"]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.slow
def test_two_processes_gather_p4_negatives_only(tmp_path):
    launch(_two_process_worker, 2, dist_url="auto", args=(str(tmp_path),))
    for rank in range(2):
        r = json.load(open(tmp_path / f"rank{rank}.json"))
        assert r["gathered_shape"] == [4, 36] and r["local_shape"] == [4, 18]
        assert r["gathered_is_both"] and r["local_is_own"]
        assert r["finite"]
        assert r["num_neg_p4"] == 2 * 2 * 2 * 2  # 2 ranks x 2 images x (4 - 3 + 1)^2
        assert r["num_neg_p3"] == 2 * 6 * 6  # local: 2 images x (8 - 3 + 1)^2
        assert r["shuffle_routes_back"], r["debug"]
