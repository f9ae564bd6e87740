"""Precise RoI Pooling with a 1x1 output, in pure PyTorch (CPU and GPU).

PrRoIPool (Jiang et al., "Acquisition of Localization Confidence for Accurate Object Detection",
ECCV'18) pools a box as the *exact integral* of the bilinearly interpolated feature map divided by
the box area. ReSim (Xiao et al., ICCV'21) pools its sliding windows with a 1x1 PrRoIPool, but the
official op (``vacancy/PreciseRoIPooling``) is a CUDA-only JIT extension (docs/methods/resim.md).

For a 1x1 output the integral factorises per axis. With the hat basis
``phi_k(x) = max(0, 1 - |x - k|)`` the interpolant is
``f(x, y) = sum_{i,j} F[i, j] phi_i(y) phi_j(x)``, so for a box ``[x1, x2] x [y1, y2]`` in
feature units::

    out = (1 / area) * sum_{i,j} Wy[i] * Wx[j] * F[:, i, j],   Wx[j] = int_{x1}^{x2} phi_j(x) dx

where each hat integral is a sum of two linear pieces (length times midpoint value). Nodes
outside ``0..H-1`` / ``0..W-1`` are simply absent from the sum, i.e. they count as zero, exactly
like the official ``PrRoIPoolingGetData``.
"""
import torch

__all__ = ["prroi_pool_1x1"]


def _axis_weights(lo, hi, size):
    """Integrals of the ``size`` hat functions over ``[lo, hi]``.

    The hat ``phi_k`` is linear on ``[k-1, k]`` and on ``[k, k+1]``; the integral of a linear
    piece over a sub-interval is its length times the value at its midpoint. This form has no
    cancellation (unlike differencing the antiderivative), so sub-pixel boxes stay accurate in fp32.

    Args:
        lo, hi: (R,) interval ends in feature units (hi >= lo).
        size (int): number of grid nodes along the axis.
    Returns:
        (R, size) tensor, entry [r, k] = int_{lo_r}^{hi_r} phi_k(x) dx.
    """
    k = torch.arange(size, device=lo.device, dtype=lo.dtype)  # (size,)
    lo, hi = lo[:, None], hi[:, None]  # (R, 1)
    # Rising piece on [k-1, k]: phi_k(x) = x - (k - 1).
    a, b = torch.maximum(lo, k - 1), torch.minimum(hi, k)
    rising = (b - a).clamp(min=0) * (0.5 * (a + b) - (k - 1))
    # Falling piece on [k, k+1]: phi_k(x) = (k + 1) - x.
    a, b = torch.maximum(lo, k), torch.minimum(hi, k + 1)
    falling = (b - a).clamp(min=0) * ((k + 1) - 0.5 * (a + b))
    return rising + falling  # (R, size)


def prroi_pool_1x1(features, boxes, spatial_scale, rows_per_image=None):
    """Average of the bilinearly interpolated feature map over each box (PrRoIPool, 1x1 output).

    Grid convention (identical to the official ``PrRoIPoolingForward`` CUDA kernel): box
    coordinates are multiplied by ``spatial_scale`` and *not* shifted, so the feature at integer
    grid index (i, j) sits at continuous coordinate (x=j, y=i); with stride 16 the feature (i, j)
    describes image pixel (16 j, 16 i). This equals torchvision ``roi_align(aligned=False)``'s
    sampling grid, not ``aligned=True`` (which shifts by half a feature cell). Values outside the
    map are zero (the interpolant decays linearly to 0 between index W-1 and W, and between -1
    and 0), while the box area still counts in the denominator. A box with zero or negative width
    or height returns zeros, as the official kernel does.

    Args:
        features (Tensor): (N, C, H, W) feature map F.
        boxes (Tensor): (R, 5) rows ``[batch_idx, x1, y1, x2, y2]`` in image pixels (the
            torchvision ``roi_align`` format). Treated as constants (no gradient w.r.t. boxes).
        spatial_scale (float): feature units per image pixel, e.g. 1/16 for P4.
        rows_per_image (list[int] or None): if the rows are grouped by image in order (image 0's
            rows first, ...), the number of rows of each image (host ints): no host read at all.
            None: the grouping is found from the batch indices with one host read.

    Returns:
        Tensor (R, C): pooled features. Differentiable w.r.t. ``features``. Computed in at least
        float32 with autocast disabled; the output is float64 for float64 input, else float32.
    """
    assert features.dim() == 4, f"features must be (N, C, H, W), got {tuple(features.shape)}"
    assert boxes.dim() == 2 and boxes.shape[1] == 5, "boxes must be (R, 5) [b, x1, y1, x2, y2]"
    N, C, H, W = features.shape
    R = boxes.shape[0]
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=features.device.type, enabled=False):
        feats = features.to(dtype)
        rois = boxes.detach().to(device=features.device, dtype=dtype)
        x1, y1, x2, y2 = (rois[:, i] * spatial_scale for i in range(1, 5))
        # Official kernel: roi size clamped at 0, then win_size == 0 -> output 0. Clamping the
        # upper end to the lower one keeps inverted boxes at weight 0, not negative weights.
        x2, y2 = torch.maximum(x2, x1), torch.maximum(y2, y1)
        area = (x2 - x1) * (y2 - y1)  # (R,)
        wx = _axis_weights(x1, x2, W)  # (R, W)
        wy = _axis_weights(y1, y2, H)  # (R, H)
        inv_area = torch.where(area > 0, 1.0 / area.clamp(min=torch.finfo(dtype).tiny), 0.0)
        wy = wy * inv_area[:, None]

        if rows_per_image is None:  # group the rows by image: one host read for the counts
            batch_idx = rois[:, 0].long()
            counts = torch.zeros(N, dtype=torch.long, device=batch_idx.device)
            counts = counts.index_add_(0, batch_idx, torch.ones_like(batch_idx)).tolist()  # raises if out of range
            order = torch.argsort(batch_idx, stable=True)
            out = _per_image(feats, wy[order], wx[order], counts)
            return torch.empty_like(out).index_copy(0, order, out)
        assert len(rows_per_image) == N and sum(rows_per_image) == R, (
            f"rows_per_image {list(rows_per_image)} does not match {N} images and {R} boxes"
        )
        return _per_image(feats, wy, wx, rows_per_image)


def _per_image(feats, wy, wx, rows_per_image):
    """(R, C) pooled rows, given rows grouped by image (``rows_per_image[n]`` rows of image n).

    One matmul per image: the outer product Wy[r] Wx[r]^T, flattened to (R_n, H*W), times
    F_n^T (H*W, C). Memory is R*H*W (1000 boxes x 56^2 = 3.1M floats), never R*C*H*W. Python
    slices of known sizes: no device sync.
    """
    N, C, H, W = feats.shape
    out, start = [], 0
    for n, r in enumerate(rows_per_image):
        if r:
            w2d = (wy[start : start + r, :, None] * wx[start : start + r, None, :]).reshape(r, H * W)  # (R_n, H*W)
            out.append(w2d @ feats[n].reshape(C, H * W).t())  # (R_n, C)
        start += r
    return torch.cat(out) if out else feats.new_zeros((0, C))
