"""Every training augmentation of medexplain, batched, with the :func:`medexplain.models.training.train` contract
``aug(x, y, generator) -> (x, y)``: MedicalPatchNet's (:class:`PaperAugment`), random flips
(:func:`random_flip`) and contrast dropout (:func:`channel_dropout`) for the zoo's volumes, and
:func:`compose`.

:class:`PaperAugment` is MedicalPatchNet's training augmentation (seed 003, "Training"; reference
``ChexpertDataset.py``).

The reference applies, per image, torchvision's ``RandomResizedCrop(scale=(0.5, 1))`` back to the input
size, ``RandomRotation(5)`` and ``ColorJitter(brightness=0.3)``. :class:`PaperAugment` draws the same
parameters for every sample of a batch at once and applies crop-resize and rotation as **one** affine
resampling (``affine_grid`` + ``grid_sample``, bilinear / trilinear, zero fill like torchvision), so 2D
and 3D share one code path and nothing loops over samples. Brightness multiplies the image by a factor
in ``[0.7, 1.3]`` (torchvision's brightness blend with black); ``clip`` optionally clamps the result (the
reference clamps to [0, 1] because its images are scaled to [0, 1]).

For volumes the crop keeps a volume fraction in ``scale`` with per-axis aspect ratios in ``ratio``, and
the rotation is a small rotation about every axis (each angle in ``[-degrees, degrees]``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medexplain.errors import InputError

__all__ = ["PaperAugment", "channel_dropout", "compose", "random_flip"]


def _rotation(angles: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n, n) rotation matrices in spatial-axis order: one angle in 2D, three (about each axis) in 3D."""
    c, s = torch.cos(angles), torch.sin(angles)
    b = angles.shape[0]
    if n == 2:
        return torch.stack([torch.stack([c[:, 0], -s[:, 0]], 1), torch.stack([s[:, 0], c[:, 0]], 1)], 1)
    mats = []
    for ax in range(3):
        r = torch.eye(3, dtype=angles.dtype, device=angles.device).repeat(b, 1, 1)
        i, j = [a for a in range(3) if a != ax]
        r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c[:, ax], -s[:, ax], s[:, ax], c[:, ax]
        mats.append(r)
    return mats[0] @ mats[1] @ mats[2]


class PaperAugment:
    """``aug(x)`` -> augmented batch ``(B, C, *spatial)`` (same shape); ``aug(x, y, generator)`` -> ``(x, y)``
    as :func:`medexplain.models.training.train` calls it (labels unchanged, label maps resampled alike).

    Deterministic given ``seed`` (an internal ``torch.Generator`` advances with every call) or the
    ``generator`` passed in.
    ``p_crop=0``, ``degrees=0`` or ``brightness=0`` switch a part off.
    """

    def __init__(self, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), degrees: float = 5.0, brightness: float = 0.3,
                 clip: tuple[float, float] | None = None, p_crop: float = 1.0, seed: int = 0):
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]) or degrees < 0 \
                or not 0 <= brightness < 1 or not 0 <= p_crop <= 1:
            raise InputError("PaperAugment: need 0 < scale <= 1, 0 < ratio, degrees >= 0, 0 <= brightness < 1")
        self.scale, self.ratio, self.degrees, self.brightness = scale, ratio, degrees, brightness
        self.clip, self.p_crop = clip, p_crop
        self.gen = torch.Generator().manual_seed(seed)

    def _u(self, *shape, lo=0.0, hi=1.0, gen=None) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen or self.gen, dtype=torch.float64)

    def theta(self, b: int, spatial, generator: torch.Generator | None = None) -> torch.Tensor:
        """Affine matrices ``(B, n, n+1)`` for ``affine_grid`` (output -> input, normalised, x-y-z order)."""
        n = len(spatial)
        # random resized crop: volume fraction `area`, per-axis side fractions with log-uniform ratios
        area = self._u(b, lo=self.scale[0], hi=self.scale[1], gen=generator)
        logr = self._u(b, n, lo=math.log(self.ratio[0]), hi=math.log(self.ratio[1]), gen=generator) / 2
        logr = logr - logr.mean(1, keepdim=True) if n > 2 else torch.cat([logr[:, :1], -logr[:, :1]], 1)
        frac = (area.log().unsqueeze(1) / n + logr).exp().clamp(max=1.0)
        crop = self._u(b, gen=generator) < self.p_crop
        frac = torch.where(crop.unsqueeze(1), frac, torch.ones_like(frac))
        centre = (1 - frac) * (2 * self._u(b, n, gen=generator) - 1)                   # crop centre, normalised
        k = 1 if n == 2 else 3
        rot = _rotation(self._u(b, k, lo=-1, hi=1, gen=generator) * math.radians(self.degrees), n)
        half = torch.tensor([s / 2 for s in spatial], dtype=torch.float64)
        # out u (normalised) -> rotate in pixel units -> scale into the crop: in = c + f * D^-1 R D u
        a = frac.unsqueeze(2) * (rot * half.view(1, 1, n) / half.view(1, n, 1))
        flip = list(range(n - 1, -1, -1))                                # spatial order -> grid (x, y, z)
        a = a[:, flip][:, :, flip]
        return torch.cat([a, centre[:, flip].unsqueeze(2)], 2)

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None, generator: torch.Generator | None = None):
        """Augment ``x``; with ``y`` return ``(x, y)`` (the :func:`medexplain.models.training.train` contract):
        class labels pass through, dense label maps / masks ``(B, *spatial)`` or ``(B, 1, *spatial)`` are
        resampled with the same transform (nearest). ``generator`` overrides the internal one."""
        if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
            raise InputError("PaperAugment expects a batch (B, C, H, W) or (B, C, D, H, W)")
        b, _, *spatial = x.shape
        ftype = x.dtype if x.is_floating_point() else torch.float32
        theta = self.theta(b, spatial, generator).to(device=x.device, dtype=ftype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x.to(ftype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.brightness:
            f = self._u(b, lo=1 - self.brightness, hi=1 + self.brightness, gen=generator).to(out)
            out = out * f.view(b, *[1] * (x.ndim - 1))
        if self.clip is not None:
            out = out.clamp(*self.clip)
        if y is None:
            return out
        dense = tuple(y.shape[-len(spatial):]) == tuple(spatial) and y.ndim in (x.ndim - 1, x.ndim)
        if not dense:
            return out, y
        m = y if y.ndim == x.ndim else y.unsqueeze(1)
        mo = F.grid_sample(m.to(grid.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        mo = mo.to(y.dtype)
        return out, (mo if y.ndim == x.ndim else mo[:, 0])


def random_flip(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
    """Flip each sample along each spatial axis with probability 1/2 (image and dense label map alike;
    class labels pass through)."""
    for ax in range(2, x.ndim):                       # spatial axis ax of x is axis ax - 1 of a label map
        f = torch.rand(x.shape[0], generator=generator) < 0.5
        if f.any():
            x = x.clone()
            x[f] = x[f].flip(ax)
            if y.ndim == x.ndim - 1:
                y = y.clone()
                y[f] = y[f].flip(ax - 1)
    return x, y


def channel_dropout(p: float, channels=None):
    """Augmentation for multi-contrast inputs: zero each of ``channels`` (default: all) of each sample
    with probability ``p``, never all of a sample's channels, so a model learns to use weaker contrasts
    when a stronger one is missing (what contrast Shapley values probe). Labels pass through."""
    if not 0 <= p <= 1:
        raise InputError(f"channel_dropout: p must be in [0, 1], got {p}")

    def aug(x, y, generator):
        drop = torch.rand(x.shape[0], x.shape[1], generator=generator) < p
        if channels is not None:
            drop[:, [c for c in range(x.shape[1]) if c not in channels]] = False
        drop[drop.all(1), -1] = False
        return x * (~drop).view(*drop.shape, *[1] * (x.ndim - 2)).to(x.dtype), y
    return aug


def compose(*augs):
    """The augmentations applied in order, each with the same generator."""
    def aug(x, y, generator):
        for a in augs:
            x, y = a(x, y, generator)
        return x, y
    return aug
