"""Localisation metrics of CheXlocalize (Saporta et al. 2022) as used by MedicalPatchNet (seed 003).

Every function is N-D (2D and 3D) and works for any label set: maps ``(B, K, *s)`` against masks
``(B, K, *s)`` give per-(case, class) values ``(B, K)``; a single-channel mask ``(B, *s)`` or
``(B, 1, *s)`` gives ``(B,)`` (a multi-channel map is then localised through its channel sum). Excluded
(case, class) pairs are NaN, so means are ``nanmean``s, as in CheXlocalize's pandas code.

* :func:`hit_rate`: the pointing game (``eval.get_hit_rates``).
* :func:`iou`: min-max normalise, binarise (:func:`binarize`: CheXlocalize's uint8 Otsu with filled
  contours, a fixed or a per-class tuned threshold), optional probability cutoff
  (``heatmap_to_segmentation.pkl_to_mask``), IoU in TP-only or TP+FP+FN mode (``eval.calculate_iou``);
  :func:`tune_thresholds` picks the per-class threshold on a validation split.
* :func:`bootstrap_ci`: cases resampled jointly across classes (``eval.bootstrap_metric``), 95% interval
  by interpolated percentiles or CheXlocalize's order statistics (``eval.compute_cis``);
  :func:`summarize` and :func:`write_results` produce CheXlocalize's three CSV files.

Where medexplain departs from CheXlocalize's published code, the function says so (and
``docs/patchnet.md``, "Differences from the reference code", lists every difference with its size).
"""
from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medexplain.engine.core import chunks, resize_to
from medexplain.engine.ops import normalize
from medexplain.errors import InputError

__all__ = ["hit_rate", "iou", "binarize", "tune_thresholds", "bootstrap_ci", "BootstrapResult", "summarize",
           "write_results", "OTSU_RULES", "CI_METHODS", "MEAN_OF"]

_MODES = ("tp", "tp_fp_fn", "tp_fn")
#: ``binarize``'s automatic thresholds: CheXlocalize's published rule and medexplain's earlier float variant.
OTSU_RULES = ("otsu", "otsu_float")
#: Bootstrap interval rules (:func:`bootstrap_ci`); ``"chexlocalize"`` is accepted as the former name of
#: ``"order-statistic"``.
CI_METHODS = ("percentile", "order-statistic")
#: What the ``mean`` column of a summary holds: the point estimate or the mean of the bootstrap replicates.
MEAN_OF = ("point", "bootstrap")


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


def _otsu_float(norm: torch.Tensor) -> torch.Tensor:
    """skimage's Otsu threshold of each normalised float (case, class) map (``nbins=256`` equal-width bins
    over the map's range); ``binarize(..., "otsu_float")``. Not CheXlocalize's rule (:func:`_otsu_filled`)."""
    from skimage.filters import threshold_otsu
    flat = norm.flatten(2).detach().cpu().double().numpy()
    t = np.empty(flat.shape[:2])
    for b in range(flat.shape[0]):
        for k in range(flat.shape[1]):
            v = flat[b, k]
            t[b, k] = v[0] if v.min() == v.max() else threshold_otsu(v)
    return torch.as_tensor(t, dtype=norm.dtype, device=norm.device)


def _otsu_filled(maps: torch.Tensor) -> torch.Tensor:
    """CheXlocalize's Otsu segmentation of each (case, class) map, ``(B, K, *s)`` bool.

    The published rule (``heatmap_to_segmentation.cam_to_segmentation``, Saporta et al. 2022): ``u =
    uint8(255 * (m - min) / max(m - min))`` (truncated, in the map's dtype), OpenCV's ``THRESH_OTSU`` on
    ``u`` (keep ``u > t``), then every contour of ``findContours(RETR_TREE)`` with more than one point drawn
    as a filled polygon. Done here with scikit-image and SciPy (OpenCV is not a dependency):

    * ``skimage.filters.threshold_otsu`` on the uint8 map is OpenCV's integer Otsu threshold (256 levels,
      first maximum of the between-class variance), except where that variance ties exactly between two
      thresholds: the pick then depends on rounding, in OpenCV also on whether it runs Intel IPP, so no
      implementation matches every OpenCV build (measured: 1 of 5000 few-level maps against this
      machine's OpenCV, 0 with IPP off; ties need exactly symmetric histograms);
    * filling every contour equals ``scipy.ndimage.binary_fill_holes`` (holes are background regions no
      4-connected path links to the border, as OpenCV's contour hierarchy treats background), and the
      one-point contours the reference skips are exactly the isolated foreground pixels (8-connected
      components of one pixel), which are removed.

    Equal to the OpenCV reference on every case of ``tests/reference_protocols.py`` other than such ties
    (``tests/test_localisation.py`` checks it). 3D maps get the same rules in 3D (cavities filled,
    isolated voxels under 26-connectivity removed); CheXlocalize itself is 2D only. A constant map gives an
    empty mask.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    arr = maps.detach().cpu().numpy()
    out = np.zeros(arr.shape, dtype=bool)
    full = np.ones((3,) * (arr.ndim - 2), dtype=bool)
    for b in range(arr.shape[0]):
        for k in range(arr.shape[1]):
            m = arr[b, k] - arr[b, k].min()
            top = m.max()
            if not top > 0:
                continue                                   # constant map: nothing predicted
            u = (255 * (m / top)).astype(np.uint8)          # np.uint8(255 * mask): truncation, as the reference
            fg = u > threshold_otsu(u)
            fg = ndimage.binary_fill_holes(fg)
            lab, _ = ndimage.label(fg, structure=full)
            out[b, k] = fg & (np.bincount(lab.ravel())[lab] > 1)
    return torch.from_numpy(out).to(maps.device)


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
    """Binarise each (case, class) map as CheXlocalize does (``heatmap_to_segmentation.cam_to_segmentation``).

    ``threshold``:

    * ``"otsu"`` (default): CheXlocalize's published rule, uint8 Otsu plus filled contours
      (:func:`_otsu_filled`: ``u = uint8(255 * minmax(map))``, keep ``u > otsu(u)``, fill holes, drop
      isolated pixels). It is the default because it is the rule of CheXlocalize's published evaluation
      code, with which CheXlocalize's (and MedicalPatchNet's) Otsu figures are computed.
    * ``"otsu_float"``: medexplain's earlier rule, kept to reproduce earlier figures:
      ``norm > threshold_otsu(norm)`` on the min-max normalised float map (256 equal-width bins), no
      filling. It differs from the published rule at the margin (``docs/patchnet.md``, "Differences from
      the reference code", has the measured size).
    * a float, or one float per class (a tuned threshold from :func:`tune_thresholds`): ``norm > t`` on the
      min-max normalised map, exactly CheXlocalize's ``mask > threshold``.

    ``spatial`` resizes the maps first (the mask grid). A constant map gives an empty mask (for ``t >= 0``).
    Returns bool ``(B, K, *s)``.
    """
    maps = torch.as_tensor(maps)
    maps = maps.float() if not torch.is_floating_point(maps) else maps
    if maps.ndim < 3:
        raise InputError(f"maps must be (B, K, *spatial), got shape {tuple(maps.shape)}")
    if not torch.isfinite(maps).all():
        raise InputError("maps contain NaN or Inf values")
    if spatial is not None:
        maps = resize_to(maps, tuple(spatial))
    b, k = maps.shape[:2]
    if isinstance(threshold, str):
        if threshold not in OTSU_RULES:
            raise InputError(f"threshold must be one of {OTSU_RULES}, a float or one float per class, got {threshold!r}")
        if threshold == "otsu":
            return _otsu_filled(maps)
    norm = normalize(maps, "minmax", start_dim=2)                       # per (case, class); constant -> 0
    if isinstance(threshold, str):
        t = _otsu_float(norm)
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
    ``threshold="otsu"`` (CheXlocalize's uint8 Otsu with filled contours), ``"otsu_float"``, a float, or
    one per class). With ``prob`` (``(B,)`` or ``(B, K)``, the model's probabilities) and ``cutoff``
    (float or per class), no mask is predicted where ``prob < cutoff`` (CheXlocalize's
    ``pkl_to_mask`` keeps ``prob >= cutoff``). ``mode``:

    * ``"tp"``: only true positives (both masks non-empty) count; others NaN (CheXlocalize's default,
      ``true_pos_only=True``);
    * ``"tp_fp_fn"``: also false positives (predicted mask, empty truth) and false negatives (no
      predicted mask, non-empty truth), which score 0; both empty (true negatives) are NaN. This is
      CheXlocalize's ``true_pos_only=False`` (NaN iff the union is empty) and MedicalPatchNet's Table 2;
    * ``"tp_fn"``: NaN iff the truth is empty (false positives excluded, false negatives score 0); a
      medexplain mode with no CheXlocalize counterpart.

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
    """Per-class point estimates ``mean`` (nanmean over cases), the bounds ``lower``/``upper``, the mean of
    the replicates ``bs_mean``, the case counts and the bootstrap replicates ``(n, K[+1])``.

    The last entry of every array is the mean over classes (``names[-1] == "mean"``) when there is more
    than one class. ``ci`` is the interval rule used; ``mean_of`` says what the ``mean`` column of
    :meth:`rows` (and of the summary CSV) holds: ``"point"`` (the point estimate, ``self.mean``) or
    ``"bootstrap"`` (the mean of the replicates, ``self.bs_mean``, which is what CheXlocalize's
    ``eval.compute_cis`` reports as ``mean``).
    """

    names: list[str]
    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    bs_mean: np.ndarray
    n_cases: np.ndarray
    replicates: np.ndarray
    ci: str = "percentile"
    mean_of: str = "point"

    @property
    def summary_mean(self) -> np.ndarray:
        """The values of the ``mean`` column: ``mean`` or ``bs_mean`` as ``mean_of`` says."""
        return self.bs_mean if self.mean_of == "bootstrap" else self.mean

    def rows(self) -> list[dict]:
        """One dict per class: ``name``, ``mean`` (as ``mean_of`` says), ``lower``, ``upper``, ``point``,
        ``bs_mean``, ``n_cases``."""
        return [{"name": n, "mean": float(s), "lower": float(lo), "upper": float(up), "point": float(m),
                 "bs_mean": float(bm), "n_cases": int(c)}
                for n, s, m, lo, up, bm, c in zip(self.names, self.summary_mean, self.mean, self.lower, self.upper,
                                                  self.bs_mean, self.n_cases)]


def _check_summary_options(method: str, mean_of: str) -> str:
    """The interval rule's canonical name (``"chexlocalize"`` -> ``"order-statistic"``); typed errors."""
    method = "order-statistic" if method == "chexlocalize" else method
    if method not in CI_METHODS:
        raise InputError(f"the interval method must be one of {', '.join(CI_METHODS)}, got {method!r}")
    if mean_of not in MEAN_OF:
        raise InputError(f"the mean column must be one of {', '.join(MEAN_OF)}, got {mean_of!r}")
    return method


def _nanmean(a: np.ndarray, axis) -> np.ndarray:
    cnt = (~np.isnan(a)).sum(axis)
    s = np.nansum(a, axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, s / np.maximum(cnt, 1), np.nan)


def bootstrap_ci(per_case_values, n: int = 1000, seed: int = 0, level: float = 0.95, names=None,
                 method: str = "percentile", mean_of: str = "point") -> BootstrapResult:
    """Bootstrap confidence intervals of per-class means (CheXlocalize ``eval.bootstrap_metric`` and
    ``eval.compute_cis``).

    ``per_case_values``: ``(B,)`` or ``(B, K)``, NaN = excluded (e.g. from :func:`hit_rate` or :func:`iou`).
    Each of the ``n`` replicates draws ``B`` cases with replacement (``numpy.random.default_rng(seed)``;
    CheXlocalize draws with the legacy ``np.random.choice``, so single replicates differ, not their
    distribution), the same rows for every class (cases resampled jointly), and takes the per-class
    nanmean; the class mean of a replicate is the mean of its class means. The interval (``method``):

    * ``"percentile"``: the ``(1-level)/2`` and ``(1+level)/2`` percentiles of the replicates (linear
      interpolation);
    * ``"order-statistic"`` (CheXlocalize's rule; ``"chexlocalize"`` is its former name): with ``c = 1 -
      level``, the sorted replicates (NaN last, as pandas) at ``int(c/2 n) - 1`` and ``int((1 - c/2) n) - 1``
      (975 and 25 of 1000: ``sorted[24]`` and ``sorted[974]``). Where ``int(c/2 n) = 0`` (``n < 40``)
      CheXlocalize's index -1 picks the largest replicate; here the smallest.

    ``mean_of`` chooses the ``mean`` column of the summary (:class:`BootstrapResult`): ``"point"`` or
    ``"bootstrap"`` (CheXlocalize). Both values are always kept (``mean`` and ``bs_mean``). CheXlocalize
    rounds its summary to 3 decimals; nothing is rounded here.
    """
    method = _check_summary_options(method, mean_of)
    v = torch.as_tensor(per_case_values).detach().cpu().double().numpy() \
        if isinstance(per_case_values, torch.Tensor) else np.asarray(per_case_values, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    if v.ndim != 2 or v.shape[0] == 0:
        raise InputError(f"per_case_values must be (B,) or (B, K) with B >= 1, got shape {v.shape}")
    if n < 1 or not 0 < level < 1:
        raise InputError("n must be >= 1 and 0 < level < 1")
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
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)                  # all-NaN classes give NaN bounds
        if method == "percentile":
            alpha = (1 - level) / 2
            lo, up = (np.nanpercentile(reps, 100 * q, axis=0) for q in (alpha, 1 - alpha))
        else:
            c = round(1 - level, 12)                                     # 0.05 exactly, CheXlocalize's literal
            srt = np.sort(reps, 0)                                       # NaN sort last, as pandas
            lo, up = srt[max(int(c / 2 * n) - 1, 0)], srt[max(int((1 - c / 2) * n) - 1, 0)]
        bs_mean = _nanmean(reps, 0)
    return BootstrapResult(names, point, np.asarray(lo), np.asarray(up), bs_mean, counts, reps, method, mean_of)


def summarize(per_case_values, names=None, n: int = 1000, seed: int = 0, level: float = 0.95,
              method: str = "percentile", mean_of: str = "point") -> list[dict]:
    """Summary rows ``{name, mean, lower, upper, point, bs_mean, n_cases}`` per class (and their mean);
    options as :func:`bootstrap_ci`."""
    return bootstrap_ci(per_case_values, n=n, seed=seed, level=level, names=names, method=method,
                        mean_of=mean_of).rows()


def write_results(per_case_values, out_dir, metric: str, names=None, case_ids=None, n: int = 1000,
                  seed: int = 0, level: float = 0.95, method: str = "order-statistic",
                  mean_of: str = "bootstrap") -> BootstrapResult:
    """Write CheXlocalize's three files into ``out_dir``: ``{metric}_results.csv`` (one row per case, one
    column per class, empty = excluded), ``{metric}_bootstrap_results.csv`` (one row per replicate) and
    ``{metric}_summary_results.csv`` (name, lower, mean, upper, point, bs_mean, n_cases), each atomically
    (:func:`medexplain.io.atomic_path`). The interval ``method`` and the ``mean`` column (``mean_of``)
    default to CheXlocalize's (``eval.compute_cis``: order statistics, mean of the replicates); see
    :func:`bootstrap_ci`."""
    from medexplain.io import atomic_path

    res = bootstrap_ci(per_case_values, n=n, seed=seed, level=level, names=names, method=method, mean_of=mean_of)
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

    summary = ["name", "lower", "mean", "upper", "point", "bs_mean", "n_cases"]
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
