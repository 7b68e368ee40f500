"""File I/O on real fixtures shipped with pydicom-data and nibabel."""
import importlib.resources

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from medexplain import io


def test_dicom_applies_rescale_slope_intercept():
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    img, meta = io.read_image(path)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert img.shape == (1, *ds.pixel_array.shape) and meta["format"] == "dicom"
    assert np.allclose(img[0].numpy(), expected)
    assert float(ds.RescaleIntercept) != 0  # the fixture really exercises the intercept


def test_real_chest_radiograph_reads():
    img, _ = io.read_image(pydicom.data.get_testdata_file("RG1_UNCR.dcm"))
    assert img.shape == (1, 1955, 1841)


def test_nifti_keeps_affine_and_roundtrips(tmp_path):
    src = str(importlib.resources.files("nibabel") / "tests/data/anatomical.nii")
    img, meta = io.read_image(src)
    assert img.shape == (1, 33, 41, 25)
    assert np.allclose(meta["affine"], nib.load(src).affine)
    out = io.write_nifti(img * 2, tmp_path / "m.nii.gz", meta["affine"])
    back = nib.load(str(out))
    assert np.allclose(back.affine, meta["affine"]) and np.allclose(back.get_fdata(), img[0].numpy() * 2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_multichannel_nifti_is_channels_last_on_disk(tmp_path):
    x = torch.randn(4, 6, 7, 8)
    io.write_nifti(x, tmp_path / "c.nii.gz", np.diag([2, 2, 2, 1.0]))
    assert nib.load(str(tmp_path / "c.nii.gz")).shape == (6, 7, 8, 4)
    back, meta = io.read_image(tmp_path / "c.nii.gz")
    assert torch.allclose(back, x) and meta["affine"][0, 0] == 2


@pytest.mark.parametrize("mode, channels", [("L", 1), ("RGB", 3)])
def test_png(tmp_path, mode, channels):
    arr = (np.random.default_rng(0).random((10, 12, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).convert(mode).save(tmp_path / "a.png")
    img, _ = io.read_image(tmp_path / "a.png")
    assert img.shape == (channels, 10, 12)


def test_png_figure_of_2d_and_3d_maps(tmp_path):
    img2, m2 = torch.rand(1, 16, 16), torch.randn(1, 16, 16)
    p = io.write_png_overlay(img2, m2, tmp_path / "o.png", title="saliency")
    assert max(Image.open(p).size) >= 512                                   # readable, not 16 x 16
    m3 = torch.zeros(1, 9, 8, 8)
    m3[0, 6, 2:4, 2:4] = 1.0
    p = io.write_png_overlay(torch.rand(2, 9, 8, 8), m3, tmp_path / "o3.png", affine=np.diag([2.0, 1, 1, 1]))
    w, h = Image.open(p).size
    assert w > 3 * 200 and h >= 200                                         # three planes side by side
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")]


def test_nifti_maps_carry_sform_qform_mm_and_channels_on_the_4th_axis(tmp_path):
    import SimpleITK as sitk
    affine = np.array([[0, 0, -1.2, 10], [-0.7, 0, 0, 5], [0, 0.9, 0, -3], [0, 0, 0, 1]])
    x2 = torch.randn(3, 5, 6)                                               # per-channel maps of a 2D RGB image
    io.write_nifti(x2, tmp_path / "rgb.nii.gz", affine, spatial_dims=2)
    img = nib.load(str(tmp_path / "rgb.nii.gz"))
    assert img.shape == (5, 6, 1, 3) and np.allclose(img.affine, affine)   # channels on the 4th axis, not on x
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert np.allclose(img.get_qform(), affine) and img.header.get_xyzt_units()[0] == "mm"
    back, meta = io.read_image(tmp_path / "rgb.nii.gz")
    assert torch.allclose(back, x2) and np.allclose(meta["affine"], affine)
    im = sitk.ReadImage(str(tmp_path / "rgb.nii.gz"))                       # every channel on the image's grid
    arr = sitk.GetArrayFromImage(im)
    for r, c, ch in ((0, 0, 0), (4, 5, 2), (2, 3, 1)):
        lps = np.array(im.TransformIndexToPhysicalPoint((r, c, 0, ch))[:3])
        assert np.allclose(np.diag([-1, -1, 1]) @ lps, (affine @ [r, c, 0, 1])[:3], atol=1e-5)
        assert arr[ch, 0, c, r] == pytest.approx(float(x2[ch, r, c]))
    io.write_nifti(torch.randn(1, 5, 6), tmp_path / "one.nii.gz", affine, spatial_dims=2)
    assert nib.load(str(tmp_path / "one.nii.gz")).shape == (5, 6, 1)
    nib.save(nib.Nifti1Image(np.moveaxis(x2.numpy(), 0, -1)[:, :, None, None, :], affine), str(tmp_path / "u.nii.gz"))
    assert torch.allclose(io.read_image(tmp_path / "u.nii.gz")[0], x2)      # NIfTI's 5th (u) axis read as channels
    with pytest.raises(io.InputError, match="invertible"):
        io.write_nifti(x2, tmp_path / "bad.nii.gz", np.diag([0.0, 1, 1, 1]), spatial_dims=2)


def test_check_output_dir_names_what_it_would_replace(tmp_path):
    from medexplain.errors import OutputPathError
    (tmp_path / "a_saliency.png").write_text("mine")
    io.check_output_dir(tmp_path / "new" / "sub", [tmp_path / "new" / "sub" / "x.png"])   # creatable: fine
    with pytest.raises(OutputPathError, match=r"a_saliency\.png.*--overwrite"):
        io.check_output_dir(tmp_path, [tmp_path / "a_saliency.png", tmp_path / "a_info.json"])
    io.check_output_dir(tmp_path, [tmp_path / "a_saliency.png"], overwrite=True)
    assert (tmp_path / "a_saliency.png").read_text() == "mine" and not (tmp_path / "new").exists()


def test_png_and_numpy_inputs_say_they_have_no_geometry(tmp_path):
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "a.png")
    np.save(tmp_path / "v.npy", np.zeros((1, 3, 4, 5), np.float32))
    for f, axes in (("a.png", ("row", "column")), ("v.npy", ("axis0", "axis1", "axis2"))):
        _, meta = io.read_image(tmp_path / f)
        assert np.array_equal(meta["affine"], np.eye(4)) and meta["axes"] == axes
        assert meta["geometry"].startswith("none") and meta["oriented"] is False


@pytest.mark.parametrize("name, stem", [
    ("scan.v2.nii.gz", "scan.v2"), ("scan.NII.GZ", "scan"), ("1.2.840.113.dcm", "1.2.840.113"),
    ("1.2.840.113", "1.2.840.113"), ("case7.npy", "case7"), ("x.y.npz", "x.y"), ("img.jpeg", "img"),
    ("vol.mha", "vol"), ("vol.nrrd", "vol"), ("a.b.png", "a.b"), ("notes.txt", "notes.txt"), (".png", ".png"),
    ("dir/sub/scan.nii", "scan")])
def test_file_stem_removes_only_a_known_extension(name, stem):
    assert io.file_stem(name) == stem


def test_file_stem_of_a_folder_is_its_name(tmp_path):
    (tmp_path / "series.dcm").mkdir()
    assert io.file_stem(tmp_path / "series.dcm") == "series.dcm"


def test_text_and_csv_writers_are_atomic(tmp_path):
    import csv
    io.write_csv([[1, None, "a,b"], {"x": 2, "y": 3.5}], tmp_path / "sub" / "t.csv", ["x", "y", "z"])
    assert list(csv.reader(open(tmp_path / "sub" / "t.csv"))) == [["x", "y", "z"], ["1", "", "a,b"], ["2", "3.5", ""]]
    io.write_text("héllo", tmp_path / "sub" / "t.txt")
    assert (tmp_path / "sub" / "t.txt").read_text(encoding="utf-8") == "héllo"

    class Boom:
        def __iter__(self):
            yield [1, 2]
            raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        io.write_csv(Boom(), tmp_path / "sub" / "t.csv", ["x", "y"])
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["t.csv", "t.txt"]   # old file kept, no temp
    assert (tmp_path / "sub" / "t.csv").read_text().splitlines()[0] == "x,y,z"


def test_read_channels_one_file_or_one_per_channel(tmp_path):
    vol = np.random.default_rng(0).random((3, 4, 5, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(np.moveaxis(vol, 0, -1), np.eye(4)), str(tmp_path / "all.nii.gz"))
    for c in range(3):
        nib.save(nib.Nifti1Image(vol[c], np.eye(4)), str(tmp_path / f"c{c}.nii.gz"))
    whole, _ = io.read_channels(tmp_path / "all.nii.gz")
    parts, meta = io.read_channels([tmp_path / f"c{c}.nii.gz" for c in range(3)])
    assert torch.equal(whole, parts) and torch.equal(whole, torch.from_numpy(vol)) and meta["format"] == "nifti"
    nib.save(nib.Nifti1Image(vol[0], np.diag([2.0, 1, 1, 1])), str(tmp_path / "moved.nii.gz"))
    with pytest.raises(io.FileFormatError, match="affines"):
        io.read_channels([tmp_path / "c0.nii.gz", tmp_path / "moved.nii.gz"])
    with pytest.raises(io.FileFormatError, match="one channel"):
        io.read_channels([tmp_path / "all.nii.gz", tmp_path / "c0.nii.gz"])
