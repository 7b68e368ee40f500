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

Issue 15 (the matrix at the end): typed option values (-o abs=maybe, steps=abc, n_samples=2.5, ranges,
steps=100000), unknown options with close matches, the target grammar (--target, --region), --activation,
--output, the preprocessing flags, --transform and factory imports, an --out that is a file, a model that
fails on the input (ModelError naming the fix), methods that do not apply; in explain, instances, shapley
and run, and the same through the API. Each case checks its typed error and that nothing was written.
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
from medexplain.pipelines.run import ManifestError, read_manifest, run_manifest

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


# ---- issue 15: typed options, the target grammar, preprocessing, model errors: nothing written ---------
class Strided3d(torch.nn.Module):
    """A stride-2 encoder-decoder with a skip connection: sides must be even."""

    def __init__(self):
        super().__init__()
        self.down = torch.nn.Conv3d(1, 2, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose3d(2, 2, 2, stride=2)
        self.skip = torch.nn.Conv3d(1, 2, 1)

    def forward(self, x):
        return self.up(self.down(x)) + self.skip(x)


class Pair3d(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = TinyClassifier(3, cin=1)

    def forward(self, x):
        z = self.net(x)
        return z, z


class Background3d(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.copy_(torch.tensor([5.0, -5.0]))

    def forward(self, x):
        return self.conv(x)


def strided3d():
    torch.manual_seed(0)
    return Strided3d().eval()


def pair3d():
    torch.manual_seed(0)
    return Pair3d().eval()


def seg3d():
    from conftest import TinySegmenter
    torch.manual_seed(0)
    return TinySegmenter(3, cin=1, k=2).eval()


def background3d():
    return Background3d().eval()


def raising_factory():
    raise RuntimeError("needs a GPU")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("h15")
    rng = np.random.default_rng(0)
    vol(d / "v.nii.gz", rng.random((S,) * 3, dtype=np.float32))
    vol(d / "v9.nii.gz", rng.random((9,) * 3, dtype=np.float32))
    vol(d / "two.nii.gz", rng.random((S, S, S, 2), dtype=np.float32))
    vol(d / "empty.nii.gz", np.zeros((S,) * 3, np.uint8))
    torch.jit.save(torch.jit.script(cls3d()), d / "cls.pt")
    (d / "afile").write_text("keep me")
    (d / "broken_h15.py").write_text("raise ValueError('bad config')\n")
    (d / "cases.csv").write_text("image,intensity\nv.nii.gz,zcore\n")
    (d / "ok.csv").write_text("image\nv.nii.gz\n")
    return d


V, CLS, SEG = "{d}/v.nii.gz", "test_bad_inputs:cls3d", "test_bad_inputs:seg3d"
E = ["explain", V, "--model", CLS]
CLI_CASES = {  # name -> (arguments without --out, typed error, words in the message)
    "bool option not a bool": (E + ["-o", "abs=maybe"], errors.OptionError, "abs must be a boolean"),
    "int option not a number": (E + ["--method", "integrated_gradients", "-o", "steps=abc"], errors.OptionError,
                                "steps must be an integer, got 'abc'"),
    "int option a fraction": (E + ["--method", "smoothgrad", "-o", "n_samples=2.5"], errors.OptionError,
                              "n_samples must be an integer"),
    "n_samples 0": (E + ["--method", "smoothgrad", "-o", "n_samples=0"], errors.OptionError, "n_samples must be >= 1"),
    "chunk_size 0": (E + ["--method", "smoothgrad", "-o", "chunk_size=0"], errors.OptionError, "chunk_size must be >= 1"),
    "chunk_size -3": (E + ["--method", "integrated_gradients", "-o", "chunk_size=-3"], errors.OptionError,
                      "chunk_size must be >= 1"),
    "steps 100000": (E + ["--method", "integrated_gradients", "-o", "steps=100000"], errors.OptionError, "74.5 GiB"),
    "option misspelt": (E + ["--method", "smoothgrad", "-o", "n_sampels=3"], errors.OptionError,
                        "Did you mean n_samples"),
    "option without =": (E + ["-o", "steps"], errors.OptionError, "key=value"),
    "layer misspelt, no CAM chosen": (E + ["--layer", "featurs.2"], errors.LayerNotFoundError, "features.2"),
    "layer no chosen method takes": (E + ["--layer", "features.2"], errors.OptionError, "none of ['saliency'] takes"),
    "target out of range": (E + ["--target", "7"], errors.TargetError, "out of range"),
    "target not a class": (E + ["--target", "lung"], errors.TargetError, "class index"),
    "region on a classifier": (E + ["--region", "predicted"], errors.TargetError, "--region is for segmentation"),
    "region file missing": (["explain", V, "--model", SEG, "--region", "{d}/nomask.nii.gz"], errors.FileFormatError,
                            "no such file"),
    "region empty": (["explain", V, "--model", SEG, "--target", "1", "--region", "{d}/empty.nii.gz"],
                     errors.EmptyRegionError, "is empty"),
    "segmenter predicts background only": (["explain", V, "--model", "test_bad_inputs:background3d"],
                                           errors.EmptyRegionError, "no foreground voxel"),
    "intensity unknown": (E + ["--intensity", "zscor"], errors.OptionError, "unknown --intensity"),
    "intensity percentiles reversed": (E + ["--intensity", "percentile:99,1"], errors.OptionError, "LOW < HIGH"),
    "spacing not numbers": (E + ["--spacing", "a,b"], errors.OptionError, "--spacing must be numbers"),
    "divisible-by 0": (E + ["--divisible-by", "0"], errors.OptionError, "positive"),
    "orientation not axis codes": (E + ["--orientation", "XYZ"], errors.OptionError, "axis codes"),
    "size and multiple together": (E + ["--spatial-size", "8", "--divisible-by", "4"], errors.OptionError, "not both"),
    "spacing for the wrong dims": (E + ["--spacing", "1,2"], errors.OptionError, "2 values for an image with 3"),
    "transform module missing": (E + ["--transform", "no_such_mod_h15:build"], errors.ModelLoadError,
                                 "not found on sys.path"),
    "transform module raises": (E + ["--transform", "broken_h15:build"], errors.ModelLoadError,
                                "raised while importing: ValueError: bad config"),
    "model attribute missing": (["explain", V, "--model", "test_bad_inputs:cls3"], errors.ModelLoadError,
                                "has no attribute 'cls3'; did you mean cls3d"),
    "model factory raises": (["explain", V, "--model", "test_bad_inputs:raising_factory"], errors.ModelLoadError,
                             "calling the factory raised RuntimeError: needs a GPU"),
    "two channels into a 1-channel TorchScript": (["explain", "{d}/two.nii.gz", "--model", "{d}/cls.pt"],
                                                  errors.ModelError, "first layer takes 1 channel(s)"),
    "odd sides into a stride-2 model": (["explain", "{d}/v9.nii.gz", "--model", "test_bad_inputs:strided3d"],
                                        errors.ModelError, "add --divisible-by 2"),
    "CAM on TorchScript": (["explain", V, "--model", "{d}/cls.pt", "--method", "saliency,gradcam"],
                           errors.UnsupportedModelError, "Methods that apply:"),
    "method listed twice": (E + ["--method", "saliency,Saliency"], errors.OptionError, "listed twice"),
    "output index out of range": (["explain", V, "--model", "test_bad_inputs:pair3d", "--output", "5"],
                                  errors.UnsupportedModelError, "out of range"),
    "output key on a tuple": (["explain", V, "--model", "test_bad_inputs:pair3d", "--output", "main"],
                              errors.UnsupportedModelError, "output='main'"),
    "instances method": (["instances", V, "--model", SEG, "--method", "saliency", "--aggregate", "max"],
                         errors.OptionError, "aggregate='max' do not apply to method 'saliency'"),
    "instances threshold": (["instances", V, "--model", SEG, "--threshold", "1.5"], errors.OptionError, "[0, 1]"),
    "instances region all": (["instances", V, "--model", SEG, "--region", "all"], errors.TargetError, "need regions"),
    "run manifest preprocessing": (["run", "{d}/cases.csv", "--model", CLS], errors.FileFormatError,
                                   "line 2: unknown --intensity 'zcore'"),
    "run option type": (["run", "{d}/ok.csv", "--model", CLS, "--method", "smoothgrad", "-o", "n_samples=x"],
                        errors.OptionError, "n_samples must be an integer"),
}


#: Bad flag values the command line's parser refuses (choices, ranges, method names: medexplain.cli.params),
#: before any import of the library and before anything is written.
PARSER_CASES = {
    "activation unknown": (E + ["--activation", "softmaxx"], "'softmaxx' is not one of"),
    "unknown method": (E + ["--method", "gradkam"], "Did you mean gradcam"),
    "instances n_samples 0": (["instances", V, "--model", SEG, "--n-samples", "0"], "greater than or equal to 1"),
    "shapley activation": (["shapley", "{d}/two.nii.gz", "--model", SEG, "--activation", "softmaxx"],
                           "'softmaxx' is not one of"),
}


@pytest.mark.parametrize("name", list(PARSER_CASES))
def test_cli_parser_refuses_bad_flag_values(files, name):
    import re
    args, words = PARSER_CASES[name]
    out = files / f"out_{abs(hash(name))}"
    res = CliRunner().invoke(app, [a.format(d=files) for a in args] + ["--out", str(out)])
    text = " ".join(re.sub(r"[\u2500-\u257f]", " ", res.output).split())
    assert res.exit_code == 2 and "Invalid value" in text and "Traceback" not in text, (name, res.output)
    assert words in text, (name, text)
    assert not out.exists()


def _typed(res):
    """The MedexplainError behind a CLI exit (the one handler re-raises it as typer.Exit)."""
    e = res.exception
    while e is not None and not isinstance(e, errors.MedexplainError):
        e = e.__context__
    return e


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_bad_input_matrix(files, name, monkeypatch):
    args, err, words = CLI_CASES[name]
    monkeypatch.chdir(files)                                  # broken_h15.py is importable from here
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    out = files / f"out_{abs(hash(name))}"
    res = CliRunner().invoke(app, [a.format(d=files) for a in args] + ["--out", str(out)])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "error:" in text and "Traceback" not in text, (name, res.output)
    assert isinstance(_typed(res), err), (name, type(_typed(res)), text)
    assert words in text, (name, text)
    assert not out.exists()                                   # nothing written, not even the folder


@pytest.mark.parametrize("where", ["afile", "afile/sub"])
def test_cli_out_that_is_a_file(files, where):
    res = CliRunner().invoke(app, [a.format(d=files) for a in E] + ["--out", str(files / where)])
    assert res.exit_code == 2 and isinstance(_typed(res), errors.OutputPathError) and "is a file" in res.output
    assert (files / "afile").read_text() == "keep me"


def _api_cases(d):
    from medexplain.pipelines import contrast_shapley, explain_image, explain_lesion_instances
    model, x = cls3d(), torch.rand(1, 1, S, S, S)
    return {
        "n_samples as text": (lambda o: mx.explain(model, x, "smoothgrad", target=0, n_samples="10"), errors.OptionError,
                              "n_samples must be an integer, got '10'"),
        "abs as text": (lambda o: mx.explain(model, x, "saliency", target=0, abs="false"), errors.OptionError,
                        "abs must be a boolean"),
        "chunk_size 0": (lambda o: mx.explain(model, x, "integrated_gradients", target=0, chunk_size=0),
                         errors.OptionError, ">= 1"),
        "steps a fraction": (lambda o: mx.explain(model, x, "integrated_gradients", target=0, steps=2.5),
                             errors.OptionError, "steps must be an integer"),
        "explain_image option": (lambda o: explain_image(d / "v.nii.gz", model, "saliency", o, options={"abs": "maybe"}),
                                 errors.OptionError, "abs must be a boolean"),
        "explain_image region": (lambda o: explain_image(d / "v.nii.gz", seg3d(), "saliency", o, target=1,
                                                         region=d / "empty.nii.gz"), errors.EmptyRegionError, "empty"),
        "instances n_samples": (lambda o: explain_lesion_instances(d / "v.nii.gz", seg3d(), o, n_samples=0),
                                errors.OptionError, ">= 1"),
        "instances chunk_size": (lambda o: explain_lesion_instances(d / "v.nii.gz", seg3d(), o, chunk_size=0),
                                 errors.OptionError, "chunk_size must be >= 1"),
        "shapley activation": (lambda o: contrast_shapley(d / "two.nii.gz", [mx.ModelSpec(seg3d(), activation="soft")],
                                                          o), errors.InputError, "must be one of"),
        "run options": (lambda o: run_manifest(d / "ok.csv", CLS, ["smoothgrad"], o, options={"n_samples": 0}),
                        errors.OptionError, ">= 1"),
    }


@pytest.mark.parametrize("name", ["n_samples as text", "abs as text", "chunk_size 0", "steps a fraction",
                                  "explain_image option", "explain_image region", "instances n_samples",
                                  "instances chunk_size", "shapley activation", "run options"])
def test_api_bad_input_matrix(files, name):
    call, err, words = _api_cases(files)[name]
    out = files / f"api_{abs(hash(name))}"
    with pytest.raises(err) as e:
        call(out)
    assert words in str(e.value)
    assert not out.exists()


def test_matrix_has_at_least_30_cases():
    assert len(CLI_CASES) + 2 + len(_api_cases(None)) >= 30


# ---- issue 27 (part B): zero raw crashes, zero silent results ------------------------------------------------
@pytest.fixture(scope="module")
def f27(tmp_path_factory):
    d = tmp_path_factory.mktemp("i27")
    rng = np.random.default_rng(27)
    vol(d / "v.nii.gz", rng.random((S,) * 3, dtype=np.float32))
    vol(d / "scan.nii.gz", (rng.random((S,) * 3) * 900 + 100).astype(np.float32))      # an intensity scan
    vol(d / "mr16.nii.gz", rng.integers(0, 4000, (S,) * 3).astype(np.int16))            # integer, but an image
    lab = np.zeros((S,) * 3, np.uint8)
    lab[2:5, 2:5, 2:5] = 1
    lab[6:8, 6:8, 6:8] = 2
    vol(d / "labels.nii.gz", lab)
    vol(d / "prob.nii.gz", np.where(lab > 0, 0.8, 0.1).astype(np.float32))
    (d / "afile").write_text("keep me")
    return d


@pytest.mark.parametrize("ref,words", [("scan.nii.gz", "512 distinct values from 105.9 to 994.8"),
                                       ("mr16.nii.gz", "non-zero labels, more than 100"),
                                       ("prob.nii.gz", "2 distinct values from 0.1 to 0.8")])
def test_regression_reference_must_be_a_label_map(f27, ref, words):
    """Regression (issue 27): `instances --reference` accepted any image as ground truth (an intensity scan was
    thresholded at 0 and TP/FP/FN written without a word); it is refused with the values found, before the model
    runs, and nothing is written. A probability map needs --reference-threshold."""
    out = f27 / f"out_ref_{ref}"
    res = CliRunner().invoke(app, ["instances", str(f27 / "v.nii.gz"), "--model", SEG, "--reference", str(f27 / ref),
                                   "--out", str(out)])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and isinstance(_typed(res), errors.InputError), res.output
    assert "is not a label map" in text and words in text and "--reference-threshold" in text, text
    assert not out.exists()
    with pytest.raises(errors.InputError, match="not a label map"):    # the API it calls
        from medexplain.pipelines import explain_lesion_instances
        explain_lesion_instances(f27 / "v.nii.gz", seg3d(), out, reference=f27 / ref)
    assert not out.exists()


def test_reference_label_map_and_thresholded_probability_map_are_accepted(f27):
    from medexplain.segmentation import find_instances, reference_foreground
    lab = nib.load(str(f27 / "labels.nii.gz")).get_fdata()                          # a label map stored as float
    assert (reference_foreground(lab) == (lab > 0)).all()
    prob = nib.load(str(f27 / "prob.nii.gz")).get_fdata()
    assert (reference_foreground(prob, 0.5) == (lab > 0)).all()
    with pytest.raises(errors.InputError, match="not a probability map"):
        reference_foreground(lab * 3.5, 0.5)
    pred = torch.from_numpy(lab > 0).float() * 0.9
    kinds = [i.kind for i in find_instances(pred, reference=torch.from_numpy(prob), reference_threshold=0.5)]
    assert kinds == ["TP", "TP"]
    scan = nib.load(str(f27 / "scan.nii.gz")).get_fdata()
    with pytest.raises(errors.InputError, match="not a label map: it holds 512 distinct values"):
        find_instances(pred, reference=torch.from_numpy(scan))
    for ref, extra in (("labels.nii.gz", []), ("prob.nii.gz", ["--reference-threshold", "0.5"])):
        out = f27 / f"ok_{ref}"
        res = CliRunner().invoke(app, ["instances", str(f27 / "v.nii.gz"), "--model", SEG, "--reference",
                                       str(f27 / ref), *extra, "--n-samples", "1", "--out", str(out)])
        assert res.exit_code == 0, res.output
        assert (out / "info.json").exists()


@pytest.mark.parametrize("t", [2.0, -0.1, float("nan")])
def test_find_instances_threshold_is_a_probability_like_the_cli(t):
    """Issue 27: find_instances(threshold=2.0) returned 0 instances silently; the CLI refuses it."""
    from medexplain.segmentation import find_instances
    with pytest.raises(errors.OptionError, match=r"threshold is a probability in \[0, 1\]"):
        find_instances(torch.rand(S, S, S), threshold=t)


def test_case_ids_keep_unicode_and_collisions_are_refused_by_name(tmp_path):
    """Issue 27: `Müller` was rewritten `M_ller`, so Müller and Möller collided as duplicates. Ids are kept as
    written; their folders are made safe by a reversible rule; ids that would share a folder are refused."""
    from medexplain.io import original_name, safe_file_name
    for name in ("Müller", "a/b", "50%", "..", " x.", "患者 7", 'c:d*e?f"g<h>i|j\\k\tl'):
        safe = safe_file_name(name)
        assert original_name(safe) == name and "/" not in safe and "\\" not in safe and not safe.startswith(".")
    assert safe_file_name("Müller") == "Müller" and safe_file_name("a/b") == "a%2Fb"
    vol(tmp_path / "a.nii.gz", np.random.default_rng(0).random((S,) * 3, dtype=np.float32))
    (tmp_path / "cases.csv").write_text("image,case_id\na.nii.gz,Müller\na.nii.gz,Möller\na.nii.gz,M_ller\n",
                                        encoding="utf-8")
    cases = read_manifest(tmp_path / "cases.csv")
    assert [c.case_id for c in cases] == ["Müller", "Möller", "M_ller"]
    res = run_manifest(tmp_path / "cases.csv", CLS, ["saliency"], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "cases").iterdir()) == sorted(["Müller", "Möller", "M_ller"])
    assert sorted(r["case_id"] for r in res.rows) == sorted(["Müller", "Möller", "M_ller"])
    (tmp_path / "clash.csv").write_text("image,case_id\na.nii.gz,Müller\na.nii.gz,müller\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="line 3: case_id 'müller' and 'Müller' \\(line 2\\) would share"):
        read_manifest(tmp_path / "clash.csv")


def test_shapley_with_one_input_channel_is_refused_as_degenerate(f27):
    """Issue 27: shapley over 5 folds of a one-channel network reported a rank variance of 0 as if meaningful.
    The pipeline refuses before any model runs and points to the fold agreement of the maps."""
    from medexplain.segmentation.shapley import channel_shapley, fold_map_agreement, mean_foreground_probability
    out = f27 / "out_shapley1"
    res = CliRunner().invoke(app, ["shapley", str(f27 / "v.nii.gz"), "--model", SEG, "--model", SEG,
                                   "--out", str(out)])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and isinstance(_typed(res), errors.InputError), res.output
    assert "two or more input channels" in text and "fold_map_agreement" in text and not out.exists()
    with pytest.warns(UserWarning, match="one player"):
        channel_shapley(seg3d(), torch.rand(1, 1, S, S, S), mean_foreground_probability(1))
    m = torch.rand(1, S, S, S)
    agree = fold_map_agreement([m, m.clone(), -m])
    assert agree["pairs"][0][2] == pytest.approx(1.0) and agree["min"] == pytest.approx(-1.0)
    with pytest.raises(errors.InputError, match="two or more"):
        fold_map_agreement([m])


def _out_cases_27(d):
    bad = str(d / "afile" / "sub")
    return {
        "instances": ["instances", str(d / "v.nii.gz"), "--model", SEG, "--out", bad],
        "shapley": ["shapley", str(d / "v.nii.gz"), str(d / "v.nii.gz"), "--model", SEG, "--out", bad],
        "evaluate": ["evaluate", "--maps", str(d / "nomaps"), "--masks", str(d / "nomasks"), "--out", bad],
        "train": ["train", "chest_xray", "--out", bad, "--n", "8", "--epochs", "1"],
        "demo": ["demo", "--out", bad, "--size", "small"],
    }


@pytest.mark.parametrize("command", ["instances", "shapley", "evaluate", "train", "demo"])
def test_out_that_cannot_be_created_is_refused_before_compute(f27, command):
    """Issue 27: an --out that cannot be created was a traceback after the compute; every command checks it
    (medexplain.io.check_output_dir) first: here its parent is a file, and even the inputs are not read."""
    res = CliRunner().invoke(app, _out_cases_27(f27)[command])
    assert res.exit_code == 2 and isinstance(_typed(res), errors.OutputPathError), (command, res.output)
    assert "is a file" in res.output and (f27 / "afile").read_text() == "keep me"


class CallCounter(torch.nn.Module):
    """Counts the rows of every forward (the probe row included)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.rows = net, []

    def forward(self, x):
        self.rows.append(int(x.shape[0]))
        return self.net(x)


def test_memory_is_a_checked_cost_before_compute(tmp_path):
    """Issue 27: integrated gradients on a full-size radiograph sent 64 steps through the model in one call and
    was killed by the kernel with no message. Each method's plan measures one model call on a probe row, caps
    chunk_size to the budget, and refuses before any compute when one row does not fit, naming --memory."""
    from medexplain.engine.options import MemoryBudgetError, probe_row_bytes
    m, x = CallCounter(cls3d()), torch.rand(1, 1, S, S, S)
    per_row = probe_row_bytes(m, x)
    assert per_row > 2 * x.numel() * 4 and m.rows == [1]                      # one probe row, measured, cached
    assert probe_row_bytes(m, x) == per_row and m.rows == [1]
    with pytest.raises(MemoryBudgetError, match=r"--memory GB; memory= in Python"):
        mx.explain(m, x, "integrated_gradients", target=0, memory=per_row / 2 / 1e9)
    assert m.rows == [1]                                                        # nothing computed but the probe
    free = mx.explain(cls3d(), x, "integrated_gradients", target=0, steps=8)
    capped = mx.explain(m, x, "integrated_gradients", target=0, steps=8, memory=3.5 * per_row / 1e9)
    assert capped.info["memory"]["rows_per_call"] == 3 and capped.info["memory"]["capped_chunk_size"]
    assert max(m.rows[1:]) <= 3 and sum(m.rows[1:]) == capped.info["n_forward"]
    assert torch.allclose(capped.map, free.map, atol=1e-6)                     # the same map, in smaller calls
    with pytest.raises(errors.OptionError, match="budget in GB > 0"):
        mx.explain(m, x, "saliency", target=0, memory=-1)
    flips = mx.Model(cls3d(), flip_axes=(0, 1))          # 4 passes in one call: their saved tensors all count
    assert probe_row_bytes(flips, x) > 2 * probe_row_bytes(cls3d(), x)
    # the command line: a typed error naming the option, before any compute; nothing written
    vol(tmp_path / "v.nii.gz", np.random.default_rng(0).random((S,) * 3, dtype=np.float32))
    res = CliRunner().invoke(app, ["explain", str(tmp_path / "v.nii.gz"), "--model", CLS, "--method",
                                   "saliency,integrated_gradients", "--memory", "1e-9", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and isinstance(_typed(res), MemoryBudgetError) and "--memory" in res.output, res.output
    assert not (tmp_path / "o").exists()
    # run: such cases are error rows, the run goes on
    (tmp_path / "cases.csv").write_text("image\nv.nii.gz\n")
    rr = run_manifest(tmp_path / "cases.csv", CLS, ["saliency"], tmp_path / "run", memory=1e-9)
    assert [r["status"] for r in rr.rows] == ["error"] and "MemoryBudgetError" in rr.rows[0]["error_type"]


def test_instances_and_shapley_print_the_estimate_up_front(f27, monkeypatch):
    """Issue 27: `instances --n-samples 1e8` printed nothing for minutes while explain estimated "~281 h" up
    front. instances and shapley now give the same estimate (rows, time, memory of one call) before the
    saliency runs, and progress with a total."""
    import medexplain.pipelines as pipelines
    from medexplain.pipelines import contrast_shapley

    def stop(*a, **k):   # the explain stage of the one case pipeline calls mx.explain after the estimate
        raise errors.InputError("stopped by the test after the estimate")

    monkeypatch.setattr(pipelines, "explain", stop)
    res = CliRunner().invoke(app, ["instances", str(f27 / "v.nii.gz"), "--model", SEG, "--region",
                                   str(f27 / "labels.nii.gz"), "--n-samples", "100000000", "--out", str(f27 / "o_est")])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "stopped by the test" in text, text
    assert text.index("estimate: instance_smoothgrad: about 100000000 forward and 200000000 backward") < text.index("stopped")
    assert " h at " in text and "per model call of 10 row(s)" in text, text
    ests, progress = [], []
    vol(f27 / "two.nii.gz", np.random.default_rng(1).random((S, S, S, 2), dtype=np.float32))
    from conftest import TinySegmenter
    two = [TinySegmenter(3, cin=2, k=2).eval() for _ in range(2)]
    monkeypatch.undo()
    contrast_shapley(f27 / "two.nii.gz", two, f27 / "o_shap", on_estimate=ests.append,
                     on_progress=lambda *a: progress.append(a))
    assert [(e.method, e.n_forward, e.n_backward) for e in ests] == [("model 1/2", 4, 0), ("model 2/2", 4, 0)]
    assert progress[-1] == ("model 2/2", 4, 4) and ests[0].memory.rows_per_call == 16


class Slow3d(torch.nn.Module):
    """A classifier that takes a while per call, so a run can be stopped in the middle."""

    def __init__(self):
        super().__init__()
        self.net = TinyClassifier(3, cin=1)

    def forward(self, x):
        import time
        time.sleep(0.3)
        return self.net(x)


def slow3d():
    torch.manual_seed(0)
    return Slow3d().eval()


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_run_stopped_by_a_signal_says_resume_and_exits_128_plus_signal(tmp_path, sig, code):
    """Issue 27: Ctrl-C/SIGTERM ended `run` with no "rerun with --resume" hint."""
    import os
    import signal
    import subprocess
    import sys
    import time
    vol(tmp_path / "a.nii.gz", np.random.default_rng(0).random((S,) * 3, dtype=np.float32))
    (tmp_path / "cases.csv").write_text("image\n" + "a.nii.gz\n" * 40)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(p) for p in (__import__("medexplain").__path__[0] + "/..",
                                                                          os.path.dirname(__file__))]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from medexplain.cli import main; main()", "run",
                             str(tmp_path / "cases.csv"), "--model", "test_bad_inputs:slow3d", "--batch-size", "1",
                             "--out", str(tmp_path / "out")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    t0 = time.time()
    while not (tmp_path / "out" / "cases").exists() and time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, (out, err)
    assert "stopped; rerun with --resume to continue" in " ".join((out + err).split()) and "Traceback" not in err
    left = [p.name for p in (tmp_path / "out").rglob(".*")]
    assert left == []                                                   # no partial (temporary) file is left


def test_a_large_row_is_refused_on_the_probe_of_a_crop():
    """The refusal itself stays within the budget: a large row (here 1 x 1100 x 1000) is first probed on a centre
    crop, scaled by the voxel count; when that exceeds the budget the full-size probe is never run. The scaled
    estimate agrees with the full probe (activations scale with the voxels)."""
    from medexplain.engine.options import MemoryBudgetError, probe_row_bytes
    torch.manual_seed(0)
    m, x = CallCounter(TinyClassifier(2, cin=1).eval()), torch.rand(1, 1, 1100, 1000)
    with pytest.raises(MemoryBudgetError, match="centre crop first"):
        mx.explain(m, x, "saliency", target=0, memory=1e-3)
    assert len(m.rows) == 1                                            # one probe, of the crop only
    full = probe_row_bytes(CallCounter(m.net), x)                      # no limit: the full row
    scaled = probe_row_bytes(CallCounter(m.net), x, limit=1)           # over the limit: the crop, scaled
    assert 0.8 < scaled / full < 1.25, (scaled, full)


# ---- issue 27 (part A): output selection, checkpoints, API validation, messages -------------------------
class LogitsDict3d(torch.nn.Module):
    """A classifier returning a one-key dict, as many training codes do."""

    def __init__(self):
        super().__init__()
        self.net = TinyClassifier(3, cin=1)

    def forward(self, x):
        return {"logits": self.net(x)}


def logits_dict3d():
    torch.manual_seed(0)
    return LogitsDict3d().eval()


def test_output_index_on_a_plain_tensor_is_a_typed_error(files):
    """output=0 on a model returning one tensor used to index its channel axis silently (out[:, 0])."""
    model, x = cls3d(), torch.rand(1, 1, S, S, S)
    with pytest.raises(errors.UnsupportedModelError, match="not stacked heads") as e:
        mx.explain(mx.Model(model, output=0), x, "saliency", target=0)
    assert "give it as the target" in str(e.value) and "o.ndim == x.ndim + 1" in str(e.value)
    out = files / "out_output_index"
    res = CliRunner().invoke(app, ["explain", V.format(d=files), "--model", CLS, "--output", "0", "--out", str(out)])
    assert res.exit_code == 2 and isinstance(_typed(res), errors.UnsupportedModelError), res.output
    assert not out.exists()


def test_regression_one_key_dict_output_is_its_value_with_a_note():
    """Regression (issue 27): a model returning {"logits": ...} was refused until output="logits"."""
    model, x = logits_dict3d(), torch.rand(2, 1, S, S, S)
    attr = mx.explain(model, x, "saliency", target=1)
    ref = mx.explain(model.net, x, "saliency", target=1)
    torch.testing.assert_close(attr.map, ref.map)
    assert "'logits'" in attr.info["output_note"] and "output_note" not in ref.info
    assert "saliency" in mx.available_methods(model=model, x=x[:1])
    two = {"a": torch.zeros(1, 2), "b": torch.zeros(1, 2)}
    with pytest.raises(errors.UnsupportedModelError, match=r"keys \['a', 'b'\]"):
        mx.core.select_output(two)


def tiny_cls3d():
    return TinyClassifier(3, cin=1).eval()


@pytest.mark.parametrize("layout", ["state_dict", "model", "model_state_dict", "network_weights", "plain"])
@pytest.mark.parametrize("parallel", [False, True])
def test_regression_checkpoint_layouts_load_as_weights(tmp_path, layout, parallel):
    """Regression (issue 27): a {'state_dict': ..., 'epoch': 3} checkpoint, what most training loops save, was
    refused as --weights. Each common layout loads (weights_only=True), DataParallel's 'module.' prefix removed,
    and a warning says which entry was read."""
    from medexplain.models.loading import load_model
    torch.manual_seed(1)
    src = cls3d()
    sd = {("module." if parallel else "") + k: v for k, v in src.state_dict().items()}
    torch.save(sd if layout == "plain" else {layout: sd, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "w.pt")
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = load_model("test_bad_inputs:tiny_cls3d", str(tmp_path / "w.pt"))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), src.state_dict().values()))
    said = " ".join(str(w.message) for w in caught)
    if layout != "plain":
        assert f"loaded the {layout!r} entry of the checkpoint (other entries: epoch, optimizer)" in said
    assert ("'module.' removed" in said) == parallel
    if layout == "plain" and not parallel:
        assert "--weights" not in said


def test_weights_not_fitting_or_not_weights_write_nothing(tmp_path, files):
    torch.save({"epoch": 3, "weights": cls3d().state_dict()}, tmp_path / "w.pt")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["explain", V.format(d=files), "--model", "test_bad_inputs:tiny_cls3d",
                                   "--weights", str(tmp_path / "w.pt"), "--out", str(out)])
    assert res.exit_code == 2 and isinstance(_typed(res), errors.ModelLoadError) and "model_state_dict" in res.output
    assert not out.exists()


@pytest.mark.parametrize("method, key", [("integrated_gradients", "baseline"), ("deeplift", "baselines"),
                                         ("feature_ablation", "baselines")])
def test_api_baseline_of_the_wrong_shape_is_a_typed_error(method, key):
    if method not in mx.available_methods():
        pytest.skip(f"{method} not registered")
    model, x = cls3d(), torch.rand(2, 1, S, S, S)
    for bad, words in [(torch.zeros(1, 1, S + 1, S, S), "does not broadcast"), (torch.zeros(3, 1, S, S, S), "does not broadcast"),
                       (torch.full((1, 1, S, S, S), float("nan")), "NaN"), ("black", "a number or")]:   # feature_ablation:
        # a number, a tensor or a named baseline (zero, mean, median, blur: tests/test_perturbation_baselines.py)
        with pytest.raises(errors.InputError, match=words):
            mx.explain(model, x, method, target=0, **{key: bad})
    one = mx.explain(model, x, method, target=0, **{key: torch.zeros(1, 1, S, S, S)}).map   # one image: broadcast
    torch.testing.assert_close(one, mx.explain(model, x, method, target=0, **{key: 0.0}).map)


def test_api_available_methods_on_an_input_too_small_is_the_model_error():
    """16^3 into MONAI's BasicUNet (its bottleneck instance norm gets one voxel): the raw ValueError passed through."""
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    net = nets.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(2, 2, 2, 2, 2, 2)).eval()
    with pytest.raises(errors.ModelError, match=r"failed on the input \(1, 1, 16, 16, 16\)") as e:
        mx.available_methods(model=net, x=torch.rand(1, 1, 16, 16, 16))
    assert "--divisible-by 32" in str(e.value)            # the padding that runs, found by probing
    assert "saliency" in mx.available_methods(model=net, x=torch.rand(1, 1, 32, 32, 32))


def test_api_normalize_unknown_mode_is_a_typed_error_with_a_close_match():
    with pytest.raises(errors.OptionError, match="did you mean 'minmax'"):
        mx.normalize(torch.rand(1, 1, 4, 4), "min-max")
    assert issubclass(errors.OptionError, ValueError)


def test_medcam_on_a_vit_says_what_it_needs():
    """ViT + Med-CAM said "layer '<activation layer>' not found"."""
    nets = pytest.importorskip("monai.networks.nets")
    from medexplain.methods.medcam import MedCAMConfig
    torch.manual_seed(0)
    vit = nets.ViT(1, img_size=16, patch_size=8, hidden_size=12, mlp_dim=12, num_layers=1, num_heads=2,
                   classification=True, num_classes=2, spatial_dims=2, post_activation=None).eval()
    with pytest.raises(errors.UnsupportedModelError, match=r"spatial map \(B, C, \*spatial\)") as e:
        mx.explain(mx.Model(vit, output=0), torch.rand(1, 1, 16, 16), "medcam", target=0, steps=1)
    assert "layers=" in str(e.value) and "<activation layer>" not in str(e.value)
    assert MedCAMConfig.build(layers="a.1, b.2").layers == ("a.1", "b.2")     # the command line's comma list


@pytest.mark.parametrize("args, words", [(["--upsample", "bilinear"], "do not apply to method 'instance_smoothgrad'"),
                                         (["--method", "gradcam++", "--upsample", "nearest"], "is not one of")])
def test_cli_instances_upsample_is_checked_before_anything_is_written(files, args, words):
    """A value outside the choices is refused by the parser (medexplain.cli.params); a valid value that does not
    apply to the method, by the library's typed error."""
    import re
    out = files / f"out_up_{abs(hash(tuple(args)))}"
    res = CliRunner().invoke(app, ["instances", V.format(d=files), "--model", SEG, *args, "--out", str(out)])
    text = " ".join(re.sub(r"[\u2500-\u257f]", " ", res.output).split())
    assert res.exit_code == 2 and words in text, text
    assert isinstance(_typed(res), errors.OptionError) or "Invalid value for '--upsample'" in text
    assert not out.exists()
