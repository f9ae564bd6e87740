"""Pictures of mapped samples: the views side by side with matched regions drawn alike.

Used by ``tools/visualize_views.py`` and by the training hook ``ViewPairVisualizer``
(``VIS_PERIOD``), which puts the picture into TensorBoard as Detectron2's
``GeneralizedRCNN.visualize_training`` does for proposals.
"""
import colorsys
import os

import cv2
import numpy as np
import torch

from .photometric_batch import apply_photometric

__all__ = ["draw_sample"]

_GAP = 6  # px between views
_HEADER = 22  # px of caption above the views
_FONT = cv2.FONT_HERSHEY_SIMPLEX
# Saturated colours, hues spread by the golden ratio, alternating brightness (no greys: they vanish on photos).
_PALETTE = np.array(
    [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.9, 1.0 if i % 2 == 0 else 0.7) for i in range(24)]
) * 255


def _hwc(view):
    """(3, H, W) tensor/array (uint8, or float in [0, 255]) -> (H, W, 3) uint8 contiguous."""
    a = view.detach().cpu().numpy() if torch.is_tensor(view) else np.asarray(view)
    a = np.clip(a, 0, 255).astype(np.uint8) if a.dtype != np.uint8 else a
    return np.ascontiguousarray(a.transpose(1, 2, 0))


def _numpy(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def _segments(p0, p1, on, off):
    """Start/end points of the dashes of the segment p0 -> p1."""
    p0, p1 = np.asarray(p0, np.float64), np.asarray(p1, np.float64)
    length = np.hypot(*(p1 - p0))
    out, t = [], 0.0
    while t < length:
        a, b = p0 + (p1 - p0) * t / max(length, 1e-9), p0 + (p1 - p0) * min(t + on, length) / max(length, 1e-9)
        out.append((tuple(np.rint(a).astype(int)), tuple(np.rint(b).astype(int))))
        t += on + off
    return out


def _rect(img, box, color, thickness, style="solid"):
    """Draw XYXY ``box`` on ``img``: solid, dashed (invalid rows) or dotted (jittered boxes)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    color = tuple(int(c) for c in color)
    if style == "solid":
        cv2.rectangle(img, (x0, y0), (x1, y1), color, thickness, cv2.LINE_AA)
        return
    on, off = (3 * thickness + 3, 2 * thickness + 2) if style == "dashed" else (1, thickness + 2)
    for a, b in ((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0)):
        for p, q in _segments(a, b, on, off):
            cv2.line(img, p, q, color, thickness, cv2.LINE_AA)


def _label(img, text, org, color, scale):
    """Text on a filled box of ``color`` at the top-left corner ``org`` (kept inside the image)."""
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, 1)
    x = int(np.clip(org[0], 0, max(0, img.shape[1] - tw - 2)))
    y = int(np.clip(org[1], 0, max(0, img.shape[0] - th - base - 2)))
    cv2.rectangle(img, (x, y), (x + tw + 2, y + th + base + 2), tuple(int(c) for c in color), -1)
    light = np.mean(color) > 140
    cv2.putText(img, text, (x + 1, y + th + 1), _FONT, scale, (0, 0, 0) if light else (255, 255, 255), 1, cv2.LINE_AA)


def _rows_to_draw(valid, max_regions):
    """Indices of the rows to draw: every valid row, or an even subset if there are too many."""
    rows = np.flatnonzero(valid)
    if len(rows) > max_regions:
        rows = rows[np.linspace(0, len(rows) - 1, max_regions).round().astype(int)]
    return rows


def draw_sample(mapped, min_height=256, max_regions=12, show_invalid=True):
    """Draw one mapped dict (RegionSSLDatasetMapper output) as one RGB picture.

    Views are placed side by side, each scaled to a common height ``max(min_height, max H_v)``.
    Row i of the boxes gets colour i in every view, with its index as label: solid where it is
    valid and inside the view, dashed where it is invalid or only partly inside (invalid rows
    are drawn only when there are at most ``max_regions`` rows), omitted where it misses the
    view; the jittered
    query box (InsLoc) is dotted in view 0; saliency masks are overlaid in red. With more than
    ``max_regions`` valid rows (ReSim's 100 windows) an even subset is drawn.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    views = mapped["views"]
    if "photometric" in mapped:  # PHOTOMETRIC.ON_DEVICE: show the views as the model will see them
        views = [apply_photometric(v[None], p[None])[0] for v, p in zip(views, mapped["photometric"])]
    views = [_hwc(v) for v in views]
    boxes = [_numpy(b).reshape(-1, 4).astype(np.float64) for b in mapped.get("boxes", [np.zeros((0, 4))] * len(views))]
    n_rows = len(boxes[0]) if boxes else 0
    valid = _numpy(mapped["valid"]).astype(bool) if "valid" in mapped else np.ones(n_rows, bool)
    groups = _numpy(mapped["box_groups"]) if "box_groups" in mapped else np.zeros(n_rows, np.int64)
    masks = [_numpy(m) for m in mapped["masks"]] if "masks" in mapped else [None] * len(views)
    height = max(min_height, max(v.shape[0] for v in views))
    thickness = max(2, height // 110)
    font = 0.35 + 0.1 * (height // 256)
    rows = _rows_to_draw(valid, max_regions)
    invalid_rows = np.flatnonzero(~valid) if show_invalid and n_rows <= max_regions else []
    many_groups = len(np.unique(groups)) > 1

    tiles = []
    for v, img in enumerate(views):
        s = height / img.shape[0]
        tile = cv2.resize(img, (int(round(img.shape[1] * s)), height), interpolation=cv2.INTER_LINEAR)
        if masks[v] is not None:  # saliency in red, alpha proportional to the mask value
            m = cv2.resize(masks[v].astype(np.float32), (tile.shape[1], height), interpolation=cv2.INTER_LINEAR)
            alpha = 0.35 * np.clip(m, 0, 1)[..., None]
            tile = (tile * (1 - alpha) + np.array([255, 0, 0]) * alpha).astype(np.uint8)
        h0, w0 = img.shape[:2]
        b = boxes[v]
        inside = (b[:, 0] >= -1e-3) & (b[:, 1] >= -1e-3) & (b[:, 2] <= w0 + 1e-3) & (b[:, 3] <= h0 + 1e-3)
        meets = (b[:, 0] < w0) & (b[:, 1] < h0) & (b[:, 2] > 0) & (b[:, 3] > 0)
        for i in invalid_rows:
            if meets[i]:
                _rect(tile, b[i] * s, _PALETTE[i % len(_PALETTE)], max(1, thickness - 1), "dashed")
        for i in rows:
            if not meets[i]:  # e.g. a SCRL box of views 0/1 that a small multi-crop view misses
                continue
            color = _PALETTE[i % len(_PALETTE)]
            _rect(tile, b[i] * s, color, thickness if inside[i] else max(1, thickness - 1), "solid" if inside[i] else "dashed")
            text = f"{i}" + (f"/g{int(groups[i])}" if many_groups else "")
            _label(tile, text, (max(b[i][0], 0) * s + thickness, max(b[i][1], 0) * s + thickness), color, font)
        if v == 0 and "jittered_boxes" in mapped:
            for i in rows:
                _rect(tile, _numpy(mapped["jittered_boxes"])[i] * s, _PALETTE[i % len(_PALETTE)], thickness, "dotted")
        _label(tile, f"view {v} ({w0}x{h0})", (0, height), (40, 40, 40), font)
        tiles.append(tile)

    width = sum(t.shape[1] for t in tiles) + _GAP * (len(tiles) - 1)
    canvas = np.full((height + _HEADER, width, 3), 255, np.uint8)
    x = 0
    for t in tiles:
        canvas[_HEADER:, x : x + t.shape[1]] = t
        x += t.shape[1] + _GAP
    name = os.path.basename(str(mapped.get("file_name", mapped.get("image_id", ""))))
    shown = f"{len(rows)} of {int(valid.sum())} valid" if len(rows) < valid.sum() else f"{int(valid.sum())} valid"
    caption = f"{name}  {mapped.get('width', '?')}x{mapped.get('height', '?')}  regions: {n_rows} ({shown})"
    cv2.putText(canvas, caption, (4, _HEADER - 7), _FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas
