"""Instance-level saliency for segmentation models, per lesion and per input channel.

Spagnolo et al., "Instance-level quantitative saliency in multiple sclerosis lesion segmentation"
(seed 001). For a segmentation network with logits ``z`` of shape ``(B, K, *spatial)`` and one lesion
instance ``L`` (a set of voxels on the output grid):

* **Instance SmoothGrad, mean aggregation** (their eq. for ``S_L``)::

      S_L = 1/N sum_{n=1..N} d/dx [ sum_{v in L} z_c(v) ] (x + eps_n),   eps_n ~ Normal(0, sd^2)

  with ``z_c`` the pre-softmax logit of the lesion class, ``N = 50`` and
  ``sd = 0.05 * (max - min)`` of the **first** input channel, the same sd for every channel.
* **Instance SmoothGrad, max aggregation**: for each lesion voxel ``v``, ``g_v = d z_c(v) / dx``; at each
  input voxel keep the signed ``g_v`` of largest magnitude over ``v in L``; average over the N noise
  samples. One backward row per lesion voxel and noise sample.
* **Instance Grad-CAM++**: Grad-CAM++ with the class score ``sum_{v in L} z_c(v)`` at a decoder layer
  (the reference uses the U-Net decoder block at half resolution), upsampled to the input.
  ``variant="paper"`` (default) is Chattopadhay et al.'s eq. 19; ``variant="monai"`` is MONAI's
  ``GradCAMpp`` formula, which the IES reference code calls (``methods/cam.py`` has both), with MONAI's
  bilinear upsampling unless ``upsample=`` says otherwise.

Maps are kept per input channel (``(n_instances, C, *spatial)``; Grad-CAM++ gives one channel) and are
raw and signed.

Cost. Gradients are linear in the output cotangent, so the mean-aggregated map of every instance is a
vector-Jacobian product of the same forward pass with a different output mask. The forward of each
noise sample is therefore run **once** and the instance masks are backpropagated together as a batch of
cotangents (``torch.autograd.grad(..., is_grads_batched=True)``, strategy ``"batched"``). Alternatives
kept for comparison: ``"loop"`` (one backward per instance on the retained graph, as the reference
code), ``"vmap"`` (``torch.func.vjp`` under ``torch.func.vmap``) and ``"replicate"`` (the input
replicated per instance, one forward and backward of all rows). Max aggregation backpropagates one-hot
cotangents of the lesion voxels in batches of ``backward_rows`` rows on the same forward.

Differences from the reference code (federicospagnolo/IES): the mean map is divided by N (the reference
also divides by the number of lesions, a constant factor); the max loop visits every lesion voxel (as the
reference's latest version; earlier ones skipped the last one); noise is drawn per image from ``seed``
(:class:`medexplain.ops.NoiseSource` with ``scale="channel0"``, the one SmoothGrad noise rule) so results
do not depend on the chunking or on which other instances are explained. The instance rules and the
Grad-CAM++ formula can follow the reference (``find_instances(..., rules="reference")``,
``variant="monai"``); ``docs/instances.md`` lists every difference with its measured size.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..attribution import Attribution
from ..core import (
    CONV,
    CONV_TRANSPOSE,
    Cost,
    capture_layers,
    check_input,
    chunks,
    find_layer,
    forward,
    is_scripted,
    model_guard,
    unwrap,
)
from ..errors import InputError, TargetError, UnsupportedModelError
from ..methods.cam_layers import UPSAMPLE
from ..models.model import as_model
from ..ops import NoiseSource
from ..sliding import is_sliding, window_info
from ..targets import Region
from .instances import Instance, flatten_instances

METHODS = ("smoothgrad", "gradcam++")
STRATEGIES = ("batched", "loop", "vmap", "replicate")
GRADCAM_PP_VARIANTS = ("paper", "monai")


def decoder_layer(model: nn.Module, x: torch.Tensor) -> str:
    """Name of the last convolution whose output is at half the input resolution.

    In a U-Net the encoder runs before the decoder, so the last such convolution called in the forward
    pass belongs to the decoder block at half resolution: the reference's Grad-CAM++ layer
    (``model.1.submodule.2.conv`` in MONAI's ``UNet``). Falls back to the last convolution when no
    layer runs at half resolution. Only convolutions the output depends on count, so a supervision head
    that is computed but unused in eval (MONAI ``DynUNet(deep_supervision=True)``) is never chosen. One
    forward and backward of one image are spent to find it, with every convolution (``core.CONV``,
    ``core.CONV_TRANSPOSE``) recorded on the autograd path by the one layer hook (``mode="tap"``) and the
    dependency read by :func:`medexplain.methods.cam_layers.dependent`.
    """
    from ..methods.cam_layers import dependent
    half = tuple((s + 1) // 2 for s in x.shape[2:])
    convs = [n for n, m in unwrap(model).named_modules() if n and isinstance(m, CONV + CONV_TRANSPOSE)]
    with torch.enable_grad(), capture_layers(model, convs, mode="tap") as caps:
        out = forward(model, x[:1].detach().requires_grad_(True))
    calls = [(i, n, o) for n, c in caps.items() for i, o in zip(c.order, c.outputs)]
    used = dependent(out, [o for _, _, o in calls])
    seen = sorted((i, n, tuple(o.shape[2:])) for (i, n, o), u in zip(calls, used) if u)
    if not seen:
        raise UnsupportedModelError("no convolution was called in the forward pass; pass layer= for Grad-CAM++")
    at_half = [n for _, n, s in seen if s == half]
    return at_half[-1] if at_half else seen[-1][1]


def _check_instances(instances, x: torch.Tensor) -> list[Instance]:
    flat = flatten_instances(instances)
    if not flat:
        raise InputError("no instances to explain (find_instances returned none: lower the threshold or min_size?)")
    for k, inst in enumerate(flat):
        if inst.mask.dtype != torch.bool:
            raise InputError(f"instance {k}: mask must be boolean, got {inst.mask.dtype}")
        if not 0 <= inst.sample < x.shape[0]:
            raise InputError(f"instance {k} belongs to sample {inst.sample}; the input has {x.shape[0]} image(s)")
        if inst.mask.ndim != x.ndim - 2:
            raise InputError(f"instance {k}: mask has {inst.mask.ndim} spatial dims, the input {x.ndim - 2}")
        if not bool(inst.mask.any()):
            raise InputError(f"instance {k} has an empty mask: nothing to explain")
    return flat


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
    reads each cotangent to skip the windows it does not touch, :mod:`medexplain.sliding`)."""
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


def _smoothgrad(model, x, flat, channel, aggregate, n_samples, sigma, seed, chunk_size, backward_rows,
                strategy, noise, cost):
    maps = torch.zeros((len(flat), *x.shape[1:]), dtype=x.dtype, device=x.device)
    for b in sorted({inst.sample for inst in flat}):
        idx = [k for k, inst in enumerate(flat) if inst.sample == b]
        masks = torch.stack([flat[k].mask for k in idx]).to(device=x.device, dtype=x.dtype)
        x1 = x[b:b + 1].detach()
        source = NoiseSource(x1, n_samples, sigma, seed, scale="channel0", noise=noise)
        acc = torch.zeros((len(idx), *x.shape[1:]), dtype=x.dtype, device=x.device)
        first = True
        for _, noisy in source.chunks(chunk_size):
            xn = noisy[:, 0]                                        # (n, C, *s): one row per noise sample
            if aggregate == "mean":
                acc += _vjp_mean(model, xn, masks, channel, strategy, cost, first, backward_rows)
            else:
                acc += _vjp_max(model, xn, masks, channel, cost, first, backward_rows)
            first = False
        maps[idx] = acc / n_samples
    return maps


def _gradcam_pp(model, x, flat, channel, layer, chunk_size, cost, variant="paper", upsample="aligned"):
    from ..explain import explain  # the registry's Grad-CAM++ (explain imports methods, never segmentation)
    maps = None
    for sl in chunks(len(flat), chunk_size):
        part = flat[sl]
        xr = x[[inst.sample for inst in part]].detach()
        masks = torch.stack([inst.mask for inst in part]).to(x.device)
        attr = explain(model, xr, method="gradcam++", target=Region(channel, masks, reduce="sum"), layer=layer,
                       variant=variant, upsample=upsample)
        cost.n_forward += attr.info["n_forward"]
        cost.n_backward += attr.info["n_backward"]
        maps = attr.map if maps is None else torch.cat([maps, attr.map])
    return maps


def explain_instances(model, x: torch.Tensor, instances, method: str = "smoothgrad",
                      aggregate: str = "mean", channel: int = 1, n_samples: int = 50, sigma: float = 0.05,
                      seed: int = 0, chunk_size: int | None = 10, backward_rows: int = 160, layer=None,
                      strategy: str = "batched", noise: torch.Tensor | None = None,
                      variant: str = "paper", upsample: str | None = None) -> Attribution:
    """Instance saliency maps as an :class:`~medexplain.Attribution` (``map``: ``(n_instances, C, *spatial)``).

    Parameters
    ----------
    model : ``mx.Model`` or nn.Module
        A segmentation network returning logits ``(B, K, *spatial)``, or the model object of one
        (:class:`medexplain.models.model.Model`: its output adapter, passes, sliding window and train/eval
        policy; a bare module is wrapped in one, :func:`medexplain.models.model.as_model`); left exactly as
        found. Through a sliding window (``mx.Model(net, inferer=...)``, :mod:`medexplain.sliding`) each
        instance is backpropagated through the windows it touches only (``"batched"`` then runs as
        ``"loop"``, one backward per instance on the shared forward; ``"vmap"`` is refused), and ``info``
        counts windows.
    x : tensor ``(B, C, *spatial)``
        The images; each instance's ``sample`` selects its image.
    instances : list of :class:`Instance` (or per-sample lists, as :func:`find_instances` returns)
        Masks on the model's output grid. Maps come back in the flattened order.
    method : ``"smoothgrad"`` or ``"gradcam++"``
    aggregate : ``"mean"`` (sum of the lesion's logits) or ``"max"`` (per input voxel, the signed
        gradient of largest magnitude over the lesion voxels); SmoothGrad only.
    channel : int
        Output channel of the lesion class (its pre-softmax logit is explained). 1 = the lesion class of
        a background / lesion network; use 0 for a single-channel sigmoid output.
    n_samples, sigma, seed : SmoothGrad noise: ``n_samples`` draws, sd = ``sigma`` x (max - min) of the
        first input channel for every channel (reference: 50, 0.05); ``noise`` (absolute,
        ``(n_samples, C, *spatial)``) overrides the generator.
    chunk_size : int
        Rows given to the model in one call (``docs/design.md``): one row per noise sample of an image
        (SmoothGrad; strategy ``"replicate"`` also stacks the rows of several instances, at most
        ``backward_rows`` per call) or one row per instance (Grad-CAM++).
    backward_rows : int
        Upper bound on rows (instances or lesion voxels x noise samples) backpropagated in one batch.
    layer : str or module
        Grad-CAM++ layer; default :func:`decoder_layer` (decoder convolution at half resolution).
    variant : ``"paper"`` (default) or ``"monai"``
        Grad-CAM++ only: the paper's weights (Chattopadhay et al. 2018, eq. 19) or MONAI's ``GradCAMpp``
        formula, which the IES reference code uses (``mx.explain(..., "gradcam++", variant=)``). The
        paper's formula is the default because it is the published method; pick ``"monai"`` to compare
        with the reference's maps (how much the two differ: ``docs/instances.md``).
    upsample : ``"aligned"``, ``"bilinear"`` or None
        Grad-CAM++ only: how the layer's map is brought to the input grid (``mx.explain(..., "gradcam++",
        upsample=)``: receptive-field aligned, or MONAI's bilinear / trilinear placement). Default: MONAI's
        bilinear with ``variant="monai"`` (so the map is MONAI's ``GradCAMpp``, as the reference calls it),
        aligned otherwise.
    strategy : ``"batched"`` (default), ``"loop"``, ``"vmap"``, ``"replicate"``
        How mean-aggregated instances share a forward pass (see the module docstring); all give the same
        maps up to floating-point rounding.
    """
    if method not in METHODS:
        raise InputError(f"instance saliency method must be one of {METHODS}, got {method!r}")
    if aggregate not in ("mean", "max"):
        raise InputError(f"aggregate must be 'mean' or 'max', got {aggregate!r}")
    if variant not in GRADCAM_PP_VARIANTS:
        raise InputError(f"variant must be one of {GRADCAM_PP_VARIANTS}, got {variant!r}")
    if method != "gradcam++" and variant != "paper":
        raise InputError("variant chooses the Grad-CAM++ formula; it does not apply to method='smoothgrad'")
    if upsample is not None and method != "gradcam++":
        raise InputError("upsample places the Grad-CAM++ map on the input grid; it does not apply to "
                         "method='smoothgrad'")
    if upsample is not None and upsample not in UPSAMPLE[:2]:
        raise InputError(f"upsample must be one of {UPSAMPLE[:2]}, got {upsample!r}")
    upsample = upsample or ("bilinear" if variant == "monai" else "aligned")
    if method == "gradcam++" and aggregate != "mean":
        raise InputError("Grad-CAM++ explains the summed lesion logits; aggregate='max' is SmoothGrad only")
    if strategy not in STRATEGIES:
        raise InputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    guarded = as_model(model)
    model = guarded.runner   # the passes, through the sliding window when the Model has one
    if is_sliding(model):
        model.reset()        # count this call's windows only
        if strategy == "vmap":
            raise InputError("strategy='vmap' cannot run through a sliding-window inferer; use loop, batched or replicate")
        strategy = "loop" if strategy == "batched" else strategy
    if int(n_samples) < 1:
        raise InputError(f"n_samples must be >= 1, got {n_samples}")
    if sigma < 0:
        raise InputError(f"sigma must be >= 0, got {sigma}")
    if not isinstance(channel, int) or isinstance(channel, bool):
        raise TargetError(f"channel must be an int (the lesion class's output channel), got {channel!r}")
    x = check_input(x)
    flat = _check_instances(instances, x)
    if not all(tuple(inst.mask.shape) == tuple(flat[0].mask.shape) for inst in flat):
        raise InputError("all instance masks must share one grid")
    if method == "gradcam++" and is_scripted(model):
        raise UnsupportedModelError("Grad-CAM++ needs a layer hook, which TorchScript models do not provide; "
                                    "use method='smoothgrad' or pass the eager model")
    t0 = time.perf_counter()
    with model_guard(guarded):   # the Model's train/eval policy
        cost = Cost()
        extra = {"channel": channel, "n_instances": len(flat), "kinds": [inst.kind for inst in flat]}
        if method == "smoothgrad":
            maps = _smoothgrad(model, x, flat, channel, aggregate, int(n_samples), sigma, seed,
                               chunk_size or int(n_samples), max(1, int(backward_rows)), strategy, noise, cost)
            extra.update(n_samples=int(n_samples), sigma=sigma, seed=seed, aggregate=aggregate,
                         strategy=strategy if aggregate == "mean" else "batched-onehot")
        else:
            layer = layer if layer is not None else decoder_layer(model, x)
            find_layer(model, layer)
            maps = _gradcam_pp(model, x, flat, channel, layer, chunk_size or len(flat), cost, variant, upsample)
            extra.update(layer=layer if isinstance(layer, str) else type(layer).__name__, variant=variant,
                         upsample=upsample)
    info = window_info(model, cost.info(**extra))
    info["seconds"] = time.perf_counter() - t0
    return Attribution(maps.detach(), f"instance_{method}", flat, info)


def instance_saliency(model: nn.Module, x: torch.Tensor, instances, method: str = "smoothgrad",
                      aggregate: str = "mean", **options) -> torch.Tensor:
    """Per-instance, per-input-channel saliency maps ``(n_instances, C, *spatial)`` (Grad-CAM++:
    ``(n_instances, 1, *spatial)``), raw and signed; Spagnolo et al. (seed 001).

    Same arguments as :func:`explain_instances` (which also returns the cost in ``info``).
    """
    return explain_instances(model, x, instances, method=method, aggregate=aggregate, **options).map
