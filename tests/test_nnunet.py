"""nnU-Net v2 models (medexplain.models.nnunet): a tiny trained-model folder written the way nnU-Net lays it
out (plans.json with a small PlainConvUNet 3d_fullres configuration, dataset.json with two channels of
different normalisation schemes, random weights saved in nnU-Net's checkpoint format for two folds), checked
against nnunetv2's own nnUNetPredictor and its prediction path, and explained from the command line."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import medexplain as mx
from medexplain import examples
from medexplain.engine.targets import Region
from medexplain.errors import InputError, ModelLoadError

nnunetv2 = pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (optional extra: see docs/nnunet.md "
                               "for the two-line install); the nnU-Net tests need it")
pytest.importorskip("dynamic_network_architectures", reason="dynamic-network-architectures (nnunetv2's network "
                    "package) is not installed: see docs/nnunet.md")

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py
runner = CliRunner()
PATCH = [8, 8, 8]
# nibabel's voxel order x, y, z; the last axis is 1.3 mm and the plans resample it to 1.5 mm (nnU-Net's axis 0)
AFFINE = np.array([[-1.0, 0, 0, 10], [0, 1.0, 0, -5], [0, 0, 1.3, 3], [0, 0, 0, 1]])
SHAPE = (13, 11, 12)


def plans():
    """The tiny model's plans (:func:`medexplain.examples.nnunet_plans`) with this file's geometry: a patch of
    PATCH and original images of 1.3 mm along nnU-Net's axis 0, resampled to the plans' 1.5 mm."""
    return examples.nnunet_plans(PATCH, median_shape=(10, 11, 13), original_spacing=(1.3, 1.0, 1.0),
                                 original_shape=(12, 11, 13))


DATASET = examples.NNUNET_DATASET


def reference_network(p):
    """The network as nnunetv2 builds it (nnUNetTrainer.build_network_architecture = get_network_from_plans)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(p).get_configuration("3d_fullres")
    return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import, 2, 3, allow_init=True, deep_supervision=False)


def write_folder(parent, trainer="nnUNetTrainer", folds=(0, 1)):
    """parent/<trainer>__nnUNetPlans__3d_fullres as nnU-Net lays it out, random weights per fold."""
    root = parent / f"{trainer}__nnUNetPlans__3d_fullres"
    root.mkdir()
    p = plans()
    (root / "plans.json").write_text(json.dumps(p, indent=2))
    (root / "dataset.json").write_text(json.dumps(DATASET, indent=2))
    for fold in folds:
        torch.manual_seed(fold)
        net = reference_network(p)
        for prm in net.parameters():  # spread the random logits, so the segmentation has no near-ties
            prm.data.mul_(2.0)
        (root / f"fold_{fold}").mkdir()
        torch.save({"network_weights": net.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
                    "logging": {"ema_fg_dice": [np.float64(0.5)], "mean_fg_dice": [np.float64(0.4)]},
                    "_best_ema": np.float64(0.5), "current_epoch": 1000,
                    "init_args": {"plans": p, "configuration": "3d_fullres", "fold": fold, "dataset_json": DATASET,
                                  "device": torch.device("cpu")},
                    "trainer_name": trainer, "inference_allowed_mirroring_axes": (0, 1, 2)},
                   root / f"fold_{fold}" / "checkpoint_final.pth")
    return root


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """nnUNet_results/Dataset999_Tiny/nnUNetTrainer__nnUNetPlans__3d_fullres with fold_0 and fold_1."""
    return write_folder(tmp_path_factory.mktemp("nnunet"))


@pytest.fixture(scope="session")
def case(tmp_path_factory):
    """Two channel files case_0000 / case_0001 (zero where x < 2: nnU-Net crops that away) and a lesion mask."""
    d = tmp_path_factory.mktemp("case")
    g = torch.Generator().manual_seed(0)
    img = torch.randn((2, *SHAPE), generator=g) + torch.tensor([1.0, 0.2])[:, None, None, None]
    img[:, :2] = 0
    paths = []
    for c in range(2):
        paths.append(d / f"case_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(img[c].numpy(), AFFINE), paths[-1])
    mask = np.zeros(SHAPE, np.uint8)
    mask[4:7, 3:6, 4:7] = 1
    mask[9:12, 7:10, 8:11] = 1
    nib.save(nib.Nifti1Image(mask, AFFINE), d / "lesions.nii.gz")
    return paths, img, d / "lesions.nii.gz"


def predictor(folder, folds, mirroring, dtype=torch.float32):
    """nnunetv2's own nnUNetPredictor on the folder's checkpoints (CPU, no multiprocessing)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    p = load_json(str(folder / "plans.json"))
    pm = PlansManager(p)
    params = [torch.load(folder / f"fold_{f}" / "checkpoint_final.pth", weights_only=False)["network_weights"]
              for f in folds]
    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                           perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    net = reference_network(p).to(dtype).eval()
    net.load_state_dict(params[0])
    pred.manual_initialization(net, pm, pm.get_configuration("3d_fullres"), params, DATASET, "nnUNetTrainer", (0, 1, 2))
    return pred


def reference_blend(pred, data):
    """nnU-Net's prediction path with a graph, in data's dtype: its padding, its slicers, its Gaussian and its
    mirror-and-predict (without the inference_mode decorator). Its predict_sliding_window_return_logits itself
    runs under inference_mode and accumulates in float16 with out=, so autograd cannot go through it."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    mirror = nnUNetPredictor._internal_maybe_mirror_and_predict.__wrapped__
    xp, revert = pad_nd_image(data, PATCH, "constant", {"value": 0}, True, None)
    gauss = compute_gaussian(tuple(PATCH), 1. / 8, 10, device=torch.device("cpu")).to(data.dtype)  # float16, as nnU-Net
    logits = torch.zeros((3, *xp.shape[1:]), dtype=data.dtype)
    count = torch.zeros(xp.shape[1:], dtype=data.dtype)
    for sl in pred._internal_get_sliding_window_slicers(xp.shape[1:]):
        logits[sl] = logits[sl] + gauss * mirror(pred, xp[sl][None])[0]
        count[sl[1:]] += gauss
    return (logits / count)[(slice(None), *revert[1:])]


def blend_weight(pred, data):
    """nnU-Net's sum of Gaussian weights per voxel (its n_predictions), from its own pieces."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    xp, revert = pad_nd_image(data, PATCH, "constant", {"value": 0}, True, None)
    gauss = compute_gaussian(tuple(PATCH), 1. / 8, 10, device=torch.device("cpu")).float()
    count = torch.zeros(xp.shape[1:])
    for sl in pred._internal_get_sliding_window_slicers(xp.shape[1:]):
        count[sl[1:]] += gauss
    return count[tuple(revert[1:])]


def test_prediction_matches_nnunet_predictor(folder, case, tmp_path):
    """(1) Reading, preprocessing, network, sliding window, mirroring, 2 folds and the inverse give nnunetv2's
    segmentation, written by nnUNetPredictor from the same files."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    paths, img, _ = case
    m = mx.models.load_nnunet(folder, folds=(0, 1))
    pred = predictor(folder, (0, 1), True)
    (tmp_path / "pred").mkdir()
    pred.predict_from_files_sequential([[str(p) for p in paths]], str(tmp_path / "pred"), False, True, None)
    theirs = nib.load(tmp_path / "pred" / "case.nii.gz")
    ours = m.predict(img, AFFINE)
    assert tuple(ours.shape) == SHAPE == theirs.shape
    assert np.allclose(theirs.affine, AFFINE, atol=1e-5)
    assert len(np.unique(theirs.get_fdata())) > 1
    assert np.array_equal(ours.numpy(), theirs.get_fdata().astype(np.uint8))
    # nnU-Net's own reading (SimpleITK) + preprocessing equals ours on medexplain's reading (nibabel)
    data, _, props = DefaultPreprocessor().run_case([str(p) for p in paths], None, pred.plans_manager,
                                                    pred.configuration_manager, DATASET)
    prep = m.prepare(img, AFFINE)
    assert props["bbox_used_for_cropping"] == prep.meta["bbox_used_for_cropping"]
    assert np.allclose(prep.image.numpy(), data, atol=1e-5)
    # its sliding window accumulates in float16: the logits agree within float16 steps (~0.016 at 10 x logits ~3)
    # where the blend weight is representable; where only underflowed Gaussian corners overlap (the volume's
    # corners, about a quarter of this tiny volume with sigma = 1 voxel) its float16 sums are coarser still
    theirs_logits = pred.predict_logits_from_preprocessed_data(torch.from_numpy(data)).float()
    with torch.no_grad():
        ours_logits = m.model()(prep.image[None])[0]
    ok = blend_weight(pred, prep.image) >= 1e-3
    assert ok.float().mean() > 0.5 and (ours_logits - theirs_logits).abs().median() < 2e-3
    assert torch.allclose(ours_logits[:, ok], theirs_logits[:, ok], atol=3e-2)


def test_saliency_equals_autograd_through_nnunet_path(folder, case):
    """(2) Saliency through the loaded model (preprocessing + sliding window + one fold, no mirroring) equals
    autograd through nnU-Net's prediction path on the same preprocessed tensor, float64."""
    _, img, _ = case
    m = mx.models.load_nnunet(folder, folds=(0,), use_mirroring=False, dtype=torch.float64)
    x = m.prepare(img, AFFINE).image[None].double()
    mask = torch.zeros(x.shape[2:], dtype=torch.bool)
    mask[2:5, 3:7, 4:8] = True
    attr = mx.explain(mx.Model(m.network, inferer=m.inferer), x, "saliency", target=Region(1, mask[None]))
    pred = predictor(folder, (0,), False, torch.float64)
    xr = x[0].clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(reference_blend(pred, xr)[1][mask].sum(), xr)
    assert attr.info["n_windows"] > 1 and ref.abs().max() > 0
    assert torch.allclose(attr.map[0], ref, atol=1e-10, rtol=1e-8)


def test_mirroring_and_fold_ensemble_are_the_mean_of_the_passes(folder, case):
    """(3) With mirroring and 2 folds the output and the explained score's gradient are the mean of the
    folds' mirrored nnU-Net passes (nnunetv2's _internal_maybe_mirror_and_predict, 8 passes each)."""
    _, img, _ = case
    m = mx.models.load_nnunet(folder, folds=(0, 1), use_mirroring=True, dtype=torch.float64)
    assert len(m.network.passes) == 8 and len(m.network.folds) == 2
    x = m.prepare(img, AFFINE).image[None].double()
    preds = [predictor(folder, (f,), True, torch.float64) for f in (0, 1)]
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    mirror = nnUNetPredictor._internal_maybe_mirror_and_predict.__wrapped__
    win = x[:, :, :8, :8, :8]
    with torch.no_grad():
        assert torch.allclose(m.network(win), (mirror(preds[0], win) + mirror(preds[1], win)) / 2, atol=1e-12)
    attr = mx.explain(mx.Model(m.network, inferer=m.inferer), x, "saliency", target=Region(2, everywhere(x)))
    xr = x[0].clone().requires_grad_(True)
    score = sum(reference_blend(p, xr)[2].sum() for p in preds) / 2
    (ref,) = torch.autograd.grad(score, xr)
    assert torch.allclose(attr.map[0], ref, atol=1e-10, rtol=1e-8)


def everywhere(x):
    return torch.ones(x.shape[2:], dtype=torch.bool)[None]


def nifti_grid(path):
    f = nib.load(path)
    return f.shape[:3], f.affine


def test_cli_instances_and_shapley_write_on_the_input_grid(folder, case, tmp_path):
    """(4) instances, shapley and explain from the command line on the folder; channel files given out of order
    are ordered by nnU-Net's suffix; maps are on the input's grid and affine."""
    from medexplain.cli import app

    paths, img, lesions = case
    four_d = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.moveaxis(img.numpy(), 0, -1), AFFINE), four_d)
    r = runner.invoke(app, ["explain", str(four_d), "--nnunet", str(folder), "--no-mirroring", "--target", "1",
                            "--region", str(lesions), "--out", str(tmp_path / "expl")])
    assert r.exit_code == 0, r.output
    shape, aff = nifti_grid(tmp_path / "expl" / "case_saliency.nii.gz")
    assert shape == SHAPE and np.allclose(aff, AFFINE, atol=1e-5)
    # the same case as one file per channel, given out of order: named by the nnU-Net case, the same map
    r = runner.invoke(app, ["explain", str(paths[1]), str(paths[0]), "--nnunet", str(folder), "--no-mirroring",
                            "--target", "1", "--region", str(lesions), "--out", str(tmp_path / "expl2")])
    assert r.exit_code == 0, r.output
    stem = paths[0].name.split("_0000")[0]
    one = nib.load(tmp_path / "expl" / "case_saliency.nii.gz").get_fdata()
    two = nib.load(tmp_path / "expl2" / f"{stem}_saliency.nii.gz").get_fdata()
    assert np.allclose(one, two, atol=1e-6) and np.abs(two).max() > 0
    info = json.loads((tmp_path / "expl2" / f"{stem}_info.json").read_text())
    assert info["image"] == [str(paths[0]), str(paths[1])]
    state = {k: v.clone() for k, v in mx.models.load_nnunet(folder).networks[0].state_dict().items()}
    r = runner.invoke(app, ["instances", str(paths[1]), str(paths[0]), "--nnunet", str(folder), "--region", str(lesions),
                            "--target", "1", "--n-samples", "2", "--out", str(tmp_path / "inst"), "--no-mirroring"])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "inst" / "info.json").read_text())
    assert info["nnunet"]["channels"] == ["T1", "CT"] and info["instances"] == 2
    assert info["inferer"]["windows"] == "nnU-Net"     # the sliding window the maps were computed through
    maps = sorted((tmp_path / "inst").glob("instance_*.nii.gz"))
    assert len(maps) == 2
    for p in maps + [tmp_path / "inst" / "probability.nii.gz"]:
        shape, aff = nifti_grid(p)
        assert shape == SHAPE and np.allclose(aff, AFFINE, atol=1e-5)
    m0 = nib.load(maps[0]).get_fdata()
    assert m0.shape == (*SHAPE, 2) and np.abs(m0).max() > 0
    assert np.all(m0[:2] == 0)  # nnU-Net crops the zero border away: no gradient there
    r = runner.invoke(app, ["shapley", str(paths[0]), str(paths[1]), "--nnunet", str(folder), "--folds", "0,1",
                            "--no-mirroring", "--out", str(tmp_path / "shap")])
    assert r.exit_code == 0, r.output
    ranking = json.loads((tmp_path / "shap" / "ranking.json").read_text())
    assert ranking["nnunet"]["folds"] == [0, 1]
    assert (tmp_path / "shap" / "uncertainty.json").is_file()
    rows = (tmp_path / "shap" / "values.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 and "T1" in rows[1]
    after = mx.models.load_nnunet(folder).networks[0].state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_model_left_untouched_and_errors_before_work(folder, case, tmp_path):
    """(5) The networks keep weights, eval mode, requires_grad and no hooks; bad folders, folds, channel
    counts and a missing nnunetv2 are typed errors before any work."""
    from medexplain.cli import app

    _, img, _ = case
    m = mx.models.load_nnunet(folder, use_mirroring=False)
    net = m.networks[0]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grads = [p.requires_grad for p in net.parameters()]
    x = m.prepare(img, AFFINE).image[None]
    mx.explain(mx.Model(m.network, inferer=m.inferer), x, "saliency", target=Region(1, everywhere(x)))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(mod.training for mod in net.modules())
    assert [p.requires_grad for p in net.parameters()] == grads
    assert not any(mod._forward_hooks or mod._backward_hooks or mod._forward_pre_hooks for mod in net.modules())
    with pytest.raises(ModelLoadError, match="not an nnU-Net model folder"):
        mx.models.load_nnunet(tmp_path)
    with pytest.raises(ModelLoadError, match=r"fold\(s\) \[3\].*\[0, 1\]"):
        mx.models.load_nnunet(folder, folds=(3,))
    with pytest.raises(ModelLoadError, match="no configuration '2d'"):
        mx.models.load_nnunet(folder, configuration="2d")
    with pytest.raises(InputError, match="takes 2 channel"):
        m.prepare(img[:1], AFFINE)
    out = tmp_path / "never"
    r = runner.invoke(app, ["instances", str(case[0][0]), "--nnunet", str(tmp_path / "missing"), "--out", str(out)])
    assert r.exit_code == 2 and "not a folder" in " ".join(r.output.split()) and not out.exists()
    r = runner.invoke(app, ["shapley", str(case[0][0]), "--nnunet", str(folder), "--out", str(out)])
    assert r.exit_code == 2 and "takes 2 channel" in " ".join(r.output.split()) and not out.exists()


def test_missing_nnunetv2_names_the_install(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "nnunetv2", None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps nnunetv2"):
        mx.models.load_nnunet(tmp_path)


def test_a_trainer_variant_loads_without_importing_the_other_trainers(case, tmp_path, monkeypatch):
    """A folder trained with nnUNetTrainer_1epoch (named as nnU-Net names it) loads and is explained; nnunetv2's own
    lookup imports every trainer module and died on the Primus trainers' timm import (169 lines of traceback).
    Only the module defining the trainer is imported; a trainer whose module needs a missing package is a typed
    error naming the package."""
    import sys

    from medexplain.cli import app
    from medexplain.models.nnunet import find_trainer_class

    root = write_folder(tmp_path, "nnUNetTrainer_1epoch", folds=(0,))
    assert root.name == "nnUNetTrainer_1epoch__nnUNetPlans__3d_fullres"
    primus = "nnunetv2.training.nnUNetTrainer.primus.primus_trainers"
    monkeypatch.delitem(sys.modules, primus, raising=False)
    m = mx.models.load_nnunet(root, use_mirroring=False)
    assert m.trainer_name == "nnUNetTrainer_1epoch" and primus not in sys.modules
    with torch.no_grad():                                   # the trainer's network with the checkpoint's weights
        torch.testing.assert_close(m.networks[0](torch.ones(1, 2, *PATCH)), _reference_output(root))
    paths, _, _ = case
    out = tmp_path / "out"
    r = runner.invoke(app, ["explain", str(paths[0]), str(paths[1]), "--nnunet", str(root), "--no-mirroring",
                            "--target", "1", "--region", "all", "--method", "saliency", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert any(out.glob("*saliency*.nii.gz")), sorted(p.name for p in out.iterdir())

    with pytest.raises(ModelLoadError, match=r"close matches: .*nnUNetTrainer_1epoch\b"):
        find_trainer_class("nnUNetTrainer_1epochs")
    ext = tmp_path / "ext"
    ext.mkdir()
    (ext / "my_trainers.py").write_text("import not_installed_pkg_mx27\n"
                                        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
                                        "class MyTrainer(nnUNetTrainer):\n    pass\n")
    monkeypatch.setenv("nnUNet_extTrainer", str(ext))
    with pytest.raises(ModelLoadError, match="needs the package 'not_installed_pkg_mx27', not installed"):
        find_trainer_class("MyTrainer")
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ModelLoadError, match="needs the package 'timm'"):
            find_trainer_class("nnUNet_Primus_S_Trainer")


def _reference_output(root):
    net = reference_network(plans())
    net.load_state_dict(torch.load(root / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"])
    with torch.no_grad():
        return net.eval()(torch.ones(1, 2, *PATCH))


@pytest.mark.slow
def test_a_folder_trained_by_nnunet_itself_for_one_epoch_is_explained(tmp_path, monkeypatch):
    """nnU-Net's own planning, preprocessing and 1-epoch training (nnUNetTrainer_1epoch: 250 iterations, CPU) on
    six tiny synthetic cases, then the folder it writes is loaded and explained from the command line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from medexplain.cli import app

    bin_dir = os.path.dirname(sys.executable)
    if not os.path.exists(os.path.join(bin_dir, "nnUNetv2_train")):
        pytest.skip("nnU-Net's command-line entry points are not installed next to this Python")
    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "res"), "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1",
           "nnUNet_compile": "f", "OMP_NUM_THREADS": "1"}
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, env[k])
    raw = tmp_path / "raw" / "Dataset998_Tiny"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    g = np.random.default_rng(0)
    for i in range(6):                                    # a bright cube on noise; the label is the cube
        lab = np.zeros((16, 16, 16), np.uint8)
        c = g.integers(3, 9, 3)
        lab[c[0]:c[0] + 5, c[1]:c[1] + 5, c[2]:c[2] + 5] = 1
        im = (g.normal(size=lab.shape) + 3 * lab).astype(np.float32)
        nib.save(nib.Nifti1Image(im, np.eye(4)), raw / "imagesTr" / f"case{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), raw / "labelsTr" / f"case{i:03d}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": {"background": 0,
                                                  "lesion": 1}, "numTraining": 6, "file_ending": ".nii.gz"}))
    # nnUNetv2_train looks its trainer up with nnunetv2's recursive lookup, which imports every trainer module and
    # dies on the Primus trainers' timm import when timm is not installed (the bug medexplain works around): its
    # entry point is run with that lookup replaced by medexplain's find_trainer_class, everything else nnU-Net's
    train = ("import sys, nnunetv2.run.run_training as rt; from medexplain.models.nnunet import find_trainer_class; "
             "rt.recursive_find_trainer_class_by_name = find_trainer_class; sys.argv[1:] = ['998', '3d_fullres', '0', "
             "'-tr', 'nnUNetTrainer_1epoch', '-device', 'cpu']; rt.run_training_entry()")
    src = str(Path(mx.__file__).resolve().parents[1])
    def run(cmd, **extra):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**env, **extra})
        assert r.returncode == 0, (cmd, r.stdout[-3000:], r.stderr[-3000:])

    run([os.path.join(bin_dir, "nnUNetv2_plan_and_preprocess"), "-d", "998", "-c", "3d_fullres", "-np", "1"])
    # the plans' network narrowed to 4-8-16 features (plans.json is nnU-Net's documented place to edit the
    # architecture; the preprocessed data does not depend on it), so one epoch takes seconds on a CPU
    plans_file = tmp_path / "pre" / "Dataset998_Tiny" / "nnUNetPlans.json"
    plans_json = json.loads(plans_file.read_text())
    arch = plans_json["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [4 * 2 ** i for i in range(arch["n_stages"])]
    plans_file.write_text(json.dumps(plans_json, indent=2))
    run([sys.executable, "-c", train], nnUNet_n_proc_DA="0",
        PYTHONPATH=os.pathsep.join([src, env.get("PYTHONPATH", "")]))
    root = tmp_path / "res" / "Dataset998_Tiny" / "nnUNetTrainer_1epoch__nnUNetPlans__3d_fullres"
    assert (root / "fold_0" / "checkpoint_final.pth").is_file(), sorted(p.name for p in root.iterdir())
    m = mx.models.load_nnunet(root, use_mirroring=False)
    assert m.trainer_name == "nnUNetTrainer_1epoch"
    out = tmp_path / "out"
    r = runner.invoke(app, ["explain", str(raw / "imagesTr" / "case000_0000.nii.gz"), "--nnunet", str(root),
                            "--no-mirroring", "--target", "1", "--region", "all", "--method", "saliency",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    maps = list(out.glob("*saliency*.nii.gz"))
    assert maps and nib.load(maps[0]).shape[:3] == (16, 16, 16)


def test_gradcam_through_mirroring_and_two_folds_by_the_model_mechanism(folder, case):
    """(6) An nnU-Net folder with mirroring and two folds gets Grad-CAM (it was refused, and with one fold's
    layer named it was that fold's map alone): the folds are the Model's ensemble and the mirroring axes its
    flips (core.Passes), each pass's cells flipped back, summed over the folds; every pass is counted."""
    _, img, _ = case
    m = mx.models.load_nnunet(folder, folds=(0, 1), use_mirroring=True, dtype=torch.float64)
    x = m.prepare(img, AFFINE).image[None].double()
    mask = torch.zeros(x.shape[2:], dtype=torch.bool)
    mask[2:6, 3:7, 4:8] = True
    tgt = Region(1, mask[None])
    pipeline = mx.explain(mx.Model(m.network, inferer=m.inferer), x, "gradcam", target=tgt)   # how the pipelines call it
    model = mx.load_model(folder, folds=(0, 1), dtype=torch.float64)
    assert model.n_passes == 16 and model.flip_axes == (0, 1, 2) and len(model.networks) == 2
    a = mx.explain(model, x, "gradcam", target=tgt)
    assert a.map.shape == x[:, :1].shape and a.map.abs().max() > 0
    torch.testing.assert_close(a.map, pipeline.map, rtol=1e-10, atol=1e-12)
    assert a.info["calls"] == 16
    # every pass counted: 16 per window of the blended forward and of the layer forward
    one = mx.explain(mx.load_model(folder, folds=(0,), use_mirroring=False, dtype=torch.float64), x, "gradcam",
                     target=tgt)
    assert a.info["n_forward"] == 16 * one.info["n_forward"] and a.info["n_windows"] == one.info["n_windows"] > 1
    # both folds count: Grad-CAM element-wise is linear in the passes' cells, so the ensemble's map is the mean of
    # the folds' own maps (with their own 8 mirrored passes each), neither of them alone
    per_fold = [mx.explain(mx.load_model(folder, folds=(f,), dtype=torch.float64), x, "gradcam_elementwise",
                           target=tgt).map for f in (0, 1)]
    both = mx.explain(model, x, "gradcam_elementwise", target=tgt).map
    torch.testing.assert_close(both, (per_fold[0] + per_fold[1]) / 2, rtol=1e-8, atol=1e-12)
    assert (both - per_fold[1]).abs().max() > 1e-3 * both.abs().max()
