"""Perturbation faithfulness metrics of the peers (Quantus 0.6, pytorch-grad-cam, Captum), N-D, batched in
torch and written against the target contract, so they score a segmenter's ``Region`` as they score a class.

- :func:`road`: ROAD (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for Attribution
  Methods", section 4): remove the most (MoRF) or least (LeRF) relevant voxels and fill them by noisy
  linear imputation from their neighbours along every spatial axis (:func:`noisy_linear_imputation`).
- :func:`average_drop_increase`: average drop and increase in confidence (Chattopadhay et al. 2018,
  "Grad-CAM++", section 5.1, eq. 20): the input multiplied by the min-max normalised map.
- :func:`faithfulness_correlation` (Bhatt et al. 2020, "Evaluating and Aggregating Feature-based Model
  Explanations", section 3.1, eq. 2): Pearson correlation over random voxel subsets of the subset's
  attribution sum and the score drop when the subset is removed.
- :func:`monotonicity` (Arya et al. 2019, "One Explanation Does Not Fit All", section on
  "Monotonicity"): add voxels to a baseline image in increasing order of attribution; the score must not
  decrease.
- :func:`infidelity` (Yeh et al. 2019, "On the (In)fidelity and Sensitivity of Explanations", definition
  2.1): ``E_I[(I . a - (f(x) - f(x - I)))^2]``, through Captum's ``infidelity`` with two perturbation
  families: Quantus's cumulative baseline blocks, or Gaussian noise.

Voxels are the features: a map is summed over its channels and every channel of a voxel is perturbed
together (as :func:`medexplain.metrics.deletion_insertion` does); on single-channel images this is
Quantus's element-wise convention. Scores are the target's (:meth:`medexplain.engine.targets.Target.scores`) on
the logits (``scores="logits"``) or on the probabilities (``scores="probabilities"``: ``ops.probabilities``
with the model's own output activation, ``mx.Model(activation=...)``). Every random draw comes from a
generator seeded with ``seed`` and is shared by the images of a batch, so a batch of 3 gives the results of
three batches of 1. The model is guarded (its train/eval policy, restored) and never differentiated.
``model`` (every metric): an :class:`mx.Model <medexplain.models.model.Model>` (its output adapter, sliding
window, ensemble and flips, activation and eval policy are used) or an ``nn.Module``, wrapped in one
(:func:`medexplain.models.model.as_model`).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medexplain.engine.core import check_input, chunks, forward, model_guard
from medexplain.engine.ops import normalize, probabilities
from medexplain.engine.targets import target_probability
from medexplain.errors import InputError
from medexplain.metrics.faithfulness import _ranks, _voxel_scores
from medexplain.metrics.meta import MetricInfo, register_metric
from medexplain.models.model import as_model

__all__ = ["road", "ROADResult", "noisy_linear_imputation", "road_draws", "average_drop_increase", "AverageDrop",
           "faithfulness_correlation", "random_subsets", "monotonicity", "MonotonicityResult", "infidelity",
           "infidelity_perturbations", "score_rows", "score_output", "SCORES"]


# ------------------------------------------------------------------------------------------------ helpers


#: What a perturbation metric scores: the target's score on the model's logits or on its probabilities.
SCORES = ("probabilities", "logits")


def _check_scores(scores: str) -> str:
    if scores not in SCORES:
        raise InputError(f"scores must be one of {SCORES}, got {scores!r} (the output activation that reads "
                         "probabilities is the model's own: mx.Model(net, activation=...))")
    return scores


def score_output(model, out: torch.Tensor, scores: str = "logits") -> torch.Tensor:
    """``out`` as scored: the logits as they are (``scores="logits"``), or the probabilities by the model's
    output activation (``model.activation``, :func:`medexplain.engine.ops.probabilities`; ``auto`` detects it from
    the output and the model)."""
    if _check_scores(scores) == "logits":
        return out
    return probabilities(out, getattr(model, "activation", "auto"), model=model)


def score_rows(model, rows_x: torch.Tensor, target, rows: torch.Tensor, batch: int, scores: str = "logits",
               chunk_size: int | None = 64, with_correct: bool = False):
    """Target scores ``(N,)`` of ``rows_x`` (row ``i`` belongs to sample ``rows[i]``), in chunks of
    ``chunk_size`` rows, without gradients. ``scores``: ``"logits"`` or ``"probabilities"``
    (:func:`score_output`). ``with_correct``: also ``(probability, correct)`` from
    :func:`medexplain.engine.targets.target_probability` (NaN for targets without a class)."""
    scores_, probs, correct = [], [], []
    with torch.no_grad():
        for sl in chunks(rows_x.shape[0], chunk_size):
            out = forward(model, rows_x[sl])
            scores_.append(target.scores(score_output(model, out, scores), rows[sl], batch))
            if with_correct:
                terms = target_probability(out, target, rows[sl], batch)
                nan = torch.full_like(scores_[-1], float("nan"))
                probs.append(nan if terms is None else terms[1])
                correct.append(nan if terms is None else terms[2])
    s = torch.cat(scores_)
    return (s, torch.cat(probs), torch.cat(correct)) if with_correct else s


def _baseline_values(x: torch.Tensor, baseline) -> torch.Tensor:
    """Per-sample fill value ``(B, 1, ...)``: ``"min"`` (Quantus's "black": each sample's minimum),
    ``"mean"``, ``"max"`` or a number."""
    view = (-1, *[1] * (x.ndim - 1))
    if isinstance(baseline, str):
        flat = x.flatten(1)
        fns = {"min": lambda: flat.amin(1), "black": lambda: flat.amin(1), "max": lambda: flat.amax(1),
               "white": lambda: flat.amax(1), "mean": lambda: flat.mean(1)}
        if baseline not in fns:
            raise InputError(f"baseline must be a number or one of {sorted(fns)}, got {baseline!r}")
        return fns[baseline]().view(view)
    return torch.full((x.shape[0],), float(baseline), dtype=x.dtype, device=x.device).view(view)


def _check(model, x, maps, absolute=False):
    x = check_input(x)
    return x, _voxel_scores(maps, x, absolute)


# -------------------------------------------------------------------------------------------------- ROAD


def _neighbour_sum(v: torch.Tensor) -> torch.Tensor:
    """ROAD's neighbour weighting of ``v`` ``(N, C, *s)``: the binomial stencil ``[1, 2, 1]`` along every
    spatial axis with the centre removed, normalised to sum 1, zero outside the image. In 2D: 1/6 along
    the axes and 1/12 on the diagonals (ROAD's weights, Rong et al. 2022, section 4.2); in 3D 4/56, 2/56
    and 1/56 for face, edge and corner neighbours. Applied separably (three shifted adds per axis), exact
    in any dtype."""
    nd = v.ndim - 2
    out = v
    for axis in range(2, v.ndim):
        pad = [0, 0] * (v.ndim - 1 - axis) + [1, 1]
        p = F.pad(out, pad)
        out = 2 * out + p.narrow(axis, 0, v.shape[axis]) + p.narrow(axis, 2, v.shape[axis])
    return (out - 2 ** nd * v) / (4 ** nd - 2 ** nd)


def noisy_linear_imputation(x: torch.Tensor, mask: torch.Tensor, noise: float = 0.0, draws: torch.Tensor | None = None,
                            tol: float = 1e-10, max_iter: int | None = None) -> torch.Tensor:
    """Fill the voxels of ``mask`` with the weighted mean of their neighbours, solved jointly (ROAD's
    "noisy linear imputation", Rong et al. 2022, section 4.2, eq. 5), plus ``noise * draws`` there.

    ``x`` ``(R, C, *s)`` (2D or 3D), ``mask`` ``(R or 1, 1, *s)`` boolean (True = impute). Every imputed
    value ``v_i`` satisfies ``v_i = sum_j w_ij v_j / sum_j w_ij`` over its neighbours inside the image
    (known ones fixed, imputed ones unknown; weights of :func:`_neighbour_sum`), a sparse symmetric positive
    (semi-)definite system per row and channel, solved here by Jacobi-preconditioned conjugate gradients
    in torch (batched over rows and channels, the stencil applied as shifted adds) instead of a sparse LU
    per image (Quantus, the ROAD reference code: 2D only, one image at a time). ``draws`` ``(R or 1, C, *s)``
    are standard-normal; imputed voxels without any known neighbour in their connected region get 0 before
    the noise. Computed in float64, returned in ``x``'s dtype.
    """
    if x.ndim not in (3, 4, 5):
        raise InputError(f"x must be (R, C, *spatial) with 1-3 spatial dims, got {tuple(x.shape)}")
    r, c, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
    m = mask.to(device=x.device).bool()
    if m.ndim == x.ndim - 1:
        m = m.unsqueeze(1)
    m = m.expand(r, 1, *spatial).to(torch.float64)
    xd = x.detach().to(torch.float64)
    mc = m.expand(r, c, *spatial).reshape(r * c, 1, *spatial)
    known = (xd * (1 - m)).reshape(r * c, 1, *spatial)
    diag = _neighbour_sum(torch.ones_like(mc[:1]))                    # sum of the weights inside the image

    def apply(v):  # (D - M W M) v on the imputed voxels
        return mc * (diag * v - _neighbour_sum(mc * v))

    b = mc * _neighbour_sum(known)
    u = torch.zeros_like(b)
    res = b.clone()
    inv_d = mc / diag
    z = res * inv_d
    p = z.clone()
    rz = (res * z).flatten(1).sum(1)
    bnorm = b.flatten(1).norm(dim=1)
    max_iter = max_iter or 20 * max(spatial) + 100
    for _ in range(max_iter):
        if bool(((res.flatten(1).norm(dim=1)) <= tol * bnorm.clamp_min(1e-300)).all()):
            break
        ap = apply(p)
        den = (p * ap).flatten(1).sum(1)
        alpha = torch.where(den > 0, rz / den.clamp_min(1e-300), torch.zeros_like(den)).view(-1, *[1] * (u.ndim - 1))
        u = u + alpha * p
        res = res - alpha * ap
        z = res * inv_d
        rz_new = (res * z).flatten(1).sum(1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-300), torch.zeros_like(rz)).view(-1, *[1] * (u.ndim - 1))
        p = z + beta * p
        rz = rz_new
    u = u.view(r, c, *spatial)
    if draws is not None and noise:
        u = u + float(noise) * draws.to(u).expand(r, c, *spatial)
    return (xd * (1 - m) + u * m).to(x.dtype)


def road_draws(x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """The standard-normal draws of :func:`road`: ``(n, C, *s)``, one per removal step (MoRF steps first,
    then LeRF), from a generator seeded with ``seed``, shared by the images of the batch."""
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    return torch.stack([torch.randn(x.shape[1:], generator=gen, device=x.device, dtype=x.dtype) for _ in range(n)])


@dataclass
class ROADResult:
    """Curves ``(B, P)`` at ``percentages`` ``(P,)`` for MoRF and LeRF removal: ``*_correct`` (0/1: the
    prediction still is the target class; for a ``Region``, most of its voxels; NaN for targets without a
    class), ``*_probability`` (target probability, NaN likewise) and ``*_score`` (the target score under
    ``scores``). ``morf_accuracy`` / ``lerf_accuracy`` ``(P,)`` average over the batch (Quantus's ROAD
    output). Areas over the removed fraction: ``*_auc`` of the probability, ``*_accuracy_auc`` of
    ``correct``. MoRF: lower is better; LeRF: higher is better."""

    percentages: torch.Tensor
    morf_correct: torch.Tensor
    morf_probability: torch.Tensor
    morf_score: torch.Tensor
    lerf_correct: torch.Tensor
    lerf_probability: torch.Tensor
    lerf_score: torch.Tensor

    def _area(self, curve):
        return torch.trapezoid(curve, self.percentages.to(curve) / 100, dim=-1)

    @property
    def morf_accuracy(self):
        return self.morf_correct.mean(0)

    @property
    def lerf_accuracy(self):
        return self.lerf_correct.mean(0)

    @property
    def morf_auc(self):
        return self._area(self.morf_probability)

    @property
    def lerf_auc(self):
        return self._area(self.lerf_probability)

    @property
    def morf_accuracy_auc(self):
        return self._area(self.morf_correct)

    @property
    def lerf_accuracy_auc(self):
        return self._area(self.lerf_correct)


@register_metric(MetricInfo(
    "road", "faithfulness", {"morf_auc": "lower", "lerf_auc": "higher", "morf_accuracy_auc": "lower",
                             "lerf_accuracy_auc": "higher"}, "morf_auc", ("Class", "MultiLabel", "Region"), "maps",
    "Rong et al. 2022 (ICML), ROAD", "quantus.ROAD"))
def road(model, x: torch.Tensor, maps: torch.Tensor, target, percentages=None, orders=("morf", "lerf"),
         noise: float = 0.01, seed: int = 0, scores: str = "probabilities", absolute: bool = False,
         chunk_size: int | None = 64, tol: float = 1e-10, max_iter: int | None = None) -> ROADResult:
    """ROAD: for each percentage ``p`` the ``int(N p / 100)`` most (MoRF) or least (LeRF) relevant voxels
    (``N`` voxels; all channels) are replaced by :func:`noisy_linear_imputation` with ``noise`` times the
    step's :func:`road_draws`, and the model is run on the result.

    ``percentages`` defaults to Quantus's ``1, 3, ..., 99``. Ties in the map are ordered by position (a
    stable sort). The ``B x P`` perturbed images of an order go through the model (and the imputation)
    in chunks of ``chunk_size`` rows. Quantus 0.6's ``ROAD`` is MoRF only and returns the batch accuracy per
    percentage (``ROADResult.morf_accuracy``); its imputation is 2D only.
    """
    info = road.info
    model = as_model(model)   # its sliding window, passes, output adapter, activation and eval policy
    _check_scores(scores)
    tgt = info.check(target)
    x, vox = _check(model, x, maps, absolute)
    pct = list(range(1, 100, 2)) if percentages is None else [float(p) for p in percentages]
    if not pct or min(pct) < 0 or max(pct) > 100:
        raise InputError("percentages must lie in [0, 100]")
    bad = set(orders) - {"morf", "lerf"}
    if bad:
        raise InputError(f"orders must be 'morf' and/or 'lerf', got {sorted(bad)}")
    b, n, npct = x.shape[0], vox.shape[1], len(pct)
    counts = torch.tensor([int(n * p / 100) for p in pct], device=x.device)
    draws = road_draws(x, 2 * npct, seed)
    curves = {}
    nan = torch.full((b, npct), float("nan"), dtype=x.dtype, device=x.device)
    with model_guard(model):
        for k, order in enumerate(("morf", "lerf")):
            if order not in orders:
                curves[order] = [nan, nan, nan]
                continue
            ranks = _ranks(vox if order == "morf" else -vox, "first", 0)          # 0 = first removed
            out = [[], [], []]
            per = max(1, (chunk_size or npct * b) // b)
            for sl in chunks(npct, per):
                m = (ranks.unsqueeze(0) < counts[sl].view(-1, 1, 1)).view(-1, 1, *x.shape[2:])   # (p*b, 1, *s)
                rows_x = x.unsqueeze(0).expand(sl.stop - sl.start, *x.shape).reshape(-1, *x.shape[1:])
                eps = draws[k * npct + sl.start:k * npct + sl.stop].repeat_interleave(b, 0)
                imputed = noisy_linear_imputation(rows_x, m, noise, eps, tol, max_iter)
                rows = torch.arange(b, device=x.device).repeat(sl.stop - sl.start)
                s, p, c = score_rows(model, imputed, tgt, rows, b, scores, None, with_correct=True)
                for lst, v in zip(out, (c, p, s)):
                    lst.append(v.view(-1, b))
            curves[order] = [torch.cat(v).T.contiguous() for v in out]
    return ROADResult(torch.tensor(pct, dtype=x.dtype), *curves["morf"], *curves["lerf"])


# ---------------------------------------------------------------------------------- average drop / increase


@dataclass
class AverageDrop:
    """Per sample: ``score`` Y on the image, ``masked_score`` O on the image times the normalised map,
    ``drop = max(0, Y - O) / Y`` and ``increase = 1[O > Y]``. ``average_drop`` and
    ``increase_in_confidence`` are the batch means in percent (Chattopadhay et al. 2018, eq. 20 and the
    "increase in confidence" of section 5.1). Lower drop and higher increase are better."""

    score: torch.Tensor
    masked_score: torch.Tensor
    drop: torch.Tensor
    increase: torch.Tensor

    @property
    def average_drop(self) -> float:
        return float(100 * self.drop.nanmean())

    @property
    def increase_in_confidence(self) -> float:
        return float(100 * self.increase.mean())


@register_metric(MetricInfo(
    "average_drop_increase", "faithfulness", {"average_drop": "lower", "increase_in_confidence": "higher"},
    "average_drop", ("Class", "MultiLabel", "Region"), "maps", "Chattopadhay et al. 2018 (WACV), Grad-CAM++ eq. 20",
    "pytorch_grad_cam.metrics.cam_mult_image.DropInConfidence / IncreaseInConfidence"))
def average_drop_increase(model, x: torch.Tensor, maps: torch.Tensor, target, scores: str = "probabilities",
                          absolute: bool = False, chunk_size: int | None = 64) -> AverageDrop:
    """Average drop / increase in confidence: Y = target score of ``x``, O = of ``x * E`` with
    ``E`` the map summed over channels, resized to the input grid and min-max normalised per sample
    (``ops.normalize``), applied to every channel. Scores are probabilities by default, as in the paper
    (the model's activation; ``auto``: softmax over several classes, sigmoid for one); ``Region`` targets score the sum
    (or mean) of the region's class probabilities. ``drop`` is NaN where Y <= 0 (undefined)."""
    model = as_model(model)   # its sliding window, passes, output adapter, activation and eval policy
    _check_scores(scores)
    tgt = average_drop_increase.info.check(target)
    x, vox = _check(model, x, maps, absolute)
    e = normalize(vox, "minmax").view(x.shape[0], 1, *x.shape[2:])
    b = x.shape[0]
    rows = torch.arange(b, device=x.device).repeat(2)
    with model_guard(model):
        s = score_rows(model, torch.cat([x, x * e]), tgt, rows, b, scores, chunk_size)
    y, o = s[:b], s[b:]
    drop = torch.where(y > 0, (y - o).clamp(min=0) / y.clamp_min(1e-300), torch.full_like(y, float("nan")))
    return AverageDrop(y, o, drop, (o > y).to(x.dtype))


# -------------------------------------------------------------------------------------- faithfulness corr.


def random_subsets(n: int, size: int, n_runs: int, seed: int = 0, device=None) -> torch.Tensor:
    """``(n_runs, size)`` voxel indices, each row a uniform subset without replacement, from a generator
    seeded with ``seed``: the draws of :func:`faithfulness_correlation`, shared by the images of a batch."""
    if not 1 <= size <= n:
        raise InputError(f"subset_size must be in [1, {n}] (the voxel count), got {size}")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randperm(n, generator=gen)[:size] for _ in range(n_runs)]).to(device)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


@register_metric(MetricInfo(
    "faithfulness_correlation", "faithfulness", {"correlation": "higher"}, "correlation",
    ("Class", "MultiLabel", "Region"), "maps", "Bhatt et al. 2020 (IJCAI), eq. 2", "quantus.FaithfulnessCorrelation"))
def faithfulness_correlation(model, x: torch.Tensor, maps: torch.Tensor, target, n_runs: int = 100,
                             subset_size: int = 224, baseline="min", scores: str = "logits",
                             absolute: bool = False, seed: int = 0, chunk_size: int | None = 64) -> torch.Tensor:
    """Faithfulness correlation ``(B,)``: over ``n_runs`` random subsets S of ``subset_size`` voxels
    (:func:`random_subsets`), the Pearson correlation of ``sum_{i in S} a_i`` with ``f(x) - f(x_S)``,
    where ``x_S`` has the subset set to ``baseline`` (``"min"``: each sample's minimum, Quantus's
    "black"). Scores are logits by default (Quantus's default ``softmax=False``). NaN where either series
    is constant."""
    model = as_model(model)   # its sliding window, passes, output adapter, activation and eval policy
    _check_scores(scores)
    tgt = faithfulness_correlation.info.check(target)
    x, vox = _check(model, x, maps, absolute)
    b, n = vox.shape
    subsets = random_subsets(n, subset_size, n_runs, seed, x.device)
    fill = _baseline_values(x, baseline)
    with model_guard(model):
        base = score_rows(model, x, tgt, torch.arange(b, device=x.device), b, scores, chunk_size)
        drops, sums = [], []
        per = max(1, (chunk_size or n_runs * b) // b)
        for sl in chunks(n_runs, per):
            sub = subsets[sl]
            m = torch.zeros(sub.shape[0], n, dtype=x.dtype, device=x.device).scatter_(1, sub, 1.0)
            m = m.view(-1, 1, 1, *x.shape[2:])
            rows_x = (x.unsqueeze(0) * (1 - m) + fill.unsqueeze(0) * m).reshape(-1, *x.shape[1:])
            rows = torch.arange(b, device=x.device).repeat(sub.shape[0])
            s = score_rows(model, rows_x, tgt, rows, b, scores, None).view(-1, b)
            drops.append(base.unsqueeze(0) - s)
            sums.append(vox[:, sub].sum(-1).T)
    return _pearson(torch.cat(sums).T, torch.cat(drops).T)


# ----------------------------------------------------------------------------------------------- monotonicity


@dataclass
class MonotonicityResult:
    """``curves`` ``(B, steps)``: the score after each insertion step; ``monotonic`` ``(B,)`` 1 where no
    step decreased it (Arya et al.'s per-sample verdict, higher is better); ``fraction`` ``(B,)`` the
    share of steps that did not decrease it (a graded version)."""

    curves: torch.Tensor
    monotonic: torch.Tensor
    fraction: torch.Tensor


@register_metric(MetricInfo(
    "monotonicity", "faithfulness", {"monotonic": "higher", "fraction": "higher"}, "monotonic",
    ("Class", "MultiLabel", "Region"), "maps", "Arya et al. 2019 (arXiv:1909.03012), Monotonicity",
    "quantus.Monotonicity (with an insertion perturb_func; see the docstring)"))
def monotonicity(model, x: torch.Tensor, maps: torch.Tensor, target, features_in_step: int | None = None,
                 baseline="min", scores: str = "probabilities", absolute: bool = True,
                 chunk_size: int | None = 64) -> MonotonicityResult:
    """Monotonicity: start from a ``baseline`` image (``"min"``: each sample's minimum everywhere) and
    insert the input's voxels ``features_in_step`` at a time in increasing order of (absolute, by default)
    attribution; the explanation is monotonic when the score never decreases (``diff >= 0``).

    ``features_in_step`` defaults to ``ceil(N / 100)`` (about 100 steps; Quantus's default of 1 costs one
    forward per voxel, 32768 for a 32^3 volume). Quantus 0.6's ``Monotonicity`` writes the baseline value
    over the baseline image at each step (its default perturbation replaces the selected entries of the
    *baseline* image by that image's minimum), so its input never changes and it returns True for any
    explanation; the tests compare with it after passing a perturbation that inserts the input's values."""
    model = as_model(model)   # its sliding window, passes, output adapter, activation and eval policy
    _check_scores(scores)
    tgt = monotonicity.info.check(target)
    x, vox = _check(model, x, maps, absolute)
    b, n = vox.shape
    step = int(features_in_step) if features_in_step else max(1, math.ceil(n / 100))
    if step < 1:
        raise InputError(f"features_in_step must be >= 1, got {features_in_step}")
    n_steps = math.ceil(n / step)
    order = _ranks(-vox, "first", 0)                       # 0 = least attributed (inserted first)
    fill = _baseline_values(x, baseline)
    counts = torch.tensor([min(n, (j + 1) * step) for j in range(n_steps)], device=x.device)
    curves = []
    with model_guard(model):
        per = max(1, (chunk_size or n_steps * b) // b)
        for sl in chunks(n_steps, per):
            k = (order.unsqueeze(0) < counts[sl].view(-1, 1, 1)).view(-1, b, 1, *x.shape[2:]).to(x.dtype)
            rows_x = (fill.unsqueeze(0) * (1 - k) + x.unsqueeze(0) * k).reshape(-1, *x.shape[1:])
            rows = torch.arange(b, device=x.device).repeat(sl.stop - sl.start)
            curves.append(score_rows(model, rows_x, tgt, rows, b, scores, None).view(-1, b))
    curves = torch.cat(curves).T.contiguous()
    ok = curves.diff(dim=1) >= 0
    frac = ok.to(x.dtype).mean(1) if n_steps > 1 else torch.ones(b, dtype=x.dtype, device=x.device)
    return MonotonicityResult(curves, ok.all(1).to(x.dtype), frac)


# -------------------------------------------------------------------------------------------------- infidelity


def _blocks(spatial, size):
    starts = [range(0, s, size) for s in spatial]
    return [tuple(slice(st, min(st + size, s)) for st, s in zip(corner, spatial)) for corner in itertools.product(*starts)]


def infidelity_perturbations(x: torch.Tensor, perturbation: str = "blocks", patch_size: int = 4, n_samples: int = 10,
                             sigma: float = 0.1, baseline="min", seed: int = 0):
    """``(count, fn)``: the number of perturbations and ``fn(j) -> I_j`` ``(B, C, *s)`` (so ``x - I_j`` is
    the perturbed input) of :func:`infidelity`.

    ``"blocks"``: Quantus's scheme: the image is cut into ``patch_size`` cubes (all channels) in C order;
    perturbation ``j`` sets the first ``j + 1`` blocks to ``baseline``, cumulatively. ``"noise"``: Yeh et
    al.'s Gaussian perturbations ``I ~ N(0, (sigma (max - min))^2)`` per sample, ``n_samples`` draws from
    a generator seeded with ``seed``, shared by the batch."""
    if perturbation == "blocks":
        if patch_size < 1:
            raise InputError(f"patch_size must be >= 1, got {patch_size}")
        blocks = _blocks(tuple(x.shape[2:]), int(patch_size))
        fill = _baseline_values(x, baseline)

        def block_fn(j):
            xt = x.clone()
            for blk in blocks[: j + 1]:
                xt[(slice(None), slice(None), *blk)] = fill.view(-1, *[1] * (x.ndim - 1)).expand_as(
                    xt[(slice(None), slice(None), *blk)])
            return x - xt
        return len(blocks), block_fn
    if perturbation == "noise":
        if n_samples < 1:
            raise InputError(f"n_samples must be >= 1, got {n_samples}")
        gen = torch.Generator(device=x.device).manual_seed(int(seed))
        draws = torch.stack([torch.randn(x.shape[1:], generator=gen, device=x.device, dtype=x.dtype) for _ in range(n_samples)])
        sd = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, *[1] * (x.ndim - 1)) * float(sigma)
        return n_samples, lambda j: draws[j].unsqueeze(0) * sd
    raise InputError(f"perturbation must be 'blocks' or 'noise', got {perturbation!r}")


@register_metric(MetricInfo(
    "infidelity", "faithfulness", {"infidelity": "lower"}, "infidelity", ("Class", "MultiLabel", "Region"), "maps",
    "Yeh et al. 2019 (NeurIPS), definition 2.1", "quantus.Infidelity (blocks); captum.metrics.infidelity (noise)"))
def infidelity(model, x: torch.Tensor, maps: torch.Tensor, target, perturbation: str = "blocks", patch_size: int = 4,
               n_samples: int = 10, sigma: float = 0.1, baseline="min", normalize: bool = False,
               scores: str = "logits", seed: int = 0, chunk_size: int | None = 64) -> torch.Tensor:
    """Infidelity ``(B,)``: mean over perturbations ``I_j`` (:func:`infidelity_perturbations`) of
    ``(sum(a * I_j) - (f(x) - f(x - I_j)))^2``, computed by Captum's ``captum.metrics.infidelity`` (the
    reference implementation of Yeh et al.), ``max_examples_per_batch`` from ``chunk_size``. ``maps`` are
    ``(B, C or 1, *s)`` on the input grid (a one-channel map applies to every channel). ``normalize``:
    Captum's optimal rescaling of the attributions (Yeh et al., section 2.3). Scores are logits by default
    (Quantus's default). Lower is better."""
    from captum.metrics import infidelity as captum_infidelity
    model = as_model(model)   # its sliding window, passes, output adapter, activation and eval policy
    _check_scores(scores)
    tgt = infidelity.info.check(target)
    x = check_input(x)
    maps = torch.as_tensor(maps).detach().to(x)
    if maps.ndim != x.ndim or maps.shape[0] != x.shape[0] or maps.shape[1] not in (1, x.shape[1]) \
            or tuple(maps.shape[2:]) != tuple(x.shape[2:]):
        raise InputError(f"maps {tuple(maps.shape)} must be (B, C or 1, *spatial) on the input grid {tuple(x.shape)}")
    if not torch.isfinite(maps).all():
        raise InputError("maps contain NaN or Inf")
    b = x.shape[0]
    count, pert = infidelity_perturbations(x, perturbation, patch_size, n_samples, sigma, baseline, seed)
    state = {"next": 0}

    def perturb_func(inputs):  # Captum expands sample-major (repeat_interleave): row = sample * k + j
        k = inputs.shape[0] // b
        js = range(state["next"], state["next"] + k)
        state["next"] += k
        i = torch.stack([pert(j) for j in js], 1).reshape(-1, *x.shape[1:])
        return i, inputs - i

    def fwd(inputs, idx):
        out = forward(model, inputs)
        return tgt.scores(score_output(model, out, scores), idx.long(), b)

    per_batch = min(max(chunk_size or b * count, b), b * count)
    with model_guard(model):
        return captum_infidelity(fwd, perturb_func, x, maps.expand_as(x),
                                 additional_forward_args=(torch.arange(b, device=x.device),),
                                 n_perturb_samples=count, max_examples_per_batch=per_batch, normalize=normalize)
