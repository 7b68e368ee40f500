"""Typed method options and what a call will cost: the one home of option checking for the API
(``mx.explain(..., n_samples=20)``), the command line (``-o n_samples=20``) and run manifests.

Every explainer is a plain function whose signature says what it takes (``docs/design.md``, "The
registry"). Its annotations and defaults are the option types, so no second list has to be kept:

- ``bool``: ``True``/``False`` from Python; ``true/false/1/0/yes/no/on/off`` from text;
- ``int`` / ``float``: checked (``2.5`` is not an int, ``"10"`` is not an int from Python, ``"abc"``
  is no number from text); ``X | None`` also takes ``None`` (``none`` from text);
- ``Sequence[int]``: a list or tuple from Python, ``3,4,5`` from text;
- ``Literal["a", "b"]``: one of the listed values (with a close match in the error);
- an unannotated option takes anything from Python; from text a number, a comma-separated list of
  numbers, ``none``, or else the string itself.

Ranges are enforced for the options whose meaning is fixed across medexplain (:data:`RANGES`:
``n_samples >= 1``, ``steps >= 1``, ``chunk_size >= 1``, ...), a combination the types cannot express
by the ``check`` the method declares (:func:`medexplain.registry.register`), and an unknown option
name is an
:class:`~medexplain.errors.OptionError` naming the close matches. Values that come from text
(``text=True``: the command line, manifests) are parsed; values from Python are checked, never
converted silently. Written by hand: ``typing.get_type_hints`` gives the types, but no library coerces
text to them with these rules and messages (Typer does it for declared CLI options, not for the
per-method ``key=value`` pairs whose names depend on the method).

The cost section estimates the rows a method sends through the model (:func:`estimate_passes`, from
the ``cost`` model the method declares, fed the same options) and extrapolates a time from one timed
forward pass (:func:`estimate_cost`), and :class:`CountingModel` reports the rows as they pass, for
progress bars.
"""
from __future__ import annotations

import collections.abc
import difflib
import inspect
import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Callable

import torch

from .core import OutputAdapter, peel_adapters, select_output
from .errors import OptionError

#: Lower bounds of the options whose meaning is fixed across medexplain: ``(bound, inclusive)``.
RANGES: dict[str, tuple[float, bool]] = {
    "n_samples": (1, True), "steps": (1, True), "chunk_size": (1, True), "iterations": (1, True),
    "adam_steps": (1, True), "n_permutations": (1, True), "images_per_step": (1, True), "n_layers": (1, True),
    "min_steps": (0, True), "patience": (0, True), "sigma": (0, True), "lr": (0, True),
}

TRUE_WORDS = ("true", "1", "yes", "y", "on")
FALSE_WORDS = ("false", "0", "no", "n", "off")
NONE_WORDS = ("none", "null")


class _Mismatch(Exception):
    """Internal: a value does not fit a type (the caller words the message)."""


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _choices(tp) -> tuple | None:
    """The values of a ``Literal[...]`` option type (None for any other type)."""
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


def describe_type(tp) -> str:
    """Human words for an option type (used in error messages and ``--help`` texts)."""
    if tp is None or tp is inspect.Parameter.empty:
        return "any value"
    if _choices(tp) is not None:
        return "one of " + ", ".join(map(str, _choices(tp)))
    if _is_union(tp):
        args = typing.get_args(tp)
        words = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(words) + (" or none" if type(None) in args else "")
    if tp is bool:
        return "a boolean (true/false, 1/0, yes/no)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if typing.get_origin(tp) in (collections.abc.Sequence, list, tuple):
        (elem, *_) = typing.get_args(tp) or (None,)
        return f"a list of {describe_type(elem).split(' (')[0].removeprefix('an ').removeprefix('a ')}s"
    return f"a {getattr(tp, '__name__', str(tp))} (from Python only)"


def _loose(text: str):
    """An unannotated option from text: number, comma-separated numbers, none, or the string."""
    s = text.strip()
    if s.lower() in NONE_WORDS:
        return None
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    if "," in s:
        parts = [_loose(p) for p in s.split(",") if p.strip()]
        return tuple(parts)
    return s


def _coerce(v, tp, text: bool):
    """``v`` as type ``tp``; text is parsed when ``text`` and ``v`` is a ``str``; else :class:`_Mismatch`."""
    from_text = text and isinstance(v, str)
    if tp is None or tp is inspect.Parameter.empty or tp is typing.Any:
        return _loose(v) if from_text else v
    if _is_union(tp):
        args = typing.get_args(tp)
        if type(None) in args and (v is None or (from_text and v.strip().lower() in NONE_WORDS)):
            return None
        ordered = sorted((a for a in args if a is not type(None)), key=lambda a: a is str)  # str last
        for a in ordered:
            try:
                return _coerce(v, a, text)
            except _Mismatch:
                pass
        raise _Mismatch
    if _choices(tp) is not None:   # checked, with close matches, by check_options
        return v.strip() if from_text else v
    if tp is bool:
        if isinstance(v, bool):
            return v
        if from_text and v.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return v.strip().lower() in TRUE_WORDS
        raise _Mismatch
    if tp is int:
        if isinstance(v, numbers.Integral) and not isinstance(v, bool):
            return int(v)
        if from_text:
            try:
                return int(v.strip())
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is float:
        if isinstance(v, numbers.Real) and not isinstance(v, bool):
            return float(v)
        if from_text:
            try:
                return float(v.strip())
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(v, str):
            return v
        raise _Mismatch
    if typing.get_origin(tp) in (collections.abc.Sequence, list, tuple):
        (elem, *_) = typing.get_args(tp) or (None,)
        if from_text:
            return tuple(_coerce(p.strip(), elem, True) for p in v.split(",") if p.strip())
        if isinstance(v, (list, tuple)):
            return type(v)(_coerce(e, elem, text) for e in v)
        raise _Mismatch
    if isinstance(tp, type):
        if isinstance(v, tp):
            return v
        raise _Mismatch
    return v


def option_types(fn: Callable) -> dict[str, tuple[object, object]]:
    """``{name: (type, default)}`` of an explainer's options (its parameters after ``model, x,
    target, cost``); the type is the annotation, ``None`` when there is none."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not evaluate: treat every option as untyped
        hints = {}
    params = inspect.signature(fn).parameters
    return {p: (hints.get(p), params[p].default) for p in params
            if p not in ("model", "x", "target", "cost") and params[p].kind not in (params[p].VAR_KEYWORD,
                                                                                   params[p].VAR_POSITIONAL)}


def _check_range(method: str, name: str, value) -> None:
    if name not in RANGES or value is None:
        return
    bound, inclusive = RANGES[name]
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            continue
        bad = (v < bound) if inclusive else (v <= bound)
        if bad or (isinstance(v, float) and math.isnan(v)):
            extra = " (or none: every row in one call)" if name == "chunk_size" else ""
            raise OptionError(f"{method} option {name} must be {'>=' if inclusive else '>'} {bound}{extra}, got {v!r}")


def unknown_option_message(where: str, unknown, accepted, lead: bool = True) -> str:
    """``<where> has no option(s) [...]. Did you mean ...? It accepts ...`` with close matches
    (``lead=False``: ``where`` is the whole first sentence)."""
    unknown, accepted = sorted(unknown), sorted(accepted)
    close = sorted({c for u in unknown for c in difflib.get_close_matches(u.rpartition(".")[2], accepted, n=3)})
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    first = f"{where} has no option(s) {unknown}" if lead else where
    return f"{first}.{hint} {'It accepts' if lead else 'They accept'} {accepted}"


def check_options(method: str, fn: Callable, options: dict | None, text: bool = False) -> dict:
    """The options of ``method`` (whose explainer is ``fn``) checked against its signature: names,
    types (:func:`describe_type`), :data:`RANGES`, ``Literal`` choices and the ``check`` the method
    declares. Returns them typed (text parsed when ``text``). Raises
    :class:`~medexplain.errors.OptionError` before any work."""
    options = dict(options or {})
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    types_ = option_types(fn)
    unknown = [k for k in options if k not in types_]
    if unknown and not takes_any:
        raise OptionError(unknown_option_message(f"method {method!r}", unknown, types_))
    out = {}
    for k, v in options.items():
        tp, default = types_.get(k, (None, None))
        if tp is None and default is not inspect.Parameter.empty and default is not None and isinstance(default, bool):
            tp = bool  # an unannotated flag is a bool
        try:
            out[k] = _coerce(v, tp, text)
        except _Mismatch:
            src = "" if not isinstance(v, str) or text else " (from Python, give the value itself, not text)"
            raise OptionError(f"{method} option {k} must be {describe_type(tp)}, got {v!r} "
                              f"({type(v).__name__}){src}") from None
        _check_range(method, k, out[k])
        choices = _choices(tp)
        if choices and out[k] not in choices:
            close = difflib.get_close_matches(str(out[k]), [str(c) for c in choices], n=1)
            raise OptionError(f"{method} option {k} must be one of {list(choices)}, got {out[k]!r}"
                              + (f"; did you mean {close[0]!r}?" if close else ""))
    check = _declared(fn, "check")
    if check is not None:
        check(complete_options(fn, out))
    return out


def _declared(fn: Callable, what: str):
    """What the method declared at registration (``check``, ``cost``; :func:`medexplain.registry.register`
    records the declaration on the function as ``fn.spec``), or None."""
    return getattr(getattr(fn, "spec", None), what, None)


def complete_options(fn: Callable, options: dict) -> dict:
    """``options`` with every option the method does not get filled with its default."""
    return {**{k: d for k, (_, d) in option_types(fn).items() if d is not inspect.Parameter.empty}, **options}


def parse_pairs(pairs) -> dict[str, str]:
    """``["key=value", ...]`` (the command line's ``-o``) as ``{key: "value"}``, the values left as
    text for :func:`check_options` (``text=True``) to type by the method's signature."""
    out = {}
    for p in pairs or []:
        k, sep, v = str(p).partition("=")
        if not sep or not k.strip():
            raise OptionError(f"--option expects key=value, got {p!r}")
        out[k.strip()] = v.strip()
    return out


# --------------------------------------------------------------------------------------------------
# cost: rows through the model, an extrapolated time, and a row counter for progress bars
# --------------------------------------------------------------------------------------------------
#: A call whose estimate exceeds this many seconds is announced before it starts (the CLI prints it).
LONG_CALL_SECONDS = 60.0

#: Backward pass cost in units of a forward pass (the usual rule of thumb for convolutional nets).
BACKWARD_COST = 2.0


def estimate_passes(method: str, fn: Callable, x_shape, options: dict) -> tuple[int, int] | None:
    """``(forward rows, backward rows)`` a call of ``method`` (whose explainer is ``fn``) on a batch of
    shape ``x_shape`` will send through the model with ``options`` (one image-sized input is one row, as
    ``info["n_forward"]`` counts them), or ``None`` when the count is not known in advance: the ``cost``
    model the method declares (:func:`medexplain.registry.register`), given the options with their
    defaults. Single-pass methods such as the CAMs declare none; ``tests/test_options.py`` checks each
    model against the counted rows."""
    cost = _declared(fn, "cost")
    return None if cost is None else cost(tuple(int(s) for s in x_shape), complete_options(fn, options))


@dataclass
class CostEstimate:
    """What a call is expected to cost: rows forward and backward, and ``seconds`` extrapolated from one
    timed forward pass (``seconds_per_row``; a backward counts :data:`BACKWARD_COST` forwards)."""

    method: str
    n_forward: int | None
    n_backward: int | None
    seconds_per_row: float
    seconds: float | None

    @property
    def long(self) -> bool:
        """True when the call is expected to take more than :data:`LONG_CALL_SECONDS`."""
        return self.seconds is not None and self.seconds > LONG_CALL_SECONDS

    def describe(self) -> str:
        if self.seconds is None:
            return f"{self.method}: cost unknown in advance"
        return (f"{self.method}: about {self.n_forward} forward and {self.n_backward} backward row(s), "
                f"~{_duration(self.seconds)} at {self.seconds_per_row * 1e3:.0f} ms per forward row")

    def as_dict(self) -> dict:
        return {"n_forward": self.n_forward, "n_backward": self.n_backward,
                "seconds_per_row": self.seconds_per_row, "seconds": self.seconds}


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def estimate_cost(method: str, fn: Callable, x_shape, options: dict, seconds_per_row: float) -> CostEstimate:
    """:func:`estimate_passes` and the time they take at ``seconds_per_row`` (one timed forward pass
    divided by its rows)."""
    passes = estimate_passes(method, fn, x_shape, options)
    if passes is None:
        return CostEstimate(method, None, None, seconds_per_row, None)
    nf, nb = passes
    return CostEstimate(method, nf, nb, seconds_per_row, seconds_per_row * (nf + BACKWARD_COST * nb))


class CountingModel(OutputAdapter):
    """``model`` with the output adapter applied (:func:`medexplain.core.select_output`, ``output=``)
    that calls ``on_rows(n)`` after each forward of ``n`` rows: the progress of a multi-pass method.
    Being an :class:`~medexplain.core.OutputAdapter`, layer names still resolve on the user's model."""

    def __init__(self, model, output=None, on_rows: Callable[[int], None] | None = None):
        super().__init__(peel_adapters(model), output)   # an ensemble / flips (core.Passes) stays whole
        self.on_rows = on_rows

    def forward(self, x, *args, **kwargs):
        out = select_output(self.model(x, *args, **kwargs), self.output)
        if self.on_rows is not None and isinstance(x, torch.Tensor):
            self.on_rows(int(x.shape[0]))
        return out
