"""Occlusion (Zeiler & Fergus 2014), N-D: slide a window over the spatial axes (all channels at once),
replace it by a baseline value, and credit each voxel with the mean score drop over the windows covering
it. Windows are evaluated in batches of ``chunk_size`` rows."""
from __future__ import annotations

import itertools

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


@register("occlusion", needs_grad=False)
def occlusion(model, x, target, cost, window=8, stride=None, baseline: float = 0.0, chunk_size: int | None = 64):
    """Map = mean over covering windows of f(x) - f(x with the window set to ``baseline``).

    ``window`` and ``stride`` are ints or one per spatial axis (stride defaults to the window). Voxels
    no window covers get 0. Matches Captum's Occlusion with a window spanning all channels. ``chunk_size``:
    rows given to the model in one call, filled with (window, sample) pairs across the batch.
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
        for sl in chunks(len(starts) * b, chunk_size):   # (window, sample) rows, window-major, filled across samples
            j = torch.arange(sl.start, sl.stop, device=x.device)
            wins, rows = (j // b).tolist(), j % b
            masks = torch.zeros((len(wins), 1, *spatial), dtype=x.dtype, device=x.device)
            for i, w in enumerate(wins):
                masks[(i, 0, *[slice(s, s + n) for s, n in zip(starts[w], win)])] = 1
            rows_x = x[rows] * (1 - masks) + baseline * masks
            boxes = [tuple(slice(s, s + n) for s, n in zip(starts[w], win)) for w in wins]
            # through a sliding-window inferer only the windows an occluder touches are re-run
            drop = base_score[rows] - target.scores(forward_changed(model, x, base_out, rows_x, rows, boxes, cost), rows, b)
            total.index_add_(0, rows, drop.view(-1, 1, *[1] * len(spatial)) * masks)
            count += masks[rows == 0].sum(0, keepdim=True)   # each window once
    return total / count.clamp(min=1), {"windows": len(starts), "window": win, "stride": step}
