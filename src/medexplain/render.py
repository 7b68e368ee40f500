"""The one colour scheme of every picture medexplain draws: the PNG overlays of ``medexplain explain``
(:func:`medexplain.io.write_png_overlay`) and the panels of ``report.html`` (:mod:`medexplain.report`).

Images are shown grey (or RGB for 3 channels), scaled between their 0.5th and 99.5th percentiles (over the
whole volume for 3D, so slices are comparable). A map with negative values is drawn with a diverging
blue-white-red colormap scaled symmetrically by max |map| (blue negative, red positive); a non-negative map
with a sequential black-red-yellow colormap scaled by its maximum. Overlay opacity grows with |value|
(``alpha * |v / scale| ** 0.7``), so a zero map leaves the image as it is. Only display scaling is applied;
nothing is written back to the maps. NumPy only.
"""
from __future__ import annotations

import numpy as np

__all__ = ["DIVERGING", "SEQUENTIAL", "ALPHA", "colormap", "image_rgb", "slice_rgb", "overlay", "representative_slices"]

#: Colormap anchors, RGB in [0, 1]: diverging (blue, white, red; ColorBrewer RdBu) and sequential ("hot").
DIVERGING = np.array([[5, 48, 97], [67, 147, 195], [247, 247, 247], [214, 96, 77], [103, 0, 31]], float) / 255
SEQUENTIAL = np.array([[0, 0, 0], [120, 0, 0], [230, 40, 0], [255, 200, 0], [255, 255, 210]], float) / 255
#: Opacity of a map value at full scale.
ALPHA = 0.85


def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def colormap(v: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Piecewise-linear colormap: v in [0, 1] -> RGB in [0, 1] (one more trailing axis)."""
    pos = np.clip(v, 0, 1) * (len(anchors) - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, len(anchors) - 2)
    f = (pos - lo)[..., None]
    return anchors[lo] * (1 - f) + anchors[lo + 1] * f


def _scaled_rgb(u: np.ndarray) -> np.ndarray:
    rgb = np.repeat(u[:1], 3, 0) if u.shape[0] != 3 else u
    return (rgb.transpose(1, 2, 0) * 255).round().astype(np.uint8)


def image_rgb(img) -> np.ndarray:
    """A 2D image ``(C, H, W)`` (C = 3: RGB; otherwise channel 0 in grey) -> uint8 RGB ``(H, W, 3)``,
    percentile-scaled."""
    img = _np(img).astype(np.float64)
    lo, hi = np.percentile(img, [0.5, 99.5])
    return _scaled_rgb(np.clip((img - lo) / max(hi - lo, 1e-12), 0, 1))


def slice_rgb(vol, s: int) -> np.ndarray:
    """Slice ``s`` (first spatial axis) of a volume ``(C, D, H, W)`` as uint8 RGB, scaled by the whole
    volume's percentiles (stable brightness across slices)."""
    vol = _np(vol).astype(np.float64)
    lo, hi = np.percentile(vol, [0.5, 99.5])
    return _scaled_rgb(np.clip((vol[:, s] - lo) / max(hi - lo, 1e-12), 0, 1))


def overlay(base_rgb: np.ndarray, amap, scale: float | None = None, signed: bool | None = None,
            alpha: float = ALPHA) -> np.ndarray:
    """Blend a 2D map ``(H, W)`` over an RGB image (shown grey). ``signed`` (default: the map has negatives)
    picks the diverging colormap; ``scale`` is the value shown at full colour (default max |map|);
    ``alpha`` the opacity at full scale."""
    amap = _np(amap).astype(np.float64)
    signed = bool((amap < 0).any()) if signed is None else signed
    scale = float(np.abs(amap).max()) if scale is None else float(scale)
    r = amap / scale if scale > 0 else np.zeros_like(amap)
    col = colormap((r + 1) / 2, DIVERGING) if signed else colormap(np.clip(r, 0, 1), SEQUENTIAL)
    a = (np.clip(np.abs(r), 0, 1) ** 0.7 * alpha)[..., None]
    grey = base_rgb.astype(np.float64).mean(-1, keepdims=True) / 255
    return ((grey * (1 - a) + col * a) * 255).round().astype(np.uint8)


def representative_slices(amap, n: int = 3) -> list[int]:
    """For a 3D map ``(C, D, H, W)``: the slice with the most |map| and the quartile slices around it."""
    m = np.abs(_np(amap)).sum(0)
    d = m.shape[0]
    peak = int(m.reshape(d, -1).sum(1).argmax())
    picks = dict.fromkeys([peak] + [int(q * (d - 1)) for q in (0.25, 0.5, 0.75)])  # peak first, no repeats
    return sorted(list(picks)[:max(n, 1)])
