"""The preprocessing a model was trained with, applied before the model and inverted for the maps.

A real model expects its training preprocessing: resampling to a voxel spacing, an orientation,
intensity normalisation, and crop/pad to a size or to a multiple of its stride. :class:`Preprocessing`
says which, either as a MONAI ``Compose`` of the user's own (``transform="package.module:factory"``,
dictionary or array transforms) or with the shortcuts of the command line, built from MONAI
transforms:

======================  =================================================================
``orientation``         ``Orientation(axcodes)`` (e.g. ``RAS``)
``spacing``             ``Spacing(pixdim, mode="bilinear")`` (mm per voxel, one value or one per axis)
``intensity``           ``zscore``: ``NormalizeIntensity(channel_wise=True)``;
                        ``percentile:a,b``: ``ScaleIntensityRangePercentiles(a, b, 0, 1, clip=True)``;
                        ``range:a,b``: ``ScaleIntensityRange(a, b, 0, 1, clip=True)`` (e.g. a CT window);
                        ``none``
``spatial_size``        ``ResizeWithPadOrCrop(spatial_size)`` (centred pad or crop)
``min_spatial_size``    ``SpatialPad(min_spatial_size)`` (centred pad up to at least this size; never crops)
``divisible_by``        ``DivisiblePad(k)`` (pad each side up to a multiple of ``k``)
======================  =================================================================

``min_spatial_size`` and ``divisible_by`` combine: an axis of ``n`` voxels becomes ``ceil(max(n, N) / k) * k``,
at least ``N`` and a multiple of ``k`` (a brain-extraction U-Net that needs a multiple of 16 and at least 128
per axis: ``--min-spatial-size 128 --divisible-by 16``). ``spatial_size`` fixes the size, so it combines with
neither (a fixed size that must also be a multiple of ``k`` is simply that size).

applied in that order (intensity before padding, so padding does not enter the statistics), after
the user's ``Compose`` when both are given. The image goes in as a MONAI ``MetaTensor`` carrying its
affine, so every spatial transform records what it did; :meth:`Preprocessor.invert` replays that
record backwards (MONAI's ``Compose.inverse``, the mechanism of ``Invertd``) on an attribution map,
which therefore lands on the original image grid and affine. Intensity transforms are not inverted
(a map has no intensity to restore).

:func:`resample_to_grid` puts a mask given on another grid (its own affine) onto the image grid by
geometry (MONAI ``SpatialResample``, nearest neighbour). Nothing here is written by hand but the
parsing of the shortcut strings; MONAI is the well-kept library for all of it.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from medexplain.errors import InputError, ModelLoadError, OptionError

INTENSITY_HELP = "zscore, percentile:LOW,HIGH (e.g. percentile:0.5,99.5), range:LOW,HIGH (e.g. range:-1000,1000) or none"
#: MONAI's orientation labels for RAS+ world coordinates (NIfTI's convention), given explicitly.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _numbers(value, cast, what: str, positive: bool = True) -> tuple | None:
    """``"1,1,2"``, ``"2"``, a number or a sequence as a tuple of ``cast`` values (typed error otherwise)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    parts = value.replace("x", ",").split(",") if isinstance(value, str) else (
        list(value) if isinstance(value, (list, tuple)) else [value])
    try:
        out = []
        for p in parts:
            if isinstance(p, str) and not p.strip():
                continue
            v = float(p)
            if cast is int and not v.is_integer():
                raise ValueError
            out.append(cast(v))
    except (TypeError, ValueError):
        raise OptionError(f"{what} must be {'integers' if cast is int else 'numbers'} separated by commas, "
                          f"got {value!r}") from None
    if not out or len(out) > 3 or (positive and min(out) <= 0):
        raise OptionError(f"{what} must be one or 2-3 {'positive ' if positive else ''}values, got {value!r}")
    return tuple(out)


def parse_intensity(value: str | None) -> tuple[str, tuple[float, float] | None]:
    """``zscore`` | ``percentile:a,b`` | ``range:a,b`` | ``none`` as ``(kind, (a, b) or None)``."""
    if value is None:
        return "none", None
    kind, _, arg = str(value).strip().lower().partition(":")
    if kind in ("none", "zscore") and not arg:
        return kind, None
    if kind in ("percentile", "range"):
        try:
            a, b = (float(v) for v in arg.split(","))
        except ValueError:
            raise OptionError(f"--intensity {value!r}: {kind} needs two numbers LOW,HIGH ({INTENSITY_HELP})") from None
        if not a < b or (kind == "percentile" and not 0 <= a < b <= 100):
            raise OptionError(f"--intensity {value!r}: need LOW < HIGH" + (" within 0..100" if kind == "percentile" else ""))
        return kind, (a, b)
    raise OptionError(f"unknown --intensity {value!r}; use {INTENSITY_HELP}")


@dataclass
class Preprocessing:
    """What to do to an image before the model (see the module docstring for each field's transform).

    ``transform``: ``"package.module:factory"`` (imported as ``python -m`` would, the factory returning
    a MONAI ``Compose`` or transform) or the ``Compose`` itself; dictionary transforms get the image
    under their one key (``"image"`` when they use several). Values may be given as text (the command
    line's and the manifest's ``"1,1,2"``): they are parsed and checked here, with typed errors.
    """

    spacing: tuple[float, ...] | None = None
    orientation: str | None = None
    spatial_size: tuple[int, ...] | None = None
    divisible_by: int | None = None
    intensity: str | None = None
    transform: object = None
    min_spatial_size: tuple[int, ...] | None = None

    def __post_init__(self):
        self.spacing = _numbers(self.spacing, float, "--spacing")
        self.spatial_size = _numbers(self.spatial_size, int, "--spatial-size")
        self.min_spatial_size = _numbers(self.min_spatial_size, int, "--min-spatial-size")
        k = _numbers(self.divisible_by, int, "--divisible-by")
        if k is not None and len(k) != 1:
            raise OptionError(f"--divisible-by must be one positive integer, got {self.divisible_by!r}")
        self.divisible_by = None if k is None else k[0]
        if self.spatial_size is not None and (self.divisible_by is not None or self.min_spatial_size is not None):
            raise OptionError("give --spatial-size (a fixed size) or --min-spatial-size/--divisible-by, not both: to pad to "
                              "at least N per axis and a multiple of k, use --min-spatial-size N --divisible-by k")
        if self.orientation is not None:
            o = str(self.orientation).strip().upper()
            if o in ("", "NONE"):
                o = None
            elif not (2 <= len(o) <= 3 and all(c in "LRAPIS" for c in o)
                      and len({c.replace("L", "R").replace("P", "A").replace("I", "S") for c in o}) == len(o)):
                raise OptionError(f"--orientation must be axis codes such as RAS or LPS, got {self.orientation!r}")
            self.orientation = o
        kind, _ = parse_intensity(self.intensity)
        self.intensity = None if kind == "none" else str(self.intensity).strip().lower()
        if isinstance(self.transform, str) and not self.transform.strip():
            self.transform = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.spacing, self.orientation, self.spatial_size, self.divisible_by,
                                           self.intensity, self.transform, self.min_spatial_size))

    def describe(self) -> dict:
        """The settings as JSON-able values (for ``info.json`` and run records)."""
        t = self.transform
        return {"spacing": self.spacing, "orientation": self.orientation, "spatial_size": self.spatial_size,
                "min_spatial_size": self.min_spatial_size, "divisible_by": self.divisible_by, "intensity": self.intensity,
                "transform": t if t is None or isinstance(t, str) else type(t).__name__}

    def build(self) -> "Preprocessor":
        return Preprocessor(self)


def _user_compose(transform):
    """The user's transform as ``(Compose, key or None)``: key is the dictionary key of the image."""
    from monai.transforms import Compose, MapTransform

    if isinstance(transform, str):
        from medexplain.models.loading import import_factory
        factory = import_factory(transform)
        try:
            transform = factory()
        except Exception as e:
            raise ModelLoadError(f"--transform {transform}: calling the factory raised {type(e).__name__}: {e}") from e
    if not callable(transform):
        raise OptionError(f"--transform must give a MONAI Compose or transform, got {type(transform).__name__}")
    compose = transform if isinstance(transform, Compose) else Compose([transform])
    maps = [t for t in compose.flatten().transforms if isinstance(t, MapTransform)]
    if not maps:
        return compose, None
    keys = {k for t in maps for k in t.keys}
    if len(keys) == 1:
        return compose, next(iter(keys))
    if "image" in keys:
        return compose, "image"
    raise OptionError(f"the dictionary transforms of --transform use the keys {sorted(keys)}; medexplain gives the "
                      "image under one key: use one key, or 'image'")


@dataclass
class Prepared:
    """An image after preprocessing: ``image`` ``(C, *s')`` (plain tensor), its ``affine`` (4x4 numpy),
    and the record needed to invert it onto the original ``(shape, affine)``."""

    image: torch.Tensor
    affine: np.ndarray
    original_shape: tuple[int, ...]
    original_affine: np.ndarray
    meta: object = None
    steps: list = field(default_factory=list)
    shortcuts: object = None

    @property
    def changed_grid(self) -> bool:
        return tuple(self.image.shape[1:]) != self.original_shape or not np.allclose(self.affine, self.original_affine)


class Preprocessor:
    """:class:`Preprocessing` made into MONAI transforms: :meth:`apply` to an image, :meth:`invert` for
    a map computed on the result."""

    def __init__(self, prep: Preprocessing | None = None):
        self.prep = prep or Preprocessing()
        self.user, self.key = _user_compose(self.prep.transform) if self.prep.transform is not None else (None, None)

    def _shortcuts(self, spatial_dims: int):
        from monai.transforms import (
            Compose,
            DivisiblePad,
            NormalizeIntensity,
            Orientation,
            ResizeWithPadOrCrop,
            ScaleIntensityRange,
            ScaleIntensityRangePercentiles,
            Spacing,
            SpatialPad,
        )

        p, ts = self.prep, []

        def per_axis(v, what):
            if v is None:
                return None
            if len(v) == 1:
                return v * spatial_dims
            if len(v) != spatial_dims:
                raise OptionError(f"{what} has {len(v)} values for an image with {spatial_dims} spatial dims")
            return v

        if p.orientation:
            ts.append(Orientation(axcodes=p.orientation[:spatial_dims], labels=RAS_LABELS))
        if p.spacing:
            ts.append(Spacing(pixdim=per_axis(p.spacing, "--spacing"), mode="bilinear"))
        kind, ab = parse_intensity(p.intensity)
        if kind == "zscore":
            ts.append(NormalizeIntensity(channel_wise=True))
        elif kind == "percentile":
            ts.append(ScaleIntensityRangePercentiles(lower=ab[0], upper=ab[1], b_min=0.0, b_max=1.0, clip=True,
                                                     channel_wise=True))
        elif kind == "range":
            ts.append(ScaleIntensityRange(a_min=ab[0], a_max=ab[1], b_min=0.0, b_max=1.0, clip=True))
        if p.spatial_size:
            ts.append(ResizeWithPadOrCrop(spatial_size=per_axis(p.spatial_size, "--spatial-size")))
        if p.min_spatial_size:  # before DivisiblePad: at least N, then up to a multiple of k (the larger of the two)
            ts.append(SpatialPad(spatial_size=per_axis(p.min_spatial_size, "--min-spatial-size")))
        if p.divisible_by:
            ts.append(DivisiblePad(k=p.divisible_by))
        return Compose(ts) if ts else None

    def apply(self, image: torch.Tensor, affine) -> Prepared:
        """``image`` ``(C, *spatial)`` with its 4x4 voxel-to-world ``affine`` through the preprocessing."""
        from monai.data import MetaTensor

        affine = np.asarray(affine, dtype=np.float64)
        shape = tuple(int(s) for s in image.shape[1:])
        if not self.prep.active:
            return Prepared(image, affine, shape, affine)
        x = MetaTensor(image.detach().float().cpu().clone(), affine=torch.as_tensor(affine))
        steps = []
        try:
            if self.user is not None:
                x = self.user({self.key: x})[self.key] if self.key else self.user(x)
                steps.append("transform")
            short = self._shortcuts(len(shape))  # MONAI inverts with the very instances that were applied
            if short is not None:
                x = short(x)
                steps.append("shortcuts")
        except (OptionError, InputError):
            raise
        except Exception as e:
            raise InputError(f"the preprocessing failed on the image {tuple(image.shape)}: {type(e).__name__}: "
                             f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}") from e
        if not isinstance(x, torch.Tensor) or x.ndim != image.ndim:
            raise InputError(f"the preprocessing must return a channel-first tensor (C, *spatial) like its input "
                             f"{tuple(image.shape)}; got {getattr(x, 'shape', type(x).__name__)}")
        is_meta = isinstance(x, MetaTensor)
        new_affine = np.asarray(x.affine, dtype=np.float64) if is_meta else affine
        if not is_meta and tuple(x.shape[1:]) != shape:
            raise InputError("the preprocessing changed the grid but returned a plain tensor, so the maps cannot be "
                             "put back on the image grid: use MONAI transforms (they return MetaTensors)")
        plain = x.as_tensor() if is_meta else x
        return Prepared(plain.float().contiguous(), new_affine, shape, affine, x if is_meta else None, steps,
                        short if "shortcuts" in steps else None)

    def invert(self, amap: torch.Tensor, prepared: Prepared, nearest: bool = False) -> torch.Tensor:
        """A map ``(C_or_1, *s')`` on the preprocessed grid back onto the original grid ``(C_or_1, *s)``
        (MONAI ``Compose.inverse`` of the recorded spatial transforms, as ``Invertd`` does: with the
        interpolation the image was resampled with, or nearest neighbour for label maps with ``nearest``)."""
        from monai.data import MetaTensor
        from monai.transforms.utils import convert_applied_interp_mode

        if prepared.meta is None or not prepared.steps:
            return amap
        meta = prepared.meta
        ops = copy.deepcopy(meta.applied_operations)
        if nearest:
            ops = convert_applied_interp_mode(ops, mode="nearest", align_corners=None)
        m = MetaTensor(amap.detach().float().cpu().clone(), affine=meta.affine.clone(), applied_operations=ops)
        with warnings.catch_warnings():  # MONAI's Orientation.inverse of a 2D image reads 3 axis codes off
            warnings.filterwarnings("ignore", message=r"axcodes .* length is smaller")  # the 4x4 affine
            if "shortcuts" in prepared.steps:
                m = prepared.shortcuts.inverse(m)
            if "transform" in prepared.steps:
                m = self.user.inverse({self.key: m})[self.key] if self.key else self.user.inverse(m)
        out = m.as_tensor() if isinstance(m, MetaTensor) else torch.as_tensor(m)
        if tuple(out.shape[1:]) != prepared.original_shape:
            raise InputError(f"the map could not be put back on the image grid: inverting the preprocessing gave "
                             f"{tuple(out.shape[1:])}, the image is {prepared.original_shape} (a transform that is "
                             "not invertible changed the grid)")
        return out.to(amap.dtype)


def same_grid(shape_a, affine_a, shape_b, affine_b, atol: float = 1e-4) -> bool:
    return tuple(shape_a) == tuple(shape_b) and np.allclose(np.asarray(affine_a), np.asarray(affine_b), atol=atol)


def resample_nearest(arr: torch.Tensor, src_affine, shape, affine) -> torch.Tensor:
    """``arr`` ``(C, *s)`` on its grid ``src_affine`` resampled onto the grid ``(shape, affine)`` by
    geometry, nearest neighbour (label values kept; outside the source: 0), with MONAI's
    ``SpatialResample``; as is when the grids agree."""
    if same_grid(arr.shape[1:], src_affine, shape, affine):
        return arr
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    src = MetaTensor(arr.float(), affine=torch.as_tensor(np.asarray(src_affine, dtype=np.float64)))
    out = SpatialResample(mode="nearest", padding_mode="zeros")(
        src, dst_affine=torch.as_tensor(np.asarray(affine, dtype=np.float64)), spatial_size=tuple(int(s) for s in shape))
    return torch.as_tensor(out.as_tensor() if isinstance(out, MetaTensor) else out)


def resample_to_grid(mask: torch.Tensor, mask_affine, shape, affine) -> torch.Tensor:
    """A mask ``(C, *s_m)`` (any channel > 0 is inside) on its own grid as bool ``(*shape)`` on the grid
    ``(shape, affine)`` (:func:`resample_nearest`)."""
    m = (mask > 0).any(0, keepdim=True).float()
    return resample_nearest(m, mask_affine, shape, affine)[0] > 0.5
