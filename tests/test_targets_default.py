"""The one target grammar (medexplain.engine.targets.resolve_target) and the detected output activation
(medexplain.engine.ops.detect_activation): a segmenter's default is its largest predicted foreground region,
never the background; a classifier's is its top class; probabilities are never softmaxed twice."""
import json
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from medexplain import errors
from medexplain.cli import app
from medexplain.engine.ops import detect_activation, probabilities, resolve_activation
from medexplain.engine.targets import Class, Region, parse_target, resolve_target

runner = CliRunner()


def seg_logits():
    """(1, 3, 6, 6): background everywhere but a 2x3 block of class 2 and one voxel of class 1."""
    z = torch.zeros(1, 3, 6, 6)
    z[0, 0] = 5.0
    z[0, 2, 1:3, 1:4] = 10.0
    z[0, 1, 5, 5] = 10.0
    return z


def test_segmenter_default_is_the_largest_foreground_class_and_its_predicted_region():
    r = resolve_target(seg_logits())
    assert r.class_index == 2 and r.region == "predicted" and r.voxels == [6]
    assert isinstance(r.target, Region) and r.target.mask.sum() == 6 and r.activation == "softmax"
    assert "foreground class with the most predicted voxels" in r.how and "{0: 29, 1: 1, 2: 6}" in r.how
    info = r.info()
    assert info == {"class": 2, "region": "predicted", "region_voxels": 6, "how": r.how, "activation": "softmax"}


def test_background_only_when_asked_and_regions_all_or_mask():
    z = seg_logits()
    r0 = resolve_target(z, 0)
    assert r0.class_index == 0 and r0.voxels == [29] and r0.how.startswith("given")
    r_all = resolve_target(z, 1, "all")
    assert isinstance(r_all.target, Class) and r_all.voxels == [36]
    m = torch.zeros(1, 6, 6, dtype=torch.bool)
    m[0, :4, :4] = True
    r_m = resolve_target(z, 2, m, region_name="lesion.nii.gz")
    assert r_m.region == "lesion.nii.gz" and r_m.voxels == [16] and torch.equal(r_m.target.mask, m)
    with pytest.raises(errors.EmptyRegionError, match="predicts no voxel of that class"):
        resolve_target(torch.zeros(1, 3, 6, 6).index_fill_(1, torch.tensor([0]), 1.0), 1)
    with pytest.raises(errors.EmptyRegionError, match="no foreground voxel"):
        resolve_target(torch.zeros(1, 2, 4, 4).index_fill_(1, torch.tensor([0]), 1.0))
    with pytest.raises(errors.TargetError, match="out of range"):
        resolve_target(z, 3)


def test_small_region_warns():
    with pytest.warns(UserWarning, match="only 1 voxel"):
        resolve_target(seg_logits(), 1)


def test_sigmoid_channels_are_independent_labels():
    z = torch.full((1, 2, 4, 4), -5.0)
    z[0, 0, :3, :3] = 5.0                           # 9 voxels of label 0
    z[0, 1, :2, :] = 5.0                            # 8 voxels of label 1 (overlapping)
    r = resolve_target(z, activation="sigmoid")
    assert r.class_index == 0 and r.voxels == [9]   # no channel is background for sigmoid outputs
    one = resolve_target(z[:, 1:], activation="auto")
    assert one.class_index == 0 and one.activation == "sigmoid" and one.voxels == [8]


def test_classifier_default_top_class_and_no_region():
    z = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    r = resolve_target(z)
    assert r.classes == [1, 0] and r.region is None and isinstance(r.target, Class)
    assert resolve_target(z[:1], "2").class_index == 2
    with pytest.raises(errors.TargetError, match="--region is for segmentation"):
        resolve_target(z, None, "predicted")


@pytest.mark.parametrize("value, k", [(None, None), ("predicted", None), ("3", 3), (2, 2)])
def test_parse_target(value, k):
    assert parse_target(value) == k


@pytest.mark.parametrize("bad", ["abc", "-1", "1.5", True])
def test_parse_target_rejects(bad):
    with pytest.raises(errors.TargetError):
        parse_target(bad)


def test_activation_detected_from_values_and_final_modules():
    z = torch.randn(2, 3, 4, 4)
    assert detect_activation(z)[0] == "softmax" and detect_activation(z[:, :1])[0] == "sigmoid"
    p = torch.softmax(z, 1)
    act, why = detect_activation(p)
    assert act == "none" and "sum to 1" in why
    torch.testing.assert_close(probabilities(p, "auto"), p)                  # no second softmax
    sig = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Sigmoid())
    out = sig(torch.randn(1, 1, 4, 4))
    assert resolve_activation(out, "auto") == "sigmoid" and resolve_activation(out, "auto", sig) == "none"
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(1, 2, 1), nn.Softmax(1)))
    assert detect_activation(torch.rand(1, 2, 3, 3), scripted)[0] == "none"
    assert resolve_activation(p, "softmax") == "softmax"
    with pytest.raises(errors.TargetError, match="activation must be one of"):
        resolve_activation(p, "relu")


# ---- the commands -----------------------------------------------------------------------------------
class TwoBlobs(nn.Module):
    """A fixed 3-class segmenter of a 1-channel volume: class 1 where x > 1, class 2 where x < -1."""

    def __init__(self, softmax=False):
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 4.0, -4.0]).view(3, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([2.0, -2.0, -2.0]))
        self.softmax = softmax

    def forward(self, x):
        z = self.conv(x)
        return torch.softmax(z, 1) if self.softmax else z


def two_blobs():
    return TwoBlobs().eval()


def two_blobs_softmax():
    return TwoBlobs(softmax=True).eval()


def volume(tmp_path, affine=None):
    x = np.zeros((8, 8, 8), np.float32)
    x[1:4, 1:4, 1:4] = 3.0                          # 27 voxels of class 1
    x[5:7, 5:7, 5:8] = -3.0                         # 12 voxels of class 2
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(x, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


def test_cli_segmenter_default_region_recorded(tmp_path):
    res = runner.invoke(app, ["explain", str(volume(tmp_path)), "--model", "test_targets_default:two_blobs",
                              "--method", "saliency", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    info = json.loads(next((tmp_path / "out").glob("*info.json")).read_text())
    t = info["target_info"]
    assert info["target"] == 1 and t["class"] == 1 and t["region"] == "predicted" and t["region_voxels"] == 27
    assert t["how"].startswith("default: the foreground class") and t["activation"] == "softmax"
    assert "explained class 1, region predicted (27 voxels)" in res.output.replace("\n", " ")


def test_cli_region_mask_on_another_grid_is_resampled_by_geometry(tmp_path):
    img = volume(tmp_path)                                            # 8^3 at 2 mm
    fine = np.zeros((16, 16, 16), np.uint8)                           # the same space at 1 mm
    fine[10:14, 10:14, 10:16] = 1                                     # = voxels 5:7, 5:7, 5:8 of the image
    nib.save(nib.Nifti1Image(fine, np.diag([1.0, 1.0, 1.0, 1.0]) @ np.array(
        [[1, 0, 0, -0.5], [0, 1, 0, -0.5], [0, 0, 1, -0.5], [0, 0, 0, 1]])), str(tmp_path / "m.nii.gz"))
    res = runner.invoke(app, ["explain", str(img), "--model", "test_targets_default:two_blobs", "--target", "2",
                              "--region", str(tmp_path / "m.nii.gz"), "--method", "saliency", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    t = json.loads(next((tmp_path / "o").glob("*info.json")).read_text())["target_info"]
    assert t["class"] == 2 and t["region"] == "m.nii.gz" and t["region_voxels"] == 12


def test_cli_region_all_and_a_tiny_region_warns(tmp_path):
    x = np.zeros((8, 8, 8), np.float32)
    x[2, 2, 2:4] = 3.0                                                # 2 voxels of class 1
    nib.save(nib.Nifti1Image(x, np.eye(4)), str(tmp_path / "t.nii.gz"))
    res = runner.invoke(app, ["explain", str(tmp_path / "t.nii.gz"), "--model", "test_targets_default:two_blobs",
                              "--method", "saliency", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0 and "warning:" in res.output and "only 2 voxel(s)" in res.output, res.output
    res = runner.invoke(app, ["explain", str(tmp_path / "t.nii.gz"), "--model", "test_targets_default:two_blobs",
                              "--target", "1", "--region", "all", "--method", "saliency", "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    assert json.loads(next((tmp_path / "o2").glob("*info.json")).read_text())["target_info"]["region_voxels"] == 512


def test_instances_do_not_softmax_probabilities_twice(tmp_path):
    img = volume(tmp_path)
    res = runner.invoke(app, ["instances", str(img), "--model", "test_targets_default:two_blobs_softmax",
                              "--out", str(tmp_path / "o"), "--n-samples", "1", "--min-size", "1"])
    assert res.exit_code == 0, res.output
    with torch.no_grad():
        own = two_blobs_softmax()(torch.from_numpy(nib.load(str(img)).get_fdata()).float()[None, None])
    prob = nib.load(str(tmp_path / "o" / "probability.nii.gz")).get_fdata()
    info = json.loads((tmp_path / "o" / "info.json").read_text())
    assert info["class"] == 1 and info["activation"] == "none" and "sum to 1" in info["activation_how"]
    assert prob.max() == pytest.approx(float(own[0, 1].max()), abs=1e-6)
    assert np.allclose(prob, own[0, 1].numpy(), atol=1e-6)
    twice = torch.softmax(own, 1)[0, 1].max()
    assert abs(prob.max() - float(twice)) > 0.1                      # what a second softmax gave
    assert "activation none" in res.output


def test_shapley_activation_auto_on_a_probability_model(tmp_path):
    from medexplain.pipelines import contrast_shapley
    from medexplain.segmentation.shapley import channel_shapley, mean_foreground_probability

    class TwoContrasts(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(2, 2, 1)
            with torch.no_grad():
                self.conv.weight.copy_(torch.tensor([[0.0, 0.0], [2.0, 1.0]]).view(2, 2, 1, 1, 1))
                self.conv.bias.copy_(torch.tensor([0.0, -1.0]))

        def forward(self, x):
            return torch.softmax(self.conv(x), 1)

    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 4, 4, 4, generator=g)
    np.save(tmp_path / "c.npy", img.numpy())
    net = TwoContrasts().eval()
    res = contrast_shapley(tmp_path / "c.npy", [net], tmp_path / "out")
    direct = channel_shapley(net, img[None], mean_foreground_probability(1, "none"))
    torch.testing.assert_close(res.results[0].values, direct.values)
    twice = channel_shapley(net, img[None], mean_foreground_probability(1, "softmax"))
    assert not torch.allclose(twice.values, direct.values, atol=1e-3)
    ranking = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert ranking["activation"][0]["activation"] == "none"


def test_several_outputs_warn_and_output_selects(tmp_path):
    img = volume(tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = runner.invoke(app, ["explain", str(img), "--model", "test_targets_default:aux_main", "--method", "saliency",
                                  "--output", "1", "--out", str(tmp_path / "o1")])
    assert res.exit_code == 0 and "warning:" not in res.output, res.output
    res = runner.invoke(app, ["explain", str(img), "--model", "test_targets_default:aux_main", "--method", "saliency",
                              "--out", str(tmp_path / "o0")])
    assert res.exit_code == 0 and "returned 2 outputs" in res.output, res.output


class AuxMain(nn.Module):
    def __init__(self):
        super().__init__()
        self.main = TwoBlobs()

    def forward(self, x):
        z = self.main(x)
        return z * 0.5, z


def aux_main():
    return AuxMain().eval()


def test_a_4d_series_read_as_channels_warns(tmp_path):
    series = np.random.default_rng(0).random((6, 6, 6, 12), dtype=np.float32)   # 12 volumes
    hdr = nib.Nifti1Header()
    hdr.set_xyzt_units("mm", "sec")
    nib.save(nib.Nifti1Image(series, np.eye(4), hdr), str(tmp_path / "bold.nii.gz"))
    res = runner.invoke(app, ["explain", str(tmp_path / "bold.nii.gz"), "--model", "test_targets_default:two_blobs",
                              "--method", "saliency", "--out", str(tmp_path / "o")])
    assert "read as input channels" in res.output and "time series" in res.output, res.output


def test_run_manifest_uses_the_target_grammar_and_preprocessing_columns(tmp_path):
    from medexplain.pipelines.run import run_manifest
    volume(tmp_path)
    m = np.zeros((8, 8, 8), np.uint8)
    m[1:3, 1:3, 1:3] = 1
    nib.save(nib.Nifti1Image(m, np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "m.nii.gz"))
    (tmp_path / "cases.csv").write_text("case_id,image,target,region,divisible_by,intensity\n"
                                        "a,v.nii.gz,,,,\nb,v.nii.gz,predicted,,3,zscore\nc,v.nii.gz,1,m.nii.gz,,\n"
                                        "d,v.nii.gz,2,all,,\n")
    res = run_manifest(tmp_path / "cases.csv", "test_targets_default:two_blobs", ["saliency"], tmp_path / "out")
    rows = {r["case_id"]: r for r in res.rows}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["a"]["target"] == 1 and rows["a"]["region"] == "predicted" and rows["a"]["region_voxels"] == 27
    assert rows["a"]["predicted"] == 1 and rows["a"]["target_source"] == "predicted"
    assert rows["b"]["preprocessing"] == {"divisible_by": "3", "intensity": "zscore"}
    assert rows["c"]["region_voxels"] == 8 and rows["d"]["region"] == "all" and rows["d"]["target"] == 2
    for case in "abcd":
        img = nib.load(str(tmp_path / "out" / "cases" / case / "saliency.nii.gz"))
        assert img.shape == (8, 8, 8) and np.allclose(img.affine, np.diag([2.0, 2.0, 2.0, 1.0]))


def test_run_level_preprocessing_defaults_fill_empty_cells_and_are_part_of_the_resume_fingerprint(tmp_path):
    """`run --divisible-by 4` (the ModelSpec's preprocessing) is the default of the manifest's column; a case's cell wins;
    a bad setting is refused before anything is written; a resume with other defaults is refused."""
    from medexplain import ModelSpec
    from medexplain.pipelines.run import run_manifest
    volume(tmp_path)
    (tmp_path / "cases.csv").write_text("case_id,image,divisible_by,intensity\na,v.nii.gz,,\nb,v.nii.gz,3,zscore\n")
    with pytest.raises(errors.OptionError, match="unknown preprocessing"):
        run_manifest(tmp_path / "cases.csv", ModelSpec("test_targets_default:two_blobs",
                                                       preprocessing={"spacingg": "1"}), ["saliency"], tmp_path / "bad")
    with pytest.raises(errors.OptionError, match="run preprocessing"):
        run_manifest(tmp_path / "cases.csv", ModelSpec("test_targets_default:two_blobs",
                                                          preprocessing={"divisible_by": "zero"}), ["saliency"],
                     tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    r = CliRunner().invoke(app, ["run", str(tmp_path / "cases.csv"), "--model", "test_targets_default:two_blobs",
                                 "--out", str(tmp_path / "out"), "--divisible-by", "4"])
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["config"]["preprocessing"] == {"divisible_by": "4"}
    rows = {c: json.loads((tmp_path / "out" / "cases" / c / "saliency.json").read_text()) for c in "ab"}
    assert rows["a"]["preprocessing"] == {"divisible_by": "4"}
    assert rows["b"]["preprocessing"] == {"divisible_by": "3", "intensity": "zscore"}
    for c in "ab":
        img = nib.load(str(tmp_path / "out" / "cases" / c / "saliency.nii.gz"))
        assert img.shape == (8, 8, 8) and np.allclose(img.affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    with pytest.raises(errors.MedexplainError, match="preprocessing"):
        run_manifest(tmp_path / "cases.csv", ModelSpec("test_targets_default:two_blobs",
                                                          preprocessing={"divisible_by": "8"}), ["saliency"],
                     tmp_path / "out", resume=True)
