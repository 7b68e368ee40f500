"""Model loading for the CLI: a TorchScript file, ``package.module:factory`` (+ a state-dict file),
or ``zoo:<task>`` for the planted-data model zoo."""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError


def load_model(spec: str, weights: str | None = None, map_location: str = "cpu") -> nn.Module:
    """Load a model in eval mode.

    - ``path/to/model.pt``: a TorchScript file (``torch.jit.save``). CAM methods need hooks, which
      scripted models lack: use an eager model for them.
    - ``package.module:factory``: ``factory()`` builds the eager model; ``weights`` is a state dict
      (or a checkpoint dict with a ``state_dict`` / ``model`` entry) loaded strictly.
    - ``zoo:<task>``: the trained planted-data model of :mod:`medexplain.models.zoo`.
    - a folder written by ``medexplain train`` (``config.json`` + ``model.pt``).
    """
    if spec.startswith("zoo:"):
        from . import zoo
        model, _ = zoo.pretrained(spec[4:])
        return model.eval()
    path = Path(spec)
    if path.is_dir() and (path / "config.json").exists():
        from ..cli.train import load_trained
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
        try:
            state = torch.load(weights, map_location=map_location, weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"{weights}: cannot load weights ({type(e).__name__}: {e})") from e
        if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            state = state.get("state_dict") or state.get("model") or state
        try:
            model.load_state_dict(state)
        except Exception as e:
            raise ModelLoadError(f"{weights} does not fit {spec}: {e}") from e
    return model.eval()
