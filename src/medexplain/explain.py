"""The stable entry points: ``mx.explain`` and ``mx.available_methods`` over a registry of explainers.

An explainer is a function ``fn(model, x, target, cost, **options) -> (map, extra_info)`` registered
with :func:`register`. ``explain`` does what is common to all: input checks, target parsing, the model
guard (eval mode, frozen weights, restored afterwards), cost counting, and the :class:`Attribution`.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from .attribution import Attribution
from .core import Cost, check_input, model_expectations, model_guard, require_hooks
from .errors import MedexplainError, UnknownMethodError
from .targets import as_target


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    needs_target: bool = True
    needs_grad: bool = True
    needs_hooks: bool = False


_REGISTRY: dict[str, Method] = {}


def register(name: str, *, needs_target: bool = True, needs_grad: bool = True, needs_hooks: bool = False):
    def deco(fn):
        _REGISTRY[name] = Method(name, fn, needs_target, needs_grad, needs_hooks)
        return fn
    return deco


def available_methods() -> list[str]:
    """Names accepted by :func:`explain`."""
    from . import methods  # noqa: F401  (registers the explainers)
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    available_methods()
    key = name.lower().replace("-", "_") if name not in _REGISTRY else name
    key = {"gradcampp": "gradcam++", "grad_cam": "gradcam", "ig": "integrated_gradients"}.get(key, key)
    if key not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        raise UnknownMethodError(f"unknown method {name!r}." + (f" Did you mean {', '.join(close)}?" if close else "")
                                 + f" Available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def accepted_options(name: str) -> list[str] | None:
    """Option names a method accepts (None: any)."""
    params = inspect.signature(get_method(name).fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return [p for p in params if p not in ("model", "x", "target", "cost")]


def route_options(methods: list[str], options: dict | None, layer: str | None = None) -> dict[str, dict]:
    """Options for several methods at once: ``{"key": v}`` goes to every method accepting ``key``,
    ``{"method.key": v}`` to that method only, ``layer`` to every method that takes one. An option no
    chosen method accepts is an error, raised before any work."""
    options = dict(options or {})
    routed = {m: {} for m in methods}
    used = set()
    for m in methods:
        acc = accepted_options(m)
        for k, v in options.items():
            owner, _, name = k.rpartition(".")
            if owner in ("", m) and (acc is None or name in acc):
                routed[m][name] = v
                used.add(k)
        if layer and (acc is None or "layer" in acc):
            routed[m]["layer"] = layer
    unused = sorted(set(options) - used)
    if unused:
        raise MedexplainError(f"no chosen method accepts option(s) {unused}; methods {methods}")
    return routed


def explain(model: torch.nn.Module, x: torch.Tensor, method: str = "saliency", target=None, **options) -> Attribution:
    """Explain ``model`` at ``x`` with ``method`` for ``target``.

    ``x`` is ``(B, C, H, W)`` or ``(B, C, D, H, W)``; ``target`` an int, a list of ints (one per sample)
    or a :mod:`medexplain.targets` object. ``options`` go to the method (see its docstring, e.g.
    ``layer=`` for CAMs, ``n_samples=`` for SmoothGrad, ``chunk_size=`` everywhere). The model is
    left exactly as found, also when an error is raised.
    """
    spec = get_method(method)
    accepted = accepted_options(spec.name)
    if accepted is not None and set(options) - set(accepted):
        raise MedexplainError(f"method {spec.name!r} has no option(s) {sorted(set(options) - set(accepted))}; "
                              f"it accepts {accepted}")
    if spec.needs_hooks:
        require_hooks(model)
    x = check_input(x, **model_expectations(model))
    tgt = as_target(target) if (spec.needs_target or target is not None) else None
    with model_guard(model):
        cost = Cost()
        amap, extra = spec.fn(model, x, tgt, cost, **options)
    return Attribution(amap.detach(), spec.name, tgt, cost.info(**extra))
