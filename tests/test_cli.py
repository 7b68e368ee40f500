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
