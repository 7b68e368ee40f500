"""The `medexplain explain` command end to end on a NIfTI volume and a DICOM image."""
import json

import nibabel as nib
import numpy as np
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
    info = json.loads((tmp_path / "out" / "info.json").read_text())
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
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["info.json", "pt1.scan.v2_saliency.nii.gz",
                                                                      "pt1.scan.v2_saliency.png"]
    assert json.loads((tmp_path / "out" / "info.json").read_text())["target"] == 1


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
             ["evaluate", "--maps", str(tmp_path), "--masks", str(tmp_path), "--metric", "auc"],
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
                                           "v_gradcampp.png", "info.json"}
