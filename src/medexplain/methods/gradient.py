"""Gradient baselines: saliency, SmoothGrad, integrated gradients.

All are N-D and batched: the expanded rows (noise samples, IG steps) of every sample go through the
model together in chunks of ``chunk_size`` rows (the one meaning of ``chunk_size``, ``docs/design.md``),
whole expansions of the batch at a time, with one backward per chunk.
"""
from __future__ import annotations

import numpy as np
import torch

from ..core import check_baseline, chunks, forward, input_gradient
from ..errors import InputError
from ..ops import NoiseSource
from ..registry import register


@register("saliency")
def saliency(model, x, target, cost, abs: bool = False):
    """Saliency (Simonyan et al. 2014, section 3.1): d score / d x, raw and signed (``abs=True`` gives
    Captum's default |grad|)."""
    b = x.shape[0]
    g = input_gradient(model, x, target, torch.arange(b, device=x.device), b, cost)
    return (g.abs() if abs else g), {}


@register("smoothgrad")
def smoothgrad(model, x, target, cost, n_samples: int = 50, sigma: float = 0.15, seed: int = 0,
               chunk_size: int | None = 64, noise: torch.Tensor | None = None, squared: bool = False):
    """SmoothGrad (Smilkov et al. 2017, eq. 3): mean input gradient over ``n_samples`` noisy copies
    ``x + eps_n``, ``eps_n ~ N(0, sd^2)`` with ``sd = sigma x (max - min)`` of each sample.

    The noise is :class:`medexplain.ops.NoiseSource` (``scale="sample"``): one draw per noise sample
    from ``seed``, so the maps never depend on ``chunk_size`` or on the rest of the batch. ``noise``
    (absolute, ``(N, C, *s)`` or ``(N, B, C, *s)``) replaces the generator. ``chunk_size``: rows given
    to the model in one call (whole noise samples of the batch at a time, at least one).
    ``squared=True`` averages squared gradients (SmoothGrad-Squared).
    """
    if n_samples < 1:
        raise InputError("n_samples must be >= 1")
    b = x.shape[0]
    source = NoiseSource(x, n_samples, sigma, seed, scale="sample", noise=noise)
    total = torch.zeros_like(x)
    for sl, noisy in source.chunks(max(1, (chunk_size or n_samples * b) // b)):
        n = sl.stop - sl.start
        rows = torch.arange(b, device=x.device).repeat(n)
        g = input_gradient(model, noisy.reshape(-1, *x.shape[1:]), target, rows, b, cost).view(n, *x.shape)
        total += (g * g if squared else g).sum(0)
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


@register("integrated_gradients")
def integrated_gradients(model, x, target, cost, baseline=0.0, steps: int = 50, rule: str = "gausslegendre",
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
