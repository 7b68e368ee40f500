"""Explanations as DICOM objects in the source study (issue 24; ``docs/dicom.md``).

Each map becomes three objects, built with highdicom (pydicom underneath), in the study of the series
it explains, with new Series and SOP Instance UIDs and a series description naming the method, the
target and the model:

- a **Parametric Map** (:func:`parametric_map`): the map as 32-bit floats on the source grid, one frame
  per source slice (the plane position of each frame is the source slice's), with a real-world value
  mapping that names the method and its units; the quantity is coded from CID 217 "Visual Explanation"
  where a code exists (:func:`cid217`, declared by each method), else the method is described in plain text;
- a **Segmentation** (:func:`segmentation`, binary): the map thresholded by the ``metrics`` rule
  (:func:`medexplain.metrics.localisation.binarize`: CheXlocalize's Otsu by default, or a fixed
  threshold on the min-max normalised map), one segment for the method and target class;
- a **Secondary Capture** (:func:`secondary_capture`, RGB): the PNG figure of :mod:`medexplain.io.render`
  (the same rendering, with its colour bar and scale) with a burned-in banner saying it is not for
  diagnosis, for viewers that show neither.

The Parametric Map and the Segmentation carry the source's patient, study and Frame of Reference
(copied by highdicom from the source instances), and reference every source instance (single-frame
series, an enhanced multi-frame file, or a 2D radiograph without patient geometry). The map is the one on
the source grid (the pipeline inverts the preprocessing first), so each frame lies on its source slice.

:func:`load_source` reads and checks the source headers before any compute: one series, one Frame of
Reference, ImagePositionPatient/ImageOrientationPatient on every slice of a volume. A NIfTI/PNG/NumPy
input has no study to join: :func:`dicom_source_for` refuses ``--format dicom`` for it unless a DICOM
reference series is given; the map is then resampled onto that series' grid (nearest neighbour).
"""
from __future__ import annotations

import io as _bytesio
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from medexplain import io
from medexplain.errors import FileFormatError, InputError, OptionError

__all__ = ["FORMATS", "DEFAULT_FORMATS", "cid217", "DicomSource", "parse_formats", "dicom_source_for", "load_source",
           "method_concept", "parametric_map", "segmentation", "secondary_capture", "write_dicom_objects",
           "dicom_output_names", "NOT_FOR_DIAGNOSIS"]

#: The output formats of the commands that write maps; the default keeps the NIfTI maps and PNG figures.
FORMATS = ("nifti", "png", "dicom")
DEFAULT_FORMATS = ("nifti", "png")
#: The three objects written per map with ``dicom`` (file suffixes).
DICOM_KINDS = ("pm", "seg", "sc")

def cid217() -> dict[str, str]:
    """The methods coded from DICOM CID 217 "Visual Explanation" (pydicom's ``codes.cid217``: Class activation
    130402, Gradient-weighted class activation 130403, Saliency 130404, DCM): ``{method: concept name}``, as
    each method declares it at registration (``dicom_concept=``, :func:`medexplain.engine.registry.register`).
    Grad-CAM and its gradient-weighted variants are "Gradient-weighted class activation"; the class
    activation maps weighted without gradients (Score-CAM, Ablation-CAM, Eigen-CAM) "Class activation"; the
    input-gradient saliency map (Simonyan et al. 2014) and its noise-averaged form (SmoothGrad) "Saliency".
    Every other method has no code in CID 217 and is described in plain text (LUT Explanation, segment
    label) rather than coded with a concept that would misname it."""
    from medexplain import methods  # noqa: F401  (importing the package registers every method)
    from medexplain.engine.registry import registered
    return {n: m.dicom_concept for n, m in registered().items() if m.dicom_concept}


#: The words burned into every Secondary Capture.
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSIS - research explanation of a neural network's output (medexplain); not a finding"
#: Type 2 attributes of the Patient and General Study modules copied from the source (empty if absent there).
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")
LPS = np.diag([-1.0, -1.0, 1.0])   # RAS <-> LPS (its own inverse)
BANNER_LINE_PX = 22


def parse_formats(value) -> tuple[str, ...]:
    """``--format``: a comma-separated list (or a sequence) of :data:`FORMATS`, in that order; ``None`` or
    empty gives :data:`DEFAULT_FORMATS`."""
    if value is None:
        return DEFAULT_FORMATS
    items = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    if not items:
        return DEFAULT_FORMATS
    bad = [v for v in items if v not in FORMATS]
    if bad:
        raise OptionError(f"--format: unknown format(s) {bad}; choose any of {', '.join(FORMATS)} (comma-separated)")
    return tuple(f for f in FORMATS if f in items)


# --------------------------------------------------------------------------------------------------
# the source series
# --------------------------------------------------------------------------------------------------
@dataclass
class DicomSource:
    """The DICOM series the objects join: its headers (``datasets``, pixel data not loaded), the grid the
    map must be on (``shape``, ``affine`` of :func:`medexplain.io.read_image`) and ``path``."""

    datasets: list
    shape: tuple
    affine: np.ndarray
    path: Path
    is_reference: bool = False

    @property
    def oriented(self) -> bool:
        """Whether the source places its pixels in the patient (a Frame of Reference and ImagePositionPatient /
        plane positions; highdicom's rule): then the objects get plane positions and a Parametric Map."""
        from highdicom.spatial import get_image_coordinate_system
        return get_image_coordinate_system(self.datasets[0]) is not None

    @property
    def study_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str | None:
        return str(self.datasets[0].FrameOfReferenceUID) if "FrameOfReferenceUID" in self.datasets[0] else None


def load_source(path, series: str | None = None, meta: dict | None = None) -> DicomSource:
    """The headers and grid of a DICOM file or series folder, checked for what the writers need: one
    Frame of Reference; ImagePositionPatient and ImageOrientationPatient on every slice of a volume (a 2D
    projection without them is written in its pixel matrix). A typed error otherwise, before any compute."""
    import pydicom

    path = Path(path)
    if path.is_dir():
        found = io.dicom_series(path)
        uid = series or (next(iter(found)) if len(found) == 1 else None)
        files = found.get(uid) if uid else None
        if not files:   # the reader's own error (several series listed, or none)
            io.read_image(path, series=series)
            raise FileFormatError(f"{path}: no DICOM series to reference")
    else:
        files = [str(path)]
    try:
        dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    except Exception as e:
        raise FileFormatError(f"{path}: cannot read the DICOM headers to reference: {type(e).__name__}: {e}") from e
    if meta is None:   # the grid as the pipeline reads it (the caller passes its meta when it has read the image)
        _, meta = io.read_image(path, series=series)
    fors = {str(getattr(d, "FrameOfReferenceUID", "")) for d in dss}
    if len(fors) > 1:
        raise FileFormatError(f"{path}: the series mixes {len(fors)} frames of reference ({', '.join(sorted(fors))}); "
                              "the DICOM objects cannot reference it: give one series on one frame of reference")
    d0 = dss[0]
    if "StudyInstanceUID" not in d0 or "SeriesInstanceUID" not in d0:
        raise FileFormatError(f"{path}: a DICOM file without StudyInstanceUID/SeriesInstanceUID: no study to join")
    frames = int(getattr(d0, "NumberOfFrames", 1) or 1)
    volume = len(dss) > 1 or frames > 1
    if volume and "FrameOfReferenceUID" not in d0:
        raise FileFormatError(f"{path}: a multi-slice series without FrameOfReferenceUID; the DICOM objects need the "
                              "source's frame of reference")
    if volume and len(dss) > 1:
        missing = [Path(f).name for f, d in zip(files, dss) if "ImagePositionPatient" not in d
                   or "ImageOrientationPatient" not in d]
        if missing:
            raise FileFormatError(f"{path}: {len(missing)} slice(s) without ImagePositionPatient/ImageOrientationPatient "
                                  f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): the DICOM objects "
                                  "cannot place their frames")
    if frames > 1 and io._frame_positions(d0) is None:
        raise FileFormatError(f"{path}: a multi-frame file without per-frame plane positions (functional groups): the "
                              "DICOM objects cannot place their frames on the source's")
    for d in dss:   # Type 2 patient/study attributes the objects copy: present, empty when the source lacks them
        for kw in TYPE2_COPIED:
            if kw not in d:
                setattr(d, kw, None)
    nd = 3 if volume else 2
    rows, cols = int(d0.Rows), int(d0.Columns)
    shape = ((len(dss) if len(dss) > 1 else frames), rows, cols) if nd == 3 else (rows, cols)
    return DicomSource(dss, shape, np.asarray(meta["affine"], dtype=np.float64), path)


def dicom_source_for(image, meta: dict, formats: Sequence[str], reference=None, series: str | None = None):
    """Before any compute: the :class:`DicomSource` the DICOM objects of ``image`` join, or ``None`` when
    ``dicom`` is not among ``formats``. A DICOM input is its own source; a NIfTI/PNG/NumPy input needs
    ``reference`` (a DICOM series folder or file, ``--dicom-reference``), else an :class:`InputError`."""
    if "dicom" not in formats:
        if reference is not None:
            raise OptionError("--dicom-reference is for --format dicom; add dicom to --format or drop it")
        return None
    if reference is not None:
        src = load_source(reference)
        src.is_reference = True
        return src
    first = Path(image[0] if isinstance(image, (list, tuple)) else image)
    if not str(meta.get("format", "")).startswith("dicom"):
        raise InputError(f"--format dicom: {first.name} is not DICOM ({meta.get('format', 'unknown format')}), so there "
                         "is no study to join; give the DICOM series it was made from with --dicom-reference DIR, or "
                         "drop dicom from --format")
    return load_source(first, series, meta)


def dicom_output_names(out: Path, stem: str, method: str) -> list[Path]:
    """The files :func:`write_dicom_objects` writes for one method: ``<stem>_<method>_{pm,seg,sc}.dcm``
    (``<method>_{pm,seg,sc}.dcm`` with an empty ``stem``: a run's case folder)."""
    return [out / f"{stem + '_' if stem else ''}{io.method_file(method)}_{k}.dcm" for k in DICOM_KINDS]


# --------------------------------------------------------------------------------------------------
# geometry and codes
# --------------------------------------------------------------------------------------------------
def _plane_geometry(affine: np.ndarray, shape: tuple):
    """highdicom's pixel measures, plane orientation and one plane position per frame of a grid ``shape``
    (``(slices, rows, cols)`` or ``(rows, cols)``) with the RAS ``affine`` of tensor indices: frame ``k``
    starts at ``affine @ (k, 0, 0)``, DICOM's row direction is the column axis (LPS)."""
    import highdicom as hd

    a = np.asarray(affine, dtype=np.float64)
    nd = len(shape)
    r_ax, c_ax = (1, 2) if nd == 3 else (0, 1)
    row_vec, col_vec = LPS @ a[:3, c_ax], LPS @ a[:3, r_ax]          # along a row (columns), along a column (rows)
    spacing = (float(np.linalg.norm(col_vec)), float(np.linalg.norm(row_vec)))   # (between rows, between columns)
    # DS values hold at most 16 characters: 1e-8 for direction cosines, 1e-6 mm for positions and spacings
    orientation = [round(float(v), 8) for v in (*(row_vec / spacing[1]), *(col_vec / spacing[0]))]
    spacing = (round(spacing[0], 6), round(spacing[1], 6))
    thickness = round(float(np.linalg.norm(a[:3, 0])), 6) if nd == 3 else 1.0
    measures = hd.PixelMeasuresSequence(pixel_spacing=spacing, slice_thickness=thickness,
                                        spacing_between_slices=thickness if nd == 3 else None)
    plane = hd.PlaneOrientationSequence(coordinate_system="PATIENT", image_orientation=orientation)
    n = shape[0] if nd == 3 else 1
    corner = [a @ [k, 0, 0, 1] for k in range(n)] if nd == 3 else [a[:, 3]]
    positions = [hd.PlanePositionSequence(coordinate_system="PATIENT",
                                          image_position=[round(float(v), 6) for v in LPS @ c[:3]]) for c in corner]
    return measures, plane, positions


def method_concept(method: str):
    """The CID 217 code of ``method`` (:func:`cid217`), or ``None`` (described in plain text)."""
    from pydicom.sr.codedict import codes
    name = cid217().get(method)
    return getattr(codes.cid217, name) if name else None


def _as_frames(amap, shape: tuple) -> np.ndarray:
    """A map ``(C_or_1, *spatial)`` as float32 frames ``(frames, rows, cols)``: channels summed (as the
    figures and the localisation metrics do), a 2D map as one frame."""
    m = amap.detach().cpu().double().numpy() if isinstance(amap, torch.Tensor) else np.asarray(amap, np.float64)
    if m.ndim == len(shape) + 1:
        m = m.sum(0)
    if tuple(m.shape) != tuple(shape):
        raise InputError(f"the map's grid {tuple(m.shape)} is not the DICOM source's {tuple(shape)}")
    return (m if m.ndim == 3 else m[None]).astype(np.float32)


def _text(value: str, limit: int) -> str:
    """ASCII text cut to a DICOM value length (LO 64, ST 1024)."""
    s = value.encode("ascii", "replace").decode().replace("\\", "/")
    return s if len(s) <= limit else s[:limit - 3] + "..."


@dataclass(frozen=True)
class _Names:
    method: str
    target: str
    model: str
    label: str = ""      # what the map is, when more than the method (``smoothgrad instance 3 FP``)

    @property
    def text(self) -> str:
        return self.label or self.method

    def description(self, kind: str) -> str:
        return _text(f"{kind} {self.text} target {self.target} model {self.model}", 64)

    def what(self) -> str:
        return f"{self.text} explanation of target {self.target} by model {self.model} (medexplain)"


def _equipment() -> dict:
    from medexplain import __version__
    return {"manufacturer": "medexplain", "manufacturer_model_name": "medexplain", "software_versions": __version__,
            "device_serial_number": "none"}


def _source_images(src: DicomSource):
    """The source datasets as highdicom takes them (a 2D projection: its one instance)."""
    return src.datasets


# --------------------------------------------------------------------------------------------------
# the three objects
# --------------------------------------------------------------------------------------------------
def parametric_map(src: DicomSource, amap, names: _Names, series_number: int = 901):
    """The map ``(C_or_1, *spatial)`` on ``src``'s grid as a highdicom ``ParametricMap`` (float32 frames,
    real-world value mapping with the method's name, CID 217 quantity where coded, no units: attributions
    are in the model output's units per input unit, which DICOM has no code for)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    frames = _as_frames(amap, src.shape)
    lo, hi = float(frames.min()), float(frames.max())
    concept = method_concept(names.method)
    rwvm = hd.pm.RealWorldValueMapping(
        lut_label=_text(names.method, 16), lut_explanation=_text(names.what(), 64),
        unit=codes.UCUM.NoUnits, value_range=(lo, hi if hi > lo else lo + 1.0), slope=1.0, intercept=0.0,
        quantity_definition=concept)
    kw = dict(contains_recognizable_visual_features=False, real_world_value_mappings=[rwvm],
              # LINEAR_EXACT: the window is the map's exact range, which may be far below 1 (gradients)
              voi_lut_transformations=[hd.VOILUTTransformation(
                  window_center=(lo + hi) / 2, window_width=max(hi - lo, 1e-6), voi_lut_function="LINEAR_EXACT",
                  window_explanation="map range")],
              content_description=_text(names.what(), 64), content_label="EXPLANATION",
              series_description=names.description("PM"), **_geometry_kwargs(src), **_equipment())
    args = (_source_images(src), frames, hd.UID(), series_number, hd.UID(), 1)
    if src.oriented:
        return hd.pm.ParametricMap(*args, **kw)
    # A 2D projection without a Frame of Reference (a radiograph): highdicom 0.28 indexes the frame by Frame
    # Label but leaves its Dimension Index Values empty, then refuses its own object. Build it without that
    # check, give the one frame its label and index, and run the check on the completed object.
    from unittest import mock
    with mock.patch.object(hd.pm.ParametricMap, "_build_luts", lambda self: None):
        pm = hd.pm.ParametricMap(*args, **kw)
    content = pm.PerFrameFunctionalGroupsSequence[0].FrameContentSequence[0]
    content.DimensionIndexValues, content.FrameLabel = [1], _text(names.method, 16)
    pm._build_luts()
    return pm


def _geometry_kwargs(src: DicomSource) -> dict:
    """Explicit plane positions of the map's frames (the source grid, so each frame lies on its source
    slice); none for a 2D projection without patient geometry (highdicom then uses the pixel matrix)."""
    if not src.oriented:
        return {}
    measures, plane, positions = _plane_geometry(src.affine, src.shape)
    return {"pixel_measures": measures, "plane_orientation": plane, "plane_positions": positions}


def segmentation(src: DicomSource, amap, names: _Names, threshold="otsu", series_number: int = 902):
    """The map thresholded by :func:`medexplain.metrics.localisation.binarize` (``"otsu"``: CheXlocalize's
    rule, as the localisation metrics) as a binary highdicom ``Segmentation`` with one segment (the method
    and target; coded from CID 217 where a code exists, else a generic region with the method in the
    segment label: NCIt C85402 "Imaging Region of Interest" from pydicom's dictionary), on ``src``'s grid."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medexplain.metrics.localisation import binarize

    frames = _as_frames(amap, src.shape)
    mask = binarize(torch.from_numpy(frames)[None, None], threshold)[0, 0].numpy().astype(np.uint8)
    concept = method_concept(names.method) or codes.NCIt.ImagingRegionOfInterest
    algo = hd.AlgorithmIdentificationSequence(name="medexplain", version=_equipment()["software_versions"],
                                              family=codes.cid7162.ArtificialIntelligence)
    seg = hd.seg.SegmentDescription(
        segment_number=1, segment_label=_text(f"{names.text} target {names.target}", 64),
        segmented_property_category=codes.cid7150.SpatialAndRelationalConcept, segmented_property_type=concept,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo)
    return hd.seg.Segmentation(
        _source_images(src), mask, hd.seg.SegmentationTypeValues.BINARY, [seg],
        hd.UID(), series_number, hd.UID(), 1, **_equipment(), omit_empty_frames=False,
        content_description=_text(f"{names.what()}; threshold {threshold}", 64), content_label="EXPLANATION",
        series_description=names.description("SEG"), **_geometry_kwargs(src))


def figure_rgb(img, amap, meta: dict, title: tuple[str, str], label: str) -> np.ndarray:
    """The PNG figure of :func:`medexplain.io.write_png_overlay` (same call of :func:`medexplain.io.render.figure`,
    same PNG encoding) as an RGB uint8 array."""
    from PIL import Image

    from medexplain.io import render
    fig = render.figure(img, amap, affine=meta["affine"], oriented=meta.get("oriented", False), title=title[0],
                        subtitle=title[1], label=label)
    buf = _bytesio.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return np.asarray(Image.open(buf).convert("RGB"))


def _banner(width: int) -> np.ndarray:
    """The burned-in banner under the figure: :data:`NOT_FOR_DIAGNOSIS`, white on dark red, wrapped to the
    figure's width (:data:`BANNER_LINE_PX` per line)."""
    import textwrap

    from matplotlib.figure import Figure
    from PIL import Image

    dpi = 100
    lines = textwrap.wrap(NOT_FOR_DIAGNOSIS, max(20, int((width - 20) / 9.5)))   # under 9.5 px per bold 11 pt character
    height = BANNER_LINE_PX * len(lines) + 16
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="#8b0000")
    fig.text(10 / width, 0.5, "\n".join(lines), color="white", fontsize=11, fontweight="bold", va="center",
             ha="left", linespacing=1.4)
    buf = _bytesio.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return np.asarray(Image.open(buf).convert("RGB"))[:height, :width]


def secondary_capture(src: DicomSource, rgb: np.ndarray, names: _Names, series_number: int = 903):
    """The figure ``rgb`` ``(H, W, 3)`` uint8 with the :data:`NOT_FOR_DIAGNOSIS` banner under it as an RGB
    Secondary Capture in the source study (patient and study copied from the first source instance),
    referencing every source instance (Source Image Sequence)."""
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DSequence

    ref = src.datasets[0]
    pixels = np.ascontiguousarray(np.concatenate([rgb, _banner(rgb.shape[1])], axis=0))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref, pixels, hd.PhotometricInterpretationValues.RGB, 8, "PATIENT", hd.UID(), series_number, hd.UID(), 1,
        manufacturer="medexplain", transfer_syntax_uid="1.2.840.10008.1.2.1", patient_orientation=("L", "F"))
    sc.PatientOrientation = None   # Type 2C: a rendered figure (three planes) has no one patient orientation
    sc.SeriesDescription = names.description("SC")
    sc.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    sc.BurnedInAnnotation = "YES"                    # text is burned in (the title names the input file)
    sc.RecognizableVisualFeatures = "NO"
    sc.DerivationDescription = _text(f"{names.what()}; rendered figure, {NOT_FOR_DIAGNOSIS}", 1024)
    sc.ImageComments = _text(NOT_FOR_DIAGNOSIS, 10240)
    items = []
    for d in src.datasets:
        it = Dataset()
        it.ReferencedSOPClassUID, it.ReferencedSOPInstanceUID = d.SOPClassUID, d.SOPInstanceUID
        items.append(it)
    sc.SourceImageSequence = DSequence(items)
    return sc


def write_dicom_objects(src: DicomSource, img, amap, meta: dict, out: Path, stem: str, method: str, *,
                        target, model: str, title: tuple[str, str] = ("", ""), threshold="otsu",
                        label: str = "") -> list[Path]:
    """One method's DICOM objects (:func:`parametric_map`, :func:`segmentation`, :func:`secondary_capture`)
    for the map ``amap`` ``(C_or_1, *spatial)`` on the image grid of ``img``
    (``meta`` of :func:`medexplain.io.read_image`), each written atomically as
    :func:`dicom_output_names`. With a reference series (``src.is_reference``) the map is first put on
    its grid by geometry (nearest neighbour). A 2D projection without Frame of Reference (a radiograph) gets
    no Parametric Map (its IOD requires a Frame of Reference and plane positions, which such an image does not
    have; also when it has a Frame of Reference UID but no ImagePositionPatient), only the SEG (in its pixel
    matrix) and the SC. ``label``: what the map is when more than the method (series descriptions, segment
    label; ``instances``: ``smoothgrad instance 3 FP``). Returns the paths written."""
    from medexplain.models.transforms import resample_nearest

    m = amap if isinstance(amap, torch.Tensor) else torch.as_tensor(amap)
    m = m.float() if m.ndim == len(src.shape) + 1 else m.float()[None]
    if src.is_reference:
        m = resample_nearest(m.sum(0, keepdim=True), meta["affine"], src.shape, src.affine)
    names = _Names(method, str(target), Path(str(model)).name, label)
    pm_path, seg_path, sc_path = dicom_output_names(Path(out), stem, method)
    with warnings.catch_warnings():   # highdicom's note on a one-component patient name: the source's, kept as is
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        objs = [(pm_path, parametric_map(src, m, names))] if src.oriented else []
        objs += [(seg_path, segmentation(src, m, names, threshold)),
                 (sc_path, secondary_capture(src, figure_rgb(img, amap, meta, title, method), names))]
    for p, ds in objs:
        _series_attributes(ds, src)
        with io.atomic_path(p, suffix=".dcm") as tmp:
            ds.save_as(str(tmp), enforce_file_format=True)
    return [p for p, _ in objs]


def _series_attributes(ds, src: DicomSource) -> None:
    """Type 2C attributes whose condition depends on the anatomy, which only the source knows: Laterality
    (General Series) as the source has it, else empty (unknown); a SEG without Frame of Reference gets the
    source's Patient Orientation (General Image), else empty."""
    s0 = src.datasets[0]
    if "Laterality" not in ds and ds.Modality != "SEG":   # the SEG's General Series has no Laterality condition
        ds.Laterality = s0.get("Laterality", None)
    if not src.oriented and "PatientOrientation" not in ds:
        ds.PatientOrientation = s0.get("PatientOrientation", None)
