"""Occlusion (Zeiler & Fergus 2014), N-D: slide a window over the spatial axes (all channels at once),
replace it by a baseline value, and credit each voxel with the mean score drop over the windows covering
it. Windows are evaluated in batches of ``chunk_size`` rows."""
from __future__ import annotations

import itertools
import math

import torch

from ..core import chunks, forward
from ..errors import InputError
from ..registry import register
from ..sliding import forward_changed


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
def occlusion(model, x, target, cost, window=8, stride=None, baseline: float = 0.0, chunk_size: int | None = 64):
    """Map = mean over covering windows of f(x) - f(x with the window set to ``baseline``).

    ``window`` and ``stride`` are ints or one per spatial axis (stride defaults to the window). Voxels
    no window covers get 0. Matches Captum's Occlusion with a window spanning all channels.
    """
    b, spatial = x.shape[0], tuple(x.shape[2:])
    win = _tuple(window, len(spatial), "window")
    step = _tuple(stride if stride is not None else win, len(spatial), "stride")
    if any(w > s for w, s in zip(win, spatial)):
        raise InputError(f"occlusion window {win} larger than the image {spatial}")
    starts = list(itertools.product(*[range(0, s - w + 1, st) for s, w, st in zip(spatial, win, step)]))
    with torch.no_grad():
        base_out = forward(model, x, cost)
        base_score = target.scores(base_out, None, b)
        total = torch.zeros((b, 1, *spatial), dtype=x.dtype, device=x.device)
        count = torch.zeros((1, 1, *spatial), dtype=x.dtype, device=x.device)
        per = max(1, (chunk_size or len(starts) * b) // b)
        for sl in chunks(len(starts), per):
            masks = torch.zeros((sl.stop - sl.start, 1, 1, *spatial), dtype=x.dtype, device=x.device)
            for i, st in enumerate(starts[sl]):
                masks[(i, 0, 0, *[slice(s, s + w) for s, w in zip(st, win)])] = 1
            rows_x = (x.unsqueeze(0) * (1 - masks) + baseline * masks).reshape(-1, *x.shape[1:])
            rows = torch.arange(b, device=x.device).repeat(len(masks))
            boxes = [tuple(slice(s, s + w) for s, w in zip(st, win)) for st in starts[sl] for _ in range(b)]
            # through a sliding-window inferer only the windows an occluder touches are re-run
            drop = base_score[rows] - target.scores(forward_changed(model, x, base_out, rows_x, rows, boxes, cost), rows, b)
            total += (drop.view(-1, b, 1, *[1] * len(spatial)) * masks).sum(0)
            count += masks.sum(0)
    return total / count.clamp(min=1), {"windows": len(starts), "window": win, "stride": step}
