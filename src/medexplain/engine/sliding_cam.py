"""Class activation maps through sliding-window inference, window by window.

Through a ``SlidingWindowInferer`` (:mod:`medexplain.engine.sliding`, eq. 1 there) the CAM layer runs once per
window: window ``w`` gives activations ``A_w`` ``(K, *grid)``. Grad-CAM through MONAI's
``sliding_window_inference`` with a forward hook records only the last window's activations, so the map
has the wrong batch. Here the definition is that of the blended model itself:

- **The layer of the blended model is the union of the windows' layer cells** ``A = (A_w)_w``, and the
  gradient of the target score ``S(O)`` with respect to ``A_w`` is the window-by-window gradient of
  :mod:`medexplain.engine.sliding` (its eq. 2) stopped at the layer::

      dS/dA_w = VJP_{f above the layer}(x_w)[ g * (P_w^T dS/dO) / (P_w^T c) ]

  (zero, and not computed, for a window whose output cotangent is zero).
- **Each gradient CAM keeps its own formula, applied to that union.** For Grad-CAM (Selvaraju et al.
  2017, eq. 1-2) the channel weights are the gradient summed over all windows' cells,
  ``w_k = (1 / N) sum_w sum_cells dS/dA_w,k`` with ``N`` the number of cells of all windows (the standard
  Grad-CAM weights of the blended model), and window ``w``'s cell map is ``ReLU(sum_k w_k A_w,k)``;
  Grad-CAM++, HiResCAM, XGrad-CAM, LayerCAM, element-wise Grad-CAM and Eigen-CAM likewise, with their
  sums over cells taken over all windows.
- **The map is assembled window by window with the output's importance weights**: each window's cell
  map is brought to the window's grid by the layer's cell geometry (``upsample=``, as the registered CAM
  does), then ``M = sum_w P_w(g * U(cells_w)) / c``, cropped to the input when the windows were padded.

With one window covering the input, ``N`` is the layer's cell count, ``dS/dA`` is the plain gradient
(``g / c = 1``) and ``M = g U(cells) / g``: plain Grad-CAM (to rounding; tested to 1e-6).

The formulas are not rewritten here: :func:`windowed_cam` calls the registered method of
:mod:`medexplain.methods.cam` itself on :class:`_UnionOfWindows`, a stand-in module whose one layer
outputs the windows' cells side by side (concatenated along the last grid axis; every gradient CAM only
sums over cells or acts per cell, so the arrangement does not matter) and whose output has the value
``S`` and the gradient ``dS/dA`` there. Score-CAM and Ablation-CAM run the model on perturbed inputs
or layers, which the stand-in cannot do: they are refused through an inferer.

Cost: one no-graph blended forward (for ``dS/dO``), then one forward per window with the layer recorded
and, for the windows with a non-zero cotangent, one backward down to the layer; ``A`` and ``dS/dA`` of
every window are held at the layer's grid (``2 x windows x K x cells`` values), so on large volumes a
coarser layer costs less memory.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from medexplain.engine.core import Cost, n_passes
from medexplain.engine.registry import registered
from medexplain.engine.sliding import SlidingWindowModel
from medexplain.engine.targets import Class
from medexplain.errors import UnsupportedModelError
from medexplain.methods import cam


def windowed_method(spec):
    """The function that runs registered method ``spec`` through a :class:`~medexplain.engine.sliding.SlidingWindowModel`,
    as the method declares (:func:`medexplain.engine.registry.register`): :func:`windowed_cam` for a CAM declared
    ``windowed_cam``, a typed error for one declared ``no_sliding`` (with the reason), and the method itself
    otherwise (gradient and perturbation methods need nothing else)."""
    if spec.no_sliding:
        windowed = sorted(n for n, m in registered().items() if m.windowed_cam)
        raise UnsupportedModelError(f"method {spec.name!r} cannot run through a sliding-window inferer: "
                                    f"{spec.no_sliding}; use one of {', '.join(windowed)}")
    if spec.windowed_cam:
        return windowed_cam(spec)
    return spec.fn


class _UnionOfWindows(nn.Module):
    """Stand-in for the blended model at its CAM layer (module docstring): ``cells`` is called once per
    pass ``c`` of the model (ensemble members x test-time flips; one for a plain model) and outputs
    ``A_c`` ``(B, K, *grid_all)``, the pass's cells flipped back to the input's orientation; the output
    ``(B, 1)`` has the value ``S`` and, with respect to call ``c`` of ``cells``, the gradient ``G_c``."""

    aligned_calls = True   # the calls are the passes, already flipped back

    def __init__(self, a: torch.Tensor, g: torch.Tensor, score: torch.Tensor):
        super().__init__()
        self.cells = nn.Identity()
        self.a, self.g, self.score = a, g, score          # (calls, B, K, *grid_all)

    def forward(self, x):
        linear = sum((self.cells(self.a[c] + 0 * x) * self.g[c]).flatten(1).sum(1) for c in range(self.a.shape[0]))
        return (linear + (self.score - (self.a * self.g).flatten(2).sum(2).sum(0))).unsqueeze(1)


def _layer_windows(net: SlidingWindowModel, x, grad_out, plan, want_grad: bool):
    """``(A, G, n_windows)``: the plan's layer on every window of every sample, per pass of the model
    (members x flips, each flipped back: :func:`medexplain.methods.cam.capture_passes`) and (``want_grad``)
    the gradient of the blended target score at it (module docstring), the windows side by side along the
    last grid axis, ``(calls, B, K, *grid[:-1], W * grid[-1])`` each (written in place: one copy of each)."""
    geo = net.geometry(x)
    xp = geo.pad_input(x.detach())
    gp = geo.pad_output(grad_out) if grad_out is not None else None
    b, n_win = x.shape[0], len(geo.slices)
    jobs = [(s, w) for s in range(b) for w in range(n_win)]
    acts = grads = None
    passes = n_passes(net.model)
    for part in range(0, len(jobs), int(net.inferer.sw_batch_size)):
        items = jobs[part:part + int(net.inferer.sw_batch_size)]
        xin = net._window_rows(xp, [(s, geo.slices[w]) for s, w in items])
        cot = None
        live = torch.zeros(len(items), dtype=torch.bool, device=x.device)
        if want_grad:
            cot = net.window_cotangent(gp, geo, items)
            live = cot.flatten(1).ne(0).any(1)
        with cam.capture_passes(net.model, plan, "leaf" if want_grad else "detach") as recorded, \
                torch.set_grad_enabled(want_grad and bool(live.any())):
            out = net.predict(xin)
            calls = recorded(len(items), False)
            gs = [torch.zeros_like(c.tensor) for c in calls]
            if want_grad and bool(live.any()):
                if not out.requires_grad:
                    raise UnsupportedModelError(f"the target score does not depend on layer {plan.name!r}")
                found = torch.autograd.grad(out, [c.tensor for c in calls], cot.to(dtype=out.dtype, device=out.device),
                                            allow_unused=True)
                gs = [z if g is None else g for z, g in zip(gs, found)]
                net.stats.n_backward += int(live.sum()) * passes
                net.stats.windows.update(w for (_, w), on in zip(items, live.tolist()) if on)
        a = torch.stack([cam.unflip(plan.view(c.tensor.detach()), c.dims) for c in calls])
        g = torch.stack([cam.unflip(plan.view(t.detach()), c.dims) for t, c in zip(gs, calls)])
        k, *grid = a.shape[2:]
        if acts is None:
            acts = torch.zeros((len(calls), b, k, *grid[:-1], n_win * grid[-1]), dtype=a.dtype, device=x.device)
            grads = torch.zeros_like(acts)
        for i, (s, w) in enumerate(items):
            place = (slice(None), s, Ellipsis, slice(w * grid[-1], (w + 1) * grid[-1]))
            acts[place], grads[place] = a[:, i].to(x.device), g[:, i].to(x.device)
    return acts, grads, n_win


def windowed_cam(spec):
    """Registered CAM ``spec`` through a sliding-window model (module docstring); same options."""

    def run(net, x, target, cost, layer=None, upsample: str = "aligned", layout: str = "auto", reshape=None,
            **options):
        if not isinstance(net, SlidingWindowModel):
            return spec.fn(net, x, target, cost, layer=layer, upsample=upsample, layout=layout, reshape=reshape,
                           **options)
        geo = net.geometry(x)
        probe = x.new_zeros((1, x.shape[1], *geo.roi))        # a window-shaped input for the layer plan
        plan = cam.plan_for(net.model, probe, Cost(), layer, layout, reshape)
        grad_out, score = None, None
        if spec.needs_grad:
            with torch.no_grad():
                out = net(x)
            out = out.detach().requires_grad_(True)
            with torch.enable_grad():
                s = target.scores(out, None, x.shape[0])
                (grad_out,) = torch.autograd.grad(s.sum(), out, allow_unused=True)
            if grad_out is None:
                raise UnsupportedModelError("the target score does not depend on the model output")
            score = s.detach()
        acts, grads, n_win = _layer_windows(net, x, grad_out, plan, spec.needs_grad)
        b, grid = acts.shape[1], [*acts.shape[3:-1], acts.shape[-1] // n_win]
        stand_in = _UnionOfWindows(acts, grads, score if score is not None else acts.new_zeros(b))
        del acts, grads
        dummy = stand_in.a.new_zeros((b, 1, *stand_in.a.shape[3:]))
        cells, extra = spec.fn(stand_in, dummy, Class(0), Cost(), layer="cells", upsample=upsample,
                               layout="channels_first", **options)
        cells = cells.reshape(b, cells.shape[1], *grid[:-1], n_win, grid[-1]).movedim(-2, 1)   # (B, W, 1, *grid)
        total = torch.zeros((b, cells.shape[2], *geo.image), dtype=x.dtype, device=x.device)
        for w, sl in enumerate(geo.slices):
            up = cam.upsample_cells(cells[:, w], geo.roi, plan.centres, upsample)
            total[(slice(None), slice(None), *sl)] += geo.importance * up.to(x.dtype)
        amap = (total / geo.count)[(slice(None), slice(None), *geo.crop)]
        cost.n_forward += x.shape[0] * n_passes(net.model)
        cost.n_backward += x.shape[0] * n_passes(net.model) if spec.needs_grad else 0
        info = {k: v for k, v in extra.items() if k not in ("layer", "layout", "cell_centres", "geometry", "layer_choice")}
        return amap, {**plan.info(), **info, "upsample": upsample, "definition": "the CAM of the blended model: "
                      "its formula over the union of the windows' layer cells, maps blended as the output"}

    run.__signature__ = inspect.signature(spec.fn)
    run.__doc__ = spec.fn.__doc__
    return run
