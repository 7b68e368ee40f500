"""Model loading from a specification string (what the command line and :func:`medexplain.pipelines.run.run_manifest`
take): a TorchScript file, ``package.module:factory`` (+ a weight file), ``zoo:<task>`` for the
planted-data model zoo, or a folder written by ``medexplain train``."""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from medexplain.engine.core import forward, model_guard, unwrap
from medexplain.errors import MedexplainError, ModelError, ModelLoadError
from medexplain.models import zoo
from medexplain.models.trained import load_trained
from medexplain.models.training import read_weights


def load_model(spec: str, weights: str | None = None, map_location: str = "cpu") -> nn.Module:
    """Load a model. A TorchScript file and a factory's model keep the train/eval modes the file or the factory
    gives them (an author may keep normalisation layers in training mode on purpose): the model object's
    train/eval policy decides how they run (``mx.Model(eval=)``, ``--eval``; ``auto`` switches a model that is
    entirely in training mode, as a fresh factory model is, to eval). The zoo's and ``medexplain train``'s own
    models come in eval mode.

    - ``path/to/model.pt``: a TorchScript file (``torch.jit.save``). CAM methods need hooks, which
      scripted models lack: use an eager model for them.
    - ``package.module:factory``: ``factory()`` builds the eager model; ``weights`` is a weight file
      (a plain state dict, a training checkpoint with the state dict under ``state_dict``, ``model``,
      ``model_state_dict`` or ``network_weights``, ``nn.DataParallel``'s ``module.`` prefix removed, or a
      medexplain weight file: :func:`medexplain.models.training.read_weights`, ``weights_only=True``) loaded strictly;
      a warning says which entry was read. The module is imported as ``python -m`` would (:func:`import_factory`: the current
      folder is on ``sys.path``).
    - ``zoo:<task>``: the trained planted-data model of :mod:`medexplain.models.zoo` (the demo-size model
      ``medexplain demo`` uses; ``zoo:<task>/small`` the smoke-test one, :func:`~medexplain.models.zoo.from_spec`).
    - a folder written by ``medexplain train`` (``config.json`` + ``model.pt``).
    """
    if spec.startswith("zoo:"):
        return zoo.from_spec(spec[4:]).eval()
    path = Path(spec)
    if path.is_dir() and (path / "config.json").exists():
        return load_trained(path)
    if path.exists():
        if weights:
            raise ModelLoadError("--weights is for package.module:factory models; a TorchScript file holds its weights")
        try:
            return torch.jit.load(str(path), map_location=map_location)   # its modes as saved: the policy decides
        except Exception as e:
            raise ModelLoadError(f"{spec}: not a TorchScript file ({type(e).__name__}). Save the model with "
                                 "torch.jit.save, or pass package.module:factory with --weights") from e
    if ":" not in spec:
        raise ModelLoadError(f"{spec!r}: no such file, and not of the form package.module:factory or zoo:<task>")
    factory = import_factory(spec)
    try:
        model = factory()
    except MedexplainError:
        raise
    except Exception as e:
        raise ModelLoadError(f"{spec}: calling the factory raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        blob = read_weights(weights, map_location=map_location)
        state = blob["state_dict"]
        if "weights_key" in blob or "stripped_prefix" in blob:   # say how the file was read
            how = [f"the {blob['weights_key']!r} entry of the checkpoint" + (
                f" (other entries: {', '.join(blob['other_keys'])})" if blob.get("other_keys") else "")
                   if "weights_key" in blob else "the state dict",
                   f"with the DataParallel prefix {blob['stripped_prefix']!r} removed" if "stripped_prefix" in blob else ""]
            warnings.warn(f"--weights {Path(weights).name}: loaded {' '.join(w for w in how if w)}", stacklevel=2)
        try:
            model.load_state_dict(state)
        except Exception as e:
            raise ModelLoadError(f"{weights} does not fit {spec}: {e}") from e
    return model   # the factory's modes: the model object's train/eval policy decides


def import_factory(spec: str):
    """The callable named by ``package.module:attr``, imported as ``python -m`` does: the current folder
    is put on ``sys.path`` (first, when missing), so a ``mynets.py`` next to the user is found without
    ``PYTHONPATH``. A failure says whether the module was not found on ``sys.path`` or was found and
    raised while importing, or lacks the attribute (with close matches)."""
    import difflib

    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ModelLoadError(f"cannot import {spec!r}: expected package.module:factory")
    cwd = os.getcwd()
    if not any(os.path.abspath(p or os.curdir) == cwd for p in sys.path):
        sys.path.insert(0, cwd)
    try:
        found = importlib.util.find_spec(mod_name)
    except (ImportError, ValueError):          # a parent package is missing or raised
        found = None
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if found is None or (e.name and mod_name.startswith(e.name)):
            raise ModelLoadError(f"cannot import {spec!r}: module {e.name or mod_name!r} not found on sys.path "
                                 f"(the current folder {cwd} is searched too); run from the folder that holds it, "
                                 "set PYTHONPATH, or install the package") from e
        raise ModelLoadError(f"cannot import {spec!r}: the module was found ({found.origin}) but raised while "
                             f"importing: ModuleNotFoundError: {e}") from e
    except Exception as e:
        where = f" ({found.origin})" if found is not None and found.origin else ""
        raise ModelLoadError(f"cannot import {spec!r}: the module was found{where} but raised while importing: "
                             f"{type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, names, n=3)
        raise ModelLoadError(f"cannot import {spec!r}: module {mod_name!r} has no attribute {attr!r}"
                             + (f"; did you mean {', '.join(close)}?" if close else ""))
    return getattr(module, attr)


# --------------------------------------------------------------------------------------------------
# the model's own errors, explained. Written by hand: torch and TorchScript report only the failing
# operation; no library says what input a model expects, so it is read from the first weight and
# found by probing zero inputs of padded sizes.
# --------------------------------------------------------------------------------------------------
def first_layer(model) -> dict:
    """What the model's first weight says about its input, for eager and TorchScript models alike: the
    first parameter with 3-5 dims is taken as a convolution kernel ``(out, in, *k)``: ``channels`` (its
    ``in``), ``spatial_dims``; ``dtype`` of the parameters. Keys are absent when unknown."""
    out = {}
    try:
        params = list(unwrap(model).parameters())
    except Exception:
        return out
    floats = [p for p in params if torch.is_floating_point(p)]
    if floats:
        out["dtype"] = floats[0].dtype
    for p in params:
        if p.ndim in (3, 4, 5):
            out.update(channels=int(p.shape[1]), spatial_dims=p.ndim - 2)
            break
        if p.ndim == 2:       # a linear layer first: nothing to say about the grid
            break
    return out


def raised_in_model(err: BaseException, model) -> bool:
    """Whether ``err`` was raised while one of ``model``'s modules was running (its traceback passes
    through a frame whose ``self`` is the model or one of its submodules; TorchScript errors surface in
    the scripted module's own call frame)."""
    try:
        mods = {id(m) for m in unwrap(model).modules()} | {id(model)}
        if isinstance(model, nn.Module):   # every member of an ensemble
            mods |= {id(m) for m in model.modules()}
    except Exception:
        return False
    tb = err.__traceback__
    while tb is not None:
        if id(tb.tb_frame.f_locals.get("self")) in mods:
            return True
        tb = tb.tb_next
    return False


def _message(err: BaseException) -> str:
    """The model's own message in one line: TorchScript's last line (its ``RuntimeError: ...``), else
    the first line."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    if "TorchScript" in str(err):
        return lines[-1]
    return f"{type(err).__name__}: {lines[0]}"


#: Side multiples tried when a forward fails: many encoder-decoders need sides divisible by 2^depth.
PROBE_MULTIPLES = (2, 4, 8, 16, 32, 64)


def probe_multiple(model, x: torch.Tensor, max_factor: float = 16.0) -> tuple[int, tuple[int, ...]] | None:
    """The smallest side multiple ``m`` (of :data:`PROBE_MULTIPLES`) such that a zero input of one
    image, every side padded up to a multiple of ``m`` (and at least ``m``), runs through ``model``;
    ``(m, shape)``, or ``None``. Shapes over ``max_factor`` times the input's voxels (and over 64^3
    voxels) are not tried."""
    spatial = tuple(int(s) for s in x.shape[2:])
    n0 = max(math.prod(spatial), 64 ** len(spatial) / max_factor)
    for m in PROBE_MULTIPLES:
        shape = tuple(max(m, -(-s // m) * m) for s in spatial)
        if shape == spatial:
            continue
        if math.prod(shape) > max_factor * n0:
            break
        try:
            with torch.no_grad(), model_guard(model):
                forward(model, torch.zeros((1, x.shape[1], *shape), dtype=x.dtype, device=x.device))
        except Exception:
            continue
        return m, shape
    return None


def model_error(model, x: torch.Tensor, err: BaseException, probe: bool = True) -> ModelError:
    """A :class:`~medexplain.errors.ModelError` for ``err``, raised by ``model``'s forward on ``x``: the
    input given (shape, dtype, channels), what the model seems to expect (its first layer's channels
    and dims, or the side multiple found by :func:`probe_multiple`), the model's own message, and the
    option that fixes it."""
    spatial = tuple(int(s) for s in x.shape[2:])
    given = (f"input {tuple(x.shape)} ({str(x.dtype).replace('torch.', '')}, {x.shape[1]} channel(s), "
             f"{len(spatial)} spatial dims {spatial})")
    expect = first_layer(model)
    hints = []
    if "channels" in expect and expect["channels"] != x.shape[1]:
        hints.append(f"its first layer takes {expect['channels']} channel(s): give {expect['channels']} channel(s) "
                     "(one file per channel, or a 4D file with that many volumes, or --transform to select them)")
    if "spatial_dims" in expect and expect["spatial_dims"] != len(spatial):
        hints.append(f"its first layer is {expect['spatial_dims']}D: give a {expect['spatial_dims']}D image")
    if "dtype" in expect and expect["dtype"] != x.dtype:
        hints.append(f"its weights are {str(expect['dtype']).replace('torch.', '')}")
    if not hints and probe:
        found = probe_multiple(model, x)
        if found is not None:
            m, shape = found
            hints.append(f"a zero input padded to {shape} (sides divisible by {m}) runs: add --divisible-by {m} "
                         f"(API: medexplain.models.transforms.Preprocessing(divisible_by={m})) or --spatial-size")
        else:
            hints.append("no padding to a side multiple of 2-64 made it run; check the preprocessing the model "
                         "was trained with (--spacing, --orientation, --spatial-size, --transform)")
    kind = "TorchScript model" if isinstance(unwrap(model), torch.jit.ScriptModule) else "model"
    fix = "; ".join(hints)
    return ModelError(f"the {kind} failed on the {given}: {_message(err)}. {fix[:1].upper()}{fix[1:]}")


def checked_forward(model, x: torch.Tensor, output=None) -> torch.Tensor:
    """One forward of ``x`` without gradients, the model guarded (:func:`medexplain.engine.core.model_guard`);
    an exception inside the model becomes :func:`model_error`."""
    try:
        with torch.no_grad(), model_guard(model):
            return forward(model, x, output=output)
    except MedexplainError:
        raise
    except Exception as e:
        if not raised_in_model(e, model):
            raise
        raise model_error(model, x, e) from e
