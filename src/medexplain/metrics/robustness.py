"""Robustness of an explanation to small input perturbations: max-sensitivity (Yeh et al. 2019, "On the
(In)fidelity and Sensitivity of Explanations", definition 3.1), through Captum's ``sensitivity_max``.

The explanation is re-computed by :func:`medexplain.engine.explain` with a registered method on every perturbed
input, for any target (the expanded rows follow their sample through
:class:`medexplain.methods.captum_methods.RowTarget`), 2D and 3D.
"""
from __future__ import annotations

import torch

from medexplain.errors import InputError
from medexplain.metrics.meta import MetricInfo, reexplaining, register_metric

__all__ = ["max_sensitivity", "sensitivity_draws"]


def sensitivity_draws(x: torch.Tensor, n: int, radius: float, seed: int = 0) -> torch.Tensor:
    """``(n, C, *s)`` uniform draws in ``[-radius, radius]`` from a generator seeded with ``seed``: the
    perturbations of :func:`max_sensitivity`, shared by the images of a batch."""
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    return torch.stack([(torch.rand(x.shape[1:], generator=gen, device=x.device, dtype=x.dtype) * 2 - 1) * float(radius)
                        for _ in range(n)])


@register_metric(MetricInfo(
    "max_sensitivity", "robustness", {"max_sensitivity": "lower"}, "max_sensitivity", ("Class", "MultiLabel", "Region"),
    "method", "Yeh et al. 2019 (NeurIPS), definition 3.1", "quantus.MaxSensitivity; captum.metrics.sensitivity_max"))
def max_sensitivity(model, x: torch.Tensor, method: str, target, n_samples: int = 10, radius: float = 0.2,
                    seed: int = 0, chunk_size: int | None = 64, method_options: dict | None = None,
                    **options) -> torch.Tensor:
    """Max-sensitivity ``(B,)``: ``max_j ||Phi(x + d_j) - Phi(x)||_F / ||Phi(x)||_F`` over ``n_samples``
    uniform perturbations ``d_j`` in ``[-radius, radius]`` of every input element (:func:`sensitivity_draws`;
    Quantus's default radius 0.2), ``Phi`` the maps of ``method`` (raw, with ``options``). Computed by Captum's
    ``sensitivity_max``; ``chunk_size`` bounds the perturbed images explained in one call (Captum's
    ``max_examples_per_batch``). A zero map has denominator 1 (Captum's convention). Lower is better.
    ``method_options``, ``model`` (explained as it is): as every metric that re-explains
    (:func:`medexplain.metrics.meta.reexplaining`)."""
    from captum.metrics import sensitivity_max

    from medexplain.engine.explain import explain
    from medexplain.methods.captum_methods import RowTarget
    tgt, options, model, x = reexplaining(max_sensitivity, model, x, target, method_options, options)
    if n_samples < 1:
        raise InputError(f"n_samples must be >= 1, got {n_samples}")
    b = x.shape[0]
    draws = sensitivity_draws(x, n_samples, radius, seed)
    state = {"next": 0}

    def perturb(inputs):  # Captum expands sample-major: row = sample * k + j
        k = inputs.shape[0] // b
        d = draws[state["next"]:state["next"] + k]
        state["next"] += k
        return inputs + d.unsqueeze(0).expand(b, *d.shape).reshape(-1, *x.shape[1:])

    def explanation(inputs, additional_forward_args):
        (idx,) = additional_forward_args
        inputs = inputs[0] if isinstance(inputs, tuple) else inputs
        return (explain(model, inputs, method, target=RowTarget(tgt, idx.long(), b), **options).map,)

    per_batch = min(max(chunk_size or b * n_samples, b), b * n_samples)
    return sensitivity_max(explanation, x, perturb, n_perturb_samples=n_samples, max_examples_per_batch=per_batch,
                           additional_forward_args=(torch.arange(b, device=x.device),))
