"""``medexplain train DATA --out DIR [--patch-size P]``: train a MedicalPatchNet or its image-level baseline.

``DATA`` is a planted set name (``chest_xray``, ``shortcut``, ``fundus``; labels planted, not diagnostic)
or a manifest CSV (:func:`medexplain.models.training.read_training_manifest`). The work is
:func:`medexplain.models.trained.train_to_folder`; :func:`medexplain.models.trained.load_trained` reads
the folder back.
"""
from __future__ import annotations

from typing import Literal, Optional

import typer

from medexplain.cli import app
from medexplain.cli._common import cli_errors
from medexplain.cli.params import Flags, takes


@app.command("train")
@takes("out", "seed", "batch_size", "device")
def train_cmd(
    data: str = typer.Argument(..., help="planted set (chest_xray, shortcut, fundus) or a manifest CSV"),
    patch_size: Optional[int] = typer.Option(None, min=1, help="train a MedicalPatchNet with this patch size"),
    image_size: int = typer.Option(64, min=1, help="image side (planted size, or manifest images resized to it)"),
    n: int = typer.Option(1200, min=1, help="planted set: number of images"),
    epochs: int = typer.Option(6, min=1, help="passes over the training images"),
    lr: float = typer.Option(1e-3, min=0, help="OneCycle peak learning rate (the paper: 1e-4 for a pretrained "
                             "backbone)"),
    loss: Optional[Literal["bce", "ce"]] = typer.Option(None, help="default: bce for multi-label manifests and "
                                                        "planted sets"),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="the paper's augmentations (crop 0.5-1, "
                                 "rotation 5 deg, brightness 0.3)"),
    val_frac: float = typer.Option(0.2, min=0, max=1, help="validation fraction (when the manifest has no split "
                                   "column)"),
    backbone: Optional[str] = typer.Option(None, help="module:factory(in_channels=, num_classes=); default: zoo ResNet"),
    flags: Flags = None,
):
    """Train from a planted set or a manifest; report the validation AUROC."""
    from rich.console import Console

    from medexplain.models.trained import train_to_folder

    out = flags.out
    with cli_errors():
        res = train_to_folder(data, out, patch_size=patch_size, image_size=image_size, n=n, epochs=epochs,
                              batch_size=flags.batch_size or 32, lr=lr, loss=loss, augment=augment, val_frac=val_frac,
                              backbone=backbone, seed=flags.seed, device=flags.device)
    Console().print(f"{res.kind}: validation AUROC {res.final['auroc']:.3f}, accuracy {res.final['accuracy']:.3f} "
                    f"({res.n_val} images) -> {out}/model.pt")
