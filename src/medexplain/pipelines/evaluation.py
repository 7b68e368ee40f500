"""CheXlocalize-style localisation evaluation of a folder of saliency maps against a folder of masks
(Saporta et al. 2022, ``eval.py``), as ``medexplain evaluate`` runs it.

Files are paired by their path relative to the two folders, without the extension
(:func:`medexplain.io.file_stem`): ``masks/nodule/case7.png`` goes with ``maps/nodule/case7.npy``. The
first folder level is the class (any label set); files directly in the folder form one class, ``all``.
Maps are ``(*spatial)`` or ``(C, *spatial)`` (channels summed) in any grid (resized to the mask's,
bilinear / trilinear); masks are non-zero where the finding is, and an empty mask marks a negative
(needed for the TP+FP+FN mIoU). Formats: .npy / .npz (read with NumPy, with or without a channel axis)
and everything :func:`medexplain.io.read_image` reads (.nii.gz, .png, .dcm).

:func:`evaluate_localisation` writes, like CheXlocalize: ``{metric}_results.csv`` (a row per case, a
column per class), ``{metric}_bootstrap_results.csv`` (a row per replicate) and
``{metric}_summary_results.csv`` (mean and 95% bootstrap interval per class and over classes), for
``hitrate`` and ``miou_<mode>``, plus ``tuning_results.csv`` with tuned thresholds; all atomically.

Per-class thresholds and probability cutoffs are read from CSV files in CheXlocalize's layouts:
``tuning_results.csv`` (``threshold,task``, one row per class; what CheXlocalize's threshold tuning and
:func:`evaluate_localisation` write) and ``probability_tuning_results.csv`` (``prob_threshold,mIoU,task``,
several rows per class: the cutoff of largest mIoU is taken, the first on ties, as
CheXlocalize's ``heatmap_to_mask`` does), or a ``cutoff,task`` table; see :func:`read_class_values`.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medexplain.engine.core import resize_to
from medexplain.errors import FileFormatError, InputError
from medexplain.io import IMAGE_SUFFIXES, check_output_dir, file_stem, read_image, write_csv
from medexplain.metrics.localisation import (
    CI_METHODS,
    MEAN_OF,
    OTSU_RULES,
    TIES,
    BootstrapResult,
    hit_rate,
    iou,
    tune_thresholds,
    write_results,
)

__all__ = ["LocalisationEvaluation", "SUFFIXES", "evaluate_folders", "evaluate_localisation", "index_folder",
           "load_array", "pair", "parse_class_values", "read_class_values", "read_probs", "tune_folder_thresholds"]

#: The file types a map or mask folder may hold.
SUFFIXES = tuple(sorted(IMAGE_SUFFIXES, key=len, reverse=True))
METRICS = ("hitrate", "miou")
MIOU_MODES = ("tp", "tp_fp_fn", "tp_fn")


def index_folder(root) -> dict[tuple[str, str], Path]:
    """``{(class, case): path}`` for every supported file under ``root`` (class = first folder level,
    ``all`` for files directly in ``root``; case = the rest of the path without the extension)."""
    root = Path(root)
    if not root.is_dir():
        raise FileFormatError(f"{root}: not a folder")
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or not p.name.lower().endswith(SUFFIXES):
            continue
        rel = p.relative_to(root)
        cls = rel.parts[0] if len(rel.parts) > 1 else "all"
        case = "/".join([*rel.parts[1:-1], file_stem(p)])
        if (cls, case) in out:
            raise FileFormatError(f"two files for case {case!r} of class {cls!r}: {out[(cls, case)]} and {p}")
        out[(cls, case)] = p
    return out


def load_array(path) -> torch.Tensor:
    """A map or mask as a floating tensor in the file's own precision, without assumptions on a channel axis
    for NumPy files: a float32 (or float16) NumPy map stays float32, a float64 one float64, integer and bool
    arrays become float64 (exact); the other formats are read by :func:`medexplain.io.read_image` (float32).
    The precision matters: resizing and Otsu on a near-constant map give different masks in float32 and
    float64, and CheXlocalize and the API compute in the map's own dtype."""
    path = Path(path)
    if path.name.lower().endswith((".npy", ".npz")):
        try:
            data = np.load(path, allow_pickle=False)
            arr = np.asarray(data[list(data.keys())[0]] if isinstance(data, np.lib.npyio.NpzFile) else data)
        except Exception as e:
            raise FileFormatError(f"{path}: cannot read: {type(e).__name__}: {e}") from e
        dtype = np.float64 if arr.dtype == np.float64 or not np.issubdtype(arr.dtype, np.floating) else np.float32
        return torch.as_tensor(np.asarray(arr, dtype=dtype))
    return read_image(path)[0]


def pair(map_arr: torch.Tensor, mask_arr: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(map ``(1, C, *s)``, mask ``(1, *s)`` bool). The mask decides the spatial rank (a leading 1 is a
    channel); an RGB(A) PNG mask of a 2D map is reduced to its channel maximum."""
    m = mask_arr
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim == 3 and m.shape[0] in (3, 4) and map_arr.ndim == 2:
        m = m.amax(0)
    if m.ndim not in (2, 3):
        raise InputError(f"{where}: mask has shape {tuple(mask_arr.shape)}; expected (*spatial) with 2 or 3 dims")
    n = m.ndim
    a = map_arr[None] if map_arr.ndim == n else map_arr
    if a.ndim != n + 1:
        raise InputError(f"{where}: map shape {tuple(map_arr.shape)} does not fit a {n}D mask {tuple(m.shape)}")
    return a[None], (m > 0)[None]


@dataclass
class FolderTables:
    """Per-case values of each metric: ``tables[metric]`` is ``(len(cases), len(classes))`` with NaN
    for (case, class) pairs without a mask; ``unpaired_maps`` counts maps without a mask (ignored)."""

    cases: list[str]
    classes: list[str]
    tables: dict[str, np.ndarray]
    unpaired_maps: int = 0


def evaluate_folders(maps_dir, masks_dir, metrics=METRICS, mode: str = "tp_fp_fn", threshold="otsu",
                     probs: dict | None = None, cutoff=None, ties: str = "first") -> FolderTables:
    """Hit rate (:func:`medexplain.metrics.hit_rate`) and IoU (:func:`medexplain.metrics.iou`) of every
    (class, case) mask against its map. ``threshold``: ``"otsu"`` (CheXlocalize's), ``"otsu_float"``, a
    float, or ``{class: float}``; ``probs`` ``{(class, case): probability}`` with ``cutoff`` (a float or
    ``{class: float}``): no predicted mask where the probability is below it. A class without a
    threshold or cutoff is an error raised before any map is read."""
    masks, maps = index_folder(masks_dir), index_folder(maps_dir)
    if not masks:
        raise FileFormatError(f"{masks_dir}: no mask files ({', '.join(SUFFIXES)})")
    missing = [f"{c}/{k}" for c, k in masks if (c, k) not in maps]
    if missing:
        raise FileFormatError(f"{len(missing)} mask(s) without a map in {maps_dir}, e.g. {', '.join(missing[:5])}")
    classes = sorted({c for c, _ in masks})
    cases = sorted({k for _, k in masks})
    for what, per_class in (("threshold", threshold), ("cutoff", cutoff)):
        if "miou" in metrics and isinstance(per_class, dict) and set(classes) - set(per_class):
            raise InputError(f"no {what} for class(es) {', '.join(sorted(set(classes) - set(per_class)))}; "
                             f"{what}s are given for {', '.join(sorted(per_class)) or 'none'}")
    ci, ki = {c: i for i, c in enumerate(classes)}, {k: i for i, k in enumerate(cases)}
    tables = {m: np.full((len(cases), len(classes)), np.nan) for m in metrics}
    for (cls, case), mpath in masks.items():
        a, m = pair(load_array(maps[(cls, case)]), load_array(mpath), f"{cls}/{case}")
        if "hitrate" in tables:
            tables["hitrate"][ki[case], ci[cls]] = float(hit_rate(a, m, ties=ties)[0])
        if "miou" in tables:
            t = threshold[cls] if isinstance(threshold, dict) else threshold
            p = None if probs is None else [probs.get((cls, case), math.inf)]
            c = None if probs is None else (cutoff[cls] if isinstance(cutoff, dict) else cutoff)
            tables["miou"][ki[case], ci[cls]] = float(iou(a, m, threshold=t, mode=mode, prob=p, cutoff=c)[0])
    return FolderTables(cases, classes, tables, len(set(maps) - set(masks)))


def tune_folder_thresholds(maps_dir, masks_dir, mode: str) -> dict[str, float]:
    """Per-class threshold maximising mean IoU (:func:`medexplain.metrics.tune_thresholds`) on a
    validation folder pair (masks of one size per class)."""
    masks, maps = index_folder(masks_dir), index_folder(maps_dir)
    out = {}
    for cls in sorted({c for c, _ in masks}):
        pairs = [pair(load_array(maps[(c, k)]), load_array(p), f"{c}/{k}") for (c, k), p in masks.items()
                 if c == cls and (c, k) in maps]
        if not pairs:
            raise FileFormatError(f"validation class {cls!r}: no map/mask pairs")
        shapes = {tuple(m.shape[1:]) for _, m in pairs}
        if len(shapes) > 1:
            raise InputError(f"validation class {cls!r}: masks of different sizes {sorted(shapes)}; tuning needs one size")
        (shape,) = shapes
        a = torch.cat([resize_to(x.sum(1, keepdim=True), shape) for x, _ in pairs])
        m = torch.cat([m for _, m in pairs])
        out[cls] = float(tune_thresholds(a, m, mode=mode)[0])
    return out


def read_probs(path) -> dict:
    """``img_id,<class>,...`` CSV (CheXlocalize's layout) -> ``{(class, case): prob}``."""
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            case = row.pop("img_id", None)
            if case is None:
                raise FileFormatError(f"{path}: needs an img_id column and one column per class")
            for cls, v in row.items():
                if v not in ("", None):
                    out[(cls, case)] = float(v)
    return out


@dataclass
class LocalisationEvaluation:
    """What :func:`evaluate_localisation` computed and wrote: ``results`` ``{file metric name:
    BootstrapResult}`` (``hitrate``, ``miou_<mode>``), the per-class ``thresholds`` used (tuned, read from
    a file or given per class; None for Otsu or one float) and ``files``."""

    cases: list[str]
    classes: list[str]
    results: dict[str, BootstrapResult]
    files: list[Path] = field(default_factory=list)
    thresholds: dict[str, float] | None = None
    unpaired_maps: int = 0


#: Column names of a per-class value table: the class column, then the value column of each kind.
_CLASS_COLUMN = "task"
_VALUE_COLUMNS = {"threshold": ("threshold",), "cutoff": ("cutoff", "prob_threshold")}


def read_class_values(path, kind: str = "threshold") -> dict[str, float]:
    """``{class: value}`` from a CSV file in CheXlocalize's layouts (``kind``: ``"threshold"`` or ``"cutoff"``).

    * thresholds: ``threshold,task`` with one row per class (CheXlocalize's ``tuning_results.csv``, and
      the file :func:`evaluate_localisation` writes with ``threshold="tuned"``);
    * cutoffs: ``cutoff,task`` (or ``prob_threshold,task``) with one row per class, or CheXlocalize's
      ``probability_tuning_results.csv`` (``prob_threshold,mIoU,task``, one row per candidate cutoff):
      per class the cutoff of largest mIoU, the first on ties, NaN mIoU skipped (pandas ``idxmax``, as
      CheXlocalize's ``heatmap_to_mask`` reads it).

    Column order does not matter; a class listed twice (outside the mIoU table) is an error.
    """
    path = Path(path)
    if kind not in _VALUE_COLUMNS:
        raise InputError(f"kind must be 'threshold' or 'cutoff', got {kind!r}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FileFormatError(f"{path}: cannot read: {type(e).__name__}: {e}") from e
    column = next((c for c in _VALUE_COLUMNS[kind] if c in header), None)
    if not rows or _CLASS_COLUMN not in header or column is None:
        raise FileFormatError(f"{path}: needs a {_CLASS_COLUMN!r} column and a "
                              f"{' or '.join(map(repr, _VALUE_COLUMNS[kind]))} column with one row per class")

    def number(row, col):
        try:
            return float(row[col])
        except (TypeError, ValueError):
            raise FileFormatError(f"{path}: {col} {row[col]!r} of class {row[_CLASS_COLUMN]!r} is not a number") from None

    out: dict[str, float] = {}
    if kind == "cutoff" and "mIoU" in header:                            # CheXlocalize's tuning table
        best: dict[str, float] = {}
        for row in rows:
            cls, score = row[_CLASS_COLUMN], number(row, "mIoU")
            if not math.isnan(score) and (cls not in best or score > best[cls]):
                best[cls], out[cls] = score, number(row, column)
        return out
    for row in rows:
        cls = row[_CLASS_COLUMN]
        if cls in out:
            raise FileFormatError(f"{path}: class {cls!r} is listed twice")
        out[cls] = number(row, column)
    return out


def parse_class_values(spec: str, what: str) -> dict[str, float]:
    """``"nodule=0.4,marker=0.6"`` -> ``{"nodule": 0.4, "marker": 0.6}`` (``what`` names the option in errors)."""
    out = {}
    for item in (p.strip() for p in spec.split(",")):
        cls, sep, value = item.partition("=")
        try:
            if not sep or not cls.strip():
                raise ValueError
            out[cls.strip()] = float(value)
        except ValueError:
            raise InputError(f"{what}: expected class=value pairs separated by commas, got {item!r}") from None
    return out


def _per_class_option(value, what: str, kind: str, words=()):
    """A float, ``{class: float}``, one of ``words``, ``class=value`` pairs or a CSV file (:func:`read_class_values`)."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if value is None else float(value)
    if isinstance(value, dict):
        try:
            return {str(k): float(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise InputError(f"{what}: a per-class mapping needs numeric values, got {value!r}") from None
    text = str(value)
    if text in words:
        return text
    try:
        return float(text)
    except ValueError:
        pass
    if "=" in text:
        return parse_class_values(text, what)
    if Path(text).is_file():
        return read_class_values(text, kind)
    choices = ", ".join([*words, "a float", "class=value pairs", "a CSV file"])
    raise InputError(f"{what} must be {choices}; got {text!r} (no such file)")


def _threshold(threshold, val_maps, val_masks, mode: str):
    thr = _per_class_option(threshold, "--threshold", "threshold", (*OTSU_RULES, "tuned"))
    if thr == "tuned":
        if val_maps is None or val_masks is None:
            raise InputError("--threshold tuned needs --val-maps and --val-masks (a validation split)")
        return tune_folder_thresholds(val_maps, val_masks, mode)
    return thr


def evaluate_localisation(maps, masks, out, metric: str = "all", mode: str = "tp_fp_fn", threshold="otsu",
                          val_maps=None, val_masks=None, probs=None, cutoff=None, n_boot: int = 1000,
                          seed: int = 0, ties: str = "first", ci: str = "order-statistic",
                          mean_of: str = "bootstrap") -> LocalisationEvaluation:
    """Evaluate the map folder ``maps`` against ``masks`` and write CheXlocalize's CSV files into ``out``.

    ``metric``: ``hitrate``, ``miou`` or ``all``; ``mode``: the mIoU mode (``tp`` CheXlocalize's default
    ``true_pos_only=True``, ``tp_fp_fn`` CheXlocalize's ``true_pos_only=False`` and MedicalPatchNet's
    Table 2, ``tp_fn``); ``threshold``: ``otsu`` (CheXlocalize's uint8 Otsu with filled contours),
    ``otsu_float``, a float on the min-max normalised map, ``{class: float}`` or ``"class=value,..."``, a
    CSV file of per-class thresholds (:func:`read_class_values`: the ``tuning_results.csv`` this
    function writes, or CheXlocalize's), or ``tuned`` (per class on ``val_maps``/``val_masks``;
    ``tuning_results.csv`` is written); ``probs`` (a CSV path, :func:`read_probs`) with ``cutoff`` (a
    float, per class as for ``threshold``, or a CSV file incl. CheXlocalize's
    ``probability_tuning_results.csv``): no predicted mask below the probability; ``n_boot`` bootstrap
    replicates with ``seed``; ``ci``: the interval rule, ``order-statistic`` (CheXlocalize's
    ``compute_cis``) or ``percentile``; ``mean_of``: the summary's ``mean`` column, ``bootstrap`` (the
    mean of the replicates, CheXlocalize's) or ``point`` (nanmean over cases; both are written, as
    ``point`` and ``bs_mean``); ``ties``: hit-rate ties (:data:`medexplain.metrics.localisation.TIES`).
    Options (and threshold / cutoff files) are checked before any map or mask is read.
    """
    if metric not in (*METRICS, "all"):
        raise InputError(f"--metric must be hitrate, miou or all, got {metric!r}")
    if mode not in MIOU_MODES:
        raise InputError(f"--mode must be one of {', '.join(MIOU_MODES)}, got {mode!r}")
    if ties not in TIES:
        raise InputError(f"--ties must be one of {', '.join(TIES)}, got {ties!r}")
    if ci not in CI_METHODS:
        raise InputError(f"--ci must be one of {', '.join(CI_METHODS)}, got {ci!r}")
    if mean_of not in MEAN_OF:
        raise InputError(f"--mean must be one of {', '.join(MEAN_OF)}, got {mean_of!r}")
    if (probs is None) != (cutoff is None):
        raise InputError("--probs and --cutoff go together")
    cut = _per_class_option(cutoff, "--cutoff", "cutoff")
    out = check_output_dir(out)  # before any map is read (issue 27)
    metrics = METRICS if metric == "all" else (metric,)
    thr = _threshold(threshold, val_maps, val_masks, mode)
    files = []
    if isinstance(thr, dict) and str(threshold) == "tuned":
        files.append(write_csv([[t, cls] for cls, t in thr.items()], out / "tuning_results.csv", ["threshold", "task"]))
    ft = evaluate_folders(maps, masks, metrics, mode, thr, read_probs(probs) if probs else None, cut, ties)
    results = {}
    for name, values in ft.tables.items():
        fname = name if name == "hitrate" else f"miou_{mode}"
        results[fname] = write_results(values, out, fname, names=ft.classes, case_ids=ft.cases, n=n_boot, seed=seed,
                                       method=ci, mean_of=mean_of)
        files += [out / f"{fname}_{kind}.csv" for kind in ("results", "bootstrap_results", "summary_results")]
    return LocalisationEvaluation(ft.cases, ft.classes, results, files, thr if isinstance(thr, dict) else None,
                                  ft.unpaired_maps)
