"""Instance-level saliency for segmentation models, per lesion and per input channel: the instance API.

Spagnolo et al., "Instance-level quantitative saliency in multiple sclerosis lesion segmentation"
(seed 001). The methods are registered ones run over a :class:`~medexplain.engine.targets.Regions` target (one
region per lesion instance): **instance SmoothGrad** (mean or max aggregation over the lesion voxels, noise
sd from the first input channel) is ``instance_smoothgrad`` (:mod:`medexplain.methods.instance`, which
states the formulas and the cost), and **instance Grad-CAM++** is the registered ``gradcam++`` with the
lesion's summed logits as the score, at the U-Net decoder block at half resolution (:func:`decoder_layer`,
the reference's layer); ``variant="paper"`` (default) is Chattopadhay et al.'s eq. 19,
``variant="monai"`` MONAI's ``GradCAMpp`` formula, which the IES reference code calls.

:func:`explain_instances` and :func:`instance_saliency` check the instances, build the ``Regions`` target
and call :func:`medexplain.engine.explain`: ``mx.explain(model, x, "instance_smoothgrad",
target=Regions(1, masks, samples))`` gives the same maps. Maps are kept per input channel
(``(n_instances, C, *spatial)``; Grad-CAM++ gives one channel) and are raw and signed.

Differences from the reference code (federicospagnolo/IES): the mean map is divided by N (the reference
also divides by the number of lesions, a constant factor); the max loop visits every lesion voxel (as the
reference's latest version; earlier ones skipped the last one); noise is drawn per image from ``seed``
(:class:`medexplain.engine.ops.NoiseSource` with ``scale="channel0"``, the one SmoothGrad noise rule) so results
do not depend on the chunking or on which other instances are explained. The instance rules and the
Grad-CAM++ formula can follow the reference (``find_instances(..., rules="reference")``,
``variant="monai"``); ``docs/instances.md`` lists every difference with its measured size.
"""
from __future__ import annotations

import inspect
import time

import torch
from torch import nn

from medexplain.engine.attribution import Attribution
from medexplain.engine.core import (
    CONV,
    CONV_TRANSPOSE,
    capture_layers,
    check_input,
    chunks,
    forward,
    model_guard,
    require_hooks,
    unwrap,
)
from medexplain.engine.registry import instance_method
from medexplain.engine.targets import Regions
from medexplain.errors import InputError, OptionError, TargetError, UnsupportedModelError
from medexplain.segmentation.instances import Instance, flatten_instances

#: Options of :func:`explain_instances` that choose a formula: refused for a method that does not take them.
FORMULA_OPTIONS = ("aggregate", "variant", "upsample", "strategy", "noise", "backward_rows")


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
    from medexplain.methods.cam_layers import dependent
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


def instance_layer(model, x: torch.Tensor, spec) -> str:
    """The layer at which the registered method ``spec`` (one with a ``layer`` option, e.g. Grad-CAM++)
    explains instances when none is given: :func:`decoder_layer` of the model object ``model``
    (:class:`medexplain.models.model.Model`) on ``x``, found under its train/eval policy (the model is left as
    found). Used by :func:`explain_instances` and the ``instances`` pipeline."""
    if spec.needs_hooks:
        require_hooks(model)
    with model_guard(model, policy=model.eval_policy):
        return decoder_layer(model.runner, model.to_input(x))


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


def instance_options(method: str | None = None, **given) -> tuple:
    """``(method, options)``: the registered method that explains instances for ``method``
    (:func:`medexplain.engine.registry.instance_method`) and the options of :func:`explain_instances` it takes,
    checked by its signature before any work. A formula option (:data:`FORMULA_OPTIONS`) given to a method
    that does not take it is an :class:`~medexplain.errors.OptionError`; the noise settings and the layer,
    which the instances command passes to every method, go to the methods that take them. ``upsample``
    not given: MONAI's bilinear placement with ``variant="monai"`` (MONAI's ``GradCAMpp``, as the reference
    calls it), else the method's own."""
    spec = instance_method(method)
    defaults = {k: p.default for k, p in inspect.signature(explain_instances).parameters.items()}
    own = {k: v for k, v in given.items() if spec.takes(k)}
    refused = [f"{k}={v!r}" for k, v in given.items() if k in FORMULA_OPTIONS and k not in own
               and not (v is defaults[k] or (isinstance(v, str) and v == defaults[k]))]
    if refused:
        raise OptionError(f"option(s) {', '.join(refused)} do not apply to method {spec.name!r}; it takes "
                          f"{sorted(k for k in given if spec.takes(k))}")
    if "upsample" in own and own["upsample"] is None:
        if given.get("variant") == "monai":
            own["upsample"] = "bilinear"
        else:
            del own["upsample"]
    layer = own.pop("layer", None)
    own = spec.check_options(own)
    return spec, ({**own, "layer": layer} if spec.takes("layer") else own)


def explain_instances(model, x: torch.Tensor, instances, method: str | None = None,
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
        found. Through a sliding window (``mx.Model(net, inferer=...)``, :mod:`medexplain.engine.sliding`) each
        instance is backpropagated through the windows it touches only (``"batched"`` then runs as
        ``"loop"``, one backward per instance on the shared forward; ``"vmap"`` is refused), and ``info``
        counts windows.
    x : tensor ``(B, C, *spatial)``
        The images; each instance's ``sample`` selects its image.
    instances : list of :class:`Instance` (or per-sample lists, as :func:`find_instances` returns)
        Masks on the model's output grid. Maps come back in the flattened order.
    method : a registered method (default: instance SmoothGrad, ``instance_smoothgrad``); ``"smoothgrad"``
        means its instance form ``instance_smoothgrad`` (:func:`medexplain.engine.registry.instance_method`),
        ``"gradcam++"`` instance Grad-CAM++; any other registered method is run on each instance's image
        with the instance's region as the target.
    aggregate : ``"mean"`` (sum of the lesion's logits) or ``"max"`` (per input voxel, the signed
        gradient of largest magnitude over the lesion voxels); instance SmoothGrad only.
    channel : int
        Output channel of the lesion class (its pre-softmax logit is explained). 1 = the lesion class of
        a background / lesion network; use 0 for a single-channel sigmoid output.
    n_samples, sigma, seed : SmoothGrad noise: ``n_samples`` draws, sd = ``sigma`` x (max - min) of the
        first input channel for every channel (reference: 50, 0.05); ``noise`` (absolute,
        ``(n_samples, C, *spatial)``) overrides the generator.
    chunk_size : int
        Rows given to the model in one call (``docs/design.md``): one row per noise sample of an image
        (SmoothGrad; strategy ``"replicate"`` also stacks the rows of several instances, at most
        ``backward_rows`` per call) or, for a method without a ``chunk_size`` of its own (Grad-CAM++), one
        row per instance.
    backward_rows : int
        Upper bound on rows (instances or lesion voxels x noise samples) backpropagated in one batch.
    layer : str or module
        For a method with a layer (Grad-CAM++); default :func:`decoder_layer` (decoder convolution at half
        resolution).
    variant : ``"paper"`` (default) or ``"monai"``
        Grad-CAM++ only: the paper's weights (Chattopadhay et al. 2018, eq. 19) or MONAI's ``GradCAMpp``
        formula, which the IES reference code uses (``mx.explain(..., "gradcam++", variant=)``). The
        paper's formula is the default because it is the published method; pick ``"monai"`` to compare
        with the reference's maps (how much the two differ: ``docs/instances.md``).
    upsample : ``"aligned"``, ``"bilinear"`` or None
        For a method with an ``upsample`` option (Grad-CAM++): how the layer's map is brought to the input
        grid (receptive-field aligned, or MONAI's bilinear / trilinear placement). Default: MONAI's
        bilinear with ``variant="monai"`` (so the map is MONAI's ``GradCAMpp``, as the reference calls it),
        the method's own (aligned) otherwise.
    strategy : ``"batched"`` (default), ``"loop"``, ``"vmap"``, ``"replicate"``
        How mean-aggregated instances share a forward pass (:mod:`medexplain.methods.instance`); all give
        the same maps up to floating-point rounding.
    """
    from medexplain.engine.explain import explain
    from medexplain.models.model import as_model

    spec, own = instance_options(method, aggregate=aggregate, n_samples=n_samples, sigma=sigma, seed=seed,
                                 chunk_size=chunk_size, backward_rows=backward_rows, layer=layer, strategy=strategy,
                                 noise=noise, variant=variant, upsample=upsample)
    if not isinstance(channel, int) or isinstance(channel, bool):
        raise TargetError(f"channel must be an int (the lesion class's output channel), got {channel!r}")
    m = as_model(model)
    x = check_input(x)
    flat = _check_instances(instances, x)
    if not all(tuple(inst.mask.shape) == tuple(flat[0].mask.shape) for inst in flat):
        raise InputError("all instance masks must share one grid")
    masks = torch.stack([inst.mask for inst in flat])
    samples = [inst.sample for inst in flat]
    t0 = time.perf_counter()
    if spec.takes("layer") and layer is None:
        own["layer"] = instance_layer(m, x, spec)
    if spec.regions:
        attr = explain(m, x, spec.name, target=Regions(channel, masks, samples), **own)
        amap, info = attr.map, attr.info
    else:                     # one row per instance, chunk_size instances per call
        parts, info = [], None
        for sl in chunks(len(flat), own.get("chunk_size", chunk_size)):
            attr = explain(m, x, spec.name, target=Regions(channel, masks[sl], samples[sl]), **own)
            parts.append(attr.map)
            info = attr.info if info is None else {**attr.info, "n_forward": info["n_forward"] + attr.info["n_forward"],
                                                   "n_backward": info["n_backward"] + attr.info["n_backward"]}
        amap = torch.cat(parts)
    info = {**info, "channel": channel, "n_instances": len(flat), "kinds": [inst.kind for inst in flat],
            "seconds": time.perf_counter() - t0}
    if "layer" in own:
        info.update(layer=own["layer"] if isinstance(own["layer"], str) else type(own["layer"]).__name__)
    if spec.takes("upsample"):
        info["upsample"] = own.get("upsample", inspect.signature(spec.fn).parameters["upsample"].default)
    return Attribution(amap, spec.name if spec.regions else f"instance_{spec.name}", flat, info)


def instance_saliency(model: nn.Module, x: torch.Tensor, instances, method: str | None = None,
                      aggregate: str = "mean", **options) -> torch.Tensor:
    """Per-instance, per-input-channel saliency maps ``(n_instances, C, *spatial)`` (Grad-CAM++:
    ``(n_instances, 1, *spatial)``), raw and signed; Spagnolo et al. (seed 001).

    Same arguments as :func:`explain_instances` (which also returns the cost in ``info``).
    """
    return explain_instances(model, x, instances, method=method, aggregate=aggregate, **options).map
