"""Classifiers trained from a planted set or a labelled manifest into a folder, and read back.

:func:`train_to_folder` is what ``medexplain train`` runs: the data (a planted set of :mod:`medexplain.data`,
labels planted, not diagnostic; or a manifest read by :func:`medexplain.models.training.read_training_manifest`),
the network (:func:`build_model`: a backbone, wrapped in a MedicalPatchNet :class:`~medexplain.models.PatchNet`
when the patch is smaller than the image, else the image-level baseline with the same backbone), training
with :func:`medexplain.models.training.train` (AdamW + OneCycle, the paper's augmentations
:class:`medexplain.data.augment.PaperAugment`, weights after every epoch) and the validation AUROC.

The folder holds ``config.json`` (what :func:`load_trained` rebuilds the network from), ``model.pt`` (the
weights, :func:`medexplain.models.training.save_weights`) and ``history.json``; every file is written atomically.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from medexplain.data.augment import PaperAugment
from medexplain.engine.core import resolve_device
from medexplain.errors import FileFormatError, InputError
from medexplain.io import check_output_dir, write_json
from medexplain.models.patchnet import PatchNet
from medexplain.models.training import TrainingData, evaluate, read_training_manifest, read_weights, save_weights, train
from medexplain.models.zoo import classifier_2d

__all__ = ["PLANTED", "TrainedModel", "build_model", "load_trained", "training_data", "train_to_folder"]

#: Planted sets ``medexplain train`` accepts by name: generator and its options.
PLANTED = {"chest_xray": ("chest_xray", {}), "shortcut": ("chest_xray", {"shortcut": True}), "fundus": ("fundus", {})}


@dataclass
class TrainedModel:
    """What :func:`train_to_folder` returns: the trained network (eval mode), its folder, what it is
    (``kind``: ``"PatchNet p=16"`` or ``"image-level"``), the history and the final validation metrics."""

    model: torch.nn.Module
    folder: Path
    kind: str
    history: dict
    final: dict
    n_val: int


def build_model(in_channels: int, num_classes: int, patch_size: int | None, image_size: int,
                backbone: str | None = None) -> torch.nn.Module:
    """The backbone (zoo :func:`~medexplain.models.zoo.classifier_2d`, or ``module:factory`` called as
    ``factory(in_channels=, num_classes=)``), wrapped in a :class:`~medexplain.models.PatchNet` when
    ``patch_size`` is smaller than ``image_size``."""
    if backbone:
        mod, _, attr = backbone.partition(":")
        try:
            net = getattr(importlib.import_module(mod), attr)(in_channels=in_channels, num_classes=num_classes)
        except (ImportError, AttributeError, ValueError) as e:
            raise InputError(f"backbone {backbone!r}: {e}") from None
    else:
        net = classifier_2d(in_channels, num_classes)
    if patch_size and patch_size < image_size:
        net = PatchNet(net, patch_size)
    return net


def training_data(data: str, image_size: int = 64, n: int = 1200, seed: int = 0, val_frac: float = 0.2) -> TrainingData:
    """A planted set by name (:data:`PLANTED`; ``n`` images of ``image_size`` pixels, stratified split)
    or a manifest ``.csv`` (:func:`medexplain.models.training.read_training_manifest`)."""
    if data in PLANTED:
        from medexplain import data as planted  # here: the generators import SciPy, which the CLI's start need not pay
        fn, kw = PLANTED[data]
        ds = getattr(planted, fn)(n=n, size=image_size, seed=seed, **kw)
        tr, va = ds.split(1 - val_frac)
        return TrainingData((tr.images, tr.labels), (va.images, va.labels),
                            ds.meta_info.get("class_names", ["0", "1"]), False)
    if data.lower().endswith(".csv"):
        return read_training_manifest(Path(data), image_size, seed, val_frac)
    raise InputError(f"DATA must be one of {', '.join(PLANTED)} or a manifest .csv, got {data!r}")


def train_to_folder(data: str, out, *, patch_size: int | None = None, image_size: int = 64, n: int = 1200,
                    epochs: int = 6, batch_size: int = 32, lr: float = 1e-3, loss: str | None = None,
                    augment: bool = True, val_frac: float = 0.2, backbone: str | None = None, seed: int = 0,
                    progress: bool = True, device=None) -> TrainedModel:
    """Train a MedicalPatchNet (``patch_size``) or its image-level baseline on ``data`` and write the
    folder ``out`` (see the module docstring). ``loss`` defaults to ``bce`` for planted sets and
    multi-label manifests, ``ce`` for single-label manifests. ``device``: where it trains (``None``: the CPU,
    ``"auto"``: CUDA when present, ``"cpu"``, ``"cuda[:N]"``; :func:`medexplain.engine.core.resolve_device`); the
    weights are written from the CPU either way. Every check runs before anything is written."""
    if patch_size is not None and (patch_size < 1 or image_size % patch_size):
        raise InputError(f"--patch-size {patch_size} must divide --image-size {image_size}")
    dev = resolve_device(device)   # a device this machine lacks is a typed error before anything is written
    check_output_dir(out)  # before the training (issue 27)
    td = training_data(data, image_size, n, seed, val_frac)
    loss = loss or ("bce" if td.multilabel or data in PLANTED else "ce")
    if td.multilabel and loss != "bce":
        raise InputError("a multi-label manifest trains with --loss bce")
    torch.manual_seed(seed)
    in_channels = int(td.train[0].shape[1])
    net = build_model(in_channels, len(td.class_names), patch_size, image_size, backbone)
    out = Path(out)
    cfg = {"data": data, "in_channels": in_channels, "num_classes": len(td.class_names), "class_names": td.class_names,
           "patch_size": patch_size, "image_size": image_size, "backbone": backbone, "loss": loss, "epochs": epochs,
           "batch_size": batch_size, "lr": lr, "augment": augment, "seed": seed}
    write_json(cfg, out / "config.json")
    kind = f"PatchNet p={patch_size}" if patch_size and patch_size < image_size else "image-level"
    hist = train(net, td.train, td.val, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, loss=loss,
                 augment=PaperAugment(seed=seed) if augment else None, checkpoint=out / "model.pt",
                 description=f"training {kind}", progress=progress, device=dev)
    final = evaluate(net, td.val)
    save_weights(net, out / "model.pt", history=hist, final=final, config=cfg)
    write_json({**hist, "final": final}, out / "history.json")
    return TrainedModel(net, out, kind, hist, final, len(td.val[0]))


def load_trained(folder) -> torch.nn.Module:
    """The model a :func:`train_to_folder` run (``medexplain train``) wrote to ``folder``, in eval mode."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise FileFormatError(f"{folder}: no readable config.json ({e})") from None
    net = build_model(cfg["in_channels"], cfg["num_classes"], cfg["patch_size"], cfg["image_size"], cfg["backbone"])
    net.load_state_dict(read_weights(folder / "model.pt")["state_dict"])
    return net.eval()
