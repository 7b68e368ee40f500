"""Localisation metrics of CheXlocalize (Saporta et al. 2022) as used by MedicalPatchNet (seed 003).

Every function is N-D (2D and 3D) and works for any label set: maps ``(B, K, *s)`` against masks
``(B, K, *s)`` give per-(case, class) values ``(B, K)``; a single-channel mask ``(B, *s)`` or
``(B, 1, *s)`` gives ``(B,)`` (a multi-channel map is then localised through its channel sum). Excluded
(case, class) pairs are NaN, so means are ``nanmean``s, as in CheXlocalize's pandas code.

* :func:`hit_rate`: the pointing game (``eval.get_hit_rates``).
* :func:`iou`: min-max normalise, binarise (Otsu, a fixed or a per-class tuned threshold), optional
  probability cutoff (``heatmap_to_segmentation_probability_threshold.py``), IoU in TP-only or TP+FP+FN
  mode; :func:`tune_thresholds` picks the per-class threshold on a validation split.
* :func:`bootstrap_ci`: cases resampled jointly across classes (``eval.bootstrap_metric``), 95% percentile
  interval; :func:`summarize` and :func:`write_results` produce CheXlocalize's three CSV files.
"""
from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core import chunks, resize_to
from ..errors import InputError
from ..ops import normalize

__all__ = ["hit_rate", "iou", "binarize", "tune_thresholds", "bootstrap_ci", "BootstrapResult", "summarize",
           "write_results"]

_MODES = ("tp", "tp_fp_fn", "tp_fn")


def _as_maps_masks(maps, masks):
    """Validate and align. Returns (maps (B, K, *s) float on the mask grid, masks (B, K, *s) bool, per_class)."""
    maps, masks = torch.as_tensor(maps), torch.as_tensor(masks)
    if masks.ndim == maps.ndim - 1:      # (B, *s) masks against (B, C, *s) maps
        masks = masks.unsqueeze(1)
    if maps.ndim != masks.ndim or maps.shape[0] != masks.shape[0] or maps.ndim not in (4, 5):
        raise InputError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must be (B, K, *spatial) "
                         "with the same B and 2 or 3 spatial dims")
    per_class = masks.shape[1] > 1
    if per_class and maps.shape[1] != masks.shape[1]:
        raise InputError(f"{masks.shape[1]} mask classes but {maps.shape[1]} map channels: give one map per class")
    if not per_class and maps.shape[1] != 1:
        maps = maps.sum(1, keepdim=True)  # channel maps: localise their sum
    if not torch.is_floating_point(maps):
        maps = maps.float()
    if not torch.isfinite(maps).all():
        raise InputError("maps contain NaN or Inf values")
    maps = resize_to(maps, tuple(masks.shape[2:]))
    return maps, masks.bool(), per_class


def _out(v: torch.Tensor, per_class: bool) -> torch.Tensor:
    return v if per_class else v[:, 0]


TIES = ("first", "any")


def hit_rate(maps, masks, ties: str = "first") -> torch.Tensor:
    """Pointing game per case: resize the map to the mask grid (bilinear/trilinear), take the maximum,
    hit if the mask is 1 there. Returns floats ``(B,)``: 1.0 hit, 0.0 miss, NaN where the mask is empty
    (those cases are excluded from means: use ``torch.nanmean``). With per-class masks ``(B, K, *s)``
    and maps ``(B, K, *s)`` it returns ``(B, K)``.

    ``ties="first"`` (CheXlocalize's protocol): the first maximal voxel in C order, as
    ``np.argmax``, so a constant map points at voxel 0 and a piecewise-constant map (PatchNet's patch
    blocks) at the top-left corner of its best block. ``ties="any"``: hit if *any* voxel where the map
    reaches its maximum lies in the mask, i.e. ``max over the mask == max over the image``; use it to ask
    whether a map peaks on a region when maps are piecewise constant (a constant map then hits every
    non-empty mask, so report it beside the ``"first"`` figure, not instead of it). ``ties`` has this one
    meaning across medexplain (``docs/design.md``).
    """
    if ties not in TIES:
        raise InputError(f"ties must be one of {TIES}, got {ties!r}")
    maps, masks, per_class = _as_maps_masks(maps, masks)
    flat, mflat = maps.flatten(2), masks.flatten(2)
    if ties == "first":
        idx = flat.argmax(2)  # torch.argmax returns the first maximal index
        hit = mflat.gather(2, idx[..., None])[..., 0].to(maps.dtype)
    else:
        peak = flat == flat.amax(2, keepdim=True)
        hit = (peak & mflat).any(2).to(maps.dtype)
    res = torch.where(mflat.any(2), hit, torch.full_like(hit, float("nan")))
    return _out(res, per_class)


def _otsu(norm: torch.Tensor) -> torch.Tensor:
    """skimage's Otsu threshold of each (case, class) map (256 bins, like CheXlocalize's uint8 Otsu)."""
    from skimage.filters import threshold_otsu
    flat = norm.flatten(2).detach().cpu().double().numpy()
    t = np.empty(flat.shape[:2])
    for b in range(flat.shape[0]):
        for k in range(flat.shape[1]):
            v = flat[b, k]
            t[b, k] = v[0] if v.min() == v.max() else threshold_otsu(v)
    return torch.as_tensor(t, dtype=norm.dtype, device=norm.device)


def _cutoff_mask(prob, cutoff, b, k, device) -> torch.Tensor | None:
    """True where a (case, class) keeps its predicted mask (prob >= cutoff)."""
    if prob is None or cutoff is None:
        if (prob is None) != (cutoff is None):
            raise InputError("a probability cutoff needs both prob= (B,) or (B, K) and cutoff=")
        return None
    p = torch.as_tensor(prob, dtype=torch.float64, device=device)
    p = p.view(b, 1) if p.ndim == 1 else p
    c = torch.as_tensor(cutoff, dtype=torch.float64, device=device).view(1, -1)
    if p.shape != (b, k) or c.shape[1] not in (1, k):
        raise InputError(f"prob must be (B,) or (B, K) = ({b}, {k}) and cutoff a float or {k} floats")
    return p >= c


def binarize(maps, threshold="otsu", spatial=None) -> torch.Tensor:
    """Min-max normalise each (case, class) map and binarise it: ``norm > t``.

    ``threshold``: ``"otsu"`` (per map), a float, or one float per class (a tuned threshold from
    :func:`tune_thresholds`). ``spatial`` resizes the maps first (the mask grid). Returns bool ``(B, K, *s)``.
    """
    maps = torch.as_tensor(maps)
    maps = maps.float() if not torch.is_floating_point(maps) else maps
    if spatial is not None:
        maps = resize_to(maps, tuple(spatial))
    norm = normalize(maps, "minmax", start_dim=2)                       # per (case, class); constant -> 0
    b, k = maps.shape[:2]
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise InputError(f"threshold must be 'otsu', a float or one float per class, got {threshold!r}")
        t = _otsu(norm)
    else:
        t = torch.as_tensor(threshold, dtype=norm.dtype, device=norm.device).flatten()
        if t.numel() not in (1, k):
            raise InputError(f"threshold has {t.numel()} values for {k} classes")
        t = t.view(1, -1).expand(b, k)
    return norm > t.view(b, k, *[1] * (maps.ndim - 2))


def _iou_from_binary(pred: torch.Tensor, gt: torch.Tensor, mode: str) -> torch.Tensor:
    inter = (pred & gt).flatten(2).sum(2).double()
    union = (pred | gt).flatten(2).sum(2).double()
    has_p, has_g = pred.flatten(2).any(2), gt.flatten(2).any(2)
    v = inter / union.clamp_min(1)
    nan = torch.full_like(v, float("nan"))
    if mode == "tp":
        return torch.where(has_p & has_g, v, nan)
    if mode == "tp_fn":
        return torch.where(has_g, v, nan)
    return torch.where(has_p | has_g, v, nan)


def iou(maps, masks, threshold="otsu", prob=None, cutoff=None, mode: str = "tp") -> torch.Tensor:
    """Per-(case, class) IoU of the binarised map with the mask (CheXlocalize ``eval.calculate_iou``).

    The map is resized to the mask grid, min-max normalised and binarised (:func:`binarize`:
    ``threshold="otsu"``, a float, or one per class). With ``prob`` (``(B,)`` or ``(B, K)``, the model's
    probabilities) and ``cutoff`` (float or per class), no mask is predicted where ``prob < cutoff``.
    ``mode``:

    * ``"tp"``: only true positives (both masks non-empty) count; others NaN (CheXlocalize default);
    * ``"tp_fp_fn"``: also false positives (predicted mask, empty truth) and false negatives (no
      predicted mask, non-empty truth), which score 0; both empty (true negatives) are NaN
      (MedicalPatchNet's Table 2);
    * ``"tp_fn"``: CheXlocalize's ``true_pos_only=False`` (NaN iff the truth is empty).

    Returns float64 ``(B, K)`` or ``(B,)`` as :func:`hit_rate`.
    """
    if mode not in _MODES:
        raise InputError(f"mode must be one of {_MODES}, got {mode!r}")
    maps, masks, per_class = _as_maps_masks(maps, masks)
    pred = binarize(maps, threshold)
    keep = _cutoff_mask(prob, cutoff, maps.shape[0], maps.shape[1], maps.device)
    if keep is not None:
        pred = pred & keep.view(*keep.shape, *[1] * (maps.ndim - 2))
    return _out(_iou_from_binary(pred, masks, mode), per_class)


def tune_thresholds(maps, masks, mode: str = "tp_fp_fn", candidates=None, prob=None, cutoff=None,
                    threshold_chunk: int = 16) -> torch.Tensor:
    """One threshold per class maximising the class's mean IoU over a validation split (CheXlocalize;
    MedicalPatchNet tunes one threshold per pathology on the CheXlocalize validation set).

    ``candidates`` default to 0.00, 0.01, ..., 0.99 on the min-max normalised maps (a grid instead of the
    reference's ternary search, which can stop in a local optimum). Ties go to the smallest threshold; a
    class with no scorable case gets NaN. Returns ``(K,)`` (``(1,)`` for single-channel masks).
    ``threshold_chunk`` candidate thresholds are scored together (memory: that many binarised copies).
    """
    if mode not in _MODES:
        raise InputError(f"mode must be one of {_MODES}, got {mode!r}")
    maps, masks, _ = _as_maps_masks(maps, masks)
    cand = torch.as_tensor(np.arange(100) / 100 if candidates is None else candidates, dtype=maps.dtype,
                           device=maps.device).flatten()
    if cand.numel() == 0:
        raise InputError("candidates is empty")
    norm = normalize(maps, "minmax", start_dim=2)
    keep = _cutoff_mask(prob, cutoff, maps.shape[0], maps.shape[1], maps.device)
    mious = []
    if int(threshold_chunk) < 1:
        raise InputError(f"threshold_chunk must be >= 1, got {threshold_chunk}")
    for sl in chunks(cand.numel(), int(threshold_chunk)):
        t = cand[sl].view(-1, 1, 1, *[1] * (maps.ndim - 2))
        pred = norm.unsqueeze(0) > t                                     # (T, B, K, *s)
        if keep is not None:
            pred = pred & keep.view(1, *keep.shape, *[1] * (maps.ndim - 2))
        v = _iou_from_binary(pred.flatten(0, 1), masks.repeat(pred.shape[0], *[1] * (masks.ndim - 1)), mode)
        mious.append(torch.nanmean(v.view(pred.shape[0], -1, v.shape[-1]), 1))  # (T, K)
    m = torch.cat(mious)
    best = torch.nan_to_num(m, nan=-1.0).argmax(0)                       # first maximum = smallest threshold
    out = cand[best].clone()
    out[torch.isnan(m).all(0)] = float("nan")
    return out


@dataclass
class BootstrapResult:
    """Per-class point estimates (nanmean over cases), 95% bounds, and the bootstrap replicates.

    The last entry of every array is the mean over classes (``names[-1] == "mean"``) when there is more
    than one class.
    """

    names: list[str]
    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    bs_mean: np.ndarray
    n_cases: np.ndarray
    replicates: np.ndarray

    def rows(self) -> list[dict]:
        return [{"name": n, "mean": float(m), "lower": float(lo), "upper": float(up), "bs_mean": float(bm),
                 "n_cases": int(c)}
                for n, m, lo, up, bm, c in zip(self.names, self.mean, self.lower, self.upper, self.bs_mean,
                                               self.n_cases)]


def _nanmean(a: np.ndarray, axis) -> np.ndarray:
    cnt = (~np.isnan(a)).sum(axis)
    s = np.nansum(a, axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, s / np.maximum(cnt, 1), np.nan)


def bootstrap_ci(per_case_values, n: int = 1000, seed: int = 0, level: float = 0.95, names=None,
                 method: str = "percentile") -> BootstrapResult:
    """Bootstrap confidence intervals of per-class means (CheXlocalize ``eval.bootstrap_metric``).

    ``per_case_values``: ``(B,)`` or ``(B, K)``, NaN = excluded (e.g. from :func:`hit_rate` or :func:`iou`).
    Each of the ``n`` replicates draws ``B`` cases with replacement (``numpy.random.default_rng(seed)``),
    the same rows for every class (cases resampled jointly), and takes the per-class nanmean; the class
    mean of a replicate is the mean of its class means. The interval is the ``(1-level)/2`` and
    ``(1+level)/2`` percentiles of the replicates (``method="percentile"``, linear interpolation) or
    CheXlocalize's order statistics ``sorted[int(0.025 n) - 1]``, ``sorted[int(0.975 n) - 1]``
    (``method="chexlocalize"``).
    """
    v = torch.as_tensor(per_case_values).detach().cpu().double().numpy() \
        if isinstance(per_case_values, torch.Tensor) else np.asarray(per_case_values, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    if v.ndim != 2 or v.shape[0] == 0:
        raise InputError(f"per_case_values must be (B,) or (B, K) with B >= 1, got shape {v.shape}")
    if n < 1 or not 0 < level < 1:
        raise InputError("n must be >= 1 and 0 < level < 1")
    if method not in ("percentile", "chexlocalize"):
        raise InputError(f"method must be 'percentile' or 'chexlocalize', got {method!r}")
    b, k = v.shape
    names = list(names) if names is not None else ([f"class_{i}" for i in range(k)] if k > 1 else ["value"])
    if len(names) != k:
        raise InputError(f"{len(names)} names for {k} classes")
    idx = np.random.default_rng(seed).integers(0, b, size=(n, b))
    reps = _nanmean(v[idx], 1)                                           # (n, K)
    point = _nanmean(v, 0)
    counts = (~np.isnan(v)).sum(0)
    if k > 1:
        reps = np.concatenate([reps, _nanmean(reps, 1)[:, None]], 1)
        point = np.append(point, _nanmean(point, 0))
        counts = np.append(counts, int((~np.isnan(v)).any(1).sum()))
        names = names + ["mean"]
    alpha = (1 - level) / 2
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)                  # all-NaN classes give NaN bounds
        if method == "percentile":
            lo, up = (np.nanpercentile(reps, 100 * q, axis=0) for q in (alpha, 1 - alpha))
        else:
            srt = np.sort(reps, 0)                                       # NaN sort last, as pandas
            lo, up = srt[max(int(alpha * n) - 1, 0)], srt[max(int((1 - alpha) * n) - 1, 0)]
        bs_mean = _nanmean(reps, 0)
    return BootstrapResult(names, point, np.asarray(lo), np.asarray(up), bs_mean, counts, reps)


def summarize(per_case_values, names=None, n: int = 1000, seed: int = 0, level: float = 0.95) -> list[dict]:
    """Summary rows ``{name, mean, lower, upper, bs_mean, n_cases}`` per class (and their mean)."""
    return bootstrap_ci(per_case_values, n=n, seed=seed, level=level, names=names).rows()


def write_results(per_case_values, out_dir, metric: str, names=None, case_ids=None, n: int = 1000,
                  seed: int = 0, level: float = 0.95) -> BootstrapResult:
    """Write CheXlocalize's three files into ``out_dir``: ``{metric}_results.csv`` (one row per case, one
    column per class, empty = excluded), ``{metric}_bootstrap_results.csv`` (one row per replicate) and
    ``{metric}_summary_results.csv`` (name, lower, mean, upper, bs_mean, n_cases), each atomically
    (:func:`medexplain.io.atomic_path`)."""
    from ..io import atomic_path

    res = bootstrap_ci(per_case_values, n=n, seed=seed, level=level, names=names)
    v = np.asarray(torch.as_tensor(per_case_values).double().cpu().numpy()) \
        if isinstance(per_case_values, torch.Tensor) else np.asarray(per_case_values, dtype=np.float64)
    v = v[:, None] if v.ndim == 1 else v
    k = v.shape[1]
    cls = res.names[:k]
    ids = list(case_ids) if case_ids is not None else [str(i) for i in range(v.shape[0])]
    if len(ids) != v.shape[0]:
        raise InputError(f"{len(ids)} case ids for {v.shape[0]} cases")
    out = Path(out_dir)

    def fmt(x):
        return "" if np.isnan(x) else repr(float(x))

    summary = ["name", "lower", "mean", "upper", "bs_mean", "n_cases"]
    tables = {"results": (["img_id", *cls], [[i, *[fmt(x) for x in row]] for i, row in zip(ids, v)]),
              "bootstrap_results": (res.names, [[fmt(x) for x in row] for row in res.replicates]),
              "summary_results": (summary, [[fmt(r[c]) if isinstance(r[c], float) else r[c] for c in summary]
                                            for r in res.rows()])}
    for name, (header, rows) in tables.items():
        with atomic_path(out / f"{metric}_{name}.csv", suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    return res
