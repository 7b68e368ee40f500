"""`medexplain demo` end to end on the small configuration (trains a tiny classifier: slow-marked)."""
import json

import pytest
import torch

from medexplain.cli import app


def test_demo_command_is_registered():
    from typer.testing import CliRunner
    res = CliRunner().invoke(app, ["demo", "--help"])
    assert res.exit_code == 0 and "--out" in res.output


@pytest.mark.slow
def test_demo_small_writes_report_maps_and_metrics(tmp_path, monkeypatch):
    from medexplain.cli.demo import run_demo
    monkeypatch.setenv("MEDEXPLAIN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    res = run_demo(out, size="small", n_cases=2, methods=["saliency", "gradcam", "no_such_method"], progress=False)
    assert (out / "report.html").exists() and res["report"] == str(out / "report.html")
    assert [r["method"] for r in res["rows"]] == ["saliency", "gradcam"] and "no_such_method" in res["skipped"]
    for r in res["rows"]:
        assert 0.0 <= r["hit rate"] <= 1.0 and 0.0 < r["random baseline"] < 0.1
    assert {p.name for p in (out / "maps").iterdir()} >= {"case0_saliency.nii.gz", "case1_gradcam.nii.gz", "case0_mask.nii.gz"}
    import nibabel as nib
    m = nib.load(str(out / "maps" / "case0_saliency.nii.gz")).get_fdata()
    assert m.shape[:2] == (32, 32) and abs(m).max() > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_cases"] == 2 and metrics["cached"] is False
    doc = (out / "report.html").read_text()
    assert "random baseline" in doc and "labels are planted" in doc and doc.count("<img ") == 2 * 3
    res2 = run_demo(out, size="small", n_cases=2, methods=["saliency"], progress=False)
    assert res2["cached"] is True                                       # second run does not retrain
    assert torch.isfinite(torch.tensor(res2["rows"][0]["hit rate"]))
