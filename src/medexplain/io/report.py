"""One self-contained HTML report: images, each method's overlay side by side, the planted (or ground
truth) mask outline, the model's prediction, and a metrics table per method. No external resource: PNGs
are embedded as base64 data URIs, CSS and JS are inline, so the file opens offline and can be mailed as is.

Every panel is drawn by :mod:`medexplain.io.render`, the renderer of the ``explain`` PNG figures: the same
colormaps (matplotlib's ``RdBu_r`` for signed maps, centred at 0; a sequential ``hot`` for non-negative
ones), the same robust colour limit (the 99th percentile of |map| over the case's whole map, stated under
each panel with a colour bar), colour images in colour, the same opacity rule. Maps are shown raw per case
(only this display scaling is applied).

3D cases get a tri-planar viewer: the volume reoriented to the closest RAS axes (render's
:func:`~medexplain.io.render.to_ras`), axial, coronal and sagittal planes in the radiological convention with
R/L, A/P, S/I labels, one slider per plane and a crosshair linked across the planes and the panels (moving
the axial slider moves the horizontal line of the coronal and sagittal planes; clicking a plane moves the
other two). The viewer starts at the mask's centre voxel (else the first map's peak). A self-check for
headless browsers runs when the URL ends in ``#selfcheck`` and writes its result into ``#mx-selfcheck``.

:func:`write_index` writes the index of a whole run (``medexplain run --report``): a table of cases x methods
with each item's status, links to its map and figures (files beside the page, by relative path) and the
message of each error row.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from medexplain.io import check_output_dir, render, write_text

__all__ = ["write_report", "write_index", "render_overlay", "render_image"]

#: The renderer's overlay and image functions, under the names this module exported before.
render_overlay = render.overlay
render_image = render.image_rgb

_MASK_RGB = np.array([0, 255, 90], np.uint8)
_MARKER_RGB = np.array([255, 230, 0], np.uint8)


def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _upscale(rgb: np.ndarray, f: int) -> np.ndarray:
    return np.repeat(np.repeat(rgb, f, 0), f, 1)


def _factor(shape, px: int) -> int:
    return max(1, int(round(px / max(shape[:2]))))


def _outline(rgb: np.ndarray, mask: np.ndarray | None, colour: np.ndarray) -> np.ndarray:
    """Draw the boundary of ``mask`` (native grid) on the upscaled ``rgb`` (1-pixel line at display size)."""
    if mask is None or not mask.any():
        return rgb
    f = rgb.shape[0] // mask.shape[0]
    m = np.repeat(np.repeat(mask.astype(bool), f, 0), f, 1)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    out = rgb.copy()
    out[m & ~inner] = colour
    return out


def _png(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", optimize=False, compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(v) -> str:
    if v is None:
        return "\u2013"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "n/a" if math.isnan(v) else f"{float(v):.3f}"
    return html.escape(str(v))


def _table(rows) -> str:
    if isinstance(rows, Mapping):  # {method: {metric: value}}
        rows = [{"method": k, **dict(v)} for k, v in rows.items()]
    rows = list(rows or [])
    if not rows:
        return "<p class='muted'>no metrics</p>"
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table class='metrics'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _colorbar(scale: render.Scale) -> str:
    """A colour bar in CSS from the renderer's colormap, its end values and the scale's wording."""
    stops = ", ".join(f"rgb{c} {100 * f:.0f}%" for f, c in render.colorbar_stops(scale))
    lo, hi = (f"{-scale.limit:.3g}", f"{scale.limit:.3g}") if scale.signed else ("0", f"{scale.limit:.3g}")
    mid = "<span>0</span>" if scale.signed else ""
    return (f"<div class='cbar' style='background:linear-gradient(90deg, {stops})'></div>"
            f"<div class='cbar-ticks'><span>{lo}</span>{mid}<span>{hi}</span></div>"
            f"<div class='cbar-text'>{html.escape(scale.text())}</div>")


def _case_arrays(case: Mapping, methods: Sequence[str], channel: int | None):
    img = _np(case["image"]).astype(np.float64)
    if img.ndim not in (3, 4):
        raise ValueError(f"case image must be (C, H, W) or (C, D, H, W), got shape {img.shape}")
    ch = case.get("display_channel", channel)
    if img.shape[0] not in (1, 3) or ch is not None:
        img = img[[ch or 0]]
    masks = {}
    for key in ("mask", "marker_mask"):
        m = case.get(key)
        masks[key] = None if m is None else _np(m).astype(bool).reshape(img.shape[1:])
    maps = {}
    for m in methods:
        a = case.get("maps", {}).get(m)
        if a is None:
            continue
        a = _np(a).astype(np.float64)
        if a.ndim == img.ndim:  # (C_or_1, *spatial): sum the channel maps
            a = a.sum(0)
        if a.shape != img.shape[1:]:
            raise ValueError(f"map of {m!r} has spatial shape {a.shape}, the image {img.shape[1:]}")
        maps[m] = a
    return img, masks, maps


def _figure_html(cid, name, src, caption, width: int, scale=None) -> str:
    cbar = _colorbar(scale) if scale is not None else ""
    return (f"<figure style='width:{width + 2}px'><img src='{src}' alt='{cid}:{html.escape(name)}' data-case='{cid}' "
            f"data-panel='{html.escape(name)}'><figcaption>{caption}</figcaption>{cbar}</figure>")


def _caption(case, name, scale) -> str:
    if name == "image":
        return "image"
    cap = html.escape(name) + (" (signed)" if scale.signed else "")
    more = case.get("captions", {}).get(name)
    return cap + (f"<br>{html.escape(str(more))}" if more else "")


def _case_2d(cid, case, img, masks, maps, px) -> str:
    base = render.image_rgb(img)
    f = _factor(base.shape, px)

    def dress(rgb):
        return _outline(_outline(_upscale(rgb, f), masks["mask"], _MASK_RGB), masks["marker_mask"], _MARKER_RGB)

    width = base.shape[1] * f
    figs = [_figure_html(cid, "image", _png(dress(base)), "image", width)]
    for m, a in maps.items():
        scale = render.map_scale(a)
        figs.append(_figure_html(cid, m, _png(dress(render.overlay(base, a, scale))), _caption(case, m, scale), width, scale))
    return f"<div class='row'>{''.join(figs)}</div>"


def _start_point(masks, maps, shape) -> tuple[int, int, int]:
    mask = masks["mask"]
    if mask is not None and mask.any():
        return render.region_centre(mask)          # the centre of the region (its largest part), as the PNG figures
    if maps:
        return render.peak_index(next(iter(maps.values())))
    return tuple(s // 2 for s in shape)


def _case_3d(cid, case, img, masks, maps, px) -> tuple[str, dict]:
    """The tri-planar viewer of one 3D case: its HTML and its slices (data URIs) for the page's script."""
    affine = case.get("affine")
    oriented = bool(case.get("oriented", affine is not None))
    start = case.get("point")
    start = tuple(int(v) for v in start) if start is not None else _start_point(masks, maps, img.shape[1:])
    layers = [img] + [m[None] for m in maps.values()] + [masks[k][None].astype(float) for k in masks if masks[k] is not None]
    vol, aff, ornt = render.to_ras(np.concatenate(layers), affine)
    nc = img.shape[0]
    img_r = vol[:nc]
    maps_r = {m: vol[nc + i] for i, m in enumerate(maps)}
    rest = vol[nc + len(maps):]
    masks_r = {}
    for k in masks:
        if masks[k] is not None:
            masks_r[k], rest = rest[0] > 0.5, rest[1:]
        else:
            masks_r[k] = None
    dims = img_r.shape[1:]
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    point = render.ras_index(start, ornt, img.shape[1:])
    window = render.image_window(img_r)
    scales = {m: render.map_scale(a) for m, a in maps_r.items()}
    # one mm scale for the three planes: the largest plane's long side is px pixels
    mm = {p: (dims[render.PLANES[p]["rows"]] * render.plane_spacing(spacing, p)[0],
              dims[render.PLANES[p]["cols"]] * render.plane_spacing(spacing, p)[1]) for p in render.PLANES}
    s = px / max(max(v) for v in mm.values())
    slices: dict = {"dims": [int(d) for d in dims], "point": [int(v) for v in point], "affine": aff.round(6).tolist(),
                    "panels": {}}
    panels = {"image": None, **{m: maps_r[m] for m in maps_r}}
    for name, amap in panels.items():
        slices["panels"][name] = {}
        for p, info in render.PLANES.items():
            tiles = []
            for k in range(dims[info["axis"]]):
                base = render.image_rgb(render.plane(img_r, p, k), window)
                rgb = base if amap is None else render.overlay(base, render.plane(amap[None], p, k)[0], scales[name])
                f = _factor(rgb.shape, px)
                mk = {key: None if v is None else render.plane(v[None], p, k)[0] for key, v in masks_r.items()}
                rgb = _outline(_outline(_upscale(rgb, f), mk["mask"], _MASK_RGB), mk["marker_mask"], _MARKER_RGB)
                tiles.append(_png(rgb))
            slices["panels"][name][p] = tiles
    names = {"sagittal": ("x", "R\u2013L"), "coronal": ("y", "A\u2013P"), "axial": ("z", "S\u2013I")}
    sliders = "".join(
        f"<label class='slider'>{p} <input type='range' class='mx-slider' data-case='{cid}' data-plane='{p}' "
        f"min='0' max='{dims[render.PLANES[p]['axis']] - 1}' value='{point[render.PLANES[p]['axis']]}' "
        f"aria-label='{p} slice'> <span class='mx-slice' data-case='{cid}' data-plane='{p}'>"
        f"{point[render.PLANES[p]['axis']]}</span>/{dims[render.PLANES[p]['axis']] - 1} "
        f"<span class='muted'>({names[p][0]}, {names[p][1]})</span></label>" for p in ("axial", "coronal", "sagittal"))
    heads = "".join(f"<div class='tri-plane' style='width:{mm[p][1] * s:.0f}px'>{p}</div>" for p in render.PLANES)
    rows = [f"<div class='tri-row'><div class='tri-name'></div>{heads}</div>"]
    for name in panels:
        cells = []
        for p, info in render.PLANES.items():
            h, w = mm[p][0] * s, mm[p][1] * s
            labels = info["labels"] if oriented else ("", "", "", "")
            lab = "".join(f"<span class='lab {pos}'>{t}</span>" for pos, t in zip(("l", "r", "t", "b"), labels) if t)
            src = slices["panels"][name][p][point[info["axis"]]]
            cells.append(
                f"<div class='plane' data-case='{cid}' data-plane='{p}' style='width:{w:.0f}px;height:{h:.0f}px'>"
                f"<img src='{src}' alt='{cid}:{html.escape(name)}:{p}' data-case='{cid}' data-panel='{html.escape(name)}' "
                f"data-plane='{p}' style='width:{w:.0f}px;height:{h:.0f}px'>"
                f"<div class='xh xh-v' data-case='{cid}' data-plane='{p}'></div>"
                f"<div class='xh xh-h' data-case='{cid}' data-plane='{p}'></div>{lab}</div>")
        scale = scales.get(name)
        head = _caption(case, name, scale) if scale is not None else "image"
        cbar = f"<div class='tri-cbar'>{_colorbar(scale)}</div>" if scale is not None else ""
        rows.append(f"<div class='tri-row'><div class='tri-name'>{head}{cbar}</div>{''.join(cells)}</div>")
    where = (f"<div class='muted'>RAS <span class='mx-ras' data-case='{cid}'></span> mm"
             + ("" if oriented else " (no patient orientation given: voxel axes shown as R, A, S)") + "</div>")
    doc = f"<div class='viewer' data-case='{cid}'><div class='sliders'>{sliders}</div>{where}{''.join(rows)}</div>"
    return doc, slices


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d1d1f;background:#fafafa}
h1{font-size:1.5em;margin:0 0 4px} h2{font-size:1.15em;margin:28px 0 8px}
.muted{color:#666} .note{background:#fff7e0;border-left:4px solid #e0a800;padding:8px 12px;margin:8px 0}
table.metrics{border-collapse:collapse;background:#fff;margin:8px 0}
table.metrics th,table.metrics td{border:1px solid #ddd;padding:4px 10px;text-align:right}
table.metrics th{background:#f0f0f0} table.metrics td:first-child,table.metrics th:first-child{text-align:left}
.case{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:12px;margin:14px 0}
.case h3{margin:0 0 6px;font-size:1em} .row{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;text-align:center} figure img{display:block;image-rendering:pixelated;border:1px solid #ccc}
figcaption{font-size:.85em;color:#333;margin-top:2px} .legend span{display:inline-block;margin-right:14px}
.sw{display:inline-block;width:12px;height:12px;vertical-align:middle;margin-right:4px;border:1px solid #999}
.cbar{height:10px;border:1px solid #999;margin-top:4px} .cbar-ticks{display:flex;justify-content:space-between;font-size:.72em}
.cbar-text{font-size:.72em;color:#444;text-align:left}
.sliders{display:flex;flex-wrap:wrap;gap:18px;margin:6px 0} .slider input{width:180px;vertical-align:middle}
.tri-row{display:flex;align-items:center;gap:10px;margin:8px 0} .tri-name{width:190px;font-size:.85em}
.tri-plane{flex:none;text-align:center;font-size:.85em;color:#333}
.plane{position:relative;background:#000;flex:none;cursor:crosshair}
.plane img{display:block;image-rendering:pixelated}
.xh{position:absolute;background:rgba(0,229,255,.75);pointer-events:none}
.xh-v{top:0;bottom:0;width:1px} .xh-h{left:0;right:0;height:1px}
.lab{position:absolute;color:#fff;background:rgba(0,0,0,.55);font:bold 12px system-ui,sans-serif;padding:0 3px;
  pointer-events:none}
.lab.l{left:2px;top:50%;transform:translateY(-50%)} .lab.r{right:2px;top:50%;transform:translateY(-50%)}
.lab.t{top:2px;left:50%;transform:translateX(-50%)} .lab.b{bottom:2px;left:50%;transform:translateX(-50%)}
"""

_JS = """
(function(){
  var DATA = JSON.parse(document.getElementById('mx-slices').textContent);
  // the planes of a RAS volume (as medexplain.io.render.PLANES): axis cut, axis along rows, axis along columns
  var PLANES = {axial: {axis: 2, rows: 1, cols: 0}, coronal: {axis: 1, rows: 2, cols: 0},
                sagittal: {axis: 0, rows: 2, cols: 1}};
  function q(sel){ return Array.prototype.slice.call(document.querySelectorAll(sel)); }
  function update(cid){
    var c = DATA[cid]; if(!c) return;
    var p = c.point, d = c.dims;
    q('img[data-case="'+cid+'"][data-plane]').forEach(function(img){
      var pl = img.getAttribute('data-plane'), tiles = c.panels[img.getAttribute('data-panel')][pl];
      var src = tiles[p[PLANES[pl].axis]]; if(img.src !== src) img.src = src;
    });
    Object.keys(PLANES).forEach(function(pl){
      var P = PLANES[pl];
      // displayed rows and columns are reversed (A or S up; R, or A for sagittal, on the left)
      var col = (d[P.cols] - 1 - p[P.cols] + 0.5) / d[P.cols] * 100, row = (d[P.rows] - 1 - p[P.rows] + 0.5) / d[P.rows] * 100;
      q('.xh-v[data-case="'+cid+'"][data-plane="'+pl+'"]').forEach(function(el){ el.style.left = col.toFixed(3) + '%'; });
      q('.xh-h[data-case="'+cid+'"][data-plane="'+pl+'"]').forEach(function(el){ el.style.top = row.toFixed(3) + '%'; });
      q('input.mx-slider[data-case="'+cid+'"][data-plane="'+pl+'"]').forEach(function(el){ el.value = p[P.axis]; });
      q('.mx-slice[data-case="'+cid+'"][data-plane="'+pl+'"]').forEach(function(el){ el.textContent = p[P.axis]; });
    });
    var a = c.affine, ras = [0, 1, 2].map(function(r){ return a[r][0]*p[0] + a[r][1]*p[1] + a[r][2]*p[2] + a[r][3]; });
    q('.mx-ras[data-case="'+cid+'"]').forEach(function(el){
      el.textContent = '(' + ras.map(function(v){ return v.toFixed(1); }).join(', ') + ')'; });
  }
  q('input.mx-slider').forEach(function(el){
    el.addEventListener('input', function(){
      var cid = el.getAttribute('data-case'), pl = el.getAttribute('data-plane');
      DATA[cid].point[PLANES[pl].axis] = parseInt(el.value, 10); update(cid);
    });
  });
  q('.plane').forEach(function(el){
    el.addEventListener('click', function(ev){
      var cid = el.getAttribute('data-case'), P = PLANES[el.getAttribute('data-plane')], c = DATA[cid];
      var r = el.getBoundingClientRect();
      var fx = (ev.clientX - r.left) / r.width, fy = (ev.clientY - r.top) / r.height;
      c.point[P.cols] = Math.max(0, Math.min(c.dims[P.cols] - 1, c.dims[P.cols] - 1 - Math.floor(fx * c.dims[P.cols])));
      c.point[P.rows] = Math.max(0, Math.min(c.dims[P.rows] - 1, c.dims[P.rows] - 1 - Math.floor(fy * c.dims[P.rows])));
      update(cid);
    });
  });
  Object.keys(DATA).forEach(update);
  window.mxUpdate = update;
  // Self-check for automated browser tests: results go into <pre id="mx-selfcheck"> as JSON.
  // Image loading is always checked; the sliders are exercised only when the URL ends in #selfcheck.
  function loaded(img){ return img.complete && img.naturalWidth > 0; }
  function finish(res){ var el = document.getElementById('mx-selfcheck'); el.textContent = JSON.stringify(res);
                        el.setAttribute('data-done', '1'); }
  function lines(cid){
    var out = {};
    q('.xh[data-case="'+cid+'"]').forEach(function(el, i){
      out[el.getAttribute('data-plane') + (el.classList.contains('xh-v') ? ':v' : ':h') + i] =
        el.classList.contains('xh-v') ? el.style.left : el.style.top; });
    return out;
  }
  window.addEventListener('load', function(){
    var imgs = q('img');
    var res = {images: imgs.length, loaded: imgs.filter(loaded).length,
               broken: imgs.filter(function(i){ return !loaded(i); }).map(function(i){ return i.alt; }),
               planes: q('.plane').map(function(el){
                 return el.getAttribute('data-case') + ':' + el.getAttribute('data-plane'); }),
               sliders: []};
    var sliders = q('input.mx-slider');
    if (location.hash !== '#selfcheck' || sliders.length === 0) { finish(res); return; }
    var jobs = sliders.map(function(el){
      var cid = el.getAttribute('data-case'), pl = el.getAttribute('data-plane');
      var img = document.querySelector('img[data-case="'+cid+'"][data-panel="image"][data-plane="'+pl+'"]');
      var before = img.src, v0 = parseInt(el.value, 10), l0 = lines(cid);
      var v1 = v0 > parseInt(el.min, 10) ? v0 - 1 : v0 + 1;
      el.value = v1; el.dispatchEvent(new Event('input'));
      var l1 = lines(cid), moved = [];
      Object.keys(l0).forEach(function(k){ if (l0[k] !== l1[k]) moved.push(k.split(':')[0] + ':' + k.split(':')[1][0]); });
      var changed = img.src !== before;
      // A fresh Image's onload rather than img.decode(): under a headless browser's virtual time decode()
      // promises can stay pending past the budget, and the check then never reports at all.
      var src = img.src;
      el.value = v0; el.dispatchEvent(new Event('input'));
      return new Promise(function(resolve){
        var probe = new Image();
        probe.onload = function(){ resolve(probe.naturalWidth > 0); };
        probe.onerror = function(){ resolve(false); };
        probe.src = src;
      }).then(function(ok){
        return {case: cid, plane: pl, from: v0, to: v1, src_changed: changed, decoded: ok, crosshair_moved: moved};
      });
    });
    // Report whatever has finished after 5 s rather than nothing: a missing slider result then fails visibly.
    var partial = [];
    jobs.forEach(function(j, i){ j.then(function(r){ partial[i] = r; }); });
    var timer = setTimeout(function(){ res.sliders = partial.filter(Boolean); res.timed_out = true; finish(res); }, 5000);
    Promise.all(jobs).then(function(rs){ clearTimeout(timer); res.sliders = rs; finish(res); });
  });
})();
"""


def write_report(path, cases: Sequence[Mapping], methods: Sequence[str], metrics_table=None, *,
                 title: str = "medexplain report", summary: str | None = None, notes: Sequence[str] = (),
                 display_px: int = 256, display_channel: int | None = None,
                 mask_label: str = "planted evidence / ground truth outline") -> str:
    """Write one self-contained HTML report to ``path`` (atomically: temporary file + ``os.replace``).

    Args:
        cases: one mapping per case with ``image`` ``(C, H, W)`` or ``(C, D, H, W)`` (C = 1 or 3 shown as
            is, 3 in colour; otherwise ``display_channel``, default 0, is shown), ``maps``
            ``{method: (C_or_1, *spatial)}`` on the image grid (channel maps are summed for display),
            optional ``mask`` (planted evidence / ground truth, outlined green), ``marker_mask`` (outlined
            yellow), ``title``, ``prediction``, ``label`` (strings), ``captions`` ``{method: str}`` (e.g. the
            case's hit), ``display_channel``; for 3D ``affine`` (tensor indices to RAS mm, default the
            identity), ``oriented`` (whether to print R/L, A/P, S/I; default: an affine was given) and
            ``point`` (the voxel the viewer starts at).
        methods: the column order of the overlays.
        metrics_table: rows ``[{"method": ..., metric: value}]`` or ``{method: {metric: value}}``.
        notes: short lines shown under the title (e.g. "the labels are planted", skipped methods).
        display_px: the long side of a 2D panel, and of the largest plane of a 3D case, in pixels.
        mask_label: what the green ``mask`` outline is, in the legend.
    Returns the path written.
    """
    check_output_dir(os.path.dirname(os.fspath(path)) or ".")  # before the figures are rendered (issue 27)
    methods = list(methods)
    slices: dict[str, dict] = {}
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if summary:
        parts.append(f"<p>{html.escape(summary)}</p>")
    parts += [f"<div class='note'>{html.escape(n)}</div>" for n in notes]
    parts.append("<h2>Metrics per method</h2>" + _table(metrics_table))
    signed_bar = render.colorbar_stops(render.Scale(True, 1.0, 1.0, None), 5)
    seq_bar = render.colorbar_stops(render.Scale(False, 1.0, 1.0, None), 5)
    grad = lambda stops: ",".join(f"rgb{c}" for _, c in stops)  # noqa: E731
    parts.append("<p class='legend'><span><i class='sw' style='background:#00ff5a'></i>"
                 f"{html.escape(mask_label)}</span><span><i class='sw' style='background:#ffe600'></i>marker outline</span>"
                 f"<span><i class='sw' style='background:linear-gradient(90deg,{grad(signed_bar)})'></i>signed map "
                 "(blue &lt; 0 &lt; red)</span><span><i class='sw' "
                 f"style='background:linear-gradient(90deg,{grad(seq_bar)})'></i>non-negative map</span>"
                 f"<span>colours saturate at the {render.PERCENTILE:g}th percentile of |map| of each case (stated under "
                 "each panel)</span></p>")
    parts.append("<h2>Cases</h2>")
    for k, case in enumerate(cases):
        cid = f"c{k}"
        img, masks, maps = _case_arrays(case, methods, display_channel)
        head = html.escape(str(case.get("title", f"case {k}")))
        facts = [f"{lab}: <b>{html.escape(str(case[key]))}</b>" for key, lab in
                 (("label", "truth"), ("prediction", "prediction")) if case.get(key) is not None]
        block = [f"<div class='case' id='{cid}'><h3>{head}</h3><div class='muted'>{' &middot; '.join(facts)}</div>"]
        if img.ndim == 4:
            doc, slices[cid] = _case_3d(cid, case, img, masks, maps, display_px)
            block.append(doc)
        else:
            block.append(_case_2d(cid, case, img, masks, maps, display_px))
        missing = [m for m in methods if m not in maps]
        if missing:
            block.append(f"<div class='muted'>no map for: {html.escape(', '.join(missing))}</div>")
        block.append("</div>")
        parts.append("".join(block))
    doc = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>{''.join(parts)}"
           f"<script type='application/json' id='mx-slices'>{json.dumps(slices)}</script>"
           "<pre id='mx-selfcheck' hidden></pre>"
           f"<script>{_JS}</script></body></html>")
    path = os.fspath(path)
    write_text(doc, path, suffix=".html")
    return path


_STATUS_CSS = """
table.index td,table.index th{text-align:left;vertical-align:top} .st-ok{color:#1a7f37;font-weight:600}
.st-error,.st-missing{color:#c62828;font-weight:600} .st-skipped{color:#8a6d00;font-weight:600}
.err{font-size:.8em;color:#7a1b1b;max-width:420px;white-space:pre-wrap} table.index img{display:block;max-width:160px;
max-height:160px;margin-top:4px;border:1px solid #ccc}
"""


def _index_cell(row: Mapping | None, rel) -> str:
    """One item of the index: its status, links to its map and outputs (``rel``: a run path as a link), an
    error row's message, a figure's thumbnail."""
    if row is None:
        return "<td class='muted'>\u2013</td>"
    st = str(row.get("status", "missing"))
    parts = [f"<span class='st-{html.escape(st)}'>{html.escape(st)}</span>"]
    if row.get("hit_rate") is not None:
        parts.append(f"hit {_fmt(row['hit_rate'])}")
    links = [p for p in [row.get("map"), *(row.get("outputs") or [])] if p]
    if links:
        parts.append(" ".join(f"<a href='{html.escape(rel(p))}'>{html.escape(os.path.basename(p))}</a>" for p in links))
    figs = [p for p in row.get("outputs") or [] if str(p).endswith(".png")]
    parts += [f"<a href='{html.escape(rel(p))}'><img src='{html.escape(rel(p))}' alt='{html.escape(str(p))}'></a>"
              for p in figs[:1]]
    if st != "ok" and row.get("error"):
        parts.append(f"<div class='err'>{html.escape(str(row['error']))}</div>")
    return "<td>" + "<br>".join(parts) + "</td>"


def write_index(path, rows: Sequence[Mapping], methods: Sequence[str], *, root=None,
                title: str = "medexplain run", notes: Sequence[str] = ()) -> str:
    """Write the index of a run to ``path`` (atomically): one table row per case (in the order of ``rows``), one
    column per method of ``methods``; each cell is the item's status (``ok``, ``error``, ``skipped``,
    ``missing``), its hit rate, links to its map and outputs (figures, DICOM objects) and, for an item that is not
    ``ok``, its error message. ``rows``: the run's records (:meth:`medexplain.pipelines.run.store.RunStore.collect`:
    ``case_id``, ``method``, ``status``, ``map`` and ``outputs`` relative to ``root``, ``error``); ``root``: the
    folder those paths are relative to (default: the page's folder). Links are relative to the page, so the
    run folder can be moved or copied whole. Returns the path written."""
    path = os.fspath(path)
    here = os.path.dirname(os.path.abspath(path))
    check_output_dir(here)
    root = os.path.abspath(os.fspath(root)) if root is not None else here
    methods = list(methods)

    def rel(p) -> str:
        return os.path.relpath(os.path.join(root, os.fspath(p)), here).replace(os.sep, "/")

    cases: dict[str, dict] = {}
    for r in rows:
        cases.setdefault(str(r.get("case_id")), {"image": r.get("image"), "items": {}})["items"][r.get("method")] = r
    counts: dict[str, int] = {}
    for r in rows:
        counts[str(r.get("status"))] = counts.get(str(r.get("status")), 0) + 1
    head = "".join(f"<th>{html.escape(m)}</th>" for m in methods)
    body = "".join(f"<tr><td><b>{html.escape(cid)}</b><br><span class='muted'>"
                   f"{html.escape(os.path.basename(str(c['image'] or '')))}</span></td>"
                   + "".join(_index_cell(c["items"].get(m), rel) for m in methods) + "</tr>"
                   for cid, c in cases.items())
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>{len(cases)} case(s) x {len(methods)} method(s): "
             f"{html.escape(summary or 'no items')}</p>"]
    parts += [f"<div class='note'>{html.escape(n)}</div>" for n in notes]
    parts.append(f"<table class='metrics index'><thead><tr><th>case</th>{head}</tr></thead><tbody>{body}</tbody></table>")
    doc = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}{_STATUS_CSS}</style></head><body>{''.join(parts)}</body></html>")
    write_text(doc, path, suffix=".html")
    return path
