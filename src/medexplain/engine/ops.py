"""Tensor arithmetic shared by methods and metrics, each written once: map normalisation, total variation,
Dice, output probabilities, the SmoothGrad noise source and the one noise loop over it.

All functions are written against ``(B, ...)`` tensors (2D and 3D alike) and keep dtype and device.
Written by hand because each is a few lines whose exact convention matters to several callers (e.g.
TV as a sum for SSplain, as a mean for Med-CAM's prior); ``docs/design.md`` states the conventions.
"""
from __future__ import annotations

import difflib
from typing import Iterator

import torch

from medexplain.engine.core import find_passes, unwrap
from medexplain.errors import InputError, OptionError, TargetError

ACTIVATIONS = ("auto", "softmax", "sigmoid", "none")


def _per_sample_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.view(-1, *[1] * (ndim - 1))


#: The map normalisations of :func:`normalize`.
NORMALIZATIONS = ("minmax", "abs", "absmax")


def normalize(m: torch.Tensor, mode: str = "minmax", start_dim: int = 1) -> torch.Tensor:
    """Explicit normalisation of maps (never applied by default), over the dims from ``start_dim`` on
    (1: per sample; 2: per (sample, channel), as CheXlocalize normalises each class map).

    ``minmax``: (m - min) / (max - min), a constant map becomes 0; ``abs``: |m|; ``absmax``: m / max|m|
    (sign kept, range [-1, 1]).
    """
    if mode not in NORMALIZATIONS:
        close = difflib.get_close_matches(str(mode), NORMALIZATIONS, n=1, cutoff=0.5)
        raise OptionError(f"unknown normalisation {mode!r}; use one of {list(NORMALIZATIONS)}"
                          + (f"; did you mean {close[0]!r}?" if close else ""))
    if mode == "abs":
        return m.abs()
    flat = m.flatten(start_dim)
    keep = (*m.shape[:start_dim], *[1] * (m.ndim - start_dim))
    tiny = torch.finfo(m.dtype).tiny if m.is_floating_point() else 1e-12
    if mode == "absmax":
        return m / flat.abs().amax(-1).clamp_min(tiny).view(keep)
    lo, hi = flat.amin(-1).view(keep), flat.amax(-1).view(keep)
    return (m - lo) / (hi - lo).clamp_min(tiny)


def total_variation(t: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Anisotropic TV per sample: sum over channels and every spatial axis of ``|t[i+1] - t[i]|``.

    ``t`` is ``(B, C, *spatial)``; returns ``(B,)``. ``reduction="sum"`` (SSplain, arXiv:2512.08038 eq. 2;
    torchmetrics' ``TotalVariation(reduction="none")`` in 2D) or ``"mean"``: the sum divided by the
    element count of one sample (Med-CAM's prototype prior, arXiv:2604.13695 section 3.2).
    """
    if t.ndim < 3:
        raise InputError(f"total_variation needs (B, C, *spatial), got shape {tuple(t.shape)}")
    if reduction not in ("sum", "mean"):
        raise InputError(f"TV reduction must be 'sum' or 'mean', got {reduction!r}")
    tv = t.new_zeros(t.shape[0])
    for axis in range(2, t.ndim):
        tv = tv + t.diff(dim=axis).abs().flatten(1).sum(1)
    return tv / t[0].numel() if reduction == "mean" else tv


def dice(pred: torch.Tensor, ref: torch.Tensor, empty: float = 1.0) -> torch.Tensor:
    """Dice 2|P.R| / (|P| + |R|) per sample over all non-batch dims: ``(N, ...)`` -> ``(N,)`` in float64.

    Boolean masks give the usual Dice, soft masks in [0, 1] the soft Dice. ``empty`` is the value when
    both are empty (1.0: a correct "no lesion").
    """
    if pred.shape != ref.shape:
        raise InputError(f"dice: prediction {tuple(pred.shape)} and reference {tuple(ref.shape)} differ in shape")
    p, r = pred.flatten(1).double(), ref.flatten(1).double()
    inter, tot = (p * r).sum(1), p.sum(1) + r.sum(1)
    return torch.where(tot > 0, 2 * inter / tot.clamp_min(1e-300), torch.full_like(tot, float(empty)))


def _final_activation(model) -> str | None:
    """``"softmax"``/``"sigmoid"`` when the model visibly ends in one: the last leaf module of an eager
    model, or the returned value of a TorchScript model's code (``return torch.softmax(...)``)."""
    if model is None:
        return None
    model = unwrap(model)
    if isinstance(model, torch.jit.ScriptModule):
        try:
            lines = [ln.strip() for ln in model.code.strip().splitlines() if ln.strip()]
        except Exception:
            return None
        ret = lines[-1].removeprefix("return ").strip() if lines and lines[-1].startswith("return ") else ""
        expr = next((ln.partition("=")[2].strip() for ln in reversed(lines[:-1]) if ln.startswith(f"{ret} =")), ret)
        for name in ("softmax", "sigmoid"):
            if expr.startswith(f"torch.{name}("):
                return name
    leaves = [m for m in model.modules() if not list(m.children())] if isinstance(model, torch.nn.Module) else []
    last = getattr(leaves[-1], "original_name", type(leaves[-1]).__name__) if leaves else ""   # scripted: original_name
    if last in ("Softmax", "Softmax2d"):
        return "softmax"
    if last == "Sigmoid":
        return "sigmoid"
    return None


def detect_activation(out: torch.Tensor, model=None) -> tuple[str, str]:
    """What ``activation="auto"`` means for this output: ``(activation, why)``.

    Outputs already in [0, 1] that sum to 1 over the channels, or in [0, 1] from a model that ends in a
    Softmax/Sigmoid (:func:`_final_activation`), are probabilities (``none``); otherwise logits:
    ``softmax`` for more than one channel, ``sigmoid`` for one.
    """
    k = out.shape[1]
    o = out.detach()
    in_unit = bool(o.numel()) and float(o.min()) >= 0.0 and float(o.max()) <= 1.0
    final = _final_activation(model)
    passes = find_passes(model) if model is not None else None
    if final is not None and passes is not None and passes.logits and passes.ended_in is not None:
        # mx.Model took the score before that module (an eager one: TorchScript keeps its probabilities)
        return final, f"the model ends in {final}; its logits (the {final}'s input) are explained: {final}"
    if in_unit and final is not None:
        return "none", f"the model ends in {final}: its outputs are probabilities"
    if in_unit and k > 1:
        tol = 1e-3 if o.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-6
        if torch.allclose(o.sum(1).double(), torch.ones((), dtype=torch.float64, device=o.device), atol=tol, rtol=0):
            return "none", f"the {k} output channels are in [0, 1] and sum to 1: already probabilities"
    if k > 1:
        return "softmax", f"{k} output channels of logits: softmax over the channels"
    return "sigmoid", "one output channel of logits: sigmoid"


def resolve_activation(out: torch.Tensor, activation: str | None, model=None) -> str:
    """The output activation to apply: ``softmax``, ``sigmoid`` or ``none``. ``auto`` is detected from
    the output values and, when given, the model (:func:`detect_activation`); ``None`` = ``none``."""
    activation = "none" if activation is None else activation
    if activation not in ACTIVATIONS:
        raise TargetError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "auto":
        return detect_activation(out, model)[0]
    return activation


def probabilities(out: torch.Tensor, activation: str | None = "auto", channel: int | None = None,
                  model=None) -> torch.Tensor:
    """The model's output probabilities ``(N, K, ...)``, or channel ``channel`` of them ``(N, ...)``.

    ``activation`` is the output activation (the one meaning of this word across medexplain):
    ``softmax`` over dim 1, ``sigmoid`` per channel, ``none`` (the output already is a probability), or
    ``auto`` (:func:`resolve_activation`, with ``model`` when given). Computed in the output's dtype.
    """
    if channel is not None and not 0 <= channel < out.shape[1]:
        raise TargetError(f"channel {channel} out of range for a model with {out.shape[1]} output channels")
    act = resolve_activation(out, activation, model)
    if act == "softmax":
        p = torch.softmax(out, 1)
        return p if channel is None else p[:, channel]
    z = out if channel is None else out[:, channel]
    return torch.sigmoid(z) if act == "sigmoid" else z


class NoiseSource:
    """The SmoothGrad noise of every method (SmoothGrad, Smilkov et al. 2017, eq. 3; instance SmoothGrad,
    Spagnolo et al.): ``n_samples`` draws ``eps_n ~ N(0, sd^2)`` for a batch ``x`` ``(B, C, *s)``.

    ``sd = sigma * (max - min)`` per sample, over the whole sample (``scale="sample"``, Smilkov et al.) or
    over its first channel (``scale="channel0"``, the IES reference code; the same sd for every channel).
    Draws are one standard-normal tensor ``(C, *s)`` per noise sample from a generator seeded with ``seed``,
    shared by the images of the batch and scaled by each image's sd: they depend only on ``seed`` and the
    image shape, never on the chunking or on the rest of the batch, so a batch of 3 gives the maps of three
    batches of 1. ``noise`` (absolute, ``(N, C, *s)`` or ``(N, B, C, *s)``) replaces the generator.
    """

    def __init__(self, x: torch.Tensor, n_samples: int, sigma: float, seed: int = 0, scale: str = "sample",
                 noise: torch.Tensor | None = None):
        if int(n_samples) < 1:
            raise InputError(f"n_samples must be >= 1, got {n_samples}")
        if sigma < 0:
            raise InputError(f"sigma must be >= 0, got {sigma}")
        if scale not in ("sample", "channel0"):
            raise InputError(f"noise scale must be 'sample' or 'channel0', got {scale!r}")
        self.x, self.n_samples = x, int(n_samples)
        if noise is not None:
            noise = torch.as_tensor(noise).to(x)
            if noise.ndim == x.ndim:
                noise = noise.unsqueeze(1)
            if tuple(noise.shape[2:]) != tuple(x.shape[1:]) or noise.shape[0] != self.n_samples \
                    or noise.shape[1] not in (1, x.shape[0]):
                raise InputError(f"noise must have shape {(self.n_samples, *x.shape[1:])} or "
                                 f"{(self.n_samples, *x.shape)}, got {tuple(noise.shape)}")
        self.noise = noise
        ref = x.flatten(1) if scale == "sample" else x[:, 0].flatten(1)
        self.sd = (ref.amax(1) - ref.amin(1)) * float(sigma)
        self.gen = torch.Generator(device=x.device).manual_seed(int(seed))
        self._next = 0

    def take(self, n: int) -> torch.Tensor:
        """The next ``n`` draws, ``(n, B, C, *s)``."""
        x = self.x
        start, self._next = self._next, self._next + n
        if self.noise is not None:
            return self.noise[start:start + n].expand(n, *x.shape)
        eps = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
        for j in range(n):
            eps[j] = torch.randn(x.shape[1:], generator=self.gen, device=x.device, dtype=x.dtype)
        return eps.unsqueeze(1) * _per_sample_view(self.sd, x.ndim).unsqueeze(0)

    def chunks(self, per: int) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(sample slice, noisy inputs (n, B, C, *s))`` over all draws, ``per`` draws at a time."""
        for start in range(0, self.n_samples, per):
            n = min(per, self.n_samples - start)
            yield slice(start, start + n), self.x.unsqueeze(0) + self.take(n)


def noise_sum(x: torch.Tensor, fn, n_samples: int, sigma: float, seed: int = 0, chunk_size: int | None = None,
              scale: str = "sample", noise: torch.Tensor | None = None, start=None):
    """The one SmoothGrad noise loop (as Captum's ``NoiseTunnel``): the sum over ``n_samples`` noisy copies
    ``x + eps_n`` (:class:`NoiseSource`: ``scale``, ``seed``, ``noise``) of what ``fn`` gives for them.

    The draws go through ``fn`` ``per = chunk_size // B`` noise samples at a time (whole noise samples of
    the batch, at least one; ``chunk_size=None``: all at once): ``fn(rows_x, rows, n)`` gets the noisy
    rows ``(n * B, C, *s)`` (noise sample major), ``rows`` ``(n * B,)`` the sample of ``x`` each row
    belongs to (for :mod:`medexplain.engine.targets`) and ``n``, and returns its contribution summed over the
    ``n`` noise samples: a tensor or a tuple of tensors (e.g. the sum of maps and of their squares).
    Contributions are added in draw order onto ``start`` (default: the first one). Every SmoothGrad-like
    method (SmoothGrad, instance SmoothGrad, the noise tunnel over any method, SmoothMPRT) is this loop
    with its own ``fn``; the caller divides by its count.
    """
    b = x.shape[0]
    source = NoiseSource(x, n_samples, sigma, seed, scale=scale, noise=noise)
    total = start
    for sl, noisy in source.chunks(max(1, (chunk_size or n_samples * b) // b)):
        n = sl.stop - sl.start
        part = fn(noisy.reshape(-1, *x.shape[1:]), torch.arange(b, device=x.device).repeat(n), n)
        if total is None:
            total = part
        elif isinstance(part, tuple):
            total = tuple(t + p for t, p in zip(total, part))
        else:
            total = total + part
    return total
