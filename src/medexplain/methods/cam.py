"""Class activation maps: Grad-CAM, Grad-CAM++, Eigen-CAM.

One template (as in pytorch-grad-cam): :func:`layer_activation_and_gradient` captures the layer with
the one layer hook (:func:`medexplain.core.capture_layer`, a clone, so an in-place op after the layer
cannot alter it) and backpropagates the target only down to it (never to the weights or below the
layer); each method only says how channel weights are formed. Written against ``(B, K, *spatial)``, so
2D and 3D share one path; maps are upsampled (bilinear / trilinear, align_corners=False as MONAI) to
the input grid. See ``docs/design.md`` ("The layer hook").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import capture_layer, default_cam_layer, forward, layer_gradient, resize_to
from ..errors import UnsupportedModelError
from ..registry import register


def layer_activation_and_gradient(model, x, target, cost, layer, grad: bool = True):
    """Activations A ``(B, K, *s)`` at ``layer`` and, if ``grad``, dscore/dA. Returns (A, dA, output).

    ``A`` is the layer's own output (a clone), also when an in-place op such as ``ReLU(inplace=True)``
    follows it; a layer called more than once in the forward, or one the target does not depend on,
    gives a typed error (:func:`medexplain.core.layer_gradient`)."""
    layer = layer if layer is not None else default_cam_layer(model)
    b = x.shape[0]
    with capture_layer(model, layer, grad=grad) as cap, torch.set_grad_enabled(grad):
        out = forward(model, x, cost)
        a = cap.activation
        if a is None:
            raise UnsupportedModelError(f"layer {layer!r} was not called in the forward pass")
        if a.ndim != x.ndim:
            raise UnsupportedModelError(f"layer {layer!r} output has shape {tuple(a.shape)}; a CAM needs a spatial "
                                        f"feature map (B, K, *spatial) with {x.ndim - 2} spatial dims")
        if not grad:
            return a, None, out
        g = layer_gradient(target.scores(out, None, b), cap)
    cost.n_backward += b
    return a.detach(), g, out.detach()


def _spatial_sum(t):
    return t.flatten(2).sum(2).view(*t.shape[:2], *[1] * (t.ndim - 2))


def _cam_map(a, w, x, relu=True):
    m = (w * a).sum(1, keepdim=True)
    return resize_to(F.relu(m) if relu else m, tuple(x.shape[2:]))


@register("gradcam", needs_hooks=True)
def gradcam(model, x, target, cost, layer=None):
    """Grad-CAM (Selvaraju et al. 2017, eq. 1-2): w_k = spatial mean of dS/dA_k; map = ReLU(sum_k w_k A_k)."""
    a, g, _ = layer_activation_and_gradient(model, x, target, cost, layer)
    w = g.flatten(2).mean(2).view(*g.shape[:2], *[1] * (g.ndim - 2))
    return _cam_map(a, w, x), {"layer": layer or default_cam_layer(model)}


@register("gradcam++", needs_hooks=True)
def gradcam_pp(model, x, target, cost, layer=None, variant: str = "paper"):
    """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19) with exponential score: alpha = g^2 / (2 g^2 + sum_ab(A) g^3),
    0/0 -> 0; w_k = sum_ij alpha ReLU(g). ``variant="monai"`` reproduces MONAI's GradCAMpp instead:
    sum(A g^3) in the denominator, +1e-7, and ReLU(exp(S) g) in the weights.
    """
    a, g, out = layer_activation_and_gradient(model, x, target, cost, layer)
    g2, g3 = g * g, g * g * g
    if variant == "paper":
        den = 2 * g2 + _spatial_sum(a) * g3
        alpha = torch.where(den != 0, g2 / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(den))
        w = _spatial_sum(alpha * F.relu(g))
    elif variant == "monai":
        den = 2 * g2 + _spatial_sum(a * g3)
        den = torch.where(den != 0, den, torch.ones_like(den))
        score = target.scores(out, None, x.shape[0]).view(-1, *[1] * (g.ndim - 1))
        w = _spatial_sum(g2 / (den + 1e-7) * F.relu(score.exp() * g))
    else:
        raise ValueError(f"gradcam++ variant must be 'paper' or 'monai', got {variant!r}")
    return _cam_map(a, w, x), {"layer": layer or default_cam_layer(model), "variant": variant}


@register("eigencam", needs_target=False, needs_grad=False, needs_hooks=True)
def eigencam(model, x, target, cost, layer=None):
    """Eigen-CAM (Muhammad & Yeasin 2020, section 3): projection of the centred activations of ``layer``
    (its own output, before any in-place op that follows it) on their first principal component.

    Class-agnostic (the target is ignored). The SVD sign is arbitrary, so it is fixed such that the map
    correlates positively with the channel-mean activation. Returned signed (no ReLU).
    """
    a, _, _ = layer_activation_and_gradient(model, x, target, cost, layer, grad=False)
    b, k, *s = a.shape
    flat = a.flatten(2).transpose(1, 2)                       # (B, N, K)
    flat = flat - flat.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    proj = flat @ vh[:, 0, :].unsqueeze(-1)                   # (B, N, 1)
    mean_act = a.mean(1).flatten(1)
    corr = ((proj[..., 0] - proj[..., 0].mean(1, keepdim=True)) * (mean_act - mean_act.mean(1, keepdim=True))).sum(1)
    proj = proj[..., 0] * torch.where(corr < 0, -1.0, 1.0).to(proj).unsqueeze(1)
    return resize_to(proj.view(b, 1, *s), tuple(x.shape[2:])), {"layer": layer or default_cam_layer(model)}
