"""Lesion instances: connected components of a segmentation, labelled TP / FP / FN against a reference.

Spagnolo et al., "Instance-level quantitative saliency in multiple sclerosis lesion segmentation"
(seed 001): the foreground probability is thresholded, connected components are formed with
``scipy.ndimage.label`` and the reference code's structuring element
``generate_binary_structure(ndim, 2)`` (18-connectivity in 3D, 8-connectivity in 2D), and components of
at most 5 voxels are dropped (``min_size=6``: a component is kept when it has >= 6 voxels).

With a reference (ground-truth) mask every kept prediction is a **TP** when it overlaps the reference and
an **FP** when it does not (the reference code's ``non_zero`` rule); a reference component that is not
detected is an **FN** and its footprint is the reference voxels. Reference components smaller than
``min_size`` are not reported as FN (the same size rule for every kind).

Three edge rules, chosen with ``find_instances(..., rules=)`` (:data:`RULES`):

============================  =====================================  ========================================
rule                          ``rules="medexplain"`` (default)       ``rules="reference"`` (federicospagnolo/IES)
============================  =====================================  ========================================
a reference lesion detected   a *kept* prediction (>= ``min_size``)  any thresholded predicted voxel touches
                              touches it                             it, also of components <= 5 voxels
a probability ``p`` kept      ``p > threshold``                      ``p >= threshold`` (``p == threshold``
                                                                     is never set to 0 there)
the reference binarised       like the prediction (bool as is,       ``>= 1.0`` (``binarize_mask(gt, 1.)``)
                              integers ``> 0``, floats               for every dtype
                              ``> threshold``)
============================  =====================================  ========================================
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from medexplain.errors import InputError, OptionError

KINDS = ("TP", "FP", "FN")
#: ``find_instances``' edge rules: medexplain's (default) and the IES reference code's.
RULES = ("medexplain", "reference")

# neighbour counts accepted for ``connectivity`` -> scipy rank, per spatial dimensionality
_COUNTS = {2: {4: 1, 8: 2}, 3: {6: 1, 18: 2, 26: 3}}


@dataclass(eq=False)
class Instance:
    """One lesion instance.

    ``mask`` is a bool tensor ``(*spatial)`` on the segmentation grid; ``kind`` is ``"TP"``, ``"FP"``,
    ``"FN"`` or ``None`` (no reference given); ``size`` its voxel count. ``sample`` is the batch index
    of the image it belongs to and ``label`` its 1-based component number within that image (FN
    instances are numbered after the predicted ones).
    """

    mask: torch.Tensor = field(repr=False)
    kind: str | None
    size: int
    sample: int = 0
    label: int = 0
    centroid: tuple = field(default=(), repr=False)

    @property
    def spatial_dims(self) -> int:
        return self.mask.ndim


def structure(ndim: int, connectivity=None) -> np.ndarray:
    """The structuring element for ``ndim`` spatial dims.

    ``connectivity`` is ``None`` (the reference code's ``generate_binary_structure(ndim, 2)``), a scipy
    rank ``1..ndim``, a neighbour count (4 / 8 in 2D; 6 / 18 / 26 in 3D) or an explicit boolean array
    of shape ``(3,) * ndim``.
    """
    if connectivity is None:
        return ndimage.generate_binary_structure(ndim, 2)
    if isinstance(connectivity, (np.ndarray, torch.Tensor)):
        s = np.asarray(connectivity).astype(bool)
        if s.shape != (3,) * ndim:
            raise InputError(f"a connectivity structure must have shape {(3,) * ndim}, got {s.shape}")
        return s
    if isinstance(connectivity, (int, np.integer)) and not isinstance(connectivity, bool):
        c = int(connectivity)
        if 1 <= c <= ndim:
            return ndimage.generate_binary_structure(ndim, c)
        if c in _COUNTS.get(ndim, {}):
            return ndimage.generate_binary_structure(ndim, _COUNTS[ndim][c])
    counts = sorted(_COUNTS.get(ndim, {}))
    raise InputError(f"connectivity {connectivity!r} is not valid in {ndim}D: use None, a rank 1..{ndim}, "
                     f"a neighbour count {counts}, or a boolean (3,)*{ndim} array")


def _as_numpy(a, what: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.dtype == object or a.size == 0:
        raise InputError(f"{what} must be a non-empty numeric array or tensor")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise InputError(f"{what} contains NaN or Inf values")
    return a


def _batched(a: np.ndarray, spatial_dims: int | None, what: str) -> tuple[np.ndarray, bool]:
    """Bring ``a`` to ``(B, *spatial)``; also return whether the input was a batch."""
    nd = a.ndim
    if spatial_dims is None:
        if nd == 2:
            spatial_dims = 2
        elif nd == 3:
            spatial_dims = 3        # a single volume; pass spatial_dims=2 for a batch of 2D maps
        elif nd == 4:
            spatial_dims = 2 if a.shape[1] == 1 else 3   # (B, 1, H, W) or (B, D, H, W)
        elif nd == 5:
            spatial_dims = 3
        else:
            raise InputError(f"{what} must be (*spatial), (B, *spatial) or (B, 1, *spatial) with 2 or 3 "
                             f"spatial dims; got shape {a.shape}")
    if spatial_dims not in (2, 3):
        raise InputError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    extra = nd - spatial_dims
    if extra == 0:
        return a[None], False
    if extra == 1:
        return a, True
    if extra == 2 and a.shape[1] == 1:
        return a[:, 0], True
    raise InputError(f"{what} of shape {a.shape} does not fit {spatial_dims} spatial dims: expected "
                     f"(*spatial), (B, *spatial) or (B, 1, *spatial)")


def _binarise(a: np.ndarray, threshold: float, rules: str = "medexplain") -> np.ndarray:
    """The prediction's foreground: bool as is, integers ``> 0`` (a label map), probabilities ``> threshold``
    (``rules="medexplain"``) or ``>= threshold`` (``"reference"``: the IES code sets ``p > t`` to 1 and
    ``p < t`` to 0, so ``p == t`` stays non-zero, i.e. foreground)."""
    if a.dtype == bool:
        return a
    if np.issubdtype(a.dtype, np.integer):
        return a > 0                 # a label map: every non-zero label is foreground
    return a >= threshold if rules == "reference" else a > threshold


#: A ground truth with more distinct non-zero integer values than this is an image, not a label map.
MAX_LABELS = 100


def check_threshold(threshold, what: str = "threshold") -> float:
    """A probability threshold in [0, 1] (``find_instances(threshold=)``, ``instances --threshold`` and
    ``--reference-threshold``); an :class:`~medexplain.errors.OptionError` otherwise (also for NaN)."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise OptionError(f"{what} is a probability in [0, 1], got {threshold!r}") from None
    if not 0 <= t <= 1:
        raise OptionError(f"{what} is a probability in [0, 1], got {threshold!r}")
    return t


def _values_found(a: np.ndarray) -> str:
    u = np.unique(a)
    shown = ", ".join(f"{v:.4g}" for v in u[:5]) + (", ..." if len(u) > 5 else "")
    return f"{len(u)} distinct values from {float(u[0]):.4g} to {float(u[-1]):.4g} ({shown})"


def reference_foreground(a, threshold: float | None = None, what: str = "the reference mask", *,
                         soft_threshold: float | None = None) -> np.ndarray:
    """The foreground of a ground-truth mask, which must be a **label map**: boolean, or integer values
    ``>= 0`` in any dtype (a NIfTI label map is often stored as float), every non-zero label inside; or, with
    ``threshold``, a probability map in [0, 1] (inside where ``> threshold``). Anything else, such as an
    intensity scan (negative or fractional values outside [0, 1], or more than :data:`MAX_LABELS` distinct
    integer values), is an :class:`~medexplain.errors.InputError` stating the values found (issue 27: an
    intensity scan used to be thresholded at 0 without a word). ``soft_threshold`` (the API's soft
    references, see :func:`find_instances`): fractional values within [0, 1] are read at this threshold
    instead of being refused."""
    a = _as_numpy(a, what)
    if a.dtype == bool:
        return a
    how = ("give a label map (integer or binary values), or a probability map in [0, 1] with --reference-threshold "
           "T (reference_threshold= in Python)")
    if threshold is not None:
        t = check_threshold(threshold, "the reference threshold")
        if a.min() < 0 or a.max() > 1:
            raise InputError(f"{what} is not a probability map in [0, 1] (for --reference-threshold): it holds "
                             f"{_values_found(a)}")
        return a > t
    integral = bool(np.all(a == np.round(a))) and a.min() >= 0
    if integral:
        n_labels = len(np.unique(a[a > 0]))
        if n_labels > MAX_LABELS:
            raise InputError(f"{what} is not a label map: it holds {_values_found(a)} ({n_labels} non-zero labels, "
                             f"more than {MAX_LABELS}: an image, not a segmentation); {how}")
        return a > 0
    if soft_threshold is not None and a.min() >= 0 and a.max() <= 1:
        return a > soft_threshold
    raise InputError(f"{what} is not a label map: it holds {_values_found(a)}; {how}")


def _binarise_reference(a: np.ndarray, threshold: float, rules: str, reference_threshold: float | None) -> np.ndarray:
    """The ground truth's foreground (:func:`reference_foreground`: a label map, or a probability map with
    ``reference_threshold``; fractional values in [0, 1] without it are a soft reference read like the
    prediction, at ``threshold``), or ``>= 1.0`` whatever the dtype (``"reference"``: the IES code's
    ``binarize_mask(gt, 1.)``; a label map keeps every label >= 1)."""
    fg = reference_foreground(a, reference_threshold, "reference", soft_threshold=threshold)
    if rules == "reference" and a.dtype != bool and reference_threshold is None:
        return a >= 1
    return fg


def _components(fg: np.ndarray, struct: np.ndarray, min_size: int) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Label map, kept labels (>= min_size voxels, in label order) and all component sizes."""
    lab, n = ndimage.label(fg, structure=struct)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    kept = [i for i in range(1, n + 1) if sizes[i] >= min_size]
    return lab, kept, sizes


def _instance(mask_np: np.ndarray, kind, sample: int, label: int, device) -> Instance:
    idx = np.argwhere(mask_np)
    return Instance(torch.from_numpy(mask_np).to(device), kind, int(mask_np.sum()), sample, label,
                    tuple(float(c) for c in idx.mean(0)))


def find_instances(prob_or_mask=None, threshold: float = 0.5, connectivity=None, min_size: int = 6,
                   reference=None, spatial_dims: int | None = None, *, mask_or_prob=None, rules: str = "medexplain",
                   reference_threshold: float | None = None):
    """Connected-component lesion instances, optionally labelled TP / FP / FN.

    Parameters
    ----------
    prob_or_mask : tensor or array
        A foreground probability (float: voxels ``> threshold`` are foreground), a boolean mask, or an
        integer label map (non-zero is foreground). Shape ``(*spatial)`` for one image, or ``(B, *spatial)``
        / ``(B, 1, *spatial)`` for a batch. A 3-D array is read as one volume and a 4-D array with
        ``shape[1] == 1`` as a batch of 2-D maps; pass ``spatial_dims`` to override.
    threshold : float
        Probability threshold in [0, 1] (the reference code uses 0.3 for its U-Net, 0.4 for nnU-Net / Swin
        UNETR); another value is an :class:`~medexplain.errors.OptionError`, as on the command line.
    connectivity : None, int or array
        See :func:`structure`; ``None`` is the reference's ``generate_binary_structure(ndim, 2)``.
    min_size : int
        Components with fewer voxels are dropped (6 = the paper's "more than 5 voxels").
    reference : tensor or array, optional
        Ground-truth mask, same shape as ``prob_or_mask``: a label map (bool, 0/1, integer labels) or a
        probability map (:func:`reference_foreground`; binarised as ``rules`` says). Gives every instance a
        kind and adds the FN instances. Values that are neither (an intensity image) are refused.
    reference_threshold : float, optional
        Read ``reference`` as a probability map in [0, 1], inside where ``> reference_threshold``.
    spatial_dims : int, optional
        2 or 3; needed only to read a 3-D array as a batch of 2-D maps.
    mask_or_prob : keyword alias of ``prob_or_mask`` (the name uses).
    rules : ``"medexplain"`` (default) or ``"reference"``
        The three edge rules of the module docstring's table. ``"reference"`` reproduces the IES code
        (its ``get_lesion_types_masks(pred, gt, "non_zero")`` on ``binarize_mask(gt, 1.)``): a reference
        lesion touched by any thresholded predicted voxel is detected (no FN), also when that voxel's
        component is too small to be an instance; ``p == threshold`` is foreground; the ground truth is
        foreground where ``>= 1.0``. ``"medexplain"`` is the default because its counts add up: every
        reference lesion (>= ``min_size``) is either touched by a reported TP instance or reported as FN,
        never dropped from all three groups by a component too small to be reported itself; its
        probability rule is the ``p > threshold`` the ``threshold`` option states; and a soft or
        resampled ground truth (e.g. a mask interpolated to the model's grid) keeps its partial voxels
        instead of only those exactly 1. For exact 0/1 or label-map references and continuous
        probabilities the two differ only through the first rule.

    Returns
    -------
    For one image a ``list[Instance]``: predicted components in scipy label order (C order of their
    first voxel), then the FN instances. For a batch a ``list`` of ``B`` such lists (``Instance.sample``
    holds the batch index). Masks live on the input's device when it is a tensor.
    """
    if (prob_or_mask is None) == (mask_or_prob is None):
        raise InputError("give the prediction once: find_instances(prob_or_mask) (or mask_or_prob=...)")
    prob_or_mask = prob_or_mask if prob_or_mask is not None else mask_or_prob
    if int(min_size) < 1:
        raise InputError(f"min_size must be >= 1, got {min_size}")
    threshold = check_threshold(threshold)
    if rules not in RULES:
        raise InputError(f"rules must be one of {RULES}, got {rules!r}")
    device = prob_or_mask.device if isinstance(prob_or_mask, torch.Tensor) else "cpu"
    pred, batched = _batched(_as_numpy(prob_or_mask, "prob_or_mask"), spatial_dims, "prob_or_mask")
    struct = structure(pred.ndim - 1, connectivity)
    ref = None
    if reference is not None:
        ref_np = _as_numpy(reference, "reference")
        ref, _ = _batched(ref_np, pred.ndim - 1, "reference")
        if ref.shape != pred.shape:
            raise InputError(f"reference shape {tuple(ref_np.shape)} does not match the prediction's "
                             f"{tuple(np.shape(prob_or_mask))}")
        reference_foreground(ref, reference_threshold, "reference", soft_threshold=threshold)  # before any work
    out = []
    for b in range(pred.shape[0]):
        fg = _binarise(pred[b], threshold, rules)
        lab, kept, _ = _components(fg, struct, int(min_size))
        gt = _binarise_reference(ref[b], threshold, rules, reference_threshold) if ref is not None else None
        items = []
        for i in kept:
            m = lab == i
            kind = None if gt is None else ("TP" if (m & gt).any() else "FP")
            items.append(_instance(m, kind, b, len(items) + 1, device))
        if gt is not None:
            detected = fg if rules == "reference" else np.isin(lab, kept)
            glab, gkept, _ = _components(gt, struct, int(min_size))
            hit = np.zeros(len(gkept), bool)
            touched = np.unique(glab[detected])
            for j, g in enumerate(gkept):
                hit[j] = g in touched
            for j, g in enumerate(gkept):
                if not hit[j]:
                    items.append(_instance(glab == g, "FN", b, len(items) + 1, device))
        out.append(items)
    return out if batched else out[0]


def flatten_instances(instances) -> list[Instance]:
    """A flat list from what :func:`find_instances` returns (a list, or a list of per-sample lists)."""
    if isinstance(instances, Instance):
        return [instances]
    flat = []
    for item in instances:
        if isinstance(item, Instance):
            flat.append(item)
        elif isinstance(item, (list, tuple)):
            flat.extend(flatten_instances(item))
        else:
            raise InputError(f"expected Instance objects (from find_instances), got {type(item).__name__}")
    return flat


def label_map(instances, spatial: tuple[int, ...] | None = None) -> torch.Tensor:
    """An integer map ``(*spatial)`` with instance ``k`` (0-based in the given order) written as ``k + 1``."""
    flat = flatten_instances(instances)
    if not flat and spatial is None:
        raise InputError("no instances and no spatial shape: cannot build a label map")
    shape = tuple(flat[0].mask.shape) if flat else tuple(spatial)
    lab = torch.zeros(shape, dtype=torch.int32, device=flat[0].mask.device if flat else "cpu")
    for k, inst in enumerate(flat):
        lab[inst.mask.to(lab.device)] = k + 1
    return lab
