"""CVSA: saliency sources, Saliency Swap geometry, the alignment loss, the model, stage-2 loading."""
import logging
import math

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

import regionssl  # noqa: F401
from regionssl.checkpoint import FormatTag, RegionSSLCheckpointer, select_encoder
from regionssl.data.augmentations import INTERPOLATIONS
from regionssl.data.mapper import RegionSSLDatasetMapper
from regionssl.data.saliency import (
    MaskFileSaliency, SaliencySwap, SpectralResidualSaliency, most_salient_window, spectral_residual_saliency,
    window_side,
)
from regionssl.data.demo_images import demo_image_files
from regionssl.modeling.losses import cross_view_attention, saliency_alignment

from conftest import qs_cfg as cfg_of


def blob_image(h, w, cx, cy, seed=0, sigma=12.0):
    """Grey noise with one bright Gaussian blob centred at (cx, cy)."""
    y, x = np.mgrid[:h, :w]
    rng = np.random.default_rng(seed)
    img = 50 + rng.normal(0, 8, (h, w)) + 170 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
    return np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def bump(h, w, cx, cy, s=25.0):
    y, x = np.mgrid[:h, :w]
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s)).astype(np.float32)


# ----------------------------------------------------------------------------- saliency sources
@pytest.mark.parametrize("shape,centre", [((120, 160), (110, 45)), ((200, 240), (60, 140)), ((150, 150), (40, 40))])
def test_spectral_residual_window_contains_the_blob(shape, centre):
    h, w = shape
    for img in (blob_image(h, w, *centre), np.full((h, w, 3), 60, np.uint8)):
        if img.std() == 0:  # flat image with a bright square: exact spectral zeros must not break it
            img[centre[1] - 15 : centre[1] + 15, centre[0] - 15 : centre[0] + 15] = 230
        sal = spectral_residual_saliency(img)
        assert sal.shape == (h, w) and sal.dtype == np.float32
        assert sal.min() >= 0 and sal.max() <= 1 and sal.max() > 0.9
        side = window_side(h, w, 0.5)
        x0, y0 = most_salient_window(sal, side)
        assert x0 <= centre[0] < x0 + side and y0 <= centre[1] < y0 + side
    assert not spectral_residual_saliency(np.full((40, 50, 3), 7, np.uint8)).any()  # constant image -> 0


def test_most_salient_window_equals_brute_force():
    rng = np.random.default_rng(1)
    sal = rng.random((23, 31)).astype(np.float32)
    for side in (1, 5, 23):
        sums = np.array([[sal[y : y + side, x : x + side].sum() for x in range(32 - side)] for y in range(24 - side)])
        y, x = np.unravel_index(sums.argmax(), sums.shape)
        assert most_salient_window(sal, side) == (x, y)


def test_mask_files_source_and_missing_mask_fallback(tmp_path, caplog):
    img_dir, mask_dir = tmp_path / "images", tmp_path / "masks"
    img_dir.mkdir(), mask_dir.mkdir()
    a, b = blob_image(64, 80, 20, 20), blob_image(64, 80, 60, 40, seed=1)
    cv2.imwrite(str(img_dir / "a.jpg"), a), cv2.imwrite(str(img_dir / "b.jpg"), b)
    mask = np.zeros((32, 40), np.uint8)
    mask[20:30, 25:35] = 255
    cv2.imwrite(str(mask_dir / "a.png"), mask)  # half size: resized to the image
    source = MaskFileSaliency(str(mask_dir), SpectralResidualSaliency())
    got = source(a, str(img_dir / "a.jpg"))
    assert got.shape == (64, 80) and got[45, 60] == 1.0 and got[5, 5] == 0.0
    with caplog.at_level(logging.WARNING):
        fallback = source(b, str(img_dir / "b.jpg"))
        source(b, str(img_dir / "b.jpg"))
    np.testing.assert_array_equal(fallback, spectral_residual_saliency(b))
    warnings = [r.getMessage() for r in caplog.records if "b.png" in r.getMessage()]
    assert len(warnings) == 1 and str(mask_dir / "b.png") in warnings[0]  # names the file, once
    # through the mapper: the generator gets file names, a missing mask never stops the loader
    cfg = cfg_of("cvsa_instant_test.yaml", "INPUT.REGIONSSL.SALIENCY.SOURCE", "mask_files",
                 "INPUT.REGIONSSL.SALIENCY.MASK_DIR", str(mask_dir), "INPUT.REGIONSSL.CROP_SIZE", "32")
    dicts = [{"file_name": str(img_dir / n)} for n in ("a.jpg", "b.jpg")]
    mapper = RegionSSLDatasetMapper(cfg, dataset_dicts=dicts)
    outs = [mapper(d) for d in dicts]
    for out in outs:
        assert [tuple(m.shape) for m in out["masks"]] == [(32, 32), (32, 32)]
    # a.jpg's views carry grey levels of its mask file (the mapper passed the file name)
    levels = set(np.unique(np.round(got * 255)).tolist())
    assert all(set(np.unique(np.round(m.numpy() * 255)).tolist()) <= levels for m in outs[0]["masks"])
    with pytest.raises(FileNotFoundError, match="MASK_DIR"):
        MaskFileSaliency(str(tmp_path / "nope"), None)


# ----------------------------------------------------------------------------- Saliency Swap
def test_saliency_swap_pastes_the_salient_window():
    src = blob_image(120, 160, 110, 45)
    bg = blob_image(150, 150, 40, 100, seed=2)
    gen = SaliencySwap(saliency=SpectralResidualSaliency(), window_fraction=0.5, crop_size=150, scale=(1.0, 1.0),
                       ratio=(1.0, 1.0), interp=Image.BILINEAR, flip_prob=0.0, background_source=lambda: bg)
    sal_src, (xs, ys, a, _) = gen.salient_window(src)
    _, (xb, yb, b, _) = gen.salient_window(bg)
    assert xs <= 110 < xs + a and ys <= 45 < ys + a and xb <= 40 < xb + b and yb <= 100 < yb + b
    views = gen(src)
    patch = np.asarray(Image.fromarray(src[ys : ys + a, xs : xs + a]).resize((b, b), Image.BILINEAR))
    for v in views:  # scale 1, ratio 1 on a square background, no flip: the view is the composite
        np.testing.assert_array_equal(v.image[yb : yb + b, xb : xb + b], patch)
        outside = np.ones((150, 150), bool)
        outside[yb : yb + b, xb : xb + b] = False
        np.testing.assert_array_equal(v.image[outside], bg[outside])
        np.testing.assert_array_equal(v.source_box, [xs, ys, xs + a, ys + a])
        np.testing.assert_allclose(v.transform.apply_box(v.source_box[None])[0], [xb, yb, xb + b, yb + b])
        sal8 = np.round(sal_src[ys : ys + a, xs : xs + a] * 255).astype(np.uint8)
        near = np.asarray(Image.fromarray(sal8).resize((b, b), Image.NEAREST))  # pixel-centre nearest
        np.testing.assert_array_equal(v.mask[yb : yb + b, xb : xb + b] * 255, near)
        assert not v.mask[outside].any()  # 0 off the pasted window


@pytest.mark.parametrize("interp", ["nearest", "bilinear"])
def test_view_geometry_on_a_coordinate_image(interp):
    """Pixels encode their own source (x, y); the view's inverse transform must find them again."""
    H, W, S = 200, 240, 96
    y, x = np.mgrid[:H, :W]
    src = np.stack([x % 256, y % 256, (x // 256) * 16 + y // 256], -1).astype(np.uint8)
    bg = np.random.default_rng(0).integers(0, 255, (180, 220, 3), dtype=np.uint8)
    sal_src = bump(H, W, 160, 80)

    def saliency(img, file_name=None):
        return sal_src if img.shape[:2] == (H, W) else bump(img.shape[0], img.shape[1], 60, 110)

    gen = SaliencySwap(saliency=saliency, window_fraction=0.5, crop_size=S, scale=(0.2, 1.0), ratio=(0.75, 4 / 3),
                       interp=INTERPOLATIONS[interp], flip_prob=0.5, background_source=lambda: bg)
    np.random.seed(0)
    checked = 0
    for _ in range(8):
        for v in gen(src):
            box = v.transform.apply_box(v.source_box[None])[0]  # pasted window in view pixels
            lo = np.ceil(np.maximum(box[:2], 0) + 2).astype(int)
            hi = np.floor(np.minimum(box[2:], S) - 2).astype(int)
            if (hi <= lo).any():
                continue
            us, vs = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]))
            us, vs = us.ravel(), vs.ravel()
            centres = np.stack([us + 0.5, vs + 0.5], 1).astype(np.float64)
            orig = v.transform.inverse().apply_coords(centres.copy())  # continuous source coordinates
            pix = v.image[vs, us].astype(np.int64)
            decoded = np.stack([pix[:, 0] + 256 * (pix[:, 2] // 16), pix[:, 1] + 256 * (pix[:, 2] % 16)], 1) + 0.5
            # one source pixel, widened by half an upsampled pixel of the window resize (nearest)
            zoom = max(1.0, (v.source_box[2] - v.source_box[0]) / v.transform.transforms[1].new_w)  # window resize
            assert np.abs(decoded - orig).max() <= 0.5 * (1 + zoom) + 1e-6
            # the mask is the source saliency moved with the view
            sal8 = np.round(sal_src * 255).astype(np.uint8)
            ix = np.clip(orig.astype(int), 0, [W - 1, H - 1])
            assert np.abs(v.mask[vs, us] - sal8[ix[:, 1], ix[:, 0]] / 255).max() < 0.05  # bump slope <= 0.025 / px
            if interp == "nearest":  # image and mask pick the same source pixel
                dx = (decoded - 0.5).astype(int)
                np.testing.assert_array_equal(v.mask[vs, us] * 255, sal8[dx[:, 1], dx[:, 0]])
            np.testing.assert_array_equal(v.mask * 255, v.transform.apply_segmentation(sal8))
            off = np.ones((S, S), bool)
            x0, y0, x1, y1 = int(box[0]) - 1, int(box[1]) - 1, int(np.ceil(box[2])) + 1, int(np.ceil(box[3])) + 1
            off[max(y0, 0) : y1, max(x0, 0) : x1] = False  # the pasted window, widened by 1 px
            assert not v.mask[off].any()
            checked += 1
    assert checked >= 8


def test_mapper_makes_masks_and_pasted_boxes_on_demo_photos():
    cfg = cfg_of("cvsa_instant_test.yaml", "INPUT.REGIONSSL.REGION_SAMPLER", "PastedBox")
    dicts = [{"file_name": f} for f in demo_image_files()]
    mapper = RegionSSLDatasetMapper(cfg, dataset_dicts=dicts)
    np.random.seed(0)
    out = mapper(dicts[0])
    assert [tuple(v.shape) for v in out["views"]] == [(3, 96, 96)] * 2
    assert [tuple(m.shape) for m in out["masks"]] == [(96, 96)] * 2
    for box, m in zip(out["boxes"], out["masks"]):
        assert m.sum() > 0  # the crop keeps the pasted window in view
        x0, y0, x1, y1 = box[0].tolist()
        inside = torch.zeros_like(m, dtype=torch.bool)
        inside[max(int(y0), 0) : int(math.ceil(y1)), max(int(x0), 0) : int(math.ceil(x1))] = True
        assert m[~inside].sum() == 0


# ----------------------------------------------------------------------------- loss
def test_alignment_loss_is_minimal_at_the_mask_and_matches_a_direct_computation():
    torch.manual_seed(0)
    mask = torch.rand(3, 9) * (torch.rand(3, 9) > 0.4)
    mask[2] = 0  # no saliency in this view: skipped
    target = mask / mask.sum(1, keepdim=True).clamp_min(1e-12)
    target[2] = torch.full((9,), 1 / 9)
    loss, valid = saliency_alignment(target, mask)
    assert valid.tolist() == [True, True, False] and abs(loss.item()) < 1e-6
    for _ in range(20):
        other = (target.log() + 0.5 * torch.randn(3, 9)).softmax(1)
        assert saliency_alignment(other, mask)[0] > loss
    # known tensors: m = (.5, .5, 0, 0), a = (.4, .4, .1, .1) -> KL = ln(1.25)
    loss, _ = saliency_alignment(torch.tensor([[0.4, 0.4, 0.1, 0.1]]), torch.tensor([[2.0, 2.0, 0.0, 0.0]]))
    assert loss.item() == pytest.approx(math.log(1.25), abs=1e-6)
    # no view with saliency: zero loss, graph kept
    a = torch.full((2, 4), 0.25, requires_grad=True)
    zero, _ = saliency_alignment(a, torch.zeros(2, 4))
    zero.backward()
    assert zero.item() == 0 and a.grad is not None


def test_cross_view_attention_equals_a_direct_computation():
    torch.manual_seed(0)
    q, k, t = torch.randn(2, 5, 2, 3), torch.randn(2, 5, 3, 2), 0.1
    a_q, a_k = cross_view_attention(q, k, t)
    for n in range(2):
        qn = q[n].flatten(1) / q[n].flatten(1).norm(dim=0)  # (D, 6)
        kn = k[n].flatten(1) / k[n].flatten(1).norm(dim=0)
        s = torch.tensor([[float(qn[:, i] @ kn[:, j]) / t for j in range(6)] for i in range(6)])
        key_map = torch.stack([torch.exp(s[i]) / torch.exp(s[i]).sum() for i in range(6)]).mean(0)
        query_map = torch.stack([torch.exp(s[:, j]) / torch.exp(s[:, j]).sum() for j in range(6)]).mean(0)
        torch.testing.assert_close(a_k[n], key_map, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a_q[n], query_map, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a_q.sum(1), torch.ones(2))


# ----------------------------------------------------------------------------- model
def _batch(cfg, n=2):
    dicts = [{"file_name": f} for f in demo_image_files()]
    mapper = RegionSSLDatasetMapper(cfg, dataset_dicts=dicts)
    np.random.seed(1)
    return [mapper(d) for d in dicts[:n]]


def test_cvsa_forward_backward_on_cpu():
    torch.manual_seed(0)
    cfg = cfg_of("cvsa_instant_test.yaml")
    model = build_model(cfg)
    model.train()
    losses = model(_batch(cfg))
    assert set(losses) == {"loss_byol", "loss_align"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_align"] > 0
    sum(losses.values()).backward()
    for name in ("conv_projector", "conv_predictor", "backbone", "projector", "predictor"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
    assert all(p.grad is None for p in model.momentum.parameters())
    assert set(model.momentum.keys()) == {"backbone", "projector", "conv_projector"}
    with pytest.raises(ValueError, match="SaliencySwap"):
        model([{k: v for k, v in d.items() if k != "masks"} for d in _batch(cfg)])


def test_stage2_loads_a_byol_checkpoint(tmp_path):
    byol = build_model(cfg_of("byol_instant_test.yaml"))
    with torch.no_grad():  # make every tensor distinguishable from a fresh init
        for i, t in enumerate(byol.state_dict().values()):
            if t.dtype.is_floating_point:
                t.add_(0.01 * (i + 1))
    RegionSSLCheckpointer(byol, str(tmp_path), regionssl=FormatTag("BYOL")).save("model_final")
    cfg = cfg_of("cvsa_instant_test.yaml")
    cvsa = build_model(cfg)
    conv_before = {k: v.clone() for k, v in cvsa.state_dict().items() if "conv_p" in k}
    stage2 = RegionSSLCheckpointer(cvsa, str(tmp_path / "stage2"))
    stage2.resume_or_load(str(tmp_path / "model_final.pth"), resume=False)
    got, want = cvsa.state_dict(), byol.state_dict()
    assert set(want) <= set(got)
    assert any(k.startswith("momentum.projector.") for k in want) and any(k.startswith("predictor.") for k in want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    for key, value in conv_before.items():  # not in the BYOL checkpoint: untouched
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)
    # transfer to a detector takes the online trunk only, never the conv heads or the target
    assert sorted({k.split(".")[0] for k in select_encoder(got)}) == ["backbone"]
