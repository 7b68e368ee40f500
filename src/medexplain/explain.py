"""The stable entry points: ``mx.explain`` and ``mx.available_methods`` over the method registry.

``explain`` does what is common to every registered method (:mod:`medexplain.registry`): option
checks, the output adapter (``output=``), input checks, target parsing, the model guard (eval mode,
frozen weights, restored afterwards), cost counting, and the :class:`Attribution`.
"""
from __future__ import annotations

import torch

from . import methods  # noqa: F401  (importing the package registers every explainer)
from .attribution import Attribution
from .core import Cost, check_input, model_expectations, model_guard, output_notes, require_hooks, with_output
from .errors import MedexplainError
from .options import check_options
from .registry import accepted_options, get_method, registered, route_options  # noqa: F401  (re-exported)
from .sliding import is_sliding, window_info, with_inferer
from .sliding_cam import windowed_method
from .targets import as_target


def available_methods(model=None, x: torch.Tensor | None = None, output=None) -> list[str]:
    """Names accepted by :func:`explain`; with ``model``, only the methods that apply to it (hooks for
    CAMs, PatchNet saliency for PatchNets, classifier-only methods). With ``x`` one forward (no
    gradients, model guarded) tells classifiers from segmenters."""
    methods_ = registered()
    if model is None:
        return sorted(methods_)
    out = None
    if x is not None:
        from .models.loading import checked_forward  # the model's own error explained, as explain() does
        out = checked_forward(with_output(model, output), check_input(x, **model_expectations(model)))
    return sorted(n for n, m in methods_.items() if m.applies_to(model, out))


def explain(model: torch.nn.Module, x: torch.Tensor, method: str = "saliency", target=None, output=None,
            inferer=None, **options) -> Attribution:
    """Explain ``model`` at ``x`` with ``method`` for ``target``.

    ``x`` is ``(B, C, H, W)`` or ``(B, C, D, H, W)``; ``target`` an int, a list of ints (one per sample)
    or a :mod:`medexplain.targets` object. ``output`` selects what is explained when the model returns a
    tuple, dict or stacked heads (:func:`medexplain.core.select_output`). ``options`` go to the method
    (see its docstring, e.g. ``layer=`` for CAMs, ``n_samples=`` for SmoothGrad, ``chunk_size=``: rows
    given to the model in one call). The model is left exactly as found, also when an error is raised.
    ``inferer``: a ``monai.inferers.SlidingWindowInferer``; the model then runs window by window, with
    the exact window-by-window gradient, and ``info`` counts windows (:mod:`medexplain.sliding`).
    """
    spec = get_method(method)
    options = check_options(spec.name, spec.fn, options)   # names, types and ranges from the signature
    if spec.needs_hooks:
        require_hooks(model)
    x = check_input(x, **model_expectations(model))
    tgt = as_target(target) if (spec.needs_target or target is not None) else None
    net = with_inferer(model, inferer, output)
    fn = windowed_method(spec) if is_sliding(net) else spec.fn
    with model_guard(model), output_notes() as notes:
        cost = Cost()
        try:
            amap, extra = fn(net, x, tgt, cost, **options)
        except MedexplainError:
            raise
        except Exception as e:  # raised inside the model's own forward: say what was given and expected
            from .models.loading import model_error, raised_in_model
            if not raised_in_model(e, model):
                raise
            raise model_error(model, x, e) from e
    info = cost.info(**extra, **({"output_note": "; ".join(notes)} if notes else {}))
    return Attribution(amap.detach(), spec.name, tgt, window_info(net, info))
