"""The preprocessing a model was trained with (medexplain.models.transforms): a MONAI Compose given with
--transform, or the shortcuts, is applied before the model and inverted for the maps. The written map
is on the input's own grid and affine and equals the map computed on the preprocessed tensor, resampled
back by geometry (an independent resampling: SciPy's map_coordinates through the two affines)."""
import json
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from typer.testing import CliRunner

import medexplain as mx
from conftest import TinyClassifier
from medexplain import errors
from medexplain.cli import app
from medexplain.models.transforms import Preprocessing, parse_intensity, resample_to_grid
from medexplain.pipelines import explain_image

runner = CliRunner()
AFFINE = np.array([[-1.5, 0.0, 0.0, 20.0],      # x flipped, y and z swapped, anisotropic: not RAS
                   [0.0, 0.0, 2.0, -10.0],
                   [0.0, 1.0, 0.0, 5.0],
                   [0.0, 0.0, 0.0, 1.0]])
SHAPE = (12, 10, 14)

MODULE = '''
from monai.transforms import Compose, NormalizeIntensityd, Orientationd, Spacingd


def build():
    return Compose([Orientationd("image", "RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
                    Spacingd("image", (1.0, 1.0, 1.0), mode="bilinear"),
                    NormalizeIntensityd("image")])
'''


def net():
    torch.manual_seed(0)
    return TinyClassifier(3, cin=1).eval()


def scan(tmp_path):
    g = np.random.default_rng(0)
    x = ndimage.gaussian_filter(g.random(SHAPE), 1.5).astype(np.float32) * 100 + 50
    nib.save(nib.Nifti1Image(x, AFFINE), str(tmp_path / "scan.nii.gz"))
    return tmp_path / "scan.nii.gz", x


def back_on_the_image_grid(m_pre: np.ndarray, affine_pre: np.ndarray) -> np.ndarray:
    """Resample a map on the preprocessed grid onto the image grid: voxel i -> world A0 i -> A1^-1 world."""
    ii = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1).reshape(-1, 3)
    j = (np.c_[ii, np.ones(len(ii))] @ AFFINE.T) @ np.linalg.inv(affine_pre).T
    return ndimage.map_coordinates(m_pre.astype(np.float64), j[:, :3].T, order=1, mode="nearest").reshape(SHAPE)


def test_transform_compose_round_trips(tmp_path, monkeypatch):
    from monai.data import MetaTensor
    path, x = scan(tmp_path)
    torch.jit.save(torch.jit.script(net()), tmp_path / "m.pt")
    (tmp_path / "mxprep_roundtrip.py").write_text(MODULE)           # in the current folder: importable as is
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    res = runner.invoke(app, ["explain", str(path), "--model", str(tmp_path / "m.pt"), "--method", "saliency",
                              "--transform", "mxprep_roundtrip:build", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    written = nib.load(str(tmp_path / "out" / "scan_saliency.nii.gz"))
    assert written.shape == SHAPE and np.allclose(written.affine, AFFINE)

    # the same map computed on the preprocessed tensor, then resampled back independently
    compose = __import__("mxprep_roundtrip").build()
    pre = compose({"image": MetaTensor(torch.from_numpy(x)[None], affine=torch.as_tensor(AFFINE))})["image"]
    assert tuple(pre.shape[1:]) != SHAPE                                      # the grid did change
    xp = pre.as_tensor()[None].float()
    target = int(net()(xp).argmax(1))
    m_pre = mx.explain(net(), xp, "saliency", target=target).map[0, 0].numpy()
    expected = back_on_the_image_grid(m_pre, pre.affine.numpy())
    got = written.get_fdata()
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    info = json.loads((tmp_path / "out" / "scan_info.json").read_text()) if (tmp_path / "out" / "scan_info.json").exists() \
        else json.loads((tmp_path / "out" / "info.json").read_text())
    assert info["preprocessing"]["transform"] == "mxprep_roundtrip:build"
    assert info["preprocessing"]["model_grid"] == list(pre.shape[1:]) and info["target"] == target


def test_array_compose_and_shortcuts_round_trip_through_the_api(tmp_path):
    from monai.data import MetaTensor
    from monai.transforms import Compose, Orientation, ScaleIntensityRangePercentiles, Spacing
    path, x = scan(tmp_path)
    compose = Compose([Orientation("LPS", labels=(("L", "R"), ("P", "A"), ("I", "S"))), Spacing((2.0, 1.0, 1.5)),
                       ScaleIntensityRangePercentiles(1, 99, 0, 1, clip=True)])
    res = explain_image(path, mx.Model(net(), preprocessing=Preprocessing(transform=compose)), "saliency", tmp_path / "a")
    pre = compose(MetaTensor(torch.from_numpy(x)[None], affine=torch.as_tensor(AFFINE)))
    m_pre = mx.explain(net(), pre.as_tensor()[None].float(), "saliency", target=res.target).map[0, 0].numpy()
    expected = back_on_the_image_grid(m_pre, pre.affine.numpy())
    got = nib.load(str(tmp_path / "a" / "scan_saliency.nii.gz"))
    assert got.shape == SHAPE and np.allclose(got.affine, AFFINE)
    assert np.abs(got.get_fdata() - expected).max() <= 1e-5 * np.abs(expected).max()
    # the shortcuts: the same kind of round trip, with padding to a multiple
    short = Preprocessing(spacing="1.5", orientation="RAS", divisible_by="8", intensity="zscore")
    res = explain_image(path, mx.ModelSpec(net(), preprocessing=short), "saliency", tmp_path / "b")
    grid = res.attributions["saliency"].map.shape[2:]
    assert all(s % 8 == 0 for s in grid)
    got = nib.load(str(tmp_path / "b" / "scan_saliency.nii.gz"))
    assert got.shape == SHAPE and np.allclose(got.affine, AFFINE) and np.abs(got.get_fdata()).max() > 0


def test_shortcut_parsing():
    p = Preprocessing(spacing="1,1,2", orientation="ras", spatial_size="64x64x32", intensity="range:-1000,1000")
    assert p.spacing == (1.0, 1.0, 2.0) and p.orientation == "RAS" and p.spatial_size == (64, 64, 32)
    assert parse_intensity("percentile:0.5,99.5") == ("percentile", (0.5, 99.5))
    assert Preprocessing(intensity="none").intensity is None and not Preprocessing().active
    assert Preprocessing(divisible_by=32).describe()["divisible_by"] == 32


def test_resample_to_grid_by_geometry():
    mask = torch.zeros(1, 4, 4, 4)
    mask[0, 1, 1, 1] = 1                                                # at world (2, 2, 2) on a 2 mm grid
    m = resample_to_grid(mask, np.diag([2.0, 2.0, 2.0, 1.0]), (8, 8, 8), np.eye(4))
    assert m.dtype == torch.bool and m[2, 2, 2] and not m[0, 0, 0]
    same = resample_to_grid(mask, np.eye(4), (4, 4, 4), np.eye(4))
    assert torch.equal(same, mask[0] > 0)


def test_preprocessing_errors_are_typed():
    for kw, words in [({"spacing": "a,b"}, "numbers"), ({"divisible_by": "0"}, "positive"),
                      ({"orientation": "XYZ"}, "axis codes"), ({"intensity": "zscor"}, "unknown --intensity"),
                      ({"intensity": "percentile:99,1"}, "LOW < HIGH"), ({"spatial_size": "8", "divisible_by": 4}, "not both")]:
        with pytest.raises(errors.OptionError, match=words):
            Preprocessing(**kw)


def test_min_size_and_divisible_by_combine_pad_to_the_larger(tmp_path):
    """Issue 27: a brain-extraction U-Net needs at least N voxels per axis *and* a multiple of k;
    --min-spatial-size N --divisible-by k pads each axis of n voxels to ceil(max(n, N) / k) * k, and the map is put
    back on the image's own grid (12, 10, 14 here: min 11 and a multiple of 4 give 12, 12, 16)."""
    import math
    prep = Preprocessing(min_spatial_size="11", divisible_by="4")
    out = prep.build().apply(torch.rand(1, *SHAPE), AFFINE)
    want = tuple(math.ceil(max(n, 11) / 4) * 4 for n in SHAPE)
    assert tuple(out.image.shape[1:]) == want == (12, 12, 16)
    assert prep.describe()["min_spatial_size"] == (11,) and prep.describe()["divisible_by"] == 4
    path, _ = scan(tmp_path)
    res = runner.invoke(app, ["explain", str(path), "--model", "test_transforms:net", "--method", "saliency",
                              "--min-spatial-size", "11", "--divisible-by", "4", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert nib.load(str(tmp_path / "out" / "scan_saliency.nii.gz")).shape == SHAPE
    info = json.loads((tmp_path / "out" / "scan_info.json").read_text())
    assert info["preprocessing"]["model_grid"] == [12, 12, 16]
    with pytest.raises(errors.OptionError, match="--min-spatial-size N --divisible-by k"):
        Preprocessing(spatial_size="16", divisible_by="4")
