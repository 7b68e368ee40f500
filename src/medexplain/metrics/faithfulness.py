"""Faithfulness and map-structure metrics of the SSplain paper (arXiv:2512.08038, section 5).

- :func:`deletion_insertion`: the paper's "post-hoc accuracy". Voxels are ranked by attribution; at
  evenly spaced fractions f (26 by default: 0, 4%, ..., 100%) the top ``floor(f N)`` voxels are deleted
  (set to the baseline, zero) from the input, or inserted into a baseline image. The model's accuracy
  and target probability on every perturbed input give one curve per sample; the trapezoid area under
  each curve summarises it (deletion: lower is better; insertion: higher is better).
- :func:`smoothness`: anisotropic total variation (:func:`medexplain.engine.ops.total_variation`, SSplain eq. 2)
  of the min-max normalised map (:func:`medexplain.engine.ops.normalize`) divided by its element count (lower =
  smoother), the quantity behind the paper's smoothness analysis.
- :func:`sparseness`: Gini index of ``|map|`` (Chalasani et al. 2020): 0 for a uniform map, -> 1 when
  all mass sits on one voxel.

All are N-D (``(B, C_or_1, H, W)`` or ``(B, C_or_1, D, H, W)``), batched over cases, torch in and out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from medexplain.engine.core import check_input, chunks, forward, model_guard, resize_to
from medexplain.engine.ops import normalize, total_variation
from medexplain.engine.targets import as_target, target_probability
from medexplain.errors import InputError
from medexplain.models.model import as_model

__all__ = ["deletion_insertion", "DeletionInsertion", "smoothness", "sparseness"]


@dataclass
class DeletionInsertion:
    """Curves ``(B, F)`` at ``fractions`` ``(F,)`` and their trapezoid areas ``(B,)``.

    ``*_accuracy`` are 0/1 per sample (NaN for targets without a class: see
    :func:`target_probability`), ``*_probability`` the target probability (NaN likewise) and
    ``*_score`` the raw target score (always defined). The ``*_auc`` fields are areas under the
    probability curves over fractions in [0, 1]; ``*_accuracy_auc`` under the accuracy curves.
    Average over samples (``.mean(0)``) for the dataset curve, e.g. the paper's post-hoc accuracy.
    """

    fractions: torch.Tensor
    deletion_accuracy: torch.Tensor
    deletion_probability: torch.Tensor
    deletion_score: torch.Tensor
    insertion_accuracy: torch.Tensor
    insertion_probability: torch.Tensor
    insertion_score: torch.Tensor

    @staticmethod
    def _area(curve, fr):
        return torch.trapezoid(curve, fr.to(curve), dim=-1)

    @property
    def deletion_auc(self):
        return self._area(self.deletion_probability, self.fractions)

    @property
    def insertion_auc(self):
        return self._area(self.insertion_probability, self.fractions)

    @property
    def deletion_accuracy_auc(self):
        return self._area(self.deletion_accuracy, self.fractions)

    @property
    def insertion_accuracy_auc(self):
        return self._area(self.insertion_accuracy, self.fractions)


def _voxel_scores(maps: torch.Tensor, x: torch.Tensor, absolute: bool) -> torch.Tensor:
    maps = torch.as_tensor(maps)
    if maps.ndim != x.ndim or maps.shape[0] != x.shape[0]:
        raise InputError(f"maps {tuple(maps.shape)} must be (B, C_or_1, *spatial) with the batch and spatial rank "
                         f"of the input {tuple(x.shape)}")
    maps = maps.detach().to(device=x.device, dtype=x.dtype)
    if not torch.isfinite(maps).all():
        raise InputError("maps contain NaN or Inf")
    maps = maps.sum(1, keepdim=True)  # one score per voxel: channel maps rank by their sum
    maps = resize_to(maps, tuple(x.shape[2:]))
    return (maps.abs() if absolute else maps).flatten(1)


def _ranks(scores: torch.Tensor, tie_break: str, seed: int) -> torch.Tensor:
    """Rank of every voxel (0 = most important), descending score; equal scores ordered by ``tie_break``."""
    b, n = scores.shape
    if tie_break == "random":  # a seeded permutation, the same for every sample, then a stable sort
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(scores.device)
    elif tie_break == "first":
        perm = torch.arange(n, device=scores.device)
    else:
        raise InputError(f"tie_break must be 'random' or 'first', got {tie_break!r}")
    order = perm[scores[:, perm].argsort(dim=1, descending=True, stable=True)]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=scores.device).expand(b, n))
    return ranks


def deletion_insertion(model, x: torch.Tensor, maps: torch.Tensor, target, fractions: int = 26,
                       chunk_size: int | None = 64, baseline: float = 0.0, absolute: bool = False,
                       tie_break: str = "random", seed: int = 0) -> DeletionInsertion:
    """Deletion and insertion curves (SSplain paper section 5, "post-hoc accuracy").

    Voxels are ranked by the map (summed over map channels, resized to the input grid if needed; signed
    unless ``absolute``). For fraction ``f_j = j / (fractions - 1)`` the top ``n_j = floor(f_j N)`` voxels
    (all channels of a voxel together) are set to ``baseline`` in ``x`` (deletion) or copied from ``x``
    into a ``baseline`` image (insertion). The ``2 B fractions`` perturbed inputs go through the model
    in chunks of ``chunk_size`` rows, without gradients, with the model guarded (its train/eval policy, restored).
    Voxels of equal score (e.g. the zeros of a sparse mask) are ordered by a seeded random permutation
    by default (``tie_break="random"``), so a flat region is not deleted in raster order;
    ``tie_break="first"`` keeps C order. ``model``: an :class:`mx.Model <medexplain.models.model.Model>` (its
    sliding window, passes and output adapter are used) or an ``nn.Module``, wrapped in one.
    """
    x = check_input(x)
    model = as_model(model)
    if fractions < 2:
        raise InputError("fractions must be >= 2 (0% and 100% at least)")
    tgt = as_target(target)
    b, n = x.shape[0], x[0, 0].numel()
    ranks = _voxel_scores(maps, x, absolute)
    ranks = _ranks(ranks, tie_break, seed)
    counts = torch.tensor([(j * n) // (fractions - 1) for j in range(fractions)], device=x.device)
    keep = (ranks.unsqueeze(0) < counts.view(-1, 1, 1)).view(fractions, b, 1, *x.shape[2:]).to(x.dtype)
    base = torch.full_like(x, float(baseline))
    curves = {}
    with model_guard(model), torch.no_grad():
        for kind in ("deletion", "insertion"):
            acc, prob, score = [], [], []
            per = max(1, (chunk_size or fractions * b) // b)
            for sl in chunks(fractions, per):
                k = keep[sl]
                rows_x = (x * (1 - k) + base * k) if kind == "deletion" else (base * (1 - k) + x * k)
                rows_x = rows_x.reshape(-1, *x.shape[1:])
                rows = torch.arange(b, device=x.device).repeat(sl.stop - sl.start)
                out = forward(model, rows_x)
                score.append(tgt.scores(out, rows, b).view(-1, b))
                terms = target_probability(out, tgt, rows, b)
                if terms is None:
                    nan = torch.full_like(score[-1], float("nan"))
                    prob.append(nan), acc.append(nan)
                else:
                    prob.append(terms[1].view(-1, b)), acc.append(terms[2].view(-1, b))
            curves[kind] = [torch.cat(c).T.contiguous() for c in (acc, prob, score)]
    fr = counts.to(x.dtype) / n
    return DeletionInsertion(fr, *curves["deletion"], *curves["insertion"])


def _as_maps(maps) -> torch.Tensor:
    maps = torch.as_tensor(maps)
    if maps.ndim not in (4, 5):
        raise InputError(f"maps must be (B, C_or_1, H, W) or (B, C_or_1, D, H, W); got shape {tuple(maps.shape)}")
    if not torch.is_floating_point(maps):
        maps = maps.float()
    if not torch.isfinite(maps).all():
        raise InputError("maps contain NaN or Inf")
    return maps


def smoothness(maps) -> torch.Tensor:
    """Anisotropic TV of the per-sample min-max normalised map divided by its element count.

    ``(B,)``; lower is smoother. A constant map scores 0. The normalisation makes the score independent
    of the map's scale and offset, so methods with different units compare.
    """
    maps = _as_maps(maps)
    return total_variation(normalize(maps, "minmax")) / maps[0].numel()


def sparseness(maps) -> torch.Tensor:
    """Gini index of ``|map|`` per sample (Chalasani et al. 2020; Hurley & Rickard 2009).

    With ``v`` sorted ascending, ``G = sum_i (2 i - n - 1) v_i / (n sum_i v_i)`` (i = 1..n): 0 when all
    entries are equal, ``1 - 1/n`` when one entry holds everything. NaN for an all-zero map (undefined).
    """
    maps = _as_maps(maps)
    v = maps.abs().flatten(1).sort(1).values
    n = v.shape[1]
    i = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    total = v.sum(1)
    g = ((2 * i - n - 1) * v).sum(1) / (n * total)
    return torch.where(total > 0, g, torch.full_like(g, float("nan")))
