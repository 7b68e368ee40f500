"""DICOM in, maps on the patient's geometry out (issue 14).

``meta["affine"]`` (tensor indices -> RAS mm) is checked against SimpleITK's geometry (direction, spacing,
origin; LPS -> RAS) and, independently of any reader, against the DICOM tags themselves
(ImagePositionPatient + column * PixelSpacing[1] * row vector + row * PixelSpacing[0] * column vector),
for pydicom's CT_small, MR_small, emri_small, an oblique multi-slice series written here (shuffled file
names, InstanceNumber against the spatial order) and an enhanced multi-frame file with functional groups.
``medexplain explain`` on that series with a model whose input gradient is non-zero at one voxel writes a
map whose peak, opened with SimpleITK, lies where the DICOM puts that voxel.
"""
import json
import random
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
import SimpleITK as sitk
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from torch import nn
from typer.testing import CliRunner

from conftest import TinyClassifier
from medexplain import io
from medexplain.cli import app
from medexplain.errors import FileFormatError, OutputPathError

runner = CliRunner()
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# the synthetic series: 9 slices of 6 x 7, PixelSpacing 0.8 (rows) x 0.6 (columns), 1.7 mm apart, oblique
N, ROWS, COLS, PS, GAP = 9, 6, 7, (0.8, 0.6), 1.7
ORIGIN = np.array([-20.0, 35.0, 12.0])
VOXEL = (5, 2, 4)          # (slice along the normal, row, column): the one voxel the test model looks at


def _rotation(axis, degrees):
    a = np.deg2rad(degrees)
    x, y, z = np.asarray(axis, float) / np.linalg.norm(axis)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c + x * x * (1 - c), x * y * (1 - c) - z * s, x * z * (1 - c) + y * s],
                     [y * x * (1 - c) + z * s, c + y * y * (1 - c), y * z * (1 - c) - x * s],
                     [z * x * (1 - c) - y * s, z * y * (1 - c) + x * s, c + z * z * (1 - c)]])


R = _rotation([1.0, 0.3, 0.2], 70)
ROW_DIR, COL_DIR = R @ np.array([0, 1.0, 0]), R @ np.array([0, 0, -1.0])   # a sagittal frame, rotated 70 degrees
NORMAL = np.cross(ROW_DIR, COL_DIR)


def _dataset(sop_class, rows, cols, modality="MR"):
    ds, fm = Dataset(), FileMetaDataset()
    fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = fm, sop_class, fm.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = modality, "synthetic", "0"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def write_series(folder, seed=0, series_uid=None, description="oblique"):
    """The oblique series as single-frame MR files with shuffled names; returns the volume (N, ROWS, COLS)
    in spatial order (slice k at ORIGIN + k * GAP * NORMAL)."""
    folder.mkdir(parents=True, exist_ok=True)
    vol = np.random.default_rng(seed).integers(0, 1000, (N, ROWS, COLS)).astype(np.uint16)
    order = list(range(N))
    random.Random(seed).shuffle(order)
    assert order != sorted(order)
    uid, study, frame = series_uid or generate_uid(), generate_uid(), generate_uid()
    for fileno, k in enumerate(order):
        ds = _dataset("1.2.840.10008.5.1.4.1.1.4", ROWS, COLS)
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = uid, study, frame
        ds.SeriesDescription, ds.SeriesNumber = description, 3
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ORIGIN + k * GAP * NORMAL]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*ROW_DIR, *COL_DIR)]
        ds.PixelSpacing, ds.SliceThickness = [str(PS[0]), str(PS[1])], str(GAP)
        ds.InstanceNumber = str(N - k)
        ds.PixelData = vol[k].tobytes()
        ds.save_as(folder / f"{fileno:03d}_{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return vol


def lps_of(k, r, c):
    """Where the DICOM tags put voxel (slice k, row r, column c) of the synthetic series (LPS mm)."""
    return ORIGIN + k * GAP * NORMAL + c * PS[1] * ROW_DIR + r * PS[0] * COL_DIR


def sitk_affine(image: sitk.Image, nd: int) -> np.ndarray:
    """The RAS affine of tensor indices from SimpleITK's direction, spacing and origin: ITK indexes
    (column, row, slice), our tensors (slice, row, column) or, for one frame, (row, column)."""
    dim = image.GetDimension()
    d = np.eye(3)
    d[:dim, :dim] = np.array(image.GetDirection()).reshape(dim, dim)
    sp, org = np.ones(3), np.zeros(3)
    sp[:dim], org[:dim] = image.GetSpacing(), image.GetOrigin()
    m = LPS_TO_RAS @ d @ np.diag(sp)
    a = np.eye(4)
    a[:3, :3] = m[:, [2, 1, 0] if nd == 3 else [1, 0, 2]]
    a[:3, 3] = LPS_TO_RAS @ org
    return a


def corners(shape):
    return [np.array([(s - 1) * b for s, b in zip(shape, bits)]) for bits in np.ndindex(*([2] * len(shape)))]


def max_point_error(affine, image: sitk.Image, shape) -> float:
    """Max |affine @ index - SimpleITK's physical point (-> RAS)| over the grid's corners, in mm."""
    err = 0.0
    for idx in corners(shape):
        itk = [int(v) for v in idx[::-1]] + [0] * (image.GetDimension() - len(idx))
        ras = LPS_TO_RAS @ np.array(image.TransformIndexToPhysicalPoint(itk))
        mine = (affine @ np.array([*idx, *([0] * (3 - len(idx))), 1.0]))[:3]
        err = max(err, float(np.abs(mine - ras).max()))
    return err


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm"])
def test_affine_matches_simpleitk_geometry_of_pydicom_files(name):
    path = pydicom.data.get_testdata_file(name)
    img, meta = io.read_image(path)
    ref = sitk.ReadImage(path)
    nd = img.ndim - 1
    expected = sitk_affine(ref, nd)
    if name == "emri_small.dcm":  # no positions: SimpleITK puts the frames 1 mm apart, the file says 1.2 mm
        expected[:3, 0] *= 1.2
    else:
        assert max_point_error(meta["affine"], ref, img.shape[1:]) < 1e-4
    assert np.abs(meta["affine"] - expected).max() < 1e-4
    assert np.array_equal(img.numpy().reshape(-1), sitk.GetArrayFromImage(ref).astype(np.float32).reshape(-1))
    ds = pydicom.dcmread(path)
    if "ImagePositionPatient" in ds:  # and, without any reader, against the tags
        ipp, iop = np.array(ds.ImagePositionPatient, float), np.array(ds.ImageOrientationPatient, float)
        ps = [float(v) for v in ds.PixelSpacing]
        for r, c in ((0, 0), (ds.Rows - 1, 0), (0, ds.Columns - 1), (17, 33)):
            lps = ipp + c * ps[1] * iop[:3] + r * ps[0] * iop[3:]
            assert np.abs((meta["affine"] @ [r, c, 0, 1])[:3] - LPS_TO_RAS @ lps).max() < 1e-4
        assert meta["orientation"] == ("P", "L") and meta["axes"] == ("row", "column") and meta["oriented"]
    else:  # emri_small: an enhanced MR stripped of its functional groups: no geometry, said so
        assert img.shape == (1, 10, 64, 64) and not meta["oriented"]
        assert meta["spacing"] == pytest.approx((1.2, 1.0, 1.0)) and meta["slice_spacing_source"] == "SpacingBetweenSlices"
        assert any("no usable pixel spacing" in w for w in meta["warnings"])


def _emri_variant(tmp_path, **tags):
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("emri_small.dcm"))
    for k, v in tags.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    ds.save_as(tmp_path / "emri.dcm")
    return tmp_path / "emri.dcm"


def test_slice_spacing_from_positions_else_spacing_between_slices_else_thickness(tmp_path):
    """Issue 27: a DICOM whose slice spacing comes from SpacingBetweenSlices (emri_small: 1.2 mm) was written
    at 1 mm. The order is the positions, SpacingBetweenSlices, SliceThickness, else 1 mm with a warning; the
    source is stated in meta and in explain's info.json."""
    from medexplain.pipelines import explain_image
    path = pydicom.data.get_testdata_file("emri_small.dcm")
    torch.manual_seed(0)
    res = explain_image(path, TinyClassifier(3, cin=1).eval(), "saliency", tmp_path / "out")
    info = json.loads(next(p for p in res.files if p.name.endswith("_info.json")).read_text())
    assert info["input"]["slice_spacing_source"] == "SpacingBetweenSlices"
    written = nib.load(str(next(p for p in res.files if p.name.endswith(".nii.gz"))))
    assert np.allclose(written.header.get_zooms()[:3], (1.2, 1.0, 1.0))         # the map at the file's spacing
    _, meta = io.read_image(_emri_variant(tmp_path, SpacingBetweenSlices=None, SliceThickness=3.0))
    assert meta["spacing"][0] == pytest.approx(3.0) and meta["slice_spacing_source"].startswith("SliceThickness")
    _, meta = io.read_image(_emri_variant(tmp_path, SpacingBetweenSlices=None))
    assert meta["spacing"][0] == 1.0 and any("no slice spacing in the file" in w for w in meta["warnings"])
    # a series: the positions (GAP apart, as SimpleITK reads them) win over a contradicting SliceThickness
    write_series(tmp_path / "series")
    for f in (tmp_path / "series").iterdir():
        ds = pydicom.dcmread(f)
        ds.SliceThickness, ds.SpacingBetweenSlices = "5.0", "4.0"
        ds.save_as(f)
    _, meta = io.read_image(tmp_path / "series")
    assert meta["spacing"][0] == pytest.approx(GAP) and "positions" in meta["slice_spacing_source"]


def test_oblique_shuffled_series_folder(tmp_path):
    vol = write_series(tmp_path / "series")
    img, meta = io.read_image(tmp_path / "series")
    assert img.shape == (1, N, ROWS, COLS) and np.array_equal(img[0].numpy(), vol)     # sorted along the normal
    assert meta["format"] == "dicom-series" and meta["n_files"] == N and meta["warnings"] == []
    assert meta["axes"] == ("slice", "row", "column")
    assert np.allclose(meta["spacing"], (GAP, PS[0], PS[1]), atol=1e-6)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    ref = reader.Execute()
    assert np.abs(meta["affine"] - sitk_affine(ref, 3)).max() < 1e-4
    assert max_point_error(meta["affine"], ref, img.shape[1:]) < 1e-4
    err = max(float(np.abs((meta["affine"] @ [k, r, c, 1])[:3] - LPS_TO_RAS @ lps_of(k, r, c)).max())
              for k in (0, 4, N - 1) for r in (0, ROWS - 1) for c in (0, COLS - 1))
    assert err < 1e-4                                                                   # the tags, no reader
    assert all(np.degrees(np.arccos(np.abs(v).max())) > 20 for v in (ROW_DIR, COL_DIR, NORMAL))   # really oblique


ENH_N, ENH_GAP, ENH_ORIGIN = 5, 2.1, np.array([5.0, -12.0, 30.0])
ENH_ROT = _rotation([0.2, 1.0, 0.4], 40)
ENH_ROW, ENH_COL = ENH_ROT @ np.array([1.0, 0, 0]), ENH_ROT @ np.array([0, 0, -1.0])   # an oblique coronal frame


def write_enhanced(path):
    """An enhanced multi-frame MR of ENH_N oblique 6 x 7 frames with shared / per-frame functional groups
    (PixelSpacing 0.9 x 0.7, ENH_GAP mm apart); returns the volume (ENH_N, 6, 7)."""
    row, col, n, gap = ENH_ROW, ENH_COL, ENH_N, ENH_GAP
    normal, origin = np.cross(row, col), ENH_ORIGIN
    ds = _dataset("1.2.840.10008.5.1.4.1.1.4.1", 6, 7)
    ds.SeriesInstanceUID, ds.FrameOfReferenceUID, ds.NumberOfFrames = generate_uid(), generate_uid(), n
    ds.StudyInstanceUID = generate_uid()
    measures, orient = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness, measures.SpacingBetweenSlices = [0.9, 0.7], gap, gap
    orient.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
    shared = Dataset()
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([orient])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in range(n):
        f, pos, content = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = [f"{v:.6f}" for v in origin + k * gap * normal]
        content.InStackPositionNumber = k + 1
        f.PlanePositionSequence, f.FrameContentSequence = Sequence([pos]), Sequence([content])
        frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    vol = np.random.default_rng(1).integers(0, 1000, (n, 6, 7)).astype(np.uint16)
    ds.PixelData = vol.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return vol


def test_enhanced_multiframe_with_functional_groups(tmp_path):
    vol = write_enhanced(tmp_path / "enhanced.dcm")
    row, col, n, gap = ENH_ROW, ENH_COL, ENH_N, ENH_GAP
    normal, origin = np.cross(row, col), ENH_ORIGIN
    img, meta = io.read_image(tmp_path / "enhanced.dcm")
    assert img.shape == (1, n, 6, 7) and np.array_equal(img[0].numpy(), vol) and meta["warnings"] == []
    ref = sitk.ReadImage(str(tmp_path / "enhanced.dcm"))
    assert np.abs(meta["affine"] - sitk_affine(ref, 3)).max() < 1e-4
    for k, r, c in ((0, 0, 0), (n - 1, 5, 6), (2, 3, 1)):
        lps = origin + k * gap * normal + c * 0.7 * row + r * 0.9 * col
        assert np.abs((meta["affine"] @ [k, r, c, 1])[:3] - LPS_TO_RAS @ lps).max() < 1e-4


def test_series_folder_errors_and_choice(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a DICOM")
    with pytest.raises(FileFormatError, match="no DICOM series in this folder"):
        io.read_image(tmp_path / "empty")
    both = tmp_path / "two"
    a, b = generate_uid(), generate_uid()
    write_series(both, seed=0, series_uid=a, description="first")
    write_series(both, seed=1, series_uid=b, description="second")
    with pytest.raises(FileFormatError, match="holds 2 DICOM series; choose one with --series") as e:
        io.read_image(both)
    assert a in str(e.value) and b in str(e.value) and "first" in str(e.value) and f"{N} files" in str(e.value)
    img, meta = io.read_image(both, series=b)
    assert meta["series_uid"] == b and img.shape == (1, N, ROWS, COLS)
    with pytest.raises(FileFormatError, match="no series '1.2.3'"):
        io.read_image(both, series="1.2.3")


def test_undecodable_transfer_syntax_names_the_decoder(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder
    htj2k = "1.2.840.10008.1.2.4.201"
    if get_decoder(htj2k).is_available:
        pytest.skip("a HTJ2K decoder is installed here")
    ds = _dataset("1.2.840.10008.5.1.4.1.1.4", 8, 8)
    ds.file_meta.TransferSyntaxUID = htj2k
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "htj2k.dcm", enforce_file_format=True)
    with pytest.raises(FileFormatError, match="High-Throughput JPEG 2000") as e:
        io.read_image(tmp_path / "htj2k.dcm")
    assert "pylibjpeg" in str(e.value) and "pip install" in str(e.value)


def test_pydicom_decodes_what_gdcm_cannot(tmp_path, monkeypatch):
    """The fallback path (GDCM fails, pydicom decodes, geometry as ITK's) gives what the normal path gives."""
    write_series(tmp_path / "s")
    ct = pydicom.data.get_testdata_file("CT_small.dcm")
    want = [io.read_image(p) for p in (ct, tmp_path / "s")]

    failures = []

    def fail(self, *a):
        failures.append(type(self).__name__)
        raise RuntimeError("ITK ERROR: GDCMImageIO(0x0): simulated decoder failure")
    monkeypatch.setattr(sitk.ImageFileReader, "Execute", fail)
    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", fail)
    for (img, meta), p in zip(want, (ct, tmp_path / "s")):
        img2, meta2 = io.read_image(p)
        assert torch.equal(img, img2) and np.abs(meta["affine"] - meta2["affine"]).max() < 1e-4
    assert failures.count("ImageSeriesReader") == 1 and failures.count("ImageFileReader") == 1 + N


# --- the command line ------------------------------------------------------------------------------
class OneVoxel(nn.Module):
    """Logits (v, -v) of the input voxel VOXEL: the input gradient is non-zero there and nowhere else."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -1.0]))

    def forward(self, x):
        return x[:, 0, VOXEL[0], VOXEL[1], VOXEL[2]][:, None] * self.w


def one_voxel():
    return OneVoxel().eval()


def test_explain_series_map_peak_lands_on_the_dicom_voxel(tmp_path):
    write_series(tmp_path / "knee_T1")
    res = runner.invoke(app, ["explain", str(tmp_path / "knee_T1"), "--model", "test_dicom:one_voxel",
                              "--method", "saliency", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["knee_T1_info.json", "knee_T1_saliency.nii.gz",
                                                                    "knee_T1_saliency.png"]
    m = sitk.ReadImage(str(tmp_path / "out" / "knee_T1_saliency.nii.gz"))
    arr = sitk.GetArrayFromImage(m)                                   # (x, y, z) of the NIfTI, reversed
    assert (arr != 0).sum() == 1                                      # the map is non-zero at one voxel
    peak = np.unravel_index(int(np.abs(arr).argmax()), arr.shape)[::-1]
    where = np.array(m.TransformIndexToPhysicalPoint([int(v) for v in peak]))   # LPS, by SimpleITK
    dist = float(np.linalg.norm(where - lps_of(*VOXEL)))
    assert dist < 0.5 * min(GAP, *PS), dist                          # within half a voxel (here: 1e-5 mm)
    hdr = nib.load(str(tmp_path / "out" / "knee_T1_saliency.nii.gz")).header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1 and hdr.get_xyzt_units()[0] == "mm"
    info = json.loads((tmp_path / "out" / "knee_T1_info.json").read_text())
    assert info["input"]["format"] == "dicom-series" and info["input"]["n_files"] == N and info["warnings"] == []


def _tiny2d():
    torch.manual_seed(0)
    return TinyClassifier(2, cin=1).eval()


def pooled2d():
    """A 2D classifier cheap on a 1955 x 1841 radiograph: logits of the mean intensity."""
    torch.manual_seed(0)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 2)).eval()


def test_zero_pixel_spacing_cr_writes_maps_with_fallback_spacing(tmp_path):
    path = pydicom.data.get_testdata_file("RG1_UNCR.dcm")
    assert [float(v) for v in pydicom.dcmread(path, stop_before_pixels=True).PixelSpacing] == [0.0, 0.0]
    res = runner.invoke(app, ["explain", path, "--model", "test_dicom:pooled2d", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())   # rich wraps lines
    assert "warning" in text and "1 mm assumed" in text
    out = nib.load(str(tmp_path / "out" / "RG1_UNCR_saliency.nii.gz"))
    assert out.shape == (1955, 1841, 1) and np.allclose(out.header.get_zooms()[:2], (1.0, 1.0))
    info = json.loads((tmp_path / "out" / "RG1_UNCR_info.json").read_text())
    assert any("PixelSpacing 0" in w and "1 mm assumed" in w for w in info["warnings"])
    assert info["input"]["spacing"] == [1.0, 1.0]


def test_uid_named_dicoms_into_one_out_and_no_silent_overwrite(tmp_path):
    names = ["1.2.840.113619.2.55.3.1.dcm", "1.2.840.113619.2.55.3.2.dcm"]
    for name, src in zip(names, ("CT_small.dcm", "MR_small.dcm")):
        shutil.copy(pydicom.data.get_testdata_file(src), tmp_path / name)
    torch.jit.save(torch.jit.script(_tiny2d()), tmp_path / "m.pt")
    args = ["--model", str(tmp_path / "m.pt"), "--method", "saliency", "--out", str(tmp_path / "out")]
    for name in names:
        res = runner.invoke(app, ["explain", str(tmp_path / name), *args])
        assert res.exit_code == 0, res.output
    stems = [n[:-4] for n in names]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{s}_{kind}" for s in stems for kind in ("info.json", "saliency.nii.gz", "saliency.png"))
    # each map is on its own scan: CT 128 x 128 at 0.66 mm, MR 64 x 64 at 0.31 mm
    assert nib.load(str(tmp_path / "out" / f"{stems[0]}_saliency.nii.gz")).shape == (128, 128, 1)
    assert nib.load(str(tmp_path / "out" / f"{stems[1]}_saliency.nii.gz")).shape == (64, 64, 1)
    before = (tmp_path / "out" / f"{stems[0]}_saliency.png").read_bytes()
    res = runner.invoke(app, ["explain", str(tmp_path / names[0]), *args])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "already holds" in text and f"{stems[0]}_saliency.nii.gz" in text
    assert (tmp_path / "out" / f"{stems[0]}_saliency.png").read_bytes() == before
    res = runner.invoke(app, ["explain", str(tmp_path / names[0]), *args, "--overwrite"])
    assert res.exit_code == 0, res.output


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.calls = _tiny2d(), 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def test_bad_output_paths_fail_before_any_compute(tmp_path, monkeypatch):
    from medexplain.pipelines import explain_image
    ct = pydicom.data.get_testdata_file("CT_small.dcm")
    (tmp_path / "afile").write_text("x")
    net = Counting()
    for out, match in ((tmp_path / "afile", "is a file"), (tmp_path / "afile" / "sub", "is a file")):
        with pytest.raises(OutputPathError, match=match):
            explain_image(ct, net, "saliency", out)
    monkeypatch.setattr(io.os, "access", lambda *a, **k: False)
    with pytest.raises(OutputPathError, match="not writable|permission"):
        explain_image(ct, net, "saliency", tmp_path / "new")
    assert net.calls == 0 and not (tmp_path / "new").exists()


def test_series_option_of_the_cli(tmp_path):
    both = tmp_path / "two"
    uid = generate_uid()
    write_series(both, seed=0, description="first")
    write_series(both, seed=1, series_uid=uid, description="second")
    args = ["explain", str(both), "--model", "test_dicom:one_voxel", "--out", str(tmp_path / "out")]
    res = runner.invoke(app, args)
    text = "".join(res.output.split())    # rich wraps lines, also inside the UIDs
    assert res.exit_code == 2 and "--series" in text and uid in text
    res = runner.invoke(app, args + ["--series", uid])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "two_info.json").read_text())["input"]["series_uid"] == uid
