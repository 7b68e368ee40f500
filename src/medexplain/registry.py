"""The method registry: every explainer registered once, with what it needs of a model.

An explainer is a function ``fn(model, x, target, cost, **options) -> (map, extra_info)`` registered with
:func:`register`. Registration records what the method needs (a target, gradients, layer hooks) and an
``applies_to`` predicate, so the CLI, the demo and the benches can ask which methods fit a model
(:func:`medexplain.available_methods` with ``model=``) instead of special-casing names. See
``docs/design.md`` ("The registry").

This module imports nothing from :mod:`medexplain.methods`: the methods import it to register
themselves, and :mod:`medexplain.explain` imports the methods (so there is no import cycle).
"""
from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass
from typing import Callable

import torch

from .core import is_scripted
from .errors import OptionError, UnknownMethodError
from .options import check_options, unknown_option_message

#: Spellings users type for registered names.
ALIASES = {"gradcampp": "gradcam++", "grad_cam": "gradcam", "ig": "integrated_gradients"}


def _any_model(model, output) -> str | None:
    return None


@dataclass(frozen=True)
class Method:
    """A registered explainer and what it needs.

    ``why_not(model, output)`` returns ``None`` when the method applies to ``model`` (whose output on a
    probe input is ``output``, or ``None`` when unknown), else a one-line reason. The registry adds the
    hook requirement itself, so a method's own predicate says only what is particular to it.
    """

    name: str
    fn: Callable
    needs_target: bool = True
    needs_grad: bool = True
    needs_hooks: bool = False
    predicate: Callable = _any_model

    def why_not(self, model, output: torch.Tensor | None = None) -> str | None:
        if self.needs_hooks and is_scripted(model):
            return "needs layer hooks, which TorchScript models do not provide"
        return self.predicate(model, output)

    def applies_to(self, model, output: torch.Tensor | None = None) -> bool:
        return self.why_not(model, output) is None

    @property
    def description(self) -> str:
        """The first sentence of the explainer's docstring on one line (reST backticks dropped, at most 160
        characters): the method's own account of itself, so no second table can drift from the code."""
        doc = " ".join((inspect.getdoc(self.fn) or "").split("\n\n")[0].split()).replace("``", "")
        end = re.search(r"(?<!\beq)(?<!\bal)(?<!e\.g)(?<!i\.e)\.(\s|$)", doc)
        first = doc[:end.start() + 1] if end else doc
        return first if len(first) <= 160 else first[:159].rsplit(" ", 1)[0] + "\u2026"

    @property
    def family(self) -> str:
        """The method's family, from where it is implemented and what it needs: CAM (a layer's activations),
        perturbation (no gradient), relevance propagation, mask optimisation, self-explaining model, gradient."""
        module = self.fn.__module__.rpartition(".")[2]
        if module in _FAMILY_OF_MODULE:
            return _FAMILY_OF_MODULE[module]
        return "gradient" if self.needs_grad else "perturbation"

    @property
    def models(self) -> str:
        """Which models it explains: ``"classifier"`` (logits ``(B, K)``), or ``"classifier, segmenter"``."""
        return _MODELS_OF_PREDICATE.get(self.predicate.__name__, "classifier, segmenter")

    def options(self) -> list[str] | None:
        """Option names the method accepts (``None``: any)."""
        params = inspect.signature(self.fn).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return None
        return [p for p in params if p not in ("model", "x", "target", "cost")]


_REGISTRY: dict[str, Method] = {}


def register(name: str, *, needs_target: bool = True, needs_grad: bool = True, needs_hooks: bool = False,
             applies_to: Callable | None = None):
    """Register ``fn`` under ``name``. ``applies_to(model, output) -> str | None`` (a reason, or None)."""
    def deco(fn):
        _REGISTRY[name] = Method(name, fn, needs_target, needs_grad, needs_hooks, applies_to or _any_model)
        return fn
    return deco


def classifier_only(model, output) -> str | None:
    """Predicate for methods that explain class logits ``(B, K)`` only."""
    if output is not None and output.ndim != 2:
        return f"explains classifiers with logits (B, K); this model returns {tuple(output.shape)}"
    return None


#: Method families by implementing module (methods not listed: gradient, or perturbation without gradients).
_FAMILY_OF_MODULE = {"cam": "CAM", "medcam": "CAM (learned mask)", "lrp": "relevance propagation",
                     "ssplain": "mask optimisation", "patchnet": "self-explaining model"}
#: Which models a predicate admits (predicates not listed admit classifiers and segmenters).
_MODELS_OF_PREDICATE = {"classifier_only": "classifier", "is_patchnet": "PatchNet classifier"}


def describe_methods(model=None, output: torch.Tensor | None = None) -> list[dict]:
    """One row per registered method, sorted by name: ``name``, ``family``, ``description`` (the first paragraph
    of its docstring), ``models`` (classifier / segmenter), and with ``model`` ``applies`` and ``why_not``
    (:meth:`Method.why_not`; ``output``: the model's output on a probe input, which tells classifiers from
    segmenters; without it only what the model itself shows is checked, e.g. hooks on TorchScript)."""
    rows = []
    for name, m in sorted(_REGISTRY.items()):
        row = {"name": name, "family": m.family, "description": m.description, "models": m.models}
        if model is not None:
            why = m.why_not(model, output)
            row.update({"applies": why is None, "why_not": why})
        rows.append(row)
    return rows


def registered() -> dict[str, Method]:
    """Name -> :class:`Method` of every method registered so far."""
    return dict(_REGISTRY)


def get_method(name: str) -> Method:
    """The method registered as ``name`` (aliases and ``-``/``_`` spellings accepted), else a typed error
    with close matches."""
    key = name if name in _REGISTRY else ALIASES.get(name.lower().replace("-", "_"), name.lower().replace("-", "_"))
    if key not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        raise UnknownMethodError(f"unknown method {name!r}." + (f" Did you mean {', '.join(close)}?" if close else "")
                                 + f" Available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def accepted_options(name: str) -> list[str] | None:
    """Option names a method accepts (None: any)."""
    return get_method(name).options()


def route_options(methods: list[str], options: dict | None, layer: str | None = None,
                  text: bool = True) -> dict[str, dict]:
    """Options for several methods at once: ``{"key": v}`` goes to every method accepting ``key``,
    ``{"method.key": v}`` to that method only, ``layer`` to every method that takes one. An option no
    chosen method accepts is an error, raised before any work, and every value is typed by the method's
    signature (:func:`medexplain.options.check_options`; ``text``: strings are parsed, as from the
    command line or a manifest)."""
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
        accepted = {o for m in methods for o in (accepted_options(m) or [])}
        raise OptionError(unknown_option_message(f"no chosen method accepts option(s) {unused}; methods {methods}",
                                                 unused, accepted, lead=False))
    return {m: check_options(get_method(m).name, get_method(m).fn, routed[m], text=text) for m in methods}
