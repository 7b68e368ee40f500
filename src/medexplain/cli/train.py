"""``medexplain train DATA --out DIR [--patch-size P]``: train a MedicalPatchNet or its image-level baseline.

``DATA`` is a planted set name (``chest_xray``, ``shortcut``, ``fundus``; labels planted, not diagnostic)
or a manifest CSV with a ``path`` column (image files, relative to the CSV's folder, read with
:func:`medexplain.io.read_image`), either one integer ``label`` column (single-label, CE) or several 0/1
columns (multi-label, BCE), and optionally ``split`` (``train`` / ``val``). Images are resized to
``--image-size`` and scaled to [0, 1] per image (the paper scales intensities to [0, 1]).

Training is :func:`medexplain.training.train` (AdamW + OneCycle, 5% warm-up, Rich progress) with the
paper's augmentations (:class:`medexplain.augment.PaperAugment`), a checkpoint after every epoch and
the validation AUROC. ``--patch-size`` wraps the backbone in :class:`~medexplain.models.PatchNet`;
without it (or with the image size) the backbone itself is trained: the baseline with the same backbone.
The folder gets ``model.pt`` (state dict), ``config.json`` (what :func:`load_trained` rebuilds the model
from) and ``history.json``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console

from ..errors import FileFormatError, InputError, MedexplainError
from . import app

console = Console(stderr=True)
PLANTED = {"chest_xray": ("chest_xray", {}), "shortcut": ("chest_xray", {"shortcut": True}), "fundus": ("fundus", {})}


def read_manifest(path: Path, image_size: int, seed: int = 0, val_frac: float = 0.2):
    """``((x_train, y_train), (x_val, y_val), class_names, multilabel)`` from a manifest CSV."""
    import torch.nn.functional as F

    from ..io import read_image
    if not path.is_file():
        raise FileFormatError(f"{path}: no such manifest")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "path" not in rows[0]:
        raise FileFormatError(f"{path}: a manifest needs a 'path' column and label column(s)")
    label_cols = [c for c in rows[0] if c not in ("path", "split")]
    if not label_cols:
        raise FileFormatError(f"{path}: no label column")
    multilabel = label_cols != ["label"]
    xs, ys = [], []
    for r in rows:
        img, _ = read_image(path.parent / r["path"])
        if img.ndim != 3:
            raise InputError(f"{r['path']}: training from a manifest takes 2D images, got shape {tuple(img.shape)}")
        img = F.interpolate(img[None], size=(image_size, image_size), mode="bilinear", align_corners=False,
                            antialias=True)[0]
        lo, hi = img.amin(), img.amax()
        xs.append((img - lo) / (hi - lo).clamp_min(1e-12))
        try:
            ys.append([float(r[c]) for c in label_cols] if multilabel else int(r["label"]))
        except ValueError as e:
            raise FileFormatError(f"{path}: bad label in row {r}: {e}") from None
    if len({x.shape[0] for x in xs}) != 1:
        raise InputError(f"{path}: images have different channel counts")
    x = torch.stack(xs)
    y = torch.tensor(ys, dtype=torch.float32 if multilabel else torch.long)
    if "split" in rows[0]:
        val = torch.tensor([r["split"].strip().lower() in ("val", "valid", "validation") for r in rows])
    else:
        g = torch.Generator().manual_seed(seed)
        val = torch.zeros(len(rows), dtype=torch.bool)
        val[torch.randperm(len(rows), generator=g)[:max(1, int(round(val_frac * len(rows))))]] = True
    if val.all() or not val.any():
        raise InputError(f"{path}: need both training and validation rows")
    names = label_cols if multilabel else [str(c) for c in range(int(y.max()) + 1)]
    return (x[~val], y[~val]), (x[val], y[val]), names, multilabel


def build_model(in_channels: int, num_classes: int, patch_size: int | None, image_size: int,
                backbone: str | None = None) -> torch.nn.Module:
    """The backbone (zoo ``classifier_2d`` or ``module:factory(in_channels=, num_classes=)``), wrapped in a
    PatchNet when ``patch_size`` is smaller than the image."""
    if backbone:
        import importlib
        mod, _, attr = backbone.partition(":")
        try:
            net = getattr(importlib.import_module(mod), attr)(in_channels=in_channels, num_classes=num_classes)
        except (ImportError, AttributeError) as e:
            raise InputError(f"--backbone {backbone!r}: {e}") from None
    else:
        from ..models.zoo import classifier_2d
        net = classifier_2d(in_channels, num_classes)
    if patch_size and patch_size < image_size:
        from ..models.patchnet import PatchNet
        net = PatchNet(net, patch_size)
    return net


def load_trained(folder) -> torch.nn.Module:
    """The model a ``medexplain train`` run wrote to ``folder``, in eval mode."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise FileFormatError(f"{folder}: no readable config.json ({e})") from None
    net = build_model(cfg["in_channels"], cfg["num_classes"], cfg["patch_size"], cfg["image_size"], cfg["backbone"])
    net.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    return net.eval()


@app.command("train")
def train_cmd(
    data: str = typer.Argument(..., help="planted set (chest_xray, shortcut, fundus) or a manifest CSV"),
    out: Path = typer.Option(Path("train_out"), "--out", help="folder for model.pt, config.json, history.json"),
    patch_size: Optional[int] = typer.Option(None, help="train a MedicalPatchNet with this patch size"),
    image_size: int = typer.Option(64, help="image side (planted size, or manifest images resized to it)"),
    n: int = typer.Option(1200, help="planted set: number of images"),
    epochs: int = typer.Option(6),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(1e-3, help="OneCycle peak learning rate (the paper: 1e-4 for a pretrained backbone)"),
    loss: Optional[str] = typer.Option(None, help="bce or ce (default: bce for multi-label manifests and planted sets)"),
    augment: bool = typer.Option(True, help="the paper's augmentations (crop 0.5-1, rotation 5 deg, brightness 0.3)"),
    val_frac: float = typer.Option(0.2, help="validation fraction (when the manifest has no split column)"),
    backbone: Optional[str] = typer.Option(None, help="module:factory(in_channels=, num_classes=); default: zoo ResNet"),
    seed: int = typer.Option(0),
):
    """Train from a planted set or a manifest; report the validation AUROC."""
    from ..augment import PaperAugment
    from ..training import evaluate, train
    try:
        if data in PLANTED:
            from .. import data as planted
            fn, kw = PLANTED[data]
            ds = getattr(planted, fn)(n=n, size=image_size, seed=seed, **kw)
            tr, va = ds.split(1 - val_frac)
            train_set, val_set = (tr.images, tr.labels), (va.images, va.labels)
            names, multilabel = ds.meta_info.get("class_names", ["0", "1"]), False
        elif data.lower().endswith(".csv"):
            train_set, val_set, names, multilabel = read_manifest(Path(data), image_size, seed, val_frac)
        else:
            raise InputError(f"DATA must be one of {', '.join(PLANTED)} or a manifest .csv, got {data!r}")
        loss = loss or ("bce" if multilabel or data in PLANTED else "ce")
        if multilabel and loss != "bce":
            raise InputError("a multi-label manifest trains with --loss bce")
        if patch_size is not None and image_size % patch_size:
            raise InputError(f"--patch-size {patch_size} must divide --image-size {image_size}")
        torch.manual_seed(seed)
        net = build_model(train_set[0].shape[1], len(names), patch_size, image_size, backbone)
        out.mkdir(parents=True, exist_ok=True)
        cfg = {"data": data, "in_channels": int(train_set[0].shape[1]), "num_classes": len(names),
               "class_names": names, "patch_size": patch_size, "image_size": image_size, "backbone": backbone,
               "loss": loss, "epochs": epochs, "batch_size": batch_size, "lr": lr, "augment": augment, "seed": seed}
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        kind = f"PatchNet p={patch_size}" if patch_size and patch_size < image_size else "image-level"
        hist = train(net, train_set, val_set, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, loss=loss,
                     augment=PaperAugment(seed=seed) if augment else None, checkpoint=out / "model.pt",
                     description=f"training {kind}")
        final = evaluate(net, val_set)
        (out / "history.json").write_text(json.dumps({**hist, "final": final}, indent=2, default=float))
        Console().print(f"{kind}: validation AUROC {final['auroc']:.3f}, accuracy {final['accuracy']:.3f} "
                        f"({len(val_set[0])} images) -> {out}/model.pt")
    except MedexplainError as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(code=2)
