"""Randomisation tests of the peers: SmoothMPRT and EfficientMPRT (Hedström et al. 2023, "Sanity Checks
Revisited: An Exploration to Repair the Model Parameter Randomisation Test", sections 4.1 and 4.2) and the
random-logit test (Sixt et al. 2020, "When Explanations Lie: Why Many Modified BP Attributions Fail",
section 5.2). The cascading test of Adebayo et al. 2018 is :func:`medexplain.metrics.randomization_check`.

Every explanation is :func:`medexplain.engine.explain` with a registered method, so the tests run for any target
(a segmenter's ``Region`` included), 2D and 3D. Layers are randomised as Quantus 0.6 does (every module
with ``reset_parameters``, in definition order for ``bottom_up``, each re-initialised right after
``torch.manual_seed(seed + 1)``), on a deep copy: the user's model and global RNG state are left as found.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from skimage.metrics import structural_similarity

from medexplain.engine.core import model_guard
from medexplain.engine.ops import noise_sum
from medexplain.engine.targets import Class, Region
from medexplain.errors import InputError, TargetError
from medexplain.metrics.meta import MetricInfo, reexplaining, register_metric
from medexplain.models.model import as_model

__all__ = ["smooth_mprt", "efficient_mprt", "random_logit", "MPRTResult", "EfficientMPRTResult", "spearman",
           "randomised_models"]


def _rankdata(v: torch.Tensor) -> torch.Tensor:
    """Ranks ``(B, N)`` with ties averaged (``scipy.stats.rankdata(method="average")``), 1-based."""
    sorted_v, order = v.sort(dim=1, stable=True)
    ranks = torch.empty_like(v, dtype=torch.float64)
    for r in range(v.shape[0]):
        _, inverse, counts = torch.unique_consecutive(sorted_v[r], return_inverse=True, return_counts=True)
        start = counts.cumsum(0) - counts
        avg = start.double() + (counts.double() + 1) / 2
        ranks[r, order[r]] = avg[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per row of ``(B, ...)`` tensors (flattened), ``(B,)`` in float64."""
    ra, rb = _rankdata(a.flatten(1).double()), _rankdata(b.flatten(1).double())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def _reset_layers(model) -> list[str]:
    """Names (the user's, those of the first network of an ``mx.Model``) of the modules with
    ``reset_parameters``, in definition order."""
    return [n for n, m in as_model(model).networks[0].named_modules() if hasattr(m, "reset_parameters")]


def randomised_models(model, order: str = "bottom_up", seed: int = 42):
    """Yield ``(layer name, model)`` with one more layer re-initialised each time (cumulative), on a deep
    copy of the model object (:func:`medexplain.models.model.as_model`; an ensemble's members have the layer
    of that name re-initialised in every member). Quantus's schedule: every module with ``reset_parameters``
    (definition order for ``bottom_up``, reversed for ``top_down``), ``torch.manual_seed(seed + 1)`` before
    each reset; the global RNG is restored between steps and afterwards."""
    if order not in ("bottom_up", "top_down"):
        raise InputError(f"layer order must be 'bottom_up' or 'top_down', got {order!r}")
    model = as_model(model)
    with model_guard(model):  # the copy inherits the modes the policy sets; the original is restored as found
        rand = copy.deepcopy(model)
    names = _reset_layers(rand)
    if not names:
        raise InputError("the model has no layer with reset_parameters() to randomise")
    if order == "top_down":
        names = names[::-1]
    members = [dict(net.named_modules()) for net in rand.networks]
    # reset_parameters on a GPU draws from that device's generator, which manual_seed also reseeds: fork it too
    devices = sorted({p.device.index or 0 for p in rand.parameters() if p.device.type == "cuda"})
    for name in names:
        for named in members:
            module = named.get(name)
            if module is not None and hasattr(module, "reset_parameters"):
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(int(seed) + 1)
                    module.reset_parameters()
        yield name, rand


def _maps(model, x, method, target, options):
    from medexplain.engine.explain import explain
    return explain(model, x, method, target=target, **options).map.detach()


def _smooth(model, x, method, target, n_samples, sigma, seed, chunk_size, options):
    """SmoothMPRT's explanation: the mean of the maps at ``n_samples - 1`` noisy copies (the one noise loop,
    :func:`medexplain.engine.ops.noise_sum`, ``sd = sigma (max - min)`` per sample) and at ``x`` itself."""
    from medexplain.methods.captum_methods import RowTarget
    b = x.shape[0]
    total = _maps(model, x, method, target, options).double()
    if n_samples > 1:
        def maps(noisy, rows, k):
            m = _maps(model, noisy, method, RowTarget(target, rows, b), options)
            return m.double().view(k, b, *m.shape[1:]).sum(0)
        total = noise_sum(x, maps, n_samples - 1, sigma, seed, chunk_size, scale="sample", start=total)
    return total / n_samples


@dataclass
class MPRTResult:
    """``similarity`` ``(L, B)``: Spearman correlation of the original explanation with the one after
    randomising ``layers[: i + 1]``; ``original`` ``(B,)``: with the original model re-explained (1 when
    the explanation is deterministic). Lower after randomisation is better."""

    layers: list
    similarity: torch.Tensor
    original: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def last(self) -> torch.Tensor:
        return self.similarity[-1]

    @property
    def average(self) -> torch.Tensor:
        return self.similarity.mean(0)


@register_metric(MetricInfo(
    "smooth_mprt", "randomisation", {"last": "lower", "average": "lower"}, "last", ("Class", "MultiLabel", "Region"),
    "method", "Hedström et al. 2023 (XAI in Action workshop), section 4.1", "quantus.SmoothMPRT"))
def smooth_mprt(model, x: torch.Tensor, method: str, target, n_samples: int = 50, noise_magnitude: float = 0.1,
                seed: int = 42, noise_seed: int = 0, layer_order: str = "bottom_up", cascade: bool = True,
                absolute: bool = True, chunk_size: int | None = 64, method_options: dict | None = None,
                **options) -> MPRTResult:
    """SmoothMPRT: the model parameter randomisation test on smoothed explanations (the mean over
    ``n_samples - 1`` noisy copies and the clean input, noise ``sd = noise_magnitude (max - min)``), which
    removes the noise that makes gradient maps decorrelate by chance. Similarity: Spearman of the
    (absolute) maps, flattened over channels and voxels. ``cascade=False`` scores only the fully randomised
    model (Quantus's ``skip_layers``). The noise draws (``noise_seed``) are the same for every model, so
    ``original`` is exactly 1; Quantus draws fresh noise per explanation.
    ``method_options``, ``model``: as every metric that re-explains (:func:`medexplain.metrics.meta.reexplaining`)."""
    tgt, options, model, x = reexplaining(smooth_mprt, model, x, target, method_options, options)
    if n_samples < 1:
        raise InputError(f"n_samples must be >= 1, got {n_samples}")

    def expl(net):
        a = _smooth(net, x, method, tgt, n_samples, noise_magnitude, noise_seed, chunk_size, options)
        return a.abs() if absolute else a

    ref = expl(model)
    original = spearman(ref, expl(model))
    names, sims = [], []
    n_layers = len(_reset_layers(model))
    for i, (name, net) in enumerate(randomised_models(model, layer_order, seed)):
        if not cascade and i + 1 < n_layers:
            continue
        names.append(name)
        sims.append(spearman(ref, expl(net)))
    return MPRTResult(names, torch.stack(sims), original, {"method": method, "n_samples": n_samples,
                                                           "layer_order": layer_order, "seed": seed})


def _discrete_entropy(a: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Entropy (nats) of the ``n_bins`` equal-width histogram of each sample's values over their range
    (``np.histogram`` bins, Quantus's ``discrete_entropy``), ``(B,)``."""
    out = []
    for row in a.flatten(1).double().cpu():
        hist, _ = torch.histogram(row, bins=int(n_bins))
        p = hist[hist > 0] / hist.sum()
        out.append(-(p * p.log()).sum())
    return torch.stack(out)


@dataclass
class EfficientMPRTResult:
    """``score`` ``(B,)``: relative rise ``(H_rand - H_orig) / H_orig`` of the explanation's discrete
    entropy when every layer is randomised (higher is better: the explanation becomes noise);
    ``complexity_original`` and ``complexity_randomised`` the entropies."""

    score: torch.Tensor
    complexity_original: torch.Tensor
    complexity_randomised: torch.Tensor


@register_metric(MetricInfo(
    "efficient_mprt", "randomisation", {"score": "higher"}, "score", ("Class", "MultiLabel", "Region"), "method",
    "Hedström et al. 2023 (XAI in Action workshop), section 4.2", "quantus.EfficientMPRT"))
def efficient_mprt(model, x: torch.Tensor, method: str, target, n_bins: int = 100, seed: int = 42,
                   layer_order: str = "bottom_up", absolute: bool = False, method_options: dict | None = None,
                **options) -> EfficientMPRTResult:
    """EfficientMPRT: compare the complexity (discrete entropy of a ``n_bins`` histogram of the map values)
    of the explanation before and after randomising every layer, in one extra explanation instead of one
    per layer. ``absolute``: histogram of ``|map|`` (Quantus's default: signed).
    ``method_options``, ``model``: as every metric that re-explains (:func:`medexplain.metrics.meta.reexplaining`)."""
    tgt, options, model, x = reexplaining(efficient_mprt, model, x, target, method_options, options)
    if n_bins < 1:
        raise InputError(f"n_bins must be >= 1, got {n_bins}")
    a = _maps(model, x, method, tgt, options)
    *_, (_, net) = randomised_models(model, layer_order, seed)  # every layer randomised
    r = _maps(net, x, method, tgt, options)
    if absolute:
        a, r = a.abs(), r.abs()
    h0, h1 = _discrete_entropy(a, n_bins), _discrete_entropy(r, n_bins)
    return EfficientMPRTResult((h1 - h0) / h0, h0, h1)


def _ssim(a: np.ndarray, b: np.ndarray, flatten: bool) -> float:
    """SSIM with ``data_range`` the range of both maps together (Quantus's ``ssim``); on the flattened maps
    (``flatten``, Quantus's 1-D convention) or on the maps as images (channel axis first when several)."""
    data_range = float(abs(max(a.max(), b.max()) - min(a.min(), b.min())))
    if flatten:
        return float(structural_similarity(a.ravel(), b.ravel(), data_range=data_range))
    multichannel = a.shape[0] > 1
    a, b = (a, b) if multichannel else (a[0], b[0])
    side = min(a.shape[1:] if multichannel else a.shape)
    win = min(7, side - (1 - side % 2))
    if win < 3:
        raise InputError(f"maps of side {side} are too small for SSIM (a 3-voxel window at least)")
    return float(structural_similarity(a, b, win_size=win, data_range=data_range,
                                       channel_axis=0 if multichannel else None))


def _off_target(tgt, off: torch.Tensor):
    if isinstance(tgt, Region):
        return Region(off, tgt.mask, reduce=tgt.reduce_)
    return Class(off)


@register_metric(MetricInfo(
    "random_logit", "randomisation", {"similarity": "lower"}, "similarity", ("Class", "Region"), "method",
    "Sixt et al. 2020 (ICML), section 5.2", "quantus.RandomLogit"))
def random_logit(model, x: torch.Tensor, method: str, target, num_classes: int | None = None, seed: int = 42,
                 off_class=None, normalise: bool = True, flatten: bool = False, method_options: dict | None = None,
                **options) -> torch.Tensor:
    """Random-logit test ``(B,)``: SSIM between the explanation of the target class and that of another,
    randomly chosen class (for a ``Region``: another output channel over the same region). An explanation
    that explains the model's decision should change with the class (lower is better).

    The other class: the ``k``-th of the classes other than the target, ``k`` one draw in
    ``[0, num_classes - 2]`` from a generator seeded with ``seed`` shared by the batch (or ``off_class``
    given, an int or one per sample). ``normalise``: each map divided by its max ``|.|`` per sample
    (Quantus normalises by the max over the whole batch, which makes one sample's score depend on the
    others). ``flatten=True`` computes SSIM on the flattened maps as Quantus does; the default treats each
    map as an image (2D or 3D).
    ``method_options``, ``model``: as every metric that re-explains (:func:`medexplain.metrics.meta.reexplaining`)."""
    tgt, options, model, x = reexplaining(random_logit, model, x, target, method_options, options)
    b = x.shape[0]
    with model_guard(model), torch.no_grad():
        from medexplain.engine.core import forward
        k = num_classes or forward(model, x[:1]).shape[1]
    if k < 2:
        raise TargetError("the random-logit test needs at least two classes (output channels)")
    y = tgt.class_index(b).to(x.device)
    if off_class is None:
        gen = torch.Generator().manual_seed(int(seed))
        j = int(torch.randint(0, k - 1, (1,), generator=gen))
        off = torch.where(torch.full_like(y, j) >= y, torch.full_like(y, j + 1), torch.full_like(y, j))
    else:
        off = torch.as_tensor(off_class, dtype=torch.long, device=x.device).flatten().expand(b).clone()
        if (off == y).any():
            raise TargetError("off_class must differ from the target class of every sample")
    a = _maps(model, x, method, tgt, options).double()
    r = _maps(model, x, method, _off_target(tgt, off), options).double()
    if normalise:
        a = a / a.flatten(1).abs().amax(1).clamp_min(1e-300).view(-1, *[1] * (a.ndim - 1))
        r = r / r.flatten(1).abs().amax(1).clamp_min(1e-300).view(-1, *[1] * (r.ndim - 1))
    scores = [_ssim(ai, ri, flatten) for ai, ri in zip(a.cpu().numpy(), r.cpu().numpy())]
    return torch.tensor(scores, dtype=torch.float64)
