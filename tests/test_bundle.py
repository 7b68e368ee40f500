"""MONAI bundles (medexplain.models.bundle): a tiny bundle written on disk in MONAI's format (a small UNet with
random weights, configs/inference.json with network_def, a preprocessing Compose, a SlidingWindowInferer and a
postprocessing Compose), loaded with monai.bundle.ConfigParser and explained end to end from the command line."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import medexplain as mx
from medexplain import examples, io
from medexplain.cli import app
from medexplain.errors import ModelLoadError

runner = CliRunner()
AFFINE = np.array([[-1.0, 0, 0, 10], [0, 1.2, 0, -5], [0, 0, 2.0, 3], [0, 0, 0, 1]])   # LAS, anisotropic


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


inference_config = examples.bundle_config   # configs/inference.json as a MONAI Model Zoo bundle writes it


def make_bundle(root, seed=0):
    from monai.networks.nets import UNet
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(inference_config(), indent=2))
    torch.manual_seed(seed)
    net = UNet(3, 2, 2, channels=(4, 8), strides=(2,), num_res_units=0)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return net


def make_case(path):
    img = np.random.default_rng(0).normal(size=(15, 13, 11, 2)).astype(np.float32)   # 2 contrasts, channels last
    nib.save(nib.Nifti1Image(img, AFFINE), str(path))
    return img


def test_load_bundle_reads_network_weights_preprocessing_and_inferer(tmp_path):
    from monai.inferers import SlidingWindowInferer
    net = make_bundle(tmp_path / "b")
    b = mx.models.load_bundle(tmp_path / "b")
    assert all(torch.equal(p, q) for p, q in zip(b.network.state_dict().values(), net.state_dict().values()))
    assert not b.network.training and isinstance(b.inferer, SlidingWindowInferer) and b.inferer.roi_size == [8, 8, 8]
    assert [type(t).__name__ for t in b.preprocessing.transforms][:3] == ["LoadImaged", "EnsureChannelFirstd",
                                                                          "Orientationd"]
    assert "SaveImaged" not in [type(t).__name__ for t in b.postprocessing().transforms]   # nothing written behind our back


def test_the_bundles_own_loader_gives_the_input_medexplain_prepares(tmp_path):
    make_bundle(tmp_path / "b")
    make_case(tmp_path / "case.nii.gz")
    b = mx.models.load_bundle(tmp_path / "b")
    img, meta = io.read_image(tmp_path / "case.nii.gz")
    prepared = b.model_preprocessing().build().apply(img, meta["affine"])
    theirs = b.preprocessing({"image": str(tmp_path / "case.nii.gz")})["image"]        # LoadImaged on the file
    assert tuple(prepared.image.shape) == tuple(theirs.shape) == (2, 10, 11, 14)       # RAS, 1.5 mm
    assert torch.equal(prepared.image, theirs.as_tensor())
    assert np.allclose(prepared.affine, theirs.affine.numpy())


def test_a_bundle_explained_from_the_command_line_gives_maps_on_the_input_grid_and_affine(tmp_path):
    make_bundle(tmp_path / "b")
    img = make_case(tmp_path / "case.nii.gz")
    res = runner.invoke(app, ["explain", str(tmp_path / "case.nii.gz"), "--bundle", str(tmp_path / "b"),
                              "--method", "saliency,gradcam", "--target", "1", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    for m in ("saliency", "gradcam"):
        nii = nib.load(str(tmp_path / "out" / f"case_{m}.nii.gz"))
        assert nii.shape[:3] == img.shape[:3] and np.allclose(nii.affine, AFFINE)
        assert np.abs(np.asarray(nii.dataobj)).max() > 0
    assert nib.load(str(tmp_path / "out" / "case_saliency.nii.gz")).shape == img.shape   # one map per contrast
    pred = nib.load(str(tmp_path / "out" / "case_prediction.nii.gz"))                  # the bundle's postprocessing
    assert pred.shape == img.shape[:3] and np.allclose(pred.affine, AFFINE)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0.0, 1.0}
    info = json.loads((tmp_path / "out" / "case_info.json").read_text())
    assert info["inferer"]["roi_size"] == [8, 8, 8] and info["bundle"]["network"] == "UNet"
    sal = info["methods"]["saliency"]
    assert sal["n_windows"] == 8 and 1 <= sal["n_backward"] <= 8
    # the written map is medexplain's own explanation on the model grid, put back by the bundle's inverse
    b = mx.models.load_bundle(tmp_path / "b")
    x_img, meta = io.read_image(tmp_path / "case.nii.gz")
    pre = b.model_preprocessing().build()
    prepared = pre.apply(x_img, meta["affine"])
    target = mx.targets.resolve_target(mx.engine.sliding.with_inferer(b.network, b.inferer)(prepared.image[None]).detach(), 1,
                                       "predicted").target
    attr = mx.explain(mx.Model(b.network, inferer=b.inferer), prepared.image[None], "saliency", target=target)
    back = pre.invert(attr.map[0], prepared).numpy()
    written = np.moveaxis(np.asarray(nib.load(str(tmp_path / "out" / "case_saliency.nii.gz")).dataobj), -1, 0)
    assert np.allclose(written, back, atol=1e-6 * np.abs(back).max())


def test_bundle_errors_are_typed_and_come_before_any_work(tmp_path):
    with pytest.raises(ModelLoadError, match="inference.json"):
        mx.models.load_bundle(tmp_path)
    make_bundle(tmp_path / "b")
    cfg = inference_config()
    cfg["network_def"]["channels"] = [4, 16]
    (tmp_path / "b" / "configs" / "inference.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="does not fit"):
        mx.models.load_bundle(tmp_path / "b")
    make_case(tmp_path / "case.nii.gz")
    res = runner.invoke(app, ["explain", str(tmp_path / "case.nii.gz"), "--bundle", str(tmp_path / "b"),
                              "--model", "zoo:lesion", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "--bundle" in res.output and not (tmp_path / "out").exists()


def test_load_model_builds_one_model_object_from_a_bundle(tmp_path):
    """mx.load_model on a bundle folder: its network, sliding window and preprocessing in one mx.Model, which
    explains as the network with the bundle's inferer does (and takes flips on top)."""
    from medexplain.engine.targets import Region

    net = make_bundle(tmp_path / "b")
    make_case(tmp_path / "case.nii.gz")
    model = mx.load_model(tmp_path / "b")
    assert isinstance(model, mx.Model) and model.inferer.roi_size == [8, 8, 8] and model.source["source"] == "bundle"
    img, meta = io.read_image(tmp_path / "case.nii.gz")
    x = model.prepare(img, meta["affine"]).image[None]
    assert tuple(x.shape) == (1, 2, 10, 11, 14)
    tgt = Region(1, torch.ones((1, 10, 11, 14), dtype=torch.bool))
    a = mx.explain(model, x, "saliency", target=tgt)
    b = mx.explain(mx.Model(net.eval(), inferer=model.inferer), x, "saliency", target=tgt)
    torch.testing.assert_close(a.map, b.map, rtol=0, atol=0)
    flipped = mx.load_model(tmp_path / "b", flip_axes=(0,))
    c = mx.explain(flipped, x, "saliency", target=tgt)
    assert c.info["n_forward"] == 2 * a.info["n_forward"] and c.info["model"]["passes"] == 2


def softmax_unet():
    """The bundle network of these tests ending in a Softmax module (as many Model Zoo networks do)."""
    from monai.networks.nets import UNet
    return torch.nn.Sequential(UNet(3, 2, 2, channels=(4, 8), strides=(2,), num_res_units=0), torch.nn.Softmax(dim=1))


def test_a_bundle_whose_network_ends_in_softmax_writes_its_own_prediction(tmp_path):
    """The Model explains the logits (the Softmax module's input), but the bundle's postprocessing (here: a
    threshold at 0.5 on what the network outputs, probabilities) gets the network's output: the written
    <stem>_prediction.nii.gz equals the bundle's own inference (its preprocessing of the file, its inferer, its
    network, its postprocessing, run by MONAI)."""
    from monai.data import MetaTensor
    root = tmp_path / "b"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    cfg = inference_config()
    cfg["network_def"] = {"_target_": "test_bundle.softmax_unet"}
    cfg["postprocessing"]["transforms"] = [t for t in cfg["postprocessing"]["transforms"]
                                           if t["_target_"] not in ("Activationsd", "AsDiscreted")]
    cfg["postprocessing"]["transforms"].insert(-1, {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5})
    (root / "configs" / "inference.json").write_text(json.dumps(cfg))
    torch.manual_seed(3)
    torch.save(softmax_unet().state_dict(), root / "models" / "model.pt")
    img = make_case(tmp_path / "case.nii.gz")
    res = explain_image_of(tmp_path / "case.nii.gz", mx.ModelSpec(bundle=root), tmp_path / "out")
    assert res.attributions["saliency"].info["score"].startswith("logits")     # explained: the logits
    written = np.asarray(nib.load(str(tmp_path / "out" / "case_prediction.nii.gz")).dataobj)
    b = mx.models.load_bundle(root)                       # the bundle's own inference, by MONAI
    image = b.preprocessing({"image": str(tmp_path / "case.nii.gz")})["image"]
    with torch.no_grad():
        pred = b.inferer(image[None], b.network)[0]
    pred = MetaTensor(pred.as_tensor() if isinstance(pred, MetaTensor) else pred, affine=image.affine.clone(),
                      applied_operations=list(image.applied_operations))
    theirs = b.postprocessing()({"pred": pred, "image": image})["pred"]
    theirs = np.moveaxis(np.asarray(theirs), 0, -1)       # (K, *s) -> NIfTI's channels last
    assert written.shape == theirs.shape and written.shape[:3] == img.shape[:3]
    assert 0 < theirs.mean() < 1 and np.array_equal(written, theirs)


def explain_image_of(image, model, out):
    from medexplain.pipelines import explain_image
    return explain_image(image, model, "saliency", out, target=1)
