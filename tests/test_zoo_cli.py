"""``--model zoo:<task>`` on the command line is the demo model (issue 25): the same cached weights as
``medexplain demo`` and ``zoo.pretrained(task, size="demo")``, with its card (size, validation accuracy, weight
hash, purpose) in info.json; ``zoo:<task>/small`` is the smoke-test model and says so."""
import hashlib
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import medexplain as mx
from medexplain.cli import app
from medexplain.errors import InputError
from medexplain.models import zoo

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py
runner = CliRunner()


def test_a_zoo_spec_means_the_demo_model_unless_it_says_small(monkeypatch):
    calls = []

    def fake(task, seed=0, size="small", **kw):
        calls.append((task, seed, size))
        raise InputError("stop")

    monkeypatch.setattr(zoo, "pretrained", fake)
    for spec in ("chest_xray", "chest_xray/small", "fundus/demo/seed2"):
        with pytest.raises(InputError, match="stop"):
            mx.models.loading.load_model(f"zoo:{spec}")
    assert calls == [("chest_xray", 0, "demo"), ("chest_xray", 0, "small"), ("fundus", 2, "demo")]
    with pytest.raises(InputError, match="expected zoo:<task>"):
        zoo.from_spec("chest_xray/large")


def test_the_smoke_model_says_what_it_is_in_info_json(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDEXPLAIN_CACHE", str(tmp_path / "cache"))
    model, ds = zoo.pretrained("chest_xray", size="small", progress=False)
    card = zoo.model_card(model)
    assert card["size"] == "small" and "smoke-test model" in card["purpose"] and card["parameters"] > 1000
    assert card["weights_sha256"] == hashlib.sha256(open(model.zoo_info["path"], "rb").read()).hexdigest()
    assert set(card["validation"]) >= {"accuracy", "auroc"}
    np.save(tmp_path / "x.npy", ds.images[0].numpy())
    res = runner.invoke(app, ["explain", str(tmp_path / "x.npy"), "--model", "zoo:chest_xray/small", "--target", "1",
                              "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "out" / "x_info.json").read_text())
    assert info["zoo"] == json.loads(json.dumps(card))


@pytest.mark.slow
def test_cli_zoo_model_is_the_demo_model_and_gives_the_api_map(tmp_path):
    """The default cache (the one `medexplain demo` fills): trains the demo model once if it is missing."""
    model, ds = zoo.pretrained("chest_xray", size="demo", progress=False)
    _, test = ds.split(ds.meta_info["train_frac"])
    x = test.images[test.labels == 1][:1]                                     # a planted positive
    np.save(tmp_path / "pos.npy", x[0].numpy())
    res = runner.invoke(app, ["explain", str(tmp_path / "pos.npy"), "--model", "zoo:chest_xray", "--target", "1",
                              "--method", "saliency", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "out" / "pos_info.json").read_text())
    sha = hashlib.sha256(open(model.zoo_info["path"], "rb").read()).hexdigest()
    assert info["zoo"]["weights_sha256"] == sha and info["zoo"]["size"] == "demo"
    assert info["zoo"]["validation"]["accuracy"] > 0.85                      # the demo model, not the smoke one
    written = mx.io.read_image(tmp_path / "out" / "pos_saliency.nii.gz")[0]
    api = mx.explain(model, x, "saliency", target=1).map[0]
    assert torch.allclose(written.reshape(api.shape), api, atol=1e-6)
