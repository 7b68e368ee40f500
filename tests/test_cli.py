"""The `medexplain explain` command end to end on a NIfTI volume and a DICOM image."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import TinyClassifier
from medexplain.cli import app

runner = CliRunner()


def _scripted(tmp_path, nd):
    torch.manual_seed(0)
    m = TinyClassifier(nd, cin=1).eval()
    torch.jit.save(torch.jit.script(m), tmp_path / "m.pt")
    return str(tmp_path / "m.pt")


def test_explain_nifti_writes_maps_on_the_input_affine(tmp_path):
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((10, 11, 12)).astype(np.float32), affine),
             str(tmp_path / "vol.nii.gz"))
    res = runner.invoke(app, ["explain", str(tmp_path / "vol.nii.gz"), "--model", _scripted(tmp_path, 3),
                              "--method", "saliency,integrated_gradients", "--out", str(tmp_path / "out"),
                              "-o", "steps=4"])
    assert res.exit_code == 0, res.output
    m = nib.load(str(tmp_path / "out" / "vol_saliency.nii.gz"))
    assert m.shape == (10, 11, 12) and np.allclose(m.affine, affine)
    info = json.loads((tmp_path / "out" / "vol_info.json").read_text())
    assert info["methods"]["integrated_gradients"]["steps"] == 4
    assert (tmp_path / "out" / "vol_integrated_gradients.png").exists()


def test_explain_cam_on_torchscript_is_a_clear_error_and_writes_nothing(tmp_path):
    import pydicom
    res = runner.invoke(app, ["explain", pydicom.data.get_testdata_file("CT_small.dcm"),
                              "--model", _scripted(tmp_path, 2), "--method", "saliency,gradcam",
                              "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "TorchScript" in res.output
    assert not (tmp_path / "out").exists()


def test_unknown_method_fails_before_work(tmp_path):
    res = runner.invoke(app, ["explain", "x.nii.gz", "--model", "m.pt", "--method", "gradkam"])
    assert res.exit_code == 2 and "Did you mean gradcam" in res.output


def test_explain_names_outputs_by_the_one_stem_rule(tmp_path):
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((6, 7, 8)).astype(np.float32), np.eye(4)),
             str(tmp_path / "pt1.scan.v2.nii.gz"))
    res = runner.invoke(app, ["explain", str(tmp_path / "pt1.scan.v2.nii.gz"), "--model", _scripted(tmp_path, 3),
                              "--method", "saliency", "--target", "1", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pt1.scan.v2_info.json", "pt1.scan.v2_saliency.nii.gz",
                                                                      "pt1.scan.v2_saliency.png"]
    assert json.loads((tmp_path / "out" / "pt1.scan.v2_info.json").read_text())["target"] == 1


def test_every_command_reports_medexplain_errors_through_the_one_handler(tmp_path):
    from pathlib import Path

    import medexplain.cli as cli
    for path in Path(cli.__file__).parent.glob("*.py"):                  # one handler: cli/_common.py
        if path.name != "_common.py":
            assert "typer.Exit" not in path.read_text() and "except MedexplainError" not in path.read_text(), path
    missing = str(tmp_path / "missing.nii.gz")
    calls = [["explain", missing, "--model", "zoo:chest_xray"],
             ["instances", missing, "--model", "x:y", "--out", str(tmp_path / "o")],
             ["shapley", missing, "--model", "x:y"],
             ["evaluate", "--maps", str(tmp_path), "--masks", str(tmp_path), "--threshold", "banana"],
             ["train", "mnist"],
             ["run", str(tmp_path / "missing.csv"), "--model", "x:y", "--out", str(tmp_path / "r")]]
    for args in calls:
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output, (args, res.output)
        assert res.exception is None or isinstance(res.exception, SystemExit), args


def test_explain_image_is_a_library_function(tmp_path):
    from medexplain.pipelines import explain_image
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((6, 7, 8)).astype(np.float32), np.eye(4)),
             str(tmp_path / "v.nii"))
    torch.manual_seed(0)
    net = TinyClassifier(3, cin=1).eval()
    done = []
    res = explain_image(tmp_path / "v.nii", net, "saliency,gradcam++", tmp_path / "out", layer="features.2",
                        on_method=done.append)
    assert done == ["saliency", "gradcam++"] and set(res.attributions) == set(done)
    x = torch.from_numpy(nib.load(str(tmp_path / "v.nii")).get_fdata()).float()[None, None]
    assert res.target == int(net(x).argmax(1))
    assert {p.name for p in res.files} == {"v_saliency.nii.gz", "v_saliency.png", "v_gradcampp.nii.gz",
                                           "v_gradcampp.png", "v_info.json"}


# ---- issue 15: typed options, fail fast and keep what finished, estimates and progress -----------------
def _vol(tmp_path, name="v.nii.gz", shape=(8, 9, 10)):
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])),
             str(tmp_path / name))
    return str(tmp_path / name)


def _info(out):
    return json.loads(next(out.glob("*info.json")).read_text())


def test_abs_false_gives_a_signed_map_and_abs_true_its_magnitude(tmp_path):
    v, m = _vol(tmp_path), _scripted(tmp_path, 3)
    for flag in ("false", "true"):
        res = runner.invoke(app, ["explain", v, "--model", m, "-o", f"abs={flag}", "--out", str(tmp_path / flag)])
        assert res.exit_code == 0, res.output
    signed = nib.load(str(tmp_path / "false" / "v_saliency.nii.gz")).get_fdata()
    mag = nib.load(str(tmp_path / "true" / "v_saliency.nii.gz")).get_fdata()
    assert (signed < 0).any() and (signed > 0).any() and (mag >= 0).all()
    np.testing.assert_allclose(mag, np.abs(signed), rtol=1e-6)


def test_a_method_failing_late_keeps_the_finished_maps_and_records_the_error(tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, ["explain", _vol(tmp_path), "--model", _scripted(tmp_path, 3), "--method",
                              "saliency,occlusion,smoothgrad", "-o", "occlusion.window=50", "-o", "n_samples=2",
                              "--out", str(out)])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "1 of 3 method(s) failed: occlusion" in text and "window" in text, text
    info = _info(out)
    assert set(info["methods"]) == {"saliency", "smoothgrad"} and "larger than the image" in info["failed"]["occlusion"]
    assert (out / "v_saliency.nii.gz").exists() and (out / "v_smoothgrad.nii.gz").exists()
    assert not list(out.glob("*occlusion*")) and not list(out.glob(".*"))      # no partial file


def test_the_api_raises_partial_failure_with_the_result(tmp_path):
    from medexplain.errors import PartialFailure
    from medexplain.pipelines import explain_image
    torch.manual_seed(0)
    with pytest.raises(PartialFailure) as e:
        explain_image(_vol(tmp_path), TinyClassifier(3, cin=1).eval(), "occlusion,saliency", tmp_path / "o",
                      options={"occlusion.window": 50})
    assert list(e.value.failed) == ["occlusion"] and set(e.value.result.attributions) == {"saliency"}


def test_estimate_printed_for_long_calls_and_progress_over_passes(tmp_path, monkeypatch):
    import medexplain.engine.options as options
    monkeypatch.setattr(options, "LONG_CALL_SECONDS", 0.0)
    seen = []
    from medexplain.pipelines import explain_image
    torch.manual_seed(0)
    explain_image(_vol(tmp_path), TinyClassifier(3, cin=1).eval(), "smoothgrad", tmp_path / "api",
                  options={"n_samples": "5", "chunk_size": "2"}, on_progress=lambda m, d, t: seen.append((m, d, t)))
    assert seen == [("smoothgrad", 2, 5), ("smoothgrad", 4, 5), ("smoothgrad", 5, 5)]
    res = runner.invoke(app, ["explain", _vol(tmp_path), "--model", _scripted(tmp_path, 3), "--method", "smoothgrad",
                              "-o", "n_samples=3", "--out", str(tmp_path / "o")])
    text = " ".join(res.output.split())
    assert res.exit_code == 0 and "estimate: smoothgrad: about 3 forward and 3 backward row(s)" in text, text
    assert _info(tmp_path / "o")["methods"]["smoothgrad"]["estimate"]["n_forward"] == 3


def test_every_explaining_command_shares_the_target_activation_and_preprocessing_options():
    for cmd in ("explain", "instances", "shapley"):
        text = " ".join(runner.invoke(app, [cmd, "--help"], terminal_width=400).output.split())
        for flag in ("--target", "--activation", "--output", "--spacing", "--orientation", "--spatial-size",
                     "--divisible-by", "--intensity", "--transform"):
            assert flag in text, (cmd, flag)
        assert "auto" in text.split("--activation")[1][:300], cmd
    assert "--skip-unsupported" in runner.invoke(app, ["explain", "--help"], env={"COLUMNS": "300"}).output
