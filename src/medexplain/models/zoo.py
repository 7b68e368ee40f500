"""The planted-data model zoo: small MONAI networks and ``pretrained(task)``, which builds the planted
data set, trains the model with :func:`medexplain.models.training.train` (or loads cached weights) and returns
``(model in eval mode, dataset)``.

Weights are cached under ``$MEDEXPLAIN_CACHE`` (default ``~/.cache/medexplain``) in a file named by a
hash of the full configuration (task, seed, size, data, network and training settings, zoo version),
so a second call with the same configuration does not retrain, and any change retrains. The models are
trained on **planted** evidence (``docs/data.md``): they are demonstration models, not diagnostic ones.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from medexplain.data.augment import channel_dropout, compose, random_flip
from medexplain.errors import InputError, ModelLoadError
from medexplain.models.training import read_weights, save_weights, train

__all__ = ["classifier_2d", "unet_3d", "cam_layer", "pretrained", "from_spec", "model_card", "cache_dir", "config",
           "TASKS"]

# 3: weights in the one format of medexplain.models.training.save_weights; random_flip flips spatial axes (it flipped
# the channel axis and swapped label maps between samples before).
ZOO_VERSION = 3


def classifier_2d(in_channels: int, num_classes: int, widths=(8, 16, 32, 64), global_pool: str = "max") -> nn.Module:
    """A small MONAI ResNet (basic blocks, one per stage) for 2D images of about 32-128 pixels.

    Stride-1 3x3 stem and no max-pool, so a 64x64 input keeps an 8x8 map at ``layer4`` (the CAM layer,
    see :func:`cam_layer`); global pooling (``"max"`` by default, ``"avg"`` MONAI's own) makes it
    size-agnostic. Non-inplace ReLU so forward hooks see unmodified activations.
    """
    from monai.networks.nets import ResNet
    net = ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=list(widths), spatial_dims=2,
                 n_input_channels=in_channels, conv1_t_size=3, conv1_t_stride=1, no_max_pool=True,
                 num_classes=num_classes, act=("relu", {"inplace": False}))
    if global_pool == "max":
        # A small planted blob is one strong local response: global max pooling passes it on undiluted
        # (multiple-instance style); with average pooling the chest task barely learned in 5 epochs.
        net.avgpool = nn.AdaptiveMaxPool2d(1)
    return net


def unet_3d(in_channels: int, out_channels: int, channels=(8, 16, 32), strides=(2, 2), num_res_units: int = 1) -> nn.Module:
    """A small MONAI 3D U-Net (instance norm, PReLU) for ``size``^3 volumes with ``size`` divisible by 4."""
    from monai.networks.nets import UNet
    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, channels=tuple(channels),
                strides=tuple(strides), num_res_units=num_res_units)


def cam_layer(model: nn.Module, x=None) -> str:
    """The layer name to use for Grad-CAM-type methods on a zoo classifier: the last residual stage
    (``layer4``, whose output is the last convolutional feature map before pooling). Other models get the
    CAM family's own default for inputs shaped like ``x`` (:func:`medexplain.methods.cam_layers.default_layer`)."""
    if "layer4" in dict(model.named_modules()):
        return "layer4"
    if x is None:
        raise ValueError("this model has no 'layer4': pass an input x so the default CAM layer can be found from it")
    from medexplain.methods.cam_layers import default_layer
    return default_layer(model, x)


# task -> {size: (data kwargs, train kwargs)}; the data generator and network are fixed per task.
TASKS = {
    "chest_xray": {"data": "chest_xray", "net": ("classifier_2d", {"in_channels": 1, "num_classes": 2}),
                   "small": ({"n": 96, "size": 32}, {"epochs": 2, "batch_size": 32, "lr": 3e-3}),
                   # nodule peak 0.3-0.45 of the intensity range (the generator's default is fainter):
                   # `make demo` reports this model's test accuracy (README: measured values and their spread).
                   "demo": ({"n": 1200, "size": 64, "amplitude": [0.3, 0.45]},
                            {"epochs": 5, "batch_size": 32, "lr": 5e-3})},
    "shortcut": {"data": "chest_xray", "net": ("classifier_2d", {"in_channels": 1, "num_classes": 2}),
                 "small": ({"n": 96, "size": 32, "shortcut": True}, {"epochs": 2, "batch_size": 32, "lr": 3e-3}),
                 "demo": ({"n": 1200, "size": 64, "shortcut": True}, {"epochs": 3, "batch_size": 32, "lr": 5e-3})},
    "fundus": {"data": "fundus", "net": ("classifier_2d", {"in_channels": 3, "num_classes": 2}),
               "small": ({"n": 96, "size": 32}, {"epochs": 2, "batch_size": 32, "lr": 3e-3}),
               "demo": ({"n": 1600, "size": 64}, {"epochs": 5, "batch_size": 32, "lr": 5e-3})},
    "lesions": {"data": "lesion_volumes", "net": ("unet_3d", {"in_channels": 2, "out_channels": 2}),
                "small": ({"n": 6, "size": 16}, {"epochs": 2, "batch_size": 2, "lr": 1e-2}),
                "demo": ({"n": 40, "size": 32}, {"epochs": 30, "batch_size": 4, "lr": 1e-2, "augment": "flip+t1_dropout"})},
    "contrasts": {"data": "contrast_volumes", "net": ("unet_3d", {"in_channels": 4, "out_channels": 2}),
                  "small": ({"n": 6, "size": 16}, {"epochs": 2, "batch_size": 2, "lr": 1e-2, "augment": "channel_dropout"}),
                  "demo": ({"n": 40, "size": 32}, {"epochs": 30, "batch_size": 4, "lr": 1e-2, "augment": "channel_dropout"})},
}
# Augmentations by name (the configuration hashed into the cache file name holds the name). For the lesion
# task only the anatomy channel is dropped: a model that can segment from FLAIR alone leans on FLAIR, where
# the lesions are planted (bench/instances.py).
_AUGMENTS = {"flip": lambda: random_flip, "channel_dropout": lambda: channel_dropout(0.3),
             "flip+t1_dropout": lambda: compose(random_flip, channel_dropout(0.5, channels=(0,)))}


def cache_dir() -> Path:
    """``$MEDEXPLAIN_CACHE`` or ``~/.cache/medexplain``."""
    return Path(os.environ.get("MEDEXPLAIN_CACHE") or Path.home() / ".cache" / "medexplain")


def config(task: str, seed: int = 0, size: str = "small") -> dict:
    """The full configuration ``pretrained`` trains with (its hash names the cached weights)."""
    if task not in TASKS:
        raise InputError(f"unknown zoo task {task!r}; available: {', '.join(TASKS)}")
    if size not in ("small", "demo"):
        raise InputError(f"size must be 'small' or 'demo', got {size!r}")
    t = TASKS[task]
    data_kw, train_kw = t[size]
    return {"zoo_version": ZOO_VERSION, "task": task, "seed": int(seed), "size": size, "data": t["data"],
            "data_kwargs": {**data_kw, "seed": int(seed)}, "net": t["net"][0], "net_kwargs": t["net"][1],
            "train_kwargs": {**train_kw, "seed": int(seed)}, "split": 0.8, "torch": torch.__version__.split("+")[0]}


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def build(cfg: dict) -> tuple[nn.Module, object]:
    """The untrained network and the data set of a configuration."""
    from medexplain import data
    ds = getattr(data, cfg["data"])(**cfg["data_kwargs"])
    torch.manual_seed(cfg["seed"])
    net = {"classifier_2d": classifier_2d, "unet_3d": unet_3d}[cfg["net"]](**cfg["net_kwargs"])
    return net, ds


def pretrained(task: str, seed: int = 0, size: str = "small", *, retrain: bool = False, progress: bool = True,
               cache: str | os.PathLike | None = None) -> tuple[nn.Module, object]:
    """``(model, dataset)`` for a planted task: ``chest_xray``, ``shortcut``, ``fundus`` (2D classifiers),
    ``lesions``, ``contrasts`` (3D U-Nets).

    The model is trained on ``dataset.split(0.8)[0]`` (evaluated on the rest) unless weights for the same
    configuration are cached; ``train, test = dataset.split()`` reproduces the split. ``size="small"``
    trains in seconds (tests), ``"demo"`` is the larger set for the demo and benchmarks. The model comes
    back in eval mode with ``model.zoo_info`` = ``{"config", "path", "cached", "history"}``.
    """
    cfg = config(task, seed, size)
    folder = Path(cache) if cache is not None else cache_dir()
    path = folder / f"{task}-{size}-seed{seed}-{config_hash(cfg)}.pt"
    net, ds = build(cfg)
    ds.meta_info["zoo_task"] = task
    ds.meta_info["train_frac"] = cfg["split"]
    history, cached = None, False
    if path.exists() and not retrain:
        try:
            blob = read_weights(path)
            if "weights_key" in blob:   # a training checkpoint's layout, not the zoo's own file: retrain
                raise KeyError("weights_key")
            net.load_state_dict(blob["state_dict"])
            history, cached = blob.get("history"), True
        except (ModelLoadError, RuntimeError, KeyError):  # corrupt, older or incompatible: retrain, overwrite
            cached = False
    if not cached:
        train_ds, test_ds = ds.split(cfg["split"])
        kw = dict(cfg["train_kwargs"])
        if "augment" in kw:
            kw["augment"] = _AUGMENTS[kw["augment"]]()
        history = train(net, train_ds, test_ds, progress=progress, description=f"training {task} ({size})", **kw)
        save_weights(net, path, history=history, config=cfg)
    net.eval()
    net.zoo_info = {"config": copy.deepcopy(cfg), "path": str(path), "cached": cached, "history": history}
    return net, ds


#: What the command line's ``zoo:<task>`` means: the demo-size model (the one ``medexplain demo`` trains and
#: caches); ``zoo:<task>/small`` is the seconds-to-train smoke-test model, for tests only.
SPEC_SIZE = "demo"


def from_spec(spec: str, *, progress: bool = True) -> nn.Module:
    """The model of a ``zoo:`` specification (without the prefix): ``"chest_xray"`` is the demo model of
    :func:`pretrained` (size ``"demo"``, seed 0: the same cached weights as ``medexplain demo``, trained once
    if missing), ``"chest_xray/small"`` the smoke-test model, ``"chest_xray/demo/seed1"`` another seed. Its
    :func:`model_card` is in ``model.zoo_info["card"]`` (written into ``info.json``)."""
    task, *rest = [p for p in spec.strip().split("/") if p]
    size, seed = SPEC_SIZE, 0
    for part in rest:
        if part in ("small", "demo"):
            size = part
        elif part.startswith("seed") and part[4:].isdigit():
            seed = int(part[4:])
        else:
            raise InputError(f"zoo:{spec}: expected zoo:<task>[/small|/demo][/seedN], e.g. zoo:chest_xray; "
                             f"tasks: {', '.join(TASKS)}")
    model, _ = pretrained(task, seed=seed, size=size, progress=progress)
    model.zoo_info["card"] = model_card(model)
    return model


def model_card(model: nn.Module) -> dict:
    """What ``info.json`` records of a zoo model: task, size, seed, parameter count, its validation accuracy
    (classifiers; Dice for the U-Nets) and AUROC from its training history (the held-out split that
    ``medexplain demo`` also tests on), the weight file and its SHA-256, and what the model is for."""
    zi = model.zoo_info
    cfg, hist = zi["config"], zi.get("history") or {}
    last = {k[4:]: v[-1] for k, v in hist.items() if k.startswith("val_") and isinstance(v, list) and v}
    digest = hashlib.sha256(Path(zi["path"]).read_bytes()).hexdigest() if Path(zi["path"]).exists() else None
    purpose = ("demonstration model trained on planted evidence (medexplain demo's model), not a diagnostic one"
               if cfg["size"] == "demo" else
               "smoke-test model (trains in seconds, for tests only; its accuracy is not meaningful): use "
               f"zoo:{cfg['task']} for the demo model")
    return {"task": cfg["task"], "size": cfg["size"], "seed": cfg["seed"],
            "parameters": sum(p.numel() for p in model.parameters()), "training_images": cfg["data_kwargs"].get("n"),
            "image_size": cfg["data_kwargs"].get("size"), "validation": last, "weights": zi["path"],
            "weights_sha256": digest, "purpose": purpose}
