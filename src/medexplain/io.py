"""Medical image I/O on the field's libraries: PIL (PNG/JPEG), pydicom (DICOM, rescale slope/intercept),
nibabel (NIfTI, affine kept). Attributions are written as NIfTI on the input's affine (they open as
overlays in 3D Slicer / ITK-SNAP) and as PNG overlays. Every write is atomic (temporary file, then rename),
so an interrupted run never leaves a half-written output.

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

from .errors import FileFormatError

IMAGE_SUFFIXES = {".png": "png", ".jpg": "png", ".jpeg": "png", ".dcm": "dicom", ".dicom": "dicom",
                  ".nii": "nifti", ".nii.gz": "nifti", ".npy": "npy", ".npz": "npz"}


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


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


def _diverging(v: np.ndarray) -> np.ndarray:
    """Blue-white-red for v in [-1, 1] (RGB float in [0, 1])."""
    v = np.clip(v, -1, 1)[..., None]
    red, blue, white = np.array([0.8, 0.1, 0.1]), np.array([0.1, 0.2, 0.8]), np.ones(3)
    return np.where(v >= 0, white + v * (red - white), white - v * (blue - white))


def _sequential(v: np.ndarray) -> np.ndarray:
    """Black-red-yellow-white ("hot") for v in [0, 1]."""
    v = np.clip(v, 0, 1)
    return np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1)


def overlay_rgb(image, amap, alpha: float = 0.5, signed: bool | None = None) -> np.ndarray:
    """2D overlay ``(H, W, 3)`` uint8 of a map on a grayscale image (channel mean, min-max for display
    only). Signed maps use a diverging colour map centred at 0 and scaled by max |map|."""
    img, m = _np(image).astype(np.float64), _np(amap).astype(np.float64)
    img = img.mean(0) if img.ndim == 3 else img
    m = m.sum(0) if m.ndim == 3 else m
    img = (img - img.min()) / max(img.max() - img.min(), 1e-12)
    signed = bool((m < 0).any()) if signed is None else signed
    scale = max(np.abs(m).max(), 1e-12)
    col = _diverging(m / scale) if signed else _sequential(m / scale)
    weight = alpha * (np.abs(m) / scale)[..., None]        # transparent where the map is 0
    rgb = (1 - weight) * img[..., None] + weight * col
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def representative_slices(amap, n: int = 3) -> list[int]:
    """For a 3D map ``(C, D, H, W)``: the slice with the most |map| and the quartile slices around it."""
    m = np.abs(_np(amap)).sum(0)
    d = m.shape[0]
    peak = int(m.reshape(d, -1).sum(1).argmax())
    picks = dict.fromkeys([peak] + [int(q * (d - 1)) for q in (0.25, 0.5, 0.75)])  # peak first, no repeats
    return sorted(list(picks)[:max(n, 1)])


def write_png_overlay(image, amap, path, alpha: float = 0.5, signed: bool | None = None, n_slices: int = 3) -> Path:
    """PNG overlay of ``amap`` (``(C_or_1, *spatial)``) on ``image`` (``(C, *spatial)``); for 3D, a row of
    representative axial slices (first spatial axis). Written atomically."""
    from PIL import Image
    img, m = _np(image), _np(amap)
    if m.ndim == 4:
        tiles = [overlay_rgb(img[:, s], m[:, s], alpha, signed) for s in representative_slices(m, n_slices)]
        rgb = np.concatenate([np.pad(t, ((0, 0), (0, 2), (0, 0))) for t in tiles], axis=1)
    else:
        rgb = overlay_rgb(img, m, alpha, signed)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return Path(path)


def write_json(obj, path) -> Path:
    import json
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    return Path(path)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)
