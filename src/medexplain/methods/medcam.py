"""Med-CAM: minimal evidence masks from a per-image U-Net trained by classifier activation matching.

Suhail, Anand & Sethi, "Med-CAM: Minimal Evidence for Explaining Medical Decision Making",
arXiv:2604.13695 (2026), section 3. No public code exists; this is a re-implementation
from the paper's equations and the authors' prototype defaults reported by the authors (docs/medcam.md).

For each image ``x`` a small U-Net (MONAI's, trained from scratch, no normalisation) outputs logits ``u``;
the soft mask is ``s = sigmoid(u)``, the mask ``m`` is ``s`` hardened at 0.5 with a straight-through
estimator (forward ``1[s > 0.5]``, backward identity), and the explanation is ``e = m * x`` (one mask
shared by all channels). The U-Net minimises (paper eq. in 3.4, ``L_EXP = L_AM + L_MIN + L_ROB``)::

    L = l_act L_act + l_ce L_ce + l_kl L_kl + l_area L_area + l_bin L_bin + l_tv L_tv + l_rob L_rob
    L_act  = sum_l a_l d(phi_l(x), phi_l(e))                     (3.1, activation matching)
    L_kl   = KL(softmax f(x) || softmax f(e))                     (3.1)
    L_ce   = -log p_f(e)(y),   y = argmax f(x) (or the given class) (3.1)
    L_area = |m|_1,  L_bin = |s - s^2|_1,  L_tv = sum |m_i - m_i+1| over every spatial axis   (3.2)
    L_rob  = -log p_f(m*x + (1-m)*r)(y),  r a random background (zeros, Gaussian, uniform)   (3.3)

Choices the paper leaves open (documented in docs/medcam.md):

* **One U-Net per image** (the paper's setting), trained *in parallel* for a batch: the B U-Nets' weights
  are stacked and run with ``torch.func.vmap``; Adam is element-wise, so this is exactly B independent
  trainings (a shared U-Net would couple the images through its weights). Every image's U-Net starts
  from the same seeded initialisation, so a batch of three gives the masks of three batches of one
  (up to floating-point summation order).
* The priors are computed on the **soft** mask (the binarisation term is identically 0 on the hardened
  one; with the straight-through estimator the area gradient is the same either way) and, like the
  prototype, as **means** over voxels (``prior_reduction="sum"`` gives the paper's norms).
* ``distance="auto"``: cosine distance for the shallower half of the chosen layers, MSE on channels
  standardised with the statistics of ``phi_l(x)`` for the deeper half (the prototype's setting).
* Early stopping per image: every ``patience`` steps the hard mask is compared with the one
  ``patience`` steps earlier and the mean loss of the last window with the window before; when the
  changed fraction is at most ``mask_tol`` and the relative loss change at most ``loss_tol`` (after
  ``min_steps``), that image's mask is frozen (the other images continue).

The activations ``phi_l`` are recorded by the one layer hook (:func:`medexplain.engine.core.capture_layers`,
``mode="graph"``: clones that keep their graph, so an in-place op after the layer cannot alter them and
the U-Net trains through them); TV is :func:`medexplain.engine.ops.total_variation`. ``docs/design.md`` lists
where each shared mechanic lives.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medexplain.engine.core import (
    ACTIVATION,
    CONV,
    CONV_TRANSPOSE,
    capture_layers,
    chunks,
    forward,
    is_scripted,
    n_passes,
    unwrap,
)
from medexplain.engine.ops import probabilities, total_variation
from medexplain.engine.registry import classifier_only, register
from medexplain.engine.targets import Class
from medexplain.errors import InputError, TargetError, UnsupportedModelError

__all__ = ["medcam", "MedCAMConfig", "DEFAULT_WEIGHTS", "activation_loss", "kl_loss", "ce_loss", "area_loss",
           "bin_loss", "straight_through", "default_layers"]

#: Per-term weights (lambda). Tuned on the planted 2D sets from the prototype's 10/15/5/100/1/500/100
#: (see docs/medcam.md for the runs behind the change).
DEFAULT_WEIGHTS = {"act": 10.0, "ce": 15.0, "kl": 5.0, "area": 100.0, "bin": 10.0, "tv": 500.0, "rob": 100.0}
#: The prototype's activation-layer weights, growing with depth.
PROTOTYPE_LAYER_WEIGHTS = (1.0, 2.0, 2.0, 4.0, 8.0)
BACKGROUNDS = ("zeros", "gaussian", "uniform")


# ----------------------------------------------------------------------------------------------- losses
def _per_sample(t: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return t.flatten(1).mean(1)
    if reduction == "sum":
        return t.flatten(1).sum(1)
    raise InputError(f"prior_reduction must be 'mean' or 'sum', got {reduction!r}")


def area_loss(m: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Paper 3.2, L_area = |m|_1 per sample (``mean``: divided by the voxel count, the prototype's)."""
    return _per_sample(m.abs(), reduction)


def bin_loss(m: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Paper 3.2, L_bin = |m - m^2|_1 per sample: 0 exactly where m is 0 or 1, largest (1/4) at 0.5."""
    return _per_sample((m - m * m).abs(), reduction)


def kl_loss(logits_x: torch.Tensor, logits_e: torch.Tensor) -> torch.Tensor:
    """Paper 3.1, KL(softmax f(x) || softmax f(e)) per sample (0 when the logits agree)."""
    lp_x, lp_e = F.log_softmax(logits_x, 1), F.log_softmax(logits_e, 1)
    return (lp_x.exp() * (lp_x - lp_e)).sum(1)


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Paper 3.1 (L_CE) and 3.3 (L_rob): -log p(y) per sample."""
    return F.cross_entropy(logits, y, reduction="none")


def _cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1), b.flatten(1)
    return 1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def _standardised_mse(ref: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MSE after standardising each channel with the mean and sd of ``ref`` (= phi(x)) over its spatial
    axes; for ``(B, F)`` activations over the features. The mean cancels, so this is
    mean(((b - ref) / sd)^2); sd is floored at 1% of the sample's mean channel sd (dead channels)."""
    if ref.ndim > 2:
        sd = ref.flatten(2).std(2, unbiased=False)                             # (B, C)
        floor = sd.mean(1, keepdim=True) * 1e-2 + 1e-12
        sd = torch.maximum(sd, floor).view(*sd.shape, *[1] * (ref.ndim - 2))
    else:
        sd = ref.std(1, unbiased=False, keepdim=True).clamp_min(1e-12)
    return (((b - ref) / sd) ** 2).flatten(1).mean(1)


def activation_loss(acts_x, acts_e, layer_weights, distances) -> torch.Tensor:
    """Paper 3.1, L_act = sum_l a_l d(phi_l(x), phi_l(e)) per sample; ``distances[l]`` is ``"cosine"``
    (1 - cosine similarity of the flattened activations) or ``"mse"`` (on standardised channels).
    ``acts_x[l]`` / ``acts_e[l]`` are lists of outputs (a module called twice gives two)."""
    total = None
    for ax, ae, w, d in zip(acts_x, acts_e, layer_weights, distances):
        for a, b in zip(ax, ae):
            term = w * (_cosine_distance(a, b) if d == "cosine" else _standardised_mse(a, b))
            total = term if total is None else total + term
    if total is None:
        raise InputError("activation matching needs at least one layer")
    return total


def straight_through(soft: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Forward: ``1[soft > threshold]`` exactly; backward: identity (straight-through estimator)."""
    hard = (soft > threshold).to(soft.dtype)
    return hard.detach() + (soft - soft.detach())


# ----------------------------------------------------------------------------------------------- layers
def _candidate_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """Activation modules and convolutions of the user's model (``core.ACTIVATION``, ``core.CONV``)."""
    named = [(n, m) for n, m in unwrap(model).named_modules() if n]
    return [n for n, m in named if isinstance(m, ACTIVATION)], [n for n, m in named if isinstance(m, CONV)]


def _call_order(caps) -> list[str]:
    """Names of the captured layers that ran, in the order they were first called."""
    fired = [n for n, c in caps.items() if c.order]
    return sorted(fired, key=lambda n: caps[n].order[0])


def default_layers(model: nn.Module, calls: list[str], n: int = 5) -> list[str]:
    """The automatic layer choice: ``n`` activation modules spread evenly (by first-call order, always
    including the deepest) over those whose output is a spatial map; ``calls`` lists the candidate
    names in the order they fired on the reference forward."""
    if not calls:
        raise UnsupportedModelError(
            "medcam matches the activations of layers whose output is a spatial map (B, C, *spatial), as the input "
            "is; no activation module (nor convolution) of this model gives one (a vision transformer's blocks give "
            "tokens (B, N, D)). Name such layers with layers=['features.3', ...] (command line: -o "
            "medcam.layers=features.3,features.7), or explain the model with a CAM or a gradient method")
    if len(calls) <= n:
        return list(calls)
    idx = sorted({round(i * (len(calls) - 1) / (n - 1)) for i in range(n)}) if n > 1 else [len(calls) - 1]
    return [calls[i] for i in idx]


# ----------------------------------------------------------------------------------------------- U-Net
def _unet_channels(spatial: tuple[int, ...], unet_channels) -> tuple[int, ...]:
    if unet_channels is None or isinstance(unet_channels, int):
        base = 8 if unet_channels is None else int(unet_channels)
        # MONAI's UNet downsamples at its first conv: n strides of 2 give a coarsest grid of size/2^n;
        # keep it at >= 4 voxels, with 1 to 3 strides.
        n = max(1, min(3, int(math.floor(math.log2(max(min(spatial), 2) / 4)))))
        return tuple(base * 2 ** i for i in range(n + 1))
    ch = tuple(int(c) for c in unet_channels)
    if len(ch) < 2 or min(ch) < 1:
        raise InputError(f"unet_channels must be an int (base width) or >= 2 positive ints, got {unet_channels!r}")
    return ch


def _build_unets(b: int, spatial_dims: int, channels: tuple[int, ...], in_channels: int, seed: int, x: torch.Tensor,
                 mask_init: float = 0.5):
    from monai.networks.nets import UNet
    from torch.func import stack_module_state

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = UNet(spatial_dims, in_channels, 1, channels=channels, strides=(2,) * (len(channels) - 1),
                   num_res_units=0, norm=None)  # the prototype has no normalisation
        last = [m for m in net.modules() if isinstance(m, CONV + CONV_TRANSPOSE)][-1]
        with torch.no_grad():  # the output bias sets the initial soft mask: sigmoid(bias) = mask_init
            last.bias.fill_(math.log(mask_init / (1 - mask_init)))
    net = net.to(device=x.device, dtype=x.dtype)
    params, buffers = stack_module_state([net] * b)
    base = copy.deepcopy(net).to("meta")
    return base, params, buffers


def _unet_input(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Per-sample z-scored image, zero-padded so every spatial size is a multiple of ``multiple``."""
    flat, keep = x.flatten(1), (-1, *[1] * (x.ndim - 1))
    z = (x - flat.mean(1).view(keep)) / flat.std(1, unbiased=False).clamp_min(1e-12).view(keep)
    pads, crop = [], [slice(None), slice(None)]
    for s in reversed(x.shape[2:]):
        extra = (-s) % multiple
        pads += [extra // 2, extra - extra // 2]
    for s, (lo, _) in zip(x.shape[2:], reversed(list(zip(pads[::2], pads[1::2])))):
        crop.append(slice(lo, lo + s))
    return F.pad(z, pads), tuple(crop)


# ------------------------------------------------------------------------------------------ background
def _background(kind: str, xi: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random background ``r`` for one sample ``(C, *s)``: zeros, Gaussian with the sample's per-channel
    mean and sd, or uniform between its per-channel min and max."""
    if kind == "zeros":
        return torch.zeros_like(xi)
    flat = xi.flatten(1)
    shape = (-1, *[1] * (xi.ndim - 1))
    if kind == "gaussian":
        noise = torch.randn(xi.shape, generator=gen, device=xi.device, dtype=xi.dtype)
        return flat.mean(1).view(shape) + flat.std(1, unbiased=False).view(shape) * noise
    noise = torch.rand(xi.shape, generator=gen, device=xi.device, dtype=xi.dtype)
    lo, hi = flat.amin(1).view(shape), flat.amax(1).view(shape)
    return lo + (hi - lo) * noise


def _draw_backgrounds(x, kinds, gens) -> torch.Tensor:
    out = []
    for xi, g in zip(x, gens):
        k = int(torch.randint(len(kinds), (1,), generator=g, device=g.device))
        out.append(_background(kinds[k], xi, g))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------- explainer
def _resolve_label(target, logits: torch.Tensor) -> torch.Tensor:
    b = logits.shape[0]
    if target is None:
        return logits.argmax(1)
    if type(target) is not Class:
        raise TargetError(f"medcam explains a class decision: give a class index (int or one per sample) or no "
                          f"target (the predicted class), not {type(target).__name__}")
    idx = target.class_index(b).to(logits.device)
    if int(idx.min()) < 0 or int(idx.max()) >= logits.shape[1]:
        raise TargetError(f"target class {sorted(set(idx.tolist()))} out of range for a model with "
                          f"{logits.shape[1]} outputs (0..{logits.shape[1] - 1})")
    return idx


@dataclass(frozen=True)
class MedCAMConfig:
    """Every option of one Med-CAM run (the keyword options of :func:`medcam`), checked once by
    :meth:`build` and passed down unchanged. ``weights`` holds every term's lambda; ``backgrounds`` the
    background kinds; ``layers``, ``layer_weights`` and ``distance`` are as given (resolved per chunk,
    once the layers are known)."""

    layers: tuple | None = None
    layer_weights: object = None
    distance: object = "auto"
    weights: dict | None = None
    steps: int = 200
    lr: float = 3e-3
    backgrounds: tuple = BACKGROUNDS
    unet_channels: object = None
    min_steps: int = 60
    patience: int = 20
    mask_tol: float = 2e-3
    loss_tol: float = 1e-2
    prior_reduction: str = "mean"
    threshold: float = 0.5
    seed: int = 0
    return_soft: bool = False
    n_layers: int = 5
    mask_init: float = 0.5
    keep_decision: bool = True

    @classmethod
    def build(cls, weights=None, backgrounds=BACKGROUNDS, distance="auto", layers=None, **options) -> "MedCAMConfig":
        """The checked configuration: typed errors for unknown weight terms, background kinds, distances,
        reductions and step counts, before any work."""
        w = dict(DEFAULT_WEIGHTS)
        if weights is not None:
            bad = sorted(set(weights) - set(w))
            if bad:
                raise InputError(f"unknown medcam weight(s) {bad}; the terms are {sorted(w)}")
            w.update({k: float(v) for k, v in weights.items()})
        kinds = (backgrounds,) if isinstance(backgrounds, str) else tuple(backgrounds)
        if not kinds or any(k not in BACKGROUNDS for k in kinds):
            raise InputError(f"backgrounds must be a non-empty subset of {BACKGROUNDS}, got {backgrounds!r}")
        if distance not in ("auto", "cosine", "mse") and not isinstance(distance, (list, tuple)):
            raise InputError(f"distance must be 'auto', 'cosine', 'mse' or one per layer, got {distance!r}")
        if isinstance(layers, str):   # one name, or several joined by commas (from the command line)
            layers = [p.strip() for p in layers.split(",") if p.strip()]
        cfg = cls(layers=None if layers is None else tuple(layers), distance=distance, weights=w, backgrounds=kinds,
                  **options)
        if cfg.steps < 1 or cfg.patience < 1:
            raise InputError("steps and patience must be >= 1")
        if cfg.prior_reduction not in ("mean", "sum"):
            raise InputError(f"prior_reduction must be 'mean' or 'sum', got {cfg.prior_reduction!r}")
        return cfg


def _medcam_cost(x_shape, o):
    n, backgrounds = int(o["steps"]), o["backgrounds"]
    k = len(backgrounds) if isinstance(backgrounds, (list, tuple)) else 1
    return (n * k + 2) * x_shape[0], n * k * x_shape[0]


@register("medcam", needs_target=False, needs_hooks=True, applies_to=classifier_only, family="optimisation",
          cost=_medcam_cost)
def medcam(model, x, target, cost, layers=None, layer_weights=None, distance="auto", weights=None,
           steps: int = 200, lr: float = 3e-3, backgrounds=BACKGROUNDS, unet_channels=None,
           min_steps: int = 60, patience: int = 20, mask_tol: float = 2e-3, loss_tol: float = 1e-2,
           prior_reduction: str = "mean", threshold: float = 0.5, seed: int = 0, return_soft: bool = False,
           images_per_step: int | None = None, n_layers: int = 5, mask_init: float = 0.5, keep_decision: bool = True):
    """Med-CAM (Suhail et al. 2026, sections 3.1-3.4): a binary evidence mask per image.

    Returns the mask ``(B, 1, *spatial)`` (1.0 = evidence kept, 0.0 = suppressed); ``return_soft=True``
    returns the soft mask ``sigmoid(u)`` instead (the binary one is ``soft > threshold``).

    Options:
        layers: dotted names of the classifier layers to match (or one name). Default: ``n_layers`` (5)
            activation modules (``core.ACTIVATION``: ReLU, PReLU, GELU, ...) with spatial outputs, spread
            evenly over depth; convolutions when the model has no activation modules.
        layer_weights: one weight a_l per layer. Default: the prototype's (1, 2, 2, 4, 8) for 5 layers,
            otherwise 2^linspace(0, 3, L); always normalised to sum 1, so ``weights["act"]`` is the
            group weight.
        distance: ``"auto"`` (cosine for the shallower half, standardised MSE for the deeper half),
            ``"cosine"``, ``"mse"``, or a list with one per layer.
        weights: lambda per term: keys act, ce, kl, area, bin, tv, rob (missing keys keep the defaults
            of :data:`DEFAULT_WEIGHTS`).
        steps, lr: Adam steps (upper bound with early stopping) and learning rate.
        backgrounds: kinds of random background r for L_rob, one drawn per image and step.
        unet_channels: int base width (default 8, doubling per level, depth sized to the input) or
            the explicit MONAI ``channels`` tuple (strides of 2).
        min_steps, patience, mask_tol, loss_tol: early stopping (see the module docstring).
        prior_reduction: ``"mean"`` (prototype) or ``"sum"`` (paper's norms) for area, bin and TV
            (:func:`medexplain.engine.ops.total_variation`).
        seed: U-Net initialisation and background draws (same for every image of the batch).
        images_per_step: images whose U-Nets are trained together (one vmap batch; each step gives the
            classifier two rows per image, e and e~); all by default. Results do not depend on it.
        mask_init: initial soft mask value (bias of the U-Net's output layer); 0.5 = neutral start.
        keep_decision: if the final mask's explanation no longer gives class y but an earlier step's did,
            return the last such mask (``info["fell_back"]``). ``False`` returns the final mask as is.

    ``info``: ``label`` (y), ``area`` (hard-mask fraction), ``p_y_x``, ``p_y_e``, ``p_y_e_tilde`` (mean
    over the background kinds, and ``p_y_e_tilde_by_background``), ``keeps_decision`` (argmax f(e) == y),
    ``steps`` and ``settled`` per image, final ``loss_terms``, the ``layers``, ``layer_weights``,
    ``distances`` and ``unet_channels`` used.
    """
    if is_scripted(model):
        raise UnsupportedModelError("medcam matches activations through forward hooks, which TorchScript models do "
                                    "not provide; use saliency, smoothgrad, integrated_gradients or occlusion, "
                                    "or pass the eager model")
    cfg = MedCAMConfig.build(
        weights=weights, backgrounds=backgrounds, distance=distance, layers=layers, layer_weights=layer_weights,
        steps=steps, lr=lr, unet_channels=unet_channels, min_steps=min_steps, patience=patience, mask_tol=mask_tol,
        loss_tol=loss_tol, prior_reduction=prior_reduction, threshold=threshold, seed=seed, return_soft=return_soft,
        n_layers=n_layers, mask_init=mask_init, keep_decision=keep_decision)
    b = x.shape[0]
    maps, per_image = [], []
    for sl in chunks(b, images_per_step):
        tgt = target
        if isinstance(target, Class):
            tgt = Class(target.class_index(b)[sl])
        m, info = _run(model, x[sl], tgt, cost, cfg)
        maps.append(m)
        per_image.append(info)
    return torch.cat(maps), _merge_info(per_image)


def _merge_info(per_chunk: list[dict]) -> dict:
    """One ``info`` from the chunks' (per-image lists concatenated; the shared settings kept once)."""
    info = dict(per_chunk[0])
    for extra in per_chunk[1:]:
        for k, v in extra.items():
            if isinstance(v, list) and k not in ("layers", "layer_weights", "distances", "unet_channels"):
                info[k] = info[k] + v
            elif isinstance(v, dict):
                info[k] = {kk: info[k][kk] + vv for kk, vv in v.items()}
    return info


def _reference(model, x, target, cost, cfg: MedCAMConfig):
    """The reference forward: logits f(x), the label y, the layers to match and their phi_l(x)."""
    b = x.shape[0]
    acts, convs = _candidate_names(model)
    probe = list(cfg.layers) if cfg.layers is not None else (acts or convs)
    # also tells which candidates give spatial maps, and in which order they run
    with torch.no_grad(), capture_layers(model, probe, mode="graph") as caps:
        logits_x = forward(model, x, cost)
    if logits_x.ndim != 2:
        raise UnsupportedModelError(f"medcam explains classifiers with logits (B, K); this model returns "
                                    f"{tuple(logits_x.shape)} (for segmentation use instance saliency or shapley)")
    y = _resolve_label(target, logits_x)
    if cfg.layers is not None:
        layers = list(cfg.layers)
    else:
        fired = [n for n in _call_order(caps) if all(o.ndim == x.ndim for o in caps[n].outputs)]
        layers = default_layers(model, fired, cfg.n_layers)
    for n in layers:
        if not caps[n].outputs or not all(o.shape[0] == b for o in caps[n].outputs):
            raise UnsupportedModelError(f"layer {n!r} was not called with a tensor output per sample in the forward pass")
    return logits_x, y, layers, [[o.detach() for o in caps[n].outputs] for n in layers]


def _layer_weights(layer_weights, n: int) -> list[float]:
    """a_l per layer, normalised to sum 1 (the prototype's (1, 2, 2, 4, 8) for 5 layers by default)."""
    if layer_weights is None:
        lw = list(PROTOTYPE_LAYER_WEIGHTS) if n == 5 else [2 ** (3 * i / max(n - 1, 1)) for i in range(n)]
    else:
        lw = [float(v) for v in (layer_weights if isinstance(layer_weights, (list, tuple)) else [layer_weights])]
        if len(lw) != n or min(lw) < 0 or sum(lw) <= 0:
            raise InputError(f"layer_weights must be {n} non-negative numbers (one per layer), got {layer_weights!r}")
    return [v / sum(lw) for v in lw]


def _distances(distance, n: int) -> list[str]:
    if isinstance(distance, (list, tuple)):
        dist = list(distance)
        if len(dist) != n or any(d not in ("cosine", "mse") for d in dist):
            raise InputError(f"distance list must give 'cosine' or 'mse' for each of the {n} layers, got {distance!r}")
        return dist
    return [("cosine" if i < n / 2 else "mse") if distance == "auto" else distance for i in range(n)]


def _run(model, x, target, cost, cfg: MedCAMConfig):
    """Med-CAM for the images ``x`` (one chunk): reference forward, mask training, returned masks + info."""
    logits_x, y, layers, acts_x = _reference(model, x, target, cost, cfg)
    lw, dist = _layer_weights(cfg.layer_weights, len(layers)), _distances(cfg.distance, len(layers))
    channels = _unet_channels(tuple(x.shape[2:]), cfg.unet_channels)
    state = _train_masks(model, x, y, logits_x, cost, cfg, layers, acts_x, lw, dist, channels)
    final_soft = state["final_soft"]
    fell_back = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if cfg.keep_decision:  # the last mask whose explanation kept the decision, where the final one does not
        with torch.no_grad():
            lost = forward(model, (final_soft > cfg.threshold).to(x.dtype) * x, cost).argmax(1) != y
        fell_back = lost & state["kept"]
        final_soft = torch.where(fell_back.view(-1, *[1] * (x.ndim - 1)), state["kept_soft"], final_soft)
    hard = (final_soft > cfg.threshold).to(x.dtype)
    info = _evaluate(model, x, y, logits_x, hard, cost, cfg)
    info.update({
        "steps": state["steps"].tolist(), "settled": state["done"].tolist(), "fell_back": fell_back.tolist(),
        "loss_terms": {k: v.tolist() for k, v in state["terms"].items()},
        "layers": list(layers), "layer_weights": lw, "distances": dist, "unet_channels": list(channels),
    })
    return (final_soft if cfg.return_soft else hard), info


def _train_masks(model, x, y, logits_x, cost, cfg: MedCAMConfig, layers, acts_x, lw, dist, channels) -> dict:
    """Adam on the B stacked U-Nets (paper 3.4, L_EXP) with per-image early stopping.

    Returns ``final_soft`` (the soft mask of each image when it stopped), ``kept_soft`` / ``kept`` (the
    last soft mask whose explanation kept class y, and whether there was one), ``steps``, ``done`` and
    the final loss ``terms`` per image."""
    from torch.func import functional_call, vmap

    b, spatial, w = x.shape[0], tuple(x.shape[2:]), cfg.weights
    base, params, buffers = _build_unets(b, len(spatial), channels, x.shape[1], cfg.seed, x, cfg.mask_init)
    u_in, crop = _unet_input(x, 2 ** (len(channels) - 1))
    opt = torch.optim.Adam(params.values(), lr=cfg.lr)

    def unet(p, bf, xi):
        return functional_call(base, (p, bf), (xi.unsqueeze(0),)).squeeze(0)

    gens = [torch.Generator(device=x.device).manual_seed(cfg.seed + 1) for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=x.device)
    steps_taken = torch.zeros(b, dtype=torch.long, device=x.device)
    final_soft = torch.zeros((b, 1, *spatial), dtype=x.dtype, device=x.device)
    final_terms: dict[str, torch.Tensor] = {}
    kept_soft, kept = final_soft.clone(), torch.zeros(b, dtype=torch.bool, device=x.device)
    checkpoint_mask, window, prev_window_mean = None, [], None
    for t in range(cfg.steps):
        with torch.enable_grad():
            soft = torch.sigmoid(vmap(unet)(params, buffers, u_in)[crop])
            m = straight_through(soft, cfg.threshold)
            e = m * x
            e_tilde = e + (1 - m) * _draw_backgrounds(x, cfg.backgrounds, gens)
            with capture_layers(model, layers, mode="graph") as rec:
                out = forward(model, torch.cat([e, e_tilde]), cost)
            logits_e, logits_t = out[:b], out[b:]
            terms = {
                "act": activation_loss(acts_x, [[o[:b] for o in rec[n].outputs] for n in layers], lw, dist),
                "ce": ce_loss(logits_e, y), "kl": kl_loss(logits_x, logits_e),
                "area": area_loss(soft, cfg.prior_reduction), "bin": bin_loss(soft, cfg.prior_reduction),
                "tv": total_variation(soft, cfg.prior_reduction), "rob": ce_loss(logits_t, y),
            }
            loss = sum(w[k] * v for k, v in terms.items())        # (b,) one loss per image
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
        cost.n_backward += 2 * b * n_passes(model)
        live = ~done
        hard = (soft.detach() > cfg.threshold)
        final_soft[live] = soft.detach()[live]
        for k, v in terms.items():
            final_terms.setdefault(k, torch.zeros(b, dtype=x.dtype, device=x.device))[live] = v.detach()[live].to(x.dtype)
        steps_taken[live] = t + 1
        ok = live.to(x.device) & (logits_e.detach().argmax(1) == y)
        kept_soft[ok], kept = soft.detach()[ok], kept | ok
        window.append(loss.detach())
        # Early stopping, per image, checked every `patience` steps (see module docstring).
        if (t + 1) % cfg.patience == 0:
            mean_now = torch.stack(window).mean(0)
            if checkpoint_mask is not None and t + 1 >= cfg.min_steps:
                changed = (hard != checkpoint_mask).flatten(1).float().mean(1).cpu()
                rel = ((mean_now - prev_window_mean).abs() / prev_window_mean.abs().clamp_min(1e-12)).cpu()
                done |= (changed <= cfg.mask_tol) & (rel <= cfg.loss_tol)
            checkpoint_mask, prev_window_mean, window = hard, mean_now, []
            if bool(done.all()):
                break
        opt.step()
    return {"final_soft": final_soft, "kept_soft": kept_soft, "kept": kept, "steps": steps_taken, "done": done,
            "terms": final_terms}


def _evaluate(model, x, y, logits_x, hard, cost, cfg: MedCAMConfig) -> dict:
    """p(y|x), p(y|e) and p(y|e~) for each background kind of the returned hard masks (paper 3.3)."""
    b, kinds = x.shape[0], cfg.backgrounds
    eval_gens = [torch.Generator(device=x.device).manual_seed(cfg.seed + 2) for _ in range(b)]
    rows = [hard * x] + [hard * x + (1 - hard) * torch.stack([_background(k, xi, g) for xi, g in zip(x, eval_gens)])
                         for k in kinds]
    with torch.no_grad():
        probs = probabilities(forward(model, torch.cat(rows), cost), "softmax").view(len(rows), b, -1)
    p_x = probabilities(logits_x, "softmax")
    pick = lambda p: p.gather(1, y[:, None])[:, 0].tolist()  # noqa: E731
    return {
        "label": y.tolist(), "area": hard.flatten(1).mean(1).tolist(),
        "p_y_x": pick(p_x), "p_y_e": pick(probs[0]),
        "p_y_e_tilde": probs[1:].gather(2, y.view(1, b, 1).expand(len(kinds), b, 1))[..., 0].mean(0).tolist(),
        "p_y_e_tilde_by_background": {k: pick(probs[1 + i]) for i, k in enumerate(kinds)},
        "keeps_decision": (probs[0].argmax(1) == y).tolist(),
    }
