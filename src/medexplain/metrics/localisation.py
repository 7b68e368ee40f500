"""Localisation metrics of CheXlocalize (Saporta et al. 2022) and MedicalPatchNet (SPEC section 5)."""
from __future__ import annotations

import torch

from ..core import resize_to
from ..errors import InputError

__all__ = ["hit_rate"]


def _as_maps_masks(maps, masks):
    maps, masks = torch.as_tensor(maps), torch.as_tensor(masks)
    if masks.ndim == maps.ndim - 1:      # (B, *s) masks against (B, 1, *s) maps
        masks = masks.unsqueeze(1)
    if maps.ndim != masks.ndim or maps.shape[0] != masks.shape[0] or maps.ndim not in (4, 5):
        raise InputError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must be (B, 1, *spatial) with the same B")
    if maps.shape[1] != 1:
        maps = maps.sum(1, keepdim=True)  # channel maps: localise their sum
    return maps, masks.bool()


def hit_rate(maps, masks) -> torch.Tensor:
    """Pointing game per case: resize the map to the mask grid (bilinear/trilinear), take the first
    maximum in C order, hit if the mask is 1 there. Returns floats ``(B,)``: 1.0 hit, 0.0 miss, NaN where
    the mask is empty (those cases are excluded from means: use ``torch.nanmean``).
    """
    maps, masks = _as_maps_masks(maps, masks)
    maps = resize_to(maps.float() if not torch.is_floating_point(maps) else maps, tuple(masks.shape[2:]))
    idx = maps.flatten(1).argmax(1)  # torch.argmax returns the first maximal index
    hit = masks.flatten(1).gather(1, idx[:, None])[:, 0].float()
    return torch.where(masks.flatten(1).any(1), hit, torch.full_like(hit, float("nan")))
