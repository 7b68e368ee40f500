"""The CAM family on one template: Grad-CAM, Grad-CAM++, HiResCAM, XGradCAM, LayerCAM, Grad-CAM
element-wise, Eigen-CAM, Score-CAM and Ablation-CAM.

The template (as pytorch-grad-cam's ``BaseCAM``): :func:`layer_cells` resolves the layer (a named one,
or :func:`medexplain.methods.cam_layers.default_layer`), records it with the one layer hook
(:func:`medexplain.engine.core.capture_layers`: a leaf replaces the layer's output, so the backward stops at the
layer and never reaches the weights; a clone, so an in-place op after the layer cannot alter it), reads
it as a feature map ``A`` of shape ``(B, K, *grid)`` through its :class:`~.cam_layers.LayerView`
(channels-first, channels-last, tokens or ``reshape=``), and hands back ``A`` and ``dS/dA`` for the
target score ``S``. Each method says only how the cell map is formed from them; :func:`to_input`
brings it to the input grid with receptive-field aligned upsampling (``upsample="aligned"``, the
default) or MONAI's and pytorch-grad-cam's bilinear placement (``upsample="bilinear"``); see
:mod:`medexplain.methods.cam_layers`. Every member is N-D (2D and 3D share one path), batched, and takes
class, multi-label and region targets (the target contract, ``docs/design.md``). Maps are on the input
grid, ``(B, 1, *spatial)``, and not normalised.

Common options: ``layer`` (a name or module; default: the rule of ``cam_layers``), ``upsample``
(``"aligned"`` | ``"bilinear"``), ``layout`` (``"auto"`` | ``"channels_first"`` | ``"channels_last"`` |
``"tokens"``) and ``reshape`` (a callable ``(B, ...) -> (B, K, *grid)``) for the named layer.

A layer that runs several times in one forward (weight sharing) is combined for the gradient members:
each call ``c`` gives its own ``A_c`` and ``dS/dA_c`` and the cell maps are summed over calls before the
final ReLU (the derivative of the score is the sum over calls). This needs every call to see the whole
batch on the same cells (checked: a sliding-window call on a batch of windows is a typed error, never a
map of the wrong batch); Eigen-CAM, Score-CAM and Ablation-CAM need a layer that runs once.

FullGrad (Srinivas & Fleuret 2019) is not in the family: it sums bias-gradient maps of every layer plus
the input-gradient term, so it is not a one-layer CAM and does not fit this template.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from medexplain.engine.core import capture_layers, chunks, find_layer, find_passes, forward, n_passes, pass_schedule, plain_pass
from medexplain.engine.registry import register
from medexplain.errors import InputError, RepeatedLayerCallError, UnsupportedModelError
from medexplain.methods.cam_layers import LAYOUTS, UPSAMPLE, LayerPlan, layer_plan, upsample_cells


def _check_options(upsample, layout, *more):
    if upsample not in UPSAMPLE[:2]:
        raise InputError(f"upsample must be 'aligned' or 'bilinear', got {upsample!r}")
    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    for name, value, allowed in more:
        if value not in allowed:
            raise InputError(f"{name} must be one of {allowed}, got {value!r}")


def plan_for(model, x, cost, layer=None, layout="auto", reshape=None) -> LayerPlan:
    """The layer plan of a CAM call (:func:`medexplain.methods.cam_layers.layer_plan`), found on the model's
    plain pass (:func:`medexplain.engine.core.plain_pass`: its first network, unflipped)."""
    return layer_plan(plain_pass(model), x, layer, layout, reshape, cost)


def _check_calls(cap, plan: LayerPlan, rows: int, single: bool, passes: int = 1) -> None:
    n = cap.calls
    if n == 0:
        raise UnsupportedModelError(f"layer {plan.name!r} was not called in the forward pass")
    shapes = [tuple(o.shape) for o in cap.outputs]
    if single and (n > 1 or passes > 1):
        if passes > 1:
            raise UnsupportedModelError(
                f"layer {plan.name!r} ran in {passes} passes of the model (its test-time flips / ensemble members); "
                "this method needs a layer that runs once: use a gradient CAM (gradcam, gradcam++, hirescam, "
                "xgradcam, layercam, gradcam_elementwise), or a Model without flips and with one network")
        raise UnsupportedModelError(f"layer {plan.name!r} was called {n} times in one forward pass (a shared module, "
                                    "or a test-time augmentation / ensemble inside the model: give those to mx.Model "
                                    "as flip_axes= / an ensemble instead); this method needs a layer that runs once")
    bad = [s for s in shapes if s[0] != rows or s[1:] != plan.view.row_shape]
    if bad:
        raise UnsupportedModelError(
            f"layer {plan.name!r} was called {n} times in one forward with outputs {shapes} for a batch of {rows} "
            f"(expected {(rows, *plan.view.row_shape)} for every call): a CAM combines calls only when each sees "
            "the whole batch on the same cells (sliding-window inference runs it on batches of windows: explain the "
            "network itself on each window)")


@dataclass
class PassCall:
    """One call of a CAM layer in one forward: its output (as recorded), the input dims its pass flipped
    (``()`` for the plain pass), its index among the calls of its pass, and whether an earlier call of the
    same layer fed it (a shared block applied twice)."""

    tensor: torch.Tensor
    dims: tuple
    index: int
    fed: bool


@contextlib.contextmanager
def capture_passes(model, plan: LayerPlan, mode: str):
    """The plan's layer recorded in every network of the model's passes (:func:`medexplain.engine.core.pass_schedule`:
    ensemble members x test-time flips; one network and one pass for a plain model), by the one layer hook
    (:func:`medexplain.engine.core.capture_layers`). Yields a function that, after the forward, returns every call
    as a :class:`PassCall` in schedule order, with typed errors for a layer that is not called once per
    pass on the whole batch, and (``mode="leaf"``) for one called several times on same-shaped inputs by
    code medexplain does not know (:class:`~medexplain.errors.RepeatedLayerCallError`)."""
    sched = pass_schedule(model)
    leaves = []
    for net, _ in sched:
        if not any(net is n for n in leaves):
            leaves.append(net)
    modules = [find_layer(n, plan.name) for n in leaves]
    known = find_passes(model)
    aligned = bool(getattr(known if known is not None else model, "aligned_calls", False))
    with capture_layers(model, modules, mode=mode) as caps:
        def calls(rows: int, single: bool) -> list[PassCall]:
            if single and len(sched) > 1:
                _check_calls(next(iter(caps.values())), plan, rows, True, len(sched))
            out = []
            for net, cap in zip(leaves, caps.values()):
                entries = [tuple(sorted(d)) for n, d in sched if n is net]
                _check_calls(cap, plan, rows, single, len(sched))
                if cap.calls % len(entries):
                    raise UnsupportedModelError(f"layer {plan.name!r} ran {cap.calls} times in {len(entries)} passes of "
                                                "the model; a CAM needs the same number of calls in every pass")
                k = cap.calls // len(entries)
                fed = cap.fed or [False] * cap.calls
                if k > 1 and mode == "leaf" and not aligned and not all(fed[j] for j in range(cap.calls) if j % k):
                    raise RepeatedLayerCallError(
                        f"layer {plan.name!r} was called {k} times in one forward{' pass' if len(entries) == 1 else ''}"
                        f" on same-shaped inputs, not one call feeding the next: code inside the model runs it on "
                        "several inputs (a test-time augmentation or an ensemble wrapper?), which may flip them, and "
                        "summing the calls' cells would mix orientations. Give the plain network to mx.Model with "
                        "flip_axes=(...) for test-time flips or a list of networks for an ensemble (each pass is then "
                        "un-flipped before combining), or say the calls are aligned: mx.Model(net, aligned_calls=True)")
                out += [PassCall(t, entries[j // k], j % k, fed[j]) for j, t in enumerate(cap.outputs)]
            return out
        yield calls


def layer_cells(model, x, target, cost, plan: LayerPlan, grad: bool = True, single: bool = False):
    """``(A, dS/dA, output)``: per call of the plan's layer, ``A`` as ``(B, K, *grid)`` and, if ``grad``,
    the gradient of the target scores (lists in call order; ``None`` without ``grad``). Through test-time
    flips each pass's ``A`` and ``dS/dA`` are flipped back on the pass's axes (the layer's grid axes
    follow the input's), so every call is in the input's orientation (``docs/cam.md``)."""
    b = x.shape[0]
    with capture_passes(model, plan, "leaf" if grad else "detach") as recorded, torch.set_grad_enabled(grad):
        out = forward(model, x, cost)
        calls = recorded(b, single)
        if grad:
            score = target.scores(out, None, b)
            no_effect = UnsupportedModelError(f"the target score does not depend on layer {plan.name!r}; choose a "
                                              "layer on the path from the input to the explained output")
            if not score.requires_grad:
                raise no_effect
            gs = torch.autograd.grad(score.sum(), [c.tensor for c in calls], allow_unused=True)
            if all(g is None for g in gs):
                raise no_effect
            gs = [torch.zeros_like(c.tensor) if g is None else g for c, g in zip(calls, gs)]
    if grad:
        cost.n_backward += b * n_passes(model)
        grids = [plan.view(g) for g in gs]
        if plan.view.drop and all(not g.any() for g in grids) and any(g.any() for g in gs):
            raise UnsupportedModelError(
                f"the target score depends on layer {plan.name!r} only through its class token, which a CAM drops "
                "(a ViT's last block is read through the class token alone); choose an earlier block")
        grids = [unflip(g, c.dims) for g, c in zip(grids, calls)]
    acts = [unflip(plan.view(c.tensor.detach()), c.dims) for c in calls]
    return acts, (grids if grad else None), out.detach()


def unflip(t: torch.Tensor, dims) -> torch.Tensor:
    """A pass's layer cells ``(B, K, *grid)`` back in the input's orientation: the flip of the input's spatial
    axes ``dims`` is the flip of the same grid axes of a feature map whose grid resamples the input grid."""
    return torch.flip(t, tuple(dims)) if dims else t


def to_input(cells: torch.Tensor, plan: LayerPlan, x: torch.Tensor, upsample: str) -> torch.Tensor:
    """The cell map ``(B, 1, *grid)`` on the input grid (:func:`medexplain.methods.cam_layers.upsample_cells`)."""
    return upsample_cells(cells, tuple(x.shape[2:]), plan.centres, upsample)


def _spatial_sum(t):
    return t.flatten(2).sum(2).view(*t.shape[:2], *[1] * (t.ndim - 2))


def _spatial_mean(t):
    return t.flatten(2).mean(2).view(*t.shape[:2], *[1] * (t.ndim - 2))


def _safe_div(num, den):
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(num))


def _gradient_cam(model, x, target, cost, layer, upsample, layout, reshape, term, **extra):
    """The gradient members: ``term(A, dS/dA, S) -> (B, 1, *grid)`` per call (``S``: the target scores
    ``(B,)``), summed over calls, ReLU, upsampled."""
    _check_options(upsample, layout)
    plan = plan_for(model, x, cost, layer, layout, reshape)
    acts, grads, out = layer_cells(model, x, target, cost, plan)
    score = target.scores(out, None, x.shape[0])
    cells = F.relu(sum(term(a, g, score) for a, g in zip(acts, grads)))
    return to_input(cells, plan, x, upsample), {**plan.info(), "upsample": upsample, "calls": len(acts), **extra}


@register("gradcam", needs_hooks=True, family="CAM", aliases=("grad_cam",), windowed_cam=True,
          dicom_concept="GradientWeightedClassActivation")
def gradcam(model, x, target, cost, layer=None, upsample: str = "aligned", layout: str = "auto", reshape=None):
    """Grad-CAM (Selvaraju et al. 2017, eq. 1-2): w_k = spatial mean of dS/dA_k; map = ReLU(sum_k w_k A_k)."""
    return _gradient_cam(model, x, target, cost, layer, upsample, layout, reshape,
                         lambda a, g, _s: (_spatial_mean(g) * a).sum(1, keepdim=True))


GRADCAM_PP_VARIANTS = ("paper", "monai", "pytorch_grad_cam")


@register("gradcam++", needs_hooks=True, family="CAM", aliases=("gradcampp",), windowed_cam=True,
          dicom_concept="GradientWeightedClassActivation")
def gradcam_pp(model, x, target, cost, layer=None, variant: Literal[GRADCAM_PP_VARIANTS] = "paper",
               upsample: str = "aligned",
               layout: str = "auto", reshape=None):
    """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19) with exponential score: alpha = g^2 / (2 g^2 + sum_ab(A) g^3),
    0/0 -> 0; w_k = sum_ij alpha ReLU(g). ``variant="monai"`` reproduces MONAI's GradCAMpp instead:
    sum(A g^3) in the denominator, +1e-7, and ReLU(exp(S) g) in the weights; ``"pytorch_grad_cam"``
    reproduces pytorch-grad-cam's GradCAMPlusPlus (+1e-6 in the denominator, alpha = 0 where g = 0).
    """
    _check_options(upsample, layout, ("variant", variant, GRADCAM_PP_VARIANTS))

    def term(a, g, score):
        g2, g3 = g * g, g * g * g
        if variant == "paper":
            w = _spatial_sum(_safe_div(g2, 2 * g2 + _spatial_sum(a) * g3) * F.relu(g))
        elif variant == "pytorch_grad_cam":
            alpha = torch.where(g != 0, g2 / (2 * g2 + _spatial_sum(a) * g3 + 1e-6), torch.zeros_like(g))
            w = _spatial_sum(alpha * F.relu(g))
        else:
            den = 2 * g2 + _spatial_sum(a * g3)
            den = torch.where(den != 0, den, torch.ones_like(den))
            w = _spatial_sum(g2 / (den + 1e-7) * F.relu(score.exp().view(-1, *[1] * (g.ndim - 1)) * g))
        return (w * a).sum(1, keepdim=True)

    return _gradient_cam(model, x, target, cost, layer, upsample, layout, reshape, term, variant=variant)


@register("hirescam", needs_hooks=True, family="CAM", windowed_cam=True,
          dicom_concept="GradientWeightedClassActivation")
def hirescam(model, x, target, cost, layer=None, upsample: str = "aligned", layout: str = "auto", reshape=None):
    """HiResCAM (Draelos & Carin 2020, the HiResCAM definition): map = ReLU(sum_k dS/dA_k * A_k), the element-wise product
    of gradient and activation summed over channels (no spatial averaging of the gradient); ReLU as in
    Grad-CAM eq. 2 and pytorch-grad-cam's HiResCAM."""
    return _gradient_cam(model, x, target, cost, layer, upsample, layout, reshape,
                         lambda a, g, _s: (g * a).sum(1, keepdim=True))


@register("xgradcam", needs_hooks=True, family="CAM", windowed_cam=True,
          dicom_concept="GradientWeightedClassActivation")
def xgradcam(model, x, target, cost, layer=None, upsample: str = "aligned", layout: str = "auto", reshape=None):
    """XGrad-CAM (Fu et al. 2020, the XGrad-CAM weights): w_k = sum_ij (A_k,ij / sum_ij A_k) dS/dA_k,ij (0 for a channel
    whose activations sum to 0); map = ReLU(sum_k w_k A_k)."""
    return _gradient_cam(model, x, target, cost, layer, upsample, layout, reshape,
                         lambda a, g, _s: (_spatial_sum(_safe_div(g * a, _spatial_sum(a).expand_as(a))) * a).sum(1, keepdim=True))


@register("layercam", needs_hooks=True, family="CAM", windowed_cam=True,
          dicom_concept="GradientWeightedClassActivation")
def layercam(model, x, target, cost, layer=None, upsample: str = "aligned", layout: str = "auto", reshape=None):
    """LayerCAM (Jiang et al. 2021, the LayerCAM definition): map = ReLU(sum_k ReLU(dS/dA_k) * A_k), a per-location
    positive-gradient weight."""
    return _gradient_cam(model, x, target, cost, layer, upsample, layout, reshape,
                         lambda a, g, _s: (F.relu(g) * a).sum(1, keepdim=True))


@register("gradcam_elementwise", needs_hooks=True, family="CAM", windowed_cam=True,
          dicom_concept="GradientWeightedClassActivation")
def gradcam_elementwise(model, x, target, cost, layer=None, upsample: str = "aligned", layout: str = "auto",
                        reshape=None):
    """Grad-CAM element-wise (pytorch-grad-cam's GradCAMElementWise, after HiResCAM): map =
    sum_k ReLU(dS/dA_k * A_k), the ReLU taken per element before the channel sum."""
    return _gradient_cam(model, x, target, cost, layer, upsample, layout, reshape,
                         lambda a, g, _s: F.relu(g * a).sum(1, keepdim=True))


@register("eigencam", needs_target=False, needs_grad=False, needs_hooks=True, family="CAM", windowed_cam=True,
          dicom_concept="ClassActivation")
def eigencam(model, x, target, cost, layer=None, upsample: str = "aligned", layout: str = "auto", reshape=None):
    """Eigen-CAM (Muhammad & Yeasin 2020, section 3): projection of the centred activations of ``layer``
    (its own output, before any in-place op that follows it) on their first principal component.

    Class-agnostic (the target is ignored). The SVD sign is arbitrary, so it is fixed such that the map
    correlates positively with the channel-mean activation. Returned signed (no ReLU).
    """
    _check_options(upsample, layout)
    plan = plan_for(model, x, cost, layer, layout, reshape)
    (a,), _, _ = layer_cells(model, x, target, cost, plan, grad=False, single=True)
    a = a.to(x.dtype)   # cells captured under autocast (mx.Model(amp=True)) are half precision: the SVD needs more
    b, k, *s = a.shape
    flat = a.flatten(2).transpose(1, 2)                       # (B, N, K)
    flat = flat - flat.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    proj = flat @ vh[:, 0, :].unsqueeze(-1)                   # (B, N, 1)
    mean_act = a.mean(1).flatten(1)
    corr = ((proj[..., 0] - proj[..., 0].mean(1, keepdim=True)) * (mean_act - mean_act.mean(1, keepdim=True))).sum(1)
    proj = proj[..., 0] * torch.where(corr < 0, -1.0, 1.0).to(proj).unsqueeze(1)
    return to_input(proj.view(b, 1, *s), plan, x, upsample), {**plan.info(), "upsample": upsample}


@register("scorecam", needs_grad=False, needs_hooks=True, family="CAM",
          no_sliding="Score-CAM masks the whole input with each channel's map", dicom_concept="ClassActivation")
def scorecam(model, x, target, cost, layer=None, upsample: str = "aligned", layout: str = "auto", reshape=None,
             chunk_size: int | None = 64, mask_upsample: str | None = None):
    """Score-CAM (Wang et al. 2020, Algorithm 1): each channel's activation map, upsampled to the input
    and min-max normalised to [0, 1], masks the input; the target score of each masked input ``S_k``
    gives the weights alpha = softmax_k(S_k) and map = ReLU(sum_k alpha_k A_k).

    The paper's increase of confidence ``S_k - S(baseline)`` is omitted: a softmax is unchanged by a
    shared offset (pytorch-grad-cam does the same). No gradients. ``chunk_size``: rows (masked inputs)
    given to the model in one call. ``mask_upsample`` (default: ``upsample``) places the masks;
    ``"align_corners"`` reproduces pytorch-grad-cam's ScoreCAM masks (``UpsamplingBilinear2d``). Cost:
    ``B (K + 1)`` forward rows for ``K`` channels.
    """
    mask_upsample = mask_upsample or upsample
    _check_options(upsample, layout, ("mask_upsample", mask_upsample, UPSAMPLE))
    plan = plan_for(model, x, cost, layer, layout, reshape)
    (a,), _, _ = layer_cells(model, x, target, cost, plan, grad=False, single=True)
    b, k = a.shape[:2]
    masks = upsample_cells(a, tuple(x.shape[2:]), plan.centres, mask_upsample)          # (B, K, *s)
    lo, hi = masks.flatten(2).amin(2), masks.flatten(2).amax(2)
    view = (b, k, *[1] * (x.ndim - 2))
    masks = _safe_div(masks - lo.view(view), (hi - lo).view(view).expand_as(masks))
    rows = torch.arange(b, device=x.device).repeat_interleave(k)
    chans = torch.arange(k, device=x.device).repeat(b)
    scores = torch.empty(b * k, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        for sl in chunks(b * k, chunk_size):
            xr = x[rows[sl]] * masks[rows[sl], chans[sl]].unsqueeze(1)
            scores[sl] = target.scores(forward(model, xr, cost), rows[sl], b)
    alpha = scores.view(b, k).softmax(1).view(view)
    cells = F.relu((alpha * a).sum(1, keepdim=True))
    return to_input(cells, plan, x, upsample), {**plan.info(), "upsample": upsample, "mask_upsample": mask_upsample}


@register("ablationcam", needs_grad=False, needs_hooks=True, family="CAM",
          no_sliding="Ablation-CAM ablates the layer of one forward of the whole input",
          dicom_concept="ClassActivation")
def ablationcam(model, x, target, cost, layer=None, upsample: str = "aligned", layout: str = "auto", reshape=None,
                chunk_size: int | None = 64, ablation_value: float = 0.0):
    """Ablation-CAM (Desai & Ramaswamy 2020, the ablation slope): w_k = (S - S_k) / S, with ``S_k`` the target score
    when channel ``k`` of the layer is set to ``ablation_value`` (0, the paper's ablation) at every cell;
    map = ReLU(sum_k w_k A_k). Where ``S = 0`` the raw drop ``S - S_k`` is used.

    The ablation is an output edit of the one layer hook (:func:`medexplain.engine.core.capture_layers`,
    ``edit=``), removed on exit, also on error; the model's layers are never replaced. It works in the
    layer's own layout (channels-last, tokens: the class token is left as is). ``chunk_size``: rows
    (one per sample and channel) given to the model in one call. Cost: ``B (K + 1)`` forward rows.
    """
    _check_options(upsample, layout)
    plan = plan_for(model, x, cost, layer, layout, reshape)
    (a,), _, out = layer_cells(model, x, target, cost, plan, grad=False, single=True)
    b, k = a.shape[:2]
    s0 = target.scores(out, None, b)
    cells_of = plan.view.index_map().view(k, -1).to(x.device)                           # (K, cells)
    rows = torch.arange(b, device=x.device).repeat_interleave(k)
    chans = torch.arange(k, device=x.device).repeat(b)
    drops = torch.empty(b * k, dtype=x.dtype, device=x.device)
    current = {}

    def ablate(_name, t):
        idx = cells_of[current["chans"]]
        if t.shape[0] != idx.shape[0]:
            raise UnsupportedModelError(f"layer {plan.name!r} saw {t.shape[0]} rows for {idx.shape[0]} ablations")
        flat = t.reshape(t.shape[0], -1).clone()
        flat.scatter_(1, idx, ablation_value)
        return flat.view(t.shape)

    with torch.no_grad(), capture_layers(model, [plan.name], mode="detach", edit=ablate) as caps:
        for sl in chunks(b * k, chunk_size):
            current["chans"] = chans[sl]
            s = target.scores(forward(model, x[rows[sl]], cost), rows[sl], b)
            _check_calls(caps[plan.name], plan, sl.stop - sl.start, single=True)
            caps[plan.name].outputs.clear()
            caps[plan.name].order.clear()
            drops[sl] = s0[rows[sl]] - s
    den = s0[rows]
    w = torch.where(den != 0, drops / torch.where(den != 0, den, torch.ones_like(den)), drops).view(b, k)
    cells = F.relu((w.view(b, k, *[1] * (x.ndim - 2)) * a).sum(1, keepdim=True))
    return to_input(cells, plan, x, upsample), {**plan.info(), "upsample": upsample, "ablation_value": ablation_value}
