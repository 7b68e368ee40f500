"""Shared mechanics used by every explainer: input checks, the model guard, the layer hook, resizing,
chunking and cost counting. Each exists once here; methods call them instead of re-implementing them."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError, LayerNotFoundError, UnsupportedModelError


def check_input(x, spatial_dims: int | None = None, channels: int | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """Validate an image batch ``(B, C, *spatial)`` with 2 or 3 spatial dims; float, finite; optionally
    the model's spatial dims, channel count and floating dtype."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"input must be a torch.Tensor (B, C, *spatial), got {type(x).__name__}")
    if x.ndim not in (4, 5):
        raise InputError(
            f"input must be (B, C, H, W) or (B, C, D, H, W); got {x.ndim}-D shape {tuple(x.shape)}"
            + (" (add a batch axis with x[None])" if x.ndim in (3,) else ""))
    if spatial_dims is not None and x.ndim - 2 != spatial_dims:
        raise InputError(f"this model expects {spatial_dims} spatial dims; input has {x.ndim - 2}")
    if channels is not None and x.shape[1] != channels:
        raise InputError(f"channel mismatch: the model expects {channels} input channels, the input has {x.shape[1]}")
    if x.numel() == 0:
        raise InputError(f"input is empty: shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise InputError(f"input must be a floating tensor, got {x.dtype}; convert with x.float()")
    if dtype is not None and x.dtype != dtype:
        raise InputError(f"input dtype {x.dtype} does not match the model's {dtype}; convert with x.to({dtype})")
    if not torch.isfinite(x).all():
        raise InputError("input contains NaN or Inf values")
    return x


def model_expectations(model) -> dict:
    """What an eager model's first convolution says about its input: ``channels``, ``spatial_dims`` and
    the parameters' floating ``dtype`` (keys absent when unknown, e.g. TorchScript or an MLP first)."""
    if not isinstance(model, nn.Module) or is_scripted(model):
        return {}
    out = {}
    param = next((p for p in model.parameters() if torch.is_floating_point(p)), None)
    if param is not None:
        out["dtype"] = param.dtype
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            out.update(channels=m.in_channels, spatial_dims=2 if isinstance(m, nn.Conv2d) else 3)
            break
        if isinstance(m, nn.Linear):
            break
    return out


def model_channels(model: nn.Module) -> int | None:
    """Input channel count of the model's first convolution, when it has one."""
    return model_expectations(model).get("channels")


def is_scripted(model) -> bool:
    return isinstance(model, torch.jit.ScriptModule)


@contextlib.contextmanager
def model_guard(model: nn.Module, eval_mode: bool = True):
    """Run explanations with the model in eval mode and its parameters frozen; restore everything after.

    Freezing parameters (``requires_grad=False``) means autograd never computes weight gradients: we only
    differentiate w.r.t. inputs or activations. Every module's ``training`` flag and every parameter's
    ``requires_grad`` are restored, also when the body raises.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if eval_mode:
            model.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        yield model
    finally:
        for m, t in modes:
            m.training = t
        for p, r in grads:
            p.requires_grad_(r)


def find_layer(model: nn.Module, layer) -> nn.Module:
    """A layer given as a module or a dotted name (``"features.7"``, ``"model.1.submodule"``)."""
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise LayerNotFoundError(type(layer).__name__, [])
        return layer
    if not isinstance(layer, str):
        raise LayerNotFoundError(str(layer), [])
    named = dict(model.named_modules())
    if layer not in named:
        raise LayerNotFoundError(layer, [n for n in named if n])
    return named[layer]


def default_cam_layer(model: nn.Module) -> str:
    """The last convolutional layer's name: the usual CAM layer when the user gives none."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            name = n
    if name is None:
        raise LayerNotFoundError("<last conv>", [n for n, _ in model.named_modules() if n])
    return name


def require_hooks(model) -> None:
    """Layer hooks need an eager model; say which methods work on a TorchScript one."""
    if is_scripted(model):
        raise UnsupportedModelError(
            "this method needs a layer hook, which TorchScript models do not provide; use a gradient or "
            "perturbation method (saliency, smoothgrad, integrated_gradients, occlusion) or pass the eager model")


@dataclass
class LayerCapture:
    """What :func:`capture_layer` records: the layer's output (a leaf when ``grad=True``)."""

    activation: torch.Tensor | None = None


@contextlib.contextmanager
def capture_layer(model: nn.Module, layer, grad: bool = False) -> Iterator[LayerCapture]:
    """Record a layer's output with one forward hook, removed on exit (also on error).

    With ``grad=True`` the output is replaced by a detached copy that requires grad, so
    ``torch.autograd.grad(score, cap.activation)`` backpropagates only down to that layer: nothing below
    it is differentiated (Captum's LayerGradCam does the same, MONAI's GradCAM goes to the input). The
    copy is multiplied by one so in-place operations after the layer act on a non-leaf tensor.
    """
    require_hooks(model)
    module = find_layer(model, layer)
    cap = LayerCapture()

    def hook(_mod, _inp, out):
        if not isinstance(out, torch.Tensor):
            raise UnsupportedModelError(f"layer {layer!r} returns {type(out).__name__}, not a tensor; choose another layer")
        if grad:
            leaf = out.detach().requires_grad_(True)
            cap.activation = leaf
            return leaf * 1
        cap.activation = out.detach()
        return None

    handle = module.register_forward_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()


def resize_to(t: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Bilinear (2D) / trilinear (3D) resize of ``(B, C, *s)`` to ``spatial`` (align_corners=False)."""
    if tuple(t.shape[2:]) == tuple(spatial):
        return t
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
    return F.interpolate(t, size=tuple(spatial), mode=mode, align_corners=False)


def chunks(n: int, size: int | None) -> Iterator[slice]:
    """Slices covering ``range(n)`` in pieces of ``size`` (all at once when size is None)."""
    size = n if not size or size <= 0 else size
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@dataclass
class Cost:
    """Counts sample evaluations (rows through the model) and wall time for ``Attribution.info``."""

    n_forward: int = 0
    n_backward: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def info(self, **extra) -> dict:
        return {"n_forward": self.n_forward, "n_backward": self.n_backward,
                "seconds": time.perf_counter() - self.t0, **extra}


def forward(model, x: torch.Tensor, cost: Cost | None = None) -> torch.Tensor:
    """Run the model, count the rows, and check the output is a tensor."""
    out = model(x)
    if cost is not None:
        cost.n_forward += x.shape[0]
    if isinstance(out, (tuple, list)):  # e.g. deep-supervision heads: explain the main output
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise UnsupportedModelError(f"model returned {type(out).__name__}; medexplain needs a tensor (B, K, ...)")
    return out


def input_gradient(model, x: torch.Tensor, target, rows: torch.Tensor, batch: int, cost: Cost) -> torch.Tensor:
    """Gradient of the target scores w.r.t. ``x`` (rows independent in eval mode, so one backward of the sum)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = forward(model, x, cost)
        s = target.scores(out, rows, batch)
        if not s.requires_grad:
            raise UnsupportedModelError("the model output does not depend differentiably on the input; "
                                        "gradient methods cannot run (try occlusion)")
        (g,) = torch.autograd.grad(s.sum(), x)
    cost.n_backward += x.shape[0]
    return g


def normalize(m: torch.Tensor, mode: str = "minmax") -> torch.Tensor:
    """Explicit per-sample normalisation of a map (never applied by default): ``minmax``, ``abs``, ``absmax``."""
    flat = m.flatten(1)
    if mode == "abs":
        return m.abs()
    if mode == "absmax":
        return m / flat.abs().amax(1).clamp_min(1e-12).view(-1, *[1] * (m.ndim - 1))
    if mode == "minmax":
        lo, hi = flat.amin(1), flat.amax(1)
        shape = (-1, *[1] * (m.ndim - 1))
        return (m - lo.view(shape)) / (hi - lo).clamp_min(1e-12).view(shape)
    raise ValueError(f"unknown normalisation {mode!r}")
