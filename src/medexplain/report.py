"""One self-contained HTML report: images, each method's overlay side by side, the planted (or ground
truth) mask outline, the model's prediction, and a metrics table per method. 3D inputs get a slice
slider. No external resource: PNGs are embedded as base64 data URIs, CSS and JS are inline, so the file
opens offline and can be mailed as is. Rendering uses numpy + PIL only.

Colours are the one scheme of :mod:`medexplain.render` (shared with the ``explain`` PNGs): a map with
negative values in a diverging blue-white-red colormap scaled symmetrically by max |map| (blue negative,
red positive), a non-negative map in a sequential black-red-yellow colormap scaled by its maximum, opacity
growing with |value|. Maps are shown raw per case (only this display scaling is applied).
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

from .io import write_text
from .render import image_rgb as render_image
from .render import overlay as render_overlay
from .render import slice_rgb

__all__ = ["write_report", "render_overlay", "render_image"]

_MASK_RGB = np.array([0, 255, 90], np.uint8)
_MARKER_RGB = np.array([255, 230, 0], np.uint8)


def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _upscale(rgb: np.ndarray, px: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    f = max(1, int(round(px / max(h, w))))
    return np.repeat(np.repeat(rgb, f, 0), f, 1)


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
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False, compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(v) -> str:
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


def _case_panels(case: Mapping, methods: Sequence[str], px: int, channel: int | None):
    """PNG data URIs per panel: {"image": [per slice], method: [per slice]} and the default slice."""
    img = _np(case["image"]).astype(np.float64)
    if img.ndim not in (3, 4):
        raise ValueError(f"case image must be (C, H, W) or (C, D, H, W), got shape {img.shape}")
    three_d = img.ndim == 4
    ch = case.get("display_channel", channel)
    if img.shape[0] not in (1, 3) or ch is not None:
        img = img[[ch or 0]]
    mask = case.get("mask")
    mask = None if mask is None else _np(mask).astype(bool).reshape(img.shape[1:])
    marker = case.get("marker_mask")
    marker = None if marker is None else _np(marker).astype(bool).reshape(img.shape[1:])
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
    n_sl = img.shape[1] if three_d else 1
    if three_d and mask is not None and mask.any():
        default = int(mask.reshape(n_sl, -1).sum(1).argmax())
    else:
        default = n_sl // 2
    # one display scale per map over the whole volume, so slices are comparable
    scales = {m: float(np.abs(a).max()) for m, a in maps.items()}
    signed = {m: bool((a < 0).any()) for m, a in maps.items()}
    panels = {"image": []}
    for m in maps:
        panels[m] = []
    for s in range(n_sl):
        im2 = img[:, s] if three_d else img
        mk = None if mask is None else (mask[s] if three_d else mask)
        mr = None if marker is None else (marker[s] if three_d else marker)
        base = render_image(im2) if not three_d else slice_rgb(img, s)
        panels["image"].append(_png(_outline(_outline(_upscale(base, px), mk, _MASK_RGB), mr, _MARKER_RGB)))
        for m, a in maps.items():
            ov = render_overlay(base, a[s] if three_d else a, scales[m], signed[m])
            panels[m].append(_png(_outline(_outline(_upscale(ov, px), mk, _MASK_RGB), mr, _MARKER_RGB)))
    return panels, default, three_d, signed


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d1d1f;background:#fafafa}
h1{font-size:1.5em;margin:0 0 4px} h2{font-size:1.15em;margin:28px 0 8px}
.muted{color:#666} .note{background:#fff7e0;border-left:4px solid #e0a800;padding:8px 12px;margin:8px 0}
table.metrics{border-collapse:collapse;background:#fff;margin:8px 0}
table.metrics th,table.metrics td{border:1px solid #ddd;padding:4px 10px;text-align:right}
table.metrics th{background:#f0f0f0} table.metrics td:first-child,table.metrics th:first-child{text-align:left}
.case{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:12px;margin:14px 0}
.case h3{margin:0 0 6px;font-size:1em} .row{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;text-align:center} figure img{display:block;image-rendering:pixelated;border:1px solid #ccc}
figcaption{font-size:.8em;color:#333;max-width:200px} .legend span{display:inline-block;margin-right:14px}
.sw{display:inline-block;width:12px;height:12px;vertical-align:middle;margin-right:4px;border:1px solid #999}
.slider{margin:6px 0} .slider input{width:260px;vertical-align:middle}
"""

_JS = """
(function(){
  var DATA = JSON.parse(document.getElementById('mx-slices').textContent);
  function show(cid, s){
    var c = DATA[cid]; if(!c) return;
    document.querySelectorAll('img[data-case="'+cid+'"]').forEach(function(img){
      var p = c[img.getAttribute('data-panel')]; if(p) img.src = p[s];
    });
    var lab = document.getElementById('slice-label-'+cid); if(lab) lab.textContent = s;
  }
  document.querySelectorAll('input.mx-slider').forEach(function(el){
    el.addEventListener('input', function(){ show(el.getAttribute('data-case'), parseInt(el.value, 10)); });
  });
  window.mxShowSlice = show;
  // Self-check for automated browser tests: results go into <pre id="mx-selfcheck"> as JSON.
  // Image loading is always checked; the slider is exercised only when the URL ends in #selfcheck.
  function loaded(img){ return img.complete && img.naturalWidth > 0; }
  function finish(res){ var el = document.getElementById('mx-selfcheck'); el.textContent = JSON.stringify(res);
                        el.setAttribute('data-done', '1'); }
  window.addEventListener('load', function(){
    var imgs = Array.prototype.slice.call(document.images);
    var res = {images: imgs.length, loaded: imgs.filter(loaded).length,
               broken: imgs.filter(function(i){ return !loaded(i); }).map(function(i){ return i.alt; }),
               sliders: []};
    var sliders = Array.prototype.slice.call(document.querySelectorAll('input.mx-slider'));
    if (location.hash !== '#selfcheck' || sliders.length === 0) { finish(res); return; }
    var jobs = sliders.map(function(el){
      var cid = el.getAttribute('data-case');
      var img = document.querySelector('img[data-case="'+cid+'"][data-panel="image"]');
      var before = img.src, v0 = parseInt(el.value, 10);
      var v1 = v0 > parseInt(el.min, 10) ? v0 - 1 : v0 + 1;
      el.value = v1; el.dispatchEvent(new Event('input'));
      var changed = img.src !== before;
      return img.decode().then(function(){ return true; }, function(){ return false; }).then(function(ok){
        var r = {case: cid, from: v0, to: v1, src_changed: changed, decoded: ok && img.naturalWidth > 0};
        el.value = v0; el.dispatchEvent(new Event('input'));
        return r;
      });
    });
    Promise.all(jobs).then(function(rs){ res.sliders = rs; finish(res); });
  });
})();
"""


def write_report(path, cases: Sequence[Mapping], methods: Sequence[str], metrics_table=None, *,
                 title: str = "medexplain report", summary: str | None = None, notes: Sequence[str] = (),
                 display_px: int = 160, display_channel: int | None = None) -> str:
    """Write one self-contained HTML report to ``path`` (atomically: temporary file + ``os.replace``).

    Args:
        cases: one mapping per case with ``image`` ``(C, H, W)`` or ``(C, D, H, W)`` (C = 1 or 3 shown as
            is; otherwise ``display_channel``, default 0, is shown), ``maps`` ``{method: (C_or_1, *spatial)}``
            on the image grid (channel maps are summed for display), optional ``mask`` (planted evidence
            / ground truth, outlined green), ``marker_mask`` (outlined yellow), ``title``, ``prediction``,
            ``label`` (strings), ``captions`` ``{method: str}`` (e.g. the case's hit) and ``display_channel``.
        methods: the column order of the overlays.
        metrics_table: rows ``[{"method": ..., metric: value}]`` or ``{method: {metric: value}}``.
        notes: short lines shown under the title (e.g. "the labels are planted", skipped methods).
    Returns the path written. 3D cases get a slider over the first spatial axis (it starts at the slice
    with the largest mask area).
    """
    methods = list(methods)
    slices: dict[str, dict] = {}
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if summary:
        parts.append(f"<p>{html.escape(summary)}</p>")
    parts += [f"<div class='note'>{html.escape(n)}</div>" for n in notes]
    parts.append("<h2>Metrics per method</h2>" + _table(metrics_table))
    parts.append("<p class='legend'><span><i class='sw' style='background:#00ff5a'></i>planted evidence / "
                 "ground truth outline</span><span><i class='sw' style='background:#ffe600'></i>marker outline</span>"
                 "<span><i class='sw' style='background:linear-gradient(90deg,#053061,#f7f7f7,#67001f)'></i>signed map "
                 "(blue &lt; 0 &lt; red)</span><span><i class='sw' "
                 "style='background:linear-gradient(90deg,#000,#e62800,#ffc800)'></i>non-negative map</span></p>")
    parts.append("<h2>Cases</h2>")
    for k, case in enumerate(cases):
        cid = f"c{k}"
        panels, default, three_d, signed = _case_panels(case, methods, display_px, display_channel)
        head = html.escape(str(case.get("title", f"case {k}")))
        facts = [f"{lab}: <b>{html.escape(str(case[key]))}</b>" for key, lab in
                 (("label", "truth"), ("prediction", "prediction")) if case.get(key) is not None]
        block = [f"<div class='case' id='{cid}'><h3>{head}</h3><div class='muted'>{' &middot; '.join(facts)}</div>"]
        if three_d:
            n_sl = len(panels["image"])
            slices[cid] = panels
            block.append(f"<div class='slider'>slice <input type='range' class='mx-slider' data-case='{cid}' "
                         f"min='0' max='{n_sl - 1}' value='{default}' aria-label='slice'> "
                         f"<span id='slice-label-{cid}'>{default}</span> / {n_sl - 1}</div>")
        block.append("<div class='row'>")
        shown = ["image"] + [m for m in methods if m in panels]
        for name in shown:
            src = panels[name][default if three_d else 0]
            cap = "image" if name == "image" else html.escape(name) + (" (signed)" if signed.get(name) else "")
            extra = case.get("captions", {}).get(name) if name != "image" else None
            if extra:
                cap += f"<br>{html.escape(str(extra))}"
            block.append(f"<figure><img src='{src}' alt='{cid}:{html.escape(name)}' data-case='{cid}' "
                         f"data-panel='{html.escape(name)}'><figcaption>{cap}</figcaption></figure>")
        missing = [m for m in methods if m not in panels]
        block.append("</div>")
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
