"""Bad input gets a clear, typed error, and the model is left as found."""
import numpy as np
import pytest
import torch

import medexplain as mx
from conftest import image, make
from medexplain import errors, io
from medexplain.engine.targets import Region
from medexplain.models.loading import load_model


def untouched(model):
    return not any(m._forward_hooks or m._backward_hooks for m in model.modules()) and \
        all(p.requires_grad for p in model.parameters()) and not model.training


@pytest.mark.parametrize("x, err, words", [
    (torch.randn(2, 12, 12, dtype=torch.float64), errors.InputError, "x[None]"),            # missing batch axis
    (torch.randn(1, 3, 12, 12, dtype=torch.float64), errors.InputError, "channel mismatch"),  # wrong channels
    (torch.full((1, 2, 12, 12), float("nan"), dtype=torch.float64), errors.InputError, "NaN"),
    (torch.ones(1, 2, 12, 12, dtype=torch.long), errors.InputError, "floating"),
    (np.ones((1, 2, 12, 12)), errors.InputError, "torch.Tensor"),
    (torch.zeros(0, 2, 12, 12, dtype=torch.float64), errors.InputError, "empty"),
])
def test_bad_inputs(x, err, words):
    model = make("cls", 2)
    with pytest.raises(err, match=words.replace("[", r"\[").replace("]", r"\]")):
        mx.explain(model, x, "saliency", target=0)
    assert untouched(model)


@pytest.mark.parametrize("target, words", [(5, "out of range"), ([0, 1], "2 indices for a batch of 3"),
                                           (1.5, "not 1.5"), (None, "required")])
def test_bad_targets(target, words):
    model = make("cls", 2)
    with pytest.raises(errors.TargetError, match=words):
        mx.explain(model, image(2), "gradcam", target=target, layer="features.2")
    assert untouched(model)


def test_empty_region_and_region_on_classifier():
    seg, x = make("seg", 2), image(2, b=2)
    mask = torch.zeros(2, 12, 12, dtype=torch.bool)
    mask[0, 2:4, 2:4] = True
    with pytest.raises(errors.EmptyRegionError, match=r"sample\(s\) \[1\]"):
        mx.explain(seg, x, "saliency", target=Region(1, mask))
    with pytest.raises(errors.TargetError, match="dense output"):
        mx.explain(make("cls", 2), x, "saliency", target=Region(1, mask))
    with pytest.raises(errors.TargetError, match="does not match"):
        mx.explain(seg, x, "saliency", target=Region(1, mask[:, :5]))
    assert untouched(seg)


def test_unknown_layer_suggests_close_matches():
    model = make("cls", 2)
    with pytest.raises(errors.LayerNotFoundError, match="features.2") as e:
        mx.explain(model, image(2), "gradcam", target=0, layer="feature.2")
    assert "features.2" in e.value.close_matches
    assert untouched(model)


def test_layer_without_spatial_output():
    with pytest.raises(errors.UnsupportedModelError, match="spatial feature map"):
        mx.explain(make("cls", 2), image(2), "gradcam", target=0, layer="fc")


def test_cam_on_torchscript_names_working_methods():
    scripted = torch.jit.script(make("cls", 2))
    with pytest.raises(errors.UnsupportedModelError, match="saliency, smoothgrad"):
        mx.explain(scripted, image(2), "gradcam", target=0, layer="features.2")
    a = mx.explain(scripted, image(2), "saliency", target=0)  # gradient methods work on TorchScript
    assert a.map.shape == (3, 2, 12, 12)


def test_unknown_method_and_option():
    with pytest.raises(errors.UnknownMethodError, match="gradcam"):
        mx.explain(make("cls", 2), image(2), "gradkam", target=0)
    with pytest.raises(errors.MedexplainError, match="no option"):
        mx.explain(make("cls", 2), image(2), "saliency", target=0, n_steps=3)


def test_non_differentiable_model():
    class Argmax(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x.flatten(1).argmax(1) % 3, 3).double()
    with pytest.raises(errors.UnsupportedModelError, match="occlusion"):
        mx.explain(Argmax(), image(2), "saliency", target=0)


def test_model_restored_after_error_mid_explanation():
    model = make("cls", 2)
    model.train()
    with pytest.raises(errors.TargetError):
        mx.explain(model, image(2), "gradcam++", target=9, layer="features.2")
    assert model.training and all(m.training for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())


def test_file_errors(tmp_path):
    with pytest.raises(errors.FileFormatError, match="no such file"):
        io.read_image(tmp_path / "missing.nii.gz")
    bad = tmp_path / "scan.xyz"
    bad.write_text("hello")
    with pytest.raises(errors.FileFormatError, match="unsupported file type"):
        io.read_image(bad)
    corrupt = tmp_path / "scan.nii.gz"
    corrupt.write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(errors.FileFormatError, match="cannot read as nifti"):
        io.read_image(corrupt)
    dcm = tmp_path / "x.dcm"
    dcm.write_bytes(b"\x00" * 10)
    with pytest.raises(errors.FileFormatError, match="(?i)dicom"):
        io.read_image(dcm)


def test_model_load_errors(tmp_path):
    with pytest.raises(errors.ModelLoadError, match="package.module:factory"):
        load_model(str(tmp_path / "nope.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(errors.ModelLoadError, match="not a TorchScript file"):
        load_model(str(junk))
    with pytest.raises(errors.ModelLoadError, match="cannot import"):
        load_model("no_such_pkg.mod:factory")
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(errors.ModelLoadError, match="does not fit"):
        load_model("conftest:TinySegmenter", weights=str(tmp_path / "w.pt"))


# ---- issue 15: the model's own errors and factory imports, explained ---------------------------------
class _Strided(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.down = torch.nn.Conv2d(2, 2, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose2d(2, 2, 2, stride=2)

    def forward(self, x):
        return self.up(self.down(x)) + x


def test_an_error_inside_the_forward_is_a_model_error_with_the_fix():
    model = _Strided().double().eval()
    x = torch.randn(1, 2, 11, 12, dtype=torch.float64)
    with pytest.raises(errors.ModelError) as e:
        mx.explain(model, x, "saliency", target=0)
    msg = str(e.value)
    assert "(1, 2, 11, 12)" in msg and "float64" in msg and "2 channel(s)" in msg and "--divisible-by 2" in msg
    assert isinstance(e.value.__cause__, RuntimeError) and untouched(model)
    with pytest.raises(errors.ModelError, match="first layer takes 2 channel"):
        mx.explain(torch.jit.script(make("cls", 2)), torch.randn(1, 3, 12, 12, dtype=torch.float64), "saliency", target=0)


def test_errors_outside_the_model_are_not_rewrapped():
    from medexplain.models.loading import raised_in_model
    model = make("cls", 2)
    try:
        raise ValueError("not the model")
    except ValueError as e:
        assert not raised_in_model(e, model)


def test_factory_in_the_current_folder_needs_no_pythonpath(tmp_path, monkeypatch):
    import sys
    (tmp_path / "mynets_h15.py").write_text("import torch\n\ndef build():\n    return torch.nn.Conv2d(1, 1, 1)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    assert isinstance(load_model("mynets_h15:build"), torch.nn.Conv2d)
    (tmp_path / "badnets_h15.py").write_text("import no_such_dependency_h15\n")
    with pytest.raises(errors.ModelLoadError, match="was found .*badnets_h15.py.* but raised while importing: "
                                                    "ModuleNotFoundError"):
        load_model("badnets_h15:build")
    with pytest.raises(errors.ModelLoadError, match="module 'nonexistent_h15' not found on sys.path"):
        load_model("nonexistent_h15:build")
