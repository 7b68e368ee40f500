"""The HTML report: self-contained, atomic, and checked in headless Chromium (images load, 3D slider works).

Screenshots are saved under tests/artifacts/ (gitignored) as test artifacts.
"""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from medexplain import data
from medexplain.report import render_overlay, write_report

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def _cases_2d():
    ds = data.chest_xray(n=6, size=32, seed=0)
    pos = (ds.labels == 1).nonzero().flatten()[:2]
    g = torch.Generator().manual_seed(0)
    cases = []
    for i in pos.tolist():
        m = torch.zeros(1, 32, 32)
        m[0][ds.masks[i]] = 1.0
        cases.append({"image": ds.images[i], "mask": ds.masks[i], "title": f"case {i}", "label": "nodule",
                      "prediction": "nodule p=0.9",
                      "maps": {"signed": torch.randn(1, 32, 32, generator=g), "positive": m}, "captions": {"positive": "hit"}})
    return cases


def _cases_3d():
    ds = data.lesion_volumes(n=1, size=16, seed=0)
    seg = ds.seg[0].float()[None]
    return [{"image": ds.images[0], "mask": ds.masks[0], "title": "volume", "display_channel": 1,
             "maps": {"flair_map": torch.cat([0.1 * seg, seg]), "noise": torch.randn(2, 16, 16, 16)}}]


def _write(tmp_path, name, cases, methods):
    rows = [{"method": m, "hit rate": 0.5, "random baseline": 0.02} for m in methods]
    rows += [{"method": "x", "hit rate": float("nan")}]
    return Path(write_report(tmp_path / name, cases, methods, rows, title=f"test {name}", notes=["labels are planted"]))


def test_report_is_self_contained_and_written_atomically(tmp_path):
    p2 = _write(tmp_path, "r2.html", _cases_2d(), ["signed", "positive"])
    p3 = _write(tmp_path, "r3.html", _cases_3d(), ["flair_map", "noise", "missing"])
    assert sorted(os.listdir(tmp_path)) == ["r2.html", "r3.html"]          # no temporary file left
    for p, n_img in ((p2, 2 * 3), (p3, 1 * 3)):
        doc = p.read_text()
        assert len(re.findall(r"<img ", doc)) == n_img
        srcs = re.findall(r"<img src='([^']*)'", doc)
        assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
        assert not re.search(r"(src|href)=['\"](https?:)?//", doc)         # no CDN, nothing external
        assert "<link" not in doc and "n/a" in doc and "labels are planted" in doc
    doc3 = p3.read_text()
    assert "type='range' class='mx-slider'" in doc3 and "no map for: missing" in doc3
    assert "type='range'" not in p2.read_text()
    slices = json.loads(re.search(r"id='mx-slices'>(.*?)</script>", doc3).group(1))
    assert len(slices["c0"]["image"]) == 16 and len(set(slices["c0"]["flair_map"])) > 1


def test_overlay_colours_follow_sign():
    base = np.full((2, 2, 3), 128, np.uint8)
    ov = render_overlay(base, np.array([[-1.0, 0.0], [0.0, 1.0]]))
    assert ov[0, 0, 2] > ov[0, 0, 0] and ov[1, 1, 0] > ov[1, 1, 2]        # blue negative, red positive
    assert tuple(ov[0, 1]) == (128, 128, 128)                              # zero stays transparent


def _chromium(args, tmp_path, timeout=90):
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    res = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                         timeout=timeout)
    return res


@pytest.mark.skipif(CHROMIUM is None, reason="headless browser test needs the Debian package chromium (/usr/bin/chromium)")
@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_report_in_headless_chromium(tmp_path, kind):
    if kind == "2d":
        p = _write(tmp_path, "report_2d.html", _cases_2d(), ["signed", "positive"])
    else:
        p = _write(tmp_path, "report_3d.html", _cases_3d(), ["flair_map", "noise"])
    res = _chromium(["--virtual-time-budget=10000", "--dump-dom", p.resolve().as_uri() + "#selfcheck"], tmp_path)
    m = re.search(r'<pre id="mx-selfcheck"[^>]*data-done="1"[^>]*>(.*?)</pre>', res.stdout, re.S)
    assert m, f"self-check did not run; chromium rc={res.returncode}, stderr tail: {res.stderr[-500:]}"
    check = json.loads(m.group(1))
    assert check["images"] == (6 if kind == "2d" else 3)
    assert check["loaded"] == check["images"] and check["broken"] == []   # every <img> has naturalWidth > 0
    if kind == "3d":
        (sl,) = check["sliders"]
        assert sl["src_changed"] and sl["decoded"] and sl["from"] != sl["to"]
    else:
        assert check["sliders"] == []
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"report_{kind}.png"
    if shot.exists():
        shot.unlink()
    _chromium(["--window-size=1100,800", f"--screenshot={shot}", p.resolve().as_uri()], tmp_path)
    assert shot.exists() and shot.stat().st_size > 5000
    from PIL import Image
    px = np.asarray(Image.open(shot).convert("RGB"))
    assert px.shape[:2] == (800, 1100) and px.std() > 10                 # a rendered page, not a blank one


def test_explain_png_and_report_share_one_colour_scheme(tmp_path):
    from PIL import Image

    from medexplain import io
    from medexplain.report import render_image
    g = torch.Generator().manual_seed(0)
    img, amap = torch.rand(1, 12, 12, generator=g), torch.randn(1, 12, 12, generator=g)
    want = render_overlay(render_image(img.numpy()), amap[0].numpy())
    assert np.array_equal(io.overlay_rgb(img, amap), want)
    p = io.write_png_overlay(img, amap, tmp_path / "o.png")
    assert np.array_equal(np.asarray(Image.open(p).convert("RGB")), want)
