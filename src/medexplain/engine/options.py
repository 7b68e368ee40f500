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
by the ``check`` the method declares (:func:`medexplain.engine.registry.register`), and an unknown option
name is an
:class:`~medexplain.errors.OptionError` naming the close matches. Values that come from text
(``text=True``: the command line, manifests) are parsed; values from Python are checked, never
converted silently. Written by hand: ``typing.get_type_hints`` gives the types, but no library coerces
text to them with these rules and messages (Typer does it for declared CLI options, not for the
per-method ``key=value`` pairs whose names depend on the method).

The cost section estimates the rows a method sends through the model (:func:`estimate_passes`, from
the ``cost`` model the method declares, fed the same options) and extrapolates a time from one timed
forward pass (:func:`estimate_cost`), and :class:`CountingModel` reports the rows as they pass, for
progress bars. The memory section measures the peak of one model call on a probe row
(:func:`probe_row_bytes`), caps the rows per call to a budget and refuses a call that cannot fit one row
before any compute (:func:`plan_memory`, issue 27).
"""
from __future__ import annotations

import collections.abc
import difflib
import inspect
import math
import numbers
import threading
import types
import typing
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from medexplain.engine.core import OutputAdapter, peel_adapters, select_output
from medexplain.engine.core import storage_key as _storage_key
from medexplain.errors import MemoryBudgetError, OptionError  # noqa: F401  (MemoryBudgetError re-exported)

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
    if tp in (int, float):   # a bool is not a number here, although Python says it is one
        if isinstance(v, numbers.Integral if tp is int else numbers.Real) and not isinstance(v, bool):
            return tp(v)
        if from_text:
            try:
                return tp(v.strip())
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


#: :func:`option_types` per function: evaluating the annotations (text under ``from __future__ import
#: annotations``) and the signature is a fixed cost of every call otherwise.
_OPTION_TYPES = weakref.WeakKeyDictionary()


def option_types(fn: Callable) -> dict[str, tuple[object, object]]:
    """``{name: (type, default)}`` of an explainer's options (its parameters after ``model, x,
    target, cost``); the type is the annotation, ``None`` when there is none."""
    try:
        return dict(_OPTION_TYPES[fn])
    except (KeyError, TypeError):
        pass
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not evaluate: treat every option as untyped
        hints = {}
    params = inspect.signature(fn).parameters
    types_ = {p: (hints.get(p), params[p].default) for p in params
              if p not in ("model", "x", "target", "cost") and params[p].kind not in (params[p].VAR_KEYWORD,
                                                                                     params[p].VAR_POSITIONAL)}
    try:
        _OPTION_TYPES[fn] = types_
    except TypeError:   # not weak-referenceable
        pass
    return dict(types_)


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
    """What the method declared at registration (``check``, ``cost``; :func:`medexplain.engine.registry.register`
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
    model the method declares (:func:`medexplain.engine.registry.register`), given the options with their
    defaults. Single-pass methods such as the CAMs declare none; ``tests/test_options.py`` checks each
    model against the counted rows. With ``fn=None``, the two pipeline steps ``pipelines/__init__.py`` estimates as
    a whole (:func:`_pipeline_passes`)."""
    if fn is None:
        return _pipeline_passes(method, x_shape, options)
    cost = _declared(fn, "cost")
    return None if cost is None else cost(tuple(int(s) for s in x_shape), complete_options(fn, options))


def _pipeline_passes(method: str, x_shape, options: dict) -> tuple[int, int] | None:
    """The steps of ``pipelines/__init__.py`` beyond one registered call: ``"instances"`` (options ``n_instances``,
    ``noise``: whether the method draws ``n_samples`` noisy copies, ``n_samples``) and ``"shapley"`` per
    model (``n_players``, ``method``, ``n_permutations``; permutation sampling: an upper bound)."""
    b = int(x_shape[0])
    if method == "instances":  # segmentation.explain_instances: options n_instances, noise, n_samples
        k = int(options["n_instances"])
        if options.get("noise"):      # a noise method (instance SmoothGrad): the noisy rows once forward, backward
            n = int(options.get("n_samples", 50))              # per instance
            return n * b, n * k * b
        return k, k                                            # a one-pass method (Grad-CAM++): one row per instance
    if method == "shapley":  # shapley.channel_shapley per model: options n_players, method, n_permutations
        n, how = int(options["n_players"]), options.get("method", "auto")
        exact = how == "exact" or (how == "auto" and n <= 10)
        if exact:
            return (2 ** n) * b, 0
        m = 2 * ((int(options.get("n_permutations", 200)) + 1) // 2)   # antithetic pairs: orders and reverses
        return min(2 ** n, m * (n - 1) + 2) * b, 0                     # at most every distinct coalition once
    return None


@dataclass
class CostEstimate:
    """What a call is expected to cost: rows forward and backward, and ``seconds`` extrapolated from one
    timed forward pass (``seconds_per_row``; a backward counts :data:`BACKWARD_COST` forwards)."""

    method: str
    n_forward: int | None
    n_backward: int | None
    seconds_per_row: float
    seconds: float | None
    memory: "MemoryPlan | None" = None

    @property
    def long(self) -> bool:
        """True when the call is expected to take more than :data:`LONG_CALL_SECONDS`."""
        return self.seconds is not None and self.seconds > LONG_CALL_SECONDS

    def describe(self) -> str:
        mem = f"; {self.memory.describe()}" if self.memory is not None else ""
        if self.seconds is None:
            return f"{self.method}: time unknown in advance{mem}"
        return (f"{self.method}: about {self.n_forward} forward and {self.n_backward} backward row(s), "
                f"~{_duration(self.seconds)} at {self.seconds_per_row * 1e3:.0f} ms per forward row{mem}")

    def as_dict(self) -> dict:
        return {"n_forward": self.n_forward, "n_backward": self.n_backward,
                "seconds_per_row": self.seconds_per_row, "seconds": self.seconds,
                "memory": self.memory.as_dict() if self.memory is not None else None}


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def estimate_cost(method: str, fn: Callable, x_shape, options: dict, seconds_per_row: float,
                  memory: "MemoryPlan | None" = None) -> CostEstimate:
    """:func:`estimate_passes` and the time they take at ``seconds_per_row`` (one timed forward pass
    divided by its rows), with the memory plan of one model call (:func:`plan_memory`) when given."""
    passes = estimate_passes(method, fn, x_shape, options)
    if passes is None:
        return CostEstimate(method, None, None, seconds_per_row, None, memory)
    nf, nb = passes
    return CostEstimate(method, nf, nb, seconds_per_row, seconds_per_row * (nf + BACKWARD_COST * nb), memory)


class CountingModel(OutputAdapter):
    """``model`` with the output adapter applied (:func:`medexplain.engine.core.select_output`, ``output=``)
    that calls ``on_rows(n)`` after each forward of ``n`` rows: the progress of a multi-pass method.
    Being an :class:`~medexplain.engine.core.OutputAdapter`, layer names still resolve on the user's model.
    ``adapt=False`` passes the output on as the model returns it (a member of an ``mx.Model``, whose own
    adapter reads it: :func:`counting`)."""

    def __init__(self, model, output=None, on_rows: Callable[[int], None] | None = None, adapt: bool = True):
        super().__init__(peel_adapters(model), output)   # an ensemble / flips (core.Passes) stays whole
        self.on_rows, self.adapt = on_rows, bool(adapt)

    def forward(self, x, *args, **kwargs):
        out = self.model(x, *args, **kwargs)
        if self.adapt:
            out = select_output(out, self.output, getattr(x, "ndim", None))
        if self.on_rows is not None and isinstance(x, torch.Tensor) and not _PROBING.active:
            self.on_rows(int(x.shape[0]))
        return out


def counting(model, on_rows: Callable[[int], None] | None):
    """The model object ``model`` (a :class:`~medexplain.models.model.Model`; a bare module is wrapped,
    :func:`medexplain.models.model.as_model`) with each of its networks in a :class:`CountingModel` that reports the
    rows of every pass (``on_rows(n)``; the progress bars of the pipelines, in the unit of ``info["n_forward"]``). Every setting
    of the Model is kept: the train/eval policy, the output adapter, the activation, the flips, the sliding
    window, the device and dtype (a counting wrapper around the Model would hide them)."""
    from medexplain.models.model import Model, as_model

    m = as_model(model)
    return Model([CountingModel(n, None, on_rows, adapt=False) for n in m.networks],
                 **{**m._settings, "dtype": m._dtype_given})


# --------------------------------------------------------------------------------------------------
# memory: the peak of one model call, measured on a probe row and scaled by rows, checked against a budget
# --------------------------------------------------------------------------------------------------
#: The default budget: this fraction of the memory available now (``memory=None``, no ``--memory``).
MEMORY_FRACTION = 0.5

#: ``memory=`` and ``--memory`` are in GB of 10^9 bytes.
GB = 1e9


def size_text(n: float) -> str:
    """Bytes as ``"1.23 GB"`` / ``"45.6 MB"`` / ``"789 kB"`` (decimal units, as ``--memory``)."""
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= f:
            return f"{n / f:.3g} {unit}"
    return f"{int(n)} bytes"


def available_memory(device=None) -> int:
    """Bytes available now: the free memory of a CUDA device, else the smaller of the kernel's MemAvailable
    (``/proc/meminfo``) and what the cgroup (a container's memory limit) still allows."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(dev)[0])
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        try:
            import os
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 8 * 2 ** 30
    try:  # cgroup v2: the container's limit minus its use
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                avail = min(avail, max(0, int(limit) - int(f.read().strip())))
    except (OSError, ValueError):
        pass
    return int(avail)


def memory_budget(memory=None, device=None) -> tuple[int, str]:
    """``(bytes, how)`` of the budget for one model call: ``memory`` in GB (``--memory``), or by default
    :data:`MEMORY_FRACTION` of :func:`available_memory`."""
    if memory is None:
        avail = available_memory(device)
        return int(MEMORY_FRACTION * avail), f"{MEMORY_FRACTION:.0%} of the memory available ({size_text(avail)} now)"
    if isinstance(memory, bool) or not isinstance(memory, numbers.Real) or not math.isfinite(memory) or memory <= 0:
        raise OptionError(f"memory (--memory) is a budget in GB > 0, got {memory!r}")
    return int(float(memory) * GB), f"memory={float(memory):g} GB"


#: Probed bytes per row, per model: ``{(shape of one row, dtype, device): bytes}``; weights change nothing here.
_PROBES = weakref.WeakKeyDictionary()


#: Set while a probe row runs: :class:`CountingModel` does not report it as progress.
_PROBING = threading.local()
_PROBING.active = False


def _measure_row(inner, x1: torch.Tensor) -> int | None:
    """Bytes of one model call on the one row ``x1`` (see :func:`probe_row_bytes`), or None."""
    from medexplain.engine.core import model_guard

    own = {_storage_key(t)[0] for t in list(inner.parameters()) + list(inner.buffers())}
    seen, largest = {}, [0]

    def pack(t):
        k, n = _storage_key(t)
        if k not in own and k not in seen:
            seen[k] = n
            largest[0] = max(largest[0], n)
        return t

    x1 = x1.detach().clone().requires_grad_(True)
    _PROBING.active = True
    try:  # as the methods run it: its train/eval policy, weights frozen (no weight gradients saved for)
        with model_guard(inner), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = inner(x1)
            outs = [o for o in (out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple))
                                else [out]) if isinstance(o, torch.Tensor)]
            out_bytes = sum(o.numel() * o.element_size() for o in outs)
            grad_outs = [o for o in outs if o.requires_grad and o.is_floating_point()]
            if grad_outs:
                torch.autograd.grad(sum(o.sum() for o in grad_outs), x1, allow_unused=True)
    except Exception:
        return None
    finally:
        _PROBING.active = False
    if grad_outs and not seen:
        return None
    return int(sum(seen.values()) + 2 * largest[0] + 2 * x1.numel() * x1.element_size() + out_bytes)


#: Inputs of more voxels than this are first probed on a centre crop (see :func:`probe_row_bytes`).
LARGE_ROW_VOXELS = 2 ** 20


def _probe_crop(x1: torch.Tensor) -> torch.Tensor | None:
    """A centre crop of the row ``x1`` about a quarter of each large side (a multiple of 32, so strided
    networks still take it), or None when the row is small."""
    spatial = [int(s) for s in x1.shape[2:]]
    if math.prod(spatial) <= LARGE_ROW_VOXELS:
        return None
    new = [s if s < 256 else max(64, (s // 4) // 32 * 32) for s in spatial]
    if new == spatial:
        return None
    return x1[(slice(None), slice(None), *[slice((s - n) // 2, (s - n) // 2 + n) for s, n in zip(spatial, new)])]


def probe_row_bytes(model, x: torch.Tensor, limit: int | None = None) -> int | None:
    """The peak memory, in bytes, of one model call on one row of ``x``, measured on a probe forward and
    backward of ``x[:1]``: every tensor autograd saves for the backward (``torch.autograd.graph.saved_tensors_hooks``,
    each storage once, the model's own parameters and buffers excluded), plus the input, its gradient and every
    output, plus twice the largest saved tensor (the backward's working gradients). Methods without gradients
    keep less; the estimate is their upper bound. ``None`` when the probe cannot run (the method then raises
    its own error) or sees no saved tensor of an output that needs gradients (a TorchScript graph executor
    may save outside Python's reach). Runs under the model guard (eval mode, frozen weights, everything
    restored); cached per model and row shape.

    ``limit`` (bytes, the budget): a large row (more than :data:`LARGE_ROW_VOXELS` voxels) is first probed on
    a centre crop of about a quarter of each side and scaled by the voxel count (activations scale with it);
    when that already exceeds ``limit``, it is returned without the full-size probe, which would not fit
    either. So a call that is refused never takes more than the crop's memory.

    ``model``: what the methods call (an ``mx.Model``'s runner: its passes, every ensemble member and flip of
    one call measured together), an ``mx.Model`` or an ``nn.Module``. The cache is kept per user network."""
    from medexplain.engine.core import n_passes, network_cache

    inner = getattr(model, "runner", model)      # an mx.Model: what its methods call
    key = (tuple(x.shape[1:]), x.dtype, str(x.device), n_passes(inner))
    cache = network_cache(_PROBES, inner)
    if key in cache:
        return cache[key]
    if limit is not None:
        crop = _probe_crop(x[:1])
        small = _measure_row(inner, crop) if crop is not None else None
        if small is not None and small * (x[:1].numel() / crop.numel()) > limit:
            return int(small * (x[:1].numel() / crop.numel()))
    row = _measure_row(inner, x[:1])
    if row is not None:
        cache[key] = row
    return row


@dataclass
class MemoryPlan:
    """What one model call of a method may take: ``bytes_per_row`` (:func:`probe_row_bytes`), the ``budget``
    (:func:`memory_budget`, ``how`` it was set), the rows that fit (``rows_fit``), the rows per call the
    method will send (``rows_per_call``: its ``chunk_size`` capped to fit, or the batch for a single-pass
    method) and ``peak_bytes`` of such a call; ``capped`` when ``chunk_size`` was lowered to fit."""

    method: str
    bytes_per_row: int
    budget: int
    how: str
    rows_fit: int
    rows_per_call: int
    capped: bool = False
    chunk_size: int | None = None

    @property
    def peak_bytes(self) -> int:
        return self.rows_per_call * self.bytes_per_row

    def describe(self) -> str:
        cap = f" (chunk_size capped to {self.chunk_size} to fit)" if self.capped else ""
        return (f"~{size_text(self.peak_bytes)} per model call of {self.rows_per_call} row(s){cap}, budget "
                f"{size_text(self.budget)} ({self.how})")

    def as_dict(self) -> dict:
        """The plan for ``info``; the default budget is named, not its size (the memory available now differs
        from run to run, and records of a resumed run must equal an uninterrupted one's)."""
        explicit = not self.how.startswith(f"{MEMORY_FRACTION:.0%} of the memory available")
        return {"bytes_per_row": self.bytes_per_row, "rows_per_call": self.rows_per_call,
                "peak_bytes": self.peak_bytes, "capped_chunk_size": self.capped,
                "budget": self.how if explicit else f"{MEMORY_FRACTION:.0%} of the memory available",
                "budget_bytes": self.budget if explicit else None}


def plan_memory(method: str, fn: Callable, model, x: torch.Tensor, options: dict, memory=None,
                hint: str = "") -> tuple[dict, MemoryPlan | None]:
    """Check ``method``'s model calls on ``x`` against the memory budget (:func:`memory_budget`: ``memory`` GB,
    or by default half the memory available) before any compute, and cap its rows per call to fit: the one
    memory plan of ``mx.explain`` and the pipelines. ``fn`` is the function whose ``chunk_size`` option sets
    the rows per call. The peak of one row is :func:`probe_row_bytes` (with the budget as its ``limit``).
    Returns ``(options, plan)``: ``options`` with ``chunk_size`` lowered to the rows that fit when ``fn``
    takes one (``None`` there means every row in one call), and the :class:`MemoryPlan` (``None`` when the
    probe cannot tell). A single-pass method sends the batch in one call. A :class:`MemoryBudgetError`
    names the options that help when even one row (or the batch of a single-pass method) does not fit: a
    larger ``--memory``, a smaller input (``--spacing``, ``--roi-size``) or batch."""
    budget, how = memory_budget(memory, x.device)
    bytes_per_row = probe_row_bytes(model, x, limit=budget)
    if bytes_per_row is None or bytes_per_row <= 0:
        return options, None
    rows_fit = budget // bytes_per_row
    b = int(x.shape[0])
    shape = "x".join(str(int(s)) for s in x.shape[1:])
    need = (f"one row ({shape}) needs ~{size_text(bytes_per_row)} in one model call (probed on one row; a large "
            "row on its centre crop first, scaled by its size)")
    helps = ("raise the budget (--memory GB; memory= in Python), or give the model a smaller input: sliding windows "
             "(--roi-size; inferer= in Python) or a coarser grid (--spacing)" + hint)
    if rows_fit < 1:
        raise MemoryBudgetError(f"{method}: {need}, more than the memory budget of {size_text(budget)} ({how}); "
                                f"nothing was computed. {helps[0].upper()}{helps[1:]}")
    options = dict(options)
    if "chunk_size" in option_types(fn):  # rows per call (a method may round it to whole samples of the batch)
        chunk = complete_options(fn, options).get("chunk_size")
        capped = chunk is None or chunk > rows_fit
        if capped:
            options["chunk_size"] = int(rows_fit)
        per_call = int(options.get("chunk_size", chunk))
        return options, MemoryPlan(method, bytes_per_row, budget, how, int(rows_fit), per_call, capped, per_call)
    if b > rows_fit:
        raise MemoryBudgetError(f"{method}: a batch of {b} in one model call needs ~{size_text(b * bytes_per_row)} "
                                f"({need}), more than the memory budget of {size_text(budget)} ({how}); nothing was "
                                f"computed. Explain at most {rows_fit} image(s) per call, or {helps}")
    return options, MemoryPlan(method, bytes_per_row, budget, how, int(rows_fit), b)


@dataclass
class WindowMemoryPlan:
    """The memory budget of one sliding-window explanation (:func:`plan_window_memory`) and, once it ran,
    what the engine did with it (:meth:`medexplain.engine.sliding.WindowStats.memory`)."""

    net: object   # a medexplain.engine.sliding.SlidingWindowModel
    budget: int
    how: str
    explicit: bool
    window_probe_bytes: int | None = None

    def as_dict(self) -> dict:
        return {"budget": self.how if self.explicit else f"{MEMORY_FRACTION:.0%} of the memory available",
                "budget_bytes": self.budget if self.explicit else None, "sliding_window": True,
                "window_call_probe_bytes": self.window_probe_bytes, **self.net.stats.memory()}


def plan_window_memory(net, x: torch.Tensor, memory=None) -> WindowMemoryPlan:
    """The budget of a sliding-window explanation of ``x`` (``memory`` GB, ``--memory``; by default half the
    memory available, :func:`memory_budget`), set on ``net`` (a :class:`medexplain.engine.sliding.SlidingWindowModel`,
    ``net.budget``).

    The peak of an explanation through windows is the four full-volume arrays (input, output, cotangent and
    gradient, each held once, in the model's dtype) plus the window graphs alive. The forward keeps each
    window call's graph while the kept graphs and the four arrays fit in the budget (those windows are not
    recomputed in the backward: the time of autograd through MONAI's inferer), and recomputes the others
    one call at a time (Chen et al. 2016); when even the four arrays and one window call do not fit, the
    engine's full-volume arrays are memory-mapped files (:func:`medexplain.engine.sliding._volume_array`). With an explicit
    ``memory``, one window call (``sw_batch_size`` windows) is probed first (:func:`probe_row_bytes`)
    and a :class:`~medexplain.errors.MemoryBudgetError` raised before any compute when it does not fit."""
    budget, how = memory_budget(memory, x.device)
    net.budget = budget
    plan = WindowMemoryPlan(net, budget, how, memory is not None)
    if memory is not None:
        geo = net.geometry(x)
        row = probe_row_bytes(net.model, x.new_zeros((1, x.shape[1], *geo.roi)))
        if row is not None:
            call = row * int(net.inferer.sw_batch_size)
            plan.window_probe_bytes = call
            if call > budget:
                raise MemoryBudgetError(
                    f"one sliding-window call ({net.inferer.sw_batch_size} window(s) of {'x'.join(map(str, geo.roi))}) "
                    f"needs ~{size_text(call)}, more than the memory budget of {size_text(budget)} ({how}); nothing "
                    "was computed. Raise the budget (--memory GB; memory= in Python), or use smaller windows "
                    "(--roi-size) or fewer windows per call (--sw-batch-size)")
    return plan
