"""Occlusion (Zeiler & Fergus 2014), N-D: slide a window over the spatial axes (all channels at once),
replace it by a baseline, and credit each voxel with the mean score drop over the windows covering
it. Windows are evaluated in batches of ``chunk_size`` rows.

The baseline is a choice the result depends on (a black patch over a bright nodule is itself evidence):
:func:`perturbation_baseline` is the one rule for it, shared with feature ablation, KernelSHAP and LIME
(``methods/captum_methods.py``), and every map's info (``info.json``, the figure caption) names it. The
choices the peers offer: ``zero`` (Captum's default), ``mean`` and ``median`` of the image per channel,
``blur`` (a Gaussian-blurred copy, as ROAD's and RISE's blurred references), or any number. Which fits
which modality: ``docs/peers.md`` ("Perturbation baselines")."""
from __future__ import annotations

import itertools
import math

import torch

from medexplain.engine.core import check_baseline, chunks, forward
from medexplain.engine.registry import register
from medexplain.engine.sliding import forward_changed
from medexplain.errors import InputError

#: The named baselines of :func:`perturbation_baseline`.
BASELINES = ("zero", "mean", "median", "blur")


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x`` ``(B, C, *spatial)`` blurred by a separable Gaussian of ``sigma`` voxels along every spatial axis
    (replicated edges)."""
    import torch.nn.functional as F
    nd = x.ndim - 2
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    out = x.reshape(-1, 1, *x.shape[2:])
    for ax in range(nd):
        shape = [1, 1] + [1] * nd
        shape[2 + ax] = k.numel()
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - ax)] = pad[2 * (nd - 1 - ax) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), k.view(shape))
    return out.reshape(x.shape)


def perturbation_baseline(x: torch.Tensor, baseline) -> tuple[float | torch.Tensor, str]:
    """``(value, description)`` of what a perturbation method puts in place of a removed region of ``x``
    ``(B, C, *spatial)``: a number (``0`` = ``"zero"``), ``"mean"`` or ``"median"`` (per image and channel),
    ``"blur"`` (a Gaussian-blurred copy of the image, sigma 5 % of its smallest side, at least 1 voxel: only
    structure finer than that is removed), or a tensor broadcastable to ``x`` (used as given). The
    description goes into the map's info and the figure caption."""
    if isinstance(baseline, bool):
        raise InputError(f"baseline must be a number, one of {BASELINES} or a tensor, got {baseline!r}")
    if isinstance(baseline, str):
        name = baseline.strip().lower()
        try:
            baseline = float(name)
        except ValueError:
            pass
    if isinstance(baseline, (int, float)):
        v = check_baseline(baseline, x, "baseline")
        return v, "zero" if v == 0 else f"constant {v:g}"
    if isinstance(baseline, str):
        dims = tuple(range(2, x.ndim))
        if name == "zero":
            return 0.0, "zero"
        if name == "mean":
            return x.mean(dim=dims, keepdim=True), "mean of the image (per channel)"
        if name == "median":
            med = x.flatten(2).median(-1).values
            return med.view(*med.shape, *[1] * len(dims)), "median of the image (per channel)"
        if name == "blur":
            sigma = max(1.0, 0.05 * min(x.shape[2:]))
            return _gaussian_blur(x, sigma), f"blur (the image under a Gaussian of sigma {sigma:.3g} voxels)"
        raise InputError(f"baseline must be a number or one of {BASELINES}, got {baseline!r}")
    b = check_baseline(baseline, x, "baseline")
    return b, f"given tensor {tuple(b.shape)}"


def _tuple(v, n, what):
    t = (v,) * n if isinstance(v, int) else tuple(int(i) for i in v)
    if len(t) != n or min(t) < 1:
        raise InputError(f"occlusion {what} must be a positive int or {n} positive ints, got {v!r}")
    return t


def _windows(x_shape, o):
    """Window positions per image, or None when the options do not fit the image (the call will say why)."""
    spatial = x_shape[2:]
    window, stride = o["window"], o["stride"]
    win = (window,) * len(spatial) if isinstance(window, int) else tuple(window)
    step = win if stride is None else ((stride,) * len(spatial) if isinstance(stride, int) else tuple(stride))
    if len(win) != len(spatial) or len(step) != len(spatial):
        return None
    return math.prod(max(0, len(range(0, s - w + 1, max(1, st)))) for s, w, st in zip(spatial, win, step))


def _occlusion_cost(x_shape, o):
    n = _windows(x_shape, o)
    return None if n is None else (x_shape[0] + n * x_shape[0], 0)


@register("occlusion", needs_grad=False, family="perturbation", cost=_occlusion_cost,
          preview=lambda side: {"window": max(2, side // 8), "stride": max(1, side // 16)})
def occlusion(model, x, target, cost, window=8, stride=None, baseline: float | str = 0.0, chunk_size: int | None = 64):
    """Occlusion (Zeiler & Fergus 2014): map = mean over covering windows of f(x) - f(x with the window set to the baseline).

    ``window`` and ``stride`` are ints or one per spatial axis (stride defaults to the window). Voxels
    no window covers get 0. ``baseline``: a number (default 0, Captum's), ``"mean"``, ``"median"`` or
    ``"blur"`` (:func:`perturbation_baseline`). Matches Captum's Occlusion with a window spanning all channels.
    ``chunk_size``: rows given to the model in one call, filled with (window, sample) pairs across the batch.
    """
    b, spatial = x.shape[0], tuple(x.shape[2:])
    win = _tuple(window, len(spatial), "window")
    step = _tuple(stride if stride is not None else win, len(spatial), "stride")
    if any(w > s for w, s in zip(win, spatial)):
        raise InputError(f"occlusion window {win} larger than the image {spatial}")
    base, base_text = perturbation_baseline(x, baseline)
    starts = list(itertools.product(*[range(0, s - w + 1, st) for s, w, st in zip(spatial, win, step)]))
    with torch.no_grad():
        base_out = forward(model, x, cost)
        base_score = target.scores(base_out, None, b)
        total = torch.zeros((b, 1, *spatial), dtype=x.dtype, device=x.device)
        count = torch.zeros((1, 1, *spatial), dtype=x.dtype, device=x.device)
        for sl in chunks(len(starts) * b, chunk_size):   # (window, sample) rows, window-major, filled across samples
            j = torch.arange(sl.start, sl.stop, device=x.device)
            wins, rows = (j // b).tolist(), j % b
            masks = torch.zeros((len(wins), 1, *spatial), dtype=x.dtype, device=x.device)
            for i, w in enumerate(wins):
                masks[(i, 0, *[slice(s, s + n) for s, n in zip(starts[w], win)])] = 1
            base_rows = base[rows] if isinstance(base, torch.Tensor) else base
            rows_x = x[rows] * (1 - masks) + base_rows * masks
            boxes = [tuple(slice(s, s + n) for s, n in zip(starts[w], win)) for w in wins]
            # through a sliding-window inferer only the windows an occluder touches are re-run
            drop = base_score[rows] - target.scores(forward_changed(model, x, base_out, rows_x, rows, boxes, cost), rows, b)
            total.index_add_(0, rows, drop.view(-1, 1, *[1] * len(spatial)) * masks)
            count += masks[rows == 0].sum(0, keepdim=True)   # each window once
    return total / count.clamp(min=1), {"windows": len(starts), "window": win, "stride": step, "baseline": base_text}
