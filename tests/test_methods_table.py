"""``medexplain methods [--model ...]`` (issue 25): name, family, one-line description from the method's own
docstring, the models it explains, and whether it applies to a given model and why not (the registry's why_not)."""
import inspect

import pytest
import torch
from typer.testing import CliRunner

import medexplain as mx
from medexplain.cli import app
from medexplain.engine.registry import describe_methods, registered

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def test_every_method_has_a_row_described_by_its_own_docstring():
    rows = describe_methods()
    assert [r["name"] for r in rows] == mx.available_methods()
    for r in rows:
        doc = " ".join((inspect.getdoc(registered()[r["name"]].fn) or "").split()).replace("``", "")
        assert len(r["description"]) > 20 and doc.startswith(r["description"].rstrip("\u2026")), r["name"]
        assert r["family"] and r["models"]
    by = {r["name"]: r for r in rows}
    assert by["gradcam"]["family"] == "CAM" and by["occlusion"]["family"] == "perturbation"
    assert by["saliency"]["family"] == "gradient" and by["medcam"]["models"] == "classifier"
    assert by["occlusion"]["description"].startswith("Occlusion (Zeiler & Fergus 2014)")


def test_applies_and_why_not_for_a_segmenter_and_a_torchscript_model():
    from monai.networks.nets import UNet
    unet = UNet(2, 1, 2, channels=(4, 8), strides=(2,)).eval()
    out = unet(torch.zeros(1, 1, 16, 16))
    by = {r["name"]: r for r in describe_methods(unet, out)}
    assert by["saliency"]["applies"] and by["saliency"]["why_not"] is None
    assert not by["medcam"]["applies"] and "classifiers" in by["medcam"]["why_not"]
    scripted = torch.jit.trace(unet, torch.zeros(1, 1, 16, 16))
    by = {r["name"]: r for r in describe_methods(scripted)}
    assert not by["gradcam"]["applies"] and "hooks" in by["gradcam"]["why_not"] and by["occlusion"]["applies"]


def test_cli_table_with_and_without_a_model(tmp_path, monkeypatch):
    from medexplain import examples
    monkeypatch.chdir(tmp_path)
    examples.write(tmp_path, ["classifier.pt", "ct_small"])
    runner = CliRunner()
    res = runner.invoke(app, ["methods"], env={"COLUMNS": "250"})
    assert res.exit_code == 0 and "Grad-CAM (Selvaraju et al. 2017" in res.output and "perturbation" in res.output
    res = runner.invoke(app, ["methods", "--model", "classifier.pt", "--image", "CT_small.dcm"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "no: needs layer hooks, which TorchScript" in res.output and "applies to the model" in res.output
    res = runner.invoke(app, ["methods", "--names"])
    assert res.output.split() == mx.available_methods()
    res = runner.invoke(app, ["methods", "--model", "nope.pt"])
    assert res.exit_code == 2 and "error" in res.output
