"""The one renderer of medexplain: the PNG figures of ``medexplain explain`` (:func:`figure`, written by
:func:`medexplain.io.write_png_overlay`) and every panel of ``report.html`` (:mod:`medexplain.report`) are
drawn by the functions here, so a map looks the same in both. Built on matplotlib: its colormaps
(``RdBu_r`` for signed maps, a truncated ``hot`` for non-negative ones), its figure layout and colour bar.
Reorientation to RAS uses nibabel's orientation tools. Only display scaling is applied; nothing is written
back to the maps.

- **Colour scale** (:func:`map_scale`): robust, the 99th percentile of |map| over the whole map (volume),
  so one hot voxel of a gradient map does not turn the rest invisible; values beyond it saturate. When that
  percentile is 0 (a map non-zero on under 1 % of its voxels) the maximum is used instead. The limit and
  what it is are printed on the colour bar. Signed maps (any value < 0) use the diverging map centred at 0
  (blue negative, red positive); non-negative maps the sequential one.
- **Overlay** (:func:`overlay`): colour blended over the image with an opacity growing with |value|
  (``alpha * min(|v| / limit, 1) ** 0.7``), so a zero map leaves the image as it is. The image is shown in
  colour when it has 3 channels, otherwise channel 0 in grey, windowed between its 0.5th and 99.5th
  percentiles (over the whole volume, so slices are comparable). Maps with several channels are summed.
- **Volumes**: reoriented to the closest RAS axes (:func:`to_ras`: flips and axis swaps, no resampling) and
  shown as three planes through the map's peak (or a chosen voxel), in the radiological convention:
  axial and coronal with the patient's right on the viewer's left (labels R/L, A/P, S/I at the edges),
  sagittal with anterior on the left, superior up; voxel aspect from the spacing.
- **Figures** are at least :data:`MIN_PX` pixels on the long side of every image panel (nearest-neighbour
  upscaling of small images, antialiased downscaling of large ones), with a title (method, target, model),
  a subtitle and a colour bar.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = ["ALPHA", "PERCENTILE", "MIN_PX", "PLANES", "Scale", "map_scale", "image_window", "image_rgb", "overlay",
           "colormap", "to_ras", "ras_index", "plane", "plane_spacing", "crosshair", "peak_index", "edge_labels",
           "figure", "colorbar_stops"]

#: Opacity of a map value at (or beyond) the colour limit.
ALPHA = 0.7
#: The colour limit is this percentile of |map|.
PERCENTILE = 99.0
#: Every image panel of a figure is at least this many pixels on its long side.
MIN_PX = 512
DIVERGING, SEQUENTIAL = "RdBu_r", "hot"

#: The three planes of a RAS volume ``(C, X, Y, Z)``: the axis they cut, the axis shown along the rows
#: (reversed: A or S up) and along the columns (reversed: R, or A for sagittal, on the left), and the edge
#: labels (left, right, top, bottom).
PLANES = {"axial": {"axis": 2, "rows": 1, "cols": 0, "labels": ("R", "L", "A", "P")},
          "coronal": {"axis": 1, "rows": 2, "cols": 0, "labels": ("R", "L", "S", "I")},
          "sagittal": {"axis": 0, "rows": 2, "cols": 1, "labels": ("A", "P", "S", "I")}}


def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


@functools.lru_cache(maxsize=None)
def colormap(signed: bool):
    """The matplotlib colormap of a signed (``RdBu_r``) or non-negative map (``hot`` from dark red to
    light yellow: its black and white ends dropped, which would read as "no colour" on an image)."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    if signed:
        return colormaps[DIVERGING]
    return ListedColormap(colormaps[SEQUENTIAL](np.linspace(0.2, 0.88, 256)), name="hot_overlay")


@functools.lru_cache(maxsize=None)
def _lut(signed: bool) -> np.ndarray:
    """The colormap at 256 levels, RGB float32 in 0..255 (what matplotlib's own lookup table holds)."""
    return (colormap(signed)(np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)


@dataclass(frozen=True)
class Scale:
    """A map's display scale: ``limit`` is the value drawn at full colour (and opacity)."""

    signed: bool
    limit: float
    abs_max: float
    percentile: float | None        # the percentile of |map| ``limit`` is; None when it is the maximum

    @property
    def vmin(self) -> float:
        return -self.limit if self.signed else 0.0

    def text(self) -> str:
        """What the colour bar says about the scale."""
        if self.abs_max == 0:
            return "the map is zero everywhere"
        pm = "\u00b1" if self.signed else ""
        what = (f"the {self.percentile:g}th percentile of |map|" if self.percentile is not None
                else "the maximum of |map|")
        return f"colours saturate at {pm}{self.limit:.3g} = {what} (max {self.abs_max:.3g})"


def map_scale(amap, percentile: float = PERCENTILE, signed: bool | None = None) -> Scale:
    """The display :class:`Scale` of a map (any shape; channel maps should be summed first)."""
    m = _np(amap).astype(np.float64)
    finite = m[np.isfinite(m)]
    a = np.abs(finite)
    abs_max = float(a.max()) if a.size else 0.0
    signed = bool((finite < 0).any()) if signed is None else bool(signed)
    limit = float(np.percentile(a, percentile)) if a.size else 0.0
    pct: float | None = float(percentile)
    if limit <= 0:
        limit, pct = abs_max, None
    if limit <= 0:
        limit = 1.0
    return Scale(signed, limit, abs_max, pct)


def image_window(img) -> tuple[float, float]:
    """Display window of an image: its 0.5th and 99.5th percentiles (min and max for a 3-channel image,
    whose colours are kept)."""
    img = _np(img).astype(np.float64)
    if img.ndim >= 3 and img.shape[0] == 3:
        return float(img.min()), float(img.max())
    lo, hi = np.percentile(img, [0.5, 99.5])
    return float(lo), float(hi)


def image_rgb(img, window: tuple[float, float] | None = None) -> np.ndarray:
    """A 2D image ``(C, H, W)`` (C = 3: RGB, in colour; otherwise channel 0 in grey) or ``(H, W)`` ->
    uint8 RGB ``(H, W, 3)``, windowed by ``window`` (default :func:`image_window`)."""
    img = _np(img)
    img = img[None] if img.ndim == 2 else img
    img = img if img.shape[0] == 3 else img[:1]
    lo, hi = image_window(img) if window is None else window
    u = np.clip((img.astype(np.float32) - np.float32(lo)) * np.float32(255 / max(hi - lo, 1e-12)), 0, 255)
    u = np.rint(u).astype(np.uint8).transpose(1, 2, 0)
    return np.repeat(u, 3, axis=2) if u.shape[2] == 1 else np.ascontiguousarray(u)


def overlay(base_rgb: np.ndarray, amap, scale: Scale | None = None, signed: bool | None = None,
            alpha: float = ALPHA) -> np.ndarray:
    """Blend a 2D map ``(H, W)`` over an RGB image ``(H, W, 3)`` uint8 (kept in colour). ``scale``:
    the map's :class:`Scale` (default :func:`map_scale` of this map: pass the volume's for slices);
    ``signed`` overrides its colormap choice."""
    amap = _np(amap)
    scale = map_scale(amap, signed=signed) if scale is None else scale
    is_signed = scale.signed if signed is None else bool(signed)
    r = np.clip(np.nan_to_num(amap.astype(np.float32) / np.float32(scale.limit)), -1, 1)
    v = (r + 1) / 2 if is_signed else r.clip(0, 1)
    col = _lut(is_signed)[np.rint(v * 255).astype(np.intp)]                # the colormap sampled at 256 levels
    a = (np.abs(r) ** np.float32(0.7) * np.float32(alpha))[..., None]
    out = base_rgb.astype(np.float32) * (1 - a) + col * a
    return np.rint(out).astype(np.uint8)


def colorbar_stops(scale: Scale, n: int = 11) -> list[tuple[float, tuple[int, int, int]]]:
    """``n`` (fraction along the bar, RGB) stops of the scale's colormap, for the report's CSS colour bars."""
    cm = colormap(scale.signed)
    return [(float(f), tuple(int(round(255 * c)) for c in cm(f)[:3])) for f in np.linspace(0, 1, n)]


# --- volumes -----------------------------------------------------------------------------------------
def to_ras(vol, affine) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A volume ``(C, *spatial3)`` on ``affine`` reoriented to the closest RAS axes (nibabel
    ``io_orientation`` / ``apply_orientation``): returns ``(vol_ras, affine_ras, ornt)``."""
    import nibabel.orientations as nio
    vol = _np(vol)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    ornt = nio.io_orientation(affine)
    moved = nio.apply_orientation(np.moveaxis(vol, 0, -1), ornt)
    aff = affine @ nio.inv_ornt_aff(ornt, vol.shape[1:])
    return np.ascontiguousarray(np.moveaxis(moved, -1, 0)), aff, ornt


def ras_index(index, ornt, shape) -> tuple[int, int, int]:
    """A voxel index of the original volume (spatial ``shape``) in the reoriented one."""
    out = [0, 0, 0]
    for ax, (new_ax, flip) in enumerate(np.asarray(ornt, dtype=int)):
        out[new_ax] = shape[ax] - 1 - int(index[ax]) if flip < 0 else int(index[ax])
    return tuple(out)


def plane(vol_ras, name: str, index: int) -> np.ndarray:
    """Plane ``name`` of a RAS volume ``(C, X, Y, Z)`` at ``index`` along its axis, as displayed:
    ``(C, rows, cols)`` with A (axial) or S up, and R (axial, coronal) or A (sagittal) on the left."""
    p = PLANES[name]
    v = np.take(_np(vol_ras), int(index), axis=1 + p["axis"])          # (C, a, b): the two remaining axes
    kept = [ax for ax in range(3) if ax != p["axis"]]
    v = v.transpose(0, 1 + kept.index(p["rows"]), 1 + kept.index(p["cols"]))
    return v[:, ::-1, ::-1]


def plane_spacing(spacing_ras, name: str) -> tuple[float, float]:
    """(row, column) pixel size in mm of a plane of a RAS volume with voxel ``spacing_ras``."""
    p = PLANES[name]
    return float(spacing_ras[p["rows"]]), float(spacing_ras[p["cols"]])


def crosshair(point_ras, dims_ras, name: str) -> tuple[int, int]:
    """(row, column) of the voxel ``point_ras`` in the displayed plane ``name``."""
    p = PLANES[name]
    return dims_ras[p["rows"]] - 1 - point_ras[p["rows"]], dims_ras[p["cols"]] - 1 - point_ras[p["cols"]]


def peak_index(amap) -> tuple[int, ...]:
    """The voxel of largest |map| (channels summed), C order first maximum."""
    m = np.abs(_np(amap).astype(np.float64))
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(m)), m.shape))


def edge_labels(affine) -> tuple[str, str, str, str]:
    """(left, right, top, bottom) patient-direction letters of a 2D image shown as stored (rows down, columns
    right), from its affine (tensor indices to RAS)."""
    import nibabel as nib
    codes = nib.aff2axcodes(np.asarray(affine, dtype=np.float64))
    opposite = dict(zip("RASLPI", "LPIRAS"))
    return opposite[codes[1]], codes[1], opposite[codes[0]], codes[0]


# --- figures -----------------------------------------------------------------------------------------
def _panels_2d(img, m, affine, labelled):
    sr, sc = (1.0, 1.0) if affine is None else tuple(float(np.linalg.norm(np.asarray(affine)[:3, i])) for i in (0, 1))
    labels = edge_labels(affine) if affine is not None and labelled else None
    return [{"name": "", "image": img, "map": m, "spacing": (sr, sc), "labels": labels, "cross": None}], None


def _panels_3d(img, m, affine, point, labelled):
    vol, aff, ornt = to_ras(np.concatenate([img, m[None]]), affine)
    img_r, m_r = vol[:-1], vol[-1]
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    dims = m_r.shape
    p = ras_index(point, ornt, m.shape) if point is not None else peak_index(m_r)
    panels = []
    for name, info in PLANES.items():
        idx = p[info["axis"]]
        panels.append({"name": f"{name}  ({'xyz'[info['axis']]} = {idx})", "image": plane(img_r, name, idx),
                       "map": plane(m_r[None], name, idx)[0], "spacing": plane_spacing(spacing, name),
                       "labels": info["labels"] if labelled else None, "cross": crosshair(p, dims, name)})
    ras = aff @ np.array([*p, 1.0])
    where = (f"planes through {'the chosen voxel' if point is not None else 'the peak of |map|'}: "
             f"RAS ({ras[0]:.1f}, {ras[1]:.1f}, {ras[2]:.1f}) mm")
    import nibabel.affines as naf
    obl = float(np.degrees(np.max(naf.obliquity(np.asarray(aff)))))
    if not labelled:
        where += "; no patient orientation in the file: planes of the voxel axes"
    elif obl > 1:
        where += f"; oblique scan shown on its closest RAS axes (up to {obl:.0f}\u00b0 off)"
    return panels, where


def figure(image, amap, *, affine=None, oriented: bool = True, title: str = "", subtitle: str = "",
           label: str = "map", point=None, signed: bool | None = None, percentile: float = PERCENTILE,
           alpha: float = ALPHA, min_px: int = MIN_PX, dpi: int = 100):
    """A matplotlib :class:`~matplotlib.figure.Figure` of ``amap`` ``(C_or_1, *spatial)`` (channels summed)
    over ``image`` ``(C, *spatial)``: one panel for 2D (shown as stored), axial / coronal / sagittal panels
    through ``point`` (a voxel index, default the peak of |map|) for 3D, a colour bar, the scale stated under
    the panels, ``title`` and ``subtitle``. ``affine`` (tensor indices to RAS mm) sets the voxel aspect and,
    when ``oriented`` (the file really places the image in the patient), the R/L, A/P, S/I edge labels.
    No pyplot: nothing global is touched."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    img, m = _np(image).astype(np.float64), _np(amap).astype(np.float64)
    nd = img.ndim - 1
    if m.ndim == nd + 1:
        channels = m.shape[0]
        m = m.sum(0)
    else:
        channels = 1
    if m.shape != img.shape[1:]:
        raise ValueError(f"map spatial shape {m.shape} differs from the image's {img.shape[1:]}")
    if img.shape[0] not in (1, 3):
        img = img[:1]
    scale = map_scale(m, percentile, signed)
    window = image_window(img)
    labelled = oriented and affine is not None
    panels, where = _panels_2d(img, m, affine, labelled) if nd == 2 else _panels_3d(img, m, affine, point, labelled)

    # layout in pixels: every panel in one mm scale, the largest panel's long side >= min_px
    mm = [(p["map"].shape[0] * p["spacing"][0], p["map"].shape[1] * p["spacing"][1]) for p in panels]
    native = max(max(p["map"].shape) for p in panels)
    long_px = max(min_px, min(1024, native)) if nd == 2 else min_px
    s = long_px / max(max(h, w) for h, w in mm)
    sizes = [(h * s, w * s) for h, w in mm]
    bottom, left, gap, cbar_gap, cbar_w, right = 52, 40, 44, 30, 22, 140
    panel_h = max(h for h, _ in sizes)
    width = left + sum(w for _, w in sizes) + gap * (len(sizes) - 1) + cbar_gap + cbar_w + right
    import textwrap
    sub_lines = [line for part in (subtitle, where) if part
                 for line in textwrap.wrap(part, max(40, int((width - left - 20) / 6.3)))]
    top = 50 + 17 * len(sub_lines) + (26 if nd == 3 else 12)        # title, subtitle lines, plane names
    height = top + panel_h + bottom
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    x = left
    for p, (h, w) in zip(panels, sizes):
        ax = fig.add_axes([x / width, (bottom + (panel_h - h) / 2) / height, w / width, h / height])
        rgb = overlay(image_rgb(p["image"], window), p["map"], scale, alpha=alpha)
        interp = "nearest" if max(w, h) >= max(rgb.shape[:2]) else "antialiased"
        ax.imshow(rgb, interpolation=interp, aspect="auto")
        ax.set_axis_off()
        if p["name"]:
            ax.set_title(p["name"], fontsize=11, pad=6)
        if p["cross"] is not None:
            r, c = p["cross"]
            kw = {"color": "#00e5ff", "lw": 0.9, "alpha": 0.75}
            gap_r, gap_c = max(1.5, 0.04 * rgb.shape[0]), max(1.5, 0.04 * rgb.shape[1])
            ax.plot([-0.5, c - gap_c], [r, r], **kw)
            ax.plot([c + gap_c, rgb.shape[1] - 0.5], [r, r], **kw)
            ax.plot([c, c], [-0.5, r - gap_r], **kw)
            ax.plot([c, c], [r + gap_r, rgb.shape[0] - 0.5], **kw)
            ax.set_xlim(-0.5, rgb.shape[1] - 0.5)
            ax.set_ylim(rgb.shape[0] - 0.5, -0.5)
        if p["labels"] is not None:
            box = {"facecolor": "black", "alpha": 0.55, "pad": 2, "edgecolor": "none"}
            kw = {"transform": ax.transAxes, "color": "white", "fontsize": 13, "fontweight": "bold", "bbox": box}
            lft, rgt, tp, bt = p["labels"]
            ax.text(0.015, 0.5, lft, ha="left", va="center", **kw)
            ax.text(0.985, 0.5, rgt, ha="right", va="center", **kw)
            ax.text(0.5, 0.985, tp, ha="center", va="top", **kw)
            ax.text(0.5, 0.015, bt, ha="center", va="bottom", **kw)
        x += w + gap
    x += cbar_gap - gap
    cax = fig.add_axes([x / width, bottom / height, cbar_w / width, panel_h / height])
    norm = Normalize(scale.vmin, scale.limit)
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=colormap(scale.signed)), cax=cax)
    ticks = [-scale.limit, 0.0, scale.limit] if scale.signed else [0.0, scale.limit / 2, scale.limit]
    cb.set_ticks(ticks)
    cb.set_ticklabels([f"{t:.3g}" for t in ticks])
    cb.ax.tick_params(labelsize=10)
    what = f"{label}{' (signed)' if scale.signed else ''}" + (f", sum of {channels} channel maps" if channels > 1 else "")
    cb.set_label(what, fontsize=10)
    fig.text(left / width, 14 / height, f"Colour scale: {scale.text()}.", fontsize=10, va="bottom", ha="left")
    fig.text(left / width, 1 - 12 / height, title, fontsize=15, fontweight="bold", va="top", ha="left")
    for i, line in enumerate(sub_lines):
        fig.text(left / width, 1 - (44 + 17 * i) / height, line, fontsize=10, va="top", ha="left", color="#333333")
    return fig
