"""The one renderer of medexplain: the PNG figures of ``medexplain explain`` (:func:`figure`, written by
:func:`medexplain.io.write_png_overlay`) and every panel of ``report.html`` (:mod:`medexplain.io.report`) are
drawn by the functions here, so a map looks the same in both. Built on matplotlib: its colormaps
(``RdBu_r`` for signed maps, a truncated ``hot`` for non-negative ones), its figure layout and colour bar.
Reorientation to RAS uses nibabel's orientation tools. Only display scaling is applied; nothing is written
back to the maps.

- **Colour scale** (:func:`map_scale`): robust, the 99th percentile of |map| over the whole map (volume),
  so one hot voxel of a gradient map does not turn the rest invisible; values beyond it saturate. When that
  percentile is 0 (a map non-zero on under 1 % of its voxels) it is taken over the map's non-zero voxels
  (the maximum for a single one). The limit and
  what it is are printed on the colour bar. Signed maps (any value < 0) use the diverging map centred at 0
  (blue negative, red positive); non-negative maps the sequential one.
- **Overlay** (:func:`overlay`): colour blended over the image with an opacity growing with |value|
  (``alpha * min(|v| / limit, 1) ** 0.7``), so a zero map leaves the image as it is. The image is shown in
  colour when it has 3 channels, otherwise channel 0 in grey, windowed between its 0.5th and 99.5th
  percentiles (over the whole volume, so slices are comparable). Maps with several channels are summed.
- **Volumes**: reoriented to the closest RAS axes (:func:`to_ras`: flips and axis swaps, no resampling) and
  shown as three planes (or the ``planes`` asked for) through the centre of the explained region (the
  target region or the lesion, ``region=``; its outline drawn in green), else through the map's peak (or a
  chosen voxel), in the radiological convention: axial and coronal with the patient's right on the
  viewer's left (labels R/L, A/P, S/I at the edges), sagittal with anterior on the left, superior up;
  voxel aspect from the spacing. When the planes go through the region and the peak of |map| lies outside
  them, its projection is marked (a cyan ring) and its position stated under the title.
- **2D edge letters**: from the affine when the file places the image in the patient (DICOM with
  ImageOrientationPatient, NIfTI); else from DICOM's PatientOrientation (``("L", "F")``: rows run to the
  patient's left, columns to the feet; H/F shown as S/I), else none.
- **Figures** are at least :data:`MIN_PX` pixels on the long side of every image panel (nearest-neighbour
  upscaling of small images); larger images are reduced by blocks (:func:`block_reduce`): the image by the
  block mean, the map by the value of largest |map| in each block, so a few strong pixels of a sparse map
  stay visible at any size (the caption says so). Title (method, target, model), a subtitle and a colour bar.
- **Options** (:func:`figure`, ``--figure key=value`` on the command line, :func:`figure_options`): ``alpha``
  (opacity), ``percentile`` (colour limit), ``cmap`` (any matplotlib colormap name), ``planes``, ``point``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = ["ALPHA", "PERCENTILE", "MIN_PX", "MAX_PX", "PLANES", "Scale", "map_scale", "image_window", "image_rgb",
           "overlay", "colormap", "to_ras", "ras_index", "plane", "plane_spacing", "crosshair", "peak_index",
           "region_centre", "edge_labels", "patient_orientation_labels", "block_reduce", "figure", "figure_options",
           "colorbar_stops", "instance_figures"]

#: Opacity of a map value at (or beyond) the colour limit.
ALPHA = 0.7
#: The colour limit is this percentile of |map|.
PERCENTILE = 99.0
#: Every image panel of a figure is at least this many pixels on its long side.
MIN_PX = 512
#: ... and a 2D panel at most this many (larger images are reduced by blocks, :func:`block_reduce`).
MAX_PX = 1024
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
def colormap(signed: bool, name: str | None = None):
    """The matplotlib colormap of a signed (``RdBu_r``) or non-negative map (``hot`` from dark red to
    light yellow: its black and white ends dropped, which would read as "no colour" on an image), or the
    colormap ``name`` (any of matplotlib's)."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    if name is not None:
        if name not in colormaps:
            from medexplain.errors import OptionError
            raise OptionError(f"unknown colour map {name!r}; e.g. viridis, magma, inferno, jet, RdBu_r, hot")
        return colormaps[name]
    if signed:
        return colormaps[DIVERGING]
    return ListedColormap(colormaps[SEQUENTIAL](np.linspace(0.2, 0.88, 256)), name="hot_overlay")


@functools.lru_cache(maxsize=None)
def _lut(signed: bool, name: str | None = None) -> np.ndarray:
    """The colormap at 256 levels, RGB float32 in 0..255 (what matplotlib's own lookup table holds)."""
    return (colormap(signed, name)(np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)


@dataclass(frozen=True)
class Scale:
    """A map's display scale: ``limit`` is the value drawn at full colour (and opacity)."""

    signed: bool
    limit: float
    abs_max: float
    percentile: float | None        # the percentile of |map| ``limit`` is; None when it is the maximum
    of_nonzero: bool = False        # the percentile is over the map's non-zero voxels (a sparse map)

    @property
    def vmin(self) -> float:
        return -self.limit if self.signed else 0.0

    def text(self) -> str:
        """What the colour bar says about the scale."""
        if self.abs_max == 0:
            return "the map is zero everywhere"
        pm = "\u00b1" if self.signed else ""
        what = (f"the {self.percentile:g}th percentile of |map|{' over its non-zero pixels' if self.of_nonzero else ''}"
                if self.percentile is not None else "the maximum of |map|")
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
    nonzero = False
    if limit <= 0 and (a > 0).sum() > 1:
        # a sparse map (non-zero on under 1 - percentile of the voxels, e.g. the saliency of a max-pooled network
        # on a full-size radiograph): the same percentile over its support, so its bulk is not drawn transparent
        limit, nonzero = float(np.percentile(a[a > 0], percentile)), True
    if limit <= 0:
        limit, pct, nonzero = abs_max, None, False
    if limit <= 0:
        limit = 1.0
    return Scale(signed, limit, abs_max, pct, nonzero)


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
            alpha: float = ALPHA, cmap: str | None = None) -> np.ndarray:
    """Blend a 2D map ``(H, W)`` over an RGB image ``(H, W, 3)`` uint8 (kept in colour). ``scale``:
    the map's :class:`Scale` (default :func:`map_scale` of this map: pass the volume's for slices);
    ``signed`` overrides its colormap choice; ``cmap`` names another matplotlib colormap."""
    amap = _np(amap)
    scale = map_scale(amap, signed=signed) if scale is None else scale
    is_signed = scale.signed if signed is None else bool(signed)
    r = np.clip(np.nan_to_num(amap.astype(np.float32) / np.float32(scale.limit)), -1, 1)
    v = (r + 1) / 2 if is_signed else r.clip(0, 1)
    col = _lut(is_signed, cmap)[np.rint(v * 255).astype(np.intp)]                # the colormap sampled at 256 levels
    a = (np.abs(r) ** np.float32(0.7) * np.float32(alpha))[..., None]
    out = base_rgb.astype(np.float32) * (1 - a) + col * a
    return np.rint(out).astype(np.uint8)


def colorbar_stops(scale: Scale, n: int = 11, cmap: str | None = None) -> list[tuple[float, tuple[int, int, int]]]:
    """``n`` (fraction along the bar, RGB) stops of the scale's colormap, for the report's CSS colour bars."""
    cm = colormap(scale.signed, cmap)
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


def region_centre(region) -> tuple[int, ...] | None:
    """The centre of a region (bool, any dims): of its largest connected part when it has several (a predicted
    region of two lesions has its centre of mass between them), the voxel nearest that part's centre of mass
    that lies in it (the centre itself when it does; a ring's centre is not in it); None for an empty region."""
    from scipy import ndimage
    r = _np(region).astype(bool)
    if not r.any():
        return None
    labels, n = ndimage.label(r)
    if n > 1:
        r = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    idx = np.argwhere(r)
    com = idx.mean(0)
    c = tuple(int(v) for v in np.rint(com))
    if r[c]:
        return c
    return tuple(int(v) for v in idx[np.argmin(((idx - com) ** 2).sum(1))])


def patient_orientation_labels(orientation) -> tuple[str, str, str, str] | None:
    """(left, right, top, bottom) edge letters of a 2D image shown as stored, from DICOM's PatientOrientation
    (0020,0020): its first value is the patient direction of the rows (towards the right edge), its second that
    of the columns (towards the bottom), e.g. ``("L", "F")`` for a PA chest radiograph. H/F are shown as S/I,
    as the volume figures label them. None when missing or not two direction strings."""
    if orientation is None or len(orientation) != 2:
        return None
    letters = {"H": "S", "F": "I"}
    opposite = dict(zip("RLAPSI", "LRPAIS"))
    try:
        row, col = ("".join(letters.get(ch, ch) for ch in str(v).upper()) for v in orientation)
        if not row or not col or set(row + col) - set(opposite):
            return None
        return "".join(opposite[c] for c in row), row, "".join(opposite[c] for c in col), col
    except (TypeError, ValueError):
        return None


def block_reduce(img, amap, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Display reduction of a 2D panel by ``factor`` x ``factor`` blocks: the image ``(C, H, W)`` by the block
    mean, the map ``(H, W)`` by the value of largest |map| in each block (its sign kept), so a sparse map's
    strong pixels survive any reduction. Edges are padded (image: edge values; map: zeros)."""
    img, m = _np(img), _np(amap)
    if factor <= 1:
        return img, m
    h, w = m.shape
    ph, pw = -h % factor, -w % factor
    img = np.pad(img, ((0, 0), (0, ph), (0, pw)), mode="edge")
    m = np.pad(m, ((0, ph), (0, pw)))
    hb, wb = img.shape[1] // factor, img.shape[2] // factor
    img_r = img.reshape(img.shape[0], hb, factor, wb, factor).mean(axis=(2, 4))
    blocks = m.reshape(hb, factor, wb, factor).transpose(0, 2, 1, 3).reshape(hb, wb, factor * factor)
    pick = np.nan_to_num(np.abs(blocks), nan=-1.0).argmax(-1)
    return img_r, np.take_along_axis(blocks, pick[..., None], -1)[..., 0]


def edge_labels(affine) -> tuple[str, str, str, str]:
    """(left, right, top, bottom) patient-direction letters of a 2D image shown as stored (rows down, columns
    right), from its affine (tensor indices to RAS)."""
    import nibabel as nib
    codes = nib.aff2axcodes(np.asarray(affine, dtype=np.float64))
    opposite = dict(zip("RASLPI", "LPIRAS"))
    return opposite[codes[1]], codes[1], opposite[codes[0]], codes[0]


# --- figures -----------------------------------------------------------------------------------------
def _panels_2d(img, m, affine, labelled, region, patient_orientation):
    sr, sc = (1.0, 1.0) if affine is None else tuple(float(np.linalg.norm(np.asarray(affine)[:3, i])) for i in (0, 1))
    labels = edge_labels(affine) if affine is not None and labelled else patient_orientation_labels(patient_orientation)
    where = "edge letters from the file's PatientOrientation" if labels is not None and not labelled else None
    return [{"name": "", "image": img, "map": m, "spacing": (sr, sc), "labels": labels, "cross": None,
             "region": region, "peak": None}], where


def _panels_3d(img, m, affine, point, labelled, region, planes):
    stack = [img, m[None]] + ([region[None].astype(np.float64)] if region is not None else [])
    vol, aff, ornt = to_ras(np.concatenate(stack), affine)
    img_r, m_r = vol[:img.shape[0]], vol[img.shape[0]]
    reg_r = vol[img.shape[0] + 1] > 0.5 if region is not None else None
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    dims = m_r.shape
    peak = peak_index(m_r)
    centre = region_centre(reg_r) if reg_r is not None and point is None else None
    p = ras_index(point, ornt, m.shape) if point is not None else centre if centre is not None else peak
    panels = []
    for name in planes:
        info = PLANES[name]
        idx = p[info["axis"]]
        elsewhere = centre is not None and peak[info["axis"]] != idx
        panels.append({"name": f"{name}  ({'xyz'[info['axis']]} = {idx})", "image": plane(img_r, name, idx),
                       "map": plane(m_r[None], name, idx)[0], "spacing": plane_spacing(spacing, name),
                       "labels": info["labels"] if labelled else None, "cross": crosshair(p, dims, name),
                       "region": plane(reg_r[None], name, idx)[0] if reg_r is not None else None,
                       "peak": crosshair(peak, dims, name) if elsewhere else None})
    ras = aff @ np.array([*p, 1.0])
    what = ("the chosen voxel" if point is not None else
            "the centre of the explained region (green outline)" if centre is not None else "the peak of |map|")
    where = f"planes through {what}: RAS ({ras[0]:.1f}, {ras[1]:.1f}, {ras[2]:.1f}) mm"
    off = [name for name, pn in zip(planes, panels) if pn["peak"] is not None]
    if off:
        pr = aff @ np.array([*peak, 1.0])
        where += (f"; the peak of |map|, at RAS ({pr[0]:.1f}, {pr[1]:.1f}, {pr[2]:.1f}) mm, lies outside the "
                  f"{' and '.join(off)} plane{'s' if len(off) > 1 else ''} (cyan ring: its projection)")
    import nibabel.affines as naf
    obl = float(np.degrees(np.max(naf.obliquity(np.asarray(aff)))))
    if not labelled:
        where += "; no patient orientation in the file: planes of the voxel axes"
    elif obl > 1:
        where += f"; oblique scan shown on its closest RAS axes (up to {obl:.0f}\u00b0 off)"
    return panels, where


#: The options of :func:`figure` a user sets (``--figure key=value``), with their parsers.
FIGURE_OPTIONS = {"alpha": float, "percentile": float, "cmap": str,
                  "planes": lambda v: tuple(p.strip() for p in str(v).split(",") if p.strip()),
                  "point": lambda v: tuple(int(i) for i in str(v).replace("x", ",").split(","))}


def figure_options(pairs) -> dict:
    """``{"alpha": "0.4", ...}`` or ``["alpha=0.4", ...]`` (``--figure`` values) as typed :func:`figure` options,
    checked: a typed error names the bad key or value before any work."""
    from medexplain.errors import OptionError
    if pairs is None:
        return {}
    if not isinstance(pairs, dict):
        items = {}
        for kv in pairs:
            k, sep, v = str(kv).partition("=")
            if not sep:
                raise OptionError(f"--figure takes key=value, got {kv!r} (keys: {', '.join(FIGURE_OPTIONS)})")
            items[k.strip()] = v.strip()
        pairs = items
    out = {}
    for k, v in pairs.items():
        if k not in FIGURE_OPTIONS:
            raise OptionError(f"unknown figure option {k!r}; figure options: {', '.join(FIGURE_OPTIONS)}")
        try:
            out[k] = FIGURE_OPTIONS[k](v) if isinstance(v, str) else v
        except (TypeError, ValueError):
            raise OptionError(f"figure option {k}={v!r} is not valid") from None
    if "alpha" in out and not 0 <= out["alpha"] <= 1:
        raise OptionError(f"figure option alpha (opacity) must be in [0, 1], got {out['alpha']}")
    if "percentile" in out and not 0 < out["percentile"] <= 100:
        raise OptionError(f"figure option percentile must be in (0, 100], got {out['percentile']}")
    if "planes" in out and (not out["planes"] or set(out["planes"]) - set(PLANES)):
        raise OptionError(f"figure option planes must be some of {', '.join(PLANES)}, got {out['planes']}")
    if "cmap" in out:
        colormap(False, out["cmap"])
    return out


def figure(image, amap, *, affine=None, oriented: bool = True, title: str = "", subtitle: str = "",
           label: str = "map", point=None, region=None, planes=None, signed: bool | None = None,
           percentile: float = PERCENTILE, alpha: float = ALPHA, cmap: str | None = None,
           patient_orientation=None, caption: str = "", min_px: int = MIN_PX, max_px: int = MAX_PX, dpi: int = 100):
    """A matplotlib :class:`~matplotlib.figure.Figure` of ``amap`` ``(C_or_1, *spatial)`` (channels summed)
    over ``image`` ``(C, *spatial)``: one panel for 2D (shown as stored), axial / coronal / sagittal panels
    (``planes``: a subset) for 3D through ``point`` (a voxel index), else through the centre of ``region``
    (a bool mask on the image grid: the explained target region or lesion, outlined in green; the peak of
    |map| marked when it lies elsewhere), else through the peak; a colour bar, the scale stated under the
    panels, ``title``, ``subtitle`` and ``caption`` (e.g. a perturbation method's baseline). ``affine``
    (tensor indices to RAS mm) sets the voxel aspect and, when ``oriented`` (the file really places the
    image in the patient), the R/L, A/P, S/I edge labels; a 2D image without that gets them from
    ``patient_orientation`` (DICOM PatientOrientation). ``alpha``: opacity at full colour; ``percentile``:
    the colour limit; ``cmap``: a matplotlib colormap name. Panels larger than ``max_px`` (2D) are reduced
    by blocks keeping the largest |map| of each (:func:`block_reduce`). No pyplot: nothing global is touched."""
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
    if region is not None:
        region = _np(region).astype(bool).reshape(m.shape) if _np(region).size == m.size else None
        if region is None:
            raise ValueError(f"region shape differs from the map's spatial shape {m.shape}")
        region = region if region.any() else None
    planes = tuple(PLANES) if planes is None else tuple(planes)
    scale = map_scale(m, percentile, signed)
    window = image_window(img)
    labelled = oriented and affine is not None
    panels, where = (_panels_2d(img, m, affine, labelled, region, patient_orientation) if nd == 2
                     else _panels_3d(img, m, affine, point, labelled, region, planes))

    # layout in pixels: every panel in one mm scale, the largest panel's long side >= min_px
    mm = [(p["map"].shape[0] * p["spacing"][0], p["map"].shape[1] * p["spacing"][1]) for p in panels]
    native = max(max(p["map"].shape) for p in panels)
    long_px = max(min_px, min(max_px, native)) if nd == 2 else min_px
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
    reduced = 1
    for p, (h, w) in zip(panels, sizes):
        ax = fig.add_axes([x / width, (bottom + (panel_h - h) / 2) / height, w / width, h / height])
        # larger than its panel: reduce by blocks keeping each block's largest |map| (antialiasing would
        # average a few strong pixels of a sparse map away)
        factor = int(np.ceil(max(p["map"].shape[0] / h, p["map"].shape[1] / w) - 1e-9))
        pimg, pmap = block_reduce(p["image"], p["map"], factor)
        reduced = max(reduced, factor)
        rgb = overlay(image_rgb(pimg, window), pmap, scale, alpha=alpha, cmap=cmap)
        ax.imshow(rgb, interpolation="nearest", aspect="auto")
        ax.set_axis_off()
        f = max(factor, 1)
        if p.get("region") is not None and p["region"].any():
            reg = p["region"] if f == 1 else block_reduce(p["region"][None].astype(float), p["region"], f)[0][0] > 0
            ax.contour(reg.astype(float), levels=[0.5], colors=["#00c853"], linewidths=1.2)
        if p.get("peak") is not None:
            pr, pc = p["peak"]
            ax.plot([pc / f], [pr / f], marker="o", markersize=11, markerfacecolor="none", markeredgecolor="#00e5ff",
                    markeredgewidth=1.8)
        if p["name"]:
            ax.set_title(p["name"], fontsize=11, pad=6)
        if p["cross"] is not None:
            r, c = p["cross"][0] / f, p["cross"][1] / f
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
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=colormap(scale.signed, cmap)), cax=cax)
    ticks = [-scale.limit, 0.0, scale.limit] if scale.signed else [0.0, scale.limit / 2, scale.limit]
    cb.set_ticks(ticks)
    cb.set_ticklabels([f"{t:.3g}" for t in ticks])
    cb.ax.tick_params(labelsize=10)
    what = f"{label}{' (signed)' if scale.signed else ''}" + (f", sum of {channels} channel maps" if channels > 1 else "")
    cb.set_label(what, fontsize=10)
    foot = f"Colour scale: {scale.text()}."
    if reduced > 1:
        foot += f" Shown reduced by {reduced}x{reduced} blocks, each showing its largest |map| value."
    if caption:
        foot += f" {caption}"
    for i, line in enumerate(textwrap.wrap(foot, max(40, int((width - left - 20) / 7.2)))[:2][::-1]):
        fig.text(left / width, (6 + 15 * i) / height, line, fontsize=10, va="bottom", ha="left")
    fig.text(left / width, 1 - 12 / height, title, fontsize=15, fontweight="bold", va="top", ha="left")
    for i, line in enumerate(sub_lines):
        fig.text(left / width, 1 - (44 + 17 * i) / height, line, fontsize=10, va="top", ha="left", color="#333333")
    return fig


def instance_figures(image, maps, masks, kinds=None, *, affine=None, oriented: bool = True, channel_names=None,
                     title: str = "", **options) -> list:
    """``[(file name, Figure)]``, one per lesion instance, ``instance_<k>_<kind>.png`` (k from 1, as the instance
    NIfTIs): the instance's saliency ``maps[k]`` ``(C, *spatial)`` (channels summed; the per-channel split is in
    the table) over ``image`` with the lesion ``masks[k]`` (bool, image grid) outlined and the planes through
    its centre (:func:`figure` with ``region``). Written by :func:`medexplain.io.write_figure`."""
    out = []
    kinds = list(kinds) if kinds is not None else [None] * len(maps)
    for k, (m, mask, kind) in enumerate(zip(maps, masks, kinds), start=1):
        size = int(_np(mask).astype(bool).sum())
        chans = f" \u00b7 channels {', '.join(channel_names)} summed" if channel_names and _np(m).shape[0] > 1 else ""
        lead = f"{title} \u00b7 " if title else ""
        fig = figure(image, m, affine=affine, oriented=oriented, region=mask,
                     title=f"{lead}lesion {k} ({kind or 'predicted'}, {size} voxels)",
                     subtitle=f"instance saliency of this lesion alone{chans}", label="instance saliency", **options)
        out.append((f"instance_{k:03d}_{kind or 'pred'}.png", fig))
    return out
