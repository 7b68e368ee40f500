"""The stable entry points: ``mx.explain`` and ``mx.available_methods`` over the method registry.

``explain`` does what is common to every registered method (:mod:`medexplain.engine.registry`): option
checks, the model object (:class:`medexplain.models.model.Model`: a bare ``nn.Module`` is wrapped in one; its
output adapter, sliding window, flips, ensemble, device and train/eval policy are the Model's), input checks
(and the one move to the model's device), target parsing,
the model guard (the Model's train/eval policy, frozen weights, buffers restored afterwards), cost
counting, and the :class:`Attribution` (map on the CPU, ``info`` with the model's description).
"""
from __future__ import annotations

import torch

from medexplain import methods  # noqa: F401  (importing the package registers every explainer)
from medexplain.engine.attribution import Attribution
from medexplain.engine.core import Cost, check_input, forward, model_expectations, model_guard, output_notes, require_hooks
from medexplain.engine.options import plan_memory, plan_window_memory
from medexplain.engine.registry import accepted_options, default_method, get_method, registered, route_options  # noqa: F401
from medexplain.engine.sliding import is_sliding, window_info
from medexplain.engine.sliding_cam import windowed_method
from medexplain.engine.targets import Regions, ValueTarget, as_target
from medexplain.errors import MedexplainError, OptionError, TargetError
from medexplain.models.model import as_model


def available_methods(model=None, x: torch.Tensor | None = None) -> list[str]:
    """Names accepted by :func:`explain`; with ``model`` (an ``nn.Module`` or an :class:`mx.Model
    <medexplain.models.model.Model>`), only the methods that apply to it (hooks for CAMs, PatchNet saliency
    for PatchNets, classifier-only methods). With ``x`` one forward (no gradients, model guarded) tells
    classifiers from segmenters."""
    methods_ = registered()
    if model is None:
        return sorted(methods_)
    m = as_model(model)
    out = None
    if x is not None:
        with model_guard(m, policy=m.eval_policy), torch.no_grad():
            xm = m.to_input(check_input(x, **model_expectations(m)))
            try:
                out = forward(m.runner, xm)
            except MedexplainError:
                raise
            except Exception as e:   # the model's own error explained, as explain() does
                from medexplain.models.loading import model_error, raised_in_model
                if not raised_in_model(e, m):
                    raise
                raise model_error(m, xm, e) from e
    return sorted(n for n, spec in methods_.items() if spec.applies_to(m.runner, out))


def explain(model, x: torch.Tensor, method: str | None = None, target=None, memory: float | None = None,
            **options) -> Attribution:
    """Explain ``model`` at ``x`` with ``method`` for ``target``.

    ``model``: an :class:`mx.Model <medexplain.models.model.Model>` (the network or an ensemble, test-time
    flips, output adapter ``output=``, inferer ``inferer=``, device, dtype, train/eval policy), or an ``nn.Module``,
    which is wrapped in one (``mx.Model(model)``; ``mx.Model(model, output=..., inferer=...)`` sets them).
    ``x`` is ``(B, C, H, W)`` or
    ``(B, C, D, H, W)``; ``method`` a registered name (default: the registry's default method, saliency);
    ``target`` an int, a list of ints (one per sample) or a :mod:`medexplain.engine.targets` object. With a
    :class:`~medexplain.engine.targets.Regions` target the map has one row per region: a method declared
    ``regions=True`` takes the regions as they are, any other is run on each region's image with that
    region's target. The Model's ``output`` selects what is explained when the network returns a tuple, dict or
    stacked heads (:func:`medexplain.engine.core.select_output`). ``options`` go to the method (see its docstring, e.g. ``layer=``
    for CAMs, ``n_samples=`` for SmoothGrad, ``chunk_size=``: rows given to the model in one call). The
    model is left exactly as found, also when an error is raised. With the Model's ``inferer`` (a
    ``monai.inferers.SlidingWindowInferer``) the model runs window by window, with the exact
    window-by-window gradient, and ``info`` counts windows (:mod:`medexplain.engine.sliding`).

    Every method explains the Model's prediction, the mean over its passes (members x flips): gradients
    are exact through the mean, ``info["n_forward"]`` / ``["n_backward"]`` count every pass, CAMs flip
    each pass's layer cells back before combining (``docs/cam.md``). ``info["model"]`` describes the
    Model, ``info["score"]`` says when logits are taken at the input of a final Softmax/Sigmoid, and
    ``info["eval"]`` when the train/eval policy changed or kept a mode. Maps come back on the CPU.

    ``memory``: the budget in GB of one model call (default: half the memory available now). The peak of
    one call (all its passes) is measured on a probe row (:func:`medexplain.engine.options.probe_row_bytes`),
    ``chunk_size`` is capped to the rows that fit, and a call that cannot fit even one row raises
    :class:`~medexplain.errors.MemoryBudgetError` before any compute (:func:`medexplain.engine.options.plan_memory`);
    ``info["memory"]`` records the plan. Through an inferer it bounds the peak of the whole explanation
    instead: window graphs are kept while they fit, recomputed when not, and the full-volume arrays are
    memory-mapped when even they do not fit (:func:`medexplain.engine.options.plan_window_memory`).
    """
    spec = get_method(default_method() if method is None else method)
    beside = sorted(set(options) & {"output", "inferer"})
    if beside:   # settings of the model object, not of a method (issue 23)
        raise OptionError(f"{', '.join(k + '=' for k in beside)} is a setting of the model object: "
                          f"mx.explain(mx.Model(net, {', '.join(k + '=...' for k in beside)}), x, ...)")
    options = spec.check_options(options)   # names, types, ranges and choices from the signature; declared check
    m = as_model(model)
    if spec.needs_hooks:
        require_hooks(m)
    if spec.why_not_amp(m.runner):
        raise OptionError(f"{spec.name} {spec.why_not_amp(m.runner)}; explain with amp=False (no --amp)")
    expected = model_expectations(m)
    if m._dtype_given is not None:   # the Model casts inputs to its dtype
        expected.pop("dtype", None)
    x = m.to_input(check_input(x, **expected))
    tgt = as_target(target) if (spec.needs_target or target is not None) else None
    if spec.needs_grad and tgt is not None and not tgt.differentiable:
        raise TargetError(f"{spec.name} differentiates the target, and {type(tgt).__name__} scores a hard prediction "
                          "(no gradient); use its soft form (soft=True) or a method that does not differentiate")
    given = tgt
    if isinstance(tgt, ValueTarget):
        tgt = tgt.bind(m)   # a value target that leaves the activation to the model reads the Model's
    if isinstance(tgt, Regions) and not spec.regions:
        x, tgt = tgt.per_region(x)                # one row per region, each with its own Region target
    net = m.runner
    if is_sliding(net):
        net.reset()   # a Model keeps its sliding-window module: count this explanation's windows only
    fn = windowed_method(spec) if is_sliding(net) else spec.fn
    notes: dict = {}
    with model_guard(m, policy=m.eval_policy, notes=notes), output_notes() as read:
        if is_sliding(net):   # the peak of the whole explanation through windows
            plan = plan_window_memory(net, x, memory)
        else:                 # the memory of one model call, checked before any compute
            options, plan = plan_memory(spec.name, spec.fn, net, x, options, memory)
        cost = Cost()
        try:
            amap, extra = fn(net, x, tgt, cost, **options)
        except MedexplainError:
            raise
        except Exception as e:  # raised inside the model's own forward: say what was given and expected
            from medexplain.models.loading import model_error, raised_in_model
            if not raised_in_model(e, m):
                raise
            raise model_error(m, x, e) from e
    info = window_info(net, cost.info(**extra))
    info.update(m.info(notes))
    if plan is not None:
        info["memory"] = plan.as_dict()
    if read:   # how the model's output was read (a one-key dict taken as its value)
        info["output_note"] = "; ".join(read)
    if m.passes.amp and amap.is_floating_point():   # cells captured under autocast are half precision
        amap = amap.to(x.dtype)
    return Attribution(amap.detach().cpu(), spec.name, given, info)
