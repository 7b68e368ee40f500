"""Real anatomy that installs offline (``docs/data.md``), loaded once and cached.

None of these images carries a diagnostic label; the generators in :mod:`medexplain.data.planted` plant
the evidence. Every loader returns a float32 tensor scaled to roughly [0, 1].
"""
from __future__ import annotations

import functools
import importlib.resources

import numpy as np
import torch
import torch.nn.functional as F

from medexplain.errors import FileFormatError


def _robust_unit(a: np.ndarray, lo_q: float = 1.0, hi_q: float = 99.5) -> np.ndarray:
    lo, hi = np.percentile(a, [lo_q, hi_q])
    return np.clip((a.astype(np.float64) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


@functools.lru_cache(maxsize=2)
def _chest_full() -> torch.Tensor:
    try:
        import pydicom
        import pydicom.data
        path = pydicom.data.get_testdata_file("RG1_UNCR.dcm")
        ds = pydicom.dcmread(path)
        a = ds.pixel_array
    except Exception as e:  # pragma: no cover - depends on the installation
        raise FileFormatError(f"cannot read the chest radiograph RG1_UNCR.dcm from pydicom-data: {e}") from e
    u = _robust_unit(a)
    if str(ds.PhotometricInterpretation).upper() == "MONOCHROME1":  # MONOCHROME1: high values are dark
        u = 1.0 - u
    return torch.from_numpy(u.astype(np.float32))


@functools.lru_cache(maxsize=8)
def chest_radiograph(short_side: int) -> torch.Tensor:
    """The real PA chest CR ``RG1_UNCR.dcm`` (pydicom-data), ``(1, H, W)`` with H = ``short_side`` scaled
    from 1955x1841 with antialiasing; display convention (bone bright)."""
    full = _chest_full()[None, None]
    h, w = full.shape[2:]
    s = short_side / min(h, w)
    out = F.interpolate(full.double(), size=(max(int(round(h * s)), 8), max(int(round(w * s)), 8)),
                        mode="bilinear", antialias=True, align_corners=False)
    return out[0].float().contiguous()


@functools.lru_cache(maxsize=8)
def retina(side: int) -> torch.Tensor:
    """The fundus photograph ``skimage.data.retina()`` (CC0), ``(3, side, side)`` RGB in [0, 1]."""
    import skimage.data
    a = torch.from_numpy(skimage.data.retina().astype(np.float64) / 255.0).permute(2, 0, 1)[None]
    out = F.interpolate(a, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return out[0].float().contiguous()


@functools.lru_cache(maxsize=1)
def brain_t1() -> tuple[torch.Tensor, np.ndarray]:
    """nibabel's real T1 ``tests/data/anatomical.nii`` (33x41x25, 2 mm): ``((1, 33, 41, 25), affine)``,
    intensities scaled by the 1st/99.5th percentiles to [0, 1]."""
    import nibabel as nib
    path = importlib.resources.files("nibabel") / "tests/data/anatomical.nii"
    try:
        img = nib.load(str(path))
        v = np.asarray(img.get_fdata(), dtype=np.float64)
    except Exception as e:  # pragma: no cover
        raise FileFormatError(f"cannot read nibabel's anatomical.nii: {e}") from e
    return torch.from_numpy(_robust_unit(v).astype(np.float32))[None], np.asarray(img.affine)
