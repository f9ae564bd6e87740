"""Tests for the pure-PyTorch 1x1 Precise RoI Pooling (regionssl/modeling/prroi_pool.py)."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from regionssl.modeling.prroi_pool import prroi_pool_1x1


def _dense_reference(feat, boxes, scale, samples=800):
    """Midpoint rule with ``samples`` x ``samples`` points of the bilinear interpolant.

    The interpolant is evaluated with ``grid_sample(align_corners=True, padding_mode="zeros")``:
    feature (i, j) sits at continuous (x=j, y=i) and out-of-map corners count as zero, which is
    the official PrRoIPool convention. Independent of the closed form under test.
    """
    N, C, H, W = feat.shape
    outs = []
    for b in boxes.tolist():
        n = int(b[0])
        x1, y1, x2, y2 = (v * scale for v in b[1:])
        if x2 <= x1 or y2 <= y1:
            outs.append(feat.new_zeros(C))
            continue
        t = (torch.arange(samples, dtype=torch.float64) + 0.5) / samples
        gy, gx = torch.meshgrid(y1 + t * (y2 - y1), x1 + t * (x2 - x1), indexing="ij")
        grid = torch.stack([2 * gx / (W - 1) - 1, 2 * gy / (H - 1) - 1], dim=-1)[None]
        vals = F.grid_sample(
            feat[n : n + 1], grid.to(feat.dtype), mode="bilinear", padding_mode="zeros",
            align_corners=True,
        )
        outs.append(vals.mean(dim=(2, 3))[0])
    return torch.stack(outs)


def _random_boxes(gen, n, num_images, H, W, stride):
    """Boxes in image pixels: fractional, partly outside the map, sub-pixel and large ones."""
    cx = torch.rand(n, generator=gen, dtype=torch.float64) * (W + 2) - 1  # centres may be outside
    cy = torch.rand(n, generator=gen, dtype=torch.float64) * (H + 2) - 1
    # Log-uniform sizes between 0.05 and 6 feature cells: sub-pixel up to multi-cell.
    bw = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-3.0, 1.8, generator=gen))
    bh = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-3.0, 1.8, generator=gen))
    idx = torch.randint(0, num_images, (n,), generator=gen).double()
    boxes = torch.stack([idx, cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)
    boxes[:, 1:] *= stride
    return boxes


def test_matches_dense_numerical_integration():
    gen = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 3, 7, 9, generator=gen, dtype=torch.float64)
    boxes = _random_boxes(gen, 24, 2, 7, 9, stride=8)
    # Hand-picked edge cases (feature units x 8): fully inside, crossing the top-left and the
    # bottom-right border, entirely outside, sub-pixel, the whole map.
    extra = torch.tensor(
        [
            [0, 1.3, 2.2, 5.7, 4.9],
            [1, -3.0, -2.0, 2.5, 3.1],
            [0, 6.5, 4.2, 11.0, 9.5],
            [1, 9.5, 7.5, 12.0, 10.0],
            [1, 2.1, 3.3, 2.4, 3.5],
            [0, 0.0, 0.0, 8.0, 6.0],
        ],
        dtype=torch.float64,
    )
    extra[:, 1:] *= 8
    boxes = torch.cat([boxes, extra])
    out = prroi_pool_1x1(feat, boxes, 1 / 8)
    assert out.shape == (30, 3) and out.dtype == torch.float64
    # Midpoint error is O(h^2) at the hat kinks: ~1e-6 at 800 samples per axis.
    torch.testing.assert_close(out, _dense_reference(feat, boxes, 1 / 8), atol=1e-5, rtol=0)
    # A box entirely outside the map (beyond the 1-cell zero ramp) pools to exactly 0.
    assert torch.all(out[-3] == 0)


def test_degenerate_boxes_give_zeros():
    feat = torch.rand(1, 4, 5, 5)
    boxes = torch.tensor(
        [[0, 2.0, 1.0, 2.0, 3.0], [0, 1.0, 2.0, 3.0, 2.0], [0, 3.0, 3.0, 1.0, 1.0]]
    )  # zero width, zero height, inverted
    assert torch.equal(prroi_pool_1x1(feat, boxes, 1.0), torch.zeros(3, 4))


def test_constant_map_gives_constant_inside():
    feat = torch.full((2, 3, 6, 8), 2.5)
    # Any box inside [0, W-1] x [0, H-1] sees the constant interpolant everywhere.
    boxes = torch.tensor(
        [[0, 0.0, 0.0, 7.0, 5.0], [1, 0.3, 1.7, 0.4, 1.71], [1, 2.25, 0.5, 6.0, 4.75]]
    )
    torch.testing.assert_close(prroi_pool_1x1(feat, boxes, 1.0), torch.full((3, 3), 2.5))
    # Beyond the last node the interpolant ramps to zero: mean over [W-1, W] is half the value.
    half = torch.tensor([[0, 7.0, 0.0, 8.0, 5.0]])
    torch.testing.assert_close(prroi_pool_1x1(feat, half, 1.0), torch.full((1, 3), 1.25))


def test_single_node_weights_by_hand():
    # One non-zero feature F[0, 0, 2, 3] = 1 (x=3, y=2). Box [2.5, 4] x [2, 2.5] (area 0.75):
    # int_{2.5}^{4} hat(x - 3) dx = 0.375 + 0.5 = 0.875; int_{2}^{2.5} hat(y - 2) dy = 0.375.
    feat = torch.zeros(1, 1, 5, 6, dtype=torch.float64)
    feat[0, 0, 2, 3] = 1.0
    box = torch.tensor([[0, 2.5, 2.0, 4.0, 2.5]], dtype=torch.float64)
    torch.testing.assert_close(
        prroi_pool_1x1(feat, box, 1.0), torch.tensor([[0.875 * 0.375 / 0.75]], dtype=torch.float64)
    )


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    feat = torch.randn(2, 2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor(
        [[0, 0.3, 0.2, 3.1, 2.7], [1, -1.0, 1.5, 2.0, 5.0], [1, 2.2, 1.1, 2.6, 1.9],
         [0, 1, 1, 1, 1]],
        dtype=torch.float64,
    )
    assert torch.autograd.gradcheck(lambda f: prroi_pool_1x1(f, boxes, 1.0), (feat,))


def test_roi_align_unaligned_approximates_it():
    """``roi_align(aligned=False)`` uses the same grid (no half-cell shift) and, for boxes inside
    ``[0, W-1] x [0, H-1]`` at least one cell wide, converges to PrRoIPool as sampling_ratio grows.
    ``aligned=True`` samples half a cell off and does not."""
    gen = torch.Generator().manual_seed(2)
    feat = torch.rand(2, 16, 14, 14, generator=gen)
    n = 100
    x1 = torch.rand(n, generator=gen) * 10
    y1 = torch.rand(n, generator=gen) * 10
    x2 = (x1 + 1 + torch.rand(n, generator=gen) * 3).clamp(max=13)
    y2 = (y1 + 1 + torch.rand(n, generator=gen) * 3).clamp(max=13)
    idx = torch.randint(0, 2, (n,), generator=gen).float()
    boxes = torch.stack([idx, x1 * 16, y1 * 16, x2 * 16, y2 * 16], dim=1)
    ours = prroi_pool_1x1(feat, boxes, 1 / 16)
    ra = roi_align(feat, boxes, 1, 1 / 16, sampling_ratio=64, aligned=False)[:, :, 0, 0]
    # 64x64 midpoint samples: observed max error 5e-4; tolerance 2e-3.
    torch.testing.assert_close(ours, ra, atol=2e-3, rtol=0)
    shifted = roi_align(feat, boxes, 1, 1 / 16, sampling_ratio=64, aligned=True)[:, :, 0, 0]
    assert (ours - shifted).abs().max() > 0.05


def test_autocast_runs_in_float32():
    gen = torch.Generator().manual_seed(3)
    feat = torch.randn(1, 8, 10, 10, generator=gen)
    boxes = torch.tensor([[0, 1.0, 2.0, 30.0, 25.0], [0, 5.5, 6.5, 9.0, 12.0]])
    expected = prroi_pool_1x1(feat, boxes, 1 / 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prroi_pool_1x1(feat, boxes, 1 / 4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_empty_and_device():
    feat = torch.rand(1, 3, 4, 4)
    assert prroi_pool_1x1(feat, torch.zeros(0, 5), 1.0).shape == (0, 3)
    if torch.cuda.is_available():
        boxes = torch.tensor([[0, 0.5, 0.5, 2.5, 3.0]])
        torch.testing.assert_close(
            prroi_pool_1x1(feat.cuda(), boxes.cuda(), 1.0).cpu(), prroi_pool_1x1(feat, boxes, 1.0)
        )


@pytest.mark.parametrize("num_boxes", [1000])
def test_large_batch_memory_sane(num_boxes):
    # 1000 boxes on 56x56 maps with 64 channels: runs as per-image matmuls (no R*C*H*W tensor).
    gen = torch.Generator().manual_seed(4)
    feat = torch.randn(4, 64, 56, 56, generator=gen)
    xy = torch.rand(num_boxes, 2, generator=gen) * 600
    wh = torch.rand(num_boxes, 2, generator=gen) * 300
    idx = torch.randint(0, 4, (num_boxes, 1), generator=gen).float()
    boxes = torch.cat([idx, xy, xy + wh], dim=1)
    out = prroi_pool_1x1(feat, boxes, 1 / 16)
    assert out.shape == (num_boxes, 64) and torch.isfinite(out).all()
    torch.testing.assert_close(out[:5], _dense_reference(feat.double(), boxes[:5].double(), 1 / 16,
                                                         samples=400).float(), atol=1e-4, rtol=0)
