"""``run`` is ``explain`` over a manifest (issue 23): both go through the one case pipeline
(:func:`medexplain.pipelines.explain_case`), so a manifest of nnU-Net cases, of MONAI-bundle cases and of
sliding-window cases gives, case by case, the very bytes ``medexplain explain`` writes with the same flags, in
process and on Ray."""
import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from medexplain.cli import app
from medexplain.io import method_file

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py
runner = CliRunner()
AFFINE = np.diag([1.5, 1.2, 2.0, 1.0])


def tinyseg():
    """A two-class 3D segmenter in plain PyTorch (module:factory form for the run)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 2, 1)).eval()


def volumes(tmp: Path, shape, n: int = 2, channels: int = 1) -> list[Path]:
    rng = np.random.default_rng(3)
    paths = []
    for i in range(n):
        arr = rng.normal(size=(*shape, channels) if channels > 1 else shape).astype(np.float32)
        paths.append(tmp / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(arr, AFFINE), str(paths[-1]))
    return paths


def manifest(tmp: Path, cases: list) -> Path:
    """A manifest of ``cases`` (each a file, or a list of one file per channel: the cell joins them with |)."""
    with open(tmp / "cases.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "case_id"])
        w.writerows([["|".join(map(str, c)) if isinstance(c, list) else str(c), f"c{i}"] for i, c in enumerate(cases)])
    return tmp / "cases.csv"


def explain_then_run(tmp: Path, cases: list, flags: list[str], methods: str, run_flags=(), stems=None) -> None:
    """``explain`` on each case and ``run`` on their manifest with the same flags; the maps must be the same bytes.
    ``stems``: the names explain gives each case's files (default: the image's name up to its first dot)."""
    stems = stems or [Path(c).name.split(".")[0] for c in cases]
    for i, case in enumerate(cases):
        files = [str(p) for p in (case if isinstance(case, list) else [case])]
        res = runner.invoke(app, ["explain", *files, "--method", methods, *flags, "--out", str(tmp / f"e{i}")])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["run", str(manifest(tmp, cases)), "--method", methods, *flags, *run_flags,
                              "--out", str(tmp / "run")])
    assert res.exit_code == 0, res.output
    for i, stem in enumerate(stems):
        for m in methods.split(","):
            ran = (tmp / "run" / "cases" / f"c{i}" / f"{method_file(m)}.nii.gz").read_bytes()
            explained = (tmp / f"e{i}" / f"{stem}_{method_file(m)}.nii.gz").read_bytes()
            assert ran == explained, (i, m)
            assert np.abs(np.asarray(nib.load(tmp / f"e{i}" / f"{stem}_{method_file(m)}.nii.gz").dataobj)).max() > 0


def channel_files(tmp: Path, shape, n: int = 2) -> list:
    """n nnU-Net cases as one file per channel (``caseK_0000.nii.gz``, ``caseK_0001.nii.gz``), listed out of order."""
    rng = np.random.default_rng(5)
    cases = []
    for k in range(n):
        files = []
        for c in range(2):
            files.append(tmp / f"case{k}_{c:04d}.nii.gz")
            nib.save(nib.Nifti1Image(rng.normal(size=shape).astype(np.float32), AFFINE), str(files[-1]))
        cases.append(files[::-1])
    return cases


SLIDING = ["--model", "test_run_pipeline:tinyseg", "--roi-size", "4", "--overlap", "0.25", "--sw-mode", "gaussian",
           "--target", "1", "--region", "all", "-o", "steps=3"]


def test_run_equals_explain_on_sliding_window_cases(tmp_path):
    explain_then_run(tmp_path, volumes(tmp_path, (7, 8, 6)), SLIDING, "saliency,integrated_gradients,gradcam")


def _bundle(tmp: Path):
    from test_bundle import make_bundle
    make_bundle(tmp / "bundle")
    return ["--bundle", str(tmp / "bundle"), "--target", "1"]


def test_run_equals_explain_on_bundle_cases(tmp_path):
    flags = _bundle(tmp_path)
    explain_then_run(tmp_path, volumes(tmp_path, (12, 10, 9), channels=2), flags, "saliency")


@pytest.fixture(scope="module")
def nnunet_folder(tmp_path_factory):
    """The tiny nnU-Net v2 folder of tests/test_nnunet.py (two folds, two channels)."""
    tn = pytest.importorskip("test_nnunet")
    return tn.folder.__wrapped__(tmp_path_factory)


def _nnunet(folder):
    return ["--nnunet", str(folder), "--folds", "0,1", "--no-mirroring", "--target", "1"]


def test_run_equals_explain_on_nnunet_cases(tmp_path, nnunet_folder):
    """4D files, and nnU-Net's one file per channel (given out of order: ordered by the _0000 suffix, as explain
    orders them)."""
    explain_then_run(tmp_path, volumes(tmp_path, (13, 11, 12), channels=2), _nnunet(nnunet_folder), "saliency")
    (tmp_path / "files").mkdir()
    explain_then_run(tmp_path / "files", channel_files(tmp_path / "files", (13, 11, 12)), _nnunet(nnunet_folder),
                     "saliency", stems=["case0", "case1"])


def test_run_refuses_preprocessing_columns_with_a_model_that_brings_its_own(tmp_path, nnunet_folder):
    images = volumes(tmp_path, (13, 11, 12), n=1, channels=2)
    (tmp_path / "m.csv").write_text(f"image,spacing\n{images[0]},2\n")
    res = runner.invoke(app, ["run", str(tmp_path / "m.csv"), *_nnunet(nnunet_folder), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "preprocessing" in res.output and not (tmp_path / "r").exists()


def test_run_plans_methods_on_each_cases_output_as_explain_does(tmp_path):
    """A method that does not apply to a case's output (medcam explains classifier logits; this is a segmenter) is
    that case's skipped item with --skip-unsupported and the others are written; without it, the case is an error
    row naming the reason (explain refuses the call). A method that does not apply to the model at all (patchnet)
    is refused before any work, as explain refuses it."""
    from medexplain.pipelines.run import read_table
    images = volumes(tmp_path, (6, 6, 6), n=1)
    base = ["run", str(manifest(tmp_path, images)), "--model", "test_run_pipeline:tinyseg"]
    res = runner.invoke(app, [*base, "--method", "saliency,medcam", "--skip-unsupported", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    rows = {r["method"]: r for r in read_table(tmp_path / "r" / "results.csv")}
    assert rows["saliency"]["status"] == "ok" and rows["medcam"]["status"] == "skipped"
    assert "classifiers" in rows["medcam"]["error"]
    res = runner.invoke(app, [*base, "--method", "saliency,medcam", "--out", str(tmp_path / "r2")])
    rows = {r["method"]: r for r in read_table(tmp_path / "r2" / "results.csv")}
    assert {r["status"] for r in rows.values()} == {"error"} and "'medcam' does not apply" in rows["saliency"]["error"]
    res = runner.invoke(app, [*base, "--method", "saliency,patchnet", "--out", str(tmp_path / "r3")])
    assert res.exit_code == 2 and "'patchnet' does not apply" in res.output and not (tmp_path / "r3").exists()


def strided():
    """A segmenter whose output grid is half its input grid."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 2, 3, stride=2, padding=1)).eval()


def test_a_region_mask_off_the_output_grid_is_the_same_error_in_run_as_in_explain(tmp_path):
    images = volumes(tmp_path, (8, 8, 8), n=1)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), AFFINE), str(tmp_path / "mask.nii.gz"))
    flags = ["--model", "test_run_pipeline:strided", "--target", "1", "--region", str(tmp_path / "mask.nii.gz")]
    res = runner.invoke(app, ["explain", str(images[0]), *flags, "--out", str(tmp_path / "e")])
    assert res.exit_code == 2 and "output grid" in res.output
    res = runner.invoke(app, ["run", str(manifest(tmp_path, images)), *flags, "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    from medexplain.pipelines.run import read_table
    (row,) = read_table(tmp_path / "r" / "results.csv")
    assert row["status"] == "error" and row["error"].startswith("target: --region") and "output grid" in row["error"]


def test_run_overwrite_recomputes_a_run_and_excludes_resume(tmp_path):
    images = volumes(tmp_path, (6, 6, 6), n=2)
    args = ["run", str(manifest(tmp_path, images)), "--model", "test_run_pipeline:tinyseg", "--out", str(tmp_path / "r")]
    assert runner.invoke(app, args).exit_code == 0
    before = (tmp_path / "r" / "cases" / "c0" / "saliency.nii.gz").read_bytes()
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = runner.invoke(app, [*args, "--overwrite"])
    assert res.exit_code == 0 and "computed 2, already complete 0" in res.output, res.output
    assert (tmp_path / "r" / "cases" / "c0" / "saliency.nii.gz").read_bytes() == before
    res = runner.invoke(app, [*args, "--overwrite", "--resume"])
    assert res.exit_code == 2 and "give one" in res.output


def tinyseg_b():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 2, 1)).eval()


ENSEMBLE = ["--model", "test_run_pipeline:tinyseg", "--model", "test_run_pipeline:tinyseg_b", "--flip-axes", "0,1,2",
            "--target", "1", "--region", "all"]


def test_an_ensemble_with_flips_from_the_command_line_is_the_model_object(tmp_path):
    """Two --model and --flip-axes build mx.load_model([a, b], flip_axes=...): explain's map is mx.explain on that
    model object (16 passes counted), and run writes the same bytes and records the ModelSpec it loaded."""
    import json

    import medexplain as mx
    from medexplain.engine.targets import Region
    images = volumes(tmp_path, (6, 7, 5))
    explain_then_run(tmp_path, images, ENSEMBLE, "saliency,gradcam")
    model = mx.load_model([tinyseg(), tinyseg_b()], flip_axes=(0, 1, 2))
    x = torch.from_numpy(np.asarray(nib.load(images[0]).dataobj))[None, None]
    for m in ("saliency", "gradcam"):
        want = mx.explain(model, x, m, target=Region([1], torch.ones(1, 6, 7, 5, dtype=torch.bool))).map[0, 0]
        got = torch.from_numpy(np.asarray(nib.load(tmp_path / "e0" / f"case0_{m}.nii.gz").dataobj))
        assert torch.allclose(got, want.float(), rtol=1e-5, atol=1e-7 * float(want.abs().max())), m
    info = json.loads((tmp_path / "e0" / "case0_info.json").read_text())
    assert info["methods"]["saliency"]["n_forward"] == 16 and "+" in info["model"]
    config = json.loads((tmp_path / "run" / "run.json").read_text())["config"]   # the run records its ModelSpec
    assert config["model"] == {"source": ["test_run_pipeline:tinyseg", "test_run_pipeline:tinyseg_b"],
                               "flip_axes": [0, 1, 2]} and config["device"] == "auto"
    assert mx.ModelSpec.from_dict(config["model"]).load().n_passes == 16


def bn_train():
    """A segmenter left entirely in training mode, with a BatchNorm (batch statistics in training mode)."""
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.BatchNorm3d(3), nn.Tanh(), nn.Conv3d(3, 2, 1)).train()


def test_the_eval_policy_reaches_the_model_object(tmp_path):
    """explain_image(mx.ModelSpec(net, eval=policy), ...) (the CLI's --eval) explains mx.Model(network, eval=policy):
    a network left in
    training mode is used as given with never, switched to eval with always. (The loaders of a file or factory
    switch what they load to eval mode themselves, so from the command line --eval matters for what they keep.)"""
    import medexplain as mx
    from medexplain.engine.targets import Region
    from medexplain.pipelines import explain_image
    (image,) = volumes(tmp_path, (5, 6, 4), n=1)
    x = torch.from_numpy(np.asarray(nib.load(image).dataobj))[None, None]
    maps = {}
    for policy in ("always", "never"):
        net = bn_train()
        res = explain_image(image, mx.ModelSpec(net, eval=policy), "saliency", tmp_path / policy, target=1, region="all")
        maps[policy] = res.attributions["saliency"].map
        want = mx.explain(mx.Model(bn_train(), eval=policy), x, "saliency",
                          target=Region([1], torch.ones(1, 5, 6, 4, dtype=torch.bool))).map
        assert torch.allclose(maps[policy], want, rtol=1e-5, atol=1e-8), policy
        assert net.training and net[1].training    # the network is left as it was given
    assert not torch.allclose(maps["always"], maps["never"])
    res = runner.invoke(app, ["explain", str(image), "--model", "test_run_pipeline:bn_train", "--eval", "never",
                              "--target", "1", "--region", "all", "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output


@pytest.mark.slow
def test_run_on_ray_equals_explain_on_nnunet_bundle_and_sliding_window_cases(tmp_path, nnunet_folder):
    ray = pytest.importorskip("ray")
    import os
    import sys
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys([os.getcwd(), *sys.path]))}})
    try:
        ray_flags = ["--backend", "ray", "--num-workers", "2", "--batch-size", "1"]
        for name, flags, shape, channels, methods in (
                ("sliding", SLIDING, (7, 8, 6), 1, "saliency,integrated_gradients"),
                ("ensemble", ENSEMBLE, (6, 7, 5), 1, "saliency,gradcam"),
                ("bundle", _bundle(tmp_path), (12, 10, 9), 2, "saliency"),
                ("nnunet", _nnunet(nnunet_folder), (13, 11, 12), 2, "saliency,integrated_gradients")):
            (tmp_path / name).mkdir(exist_ok=True)
            explain_then_run(tmp_path / name, volumes(tmp_path / name, shape, channels=channels), flags, methods,
                             ray_flags)
    finally:
        ray.shutdown()


def test_run_draws_its_figures_with_the_figure_options_explain_takes(tmp_path):
    """run --format png --figure key=value (declared once, as explain's): each case's PNG is the figure explain
    draws with the same options, and the options change it (the default figure differs)."""
    from PIL import Image
    (image,) = volumes(tmp_path, (6, 7, 5), n=1)
    flags = ["--model", "test_run_pipeline:tinyseg", "--method", "saliency", "--target", "1", "--region", "all"]
    figure = ["--figure", "cmap=viridis", "--figure", "alpha=0.9", "--figure", "planes=axial"]
    res = runner.invoke(app, ["explain", str(image), *flags, *figure, "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    pixels = {}
    for name, extra in (("run", figure), ("plain", [])):
        res = runner.invoke(app, ["run", str(manifest(tmp_path, [image])), *flags, "--format", "png", *extra,
                                  "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        pixels[name] = np.asarray(Image.open(tmp_path / name / "cases" / "c0" / "saliency.png").convert("RGB"))
    explained = np.asarray(Image.open(tmp_path / "e" / "case0_saliency.png").convert("RGB"))
    assert np.array_equal(pixels["run"], explained)
    assert pixels["plain"].shape != explained.shape or not np.array_equal(pixels["plain"], explained)
    res = runner.invoke(app, ["run", str(manifest(tmp_path, [image])), *flags, "--format", "png", "--figure",
                              "colour=red", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "colour" in res.output and not (tmp_path / "bad").exists()
