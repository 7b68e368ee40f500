"""``medexplain evaluate --maps DIR --masks DIR [--out DIR]``: CheXlocalize-style localisation evaluation.

Files are paired by their path relative to the two folders, without the extension: ``masks/nodule/case7.png``
goes with ``maps/nodule/case7.npy``. The first folder level is the class (any label set); files directly in
the folder form one class, ``all``. Maps are ``(*spatial)`` or ``(C, *spatial)`` (channels summed) in any
grid (resized to the mask's, bilinear / trilinear); masks are non-zero where the finding is, and an empty
mask marks a negative (needed for the TP+FP+FN mIoU). Formats: .npy / .npz (read with NumPy, with or
without a channel axis) and everything :func:`medexplain.io.read_image` reads (.nii.gz, .png, .dcm).

Writes, like CheXlocalize's ``eval.py``: ``{metric}_results.csv`` (a row per case, a column per class),
``{metric}_bootstrap_results.csv`` (a row per replicate) and ``{metric}_summary_results.csv`` (mean and
95% bootstrap interval per class and over classes), for ``hitrate`` and ``miou_<mode>``.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from ..errors import FileFormatError, InputError, MedexplainError
from . import app

console = Console(stderr=True)
SUFFIXES = (".nii.gz", ".nii", ".npy", ".npz", ".png", ".jpg", ".jpeg", ".dcm")


def _stem(path: Path) -> str:
    name = path.name
    for s in SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return path.stem


def index_folder(root: Path) -> dict[tuple[str, str], Path]:
    """``{(class, case): path}`` for every supported file under ``root`` (class = first folder level)."""
    if not root.is_dir():
        raise FileFormatError(f"{root}: not a folder")
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or not p.name.lower().endswith(SUFFIXES):
            continue
        rel = p.relative_to(root)
        cls = rel.parts[0] if len(rel.parts) > 1 else "all"
        case = "/".join([*rel.parts[1:-1], _stem(p)]) if len(rel.parts) > 1 else _stem(p)
        if (cls, case) in out:
            raise FileFormatError(f"two files for case {case!r} of class {cls!r}: {out[(cls, case)]} and {p}")
        out[(cls, case)] = p
    return out


def load_array(path: Path) -> torch.Tensor:
    """A map or mask as a float tensor, without assumptions on a channel axis for NumPy files."""
    name = path.name.lower()
    if name.endswith((".npy", ".npz")):
        try:
            data = np.load(path, allow_pickle=False)
            arr = data[list(data.keys())[0]] if isinstance(data, np.lib.npyio.NpzFile) else data
        except Exception as e:
            raise FileFormatError(f"{path}: cannot read: {type(e).__name__}: {e}") from e
        return torch.as_tensor(np.asarray(arr, dtype=np.float64))
    from ..io import read_image
    return read_image(path)[0].double()


def pair(map_arr: torch.Tensor, mask_arr: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(map (1, C, *s), mask (1, *s) bool). The mask decides the spatial rank (a leading 1 is a channel)."""
    m = mask_arr
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim == 3 and m.shape[0] in (3, 4) and map_arr.ndim == 2:   # RGB(A) PNG mask of a 2D map
        m = m.amax(0)
    if m.ndim not in (2, 3):
        raise InputError(f"{where}: mask has shape {tuple(mask_arr.shape)}; expected (*spatial) with 2 or 3 dims")
    n = m.ndim
    a = map_arr
    if a.ndim == n:
        a = a[None]
    if a.ndim != n + 1:
        raise InputError(f"{where}: map shape {tuple(map_arr.shape)} does not fit a {n}D mask {tuple(m.shape)}")
    return a[None], (m > 0)[None]


def evaluate_folders(maps_dir: Path, masks_dir: Path, metrics=("hitrate", "miou"), mode: str = "tp_fp_fn",
                     threshold="otsu", probs: dict | None = None, cutoff: float | None = None, ties: str = "first"):
    """Per-case tables ``{metric: (case_ids, class_names, values (cases, classes) with NaN)}``."""
    from ..metrics.localisation import hit_rate, iou
    masks = index_folder(masks_dir)
    maps = index_folder(maps_dir)
    if not masks:
        raise FileFormatError(f"{masks_dir}: no mask files ({', '.join(SUFFIXES)})")
    missing = [f"{c}/{k}" for c, k in masks if (c, k) not in maps]
    if missing:
        raise FileFormatError(f"{len(missing)} mask(s) without a map in {maps_dir}, e.g. {', '.join(missing[:5])}")
    extra = len(set(maps) - set(masks))
    if extra:
        console.print(f"[yellow]note:[/] {extra} map(s) have no mask and are ignored")
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
    return cases, classes, tables


def tune_folder_thresholds(maps_dir: Path, masks_dir: Path, mode: str) -> dict[str, float]:
    """Per-class threshold maximising mean IoU on a validation folder pair (masks of one size per class)."""
    from ..core import resize_to
    from ..metrics.localisation import tune_thresholds
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


def read_probs(path: Path) -> dict:
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


@app.command("evaluate")
def evaluate(
    maps: Path = typer.Option(..., "--maps", help="folder of saliency maps (class/case.ext or case.ext)"),
    masks: Path = typer.Option(..., "--masks", help="folder of ground-truth masks, same layout"),
    out: Path = typer.Option(Path("eval_out"), "--out", help="where the CSV files go"),
    metric: str = typer.Option("all", help="hitrate, miou or all"),
    mode: str = typer.Option("tp_fp_fn", help="mIoU mode: tp (CheXlocalize), tp_fp_fn (MedicalPatchNet) or tp_fn"),
    threshold: str = typer.Option("otsu", help="otsu, a float on the min-max normalised map, or 'tuned'"),
    val_maps: Optional[Path] = typer.Option(None, help="validation maps for --threshold tuned"),
    val_masks: Optional[Path] = typer.Option(None, help="validation masks for --threshold tuned"),
    probs: Optional[Path] = typer.Option(None, help="CSV img_id,<class>... of model probabilities (for --cutoff)"),
    cutoff: Optional[float] = typer.Option(None, help="no predicted mask where the probability is below this"),
    n_boot: int = typer.Option(1000, help="bootstrap replicates"),
    seed: int = typer.Option(0, help="bootstrap seed"),
    ties: str = typer.Option("first", help="hit rate ties: first (CheXlocalize's first maximum) or any (some "
                                           "maximal pixel in the mask; for piecewise-constant maps)"),
):
    """Hit rate and mIoU with 95% bootstrap intervals, written as CheXlocalize's three CSV files per metric."""
    from ..metrics.localisation import TIES, write_results
    try:
        if metric not in ("hitrate", "miou", "all"):
            raise InputError(f"--metric must be hitrate, miou or all, got {metric!r}")
        if ties not in TIES:  # before any file is read
            raise InputError(f"--ties must be one of {', '.join(TIES)}, got {ties!r}")
        if (probs is None) != (cutoff is None):
            raise InputError("--probs and --cutoff go together")
        metrics = ("hitrate", "miou") if metric == "all" else (metric,)
        thr = threshold
        if threshold == "tuned":
            if val_maps is None or val_masks is None:
                raise InputError("--threshold tuned needs --val-maps and --val-masks (a validation split)")
            thr = tune_folder_thresholds(val_maps, val_masks, mode)
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "tuning_results.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["threshold", "task"])
                for cls, t in thr.items():
                    w.writerow([t, cls])
        elif threshold != "otsu":
            try:
                thr = float(threshold)
            except ValueError:
                raise InputError(f"--threshold must be otsu, tuned or a float, got {threshold!r}") from None
        cases, classes, tables = evaluate_folders(maps, masks, metrics, mode, thr,
                                                  read_probs(probs) if probs else None, cutoff, ties)
        table = Table(title=f"localisation ({len(cases)} cases, {len(classes)} classes)")
        for col in ("metric", "class", "mean", "95% CI", "n"):
            table.add_column(col)
        for name, values in tables.items():
            fname = name if name == "hitrate" else f"miou_{mode}"
            res = write_results(values, out, fname, names=classes, case_ids=cases, n=n_boot, seed=seed)
            for r in res.rows():
                table.add_row(fname, r["name"], f"{r['mean']:.3f}", f"[{r['lower']:.3f}, {r['upper']:.3f}]",
                              str(r["n_cases"]))
        Console().print(table)
        console.print(f"wrote {out}/")
    except MedexplainError as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(code=2)
