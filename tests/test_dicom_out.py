"""Explanations as DICOM objects in the source study (issue 24): ``--format dicom`` writes a Parametric Map, a
Segmentation and a Secondary Capture per map.

Checked against the sources themselves, not against medexplain's own geometry: every Parametric Map and SEG
frame lies on a source slice (its ImagePositionPatient is that slice's, read from the source files), the map
value of each PM voxel equals the NIfTI map at the same physical point (the PM's own IPP/IOP/PixelSpacing
against the NIfTI affine, read with nibabel), the objects are in the source study on its Frame of Reference
and reference source instances that exist, and dciodvfy (dicom3tools) reports no error beyond those it
reports on the source. Sources: pydicom's CT_small and MR_small, an oblique single-frame MR series and an
enhanced multi-frame MR written by tests/test_dicom.py, and a computed radiograph (RG1_UNCR) without patient
geometry.
"""
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import TinyClassifier
from medexplain.cli import app
from medexplain.errors import FileFormatError, InputError, OptionError
from medexplain.io import dicom as dicom_out
from medexplain.pipelines import explain_image
from test_dicom import write_enhanced, write_series

runner = CliRunner()
LPS = np.diag([-1.0, -1.0, 1.0])


def tiny3d():
    torch.manual_seed(0)
    return TinyClassifier(3, cin=1).eval()


def _sources(tmp_path):
    write_series(tmp_path / "oblique")
    write_enhanced(tmp_path / "enhanced.dcm")
    return {"ct": (pydicom.data.get_testdata_file("CT_small.dcm"), "test_dicom:_tiny2d"),
            "mr": (pydicom.data.get_testdata_file("MR_small.dcm"), "test_dicom:_tiny2d"),
            "oblique": (str(tmp_path / "oblique"), "test_dicom:one_voxel"),
            "enhanced": (str(tmp_path / "enhanced.dcm"), "test_dicom_out:tiny3d")}


def _source_datasets(path):
    p = Path(path)
    files = sorted(p.iterdir()) if p.is_dir() else [p]
    return [pydicom.dcmread(str(f)) for f in files]


def _source_positions(dss):
    """Every source slice/frame's ImagePositionPatient (LPS), from the files."""
    pos = []
    for d in dss:
        if "PerFrameFunctionalGroupsSequence" in d:
            pos += [np.array(f.PlanePositionSequence[0].ImagePositionPatient, float) for f in d.PerFrameFunctionalGroupsSequence]
        else:
            pos.append(np.array(d.ImagePositionPatient, float))
    return pos


def _frame_geometry(pm, k):
    """(IPP, row direction, column direction, (row spacing, column spacing)) of frame k of an enhanced object."""
    f = pm.PerFrameFunctionalGroupsSequence[k]
    sh = pm.SharedFunctionalGroupsSequence[0]
    ipp = np.array(f.PlanePositionSequence[0].ImagePositionPatient, float)
    iop = np.array((f if "PlaneOrientationSequence" in f else sh).PlaneOrientationSequence[0].ImageOrientationPatient, float)
    ps = np.array((f if "PixelMeasuresSequence" in f else sh).PixelMeasuresSequence[0].PixelSpacing, float)
    return ipp, iop[:3], iop[3:], ps


def _referenced_sops(obj) -> set:
    refs = set()
    for s in obj.get("ReferencedSeriesSequence", []):
        refs |= {str(i.ReferencedSOPInstanceUID) for i in s.ReferencedInstanceSequence}
    for f in obj.get("PerFrameFunctionalGroupsSequence", []):
        for d in f.get("DerivationImageSequence", []):
            refs |= {str(i.ReferencedSOPInstanceUID) for i in d.SourceImageSequence}
    refs |= {str(i.ReferencedSOPInstanceUID) for i in obj.get("SourceImageSequence", [])}
    return refs


def assert_pm_equals_nifti(pm, nifti_path):
    """The value of every PM voxel equals the NIfTI map at the same physical point (the PM's own
    IPP/IOP/PixelSpacing per frame against the NIfTI affine), 1e-5 relative to the map's maximum."""
    amap = nib.load(str(nifti_path))
    inv, data = np.linalg.inv(amap.affine), np.asarray(amap.dataobj)
    data = data if data.ndim == 3 else data[..., None]
    n = int(pm.NumberOfFrames)
    arr = pm.pixel_array.reshape(n, pm.Rows, pm.Columns)
    scale = max(np.abs(data).max(), 1e-30)
    for k in range(n):
        ipp, rdir, cdir, ps = _frame_geometry(pm, k)
        r, c = np.meshgrid(np.arange(pm.Rows), np.arange(pm.Columns), indexing="ij")
        lps = ipp + c[..., None] * ps[1] * rdir + r[..., None] * ps[0] * cdir
        ras = np.concatenate([lps @ LPS, np.ones(lps.shape[:2] + (1,))], -1)
        ijk = ras @ inv.T
        idx = np.round(ijk[..., :3]).astype(int)
        assert np.abs(ijk[..., :3] - idx).max() < 1e-3        # on a NIfTI voxel centre
        want = data[idx[..., 0], idx[..., 1], idx[..., 2]]
        assert np.abs(arr[k] - want).max() <= 1e-5 * scale, k


def dciodvfy_errors(path) -> set:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return {line.strip() for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """``explain --method saliency --format nifti,png,dicom`` once per source (and ``--format dicom`` for the
    radiograph): ``{name: (source path, model, out folder, stem)}``."""
    tmp = tmp_path_factory.mktemp("dicom_out")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases = {**_sources(tmp), "radiograph": (pydicom.data.get_testdata_file("RG1_UNCR.dcm"), "test_dicom:pooled2d")}
        done = {}
        for name, (src, model) in cases.items():
            out = tmp / f"out_{name}"
            formats = "dicom" if name == "radiograph" else "nifti,png,dicom"
            res = runner.invoke(app, ["explain", src, "--model", model, "--method", "saliency", "--format", formats,
                                      "--out", str(out)])
            assert res.exit_code == 0, (name, res.output)
            stem = next(out.glob("*_info.json")).name[:-len("_info.json")]
            done[name] = (src, model, out, stem)
        return done
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_dicom_objects_lie_on_the_source_slices_in_the_source_study(written):
    for name, (src, model, out, stem) in written.items():
        if name == "radiograph":
            continue
        dss = _source_datasets(src)
        s0, sops = dss[0], {str(d.SOPInstanceUID) for d in dss}
        positions = _source_positions(dss)
        uids = set()
        for kind in ("pm", "seg", "sc"):
            obj = pydicom.dcmread(str(out / f"{stem}_saliency_{kind}.dcm"))
            assert obj.StudyInstanceUID == s0.StudyInstanceUID and obj.PatientID == s0.PatientID, (name, kind)
            assert obj.SeriesInstanceUID != s0.SeriesInstanceUID and str(obj.SOPInstanceUID) not in sops
            uids.add(obj.SeriesInstanceUID)
            assert "saliency" in obj.SeriesDescription and "target" in obj.SeriesDescription and model.split(":")[-1] \
                in obj.SeriesDescription
            refs = _referenced_sops(obj)
            assert refs and refs <= sops, (name, kind, refs - sops)
            if kind == "sc":
                assert obj.PhotometricInterpretation == "RGB"
                continue
            assert obj.FrameOfReferenceUID == s0.FrameOfReferenceUID, (name, kind)
            n = int(obj.NumberOfFrames)
            assert n == len(positions), (name, kind, n)
            for k in range(n):   # each frame on its own source slice (one-to-one)
                ipp = _frame_geometry(obj, k)[0]
                assert min(np.abs(ipp - p).max() for p in positions) < 1e-4, (name, kind, k)
            got = {tuple(np.round(_frame_geometry(obj, k)[0], 3)) for k in range(n)}
            assert len(got) == n
            if kind == "pm":
                assert_pm_equals_nifti(obj, out / f"{stem}_saliency.nii.gz")
        assert len(uids) == 3


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed; .ci/run installs it")
def test_dciodvfy_reports_no_error_beyond_the_sources(written):
    """No dciodvfy error on any object beyond the errors it reports on the source instance (the accepted
    warnings are listed and explained in docs/dicom.md)."""
    for name, (src, _, out, _stem) in written.items():
        first = sorted(Path(src).iterdir())[0] if Path(src).is_dir() else src
        source_errors = dciodvfy_errors(first)
        objects = sorted(out.glob("*.dcm"))
        assert len(objects) == (2 if name == "radiograph" else 3)
        for obj in objects:
            extra = dciodvfy_errors(obj) - source_errors
            assert not extra, (name, obj.name, sorted(extra))


@pytest.mark.slow
def test_radiograph_without_geometry_gets_seg_and_sc(written):
    path, _, out, stem = written["radiograph"]
    names = sorted(p.name for p in out.iterdir())
    # no Parametric Map: its IOD needs a Frame of Reference and plane positions, which a CR does not have
    assert names == ["RG1_UNCR_info.json", "RG1_UNCR_saliency_sc.dcm", "RG1_UNCR_saliency_seg.dcm"]
    src = pydicom.dcmread(path)
    for kind in ("seg", "sc"):
        obj = pydicom.dcmread(str(out / f"RG1_UNCR_saliency_{kind}.dcm"))
        assert obj.StudyInstanceUID == src.StudyInstanceUID and _referenced_sops(obj) == {str(src.SOPInstanceUID)}
    seg = pydicom.dcmread(str(out / "RG1_UNCR_saliency_seg.dcm"))
    assert "FrameOfReferenceUID" not in seg and (seg.Rows, seg.Columns) == (src.Rows, src.Columns)


def test_resampled_model_grid_writes_frames_on_the_source_slices(tmp_path, one_thread):
    write_series(tmp_path / "oblique")
    res = runner.invoke(app, ["explain", str(tmp_path / "oblique"), "--model", "test_dicom_out:tiny3d", "--method",
                              "saliency", "--spacing", "1.3", "--format", "dicom,nifti", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    positions = _source_positions(_source_datasets(tmp_path / "oblique"))
    for kind in ("pm", "seg"):
        obj = pydicom.dcmread(str(tmp_path / "o" / f"oblique_saliency_{kind}.dcm"))
        assert int(obj.NumberOfFrames) == len(positions) and (obj.Rows, obj.Columns) == (6, 7)
        for k in range(len(positions)):
            assert min(np.abs(_frame_geometry(obj, k)[0] - p).max() for p in positions) < 1e-4
    assert nib.load(str(tmp_path / "o" / "oblique_saliency.nii.gz")).shape == (9, 6, 7)   # the source grid
    assert_pm_equals_nifti(pydicom.dcmread(str(tmp_path / "o" / "oblique_saliency_pm.dcm")),
                           tmp_path / "o" / "oblique_saliency.nii.gz")


def test_secondary_capture_is_the_png_figure_with_the_banner(tmp_path, one_thread):
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    res = runner.invoke(app, ["explain", path, "--model", "test_dicom:_tiny2d", "--format", "png,dicom", "--out",
                              str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    png = np.asarray(Image.open(tmp_path / "o" / "CT_small_saliency.png").convert("RGB")).astype(float)
    sc = pydicom.dcmread(str(tmp_path / "o" / "CT_small_saliency_sc.dcm"))
    arr = sc.pixel_array.astype(float)
    assert arr.shape[1:] == (png.shape[1], 3) and png.shape[0] + 30 <= arr.shape[0] <= png.shape[0] + 100
    assert np.abs(arr[:png.shape[0]] - png).mean() < 2
    banner = arr[png.shape[0]:]
    assert (banner.reshape(-1, 3).mean(0)[0] > 100) and (banner > 200).all(-1).any()   # dark red with white text
    assert not (banner[:, -6:] > 200).all(-1).any()                                     # the text fits the width
    assert "NOT FOR DIAGNOSIS" in sc.ImageComments and sc.BurnedInAnnotation == "YES"


def test_formats_parse_and_default():
    assert dicom_out.parse_formats(None) == ("nifti", "png")
    assert dicom_out.parse_formats("dicom, nifti") == ("nifti", "dicom")
    with pytest.raises(OptionError, match="unknown format"):
        dicom_out.parse_formats("nifti,jpeg")


def test_method_codes_come_from_cid217():
    from pydicom.sr._cid_dict import cid_concepts
    assert dicom_out.method_concept("gradcam").value == "130403"
    assert dicom_out.method_concept("scorecam").meaning == "Class activation"
    assert dicom_out.method_concept("saliency").value == "130404"
    assert dicom_out.method_concept("integrated_gradients") is None        # no code: plain text
    assert set(dicom_out.cid217().values()) <= set(cid_concepts[217]["DCM"])


class Counting(torch.nn.Module):
    calls = 0

    def forward(self, x):
        Counting.calls += 1
        return x.flatten(1).sum(1, keepdim=True).repeat(1, 2)


def test_non_dicom_input_is_refused_before_compute_unless_a_reference_is_given(tmp_path):
    write_series(tmp_path / "oblique")
    from medexplain import io
    img, meta = io.read_image(tmp_path / "oblique")
    io.write_nifti(img, tmp_path / "scan.nii.gz", meta["affine"])
    Counting.calls = 0
    with pytest.raises(InputError, match="not DICOM.*--dicom-reference"):
        explain_image(tmp_path / "scan.nii.gz", Counting(), "saliency", tmp_path / "o", formats="dicom")
    assert Counting.calls == 0 and not (tmp_path / "o").exists()
    with pytest.raises(OptionError, match="--dicom-reference is for --format dicom"):
        explain_image(tmp_path / "scan.nii.gz", Counting(), "saliency", tmp_path / "o",
                      dicom_reference=tmp_path / "oblique")
    res = explain_image(tmp_path / "scan.nii.gz", Counting(), "saliency", tmp_path / "o", formats="nifti,dicom",
                        dicom_reference=tmp_path / "oblique")
    pm = pydicom.dcmread(str(tmp_path / "o" / "scan_saliency_pm.dcm"))
    src = _source_datasets(tmp_path / "oblique")
    assert pm.StudyInstanceUID == src[0].StudyInstanceUID and pm.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    assert_pm_equals_nifti(pm, tmp_path / "o" / "scan_saliency.nii.gz")
    assert any(str(p).endswith("_sc.dcm") for p in res.files)


def test_sources_the_objects_cannot_reference_fail_before_compute(tmp_path):
    Counting.calls = 0
    with pytest.raises(FileFormatError, match="without per-frame plane positions"):
        explain_image(pydicom.data.get_testdata_file("emri_small.dcm"), Counting(), "saliency", tmp_path / "o",
                      formats="dicom")
    write_series(tmp_path / "mixed")
    other = pydicom.uid.generate_uid()
    for f in sorted((tmp_path / "mixed").iterdir())[:3]:
        ds = pydicom.dcmread(str(f))
        ds.FrameOfReferenceUID = other
        ds.save_as(str(f))
    with pytest.raises(FileFormatError, match="mixes 2 frames of reference"):
        explain_image(tmp_path / "mixed", Counting(), "saliency", tmp_path / "o", formats="dicom")
    assert Counting.calls == 0 and not (tmp_path / "o").exists()
    write_series(tmp_path / "no_position")
    f = sorted((tmp_path / "no_position").iterdir())[4]
    ds = pydicom.dcmread(str(f))
    del ds.ImagePositionPatient
    ds.save_as(str(f))
    with pytest.raises(FileFormatError, match="without ImagePositionPatient"):
        explain_image(tmp_path / "no_position", Counting(), "saliency", tmp_path / "o", formats="dicom")
    assert Counting.calls == 0 and not (tmp_path / "o").exists()


def test_existing_dicom_outputs_are_not_overwritten(tmp_path, one_thread):
    path = pydicom.data.get_testdata_file("MR_small.dcm")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "MR_small_saliency_seg.dcm").write_bytes(b"keep")
    res = runner.invoke(app, ["explain", path, "--model", "test_dicom:_tiny2d", "--format", "dicom", "--out",
                              str(tmp_path / "o")])
    assert res.exit_code == 2 and "MR_small_saliency_seg.dcm" in res.output
    assert (tmp_path / "o" / "MR_small_saliency_seg.dcm").read_bytes() == b"keep"


def test_pm_and_seg_carry_the_cid217_code_or_a_plain_description(tmp_path, one_thread):
    path = pydicom.data.get_testdata_file("MR_small.dcm")
    res = runner.invoke(app, ["explain", path, "--model", "test_dicom:_tiny2d", "--method", "gradcam,inputxgradient",
                              "--layer", "features.2", "--format", "dicom", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    for method, code in (("gradcam", "130403"), ("inputxgradient", None)):
        pm = pydicom.dcmread(str(tmp_path / "o" / f"MR_small_{method}_pm.dcm"))
        rwvm = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert method in rwvm.LUTExplanation and rwvm.LUTLabel == method
        quantity = [c.ConceptCodeSequence[0].CodeValue for c in rwvm.get("QuantityDefinitionSequence", [])
                    if "ConceptCodeSequence" in c]
        assert quantity == ([code] if code else [])
        seg = pydicom.dcmread(str(tmp_path / "o" / f"MR_small_{method}_seg.dcm")).SegmentSequence[0]
        assert seg.SegmentedPropertyTypeCodeSequence[0].CodeValue == (code or "C85402")
        assert seg.SegmentLabel.startswith(method)


def test_a_map_on_another_grid_is_put_on_the_reference_series_grid(tmp_path):
    """A NIfTI holding slices 2..6 of the reference series: the PM has the reference's 9 frames, slices 2..6 the
    NIfTI map's values (found by geometry), the others 0."""
    write_series(tmp_path / "oblique")
    from medexplain import io
    img, meta = io.read_image(tmp_path / "oblique")
    shift = np.eye(4)
    shift[0, 3] = 2
    io.write_nifti(img[:, 2:7], tmp_path / "part.nii.gz", meta["affine"] @ shift)
    explain_image(tmp_path / "part.nii.gz", Counting(), "saliency", tmp_path / "o", formats="nifti,dicom",
                  dicom_reference=tmp_path / "oblique")
    pm = pydicom.dcmread(str(tmp_path / "o" / "part_saliency_pm.dcm"))
    nii = np.asarray(nib.load(str(tmp_path / "o" / "part_saliency.nii.gz")).dataobj)
    positions = _source_positions(_source_datasets(tmp_path / "oblique"))
    arr = pm.pixel_array.reshape(9, 6, 7)
    assert int(pm.NumberOfFrames) == 9 and np.abs(nii).max() > 0
    slices = [LPS @ (meta["affine"] @ [j, 0, 0, 1])[:3] for j in range(9)]   # slice j of the series as read
    seen = set()
    for k in range(9):   # PM frames (in highdicom's order): on a source slice; on slices 2..6 the NIfTI's values
        ipp = _frame_geometry(pm, k)[0]
        assert min(np.abs(ipp - p).max() for p in positions) < 1e-4
        j = int(np.argmin([np.abs(ipp - p).max() for p in slices]))
        seen.add(j)
        want = nii[j - 2] if 2 <= j < 7 else np.zeros((6, 7))
        assert np.allclose(arr[k], want, rtol=1e-6, atol=0), k
    assert seen == set(range(9))


# --- run --format dicom: the same objects as explain, per case (issue 24) ------------------------------------------
def _geometry_attributes(obj) -> dict:
    """What places an object's pixels in the patient and in the study (no UIDs of its own)."""
    frames = [tuple(f.PlanePositionSequence[0].ImagePositionPatient) for f in obj.get("PerFrameFunctionalGroupsSequence", [])
              if "PlanePositionSequence" in f]
    shared = obj.get("SharedFunctionalGroupsSequence", [None])[0]
    geo = {"study": obj.StudyInstanceUID, "frame_of_reference": obj.get("FrameOfReferenceUID"),
           "patient": (str(obj.PatientName), obj.PatientID), "size": (obj.Rows, obj.Columns, obj.get("NumberOfFrames")),
           "positions": frames, "references": _referenced_sops(obj), "sop_class": obj.SOPClassUID,
           "description": obj.SeriesDescription}
    if shared is not None and "PlaneOrientationSequence" in shared:
        geo["orientation"] = tuple(shared.PlaneOrientationSequence[0].ImageOrientationPatient)
        geo["spacing"] = tuple(shared.PixelMeasuresSequence[0].PixelSpacing)
    return geo


@pytest.mark.slow
def test_run_format_dicom_writes_explains_objects_per_case(tmp_path, one_thread):
    """``run --format png,dicom`` on a manifest of two DICOM series writes, in each case's folder, the objects
    ``explain`` writes for that series with the same options: the same pixel data and the same geometry and
    study attributes (only their own Series/SOP UIDs differ); and ``--resume`` finds them complete."""
    from medexplain.pipelines.run.store import read_table
    for name, seed in (("a", 0), ("b", 1)):
        write_series(tmp_path / name, seed=seed)
    (tmp_path / "cases.csv").write_text("image,case_id\na,case_a\nb,case_b\n")
    opts = ["--model", "test_dicom_out:tiny3d", "--method", "saliency,gradcam", "--spacing", "1.3"]
    res = runner.invoke(app, ["run", str(tmp_path / "cases.csv"), *opts, "--format", "png,dicom", "--out",
                              str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    rows = read_table(tmp_path / "run" / "results.csv")
    assert [r["status"] for r in rows] == ["ok"] * 4
    for name in ("a", "b"):
        res = runner.invoke(app, ["explain", str(tmp_path / name), *opts, "--format", "png,dicom", "--out",
                                  str(tmp_path / f"explain_{name}")])
        assert res.exit_code == 0, res.output
        case = tmp_path / "run" / "cases" / f"case_{name}"
        for m in ("saliency", "gradcam"):
            assert (case / f"{m}.png").is_file()
            for kind in ("pm", "seg", "sc"):
                ran = pydicom.dcmread(str(case / f"{m}_{kind}.dcm"))
                alone = pydicom.dcmread(str(tmp_path / f"explain_{name}" / f"{name}_{m}_{kind}.dcm"))
                assert np.array_equal(ran.pixel_array, alone.pixel_array), (name, m, kind)
                assert _geometry_attributes(ran) == _geometry_attributes(alone), (name, m, kind)
                assert ran.SeriesInstanceUID != alone.SeriesInstanceUID and ran.SOPInstanceUID != alone.SOPInstanceUID
            assert_pm_equals_nifti(pydicom.dcmread(str(case / f"{m}_pm.dcm")), case / f"{m}.nii.gz")
    # the record lists the outputs; an item whose DICOM object is gone is redone by --resume
    (tmp_path / "run" / "cases" / "case_b" / "gradcam_seg.dcm").unlink()
    res = runner.invoke(app, ["run", str(tmp_path / "cases.csv"), *opts, "--format", "png,dicom", "--out",
                              str(tmp_path / "run"), "--resume"])
    assert res.exit_code == 0, res.output
    assert "computed 1, already complete 3" in " ".join(res.output.split())
    assert (tmp_path / "run" / "cases" / "case_b" / "gradcam_seg.dcm").is_file()


def test_run_dicom_and_pacs_options_are_checked_before_any_work(tmp_path):
    from medexplain.pipelines.run import run_manifest
    write_series(tmp_path / "a")
    (tmp_path / "files.csv").write_text("image\na\n")
    (tmp_path / "studies.csv").write_text("study\n1.2.3.4\n")
    with pytest.raises(OptionError, match="--pacs URL"):
        run_manifest(tmp_path / "studies.csv", "test_dicom_out:tiny3d", "saliency", tmp_path / "o1")
    with pytest.raises(OptionError, match="study column"):
        run_manifest(tmp_path / "files.csv", "test_dicom_out:tiny3d", "saliency", tmp_path / "o2",
                     pacs="http://127.0.0.1:9/dicom-web")
    with pytest.raises(OptionError, match="--dicom-reference is for --format dicom"):
        run_manifest(tmp_path / "files.csv", "test_dicom_out:tiny3d", "saliency", tmp_path / "o3",
                     dicom_reference=tmp_path / "a")
    with pytest.raises(OptionError, match="unknown format"):
        run_manifest(tmp_path / "files.csv", "test_dicom_out:tiny3d", "saliency", tmp_path / "o4", formats="jpeg")
    res = runner.invoke(app, ["run", str(tmp_path / "files.csv"), "--model", "test_dicom_out:tiny3d", "--study", "1.2",
                              "--out", str(tmp_path / "o5")])
    assert res.exit_code != 0 and "manifest's study column" in " ".join(res.output.split())
    assert not any((tmp_path / f"o{k}").exists() for k in range(1, 6))


def test_run_non_dicom_case_with_format_dicom_is_an_error_row(tmp_path, one_thread):
    """A case that is not DICOM has no study to join: its error row, and the DICOM case is written."""
    from medexplain.pipelines.run import run_manifest
    write_series(tmp_path / "a")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 9), dtype=np.uint8)).save(tmp_path / "b.png")
    (tmp_path / "cases.csv").write_text("image,case_id\na,a\nb.png,b\n")
    res = run_manifest(tmp_path / "cases.csv", "test_dicom_out:tiny3d", "saliency", tmp_path / "run", formats="dicom")
    by_case = {r["case_id"]: r for r in res.rows}
    assert by_case["a"]["status"] == "ok" and (tmp_path / "run" / "cases" / "a" / "saliency_pm.dcm").is_file()
    assert by_case["b"]["status"] == "error" and "no study to join" in by_case["b"]["error"]
    assert not list((tmp_path / "run" / "cases" / "b").glob("*.dcm")) if (tmp_path / "run" / "cases" / "b").exists() else True


# --- instances --format dicom: each lesion instance's map as explain's objects (issue 24) -------------------------
class Bright(torch.nn.Module):
    """A segmenter of bright voxels: logits (-(x - 700), x - 700) / 100, so the lesions are the voxels above 700."""

    def forward(self, x):
        z = (x[:, :1] - 700.0) / 100.0
        return torch.cat([-z, z], 1)


def bright():
    return Bright().eval()


@pytest.mark.slow
def test_instances_format_dicom_writes_each_instance_map_on_the_source_slices(tmp_path, one_thread):
    write_series(tmp_path / "oblique")
    out = tmp_path / "o"
    res = runner.invoke(app, ["instances", str(tmp_path / "oblique"), "--model", "test_dicom_out:bright", "--n-samples",
                              "2", "--min-size", "2", "--format", "nifti,dicom", "--out", str(out)])
    assert res.exit_code == 0, res.output
    maps = sorted(out.glob("instance_*.nii.gz"))
    assert maps
    src = _source_datasets(tmp_path / "oblique")
    positions = _source_positions(src)
    for k, nifti in enumerate(maps, start=1):
        stem = nifti.name[:-len(".nii.gz")]
        img = nib.load(str(nifti))
        summed = tmp_path / f"{stem}_sum.nii.gz"   # the PM holds the map summed over channels, as explain's
        data = np.asarray(img.dataobj)
        nib.save(nib.Nifti1Image(data.sum(-1) if data.ndim == 4 else data, img.affine), str(summed))
        for kind in ("pm", "seg", "sc"):
            obj = pydicom.dcmread(str(out / f"{stem}_instance_smoothgrad_{kind}.dcm"))
            assert obj.StudyInstanceUID == src[0].StudyInstanceUID and f"instance {k}" in obj.SeriesDescription
            assert _referenced_sops(obj) == {str(d.SOPInstanceUID) for d in src}
        pm = pydicom.dcmread(str(out / f"{stem}_instance_smoothgrad_pm.dcm"))
        assert pm.FrameOfReferenceUID == src[0].FrameOfReferenceUID and int(pm.NumberOfFrames) == len(positions)
        assert_pm_equals_nifti(pm, summed)
        seg = pydicom.dcmread(str(out / f"{stem}_instance_smoothgrad_seg.dcm"))
        assert len(seg.SegmentSequence) == 1 and f"instance {k}" in seg.SegmentSequence[0].SegmentLabel


def test_instances_format_checks_come_before_any_compute(tmp_path):
    import nibabel as nib_
    nib_.save(nib_.Nifti1Image(np.zeros((6, 7, 5), np.float32), np.eye(4)), str(tmp_path / "scan.nii.gz"))
    for fmt, message in (("dicom", "no study to join"), ("nifti,jpeg", "unknown format")):   # png: a figure per lesion
        res = runner.invoke(app, ["instances", str(tmp_path / "scan.nii.gz"), "--model", "test_dicom_out:bright",
                                  "--format", fmt, "--out", str(tmp_path / "o")])
        assert res.exit_code != 0 and message in " ".join(res.output.split()), res.output
        assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_manifest_study_rows(tmp_path):
    from medexplain.pipelines.run.manifest import ManifestError, read_manifest
    (tmp_path / "m.csv").write_text("image,study,series\n,1.2.3,1.2.3.4\nscan.nii.gz,,\n")
    study, local = read_manifest(tmp_path / "m.csv")
    assert (study.study, study.series, study.image, study.case_id) == ("1.2.3", "1.2.3.4", "", "00000_1.2.3")
    assert local.study is None and local.image.endswith("scan.nii.gz")
    for body, message in (("image,study\nscan.nii.gz,1.2.3\n", "not both"), ("study\n1.2.abc\n", "StudyInstanceUID"),
                          ("image,study\n,\n", "image cell is empty")):
        (tmp_path / "m.csv").write_text(body)
        with pytest.raises(ManifestError, match=message):
            read_manifest(tmp_path / "m.csv")
