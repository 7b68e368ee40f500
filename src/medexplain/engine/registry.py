"""The method registry: every explainer registered once, with its declaration.

An explainer is a function ``fn(model, x, target, cost, **options) -> (map, extra_info)`` registered with
:func:`register`, which declares, where the method is defined, everything other code needs to know about
it: what it needs (a target, gradients, layer hooks), what it applies to (``applies_to``), its options
and their types (the function's signature: annotations, defaults, ``Literal`` choices; a ``check`` of
their combination), its cost model (``cost``: the rows it sends through the model), how it runs
through a sliding window, whether it explains several regions at once (``regions``), its aliases and a
``preview`` of cheap options. So the CLI, the demo, the pipelines and the benches ask the registry
(:func:`medexplain.available_methods` with ``model=``, :class:`Method`'s fields) instead of
special-casing names; ``tests/test_registry.py`` checks that no method name appears in code outside its
own module. See ``docs/design.md`` ("The registry").

This module imports nothing from :mod:`medexplain.methods`: the methods import it to register
themselves, and :mod:`medexplain.engine.explain` imports the methods (so there is no import cycle). The
declaration is also recorded on the function (``fn.spec``), which is how :mod:`medexplain.engine.options`
(imported by this module) reads a method's option check and cost model from the function it is given.
"""
from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass
from typing import Callable

import torch

from medexplain.engine.core import find_passes, is_scripted
from medexplain.engine.options import check_options, estimate_cost, unknown_option_message
from medexplain.errors import OptionError, UnknownMethodError

#: The families of :attr:`Method.family`, in the order listings show them.
FAMILIES = ("gradient", "CAM", "propagation", "perturbation", "surrogate", "optimisation", "model", "instance",
            "channel")


def _any_model(model, output) -> str | None:
    return None


@dataclass(frozen=True)
class Method:
    """A registered explainer and its declaration (:func:`register`).

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
    family: str = "gradient"
    aliases: tuple[str, ...] = ()
    cost: Callable | None = None
    check: Callable | None = None
    windowed_cam: bool = False
    no_sliding: str | None = None
    regions: bool = False
    instance_of: Callable | None = None
    preview: Callable | None = None
    default: bool = False
    dicom_concept: str | None = None
    no_amp: str | None = None

    def why_not(self, model, output: torch.Tensor | None = None) -> str | None:
        if self.needs_hooks and is_scripted(model):
            return "needs layer hooks, which TorchScript models do not provide"
        return self.why_not_amp(model) or self.predicate(model, output)

    def why_not_amp(self, model) -> str | None:
        """The reason this method refuses ``model`` when the model runs its forward in mixed precision
        (``mx.Model(amp=True)``, ``--amp``) and the method is declared ``no_amp``; None otherwise."""
        passes = find_passes(model)
        if self.no_amp and passes is not None and passes.amp:
            return f"does not run under mixed precision (--amp, mx.Model(amp=True)): {self.no_amp}"
        return None

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
    def models(self) -> str:
        """Which models it explains: ``"classifier"`` (logits ``(B, K)``), or ``"classifier, segmenter"``."""
        return _MODELS_OF_PREDICATE.get(self.predicate.__name__, "classifier, segmenter")

    def options(self) -> list[str] | None:
        """Option names the method accepts (``None``: any)."""
        params = inspect.signature(self.fn).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return None
        return [p for p in params if p not in ("model", "x", "target", "cost")]

    def takes(self, option: str) -> bool:
        """Whether the method accepts option ``option`` (a method with ``**options`` takes any)."""
        acc = self.options()
        return acc is None or option in acc

    def check_options(self, options: dict | None, text: bool = False) -> dict:
        """The options typed and checked by the signature and the declared ``check``
        (:func:`medexplain.engine.options.check_options`)."""
        return check_options(self.name, self.fn, options, text=text)

    def estimate(self, x_shape, options: dict, seconds_per_row: float):
        """What a call on a batch of shape ``x_shape`` will cost (:func:`medexplain.engine.options.estimate_cost`,
        from the declared ``cost`` model)."""
        return estimate_cost(self.name, self.fn, x_shape, options, seconds_per_row)

    def preview_options(self, side: int) -> dict:
        """Cheap options for a quick look at an image of ``side`` pixels (the demo), as declared."""
        return dict(self.preview(side)) if self.preview is not None else {}


_REGISTRY: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, *, needs_target: bool = True, needs_grad: bool = True, needs_hooks: bool = False,
             applies_to: Callable | None = None, family: str = "gradient", aliases=(), cost: Callable | None = None,
             check: Callable | None = None, windowed_cam: bool = False, no_sliding: str | None = None,
             regions: bool = False, instance_of: Callable | None = None, preview: Callable | None = None,
             default: bool = False, dicom_concept: str | None = None, no_amp: str | None = None):
    """Register ``fn`` under ``name`` with its declaration:

    - ``needs_target`` / ``needs_grad`` / ``needs_hooks``: what it needs of the call and the model;
      ``applies_to(model, output) -> str | None``: a reason it does not fit a model, or None;
    - ``family``: one of :data:`FAMILIES` (listings group by it); ``aliases``: other spellings users type;
    - ``cost(x_shape, options) -> (forward rows, backward rows) | None``: the rows a call sends through
      the model, ``options`` complete (defaults filled in); omitted: unknown in advance (the CAMs: one
      pass); ``tests/test_options.py`` checks each model against the counted rows;
    - ``check(options)``: raises :class:`~medexplain.errors.OptionError` for a combination of options
      the types cannot express (``options`` complete);
    - through a sliding-window inferer: ``windowed_cam=True`` runs the CAM window by window
      (:mod:`medexplain.engine.sliding_cam`), ``no_sliding="reason"`` refuses; otherwise the method runs as is;
    - ``regions=True``: the method takes a :class:`~medexplain.engine.targets.Regions` target as is and gives
      one map per region (other methods are run on each region's image, :func:`medexplain.engine.explain`);
      ``instance_of``: the method (function) whose per-region form this one is;
    - ``preview(side) -> options``: cheap options for a quick look at an image of ``side`` pixels;
    - ``default``: the method :func:`medexplain.engine.explain` runs when none is named (with ``regions=True``:
      the instance API's, :func:`medexplain.segmentation.explain_instances`);
    - ``dicom_concept``: the DICOM CID 217 "Visual Explanation" concept that codes the method's maps
      (pydicom's ``codes.cid217`` name; :mod:`medexplain.io.dicom`), None: described in plain text;
    - ``no_amp="reason"``: the method refuses a model whose forward runs in mixed precision
      (``mx.Model(amp=True)``, ``--amp``); the others tolerate it (``docs/devices.md`` says how well).
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")

    def deco(fn):
        spec = Method(name, fn, needs_target, needs_grad, needs_hooks, applies_to or _any_model, family,
                      tuple(aliases), cost, check, windowed_cam, no_sliding, regions, instance_of, preview, default,
                      dicom_concept, no_amp)
        _REGISTRY[name] = spec
        _ALIASES.update({a: name for a in spec.aliases})
        fn.spec = spec
        return fn
    return deco


def classifier_only(model, output) -> str | None:
    """Predicate for methods that explain class logits ``(B, K)`` only."""
    if output is not None and output.ndim != 2:
        return f"explains classifiers with logits (B, K); this model returns {tuple(output.shape)}"
    return None


def segmenter_only(model, output) -> str | None:
    """Predicate for methods that explain dense outputs ``(B, K, *spatial)`` (segmenters) only."""
    if output is not None and output.ndim < 3:
        return f"explains segmenters with a dense output (B, K, *spatial); this model returns {tuple(output.shape)}"
    return None


#: Which models a predicate admits (predicates not listed admit classifiers and segmenters).
_MODELS_OF_PREDICATE = {"classifier_only": "classifier", "is_patchnet": "PatchNet classifier",
                        "segmenter_only": "segmenter"}


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


def get_method(name) -> Method:
    """The method registered as ``name`` (aliases and ``-``/``_`` spellings accepted; or the registered
    function itself), else a typed error with close matches."""
    if callable(name) and isinstance(getattr(name, "spec", None), Method):
        return name.spec
    key = name if name in _REGISTRY else _ALIASES.get(name.lower().replace("-", "_"), name.lower().replace("-", "_"))
    if key not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        raise UnknownMethodError(f"unknown method {name!r}." + (f" Did you mean {', '.join(close)}?" if close else "")
                                 + f" Available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def default_method(regions: bool = False) -> str:
    """The method run when none is named (declared ``default=True``): :func:`medexplain.engine.explain`'s, or with
    ``regions=True`` that of the instance API (a method declared ``regions=True``)."""
    return next(n for n, m in _REGISTRY.items() if m.default and m.regions == regions)


def instance_method(name: str | None = None) -> Method:
    """The method that explains instances for ``name``: the registered method declared the per-region form
    of ``name`` (``instance_of``), else ``name``'s own method (run on each region's image); ``None``: the
    instance API's default (:func:`default_method` with ``regions=True``)."""
    spec = get_method(default_method(regions=True) if name is None else name)
    return next((m for m in _REGISTRY.values() if m.instance_of is spec.fn), spec)


def accepted_options(name: str) -> list[str] | None:
    """Option names a method accepts (None: any)."""
    return get_method(name).options()


def route_options(methods: list[str], options: dict | None, layer: str | None = None,
                  text: bool = True) -> dict[str, dict]:
    """Options for several methods at once: ``{"key": v}`` goes to every method accepting ``key``,
    ``{"method.key": v}`` to that method only, ``layer`` to every method that takes one. An option no
    chosen method accepts is an error, raised before any work, and every value is typed by the method's
    signature (:func:`medexplain.engine.options.check_options`; ``text``: strings are parsed, as from the
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
    return {m: get_method(m).check_options(routed[m], text=text) for m in methods}
