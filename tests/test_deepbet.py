"""A real pretrained model from its wheel: deepbet's brain-extraction U-Net (a traced TorchScript file that
ends in a softmax and needs sides divisible by 32), on nibabel's anatomical.nii (33 x 41 x 25, 2 mm).

The model file is loaded from the wheel's data folder without importing the deepbet package (the test
extras install ``deepbet --no-deps``); the test is skipped when it is not installed.
"""
import json
import site
import sysconfig
from pathlib import Path

import nibabel as nib
import nibabel.testing
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medexplain.cli import app

runner = CliRunner()


def deepbet_model() -> Path | None:
    roots = [sysconfig.get_paths()["purelib"], *getattr(site, "getsitepackages", lambda: [])()]
    return next((Path(r) / "data" / "models" / "model.pt" for r in roots
                 if (Path(r) / "data" / "models" / "model.pt").is_file()), None)


MODEL = deepbet_model()
ANATOMICAL = Path(nib.testing.data_path) / "anatomical.nii"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(MODEL is None, reason="deepbet's model file is not installed (pip install --no-deps "
                                                       "deepbet==1.0.2 puts it at <site-packages>/data/models/model.pt)")]


def _info(out: Path) -> dict:
    return json.loads(next(out.glob("*info.json")).read_text())


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepbet") / "out"
    res = runner.invoke(app, ["explain", str(ANATOMICAL), "--model", str(MODEL), "--divisible-by", "32",
                              "--intensity", "zscore", "--method", "saliency,smoothgrad", "-o", "n_samples=2",
                              "--out", str(out)])
    return res, out


def _own_output():
    """deepbet's own output on the z-scored image, zero-padded by hand to (64, 64, 32) (MONAI's symmetric
    DivisiblePad: the smaller half first), cropped back to the image."""
    img = nib.load(str(ANATOMICAL))
    a = img.get_fdata().astype(np.float32)
    z = (a - a.mean()) / a.std()
    pads = [((-(-s // 32) * 32 - s) // 2, -(-s // 32) * 32 - s - (-(-s // 32) * 32 - s) // 2) for s in a.shape]
    x = torch.from_numpy(np.pad(z, pads))[None, None]
    with torch.no_grad():
        out = torch.jit.load(str(MODEL)).eval()(x)
    crop = tuple(slice(p[0], p[0] + s) for p, s in zip(pads, a.shape))
    return out[(0, slice(None), *crop)].numpy()


def test_explain_defaults_to_the_predicted_brain_region_on_the_input_grid(explained):
    res, out = explained
    assert res.exit_code == 0, res.output
    info = _info(out)
    t = info["target_info"]
    assert info["target"] == 1 and t["class"] == 1 and t["region"] == "predicted"
    assert t["how"].startswith("default: the foreground class with the most predicted voxels")
    assert t["activation"] == "none"                                 # the model's softmax is not applied again
    own = _own_output()
    assert t["region_voxels"] > 0
    src = nib.load(str(ANATOMICAL))
    for m in ("saliency", "smoothgrad"):
        img = nib.load(str(out / f"anatomical_{m}.nii.gz"))
        assert img.shape == (33, 41, 25) and np.allclose(img.affine, src.affine)
        assert np.abs(img.get_fdata()).max() > 0
    assert info["preprocessing"]["model_grid"] == [64, 64, 32] and own.shape == (2, 33, 41, 25)
    assert info["methods"]["smoothgrad"]["n_forward"] == 2


def test_instances_report_the_models_own_probabilities(tmp_path):
    res = runner.invoke(app, ["instances", str(ANATOMICAL), "--model", str(MODEL), "--divisible-by", "32",
                              "--intensity", "zscore", "--n-samples", "1", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    prob = nib.load(str(tmp_path / "o" / "probability.nii.gz"))
    own = _own_output()[1]
    assert prob.shape == (33, 41, 25) and np.allclose(prob.affine, nib.load(str(ANATOMICAL)).affine)
    assert prob.get_fdata().max() == pytest.approx(float(own.max()), abs=1e-5)   # no second softmax (0.731 before)
    assert np.abs(prob.get_fdata() - own).max() < 1e-4
    info = json.loads((tmp_path / "o" / "info.json").read_text())
    assert info["activation"] == "none" and info["class"] == 1


def test_a_cam_on_the_torchscript_model_fails_before_compute_or_is_skipped(tmp_path):
    res = runner.invoke(app, ["explain", str(ANATOMICAL), "--model", str(MODEL), "--divisible-by", "32",
                              "--intensity", "zscore", "--method", "saliency,gradcam", "--out", str(tmp_path / "o")])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "method 'gradcam' does not apply" in text and "TorchScript" in text
    assert "Methods that apply: " in text and "saliency" in text.split("Methods that apply: ")[1]
    assert not (tmp_path / "o").exists()
    res = runner.invoke(app, ["explain", str(ANATOMICAL), "--model", str(MODEL), "--divisible-by", "32",
                              "--intensity", "zscore", "--method", "saliency,gradcam", "--skip-unsupported",
                              "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    info = _info(tmp_path / "s")
    assert list(info["methods"]) == ["saliency"] and "TorchScript" in info["skipped"]["gradcam"]
    assert (tmp_path / "s" / "anatomical_saliency.nii.gz").exists()
    assert not list((tmp_path / "s").glob("*gradcam*"))


def test_without_padding_the_model_error_names_the_fix(tmp_path):
    res = runner.invoke(app, ["explain", str(ANATOMICAL), "--model", str(MODEL), "--method", "saliency",
                              "--out", str(tmp_path / "o")])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "(1, 1, 33, 41, 25)" in text and "--divisible-by 32" in text, text
    assert not (tmp_path / "o").exists()
