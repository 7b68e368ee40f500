"""Medical image I/O: scans in with their patient geometry, maps out on that geometry. See ``docs/io.md``.

Readers (well-kept libraries, no hand-made geometry):

- **DICOM** (a file, or a folder holding one series): SimpleITK, i.e. ITK's GDCM image IO. It turns
  ImagePositionPatient, ImageOrientationPatient and PixelSpacing (also an enhanced multi-frame file's
  shared / per-frame functional groups) into origin, direction and spacing; its series reader sorts the
  files by position along the slice normal (not by name or InstanceNumber); it decodes the common
  transfer syntaxes itself (JPEG baseline, 12-bit extended, lossless, JPEG-LS, JPEG 2000, RLE), applies
  the rescale slope / intercept and shows MONOCHROME1 the MONOCHROME2 way. pydicom is used for the header
  checks (spacing, frame positions) and as the pixel decoder when GDCM cannot decode a file.
  SimpleITK was chosen over nibabel's DICOM wrappers (which it calls experimental and which need
  DimensionIndexValues on enhanced files) and over MONAI's ``LoadImage`` (which wraps ITK itself).
- **NIfTI-1/2**: nibabel (``img.affine``: the sform when its code is set, else the qform).
- **PNG/JPEG**: Pillow; **NumPy** ``.npy``/``.npz``: NumPy. These carry no patient geometry: the affine is
  the identity (one index = one "mm"), and ``meta["geometry"]`` says so.

The index convention: :func:`read_image` returns ``(C, *spatial)`` float32 and ``meta["affine"]``, the 4x4
map from the tensor's spatial indices to RAS millimetres (x to the patient's Right, y Anterior, z
Superior; DICOM's LPS is converted by negating x and y).

- DICOM: the spatial axes are (row, column) for one frame, (frame or slice, row, column) for a volume:
  NumPy order, the order of ``SimpleITK.GetArrayFromImage``. Tensor axis ``-1`` (column) runs along the
  first ImageOrientationPatient vector, axis ``-2`` (row) along the second, axis ``-3`` along the slice
  normal, from the first slice along the normal to the last.
- NIfTI: nibabel's voxel axes (i, j, k), not transposed, so ``meta["affine"] == img.affine``.
- A 2D image is ``(C, H, W)``; its affine's third column is the slice normal (for the singleton third axis
  of the NIfTI files written for it). Apply it as ``affine @ [row, col, 0, 1]``.

``meta`` also holds ``format``, ``axes`` (names of the spatial axes), ``spacing`` (mm per spatial axis),
``orientation`` (closest axis codes, e.g. ``('P', 'R', 'I')``), ``geometry`` (where it came from),
``oriented`` (whether the file places the image in the patient: DICOM with ImagePositionPatient /
ImageOrientationPatient, NIfTI with an sform or qform code),
``warnings`` (e.g. a zero PixelSpacing replaced by 1 mm), ``path``; DICOM adds ``series_uid``, ``n_files``,
``transfer_syntax``, ``modality`` and ``photometric``.

Writers: :func:`write_nifti` writes ``(C, *spatial)`` maps on an affine (sform and qform, units mm; one
channel as a plain 2D/3D image, several channels on NIfTI's 4th axis, a 2D image getting a singleton third
axis first), :func:`write_png_overlay` a figure of :mod:`medexplain.io.render`. Every write is atomic
(:func:`atomic_path`: temporary file, then rename), so an interrupted run never leaves a half-written file;
:func:`check_output_dir` refuses an output folder that is a file, is not writable, or already holds a file
a call would write (unless ``overwrite``). :func:`file_stem` is the one rule for output names derived from an
input file, :func:`safe_file_name` (reversible percent-encoding of unsafe characters only) for names made
from free text such as case ids.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from medexplain.errors import FileFormatError, InputError, MedexplainError, OutputPathError

__all__ = ["IMAGE_SUFFIXES", "KNOWN_SUFFIXES", "read_image", "read_channels", "file_stem",
           "method_file", "safe_file_name", "original_name",
           "atomic_path", "check_output_dir", "write_nifti", "write_png_overlay", "write_figure",
           "write_json",
           "write_text", "write_csv", "ras_affine_from_itk", "dicom_series"]

IMAGE_SUFFIXES = {".png": "png", ".jpg": "png", ".jpeg": "png", ".dcm": "dicom", ".dicom": "dicom",
                  ".nii": "nifti", ".nii.gz": "nifti", ".npy": "npy", ".npz": "npz"}


#: The file extensions of the field's image and array formats, as :func:`file_stem` removes them
#: (matched case-insensitively, longest first, so ``.nii.gz`` is one extension).
KNOWN_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm", ".dicom", ".npy", ".npz",
                  ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".h5", ".hdf5")

#: DICOM's patient coordinates (LPS) to RAS: negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def file_stem(path) -> str:
    """The one file-stem rule of medexplain: the file name minus its known extension (:data:`KNOWN_SUFFIXES`),
    kept whole otherwise, so dots inside a name survive: ``scan.v2.nii.gz`` -> ``scan.v2``,
    ``1.2.840.113.dcm`` -> ``1.2.840.113``, ``1.2.840.113`` (a DICOM file without extension) -> itself.
    A folder (e.g. a DICOM series) gives its name. Used for every output name derived from an input."""
    path = Path(path)
    name = path.name
    if path.is_dir():
        return name
    low = name.lower()
    for suffix in KNOWN_SUFFIXES:
        if low.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


#: Characters never put in a file name as they are: path separators, the characters Windows reserves, and
#: ``%`` (the escape character itself, so the rule stays reversible).
_UNSAFE_NAME_CHARS = frozenset('/\\:*?"<>|%')


def safe_file_name(name: str) -> str:
    """The one reversible rule for a file or folder name made from free text (a case id): every character
    stays as it is, Unicode letters included (``Müller`` stays ``Müller``), except control characters, path
    separators, ``:*?"<>|``, ``%`` itself, and dots or spaces at either end, which are percent-encoded as
    their UTF-8 bytes (``a/b`` -> ``a%2Fb``, ``..`` -> ``%2E%2E``). :func:`original_name` reverses it, so
    two different names never share a file (issue 27: ``Müller`` and ``Möller`` both became ``M_ller``)."""
    name = str(name)
    if not name:
        raise InputError("an empty name cannot be a file name")
    last = len(name) - 1
    return "".join("".join(f"%{b:02X}" for b in ch.encode("utf-8"))
                   if ch in _UNSAFE_NAME_CHARS or ord(ch) < 32 or ord(ch) == 127 or (ch in ". " and i in (0, last))
                   else ch for i, ch in enumerate(name))


def original_name(file_name: str) -> str:
    """The name :func:`safe_file_name` was given (percent-decoding)."""
    from urllib.parse import unquote
    return unquote(file_name, errors="strict")


def method_file(method: str) -> str:
    """File-name form of a method name (``gradcam++`` -> ``gradcampp``), for every map file written."""
    return method.replace("+", "p")


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------
def read_image(path, *, series: str | None = None) -> tuple[torch.Tensor, dict]:
    """Read an image into ``(C, *spatial)`` float32 and its meta dict (see the module docstring for
    ``meta["affine"]``, the map from tensor indices to RAS mm, and the other keys).

    ``path``: PNG/JPEG, DICOM (a file, or a folder holding one DICOM series), NIfTI (``.nii``/``.nii.gz``;
    4D = channels last) or NumPy (``.npy``/``.npz``, ``(C, *spatial)``). ``series``: the SeriesInstanceUID to
    read when a folder holds several series. Raises :class:`~medexplain.errors.FileFormatError` on a missing,
    unsupported or corrupt file, a folder with no DICOM series or with several (listing them), pixel data in
    a transfer syntax nothing installed can decode (naming the package that can), and NaN/Inf values.
    A zero or missing spacing is replaced by 1 mm with a warning in ``meta["warnings"]``.
    """
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{path}: no such file or folder")
    if series is not None and not path.is_dir():
        raise FileFormatError(f"{path}: a series UID (--series) selects a series in a folder; this is a file")
    if path.is_dir():
        kind = "dicom-series"
    else:
        kind = IMAGE_SUFFIXES.get(_suffix(path))
        if kind is None and _is_dicom(path):
            kind = "dicom"
        if kind is None:
            raise FileFormatError(f"{path}: unsupported file type {_suffix(path) or '(none)'}; use one of "
                                  f"{', '.join(sorted(IMAGE_SUFFIXES))}, or a folder holding one DICOM series")
    readers = {"png": _read_png, "dicom": _read_dicom_file, "nifti": _read_nifti, "npy": _read_npy, "npz": _read_npy,
               "dicom-series": lambda p: _read_dicom_folder(p, series)}
    try:
        arr, meta = readers[kind](path)
    except MedexplainError:
        raise
    except Exception as e:  # the libraries raise many types on corrupt content
        raise FileFormatError(f"{path}: cannot read as {kind}: {type(e).__name__}: {' '.join(str(e).split())}") from e
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise FileFormatError(f"{path}: image contains NaN or Inf values")
    meta = {"format": kind, "path": str(path), **meta}
    _finish_meta(meta, arr.ndim - 1)
    return torch.from_numpy(arr), meta


def _finish_meta(meta: dict, nd: int) -> None:
    """Spacing (checked: zero or non-finite -> 1 mm and a warning), orientation codes and warnings list."""
    import nibabel as nib
    a = np.array(meta["affine"], dtype=np.float64)
    warnings = meta.setdefault("warnings", [])
    if not np.isfinite(a).all():
        raise FileFormatError(f"{meta['path']}: the image geometry has non-finite values")
    for ax in range(3):
        if np.linalg.norm(a[:3, ax]) < 1e-9:
            others = [a[:3, b] for b in range(3) if b != ax and np.linalg.norm(a[:3, b]) > 1e-9]
            unit = np.eye(3)[ax]
            if len(others) == 2 and abs(np.linalg.det(np.stack(others + [unit]))) < 1e-9:
                unit = np.cross(others[0], others[1])
                unit /= np.linalg.norm(unit)
            a[:3, ax] = unit
            warnings.append(f"spacing of voxel axis {ax} is zero: 1 mm assumed")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise FileFormatError(f"{meta['path']}: the image geometry is degenerate (two voxel axes are parallel)")
    meta["affine"] = a
    meta["spacing"] = tuple(float(np.linalg.norm(a[:3, ax])) for ax in range(nd))
    meta["orientation"] = tuple(nib.aff2axcodes(a))[:nd]
    meta.setdefault("axes", tuple(f"axis{i}" for i in range(nd)))


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _identity_meta(axes) -> dict:
    return {"affine": np.eye(4), "axes": tuple(axes), "oriented": False,
            "geometry": "none: the format carries no patient geometry; the affine is the identity (1 index = 1 mm)"}


def _read_png(path):
    from PIL import Image
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I", "F"):
            arr = np.asarray(im, dtype=np.float32)[None]
        elif im.mode in ("L", "1", "P", "LA"):
            arr = np.asarray(im.convert("L"), dtype=np.float32)[None]
        else:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
    return arr, _identity_meta(("row", "column"))


def _read_npy(path):
    data = np.load(path, allow_pickle=False)
    if isinstance(data, np.lib.npyio.NpzFile):
        keys = list(data.keys())
        arr = data["image"] if "image" in keys else data[keys[0]]
    else:
        arr = data
    if arr.ndim not in (3, 4):
        raise FileFormatError(f"{path}: array must be (C, H, W) or (C, D, H, W), got shape {arr.shape}")
    return arr, _identity_meta(("axis0", "axis1", "axis2")[: arr.ndim - 1])


def _read_nifti(path):
    import nibabel as nib
    img = nib.load(str(path))
    arr = np.asanyarray(img.dataobj, dtype=np.float32)
    if arr.ndim == 5:                                      # (X, Y, Z, 1, C): NIfTI's vector (u) axis
        if arr.shape[3] != 1:
            raise FileFormatError(f"{path}: 5D NIfTI {arr.shape} with both time and components; expected (X, Y, Z, 1, C)")
        arr = arr[:, :, :, 0, :]
    if arr.ndim == 4:
        arr = np.moveaxis(arr, -1, 0)                      # channels last on disk -> first
        if arr.shape[3] == 1:
            arr = arr[..., 0]                              # a 2D multi-channel image stored as X x Y x 1 x C
    elif arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[None, ..., 0]                            # a 2D image stored as X x Y x 1
    elif arr.ndim in (2, 3):
        arr = arr[None]
    else:
        raise FileFormatError(f"{path}: NIfTI with {arr.ndim} dims; expected 2, 3, 4 (channels last) or 5 (X, Y, Z, 1, C)")
    hdr = img.header
    s_code, q_code = int(hdr["sform_code"]), int(hdr["qform_code"])
    source = (f"NIfTI sform (code {s_code})" if s_code > 0 else f"NIfTI qform (code {q_code})" if q_code > 0
              else "NIfTI without sform/qform: pixdim only (nibabel's fall-back affine)")
    meta = {"affine": np.asarray(img.affine, dtype=np.float64), "axes": ("i", "j", "k")[: arr.ndim - 1],
            "geometry": source, "xform_code": s_code or q_code or 1, "oriented": bool(s_code or q_code)}
    if s_code == 0 and q_code == 0:
        meta["warnings"] = ["the NIfTI header has neither sform nor qform: orientation unknown"]
    return arr, meta


# --- DICOM ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _itk():
    """SimpleITK with ITK's warning printout off and the C libraries' stderr chatter (GDCM, OpenJPEG: e.g.
    "Unsupported JPEG data precision 12" while its 12-bit codec then succeeds) discarded, both restored after.
    Failures still surface: as the exceptions SimpleITK raises."""
    import SimpleITK as sitk
    old = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    saved = None
    try:
        import sys
        sys.stderr.flush()
        saved = os.dup(2)
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
    except (OSError, ValueError):  # no usable fd 2 (embedded interpreters): leave stderr as it is
        saved = None
    try:
        yield sitk
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
        sitk.ProcessObject.SetGlobalWarningDisplay(old)


def _itk_message(e: Exception) -> str:
    """The reason in an ITK exception, without its source-file prefix."""
    msg = " ".join(str(e).split())
    return msg.split("): ", 1)[-1][:200] if "ITK ERROR" in msg else msg[-200:]


def ras_affine_from_itk(direction, spacing, origin, order) -> np.ndarray:
    """The 4x4 RAS affine of an ITK geometry (LPS ``direction``, ``spacing``, ``origin``, indexed (i, j, k) =
    (column, row, slice)) for tensor axes that are ITK axes ``order`` (``(2, 1, 0)`` for a NumPy-order
    volume, ``(1, 0, 2)`` for a 2D image whose third column is the slice normal)."""
    d = np.asarray(direction, dtype=np.float64)
    n = int(round(np.sqrt(d.size)))
    d3, sp, org = np.eye(3), np.ones(3), np.zeros(3)
    d3[:n, :n] = d.reshape(n, n)
    sp[:n], org[:n] = np.asarray(spacing, dtype=np.float64)[:n], np.asarray(origin, dtype=np.float64)[:n]
    m = LPS_TO_RAS @ d3 @ np.diag(sp)
    a = np.eye(4)
    a[:3, :3] = m[:, list(order)]
    a[:3, 3] = LPS_TO_RAS @ org
    return a


def _positive_spacing(direction, spacing, origin):
    """ITK's image reader rule, for geometry read without the reader's Execute: a negative spacing becomes
    positive with its direction column negated (GDCM reports enhanced frames stored in descending order so)."""
    n = len(spacing)
    d = np.asarray(direction, dtype=np.float64).reshape(n, n).copy()
    sp = np.asarray(spacing, dtype=np.float64).copy()
    neg = sp < 0
    d[:, neg], sp[neg] = -d[:, neg], -sp[neg]
    return tuple(d.ravel()), tuple(sp), tuple(origin)


def _header(path):
    import pydicom
    return pydicom.dcmread(str(path), stop_before_pixels=True, force=True)


def _nested(ds, *keys):
    """``ds.K1[0].K2[0]...`` or None."""
    for k in keys:
        v = getattr(ds, k, None) if ds is not None else None
        if v is None:
            return None
        ds = v[0] if k.endswith("Sequence") else v
        if k.endswith("Sequence") and not len(v):
            return None
    return ds


def _positive_pair(v):
    try:
        vals = [float(x) for x in v]
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == 2 and all(np.isfinite(vals)) and all(x > 0 for x in vals) else None


def _pixel_spacing_source(ds) -> tuple[str | None, str]:
    """Which DICOM attribute gives a positive in-plane spacing (None if none does) and what was found."""
    candidates = [("PixelSpacing", _nested(ds, "PixelSpacing")),
                  ("shared PixelMeasuresSequence PixelSpacing",
                   _nested(ds, "SharedFunctionalGroupsSequence", "PixelMeasuresSequence", "PixelSpacing")),
                  ("per-frame PixelMeasuresSequence PixelSpacing",
                   _nested(ds, "PerFrameFunctionalGroupsSequence", "PixelMeasuresSequence", "PixelSpacing")),
                  ("ImagerPixelSpacing (at the detector, not corrected for magnification)", _nested(ds, "ImagerPixelSpacing")),
                  ("NominalScannedPixelSpacing", _nested(ds, "NominalScannedPixelSpacing"))]
    sep = "\\"
    seen = [f"{name.split(' (')[0]} {sep.join(str(x) for x in v)}" for name, v in candidates if v is not None]
    for name, v in candidates:
        if _positive_pair(v):
            return name, ", ".join(seen)
    return None, ", ".join(seen) or "no PixelSpacing"


def _frame_positions(ds) -> np.ndarray | None:
    """Per-frame ImagePositionPatient (LPS) of an enhanced multi-frame file, or None."""
    frames = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if not frames:
        return None
    pos = [_nested(f, "PlanePositionSequence", "ImagePositionPatient") for f in frames]
    if any(p is None for p in pos):
        return None
    return np.array([[float(x) for x in p] for p in pos])


def _check_positions(positions: np.ndarray | None, direction, spacing, origin, what: str) -> list[str]:
    """Warnings when the slices' own positions (LPS) leave the regular grid the affine describes (irregular
    spacing, gantry tilt, frames out of order)."""
    if positions is None or len(positions) < 2:
        return []
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    step = d[:, 2] * float(spacing[2])
    grid = np.asarray(origin, dtype=np.float64)[None] + np.arange(len(positions))[:, None] * step[None]
    dev = float(np.abs(positions - grid).max())
    if dev > max(1e-3, 0.01 * float(spacing[2])):
        return [f"the {what} positions deviate from a regular grid by up to {dev:.3g} mm (irregular spacing, gantry "
                "tilt or frames out of order): the affine's slice axis is approximate"]
    return []


def _pydicom_pixels(path: Path, ds_header, itk_error: Exception) -> np.ndarray:
    """pydicom's decoding of a file GDCM could not decode, shaped ``(frames, rows, cols[, samples])``
    with the rescale applied and MONOCHROME1 inverted (as GDCM does); a clear error naming the package
    that decodes the transfer syntax when no installed decoder can."""
    import pydicom
    from pydicom.pixels import apply_rescale
    ds = pydicom.dcmread(str(path), force=True)
    try:
        raw = ds.pixel_array
    except Exception as e:
        raise _undecodable(path, ds, itk_error, e) from e
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    arr = raw.reshape((frames, int(ds.Rows), int(ds.Columns)) + ((samples,) if samples > 1 else ()))
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        arr = (2 ** int(ds.BitsStored) - 1) - arr.astype(np.float64)
    return apply_rescale(arr, ds) if samples == 1 else arr


def _undecodable(path, ds, itk_error, pydicom_error) -> FileFormatError:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    name = f"{ts.name} ({ts})" if ts is not None else "(no transfer syntax in the file meta)"
    missing, available = [], False
    try:
        from pydicom.pixels import get_decoder
        dec = get_decoder(ts)
        missing, available = list(dec.missing_dependencies), dec.is_available
    except Exception:  # no decoder at all for this syntax in pydicom
        pass
    itk_msg = _itk_message(itk_error)
    if available:  # a decoder is installed and failed: the data itself is bad
        return FileFormatError(f"{path}: the pixel data ({name}) cannot be decoded; the file looks corrupt. "
                               f"GDCM (SimpleITK): {itk_msg}; pydicom: {type(pydicom_error).__name__}: {pydicom_error}")
    if missing:
        how = " or ".join(f"{entry.split(' - ')[0]} (`pip install {_pip_names(entry)}`)" for entry in missing)
        hint = f"pydicom decodes it with {how}"
    else:
        hint = "pydicom has no decoder for it either"
    return FileFormatError(
        f"{path}: no installed decoder handles the transfer syntax {name}: SimpleITK's GDCM cannot "
        f"({itk_msg}), and {hint}. Install that package, or convert the file to an uncompressed transfer "
        "syntax (e.g. `gdcmconv --raw in.dcm out.dcm`)")


def _pip_names(entry: str) -> str:
    """pip requirement names in a pydicom plugin note: ``"pylibjpeg - requires pylibjpeg>=2.0 and
    pylibjpeg-openjpeg>=2.0"`` -> ``"pylibjpeg>=2.0" "pylibjpeg-openjpeg>=2.0"``; GDCM's pip name is python-gdcm."""
    reqs = [r.strip() for r in entry.split("requires", 1)[-1].split(" and ")]
    reqs = [r.replace("gdcm", "python-gdcm", 1) if r.startswith("gdcm") else r for r in reqs if r and r != "numpy"]
    return " ".join(f'"{r}"' for r in reqs)


def _to_channels_first(arr: np.ndarray, vector: bool) -> np.ndarray:
    """``(frames, rows, cols[, samples])`` -> ``(C, rows, cols)`` for one frame, ``(C, frames, rows, cols)``."""
    arr = np.moveaxis(arr, -1, 0) if vector else arr[None]
    return arr[:, 0] if arr.shape[1] == 1 else arr


def _positive(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) and f > 1e-6 else None


def _slice_spacing(ds, positions: np.ndarray | None, itk_spacing: float, what: str) -> tuple[float | None, str]:
    """The distance between slices (frames) and where it came from, in this order (issue 27): the slices' own
    positions (ImagePositionPatient: the distance from the first to the last over ``n - 1``, as ITK's series
    reader takes it; SimpleITK's own value when it agrees, so the maps stay voxel for voxel on its grid), else
    SpacingBetweenSlices, else SliceThickness (top level, or an enhanced file's shared / first per-frame
    PixelMeasuresSequence). ``(None, ...)`` when the file states none of them."""
    if positions is not None and len(positions) > 1:
        step = float(np.linalg.norm(positions[-1] - positions[0])) / (len(positions) - 1)
        if step > 1e-6:
            agree = abs(itk_spacing - step) <= 1e-4 * max(1.0, step)
            return (itk_spacing if agree else step), f"the {what} positions (ImagePositionPatient)"
    for name in ("SpacingBetweenSlices", "SliceThickness"):
        for where, v in (("", _nested(ds, name)),
                         ("shared PixelMeasuresSequence ",
                          _nested(ds, "SharedFunctionalGroupsSequence", "PixelMeasuresSequence", name)),
                         ("per-frame PixelMeasuresSequence ",
                          _nested(ds, "PerFrameFunctionalGroupsSequence", "PixelMeasuresSequence", name))):
            if _positive(v) is not None:
                return _positive(v), where + name + (" (the slice thickness: slices assumed contiguous)"
                                                     if name == "SliceThickness" else "")
    return None, "none in the file"


def _dicom_meta(ds, sitk_info, files: int, arr_shape, what: str, positions: np.ndarray | None = None
                ) -> tuple[np.ndarray, dict]:
    """The RAS affine, fixing a missing/zero in-plane spacing to 1 mm (with a warning) and taking the slice
    spacing by :func:`_slice_spacing`, and the DICOM meta (with warnings when the slice positions leave the
    regular grid)."""
    direction, spacing, origin = sitk_info
    spacing = [float(s) for s in spacing] + [1.0] * (3 - len(spacing))
    warnings = []
    source, seen = _pixel_spacing_source(ds)
    if source is None or not all(np.isfinite(spacing[:2])) or min(spacing[:2]) <= 0:
        spacing[0] = spacing[1] = 1.0
        warnings.append(f"no usable pixel spacing in the file ({seen}): 1 mm assumed; distances and sizes "
                        "in mm are in pixels")
    nd = len(arr_shape) - 1
    slice_source = None
    if nd == 3 and arr_shape[1] > 1:
        z, slice_source = _slice_spacing(ds, positions, spacing[2], what)
        if z is not None:
            spacing[2] = z
        else:
            spacing[2] = 1.0
            warnings.append(f"no slice spacing in the file (no {what} positions, SpacingBetweenSlices or "
                            "SliceThickness): 1 mm assumed")
    if not np.isfinite(spacing[2]) or spacing[2] <= 1e-6:
        spacing[2] = 1.0
        warnings.append("no usable slice spacing: 1 mm assumed")
    order = (2, 1, 0) if nd == 3 else (1, 0, 2)
    affine = ras_affine_from_itk(direction, spacing, origin, order)
    has_position = (files > 1 or _nested(ds, "ImagePositionPatient") is not None or _frame_positions(ds) is not None
                    or _nested(ds, "SharedFunctionalGroupsSequence", "PlanePositionSequence") is not None)
    geometry = ("DICOM patient coordinates (SimpleITK/GDCM), LPS converted to RAS" if has_position else
                "DICOM without ImagePositionPatient/ImageOrientationPatient (projection or secondary capture): "
                "identity directions at the origin, with the file's pixel spacing")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    meta = {"affine": affine, "axes": (what, "row", "column") if nd == 3 else ("row", "column"),
            "geometry": geometry, "oriented": has_position, "warnings": warnings, "xform_code": 1,
            "series_uid": str(getattr(ds, "SeriesInstanceUID", "")), "n_files": files,
            "transfer_syntax": str(ts.name) if ts is not None else None, "modality": str(getattr(ds, "Modality", "")),
            "photometric": str(getattr(ds, "PhotometricInterpretation", ""))}
    po = getattr(ds, "PatientOrientation", None)
    if po is not None and len(po) == 2:        # projection images: the figure's edge letters (render)
        meta["patient_orientation"] = tuple(str(v) for v in po)
    if source and not source.startswith("PixelSpacing"):
        meta["spacing_source"] = source
    if slice_source is not None:
        meta["slice_spacing_source"] = slice_source
    meta["warnings"] += _check_positions(positions, direction, spacing, origin, what)
    return affine, meta


def _read_dicom_file(path: Path, files: int = 1):
    ds = _header(path)
    if "Rows" not in ds or "Columns" not in ds:
        sop = getattr(getattr(ds, "SOPClassUID", None), "name", "unknown SOP class")
        raise FileFormatError(f"{path}: a DICOM file without an image ({sop})")
    with _itk() as sitk:
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise FileFormatError(f"{path}: SimpleITK (GDCM) cannot read this DICOM file: {_itk_message(e)}") from e
        info = _positive_spacing(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin())
        vector = reader.GetNumberOfComponents() > 1
        try:
            image = reader.Execute()
            arr = sitk.GetArrayFromImage(image)            # (frames, rows, cols[, samples])
            info = (image.GetDirection(), image.GetSpacing(), image.GetOrigin())
            if image.GetDimension() == 2:
                arr = arr[None]
        except RuntimeError as e:
            arr = _pydicom_pixels(path, ds, e)
            vector = arr.ndim == 4
    arr = _to_channels_first(arr, vector)
    affine, meta = _dicom_meta(ds, info, files, arr.shape, "frame", _frame_positions(ds))
    return arr, meta


def dicom_series(folder) -> dict[str, list[str]]:
    """The DICOM series in ``folder`` (not its sub-folders): ``{SeriesInstanceUID: [files sorted along the
    slice normal]}``, by SimpleITK's GDCM series helper."""
    with _itk() as sitk:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        return {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in ids}


def _describe_series(uid: str, files: list[str]) -> str:
    try:
        ds = _header(files[0])
        what = " ".join(str(v) for v in (getattr(ds, "Modality", ""), f"#{getattr(ds, 'SeriesNumber', '')}",
                                         getattr(ds, "SeriesDescription", "")) if str(v).strip("# "))
    except Exception:
        what = ""
    return f"{uid} ({len(files)} file{'s' * (len(files) != 1)}{', ' + what if what else ''})"


def _read_dicom_folder(folder: Path, series: str | None):
    found = dicom_series(folder)
    if not found:
        entries = list(folder.iterdir())
        subdirs = [p.name for p in entries if p.is_dir()]
        hint = (f"; it has sub-folders ({', '.join(sorted(subdirs)[:5])}{', ...' if len(subdirs) > 5 else ''}): "
                "give the folder of one series") if subdirs else ""
        raise FileFormatError(f"{folder}: no DICOM series in this folder ({len(entries) - len(subdirs)} file(s), "
                              f"none a readable DICOM image){hint}")
    if series is not None and series not in found:
        raise FileFormatError(f"{folder}: no series {series!r} here; the folder holds: "
                              + "; ".join(_describe_series(u, f) for u, f in found.items()))
    if series is None and len(found) > 1:
        raise FileFormatError(f"{folder} holds {len(found)} DICOM series; choose one with --series UID "
                              "(series= in Python): " + "; ".join(_describe_series(u, f) for u, f in found.items()))
    uid = series or next(iter(found))
    files = found[uid]
    if len(files) == 1:
        arr, meta = _read_dicom_file(Path(files[0]))
        return arr, {**meta, "n_files": 1}
    ds = _header(files[0])
    with _itk() as sitk:
        reader = sitk.ImageSeriesReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()
        try:
            image = reader.Execute()
            arr = sitk.GetArrayFromImage(image)
            vector = image.GetNumberOfComponentsPerPixel() > 1
            info = (image.GetDirection(), image.GetSpacing(), image.GetOrigin())
            iop = [reader.GetMetaData(i, "0020|0037") if reader.HasMetaDataKey(i, "0020|0037") else ""
                   for i in range(len(files))]
            ipp = [reader.GetMetaData(i, "0020|0032") if reader.HasMetaDataKey(i, "0020|0032") else ""
                   for i in range(len(files))]
        except RuntimeError as e:  # GDCM cannot decode: per file (pydicom decodes), geometry from the headers
            arr, vector, info, iop, ipp = _series_fallback(files, e)
    _check_series(folder, files, iop, ipp)
    arr = _to_channels_first(arr, vector)
    positions = np.array([[float(v) for v in p.split("\\")] for p in ipp]) if all(ipp) else None
    affine, meta = _dicom_meta(ds, info, len(files), arr.shape, "slice", positions)
    return arr, meta


def _series_fallback(files, itk_error):
    """Slices decoded one by one (pydicom where GDCM fails); the series geometry as ITK's series reader
    forms it: the first slice's origin and directions, the slice step from the first to the last origin."""
    import SimpleITK as sitk
    slices, infos = [], []
    for f in files:
        arr, meta = _read_dicom_file(Path(f))
        slices.append(arr)
        r = sitk.ImageFileReader()
        r.SetFileName(str(f))
        with _itk():
            r.ReadImageInformation()
        infos.append(_positive_spacing(r.GetDirection(), r.GetSpacing(), r.GetOrigin()))
    if len({s.shape for s in slices}) != 1:
        raise FileFormatError(f"the series' slices have different sizes: {sorted({s.shape for s in slices})}")
    vol = np.stack(slices, axis=1)                         # (C, slices, rows, cols)
    first, last = np.array(infos[0][2]), np.array(infos[-1][2])
    step = float(np.linalg.norm(last - first)) / (len(files) - 1)
    info = (infos[0][0], (infos[0][1][0], infos[0][1][1], step), infos[0][2])
    headers = [_header(f) for f in files]
    iop = ["\\".join(str(v) for v in h.ImageOrientationPatient) if "ImageOrientationPatient" in h else "" for h in headers]
    ipp = ["\\".join(str(v) for v in np.asarray(i[2])) for i in infos]
    vec = np.moveaxis(vol, 0, -1)                          # back to (slices, rows, cols, C) for the common path
    return (vec if vol.shape[0] > 1 else vec[..., 0]), vol.shape[0] > 1, info, iop, ipp


def _check_series(folder, files, iop, ipp) -> None:
    """One orientation and distinct positions: otherwise the files are not one volume."""
    vals = [tuple(np.round([float(v) for v in o.split("\\")], 4)) for o in iop if o]
    if len(set(vals)) > 1:
        raise FileFormatError(f"{folder}: the series mixes {len(set(vals))} slice orientations (localizer images, or "
                              "several stacks in one series); keep one stack's files in the folder")
    pos = [tuple(np.round([float(v) for v in p.split("\\")], 3)) for p in ipp if p]
    if len(set(pos)) < len(pos):
        raise FileFormatError(f"{folder}: {len(pos)} files of the series lie at only {len(set(pos))} distinct slice "
                              "positions (several echoes, phases or time points in one series?); keep one per position")


def read_channels(paths, *, series: str | None = None) -> tuple[torch.Tensor, dict]:
    """``(C, *spatial)`` and the first file's meta from one multi-channel file (4D NIfTI channels last,
    ``.npy`` ``(C, *spatial)``) or one single-channel file per channel, in channel order (same grid and
    affine required: resample them to one grid first)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise FileFormatError("no image file given")
    imgs, metas = zip(*[read_image(p, series=series) for p in paths])
    if len(imgs) > 1:
        if any(i.shape[0] != 1 for i in imgs):
            raise FileFormatError("with several image files, each must hold one channel; got channel counts "
                                  f"{[int(i.shape[0]) for i in imgs]}")
        if len({tuple(i.shape) for i in imgs}) != 1:
            raise FileFormatError(f"the channel files have different grids: {[tuple(i.shape[1:]) for i in imgs]}")
        if not all(np.allclose(m["affine"], metas[0]["affine"], atol=1e-4) for m in metas):
            raise FileFormatError("the channel files have different affines: resample them to one grid first")
    return torch.cat(imgs), metas[0]


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the body succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs are ordinary readable files
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_output_dir(out, files=(), overwrite: bool = False) -> Path:
    """Check, before any work, that ``out`` can be the output folder: not a file, creatable and writable,
    and (unless ``overwrite``) holding none of ``files``. Raises :class:`~medexplain.errors.OutputPathError` naming the problem
    (the existing files by name). Creates nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"the output path {out} is a file, not a folder; choose a folder for --out")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputPathError(f"cannot create the output folder {out}: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputPathError(f"the output folder {out} cannot be written ({probe} is not writable); choose another --out")
    existing = sorted(Path(p).name for p in files if Path(p).exists())
    if existing and not overwrite:
        shown = ", ".join(existing[:6]) + (f", ... ({len(existing)} in all)" if len(existing) > 6 else "")
        raise OutputPathError(f"{out} already holds {shown}; nothing was replaced. Pass --overwrite (overwrite=True) to "
                          "replace them, or choose another --out")
    return out


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def write_nifti(array, path, affine=None, *, spatial_dims: int | None = None, xform_code: int = 1) -> Path:
    """Write ``(C, *spatial)`` or ``(*spatial)`` as NIfTI on ``affine`` (default identity) atomically.

    Layout: the spatial axes in order (a 2D image gets a singleton third axis), one channel as a plain
    2D/3D image, several channels on the 4th axis: ``(X, Y, Z, C)``, 2D ``(X, Y, 1, C)``, so every channel
    map lies on the image in 3D Slicer, ITK-SNAP or SimpleITK. The sform and qform both carry the affine
    (``xform_code``: 1 = scanner coordinates), units mm. ``spatial_dims`` (2 or 3) says how to read an
    ambiguous 3D array; without it, a 3D array is ``(1, H, W)`` if its first axis is 1, else a volume.
    """
    import nibabel as nib
    a = _np(array).astype(np.float32)
    if spatial_dims is None:
        spatial_dims = 2 if a.ndim == 2 or (a.ndim == 3 and a.shape[0] == 1) else 3
    if a.ndim == spatial_dims:
        a = a[None]
    if spatial_dims not in (2, 3) or a.ndim != spatial_dims + 1:
        raise InputError(f"write_nifti: expected (C, *spatial) with {spatial_dims} spatial dims, got shape {a.shape}")
    data = np.moveaxis(a, 0, -1)                           # (*spatial, C)
    if spatial_dims == 2:
        data = data[:, :, None, :]                         # (X, Y, 1, C)
    if data.shape[-1] == 1:
        data = data[..., 0]
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise InputError(f"write_nifti: the affine must be a finite, invertible 4x4 matrix, got {aff.tolist()}")
    img = nib.Nifti1Image(data, aff)
    img.set_sform(aff, code=int(xform_code))
    img.set_qform(aff, code=int(xform_code), strip_shears=True)
    img.header.set_xyzt_units(xyz="mm")
    with atomic_path(path, suffix=".nii.gz" if str(path).endswith(".gz") else ".nii") as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def write_png_overlay(image, amap, path, *, affine=None, oriented: bool = True, title: str = "", subtitle: str = "",
                      label: str = "map", point=None, signed: bool | None = None, percentile: float | None = None,
                      **figure_options) -> Path:
    """The figure of :func:`medexplain.io.render.figure` (the map over the image, colour bar, title; a
    tri-planar view through the explained region, the map's peak or ``point`` for volumes) as a PNG, written
    atomically. ``affine``: the image's affine (tensor indices to RAS mm) for the voxel aspect and, when
    ``oriented`` (``meta["oriented"]`` of :func:`read_image`), the patient-direction labels;
    ``figure_options``: the other options of :func:`medexplain.io.render.figure` (``region``, ``alpha``,
    ``cmap``, ``planes``, ``patient_orientation``, ``caption``)."""
    from medexplain.io import render
    kw = {} if percentile is None else {"percentile": percentile}
    fig = render.figure(image, amap, affine=affine, oriented=oriented, title=title, subtitle=subtitle, label=label,
                        point=point, signed=signed, **kw, **figure_options)
    return write_figure(fig, path)


def write_figure(fig, path) -> Path:
    """A matplotlib figure (of :mod:`medexplain.io.render`) as a PNG at its own dpi, written atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)
    return Path(path)


def write_json(obj, path) -> Path:
    """``obj`` as indented JSON (tensors and arrays as lists), written atomically."""
    import json
    return write_text(json.dumps(obj, indent=2, default=_json_default), path, suffix=".json")


def write_text(text: str, path, suffix: str = "") -> Path:
    """``text`` (UTF-8) written atomically to ``path``."""
    with atomic_path(path, suffix=suffix) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_csv(rows, path, header) -> Path:
    """``rows`` (sequences in ``header`` order, or dicts keyed by the header names; ``None`` is an empty
    cell) as a CSV file with ``header``, written atomically."""
    import csv
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            r = [r.get(h) for h in header] if isinstance(r, dict) else r
            w.writerow(["" if v is None else v for v in r])
    return Path(path)


def geometry_record(meta: dict) -> dict:
    """The geometry part of a read image's meta, JSON-ready (for ``info.json`` and run records)."""
    keys = ("format", "geometry", "oriented", "axes", "spacing", "orientation", "warnings", "series_uid", "n_files",
            "transfer_syntax", "modality", "photometric", "spacing_source", "slice_spacing_source")
    out = {k: meta[k] for k in keys if k in meta}
    out["affine"] = np.asarray(meta["affine"]).round(6).tolist()
    return out


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)

