"""Instance SmoothGrad: one saliency map per lesion instance (region) and input channel, as a registered method.

Spagnolo et al., "Instance-level quantitative saliency in multiple sclerosis lesion segmentation"
(seed 001). For a segmentation network with logits ``z`` of shape ``(B, K, *spatial)`` and one lesion
instance ``L`` (a region of a :class:`~medexplain.engine.targets.Regions` target, on the output grid):

* **mean aggregation** (their eq. for ``S_L``)::

      S_L = 1/N sum_{n=1..N} d/dx [ sum_{v in L} z_c(v) ] (x + eps_n),   eps_n ~ Normal(0, sd^2)

  with ``z_c`` the pre-softmax logit of the lesion class, ``N = 50`` and ``sd = 0.05 * (max - min)`` of
  the **first** input channel, the same sd for every channel (the one noise loop
  :func:`medexplain.engine.ops.noise_sum`, ``scale="channel0"``);
* **max aggregation**: for each lesion voxel ``v``, ``g_v = d z_c(v) / dx``; at each input voxel keep the
  signed ``g_v`` of largest magnitude over ``v in L``; average over the N noise samples. One backward row
  per lesion voxel and noise sample.

``mx.explain(model, x, "instance_smoothgrad", target=Regions(channel, masks, samples))`` gives
``(R, C, *spatial)``, raw and signed. Instance Grad-CAM++ needs no method of its own: it is the registered
``gradcam++`` over a ``Regions`` target (run on each region's image), at the decoder layer the
instance API chooses (:func:`medexplain.segmentation.decoder_layer`).

Cost. Gradients are linear in the output cotangent, so the mean-aggregated map of every instance is a
vector-Jacobian product of the same forward pass with a different output mask. The forward of each
noise sample is therefore run **once** per image and the masks of its instances are backpropagated
together as a batch of cotangents (``torch.autograd.grad(..., is_grads_batched=True)``, strategy
``"batched"``). Alternatives kept for comparison: ``"loop"`` (one backward per instance on the retained
graph, as the reference code), ``"vmap"`` (``torch.func.vjp`` under ``torch.func.vmap``) and
``"replicate"`` (the input replicated per instance, one forward and backward of all rows). Max
aggregation backpropagates one-hot cotangents of the lesion voxels in batches of ``backward_rows`` rows on
the same forward. Through a sliding-window inferer ``"batched"`` runs as ``"loop"`` (each instance is
backpropagated through the windows it touches only) and ``"vmap"`` is refused.

Differences from the reference code (federicospagnolo/IES) are listed in ``docs/instances.md``.
"""
from __future__ import annotations

from typing import Literal

import torch

from medexplain.engine.core import chunks, forward
from medexplain.engine.ops import noise_sum
from medexplain.engine.registry import register, segmenter_only
from medexplain.engine.sliding import is_sliding
from medexplain.engine.targets import Class, Region, Regions
from medexplain.errors import InputError, TargetError, UnsupportedModelError
from medexplain.methods.gradient import smoothgrad

STRATEGIES = ("batched", "loop", "vmap", "replicate")


def _check_output(out: torch.Tensor, masks: torch.Tensor, channel: int) -> None:
    if out.ndim != masks.ndim + 1:
        raise TargetError(f"instance saliency needs a dense output (B, K, *spatial); the model returned "
                          f"{tuple(out.shape)}")
    if not 0 <= channel < out.shape[1]:
        raise TargetError(f"channel {channel} out of range for a model with {out.shape[1]} output channels "
                          f"(0..{out.shape[1] - 1})")
    if tuple(out.shape[2:]) != tuple(masks.shape[1:]):
        raise InputError(f"instance masks are {tuple(masks.shape[1:])}, the model output grid is "
                         f"{tuple(out.shape[2:])}: find instances on the model's output")


def _lesion_logits(model, xn, masks, channel, cost, first):
    """Forward the noisy rows once and return the lesion-class logits ``(N, *s)``, differentiable in ``xn``."""
    out = forward(model, xn, cost)
    if first:
        _check_output(out, masks, channel)
    z = out[:, channel]
    if not z.requires_grad:
        raise UnsupportedModelError("the model output does not depend differentiably on the input")
    return z


def _vjp_mean(model, xn, masks, channel, strategy, cost, first, backward_rows):
    """Sum over the noise rows of d(sum_v m_i(v) z_c(v))/dx for each mask ``m_i``: ``(I, C, *s)``."""
    n, n_inst = xn.shape[0], masks.shape[0]
    per = max(1, backward_rows // n)
    total = torch.zeros((n_inst, *xn.shape[1:]), dtype=xn.dtype, device=xn.device)
    if strategy == "replicate":
        for sl in chunks(n_inst, per):
            i = sl.stop - sl.start
            xr = xn.unsqueeze(0).expand(i, *xn.shape).reshape(i * n, *xn.shape[1:]).detach().requires_grad_(True)
            out = forward(model, xr, cost)
            if first:
                _check_output(out, masks, channel)
                first = False
            s = (out[:, channel].reshape(i, n, *masks.shape[1:]) * masks[sl].unsqueeze(1)).sum()
            (g,) = torch.autograd.grad(s, xr)
            cost.n_backward += i * n
            total[sl] = g.view(i, n, *xn.shape[1:]).sum(1)
        return total
    xn = xn.detach().requires_grad_(True)
    if strategy == "vmap":
        def lesion_logits(inp):
            return forward(model, inp, cost)[:, channel]
        out_c, vjp_fn = torch.func.vjp(lesion_logits, xn)
        if first:
            _check_output(out_c.unsqueeze(1), masks, 0)
        for sl in chunks(n_inst, per):
            cot = masks[sl].unsqueeze(1).expand(-1, n, *masks.shape[1:])
            (g,) = torch.func.vmap(vjp_fn)(cot)
            cost.n_backward += (sl.stop - sl.start) * n
            total[sl] = g.sum(1)
        return total
    z = _lesion_logits(model, xn, masks, channel, cost, first)
    if strategy == "loop":
        for i in range(n_inst):
            (g,) = torch.autograd.grad(z, xn, grad_outputs=masks[i].expand_as(z), retain_graph=i < n_inst - 1)
            cost.n_backward += n
            total[i] = g.sum(0)
        return total
    sls = list(chunks(n_inst, per))
    for k, sl in enumerate(sls):
        cot = masks[sl].unsqueeze(1).expand(-1, n, *masks.shape[1:])
        (g,) = torch.autograd.grad(z, xn, grad_outputs=cot, is_grads_batched=True, retain_graph=k < len(sls) - 1)
        cost.n_backward += (sl.stop - sl.start) * n
        total[sl] = g.sum(1)
    return total


def _batched_grad(model, z, xn, cot, retain_graph):
    """``(I, *xn.shape)``: the VJPs of the cotangents ``cot`` ``(I, *z.shape)``, batched
    (``is_grads_batched``); through a sliding-window model one at a time (its window-by-window backward
    reads each cotangent to skip the windows it does not touch, :mod:`medexplain.engine.sliding`)."""
    if not is_sliding(model):
        return torch.autograd.grad(z, xn, grad_outputs=cot, is_grads_batched=True, retain_graph=retain_graph)[0]
    return torch.stack([torch.autograd.grad(z, xn, grad_outputs=c, retain_graph=retain_graph or i < len(cot) - 1)[0]
                        for i, c in enumerate(cot)])


def _vjp_max(model, xn, masks, channel, cost, first, backward_rows):
    """Per noise row, the signed per-voxel gradient of largest magnitude over the lesion voxels;
    summed over the noise rows: ``(I, C, *s)``."""
    n, n_inst = xn.shape[0], masks.shape[0]
    spatial = tuple(masks.shape[1:])
    xn = xn.detach().requires_grad_(True)
    z = _lesion_logits(model, xn, masks, channel, cost, first)
    per = max(1, backward_rows // n)
    total = torch.zeros((n_inst, *xn.shape[1:]), dtype=xn.dtype, device=xn.device)
    voxels = [masks[i].flatten().nonzero().flatten() for i in range(n_inst)]
    jobs = [(i, sl, vox) for i, vox in enumerate(voxels) for sl in chunks(len(vox), per)]
    best = None
    for k, (i, sl, vox) in enumerate(jobs):
        v = vox[sl]
        cot = torch.zeros((len(v), n, *spatial), dtype=xn.dtype, device=xn.device)
        cot.view(len(v), n, -1)[torch.arange(len(v), device=v.device), :, v] = 1   # one-hot per lesion voxel
        g = _batched_grad(model, z, xn, cot, retain_graph=k < len(jobs) - 1)
        cost.n_backward += len(v) * n
        pick = g.abs().argmax(0, keepdim=True)        # first voxel on ties
        cand = g.gather(0, pick)[0]                   # (n, C, *s), signed
        if sl.start == 0:
            best = torch.zeros_like(cand)
        best = torch.where(cand.abs() > best.abs(), cand, best)
        if sl.stop == len(vox):
            total[i] = best.sum(0)
    return total


def _image_maps(model, x1, masks, channel, aggregate, strategy, n_samples, sigma, seed, chunk_size, backward_rows,
                noise, cost):
    """The maps ``(I, C, *s)`` of the instances ``masks`` of one image ``x1`` ``(1, C, *s)``: the mean over
    the noise loop (one row per noise sample) of their lesion-logit gradients."""
    first = [True]                                # the output grid is checked on the first forward

    def instance_gradients(xn, rows, n):
        if aggregate == "mean":
            g = _vjp_mean(model, xn, masks, channel, strategy, cost, first[0], backward_rows)
        else:
            g = _vjp_max(model, xn, masks, channel, cost, first[0], backward_rows)
        first[0] = False
        return g

    total = noise_sum(x1, instance_gradients, n_samples, sigma, seed, chunk_size or n_samples, scale="channel0",
                      noise=noise)
    return total / n_samples


def _as_regions(target, x) -> Regions:
    """A :class:`Regions` target as is; a :class:`Region` (or a :class:`Class`: the whole grid) of one channel
    as one region per sample."""
    if isinstance(target, Regions):
        return target
    if isinstance(target, (Region, Class)):
        ch = target.class_index(x.shape[0]).unique()
        if ch.numel() != 1:
            raise TargetError("instance_smoothgrad explains one output channel; this target has one per sample "
                              f"({ch.tolist()}): give a Regions target")
        if isinstance(target, Class):       # the channel's logits summed over the whole (input-sized) grid
            m = torch.ones((1, *x.shape[2:]), dtype=torch.bool)
        else:
            m = target.mask[:, 0] if target.mask.ndim == x.ndim else target.mask
            m = m[None] if m.ndim == x.ndim - 2 else m
        return Regions(int(ch), m.expand(x.shape[0], *m.shape[1:]), torch.arange(x.shape[0]))
    raise TargetError("instance_smoothgrad explains a Regions target (one map per region: "
                      f"mx.targets.Regions(channel, masks, samples)) or a Region, got {type(target).__name__}")


@register("instance_smoothgrad", family="instance", regions=True, instance_of=smoothgrad, applies_to=segmenter_only,
          default=True, dicom_concept="Saliency")
def instance_smoothgrad(model, x, target, cost, aggregate: Literal["mean", "max"] = "mean", n_samples: int = 50,
                        sigma: float = 0.05, seed: int = 0, chunk_size: int | None = 10, backward_rows: int = 160,
                        strategy: Literal[STRATEGIES] = "batched", noise: torch.Tensor | None = None):
    """Instance SmoothGrad (module docstring) over a :class:`~medexplain.engine.targets.Regions` target: one map
    ``(C, *spatial)`` per region (a :class:`~medexplain.engine.targets.Region` or :class:`~medexplain.engine.targets.Class`
    target of one channel is one region per sample: then the map is SmoothGrad with the noise rule of the
    paper). ``aggregate``: ``"mean"`` (the summed lesion logits) or ``"max"``;
    ``n_samples``, ``sigma``, ``seed``: the noise (``noise``, absolute ``(n_samples, C, *spatial)``,
    replaces the draws); ``chunk_size``: noise rows given to the model in one call (``"replicate"``
    also stacks the rows of several instances, at most ``backward_rows`` per call); ``backward_rows``:
    the most rows (instances or lesion voxels x noise samples) backpropagated in one batch; ``strategy``:
    how mean-aggregated instances share a forward (module docstring; the maps agree to rounding)."""
    target = _as_regions(target, x)
    channel = target.channel
    if not isinstance(channel, int) or isinstance(channel, bool):
        raise TargetError(f"channel must be an int (the lesion class's output channel), got {channel!r}")
    if target.masks.ndim - 1 != x.ndim - 2:
        raise InputError(f"the region masks have {target.masks.ndim - 1} spatial dims, the input {x.ndim - 2}")
    target.per_region(x)                                     # every region refers to an image of x
    if is_sliding(model):
        if strategy == "vmap":
            raise InputError("strategy='vmap' cannot run through a sliding-window inferer; use loop, batched or replicate")
        strategy = "loop" if strategy == "batched" else strategy
    n_samples, backward_rows = int(n_samples), max(1, int(backward_rows))
    maps = torch.zeros((len(target), *x.shape[1:]), dtype=x.dtype, device=x.device)
    for b in sorted(set(target.samples.tolist())):
        idx = (target.samples == b).nonzero().flatten().tolist()
        masks = target.masks[idx].to(device=x.device, dtype=x.dtype)
        maps[idx] = _image_maps(model, x[b:b + 1].detach(), masks, channel, aggregate, strategy, n_samples, sigma,
                                seed, chunk_size, backward_rows, noise, cost)
    return maps, {"channel": channel, "n_samples": n_samples, "sigma": sigma, "seed": seed, "aggregate": aggregate,
                  "strategy": strategy if aggregate == "mean" else "batched-onehot"}
