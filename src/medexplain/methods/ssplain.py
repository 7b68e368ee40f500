"""SSplain: sparse and smooth explanations by ADMM (Sparse and Smooth Explainer, arXiv:2512.08038;
reference code neu-spiral/SSplain).

A pixel-wise mask ``M`` in [0, 1] lives on the support ``S0`` (voxels whose channel mean exceeds the
image minimum); ``M~`` is ``M`` on ``S0`` and 0 elsewhere, and the explained input is ``M~ * x`` (zero
baseline, one mask shared by all channels). The problem (paper eq. 3-4)::

    minimise_M   L(f(M~ * x), y) + lambda_tv TV(M~)
    subject to   ||M||_0 <= k,   0 <= M <= 1,        k = max(1, floor(|S0| / alpha))

with ``L`` the cross-entropy and ``TV`` the anisotropic total variation (eq. 2: sum of absolute
neighbour differences along every spatial axis, :func:`medexplain.engine.ops.total_variation`). ADMM splits
``M = M1`` (the sparse set) and ``M = M2`` (the box), with scaled duals ``U1, U2`` (paper eq. 5, 8, 9)::

    M  <- Adam step(s) on  L + lambda_tv TV + rho/2 (||M - M1 + U1||^2 + ||M - M2 + U2||^2)
    M1 <- keep the k largest entries of M + U1 on S0, zero the rest        (projection on ||.||_0 <= k)
    M2 <- clip(M + U2, 0, 1)                                               (projection on the box)
    U1 <- U1 + s (M - M1);   U2 <- U2 + s (M - M2)

One Adam optimiser is kept across iterations. Two modes:

- ``mode="textbook"``: scaled ADMM as in Boyd et al. 2011, ``s = 1``. The returned mask is
  the final ``M`` projected on both sets, ``clip(top_k(M), 0, 1)`` (the Euclidean projection on
  ``{||M||_0 <= k} ∩ [0, 1]``), so it **has at most k nonzeros and lies in [0, 1]**.
- ``mode="reference"`` (default): the reference code's rules, ``s = rho`` (the duals move rho times slower) and
  the primal ``M`` returned as is (only approximately k-sparse, possibly slightly outside [0, 1];
  voxels off the support get ``min(0, min M)`` as in the reference). It is the default because it did
  better on our planted benchmark (bench/ssplain.py, docs/ssplain.md): the primal keeps a full ranking
  of the voxels, while the projection sets 75 % of the support to exactly 0 and saturates the rest at 1.
  Use ``mode="textbook"`` when the L0 budget and the box must hold exactly.

Batched: the B problems (per-sample support, k, top-k and duals) are solved together. The loss is the
sum of the per-sample losses and Adam acts element-wise, so each mask follows exactly the trajectory it
would follow alone (in eval mode, which :func:`medexplain.engine.explain` enforces). 2D and 3D share one path.

Objective ``L`` per target (``objective="auto"``): a class target on a classifier uses the
cross-entropy ``-log softmax(f(M~ x))[y]`` (``-log sigmoid`` for one logit); a
:class:`~medexplain.engine.targets.Region` target on a segmenter uses the voxel-wise cross-entropy averaged
over the region, ``-mean_{v in R} log softmax_k(f(M~ x)_v)[c]``, the direct analogue of the paper's
CE for "keep this lesion segmented as class c". Other targets (MultiLabel, a function, a class on a
dense output) use the negative target score ``-s(f(M~ x))`` (``objective="score"`` forces it).

Differences from the reference code (neu-spiral/SSplain), kept on purpose (``docs/ssplain.md``):

- The reference updates its duals from the primal without detaching it (``U1 = rho (M - M1) + U1`` keeps
  ``M``'s autograd graph), so after ``t`` dual updates the gradient of the penalty with respect to ``M``
  is scaled by ``1 + t rho`` (1.01 from the second iteration, growing by ``rho`` per iteration).
  medexplain follows the paper and scaled ADMM (Boyd et al. 2011): the duals are constants during the
  primal step.
- The reference's top-k sorts with NumPy's default, unstable ``argsort``, so which of several equal
  entries of ``M + U1`` are kept depends on the sort; medexplain keeps the first in C order (a stable sort).

With both removed, ``mode="reference"`` agrees with the reference code to 5e-16 (float64); with them,
masks differ by up to 0.08 after 20 iterations (both figures from issue 20's side-by-side run).
"""
from __future__ import annotations

from typing import Sequence

import torch

from medexplain.engine.core import chunks, forward, n_passes
from medexplain.engine.ops import total_variation
from medexplain.engine.registry import register
from medexplain.engine.targets import Class, target_probability
from medexplain.errors import InputError, TargetError

MODES = ("textbook", "reference")


def support_mask(x: torch.Tensor, support="above_min") -> torch.Tensor:
    """``S0`` as bool ``(B, 1, *spatial)``.

    ``"above_min"``: voxels whose channel mean is above the sample's minimum channel mean (the
    reference's rule: the background of a fundus photograph or an MNIST digit is excluded);
    ``"all"``: every voxel; or a bool tensor ``(B or 1, [1,] *spatial)``.
    """
    b, spatial = x.shape[0], tuple(x.shape[2:])
    if isinstance(support, str):
        intensity = x.mean(1, keepdim=True)
        if support == "above_min":
            lo = intensity.flatten(1).amin(1).view(b, 1, *[1] * len(spatial))
            s = intensity > lo
        elif support == "all":
            s = torch.ones_like(intensity, dtype=torch.bool)
        else:
            raise InputError(f"support must be 'above_min', 'all' or a bool mask, got {support!r}")
    else:
        s = torch.as_tensor(support, device=x.device)
        if s.ndim == len(spatial) + 1:
            s = s.unsqueeze(1)
        if s.ndim != len(spatial) + 2 or tuple(s.shape[2:]) != spatial or s.shape[1] != 1 or s.shape[0] not in (1, b):
            raise InputError(f"support mask of shape {tuple(s.shape)} does not fit the input {tuple(x.shape)}; "
                             f"give (B, *spatial) or (B, 1, *spatial)")
        s = s.bool().expand(b, 1, *spatial)
    empty = (~s.flatten(1).any(1)).nonzero().flatten().tolist()
    if empty:
        raise InputError(f"the support S0 is empty for sample(s) {empty} (a constant image?); use support='all'")
    return s


def keep_top_k(v: torch.Tensor, support: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Projection on ``{||M||_0 <= k}`` restricted to the support: per sample, keep the ``k[b]`` largest
    entries of ``v`` inside ``support`` (ties: the first in C order) and zero everything else."""
    b, n = v.shape[0], v[0].numel()
    sup = support.flatten(1)
    flat = v.flatten(1).masked_fill(~sup, float("-inf"))
    order = flat.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=v.device).expand(b, n))
    keep = (ranks < k.view(-1, 1)) & sup
    return torch.where(keep, v.flatten(1), torch.zeros_like(flat)).view_as(v)


def _budget(support: torch.Tensor, alpha: float, k) -> torch.Tensor:
    size = support.flatten(1).sum(1)
    if k is None:
        if not alpha > 0:
            raise InputError(f"alpha must be > 0, got {alpha!r}")
        kk = torch.div(size, alpha, rounding_mode="floor").long() if isinstance(alpha, int) else \
            torch.floor(size.double() / float(alpha)).long()
    else:
        kk = torch.as_tensor(k, device=support.device).flatten().long()
        if kk.numel() == 1:
            kk = kk.expand(support.shape[0])
        if kk.numel() != support.shape[0]:
            raise InputError(f"k: got {kk.numel()} values for a batch of {support.shape[0]}; give one, or one per sample")
        if int(kk.min()) < 1:
            raise InputError(f"k must be >= 1, got {kk.tolist()}")
    return torch.minimum(kk.clamp_min(1), size)


def _initial_mask(x, support, init, seed):
    b, spatial, sup = x.shape[0], tuple(x.shape[2:]), support.to(x.dtype)
    if isinstance(init, torch.Tensor):
        m = init.to(x).expand(b, 1, *spatial).clone() if init.ndim == x.ndim else \
            init.to(x).reshape(-1, 1, *spatial).expand(b, 1, *spatial).clone()
        return m * sup
    if init == "intensity":  # min-max normalised channel-mean intensity over S0 (reference "normalized")
        v = x.mean(1, keepdim=True)
        big = torch.finfo(x.dtype).max
        lo = v.masked_fill(~support, big).flatten(1).amin(1).view(b, 1, *[1] * len(spatial))
        hi = v.masked_fill(~support, -big).flatten(1).amax(1).view(b, 1, *[1] * len(spatial))
        flat = hi <= lo  # one intensity on the whole support: start from ones
        m = torch.where(flat, torch.ones_like(v), (v - lo) / torch.where(flat, torch.ones_like(hi), hi - lo))
        return m * sup
    if init == "ones":
        return sup.clone()
    if init == "random":  # depends on seed and shape only, so batched == one by one
        g = torch.Generator(device=x.device).manual_seed(seed)
        return torch.rand((1, 1, *spatial), generator=g, device=x.device, dtype=x.dtype).expand(b, 1, *spatial) * sup
    raise InputError(f"init must be 'intensity', 'ones', 'random' or a tensor, got {init!r}")


def _objective_fn(target, objective):
    """Per-row loss L(output) as described in the module docstring."""
    if objective not in ("auto", "ce", "score"):
        raise InputError(f"objective must be 'auto', 'ce' or 'score', got {objective!r}")

    def loss(out, rows, batch):
        if objective != "score":
            terms = target_probability(out, target, rows, batch)
            if terms is not None:
                return -terms[0]
            if objective == "ce":
                raise TargetError(f"objective='ce' needs a class target on a classifier or a Region target on a "
                                  f"segmenter; got {type(target).__name__} with output {tuple(out.shape)}")
        return -target.scores(out, rows, batch)

    return loss


def _forward_chunked(model, x, cost, chunk_size):
    """The model's output on ``x``, ``chunk_size`` rows per call."""
    return torch.cat([forward(model, x[sl], cost) for sl in chunks(x.shape[0], chunk_size)])


def _solve(model, x, sup, k, m0, loss_fn, rows, batch, cost, iterations, adam_steps, lr, rho, lambda_tv, mode):
    """ADMM for the samples ``rows`` of the batch; returns (returned mask, primal M, M1)."""
    s = sup.to(x.dtype)
    dual_step = rho if mode == "reference" else 1.0
    m = m0.clone().requires_grad_(True)
    opt = torch.optim.Adam([m], lr=lr)
    with torch.no_grad():  # paper eq. 9 at iteration 0 (U1 = U2 = 0)
        m1 = keep_top_k(m, sup, k)
        m2 = m.clamp(0, 1) * s
        u1, u2 = torch.zeros_like(m), torch.zeros_like(m)
    for _ in range(iterations):
        for _ in range(adam_steps):  # primal update, eq. 5a
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                mt = m * s
                out = forward(model, mt * x, cost)
                penalty = ((m - m1 + u1) * s).pow(2).flatten(1).sum(1) + ((m - m2 + u2) * s).pow(2).flatten(1).sum(1)
                per_sample = loss_fn(out, rows, batch) + lambda_tv * total_variation(mt) + 0.5 * rho * penalty
                # the sum keeps each sample's gradient its own: masks never interact
                per_sample.sum().backward(inputs=[m])
            cost.n_backward += x.shape[0] * n_passes(model)
            opt.step()
        with torch.no_grad():  # projections (eq. 9) and dual ascent (eq. 5c), reference order
            m1 = keep_top_k(m + u1, sup, k)
            u1 = u1 + dual_step * (m - m1) * s
            m2 = (m + u2).clamp(0, 1) * s
            u2 = u2 + dual_step * (m - m2) * s
    m = m.detach()
    if mode == "textbook":
        final = keep_top_k(m, sup, k).clamp(0, 1)
    else:
        lo = m.masked_fill(~sup, float("inf")).flatten(1).amin(1).clamp_max(0).view(-1, *[1] * (m.ndim - 1))
        final = torch.where(sup, m, lo.expand_as(m))
    return final, m, m1


def _ssplain_cost(x_shape, o):
    n = int(o["iterations"]) * int(o["adam_steps"])
    return (n + 2) * x_shape[0], n * x_shape[0]


@register("ssplain", needs_target=False, family="optimisation", cost=_ssplain_cost)
def ssplain(model, x, target, cost, alpha: float = 4, k: int | Sequence[int] | None = None, iterations: int = 20,
            adam_steps: int = 1, lr: float = 0.1, rho: float = 0.01, lambda_tv: float = 1e-3, init="intensity",
            mode: str = "reference", support="above_min", objective: str = "auto", seed: int = 0,
            chunk_size: int | None = None):
    """SSplain mask by ADMM (arXiv:2512.08038, eq. 3-9). See the module docstring.

    Options (reference defaults): ``alpha=4`` (k = max(1, floor(|S0| / alpha))) or an explicit ``k``
    (int or one per sample, capped at |S0|); ``iterations=20`` ADMM iterations with ``adam_steps=1``
    Adam steps of ``lr=0.1`` each; ``rho=0.01``; ``lambda_tv=1e-3`` (paper: 1e-3 MNIST, 1e-4
    Fashion-MNIST); ``init`` "intensity" (min-max normalised channel mean on S0), "ones", "random"
    (seeded) or a tensor; ``mode`` "reference" (default) or "textbook" (budget and box guaranteed);
    ``support`` "above_min", "all" or a bool mask; ``objective`` "auto", "ce" or "score";
    ``chunk_size``: rows given to the model in one call (one row per sample, so that many masks are
    solved together; results do not depend on it). ``target=None`` explains the predicted class
    (classifiers).

    Returns the mask ``(B, 1, *spatial)``. ``info``: ``k``, ``support_size``, ``nonzeros`` and
    ``sparsity`` (nonzero fraction of the voxels) of the returned mask on S0, ``budget_met``, ``tv``
    (of the returned mask on S0), ``probability`` (target probability on ``M~ * x``; NaN for targets
    without a class) and ``probability_input`` (on ``x``), ``residual_l0`` = ||M - M1|| and
    ``residual_box`` = ||M - clip(M)|| of the primal, ``mode``, ``label`` (class targets).
    """
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    if int(iterations) != iterations or iterations < 0 or int(adam_steps) != adam_steps or adam_steps < 1:
        raise InputError(f"iterations must be an int >= 0 and adam_steps an int >= 1; got {iterations}, {adam_steps}")
    if not lr > 0 or rho < 0 or lambda_tv < 0:
        raise InputError(f"need lr > 0, rho >= 0, lambda_tv >= 0; got lr={lr}, rho={rho}, lambda_tv={lambda_tv}")
    b = x.shape[0]
    x = x.detach()
    with torch.no_grad():
        out0 = _forward_chunked(model, x, cost, chunk_size)
    if target is None:
        if out0.ndim != 2:
            raise TargetError("target=None (explain the predicted class) needs a classifier output (B, K); "
                              "for a segmenter pass mx.targets.Region(channel, mask)")
        target = Class(out0.argmax(1).cpu() if out0.shape[1] > 1 else torch.zeros(b, dtype=torch.long))
    target.validate(out0, b)
    loss_fn = _objective_fn(target, objective)
    sup = support_mask(x, support)
    kk = _budget(sup, alpha, k)
    m0 = _initial_mask(x, sup, init, seed)

    final, primal, m1 = torch.empty_like(m0), torch.empty_like(m0), torch.empty_like(m0)
    for sl in chunks(b, chunk_size):
        rows = torch.arange(sl.start, sl.stop, device=x.device)
        final[sl], primal[sl], m1[sl] = _solve(model, x[sl], sup[sl], kk[sl], m0[sl], loss_fn, rows, b, cost,
                                               int(iterations), int(adam_steps), lr, rho, lambda_tv, mode)

    with torch.no_grad():
        explained = final * sup.to(x.dtype)
        out = _forward_chunked(model, explained * x, cost, chunk_size)
        rows = torch.arange(b, device=x.device)
        terms, terms0 = target_probability(out, target, rows, b), target_probability(out0, target, rows, b)
        nonzeros = (explained != 0).flatten(1).sum(1)
        nan = [float("nan")] * b
        info = {
            "mode": mode, "k": kk.tolist(), "support_size": sup.flatten(1).sum(1).tolist(),
            "nonzeros": nonzeros.tolist(), "sparsity": (nonzeros.to(x.dtype) / explained[0].numel()).tolist(),
            "budget_met": (nonzeros <= kk).tolist(), "tv": total_variation(explained).tolist(),
            "probability": terms[1].tolist() if terms is not None else nan,
            "probability_input": terms0[1].tolist() if terms0 is not None else nan,
            "score": target.scores(out, rows, b).tolist(),
            "residual_l0": (primal - m1).flatten(1).norm(dim=1).tolist(),
            "residual_box": (primal - primal.clamp(0, 1)).mul(sup).flatten(1).norm(dim=1).tolist(),
            "iterations": int(iterations), "lambda_tv": lambda_tv, "rho": rho,
        }
        if isinstance(target, Class):
            info["label"] = target.class_index(b).tolist()
    return final, info
