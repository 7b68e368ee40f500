"""PatchNet saliency (MedicalPatchNet, Wienholt et al. 2025, seed 003) as a registered method.

A :class:`~medexplain.models.patchnet.PatchNet` explains itself: its patch logits ``z_i`` painted over
the patches (raw map), or ``z_i * sigmoid(Z)`` (scaled map, paper Fig. 2 f), optionally smoothed over
shifted grids (paper Fig. 3). The model and that computation live in :mod:`medexplain.models.patchnet`;
this module only registers ``"patchnet"``, which applies to PatchNet models alone
(``mx.available_methods(model=...)``; see ``docs/design.md``, "The registry").
"""
from __future__ import annotations

from typing import Literal

from medexplain.engine.core import n_passes, unwrap
from medexplain.engine.registry import register
from medexplain.errors import UnsupportedModelError
from medexplain.models.patchnet import PatchNet


def is_patchnet(model, output=None) -> str | None:
    """``applies_to`` predicate: None for a :class:`PatchNet` (also inside ``output=``'s adapter), else why not."""
    if isinstance(unwrap(model), PatchNet) and n_passes(model) > 1:
        return "explains one PatchNet by its own patch logits, not an ensemble or test-time flips of it"
    if isinstance(unwrap(model), PatchNet):
        return None
    return "explains a medexplain.models.PatchNet only (its own patch logits); use a post-hoc method for other models"


@register("patchnet", needs_grad=False, applies_to=is_patchnet, family="model")
def patchnet(model, x, target, cost, kind: Literal["raw", "scaled"] = "raw", offset=None, border: str = "reference",
             chunk_size: int | None = None, activation: str = "sigmoid"):
    """``mx.explain(net, x, method="patchnet", target=k)``: the PatchNet's own patch saliency
    (:meth:`PatchNet.saliency`: ``kind`` raw or scaled, shift ``offset``, ``border``, ``chunk_size`` rows
    per model call, output ``activation`` for the scaled map)."""
    net = unwrap(model)
    if n_passes(model) > 1:
        raise UnsupportedModelError(f"method 'patchnet' {is_patchnet(model)}; use a post-hoc method such as saliency")
    if not isinstance(net, PatchNet):
        raise UnsupportedModelError("method 'patchnet' explains a medexplain.models.PatchNet; for another model "
                                    "use a post-hoc method such as gradcam")
    amap = net.saliency(x, target, kind=kind, offset=offset, border=border, chunk_size=chunk_size,
                        activation=activation, cost=cost)
    return amap, {"kind": kind, "offset": offset, "border": border, "patch_size": net.patch_size}
