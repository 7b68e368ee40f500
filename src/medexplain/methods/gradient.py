"""Gradient baselines: saliency, SmoothGrad, integrated gradients.

All are N-D and batched: the expanded rows (noise samples, IG steps) of every sample go through the
model together in chunks of ``chunk_size`` rows (the one meaning of ``chunk_size``, ``docs/design.md``),
whole expansions of the batch at a time, with one backward per chunk.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from medexplain.engine.core import check_baseline, chunks, forward, input_gradient
from medexplain.engine.ops import noise_sum
from medexplain.engine.registry import register
from medexplain.errors import InputError, OptionError

#: The quadrature rules of integrated gradients (Captum's).
IG_RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")

#: NumPy's Gauss-Legendre rule (``numpy.polynomial.legendre.leggauss``) builds an ``n x n`` companion
#: matrix: ``steps=100000`` asks for 74.5 GiB. Above this many steps the Riemann rules are required.
MAX_GAUSS_LEGENDRE_STEPS = 2000


def _one_pass(x_shape, o):
    return x_shape[0], x_shape[0]


def _per_noise_sample(x_shape, o):
    return o["n_samples"] * x_shape[0], o["n_samples"] * x_shape[0]


@register("saliency", cost=_one_pass, default=True, dicom_concept="Saliency")
def saliency(model, x, target, cost, abs: bool = False):
    """Saliency (Simonyan et al. 2014, section 3.1): d score / d x, raw and signed (``abs=True`` gives
    Captum's default |grad|)."""
    b = x.shape[0]
    g = input_gradient(model, x, target, torch.arange(b, device=x.device), b, cost)
    return (g.abs() if abs else g), {}


@register("smoothgrad", cost=_per_noise_sample, dicom_concept="Saliency")
def smoothgrad(model, x, target, cost, n_samples: int = 50, sigma: float = 0.15, seed: int = 0,
               chunk_size: int | None = 64, noise: torch.Tensor | None = None, squared: bool = False):
    """SmoothGrad (Smilkov et al. 2017, eq. 3): mean input gradient over ``n_samples`` noisy copies
    ``x + eps_n``, ``eps_n ~ N(0, sd^2)`` with ``sd = sigma x (max - min)`` of each sample.

    The noise loop is :func:`medexplain.engine.ops.noise_sum` (``scale="sample"``): one draw per noise sample
    from ``seed``, so the maps never depend on ``chunk_size`` or on the rest of the batch. ``noise``
    (absolute, ``(N, C, *s)`` or ``(N, B, C, *s)``) replaces the generator. ``chunk_size``: rows given
    to the model in one call (whole noise samples of the batch at a time, at least one).
    ``squared=True`` averages squared gradients (SmoothGrad-Squared).
    """
    if n_samples < 1:
        raise InputError("n_samples must be >= 1")
    b = x.shape[0]

    def gradients(noisy, rows, n):
        g = input_gradient(model, noisy, target, rows, b, cost).view(n, *x.shape)
        return (g * g if squared else g).sum(0)

    total = noise_sum(x, gradients, n_samples, sigma, seed, chunk_size, scale="sample", noise=noise)
    return total / n_samples, {"n_samples": n_samples, "sigma": sigma, "seed": seed}


def ig_alphas(steps: int, rule: str = "gausslegendre") -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes and weights on [0, 1] for the path integral (the rules Captum offers)."""
    if steps < 1:
        raise InputError("steps must be >= 1")
    if rule == "gausslegendre":
        nodes, w = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (nodes + 1), 0.5 * w
    if rule == "riemann_trapezoid":  # textbook weights (sum 1); Captum's sum to 1 - 1/n
        if steps < 2:
            raise InputError("riemann_trapezoid needs steps >= 2")
        w = np.full(steps, 1.0 / (steps - 1))
        w[[0, -1]] /= 2
        return np.linspace(0, 1, steps), w
    w = np.full(steps, 1.0 / steps)
    starts = {"riemann_left": 0.0, "riemann_right": 1.0 / steps, "riemann_middle": 0.5 / steps}
    if rule not in starts:
        raise InputError(f"unknown IG rule {rule!r}; use gausslegendre or riemann_left/right/middle/trapezoid")
    return starts[rule] + np.arange(steps) / steps, w


def _ig_cost(x_shape, o):
    b = x_shape[0]
    return o["steps"] * b + (2 * b if o["completeness"] else 0), o["steps"] * b


def _ig_check(o):
    steps = o["steps"]
    if o["rule"] == "gausslegendre" and isinstance(steps, int) and steps > MAX_GAUSS_LEGENDRE_STEPS:
        gib = steps * steps * 8 / 2 ** 30
        raise OptionError(f"integrated_gradients: steps={steps} with rule=gausslegendre needs a {steps} x {steps} "
                          f"matrix ({gib:.1f} GiB) for the quadrature nodes; use at most "
                          f"{MAX_GAUSS_LEGENDRE_STEPS} steps, or rule=riemann_middle")


@register("integrated_gradients", aliases=("ig",), cost=_ig_cost, check=_ig_check,
          preview=lambda side: {"steps": 32})
def integrated_gradients(model, x, target, cost, baseline=0.0, steps: int = 50,
                         rule: Literal[IG_RULES] = "gausslegendre",
                         chunk_size: int | None = 64, completeness: bool = True):
    """Integrated gradients (Sundararajan et al. 2017, eq. 1): (x - x') * integral_0^1 grad f(x' + a (x - x')) da by quadrature.

    ``baseline`` is a scalar or a tensor broadcastable to ``x`` (zero by default). ``info`` reports the
    completeness error |sum(attr) - (f(x) - f(x'))| per sample. ``rule``: the quadrature
    (``gausslegendre``, ``riemann_left|right|middle|trapezoid``, as in Captum) (one extra forward of 2 rows per sample).
    """
    b = x.shape[0]
    base = torch.as_tensor(check_baseline(baseline, x), dtype=x.dtype, device=x.device).expand_as(x)
    alphas, weights = ig_alphas(steps, rule)
    a_t = torch.as_tensor(alphas, dtype=x.dtype, device=x.device)
    w_t = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
    delta = x - base
    total = torch.zeros_like(x)
    per = max(1, (chunk_size or steps * b) // b)
    for sl in chunks(steps, per):
        a = a_t[sl].view(-1, 1, *[1] * (x.ndim - 1))
        rows_x = (base.unsqueeze(0) + a * delta.unsqueeze(0)).reshape(-1, *x.shape[1:])
        rows = torch.arange(b, device=x.device).repeat(sl.stop - sl.start)
        g = input_gradient(model, rows_x, target, rows, b, cost).view(-1, *x.shape)
        total += (g * w_t[sl].view(-1, *[1] * x.ndim)).sum(0)
    attr = delta * total
    extra = {"steps": steps, "rule": rule}
    if completeness:
        with torch.no_grad():
            out = forward(model, torch.cat([x, base]), cost)
            rows = torch.arange(b, device=x.device).repeat(2)
            s = target.scores(out, rows, b)
        err = (attr.flatten(1).sum(1) - (s[:b] - s[b:])).abs()
        extra["completeness_error"] = err.tolist()
    return attr, extra
