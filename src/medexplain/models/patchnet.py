"""MedicalPatchNet (Wienholt et al. 2025, seed 003): a self-explaining classifier.

The input ``(B, C, *spatial)`` is cut into non-overlapping patches of size ``p`` (a grid ``G``); one
backbone classifies every patch (patches stacked on the batch axis); the image logit is the fixed
arithmetic mean of the patch logits, ``Z = 1/|G| sum_i z_i`` (paper, Fig. 2 c-d), and the sigmoid
(multi-label) or softmax is applied after averaging. The patch logits *are* the explanation:

* raw map: ``z_i`` painted over patch ``i``;
* scaled map: ``z_hat_i = sigmoid(Z) * z_i`` (paper, Fig. 2 f).

Shifted smoothing (paper, Fig. 3; reference ``imgRetrivalUtil.createShiftImg`` and
``figureGeneration.genLocalClassMap``): for every shift ``s`` of an offset grid with step ``o`` along
each axis (``s_a`` in the multiples of ``o`` folded into ``[-p/2, p/2)``, so ``(p/o)^d`` shifts), the image
is shifted with zero padding, ``x_s(j) = x(j + s)``, mapped, and the map is shifted back,
``M(j) += M_s(j - s)``. The reference divides by the number of shifts regardless of how many cover a
pixel (``border="reference"``: borders are attenuated); ``border="coverage"`` divides each pixel by the
number of shifts whose (shifted-back) grid covers it. ``o = p`` gives the plain patch map, ``o = 1``
costs ``p^d`` passes. A patch size equal to the image gives the ordinary image-level classifier.

This module holds the model; its explainer is registered as ``"patchnet"`` in
:mod:`medexplain.methods.patchnet` (``mx.explain(net, x, method="patchnet")``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medexplain.engine.core import Cost, check_input, chunks, model_guard, select_output
from medexplain.engine.ops import probabilities
from medexplain.engine.targets import MultiLabel, Target, as_target
from medexplain.errors import InputError, TargetError, UnsupportedModelError

__all__ = ["PatchNet", "shift_offsets"]


def _per_axis(v, n: int, what: str) -> tuple[int, ...]:
    t = (int(v),) * n if isinstance(v, int) else tuple(int(i) for i in v)
    if len(t) != n or min(t) < 1:
        raise InputError(f"{what} must be a positive int or {n} positive ints, got {v!r}")
    return t


def shift_offsets(patch: int, offset: int) -> list[int]:
    """Shifts along one axis: multiples of ``offset`` folded into ``[-patch//2, patch - patch//2)``, sorted.

    The reference's ``getShiftSteps`` for ``patch / offset`` steps: for p = 64, o = 1 this is -32..31;
    o = p gives [0].
    """
    if patch % offset:
        raise InputError(f"the shift offset ({offset}) must divide the patch size ({patch})")
    half = patch // 2
    return sorted(((k * offset + half) % patch) - half for k in range(patch // offset))


class PatchNet(nn.Module):
    """MedicalPatchNet around any ``backbone`` mapping a patch ``(N, C, *p)`` to logits ``(N, K)``.

    ``patch_size`` is an int or one int per spatial axis; ``spatial_dims`` is 2 or 3. MONAI classifiers
    (``DenseNet121``, ``EfficientNetBN``, ...) work as they are. ``forward(x)`` returns the image logits
    ``(B, K)`` = the mean of :meth:`patch_logits` over the grid.
    """

    def __init__(self, backbone: nn.Module, patch_size, spatial_dims: int = 2):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise InputError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if not isinstance(backbone, nn.Module):
            raise UnsupportedModelError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}")
        self.backbone = backbone
        self.spatial_dims = spatial_dims
        self.patch_size = _per_axis(patch_size, spatial_dims, "patch_size")

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, spatial_dims={self.spatial_dims}"

    # -- geometry -------------------------------------------------------------------------------
    def grid(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """The patch grid of an image of size ``spatial`` (every axis must be a multiple of the patch)."""
        if len(spatial) != self.spatial_dims or any(s % p for s, p in zip(spatial, self.patch_size)):
            raise InputError(f"image size {tuple(spatial)} is not a multiple of the patch size {self.patch_size}; "
                             "crop or resize the image, or choose a patch size that divides it")
        return tuple(s // p for s, p in zip(spatial, self.patch_size))

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` -> ``(B * prod(grid), C, *patch)``, patches of one image contiguous, grid in
        C order (a reshape and one permute: no loop over patches)."""
        b, c, *spatial = x.shape
        g, p, n = self.grid(spatial), self.patch_size, self.spatial_dims
        split = [d for gp in zip(g, p) for d in gp]                      # g1, p1, g2, p2, ...
        v = x.reshape(b, c, *split)
        perm = [0, *[2 + 2 * i for i in range(n)], 1, *[3 + 2 * i for i in range(n)]]
        return v.permute(*perm).reshape(-1, c, *p)

    def _backbone(self, rows: torch.Tensor) -> torch.Tensor:
        out = select_output(self.backbone(rows))                         # a tuple's first element (core)
        if out.ndim != 2 or out.shape[0] != rows.shape[0]:
            raise UnsupportedModelError(f"the backbone must map patches (N, C, *patch) to logits (N, K); "
                                        f"got {tuple(out.shape)}")
        return out

    # -- model ----------------------------------------------------------------------------------
    def patch_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw patch logits ``z_i``: ``(B, K, *grid)``."""
        x = check_input(x, spatial_dims=self.spatial_dims)
        g = self.grid(x.shape[2:])
        z = self._backbone(self.patches(x))                              # (B * N, K)
        k = z.shape[1]
        return z.view(x.shape[0], *g, k).permute(0, self.spatial_dims + 1, *range(1, self.spatial_dims + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image logits ``Z = mean_i z_i``: ``(B, K)`` (no learned pooling)."""
        return self.patch_logits(x).flatten(2).mean(2)

    # -- explanation ----------------------------------------------------------------------------
    def saliency(self, x: torch.Tensor, target=None, kind: str = "raw", offset=None, border: str = "reference",
                 chunk_size: int | None = None, activation: str = "sigmoid", cost: Cost | None = None) -> torch.Tensor:
        """Patch saliency maps on the input grid: ``(B, K, *spatial)`` (``target=None``) or ``(B, 1, *spatial)``.

        ``kind="raw"``: patch logits ``z_i``; ``kind="scaled"``: ``z_i * sigmoid(Z)`` (paper, Fig. 2 f) with
        ``Z`` the image logit of the (shifted) image itself; ``activation`` is the model's output
        activation (``"softmax"`` for single-label CE models; :func:`medexplain.engine.ops.probabilities`).
        ``target``: a class index, one per sample, a :class:`medexplain.engine.targets.Class` or
        :class:`~medexplain.engine.targets.MultiLabel` (the map is then the sum over the set).
        ``offset``: the shift step ``o`` (int or per axis, must divide the patch size); None = no shift.
        ``border``: ``"reference"`` divides by the number of shifts, ``"coverage"`` by the shifts covering
        each voxel. ``chunk_size``: rows (images) given to the model in one call, whole shifts of the
        batch at a time (at least one shift; all at once when None); the model is run in eval mode with
        frozen weights and restored afterwards.
        """
        if kind not in ("raw", "scaled"):
            raise InputError(f"kind must be 'raw' or 'scaled', got {kind!r}")
        if border not in ("reference", "coverage"):
            raise InputError(f"border must be 'reference' or 'coverage', got {border!r}")
        if activation not in ("sigmoid", "softmax"):
            raise InputError(f"activation must be 'sigmoid' or 'softmax', got {activation!r}")
        x = check_input(x, spatial_dims=self.spatial_dims)
        b, _, *spatial = x.shape
        n, p = self.spatial_dims, self.patch_size
        self.grid(spatial)
        o = p if offset is None else _per_axis(offset, n, "offset")
        axis_shifts = [shift_offsets(pa, oa) for pa, oa in zip(p, o)]
        shifts = torch.cartesian_prod(*[torch.tensor(s) for s in axis_shifts]).view(-1, n).tolist()
        half = [pa // 2 for pa in p]
        pad = []                                                         # F.pad lists the last axis first
        for pa, h in zip(reversed(p), reversed(half)):
            pad += [h, pa - h]
        canvas_size = [s + pa for s, pa in zip(spatial, p)]
        cost = cost if cost is not None else Cost()
        with model_guard(self), torch.no_grad():
            weights = None
            xp = F.pad(x, pad)                                           # zero padding, image at `half`
            canvas = None
            for sl in chunks(len(shifts), max(1, chunk_size // b) if chunk_size else None):
                block = shifts[sl]
                # x_s(j) = x(j + s): a window of the padded image starting at half + s
                xs = torch.stack([xp[(slice(None), slice(None), *[slice(h + s, h + s + size)
                                                                  for h, s, size in zip(half, sh, spatial)])]
                                  for sh in block], 0).reshape(-1, *x.shape[1:])   # shift-major rows
                z = self.patch_logits(xs)                                # (S * B, K, *grid)
                cost.n_forward += z.shape[0] * z[0, 0].numel()
                if weights is None:
                    weights = _target_weights(target, z.shape[1], b, z)
                if kind == "scaled":
                    zg = z.flatten(2).mean(2)
                    prob = probabilities(zg, activation)
                    z = z * prob.view(*prob.shape, *[1] * n)
                z = z.view(len(block), b, *z.shape[1:])
                if weights is not False:
                    z = torch.einsum("sbk...,bk->sb...", z, weights).unsqueeze(2)
                for a, pa in enumerate(p):                               # nearest upsampling to the image grid
                    z = z.repeat_interleave(pa, dim=3 + a)
                if canvas is None:
                    canvas = z.new_zeros((b, z.shape[2], *canvas_size))
                for i, sh in enumerate(block):                           # shift back: M(j) += M_s(j - s)
                    canvas[(slice(None), slice(None), *[slice(h + s, h + s + size)
                                                        for h, s, size in zip(half, sh, spatial)])] += z[i]
        out = canvas[(slice(None), slice(None), *[slice(h, h + size) for h, size in zip(half, spatial)])]
        if border == "reference":
            return out / len(shifts)
        return out / _coverage(axis_shifts, spatial, out)


def _coverage(axis_shifts, spatial, like) -> torch.Tensor:
    """Number of shifts whose shifted-back grid covers each voxel: prod_a #{s_a : 0 <= j_a - s_a < S_a}."""
    count = None
    for a, (shifts, size) in enumerate(zip(axis_shifts, spatial)):
        j = torch.arange(size, device=like.device).unsqueeze(1)
        s = torch.tensor(shifts, device=like.device).unsqueeze(0)
        c = ((j - s >= 0) & (j - s < size)).sum(1).to(like.dtype)
        c = c.view(*[1] * (2 + a), size, *[1] * (len(spatial) - a - 1))
        count = c if count is None else count * c
    return count


def _target_weights(target, k: int, b: int, like: torch.Tensor):
    """Per-sample class weights ``(B, K)`` (one-hot or a label set), or False for all classes."""
    if target is None:
        return False
    t = as_target(target)
    if isinstance(t, MultiLabel):
        (m,) = t.resolve(like.new_zeros(b, k), b)
        return m
    if not isinstance(t, Target) or t.class_index(b) is None:
        raise TargetError("PatchNet saliency takes a class index, one per sample, Class or MultiLabel target")
    idx = t.class_index(b)
    if int(idx.min()) < 0 or int(idx.max()) >= k:
        raise TargetError(f"target class {sorted(set(idx.tolist()))} out of range for a model with {k} outputs")
    return F.one_hot(idx.to(like.device), k).to(like.dtype)
