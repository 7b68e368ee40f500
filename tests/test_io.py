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


def test_overlays_2d_and_3d(tmp_path):
    img2, m2 = torch.rand(1, 16, 16), torch.randn(1, 16, 16)
    p = io.write_png_overlay(img2, m2, tmp_path / "o.png")
    assert Image.open(p).size == (16, 16)
    m3 = torch.zeros(1, 9, 8, 8)
    m3[0, 6, 2:4, 2:4] = 1.0
    p = io.write_png_overlay(torch.rand(2, 9, 8, 8), m3, tmp_path / "o3.png", n_slices=3)
    assert Image.open(p).size == (3 * 10, 8)
    assert io.representative_slices(m3, 3)[0] <= 6 and 6 in io.representative_slices(m3, 3)


def test_diverging_colours_have_sign():
    rgb = io.overlay_rgb(np.zeros((1, 1, 2)), np.array([[[1.0, -1.0]]]), alpha=1.0)
    assert rgb[0, 0, 0] > rgb[0, 0, 2] and rgb[0, 1, 2] > rgb[0, 1, 0]  # red positive, blue negative
