"""Shared mechanics of every explainer, each written once: input checks, the model guard, the module
families, the layer-capture hook, the model-output adapter, resizing, chunking and cost counting.

Tensor arithmetic shared by methods and metrics (normalisation, total variation, Dice, output
probabilities, SmoothGrad noise) lives in :mod:`medexplain.engine.ops`. ``docs/design.md`` lists what lives where.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from medexplain.errors import InputError, LayerNotFoundError, UnsupportedModelError

#: Module families per role, over every dimensionality (declared once, as Zennit's ``types`` do), so
#: code that looks for "a convolution" or "a norm layer" is N-D by construction.
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
        nn.GroupNorm, nn.LayerNorm)
ACTIVATION = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
              nn.Mish, nn.Hardswish, nn.Softplus)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of the floating tensor ``t`` is finite, from one min/max pass: a NaN propagates to
    both, an infinity is an extreme. A tenth of the time of ``torch.isfinite(t).all()``, which writes a mask
    first (20 ms on a 160^3 volume): a cost of every call."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


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
    if not all_finite(x):
        raise InputError("input contains NaN or Inf values")
    return x


def check_baseline(baseline, x: torch.Tensor, name: str = "baseline"):
    """A reference input (IG's baseline, DeepLIFT's and occlusion's baselines) checked against ``x``: a
    number (returned as a float), or a finite tensor that broadcasts to ``x`` with 1 or ``B`` samples
    (returned in ``x``'s dtype and device). Anything else is an :class:`~medexplain.errors.InputError`."""
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        if baseline != baseline or abs(baseline) == float("inf"):
            raise InputError(f"{name} must be finite, got {baseline}")
        return float(baseline)
    try:
        b = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"{name} must be a number or a tensor broadcastable to the input {tuple(x.shape)}, "
                         f"got {type(baseline).__name__}") from e
    try:
        torch.broadcast_shapes(b.shape, x.shape)
    except RuntimeError as e:
        raise InputError(f"{name} of shape {tuple(b.shape)} does not broadcast to the input {tuple(x.shape)}; "
                         "give a number, one image (1, C, *spatial) or one per sample") from e
    if b.ndim > x.ndim or (b.ndim == x.ndim and b.shape[0] not in (1, x.shape[0])):
        raise InputError(f"{name} has {b.shape[0]} samples for a batch of {x.shape[0]}")
    if not all_finite(b):
        raise InputError(f"{name} contains NaN or Inf values")
    return b


def model_expectations(model) -> dict:
    """What an eager model's first convolution says about its input: ``channels``, ``spatial_dims`` and
    the parameters' floating ``dtype`` (keys absent when unknown, e.g. TorchScript or an MLP first)."""
    model = unwrap(model)
    if not isinstance(model, nn.Module) or is_scripted(model):
        return {}
    out = {}
    param = next((p for p in model.parameters() if torch.is_floating_point(p)), None)
    if param is not None:
        out["dtype"] = param.dtype
    for m in model.modules():
        if isinstance(m, CONV[1:]):
            out.update(channels=m.in_channels, spatial_dims=2 if isinstance(m, nn.Conv2d) else 3)
            break
        if isinstance(m, nn.Linear):
            break
    return out


def model_channels(model: nn.Module) -> int | None:
    """Input channel count of the model's first convolution, when it has one."""
    return model_expectations(model).get("channels")


def is_scripted(model) -> bool:
    return isinstance(unwrap(model), torch.jit.ScriptModule)


def resolve_device(device) -> torch.device | None:
    """``None`` (keep the networks where they are), ``"auto"`` (CUDA when present, else the CPU), ``"cpu"``,
    ``"cuda"``, ``"cuda:N"`` or a ``torch.device``; a typed error for anything else or a missing GPU."""
    if device is None or isinstance(device, torch.device):
        return device
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise InputError(f"device must be auto, cpu, cuda or cuda:N; got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device must be auto, cpu, cuda or cuda:N; got {device!r}")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise InputError(f"device {device!r}: no such CUDA device here ({torch.cuda.device_count()} visible); "
                         "use device='auto' or 'cpu'")
    return dev


#: The train/eval policies of :func:`model_guard` (``mx.Model(eval=...)``).
EVAL_POLICIES = ("auto", "always", "never")


def _uses_batch_statistics(m: nn.Module) -> bool:
    """A normalisation layer that, in training mode, normalises with the statistics of its input (batch or
    instance) and in eval mode with its stored running statistics: switching it to eval changes the output."""
    return isinstance(m, NORM) and m.training and bool(getattr(m, "track_running_stats", False)) \
        and getattr(m, "running_mean", None) is not None


def _user_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of the user's networks: medexplain's own wrappers (an ``mx.Model``, output adapters, a
    sliding window, :class:`Passes` and its list of members) are left out, so their ``training`` flags never
    make an all-eval network look like one in mixed modes."""
    wrappers = {id(m) for m in model.modules() if isinstance(m, (OutputAdapter, Passes))}
    wrappers |= {id(m.networks) for m in model.modules() if isinstance(m, Passes)}
    user = [m for m in model.modules() if id(m) not in wrappers]
    return user or list(model.modules())


@contextlib.contextmanager
def model_guard(model: nn.Module, eval_mode: bool = True, *, policy: str | None = None, notes: dict | None = None):
    """Run explanations with the model's train/eval modes set by ``policy`` and its parameters frozen;
    restore everything after (modes, ``requires_grad`` and buffers), also when the body raises.

    ``policy`` (``None``: the policy of an ``mx.Model`` given as ``model``, ``mx.Model(eval=...)``, else
    ``"auto"``, or ``"never"`` when ``eval_mode=False``):

    - ``"auto"``: a model entirely in training mode is switched to eval (as the peers do; ``notes["eval"]``
      says so); a model whose modules are in *mixed* modes (a network whose author keeps its normalisation
      layers in training mode for per-image statistics) is used exactly as given; a model in eval stays so;
    - ``"always"``: ``model.eval()``; each normalisation layer that thereby switches from batch/instance
      statistics to its stored running statistics is named in a warning (its output changes);
    - ``"never"``: the modes as given.

    Buffers a training-mode layer updates during a forward (``running_mean``/``running_var``,
    ``num_batches_tracked``) are copied before and written back after, so the model is left exactly as
    found. Freezing parameters (``requires_grad=False``) means autograd never computes weight gradients:
    we only differentiate w.r.t. inputs or activations.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    policy = policy or getattr(model, "eval_policy", None) or ("auto" if eval_mode else "never")   # an mx.Model's own
    if policy not in EVAL_POLICIES:
        raise InputError(f"eval must be one of {EVAL_POLICIES}, got {policy!r}")
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    buffers = []
    try:
        user = _user_modules(model)
        flags = {m.training for m in user}
        if policy == "always":
            switching = [n for n, m in model.named_modules() if _uses_batch_statistics(m)]
            if switching:
                warnings.warn(f"eval='always' switches {len(switching)} normalisation layer(s) in training mode from "
                              f"batch/instance statistics to their stored running statistics, which changes the "
                              f"model's output: {', '.join(switching[:8])}{' ...' if len(switching) > 8 else ''} "
                              "(eval='auto' uses a model in mixed modes as given)", stacklevel=3)
            model.eval()
            if notes is not None and True in flags:
                notes["eval"] = "eval='always': the model was switched to eval mode"
        elif policy == "auto" and flags == {True}:
            model.eval()
            if notes is not None:
                notes["eval"] = "the model was entirely in training mode: switched to eval mode (eval='auto')"
        elif notes is not None and flags == {True, False}:
            notes["eval"] = (f"the model's modules are in mixed train/eval modes: used as given (eval={policy!r}); "
                             f"{sum(m.training for m in user)} of {len(user)} in training mode")
        # a training-mode module may update its buffers in a forward (running statistics): keep copies
        buffers = [(b, b.detach().clone()) for m in model.modules() if m.training
                   for b in m.buffers(recurse=False) if b is not None]
        for p, _ in grads:
            p.requires_grad_(False)
        yield model
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)
        for m, t in modes:
            m.training = t
        for p, r in grads:
            p.requires_grad_(r)


def find_layer(model: nn.Module, layer) -> nn.Module:
    """A layer given as a module or a dotted name (``"features.7"``, ``"model.1.submodule"``)."""
    model = unwrap(model)
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


def require_hooks(model) -> None:
    """Layer hooks need an eager model; say which methods work on a TorchScript one."""
    if is_scripted(model):
        raise UnsupportedModelError(
            "this method needs a layer hook, which TorchScript models do not provide; use a gradient or "
            "perturbation method (saliency, smoothgrad, integrated_gradients, occlusion) or pass the eager model")


@dataclass
class LayerCapture:
    """What :func:`capture_layers` records of one layer: every output of one forward, in call order.

    ``mode="detach"`` stores detached **clones** (an in-place op after the layer, e.g. ``ReLU(inplace=True)``,
    cannot alter them); ``"graph"`` stores clones that keep the autograd graph (to train through them);
    ``"leaf"`` replaces the layer's output by a detached copy that requires grad, so a backward stops at
    the layer (:func:`layer_gradient`; a call fed by an earlier call of the same layer, a shared block
    applied twice, is kept on the path instead, so gradients are total derivatives); ``"tap"`` stores
    the output itself, on the autograd path (so the gradient of anything computed downstream can be
    taken with respect to it, and its ``grad_fn`` says how it was computed), and hands the rest of the
    forward a copy (so an in-place op after the layer cannot alter it). ``calls`` counts how often the
    layer ran; ``order`` holds, for each output, its position among all the calls recorded by the same
    :func:`capture_layers` (so the layers of one capture can be put in call order).
    """

    name: str
    outputs: list = field(default_factory=list)
    order: list = field(default_factory=list)
    fed: list = field(default_factory=list)   # mode="leaf": whether each call was fed by an earlier call

    @property
    def calls(self) -> int:
        return len(self.outputs)

    @property
    def activation(self) -> torch.Tensor | None:
        """The output of the layer's single call (``None`` if it did not run); a typed error when the
        layer ran several times in one forward (a shared module: which call is meant is ambiguous)."""
        if not self.outputs:
            return None
        if len(self.outputs) > 1:
            raise UnsupportedModelError(
                f"layer {self.name!r} was called {len(self.outputs)} times in one forward pass (a shared "
                "module); choose a layer that runs once")
        return self.outputs[0]


@contextlib.contextmanager
def capture_layers(model: nn.Module, layers, mode: str = "detach", *, strict: bool = True,
                   edit=None) -> Iterator[dict[str, LayerCapture]]:
    """The one forward-hook utility: record the outputs of ``layers`` (names or modules), removed on exit
    (also on error). Returns ``{name: LayerCapture}`` in the order given; see :class:`LayerCapture`.

    ``strict=False`` skips (does not record) calls that return something other than a tensor instead of
    raising. ``edit(name, output) -> tensor`` replaces what the rest of the forward sees after each
    recorded call (e.g. a channel ablation); it must return a new tensor, not modify its argument."""
    if mode not in ("detach", "graph", "leaf", "tap"):
        raise ValueError(f"capture mode must be 'detach', 'graph', 'leaf' or 'tap', got {mode!r}")
    require_hooks(model)
    layers = [layers] if isinstance(layers, (str, nn.Module)) else list(layers)
    caps: dict[str, LayerCapture] = {}
    handles = []
    seen = [0]  # calls recorded so far, over every captured layer

    def make_hook(cap):
        def hook(_mod, _inp, out):
            if not isinstance(out, torch.Tensor):
                if not strict:
                    return None
                raise UnsupportedModelError(
                    f"layer {cap.name!r} returns {type(out).__name__}, not a tensor; choose another layer")
            cap.order.append(seen[0])
            seen[0] += 1
            new = None
            if mode == "leaf":
                # a later call fed by an earlier one (a shared block applied twice) is kept on the path, so the
                # earlier call's gradient is its total derivative
                fed = out.requires_grad and bool(cap.outputs) and _reaches(out, cap.outputs)
                leaf = out if fed else out.detach().requires_grad_(True)
                cap.outputs.append(leaf)
                cap.fed.append(fed)
                new = leaf * 1  # a non-leaf copy, so in-place ops after the layer leave the leaf intact
            elif mode == "tap":
                cap.outputs.append(out)
                new = out.clone()  # the forward goes on with a copy: in-place ops after the layer leave `out` intact
            else:
                cap.outputs.append(out.clone() if mode == "graph" else out.detach().clone())
            if edit is not None:
                new = edit(cap.name, out if new is None else new)
            return new
        return hook

    try:
        named = dict(unwrap(model).named_modules())             # one lookup for many layers
        names = {id(m): n for n, m in reversed(list(named.items()))}
        if isinstance(model, nn.Module):   # the other members of an ensemble, by their place in the whole model
            names.update({id(m): n for n, m in reversed(list(model.named_modules())) if id(m) not in names})
        for layer in layers:
            if isinstance(layer, str) and layer in named:
                module, name = named[layer], layer
            elif isinstance(layer, nn.Module) and id(layer) in names:
                module, name = layer, names[id(layer)]
            else:
                module = find_layer(model, layer)               # a typed error with close matches
                name = layer if isinstance(layer, str) else _module_name(model, module)
            caps[name] = LayerCapture(name)
            handles.append(module.register_forward_hook(make_hook(caps[name])))
        yield caps
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_layer(model: nn.Module, layer, grad: bool = False) -> Iterator[LayerCapture]:
    """:func:`capture_layers` for one layer: ``grad=True`` is ``mode="leaf"``, else ``"detach"``."""
    with capture_layers(model, [layer], mode="leaf" if grad else "detach") as caps:
        yield next(iter(caps.values()))


def layer_gradient(score: torch.Tensor, cap: LayerCapture) -> torch.Tensor:
    """d score.sum() / d(the captured leaf), with a typed error when the layer does not affect the score
    (instead of autograd's "element 0 of tensors does not require grad")."""
    if cap.activation is None:  # (a typed error when the layer ran several times)
        raise UnsupportedModelError(f"layer {cap.name!r} was not called in the forward pass")
    return layer_gradients(score, cap)[0]


def layer_gradients(score: torch.Tensor, cap: LayerCapture) -> list[torch.Tensor]:
    """d score.sum() / d(each captured leaf), one per call in call order (a call the score does not
    depend on gets zeros), with a typed error when no call affects the score."""
    if not cap.outputs:
        raise UnsupportedModelError(f"layer {cap.name!r} was not called in the forward pass")
    no_effect = UnsupportedModelError(f"the target score does not depend on layer {cap.name!r}; choose a layer "
                                      "on the path from the input to the explained output")
    if not score.requires_grad:
        raise no_effect
    gs = torch.autograd.grad(score.sum(), cap.outputs, allow_unused=True)
    if all(g is None for g in gs):
        raise no_effect
    return [torch.zeros_like(a) if g is None else g for a, g in zip(cap.outputs, gs)]


def _reaches(t: torch.Tensor, leaves) -> bool:
    """Whether the autograd graph of ``t`` reaches one of the tensors ``leaves``."""
    ids, seen, stack = {id(v) for v in leaves}, set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if id(getattr(node, "variable", None)) in ids:
            return True
        stack.extend(f for f, _ in node.next_functions)
    return False


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in unwrap(model).named_modules() if m is module), type(module).__name__)


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


def storage_key(t: torch.Tensor):
    """``(data pointer, bytes)`` of ``t``'s storage, to count each storage once (memory probes)."""
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except Exception:  # a tensor without storage (sparse, functional wrappers): its own size
        return id(t), t.numel() * t.element_size()


@dataclass
class Cost:
    """Counts sample evaluations (rows through the model) and wall time for ``Attribution.info``."""

    n_forward: int = 0
    n_backward: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def info(self, **extra) -> dict:
        return {"n_forward": self.n_forward, "n_backward": self.n_backward,
                "seconds": time.perf_counter() - self.t0, **extra}


#: Notes on how the output was read (a one-key dict taken as its value), collected by :func:`output_notes`.
_NOTES: contextvars.ContextVar[list | None] = contextvars.ContextVar("medexplain_output_notes", default=None)


@contextlib.contextmanager
def output_notes() -> Iterator[list[str]]:
    """Collect, inside the ``with``, the notes :func:`select_output` makes on how it read the model's
    output (each note once), e.g. for ``Attribution.info["output_note"]``."""
    notes: list[str] = []
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)


def _note(text: str) -> None:
    notes = _NOTES.get()
    if notes is not None and text not in notes:
        notes.append(text)


#: The call that explains (and trains) a deep-supervision model which stacks its heads on dim 1 in training
#: mode only (MONAI ``DynUNet``): head 0 in training mode, the one tensor it returns in eval mode.
DEEP_SUPERVISION_HINT = "output=lambda o: o[:, 0] if o.ndim == x.ndim + 1 else o"


def select_output(out, output=None, x_ndim: int | None = None) -> torch.Tensor:
    """The one model-output adapter: the tensor ``(B, K, ...)`` to explain from whatever the model returns.

    ``output``: ``None`` (a tensor as is; a tuple/list, e.g. deep-supervision heads, gives its first
    element, with a warning when there are several; a dict of one entry gives its value, noted for
    ``info`` (:func:`output_notes`); a dict of several is an error listing its keys), an ``int`` (that
    element of a tuple/list, or that head of stacked heads: a tensor with one axis more than the input,
    ``(B, heads, K, *spatial)``, as MONAI ``DynUNet`` returns in training mode; ``x_ndim`` is the input's
    ``ndim``), a ``str`` (that key of a dict) or a callable ``output(out) -> tensor``. An ``int`` on any other
    tensor is a typed error: it would silently pick a class channel (choose classes with the target). For
    a model that stacks heads in training mode only, :data:`DEEP_SUPERVISION_HINT` works in both modes.
    """
    if callable(output):
        out = output(out)
    elif isinstance(output, str):
        if not isinstance(out, dict) or output not in out:
            keys = sorted(out) if isinstance(out, dict) else f"a {type(out).__name__}, not a dict"
            raise UnsupportedModelError(f"output={output!r}: the model returned {keys}")
        out = out[output]
    elif isinstance(output, int) and not isinstance(output, bool):
        out = _select_index(out, output, x_ndim)
    elif output is not None:
        raise UnsupportedModelError(f"output must be None, an int, a str or a callable, got {type(output).__name__}")
    elif isinstance(out, (tuple, list)) and out:
        if len(out) > 1:
            warnings.warn(f"the model returned {len(out)} outputs; explaining the first (choose with output=)",
                          stacklevel=3)
        out = out[0]
    elif isinstance(out, dict):
        if len(out) != 1:
            raise UnsupportedModelError(f"the model returned a dict with keys {sorted(out)}; choose one with output=")
        (key, out), = out.items()
        _note(f"the model returned a dict with the one key {key!r}; its value is explained")
    if not isinstance(out, torch.Tensor):
        raise UnsupportedModelError(f"model returned {type(out).__name__}; medexplain needs a tensor (B, K, ...)")
    return out


def _select_index(out, i: int, x_ndim: int | None):
    """``output=i``: element ``i`` of a tuple/list, or head ``i`` of stacked heads; a typed error otherwise."""
    if isinstance(out, (tuple, list)):
        if not -len(out) <= i < len(out):
            raise UnsupportedModelError(f"output={i} out of range: the model returned {len(out)} output(s) to choose "
                                        "from")
        return out[i]
    if isinstance(out, torch.Tensor) and x_ndim is not None and out.ndim == x_ndim + 1:
        if not -out.shape[1] <= i < out.shape[1]:
            raise UnsupportedModelError(f"output={i} out of range: the model returned {out.shape[1]} stacked heads "
                                        f"{tuple(out.shape)} (B, heads, K, *spatial)")
        return out[:, i]
    what = (f"one tensor of shape {tuple(out.shape)}" + (f" for an input with {x_ndim} dims" if x_ndim else "")
            if isinstance(out, torch.Tensor) else f"a {type(out).__name__}")
    raise UnsupportedModelError(
        f"output={i} selects an element of a tuple/list or a head of stacked heads (B, heads, K, *spatial); the "
        f"model returned {what}, not stacked heads. To explain a class, give it as the target; drop output= to "
        "explain the tensor. A deep-supervision model that stacks its heads in training mode only (MONAI DynUNet "
        f"returns its main head alone in eval mode) is read in both modes with {DEEP_SUPERVISION_HINT}")


class OutputAdapter(nn.Module):
    """``model`` with :func:`select_output` applied to its output, so every path (methods, hooks,
    training, evaluation) sees one tensor. Layer names are resolved on the wrapped model
    (:func:`unwrap`), so ``layer="features.7"`` still means the user's layer."""

    def __init__(self, model: nn.Module, output):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, *args, **kwargs):
        x_ndim = args[0].ndim if args and isinstance(args[0], torch.Tensor) else None
        return select_output(self.model(*args, **kwargs), self.output, x_ndim)


def with_output(model, output=None):
    """``model`` itself when ``output`` is None, else an :class:`OutputAdapter` around it."""
    return model if output is None else OutputAdapter(peel_adapters(model), output)


def unwrap(model):
    """The user's network inside an :class:`OutputAdapter` (also inside nested adapters, e.g. a
    sliding-window model around a counting adapter) and inside :class:`Passes` (its first network: layer
    names are the user's, and name the same layer in every member of an ensemble); the model itself
    otherwise."""
    while True:
        if isinstance(model, OutputAdapter):
            model = model.model
        elif isinstance(model, Passes):
            model = model.networks[0]
        else:
            return model


def network_cache(store: weakref.WeakKeyDictionary, model) -> dict:
    """The dict that ``store`` keeps for the user's network inside ``model`` (:func:`unwrap`), created on first use
    and dropped with the network: the one per-network cache of the probes (memory, LRP, CAM layer plans). A
    network that cannot be weakly referenced gets a fresh dict (nothing cached)."""
    try:
        return store.setdefault(unwrap(model), {})
    except TypeError:  # not weak-referenceable
        return {}


# --------------------------------------------------------------------------------------------------
# the passes of one prediction: ensemble members x test-time flips (mx.Model, nnU-Net)
# --------------------------------------------------------------------------------------------------
FINAL_ACTIVATIONS = (nn.Softmax, nn.Softmax2d, nn.Sigmoid)


def flip_passes(flip_axes) -> list[tuple[int, ...]]:
    """The test-time flips of spatial axes ``flip_axes`` (0-based, as nnU-Net stores its mirroring axes) as
    tensor dims: the plain pass ``()`` and every non-empty subset of the axes, as nnU-Net's
    ``_internal_maybe_mirror_and_predict`` (``2^n`` passes for ``n`` axes)."""
    axes = sorted({int(a) for a in (flip_axes or ())})
    if any(a < 0 or a > 2 for a in axes):
        raise InputError(f"flip axes are spatial axes 0, 1 or 2; got {list(flip_axes)}")
    dims = [a + 2 for a in axes]
    return [()] + [c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]


class Passes(nn.Module):
    """The network of one prediction as nnU-Net and most challenge winners compute it: the mean over
    ``networks`` (an ensemble, e.g. folds) and over test-time flips (:func:`flip_passes` of ``flip_axes``)
    of ``flip(f_m(flip(x)))``, each member's output adapted by :func:`select_output` (``output``).

    ``logits=True``: where a member ends in a ``Softmax``/``Sigmoid`` module (the module that returned the
    member's output), the score is taken at that module's input, the logits (what the peers
    differentiate; gradients of saturated probabilities vanish). Found per forward by a hook on those
    modules that records the last call's input (removed when the forward returns), so it holds for any
    ``forward``, not only ``nn.Sequential``. ``ended_in`` names the module after a forward.

    Every pass runs on the whole batch, so a gradient through the mean is exact, and a layer of member
    ``m`` is called once per pass of ``m`` (:func:`pass_schedule`), which is how CAMs un-flip each pass's
    cells before combining them (``docs/cam.md``). ``aligned_calls``: see ``mx.Model``.
    """

    def __init__(self, networks, flip_axes=None, output=None, logits: bool = True, aligned_calls: bool = False,
                 amp: bool = False):
        super().__init__()
        networks = list(networks) if isinstance(networks, (list, tuple, nn.ModuleList)) else [networks]
        if not networks:
            raise UnsupportedModelError("an ensemble needs at least one network")
        for n in networks:
            if not isinstance(n, nn.Module):
                raise UnsupportedModelError(f"a network must be a torch.nn.Module, got {type(n).__name__}")
        self.networks = nn.ModuleList(networks)
        self.flip_axes = tuple(sorted({int(a) for a in (flip_axes or ())}))
        self.flips = flip_passes(self.flip_axes)
        self.output, self.logits, self.aligned_calls = output, bool(logits), bool(aligned_calls)
        self.amp = bool(amp)   # mixed precision for the networks' forward (mx.Model(amp=True))
        self.ended_in: str | None = None

    @property
    def n_passes(self) -> int:
        return len(pass_schedule(self))

    def _member(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        finals = [] if not self.logits or is_scripted(net) else \
            [(n, m) for n, m in net.named_modules() if isinstance(m, FINAL_ACTIVATIONS)]
        if not finals:
            return select_output(net(x), self.output, x.ndim)
        last = {}

        def record(name):
            def hook(mod, inp, out):
                last.update(name=name, mod=mod, inp=inp[0] if inp else None, out=out)
            return hook

        handles = [m.register_forward_hook(record(n)) for n, m in finals]
        try:
            out = select_output(net(x), self.output, x.ndim)
        finally:
            for h in handles:
                h.remove()
        if last and last["out"] is out and isinstance(last["inp"], torch.Tensor):
            self.ended_in = f"{last['name']} ({type(last['mod']).__name__})"
            return last["inp"]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.amp and x.is_floating_point():
            # autocast: convolutions and matrix products in float16 (CUDA) or bfloat16 (CPU); the mean over
            # the passes, and everything the methods do with it, in the input's dtype
            half = torch.float16 if x.device.type == "cuda" else torch.bfloat16
            with torch.autocast(device_type=x.device.type, dtype=half):
                return self._passes(x).to(x.dtype)
        return self._passes(x)

    def _passes(self, x: torch.Tensor) -> torch.Tensor:
        total, n = None, 0
        for net in self.networks:
            for dims in self.flips:
                y = self._member(net, torch.flip(x, dims) if dims else x)
                if dims and y.ndim > 2:  # a dense output on the input's axes is flipped back; class scores are not
                    if y.ndim != x.ndim:
                        raise UnsupportedModelError(
                            f"test-time flips need class scores (B, K) or a dense output (B, K, *spatial) to flip "
                            f"back; the model returned {tuple(y.shape)} for an input {tuple(x.shape)}: give "
                            "flip_axes=None")
                    y = torch.flip(y, dims)
                total = y if total is None else total + y
                n += 1
        return total if n == 1 else total / n


def peel_adapters(model):
    """``model`` without its :class:`OutputAdapter` wrappers; unlike :func:`unwrap` it stops at a
    :class:`Passes` (an ensemble or flips stay whole)."""
    while isinstance(model, OutputAdapter):
        model = model.model
    return model


def find_passes(model) -> Passes | None:
    """The :class:`Passes` a model runs (inside output adapters, e.g. a sliding-window model), or None."""
    model = peel_adapters(model)
    return model if isinstance(model, Passes) else None


def pass_schedule(model, dims: frozenset = frozenset()) -> list[tuple[nn.Module, frozenset]]:
    """Every pass of one forward of ``model`` in call order, as ``(network, flipped dims)``: one entry for a
    plain model; the members x flips of a :class:`Passes` (nested ones composed: flips commute and are
    their own inverse, so the dims flipped twice cancel)."""
    inner = peel_adapters(model)
    if not isinstance(inner, Passes):
        return [(inner, dims)]
    return [entry for net in inner.networks for f in inner.flips for entry in pass_schedule(net, dims ^ frozenset(f))]


def n_passes(model) -> int:
    """Rows through the network(s) per input row: the passes of :func:`pass_schedule` (1 for a plain model)."""
    return len(pass_schedule(model)) if find_passes(model) is not None else 1


def plain_pass(model):
    """The model with one pass: the first network of its :class:`Passes`, unflipped, with the output
    adapters and the logits rule met on the way to it (where a CAM finds its layer and the layer's cell
    geometry); ``model`` itself when it has one pass."""
    if n_passes(model) == 1:
        return model
    outputs, logits, m = [], True, model
    while True:
        if isinstance(m, OutputAdapter):
            outputs.append(m.output)
            m = m.model
        elif isinstance(m, Passes):
            outputs.append(m.output)
            logits = logits and m.logits
            m = m.networks[0]
        else:
            break
    outputs = [o for o in reversed(outputs) if o is not None]   # the innermost adapter applies first

    def output(out, chain=tuple(outputs)):
        for o in chain:
            out = select_output(out, o)
        return out
    return Passes([m], None, output if outputs else None, logits, find_passes(model).aligned_calls)


def forward(model, x: torch.Tensor, cost: Cost | None = None, output=None) -> torch.Tensor:
    """Run the model, count the rows (every pass of an ensemble or test-time flip counts), and return
    the explained output tensor (:func:`select_output`)."""
    out = model(x)
    if cost is not None:
        cost.n_forward += x.shape[0] * n_passes(model)
    return select_output(out, output, x.ndim)


def input_gradient(model, x: torch.Tensor, target, rows: torch.Tensor, batch: int, cost: Cost) -> torch.Tensor:
    """Gradient of the target scores w.r.t. ``x`` (rows independent in eval mode, so one backward of the sum)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        # the output is not held through the backward: only what autograd saved for the score stays alive
        # (a full volume less at the peak of a sliding-window gradient)
        s = target.scores(forward(model, x, cost), rows, batch)
        if not s.requires_grad:
            raise UnsupportedModelError("the model output does not depend differentiably on the input; "
                                        "gradient methods cannot run (try occlusion)")
        (g,) = torch.autograd.grad(s.sum(), x)
    cost.n_backward += x.shape[0] * n_passes(model)
    return g
