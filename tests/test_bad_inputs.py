"""The bad-input matrix (issue 9): every case gets a clear, typed message, and nothing is written half-way.

Already covered elsewhere and not repeated here:
- tests/test_errors.py (API): missing batch axis, wrong channel count, NaN input, integer dtype, NumPy
  input, empty batch; target out of range / wrong count / float / missing; empty and mis-shaped Region
  masks and a Region on a classifier; unknown layer (close matches); a layer without a spatial output;
  CAM on TorchScript (names the working methods); unknown method and option; a non-differentiable model;
  the model restored after an error; missing, unsupported and corrupt image files; model-loading errors.
- tests/test_cli.py (CLI ``explain``): CAM on TorchScript writes nothing; an unknown method fails
  before any work.

New here, 38 tests: manifest errors (API and CLI), run set-up errors that must leave the output folder
untouched, and per-case errors that become error rows while the rest of the run goes on (corrupt or
missing files, NaN volumes, integer volumes, wrong channels or dimensionality, masks off the grid or
empty, wrong targets, a model that cannot be differentiated), plus API gaps found while building the
matrix (the core now closes them).
"""
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import medexplain as mx
from conftest import TinyClassifier, image, make
from medexplain import errors
from medexplain.cli import app
from medexplain.run import ManifestError, read_manifest, run_manifest

S = 8  # volume side: tiny


def cls3d():
    torch.manual_seed(0)
    return TinyClassifier(3, cin=1).eval()


class Argmax3d(torch.nn.Module):
    """A model whose output is piecewise constant in the input: no gradient to explain with."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, 1)

    def forward(self, x):
        return torch.nn.functional.one_hot(self.conv(x).flatten(2).mean(2).argmax(1), 3).float()


def argmax3d():
    torch.manual_seed(0)
    return Argmax3d().eval()


def vol(path, arr, affine=None):
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))
    return path.name


# ---- manifest errors: raised before anything is computed or written ----------------------------------
MANIFESTS = {
    "missing file": (None, "no such manifest file"),
    "empty file": ("", "manifest is empty"),
    "no image column": ("imgae,label\na.nii.gz,1\n", "no 'image' column (did you mean 'imgae'?)"),
    "header only": ("image,label\n", "header but no cases"),
    "target not an int": ("image,target\na.nii.gz,lung\n", "line 2: target must be an integer"),
    "negative label": ("image,label\na.nii.gz,-1\n", "line 2: label must be >= 0"),
    "repeated case_id": ("image,case_id\na.nii.gz,p1\nb.nii.gz,p1\n", "line 3: case_id 'p1' repeats line 2"),
    "empty image cell": ("image,label\n,1\n", "line 2: the image cell is empty"),
    "too many cells": ("image,label\na,b.nii.gz,1\n", "line 2: 3 cells for 2 columns"),
    "repeated column": ("image,label,label\na.nii.gz,1,1\n", "repeated column(s) ['label']"),
}


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_manifest_errors(tmp_path, name):
    text, words = MANIFESTS[name]
    csv = tmp_path / "cases.csv"
    if text is not None:
        csv.write_text(text)
    with pytest.raises(ManifestError) as e:
        read_manifest(csv)
    assert words in str(e.value) and isinstance(e.value, errors.FileFormatError)
    with pytest.raises(ManifestError):
        run_manifest(csv, "test_bad_inputs:cls3d", ["saliency"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_manifest_error_exit_2_and_nothing_written(tmp_path):
    (tmp_path / "cases.csv").write_text("imgae\nx.nii.gz\n")
    res = CliRunner().invoke(app, ["run", str(tmp_path / "cases.csv"), "--model", "test_bad_inputs:cls3d",
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "no 'image' column" in res.output and not (tmp_path / "out").exists()


# ---- set-up errors: caught up front, the output folder is left as it was ------------------------------
@pytest.fixture
def one_case(tmp_path):
    vol(tmp_path / "a.nii.gz", np.random.default_rng(0).random((S,) * 3, dtype=np.float32))
    (tmp_path / "cases.csv").write_text("image\na.nii.gz\n")
    return tmp_path / "cases.csv"


def _scripted(tmp_path):
    torch.jit.save(torch.jit.script(cls3d()), tmp_path / "m.pt")
    return str(tmp_path / "m.pt")


SETUPS = {
    "unknown method": (dict(methods=["gradkam"]), errors.UnknownMethodError, "Did you mean gradcam"),
    "CAM on TorchScript": (dict(methods=["saliency", "gradcam"], model="scripted"), errors.UnsupportedModelError,
                           "method 'gradcam'.*saliency, smoothgrad"),
    "option no method takes": (dict(options={"stepz": 3}), errors.MedexplainError, r"accepts option\(s\) \['stepz'\]"),
    "batch size 0": (dict(batch_size=0), errors.MedexplainError, "batch_size must be a positive integer"),
    "unknown backend": (dict(backend="spark"), errors.MedexplainError, "unknown backend 'spark'"),
    "address without ray": (dict(address="auto"), errors.MedexplainError, "--address is for the ray backend"),
    "unloadable model": (dict(model="no_such_pkg:net"), errors.ModelLoadError, "cannot import"),
    "method listed twice": (dict(methods=["saliency", "Saliency"]), errors.MedexplainError, "listed twice"),
}


@pytest.mark.parametrize("name", list(SETUPS))
def test_setup_errors_write_nothing(tmp_path, one_case, name):
    kw, err, words = SETUPS[name]
    kw = {"methods": ["saliency"], "model": "test_bad_inputs:cls3d", **kw}
    if kw["model"] == "scripted":
        kw["model"] = _scripted(tmp_path)
    with pytest.raises(err, match=words):
        run_manifest(one_case, kw.pop("model"), kw.pop("methods"), tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_out_folder_that_is_not_a_run_is_refused_untouched(tmp_path, one_case):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(errors.MedexplainError, match="not a medexplain run folder"):
        run_manifest(one_case, "test_bad_inputs:cls3d", ["saliency"], out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_cli_bad_option_syntax(tmp_path, one_case):
    res = CliRunner().invoke(app, ["run", str(one_case), "--model", "test_bad_inputs:cls3d", "--out",
                                   str(tmp_path / "out"), "-o", "steps"])
    assert res.exit_code == 2 and "key=value" in res.output and not (tmp_path / "out").exists()


# ---- per-case errors: an error row each, no map, and the run goes on ---------------------------------
ROWS = {  # case -> (method, status, words in the error or note)
    "good": ("saliency", "ok", ""),
    "missing": ("saliency", "error", "image: {d}/missing.nii.gz: no such file"),
    "corrupt": ("saliency", "error", "cannot read as nifti"),
    "truncated": ("saliency", "error", "cannot read as nifti"),
    "nan": ("saliency", "error", "image contains NaN or Inf values"),
    "int16": ("saliency", "ok", ""),
    "two_channels": ("saliency", "error", "channel mismatch: the model expects 1 input channels, the input has 2"),
    "png_2d": ("saliency", "error", "this model expects 3 spatial dims; input has 2"),
    "target_5": ("saliency", "error", "target class [5] out of range for a model with 3 outputs"),
    "mask_off_grid": ("saliency", "error", "mask: mask grid (4, 4, 4) does not match the image grid (8, 8, 8)"),
    "mask_corrupt": ("saliency", "error", "mask: {d}/mask_corrupt.nii.gz: cannot read as nifti"),
    "mask_empty": ("saliency", "ok", "mask is empty: hit_rate undefined"),
}


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    good = rng.random((S,) * 3, dtype=np.float32)
    vol(d / "good.nii.gz", good)
    (d / "corrupt.nii.gz").write_bytes(b"\x1f\x8bnot gzip")
    full = (d / "good.nii.gz").read_bytes()
    (d / "truncated.nii.gz").write_bytes(full[: len(full) // 2])
    vol(d / "nan.nii.gz", np.where(good > 0.5, np.nan, good).astype(np.float32))
    vol(d / "int16.nii.gz", (good * 1000).astype(np.int16))
    vol(d / "two_channels.nii.gz", np.stack([good, good], -1))
    Image.fromarray((good[0] * 255).astype(np.uint8)).save(d / "png_2d.png")
    vol(d / "mask_small.nii.gz", np.ones((4, 4, 4), np.uint8))
    (d / "mask_corrupt.nii.gz").write_bytes(b"junk")
    vol(d / "mask_empty.nii.gz", np.zeros((S,) * 3, np.uint8))
    rows = ["case_id,image,mask,target", "good,good.nii.gz,,", "missing,missing.nii.gz,,", "corrupt,corrupt.nii.gz,,",
            "truncated,truncated.nii.gz,,", "nan,nan.nii.gz,,", "int16,int16.nii.gz,,",
            "two_channels,two_channels.nii.gz,,", "png_2d,png_2d.png,,", "target_5,good.nii.gz,,5",
            "mask_off_grid,good.nii.gz,mask_small.nii.gz,", "mask_corrupt,good.nii.gz,mask_corrupt.nii.gz,",
            "mask_empty,good.nii.gz,mask_empty.nii.gz,"]
    (d / "cases.csv").write_text("\n".join(rows) + "\n")
    res = run_manifest(d / "cases.csv", "test_bad_inputs:cls3d", ["saliency"], d / "out", batch_size=4)
    return d, res


@pytest.mark.parametrize("case", list(ROWS))
def test_bad_case_becomes_an_error_row(bad_run, case):
    d, res = bad_run
    method, status, words = ROWS[case]
    row = next(r for r in res.rows if r["case_id"] == case and r["method"] == method)
    assert row["status"] == status
    text = row.get("error") or row.get("note") or ""
    assert words.format(d=d) in text
    files = sorted(p.name for p in (res.out / "cases" / case).iterdir())
    assert files == (["saliency.json", "saliency.nii.gz"] if status == "ok" else ["saliency.json"])


def test_bad_cases_do_not_stop_the_run_and_the_table_lists_them(bad_run):
    d, res = bad_run
    assert json.loads(res.record.read_text())["status"] == "complete"
    assert res.n_ok == 3 and res.n_error == len(ROWS) - 3
    table = (res.out / "results.csv").read_text()
    assert all(f"\n{case}," in table for case in ROWS)


def test_non_differentiable_model_is_an_error_row_for_gradients_only(tmp_path, one_case):
    res = run_manifest(one_case, "test_bad_inputs:argmax3d", ["saliency", "occlusion"], tmp_path / "out",
                       options={"window": 4})
    sal, occ = res.rows
    assert sal["status"] == "error" and "does not depend differentiably" in sal["error"] and "occlusion" in sal["error"]
    assert occ["status"] == "ok"


def test_api_dtype_mismatch_is_a_typed_error():
    with pytest.raises(errors.InputError, match="dtype"):
        mx.explain(make("cls", 2), image(2, dtype=torch.float32), "saliency", target=0)


def test_api_wrong_dimensionality_is_a_typed_error():
    with pytest.raises(errors.InputError, match="spatial dims"):
        mx.explain(make("cls", 3), image(2), "saliency", target=0)


def test_hit_rate_shape_mismatch():
    with pytest.raises(errors.InputError, match="must be"):
        mx.metrics.hit_rate(torch.zeros(2, 1, 4, 4), torch.zeros(3, 4, 4, dtype=torch.bool))
