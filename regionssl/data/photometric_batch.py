"""Photometric augmentation of a batch of views on the model's device (``INPUT.REGIONSSL.PHOTOMETRIC.ON_DEVICE``).

The mapper still *draws* every view's photometric ops (the same ``Augmentation``s, the same
``np.random`` stream as :mod:`regionssl.data.photometric`), but instead of applying them it packs the
drawn parameters into a (P,) float32 vector (:func:`encode_photometric`) and ships the uint8 view
with geometry only. The model then calls :func:`apply_photometric` on the (N, 3, H, W) uint8 batch of
a view, before normalisation. The ops are plain torch code, so the same function runs on CPU
tensors (tests, CPU training) and on GPUs; each op rounds to uint8 where the mapper's does, so the
two paths agree within 1 grey level for fixed parameters (tests/data/test_photometric_batch.py).

Parameter vector (P = 15):

====  =============================================================================
0     semantics: 0 torchvision, 1 DeepMind (BYOL)
1     blur first (ReSim's order): 1, else 0
2     colour jitter applied: 1/0
3-6   jitter order: op index per position (0 brightness, 1 contrast, 2 saturation, 3 hue)
7-10  brightness, contrast, saturation factors, hue turns (identity if not drawn)
11    grayscale: 1/0
12    Gaussian blur sigma (0: no blur)
13    SCRL resize-blur factor (0: none)
14    solarize threshold (256: none)
====  =============================================================================
"""
import numpy as np
import torch
import torch.nn.functional as F

from .photometric import (
    ColorJitterTransform, GaussianBlurTransform, GrayscaleTransform, ResizeBlurTransform, SolarizeTransform,
)

__all__ = ["NUM_PARAMS", "encode_photometric", "apply_photometric"]

NUM_PARAMS = 15
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's luma weights, as photometric.py


def encode_photometric(transforms, deepmind=False, blur_first=False):
    """(P,) float32 parameters of one view's drawn photometric transforms (NoOps ignored)."""
    p = np.array([float(deepmind), float(blur_first), 0, 0, 1, 2, 3, 1, 1, 1, 0, 0, 0, 0, 256], dtype=np.float32)
    if deepmind:
        p[7] = 0.0  # DeepMind's brightness is additive
    for t in transforms:
        if isinstance(t, ColorJitterTransform):
            p[2], p[3:7] = 1, t.order
            for i, v in enumerate((t.brightness, t.contrast, t.saturation, t.hue)):
                if v is not None:
                    p[7 + i] = v
        elif isinstance(t, GrayscaleTransform):
            p[11] = 1
        elif isinstance(t, GaussianBlurTransform):
            p[12] = t.sigma
        elif isinstance(t, ResizeBlurTransform):
            p[13] = t.factor
        elif isinstance(t, SolarizeTransform):
            p[14] = t.threshold
    return torch.from_numpy(p)


def _round(x):
    """Float in any range -> uint8 levels as float: rounded half to even and saturated, as the
    mapper's lookup tables (``np.rint``) and OpenCV's casts."""
    return torch.round(x).clamp_(0, 255)


def _luma(x):
    w = x.new_tensor(_GRAY).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _hue(x, delta):
    """Turn the HSV hue of (n, 3, H, W) RGB (any scale) by ``delta`` (n,) turns; V and S kept."""
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    c = v - x.min(1)[0]
    safe = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(v == r, torch.remainder((g - b) / safe, 6.0),
                    torch.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = torch.remainder(h + 6.0 * delta.view(-1, 1, 1), 6.0)
    n = x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)  # HSV -> RGB: V - C clamp(min(k, 4 - k), 0, 1)
    k = torch.remainder(n + h[:, None], 6.0)
    return v[:, None] - c[:, None] * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def _jitter_op(x, op, f, deepmind):
    """One colour-jitter op on (n, 3, H, W) float, per-image factors f (n,)."""
    f4 = f.view(-1, 1, 1, 1)
    if deepmind:  # x in [0, 1], clipped after every op, rounded once after the jitter
        if op == 0:
            return (x + f4).clamp(0, 1)
        if op == 1:
            m = x.mean((2, 3), keepdim=True)
            return (f4 * (x - m) + m).clamp(0, 1)
        if op == 2:
            v = x.max(1, keepdim=True)[0]
            spread = v - x.min(1, keepdim=True)[0]
            ratio = torch.where(spread > 0, torch.minimum(f4, v / spread.clamp_min(1e-12)), torch.ones_like(spread))
            return (v - (v - x) * ratio).clamp(0, 1)
        return _hue(x, f).clamp(0, 1)
    if op == 0:
        return _round(f4 * x)
    if op == 1:
        m = _luma(x).mean((2, 3), keepdim=True)
        return _round(f4 * x + (1 - f4) * m)
    if op == 2:
        return _round(f4 * x + (1 - f4) * _luma(x))
    return torch.floor(_hue(x, f) + 0.5)  # the mapper's hue: + 0.5 and truncate; stays in [0, 255]


def _colour(x, p):
    jit = torch.nonzero(p[:, 2] > 0).flatten().tolist()
    if jit:
        deepmind = bool(p[0, 0] > 0)
        y = x[jit] / 255.0 if deepmind else x[jit]
        order = p[jit, 3:7].long()
        for pos in range(4):
            for op in range(4):
                rows = torch.nonzero(order[:, pos] == op).flatten()
                if len(rows):
                    y[rows] = _jitter_op(y[rows], op, p[jit, 7 + op][rows], deepmind)
        x[jit] = _round(y * 255.0) if deepmind else y
    gray = torch.nonzero(p[:, 11] > 0).flatten().tolist()
    if gray:
        x[gray] = _round(_luma(x[gray])).expand(-1, 3, -1, -1)
    return x


def _gaussian_blur(x, sigma):
    """Per-image sigma (n,): separable Gaussian, kernel 2 ceil(4 sigma) + 1, reflect-101 borders."""
    radius = int(np.ceil(4.0 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = sigma.view(-1, 1)
    w = torch.exp(-0.5 * (t / s) ** 2) * (t.abs() <= torch.ceil(4.0 * s))  # each image's own support
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (3n, K), one kernel per channel
    n, c, h, wd = x.shape
    y = F.pad(x.reshape(1, n * c, h, wd), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, w.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, w.view(n * c, 1, -1, 1), groups=n * c)
    return _round(y.view(n, c, h, wd))


def _pil_resize(x, h, w):
    """PIL's bicubic resize (antialiased kernel): horizontal pass, rounded to uint8, then vertical."""
    def resize(y, size):
        return _round(F.interpolate(y, size=size, mode="bicubic", antialias=True, align_corners=False))

    return resize(resize(x, (x.shape[-2], w)), (h, w))


def _resize_blur(x, factor):
    """SCRL's resize blur: down by ``factor`` and back up."""
    h, w = x.shape[-2:]
    return _pil_resize(_pil_resize(x, max(1, int(h // factor)), max(1, int(w // factor))), h, w)


def _blur(x, p):
    rows = torch.nonzero(p[:, 12] > 0).flatten().tolist()
    if rows:
        x[rows] = _gaussian_blur(x[rows], p[rows, 12])
    for factor in sorted(set(p[:, 13].tolist()) - {0.0}):
        rows = torch.nonzero(p[:, 13] == factor).flatten().tolist()
        x[rows] = _resize_blur(x[rows], factor)
    return x


def apply_photometric(images, params):
    """Apply each view's drawn photometric ops, batched.

    Args:
        images: (N, 3, H, W) uint8 RGB on any device.
        params: (N, P) float32 from :func:`encode_photometric` (any device).
    Returns:
        (N, 3, H, W) uint8 on the images' device.
    """
    p = params.to(images.device, torch.float32)
    x = images.float()
    if p.numel() == 0:
        return images
    blur_first = bool(p[0, 1] > 0)
    x = _colour(_blur(x, p), p) if blur_first else _blur(_colour(x, p), p)
    thr = p[:, 14].view(-1, 1, 1, 1)
    x = torch.where(x >= thr, 255.0 - x, x)
    return x.to(torch.uint8)
