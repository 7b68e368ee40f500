"""Medical image I/O on the field's libraries: PIL (PNG/JPEG), pydicom (DICOM, rescale slope/intercept),
nibabel (NIfTI, affine kept). Attributions are written as NIfTI on the input's affine (they open as
overlays in 3D Slicer / ITK-SNAP) and as PNG overlays (the colour scheme of :mod:`medexplain.render`).
Every write is atomic (:func:`atomic_path`: temporary file, then rename), so an interrupted run never
leaves a half-written output; :func:`file_stem` is the one rule for output names derived from inputs.

Array convention: images are returned as ``(C, *spatial)`` float32 tensors; NIfTI voxel axes are kept in
nibabel's order (no transpose), so the affine applies to the returned spatial axes directly; 4D NIfTI
stores channels (contrasts) last and they are moved first.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import render
from .errors import FileFormatError
from .render import ALPHA, representative_slices  # noqa: F401  (representative_slices re-exported)

IMAGE_SUFFIXES = {".png": "png", ".jpg": "png", ".jpeg": "png", ".dcm": "dicom", ".dicom": "dicom",
                  ".nii": "nifti", ".nii.gz": "nifti", ".npy": "npy", ".npz": "npz"}


#: The file extensions of the field's image and array formats, as :func:`file_stem` removes them
#: (matched case-insensitively, longest first, so ``.nii.gz`` is one extension).
KNOWN_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm", ".dicom", ".npy", ".npz",
                  ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".h5", ".hdf5")


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


def method_file(method: str) -> str:
    """File-name form of a method name (``gradcam++`` -> ``gradcampp``), for every map file written."""
    return method.replace("+", "p")


def read_image(path) -> tuple[torch.Tensor, dict]:
    """Read PNG/JPEG, DICOM, NIfTI or NumPy into ``(C, *spatial)`` float32 and a meta dict
    (``format``, ``affine`` 4x4 voxel-to-world, ``path``). Raises :class:`FileFormatError` on a missing,
    unsupported or corrupt file."""
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{path}: no such file")
    kind = IMAGE_SUFFIXES.get(_suffix(path))
    if kind is None and _is_dicom(path):
        kind = "dicom"
    if kind is None:
        raise FileFormatError(f"{path}: unsupported file type {_suffix(path) or '(none)'}; "
                              f"use one of {', '.join(sorted(IMAGE_SUFFIXES))}")
    try:
        arr, affine = {"png": _read_png, "dicom": _read_dicom, "nifti": _read_nifti,
                       "npy": _read_npy, "npz": _read_npy}[kind](path)
    except FileFormatError:
        raise
    except Exception as e:  # the libraries raise many types on corrupt content
        raise FileFormatError(f"{path}: cannot read as {kind}: {type(e).__name__}: {e}") from e
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise FileFormatError(f"{path}: image contains NaN or Inf values")
    return torch.from_numpy(arr), {"format": kind, "affine": affine, "path": str(path)}


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


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
    return arr, np.eye(4)


def _read_dicom(path):
    import pydicom
    from pydicom.pixels import apply_rescale
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise FileFormatError(f"{path}: DICOM file has no pixel data")
    arr = apply_rescale(ds.pixel_array, ds).astype(np.float32)  # modality LUT: slope/intercept
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        arr = arr.max() - arr  # MONOCHROME1 displays inverted; store as MONOCHROME2
    if arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 3:
        arr = arr.transpose(2, 0, 1)                       # RGB -> (3, H, W)
    else:
        arr = arr[None]                                    # (1, H, W) or (1, frames, H, W)
    spacing = [float(v) for v in getattr(ds, "PixelSpacing", [1.0, 1.0])]
    affine = np.diag([spacing[0], spacing[1], float(getattr(ds, "SliceThickness", 1.0) or 1.0), 1.0])
    return arr, affine


def _read_nifti(path):
    import nibabel as nib
    img = nib.load(str(path))
    arr = np.asanyarray(img.dataobj, dtype=np.float32)
    if arr.ndim == 4:
        arr = np.moveaxis(arr, -1, 0)                      # channels last on disk -> first
    elif arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[None, ..., 0]                            # a 2D image stored as X x Y x 1
    elif arr.ndim in (2, 3):
        arr = arr[None]
    else:
        raise FileFormatError(f"{path}: NIfTI with {arr.ndim} dims; expected 2, 3 or 4 (channels last)")
    return arr, img.affine


def _read_npy(path):
    data = np.load(path, allow_pickle=False)
    if isinstance(data, np.lib.npyio.NpzFile):
        keys = list(data.keys())
        arr = data["image"] if "image" in keys else data[keys[0]]
    else:
        arr = data
    if arr.ndim not in (3, 4):
        raise FileFormatError(f"{path}: array must be (C, H, W) or (C, D, H, W), got shape {arr.shape}")
    return arr, np.eye(4)


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


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def write_nifti(array, path, affine=None) -> Path:
    """Write ``(C, *spatial)`` or ``(*spatial)`` as NIfTI (channels last; 2D gets a singleton Z) atomically."""
    import nibabel as nib
    a = _np(array).astype(np.float32)
    if a.ndim in (3, 4) and a.shape[0] == 1 and a.ndim - 1 in (2, 3):
        a = a[0]
    elif a.ndim in (3, 4) and a.ndim - 1 in (2, 3) and a.shape[0] > 1 and a.ndim == 4:
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    img = nib.Nifti1Image(a, np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64))
    with atomic_path(path, suffix=".nii.gz" if str(path).endswith(".gz") else ".nii") as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def overlay_rgb(image, amap, alpha: float = ALPHA, signed: bool | None = None) -> np.ndarray:
    """2D overlay ``(H, W, 3)`` uint8 of a map (``(C, H, W)`` channels summed, or ``(H, W)``) on an image
    ``(C, H, W)`` or ``(H, W)``, in the one colour scheme of :mod:`medexplain.render` (the report's)."""
    img, m = _np(image).astype(np.float64), _np(amap).astype(np.float64)
    img = img[None] if img.ndim == 2 else img
    m = m.sum(0) if m.ndim == 3 else m
    return render.overlay(render.image_rgb(img), m, signed=signed, alpha=alpha)


def write_png_overlay(image, amap, path, alpha: float = ALPHA, signed: bool | None = None, n_slices: int = 3) -> Path:
    """PNG overlay of ``amap`` (``(C_or_1, *spatial)``) on ``image`` (``(C, *spatial)``) in the colour scheme
    of :mod:`medexplain.render`; for 3D, a row of representative axial slices (first spatial axis), the
    image scaled over the volume and the map by its max |value| over the volume. Written atomically."""
    from PIL import Image
    img, m = _np(image).astype(np.float64), _np(amap).astype(np.float64)
    if m.ndim == 4:
        ms = m.sum(0)
        scale, signed = float(np.abs(ms).max()), bool((ms < 0).any()) if signed is None else signed
        tiles = [render.overlay(render.slice_rgb(img, s), ms[s], scale, signed, alpha)
                 for s in representative_slices(m, n_slices)]
        rgb = np.concatenate([np.pad(t, ((0, 0), (0, 2), (0, 0))) for t in tiles], axis=1)
    else:
        rgb = overlay_rgb(img, m, alpha, signed)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
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


def read_channels(paths) -> tuple[torch.Tensor, dict]:
    """``(C, *spatial)`` and the first file's meta from one multi-channel file (4D NIfTI channels last,
    ``.npy`` ``(C, *spatial)``) or one single-channel file per channel, in channel order (same grid and
    affine required: resample them to one grid first)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise FileFormatError("no image file given")
    imgs, metas = zip(*[read_image(p) for p in paths])
    if len(imgs) > 1:
        if any(i.shape[0] != 1 for i in imgs):
            raise FileFormatError("with several image files, each must hold one channel; got channel counts "
                                  f"{[int(i.shape[0]) for i in imgs]}")
        if len({tuple(i.shape) for i in imgs}) != 1:
            raise FileFormatError(f"the channel files have different grids: {[tuple(i.shape[1:]) for i in imgs]}")
        if not all(np.allclose(m["affine"], metas[0]["affine"], atol=1e-4) for m in metas):
            raise FileFormatError("the channel files have different affines: resample them to one grid first")
    return torch.cat(imgs), metas[0]


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)
