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
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .core import resize_to
from .errors import FileFormatError, InputError
from .io import IMAGE_SUFFIXES, file_stem, read_image, write_csv
from .metrics.localisation import TIES, BootstrapResult, hit_rate, iou, tune_thresholds, write_results

__all__ = ["LocalisationEvaluation", "SUFFIXES", "evaluate_folders", "evaluate_localisation", "index_folder",
           "load_array", "pair", "read_probs", "tune_folder_thresholds"]

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
    """A map or mask as a float64 tensor, without assumptions on a channel axis for NumPy files."""
    path = Path(path)
    if path.name.lower().endswith((".npy", ".npz")):
        try:
            data = np.load(path, allow_pickle=False)
            arr = data[list(data.keys())[0]] if isinstance(data, np.lib.npyio.NpzFile) else data
        except Exception as e:
            raise FileFormatError(f"{path}: cannot read: {type(e).__name__}: {e}") from e
        return torch.as_tensor(np.asarray(arr, dtype=np.float64))
    return read_image(path)[0].double()


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
                     probs: dict | None = None, cutoff: float | None = None, ties: str = "first") -> FolderTables:
    """Hit rate (:func:`medexplain.metrics.hit_rate`) and IoU (:func:`medexplain.metrics.iou`) of every
    (class, case) mask against its map. ``threshold``: ``"otsu"``, a float, or ``{class: float}``
    (tuned); ``probs`` ``{(class, case): probability}`` with ``cutoff``: no predicted mask below it."""
    masks, maps = index_folder(masks_dir), index_folder(maps_dir)
    if not masks:
        raise FileFormatError(f"{masks_dir}: no mask files ({', '.join(SUFFIXES)})")
    missing = [f"{c}/{k}" for c, k in masks if (c, k) not in maps]
    if missing:
        raise FileFormatError(f"{len(missing)} mask(s) without a map in {maps_dir}, e.g. {', '.join(missing[:5])}")
    classes = sorted({c for c, _ in masks})
    cases = sorted({k for _, k in masks})
    ci, ki = {c: i for i, c in enumerate(classes)}, {k: i for i, k in enumerate(cases)}
    tables = {m: np.full((len(cases), len(classes)), np.nan) for m in metrics}
    for (cls, case), mpath in masks.items():
        a, m = pair(load_array(maps[(cls, case)]), load_array(mpath), f"{cls}/{case}")
        if "hitrate" in tables:
            tables["hitrate"][ki[case], ci[cls]] = float(hit_rate(a, m, ties=ties)[0])
        if "miou" in tables:
            t = threshold.get(cls) if isinstance(threshold, dict) else threshold
            if t is None:
                raise InputError(f"no tuned threshold for class {cls!r} (absent from the validation folder)")
            p = None if probs is None else [probs.get((cls, case), math.inf)]
            tables["miou"][ki[case], ci[cls]] = float(iou(a, m, threshold=t, mode=mode, prob=p,
                                                          cutoff=None if probs is None else cutoff)[0])
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
    BootstrapResult}`` (``hitrate``, ``miou_<mode>``), the tuned ``thresholds`` (or None) and ``files``."""

    cases: list[str]
    classes: list[str]
    results: dict[str, BootstrapResult]
    files: list[Path] = field(default_factory=list)
    thresholds: dict[str, float] | None = None
    unpaired_maps: int = 0


def _threshold(threshold: str, val_maps, val_masks, mode: str):
    if threshold == "tuned":
        if val_maps is None or val_masks is None:
            raise InputError("--threshold tuned needs --val-maps and --val-masks (a validation split)")
        return tune_folder_thresholds(val_maps, val_masks, mode)
    if threshold == "otsu":
        return threshold
    try:
        return float(threshold)
    except ValueError:
        raise InputError(f"--threshold must be otsu, tuned or a float, got {threshold!r}") from None


def evaluate_localisation(maps, masks, out, metric: str = "all", mode: str = "tp_fp_fn", threshold="otsu",
                          val_maps=None, val_masks=None, probs=None, cutoff: float | None = None, n_boot: int = 1000,
                          seed: int = 0, ties: str = "first") -> LocalisationEvaluation:
    """Evaluate the map folder ``maps`` against ``masks`` and write CheXlocalize's CSV files into ``out``.

    ``metric``: ``hitrate``, ``miou`` or ``all``; ``mode``: the mIoU mode (``tp`` CheXlocalize,
    ``tp_fp_fn`` MedicalPatchNet, ``tp_fn``); ``threshold``: ``otsu``, a float on the min-max normalised
    map, or ``tuned`` (per class on ``val_maps``/``val_masks``; ``tuning_results.csv`` is written);
    ``probs`` (a CSV path, :func:`read_probs`) with ``cutoff``: no predicted mask below the probability;
    ``n_boot`` bootstrap replicates with ``seed``; ``ties``: hit-rate ties (:data:`medexplain.metrics.localisation.TIES`).
    Options are checked before any file is read.
    """
    if metric not in (*METRICS, "all"):
        raise InputError(f"--metric must be hitrate, miou or all, got {metric!r}")
    if mode not in MIOU_MODES:
        raise InputError(f"--mode must be one of {', '.join(MIOU_MODES)}, got {mode!r}")
    if ties not in TIES:
        raise InputError(f"--ties must be one of {', '.join(TIES)}, got {ties!r}")
    if (probs is None) != (cutoff is None):
        raise InputError("--probs and --cutoff go together")
    out = Path(out)
    metrics = METRICS if metric == "all" else (metric,)
    thr = _threshold(str(threshold), val_maps, val_masks, mode)
    files = []
    if isinstance(thr, dict):
        files.append(write_csv([[t, cls] for cls, t in thr.items()], out / "tuning_results.csv", ["threshold", "task"]))
    ft = evaluate_folders(maps, masks, metrics, mode, thr, read_probs(probs) if probs else None, cutoff, ties)
    results = {}
    for name, values in ft.tables.items():
        fname = name if name == "hitrate" else f"miou_{mode}"
        results[fname] = write_results(values, out, fname, names=ft.classes, case_ids=ft.cases, n=n_boot, seed=seed)
        files += [out / f"{fname}_{kind}.csv" for kind in ("results", "bootstrap_results", "summary_results")]
    return LocalisationEvaluation(ft.cases, ft.classes, results, files, thr if isinstance(thr, dict) else None,
                                  ft.unpaired_maps)
