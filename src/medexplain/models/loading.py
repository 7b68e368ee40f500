"""Model loading from a specification string (what the command line and :func:`medexplain.run.run_manifest`
take): a TorchScript file, ``package.module:factory`` (+ a weight file), ``zoo:<task>`` for the
planted-data model zoo, or a folder written by ``medexplain train``."""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from ..training import read_weights
from . import zoo
from .trained import load_trained


def load_model(spec: str, weights: str | None = None, map_location: str = "cpu") -> nn.Module:
    """Load a model in eval mode.

    - ``path/to/model.pt``: a TorchScript file (``torch.jit.save``). CAM methods need hooks, which
      scripted models lack: use an eager model for them.
    - ``package.module:factory``: ``factory()`` builds the eager model; ``weights`` is a weight file
      (a plain state dict or a medexplain weight file, :func:`medexplain.training.read_weights`) loaded strictly.
    - ``zoo:<task>``: the trained planted-data model of :mod:`medexplain.models.zoo`.
    - a folder written by ``medexplain train`` (``config.json`` + ``model.pt``).
    """
    if spec.startswith("zoo:"):
        model, _ = zoo.pretrained(spec[4:])
        return model.eval()
    path = Path(spec)
    if path.is_dir() and (path / "config.json").exists():
        return load_trained(path)
    if path.exists():
        if weights:
            raise ModelLoadError("--weights is for package.module:factory models; a TorchScript file holds its weights")
        try:
            return torch.jit.load(str(path), map_location=map_location).eval()
        except Exception as e:
            raise ModelLoadError(f"{spec}: not a TorchScript file ({type(e).__name__}). Save the model with "
                                 "torch.jit.save, or pass package.module:factory with --weights") from e
    if ":" not in spec:
        raise ModelLoadError(f"{spec!r}: no such file, and not of the form package.module:factory or zoo:<task>")
    mod_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"cannot import {spec!r}: {e}") from e
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        state = read_weights(weights, map_location=map_location)["state_dict"]
        try:
            model.load_state_dict(state)
        except Exception as e:
            raise ModelLoadError(f"{weights} does not fit {spec}: {e}") from e
    return model.eval()
