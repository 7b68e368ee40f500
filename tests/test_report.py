"""The HTML report: self-contained, atomic, drawn by the one renderer, and checked in headless Chromium
(images load; the 3D viewer's three planes load and each slider moves its plane and the crosshair of the
other two).

Screenshots are saved under tests/artifacts/ (gitignored) as test artifacts.
"""
import base64
import html
import io as pyio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medexplain import data
from medexplain.io import render
from medexplain.io.report import write_report

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--hide-scrollbars"]
PLANES = ("axial", "coronal", "sagittal")


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
    affine = np.array([[0, 0, -1.2, 10], [-0.9, 0, 0, 5], [0, 1.0, 0, -3], [0, 0, 0, 1]])  # axes permuted and flipped
    return [{"image": ds.images[0], "mask": ds.masks[0], "title": "volume", "display_channel": 1, "affine": affine,
             "maps": {"flair_map": torch.cat([0.1 * seg, seg]), "noise": torch.randn(2, 16, 16, 16)}}]


def _write(tmp_path, name, cases, methods):
    rows = [{"method": m, "hit rate": 0.5, "random baseline": 0.02} for m in methods]
    rows += [{"method": "x", "hit rate": float("nan")}]
    return Path(write_report(tmp_path / name, cases, methods, rows, title=f"test {name}", notes=["labels are planted"]))


def _slices(doc):
    return json.loads(re.search(r"id='mx-slices'>(.*?)</script>", doc).group(1))


def test_report_is_self_contained_and_written_atomically(tmp_path):
    p2 = _write(tmp_path, "r2.html", _cases_2d(), ["signed", "positive"])
    p3 = _write(tmp_path, "r3.html", _cases_3d(), ["flair_map", "noise", "missing"])
    assert sorted(os.listdir(tmp_path)) == ["r2.html", "r3.html"]          # no temporary file left
    for p, n_img in ((p2, 2 * 3), (p3, 3 * 3)):                          # 2D: image + 2 maps; 3D: 3 panels x 3 planes
        doc = p.read_text()
        assert len(re.findall(r"<img ", doc)) == n_img
        srcs = re.findall(r"<img src='([^']*)'", doc)
        assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
        assert not re.search(r"(src|href)=['\"](https?:)?//", doc)         # no CDN, nothing external
        assert "<link" not in doc and "n/a" in doc and "labels are planted" in doc
        assert "99th percentile of |map|" in doc and "class='cbar'" in doc  # the scale, stated, with a colour bar
    doc3 = p3.read_text()
    assert doc3.count("class='mx-slider'") == 3 and "no map for: missing" in doc3
    assert "type='range'" not in p2.read_text()
    s = _slices(doc3)["c0"]
    assert s["dims"] == [16, 16, 16] and set(s["panels"]) == {"image", "flair_map", "noise"}
    assert all(len(s["panels"]["image"][p]) == 16 for p in PLANES) and len(set(s["panels"]["flair_map"]["axial"])) > 1


def _decode(uri: str) -> np.ndarray:
    return np.asarray(Image.open(pyio.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def test_report_panels_are_the_renderers(tmp_path):
    """A 2D panel is render.overlay at the map's robust scale (upscaled); a 3D plane tile is render.plane of the
    RAS-reoriented volume, with the mask outline drawn on top."""
    case = _cases_2d()[0]
    doc = _write(tmp_path, "r.html", [case], ["signed"]).read_text()
    src = re.search(r"<img src='([^']*)' alt='c0:signed'", doc).group(1)
    img, amap = case["image"].numpy(), case["maps"]["signed"][0].numpy()
    want = render.overlay(render.image_rgb(img), amap, render.map_scale(amap))
    got = _decode(src)
    f = got.shape[0] // want.shape[0]
    outline = np.any(got != np.repeat(np.repeat(want, f, 0), f, 1), axis=-1)
    assert f == 8 and outline.mean() < 0.05                                 # only the mask's outline differs
    assert np.array_equal(got[::f, ::f][~outline[::f, ::f]], want[~outline[::f, ::f]])
    c3 = _cases_3d()[0]
    s = _slices(_write(tmp_path, "r3.html", [c3], ["flair_map"]).read_text())["c0"]
    vol_ras, _, _ = render.to_ras(c3["image"].numpy()[[1]], c3["affine"])
    k = s["point"][2]
    base = render.image_rgb(render.plane(vol_ras, "axial", k), render.image_window(vol_ras))
    tile = _decode(s["panels"]["image"]["axial"][k])
    f = tile.shape[0] // base.shape[0]
    diff = np.any(tile[::f, ::f] != base, axis=-1)
    assert diff.mean() < 0.2                                               # the green mask outline only
    assert (tile[::f, ::f][diff] == [0, 255, 90]).all()


def _chromium(args, tmp_path, timeout=90):
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=timeout)


def _screenshot(p, tmp_path, name, size="1100,800"):
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / name
    if shot.exists():
        shot.unlink()
    _chromium([f"--window-size={size}", f"--screenshot={shot}", p.resolve().as_uri()], tmp_path)
    assert shot.exists() and shot.stat().st_size > 5000
    px = np.asarray(Image.open(shot).convert("RGB"))
    w, h = (int(v) for v in size.split(","))
    assert px.shape[:2] == (h, w) and px.std() > 10                         # a rendered page, not a blank one


def selfcheck(p: Path, tmp_path) -> dict:
    """The report's own self-check (``#selfcheck``) run in headless Chromium: its result, every <img> loaded."""
    for _attempt in range(2):   # a second browser start only if the first one dumped before the page's load event
        res = _chromium(["--virtual-time-budget=15000", "--dump-dom", p.resolve().as_uri() + "#selfcheck"], tmp_path)
        m = re.search(r'<pre id="mx-selfcheck"[^>]*data-done="1"[^>]*>(.*?)</pre>', res.stdout, re.S)
        if m:
            break
    pre = re.search(r'<pre id="mx-selfcheck".*?</pre>', res.stdout, re.S)
    assert m, (f"self-check did not run; chromium rc={res.returncode}, dumped {len(res.stdout)} chars, "
               f"pre={pre.group(0)[:300] if pre else None}, stderr tail: {res.stderr[-300:]}")
    check = json.loads(m.group(1))
    assert not check.get("timed_out"), check
    assert check["loaded"] == check["images"] and check["broken"] == []   # every <img> has naturalWidth > 0
    return check


def check_viewer(check: dict, n_panels: int) -> None:
    """The tri-planar viewer of one case: the three planes of each panel are there and loaded, and each slider
    moves its plane and the crosshair of the other two planes in every panel, and nothing else."""
    assert sorted(check["planes"]) == sorted(f"c0:{p}" for p in PLANES for _ in range(n_panels))
    assert {s["plane"] for s in check["sliders"]} == set(PLANES)
    other = {"axial": {"coronal:h", "sagittal:h"}, "coronal": {"axial:h", "sagittal:v"},
             "sagittal": {"axial:v", "coronal:v"}}
    for s in check["sliders"]:
        assert s["src_changed"] and s["decoded"] and s["from"] != s["to"], s
        assert set(s["crosshair_moved"]) == other[s["plane"]] and len(s["crosshair_moved"]) == 2 * n_panels, s


@pytest.mark.skipif(CHROMIUM is None, reason="headless browser test needs the Debian package chromium (/usr/bin/chromium)")
@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_report_in_headless_chromium(tmp_path, kind):
    if kind == "2d":
        p = _write(tmp_path, "report_2d.html", _cases_2d(), ["signed", "positive"])
    else:
        p = _write(tmp_path, "report_3d.html", _cases_3d(), ["flair_map", "noise"])
    check = selfcheck(p, tmp_path)
    assert check["images"] == (6 if kind == "2d" else 9)
    if kind == "3d":
        check_viewer(check, 3)
    else:
        assert check["sliders"] == [] and check["planes"] == []
    _screenshot(p, tmp_path, f"report_{kind}.png", "1100,800" if kind == "2d" else "1250,1050")


def _links(doc: str) -> list[str]:
    return re.findall(r"(?:href|src)='([^']*)'", doc)


def test_explain_report_of_a_volume(tmp_path):
    """``explain --report`` (explain_image(report=True)): one self-contained page written through the case
    pipeline's writer, with the input and each method's map in the tri-planar viewer (the headless self-check
    passes: every plane loads, every slider moves its plane and the crosshairs), the caption naming method,
    target, model and baseline, and each method's cost."""
    from medexplain import examples
    from medexplain.pipelines import explain_image

    ex = examples.write(tmp_path / "ex", ["unet.pt", "case"])
    res = explain_image(tmp_path / "ex" / "case.nii.gz", str(ex["unet.pt"]), ["saliency", "occlusion"], tmp_path / "out",
                        target=1, region=tmp_path / "ex" / "lesion.nii.gz", report=True)
    p = tmp_path / "out" / "case_report.html"
    assert p in res.files and p.exists()
    doc = p.read_text()
    assert all(s.startswith("data:image/png;base64,") for s in _links(doc))   # self-contained: no file to lose
    s = _slices(doc)["c0"]
    assert set(s["panels"]) == {"image", "saliency", "occlusion"} and s["dims"] == [16, 16, 16]
    for m, info in res.attributions.items():
        assert f"{m} \u00b7 target 1, region lesion.nii.gz \u00b7 model {ex['unet.pt']}" in doc
        assert f"{info.info['n_forward']} forward" in doc
    assert "Perturbation baseline (what replaced each removed region): zero" in doc
    with pytest.raises(Exception, match="case_report.html"):   # a second call refuses to overwrite it, before compute
        explain_image(tmp_path / "ex" / "case.nii.gz", str(ex["unet.pt"]), ["saliency"], tmp_path / "out",
                      formats="dicom", dicom_reference=None, report=True)
    if CHROMIUM is not None:
        check = selfcheck(p, tmp_path)
        assert check["images"] == 9
        check_viewer(check, 3)
        _screenshot(p, tmp_path, "explain_report_3d.png", "1250,1050")


def test_run_index_report(tmp_path):
    """``run --report``: report.html in the run folder, one row per case and a column per method, each item's
    status with links (relative) to files that exist, and the error rows with their messages."""
    from medexplain import examples
    from medexplain.pipelines.run import run_manifest

    ex = examples.write(tmp_path / "ex", ["classifier.pt", "cases.csv"])
    (tmp_path / "ex" / "broken.dcm").write_text("not a DICOM file")
    manifest = tmp_path / "ex" / "cases3.csv"
    manifest.write_text(ex["cases.csv"].read_text() + "broken.dcm,1,broken\n")
    res = run_manifest(manifest, str(ex["classifier.pt"]), ["saliency", "occlusion"], tmp_path / "run", formats="png",
                       report=True)
    assert res.report == (tmp_path / "run" / "report.html").resolve() and res.report.exists()
    doc = res.report.read_text()
    links = _links(doc)
    assert len(links) == 2 * 2 * 4           # 2 ok cases x 2 methods: map, figure, the thumbnail and its link
    assert all((res.report.parent / link).is_file() for link in links)
    for m in ("saliency", "occlusion"):
        assert f"<th>{m}</th>" in doc and f"cases/ct_small/{m}.png" in doc
    errors = [r for r in res.rows if r["status"] == "error"]
    assert len(errors) == 2 and {r["case_id"] for r in errors} == {"broken"}
    assert doc.count("class='st-ok'") == 4 and doc.count("class='st-error'") == 2
    assert html.escape(errors[0]["error"]) in doc and "broken.dcm" in errors[0]["error"]
    if CHROMIUM is not None:
        _screenshot(res.report, tmp_path, "run_index.png", "1100,800")
