"""Contrast Shapley: Shapley values of the input channels (MRI contrasts), a registered channel attribution.

Ren et al. 2025, "Clinical Interpretability of Deep Learning Segmentation Through Shapley-Derived
Agreement and Uncertainty Metrics" (arXiv:2512.07224): the players are the input contrasts (channels, or
groups of channels) of a multi-contrast MRI; the value of a coalition ``S`` is a score of the model run
with only the contrasts in ``S`` present, the others replaced by a baseline. The Shapley value of player
``i`` among ``n`` is (Shapley 1953)

    phi_i = sum_{S subset of N minus {i}}  |S|! (n - |S| - 1)! / n!  [ v(S + i) - v(S) ]          (1)

and the values satisfy efficiency, ``sum_i phi_i = v(N) - v(empty)``.

The value function is the **target** (:mod:`medexplain.engine.targets`): a value target (:class:`Dice`,
:class:`Volume`, :class:`MeanProbability` of the prediction), any gradient target (:class:`Region`, ...) or
a function ``f(outputs)`` / ``f(outputs, rows)`` returning ``(N,)``; ``rows`` says which sample each
coalition row belongs to. ``mx.explain(model, x, "contrast_shapley", target=value)`` returns a map
``(B, C, *spatial)`` holding ``phi_i`` on every voxel of the channels of player ``i`` (0 on channels in
no group) and, in ``info``, the values ``(B, n)``, the players, their channels, the coalition table, the
estimator and its standard error; :func:`medexplain.segmentation.shapley.channel_shapley` reads them into a
:class:`~medexplain.segmentation.shapley.ShapleyResult`.

For a few players every one of the ``2^n`` coalitions is evaluated exactly once: the coalition inputs of
all samples are stacked on the batch axis and go through the model in chunks of ``chunk_size`` rows, and
(1) becomes one matrix product ``phi = V W`` with the closed-form weights ``W``. Beyond about ten players
the values are estimated from sampled permutations (Castro et al. 2009), with antithetic pairs (each
permutation and its reverse, Mitchell et al. 2022) and a standard error; distinct coalitions met along the
permutations are again evaluated once each.
"""
from __future__ import annotations

import math
from typing import Literal, Mapping, Sequence

import torch

from medexplain.engine.core import chunks, forward
from medexplain.engine.registry import register, segmenter_only
from medexplain.errors import InputError, TargetError

#: Largest player count for which ``estimator="auto"`` enumerates all coalitions.
AUTO_EXACT_MAX = 10


def _players(groups, players, c: int) -> tuple[list[str], list[tuple[int, ...]]]:
    if groups is None:
        names, idx = [f"channel {i}" for i in range(c)], [(i,) for i in range(c)]
    else:
        items = list(groups.items()) if isinstance(groups, Mapping) else [(None, g) for g in groups]
        if not items:
            raise InputError("groups is empty: give at least one player")
        names, idx = [], []
        for name, g in items:
            g = (int(g),) if isinstance(g, int) else tuple(int(i) for i in g)
            if not g:
                raise InputError(f"group {name or len(idx)} has no channel")
            if min(g) < 0 or max(g) >= c:
                raise InputError(f"group {name or len(idx)} names channel(s) {g}; the input has {c} channels (0..{c - 1})")
            idx.append(g)
            names.append(str(name) if name is not None else "+".join(f"channel {i}" for i in g))
        flat = [i for g in idx for i in g]
        if len(flat) != len(set(flat)):
            raise InputError(f"groups overlap: {idx}; each channel may belong to one player only")
    if players is not None:
        players = [str(p) for p in players]
        if len(players) != len(idx):
            raise InputError(f"{len(players)} player names for {len(idx)} players")
        if len(set(players)) != len(players):
            raise InputError(f"player names must be distinct, got {players}")
        names = players
    return names, idx


def _baseline(baseline, x: torch.Tensor) -> torch.Tensor:
    """The replacement for absent channels, broadcast to ``x.shape``."""
    b, c = x.shape[:2]
    if isinstance(baseline, str):
        if baseline == "zero":
            return torch.zeros_like(x)
        if baseline == "mean":  # per sample and channel spatial mean: zero fill on z-scored input
            return x.flatten(2).mean(2).view(b, c, *[1] * (x.ndim - 2)).expand_as(x)
        raise InputError(f"baseline must be 'zero', 'mean', a number, C per-channel values or a tensor; got {baseline!r}")
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    t = torch.as_tensor(baseline, dtype=x.dtype).to(x.device)
    if not torch.isfinite(t).all():
        raise InputError("baseline contains NaN or Inf")
    if t.ndim == 1 and t.numel() == c:  # per-channel constants
        t = t.view(1, c, *[1] * (x.ndim - 2))
    elif t.ndim == 1 and t.numel() != 1:
        raise InputError(f"a 1-D baseline needs one value per channel ({c}); got {t.numel()}")
    try:
        return torch.broadcast_to(t, x.shape)
    except RuntimeError:
        raise InputError(f"baseline of shape {tuple(t.shape)} does not broadcast to the input {tuple(x.shape)}") from None


def shapley_weights(n: int) -> torch.Tensor:
    """Matrix ``W`` (2^n, n), float64, with ``phi = V @ W`` for coalition values ``V`` (B, 2^n) indexed by bitmask.

    From (1): ``W[S, i] = w(|S| - 1)`` if ``i`` in ``S``, ``-w(|S|)`` otherwise, with
    ``w(s) = s! (n - s - 1)! / n!``.
    """
    codes = torch.arange(2 ** n)
    member = ((codes[:, None] >> torch.arange(n)) & 1).bool()
    size = member.sum(1)
    w = torch.tensor([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)],
                     dtype=torch.float64)
    plus = w[(size - 1).clamp_min(0)][:, None].expand(-1, n)
    minus = -w[size.clamp_max(n - 1)][:, None].expand(-1, n)
    return torch.where(member, plus, minus)


def _evaluator(model, x, base, value_fn, member_channels, always, chunk_size, cost):
    """``evaluate(presence (U, n) bool) -> (B, U)`` float64 coalition values, every (coalition, sample)
    row once, in chunks of ``chunk_size`` rows stacked on the batch axis."""
    b, spatial_ones = x.shape[0], [1] * (x.ndim - 2)

    def evaluate(presence: torch.Tensor) -> torch.Tensor:
        present = ((presence.double() @ member_channels.double()) > 0) | always  # (U, C)
        u = presence.shape[0]
        vals = torch.empty((b, u), dtype=torch.float64, device=x.device)
        for sl in chunks(u * b, chunk_size):
            r = torch.arange(sl.start, sl.stop, device=x.device)
            ci, si = r // b, r % b
            keep = present[ci].view(-1, x.shape[1], *spatial_ones)
            out = forward(model, torch.where(keep, x[si], base[si]), cost)
            v = value_fn(out, si)
            if not isinstance(v, torch.Tensor) or v.shape != (r.numel(),):
                raise TargetError(f"value_fn must return a tensor of shape ({r.numel()},) for {r.numel()} output rows, "
                                  f"got {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
            if not torch.isfinite(v).all():
                raise TargetError("value_fn returned NaN or Inf")
            vals[si, ci] = v.detach().to(torch.float64)
        return vals

    return evaluate


def _n_players(x_shape, o) -> int:
    return x_shape[1] if o["groups"] is None else len(o["groups"])


def _shapley_cost(x_shape, o):
    """Exact: every coalition of every sample once; sampled permutations: unknown in advance."""
    n, est = _n_players(x_shape, o), o["estimator"]
    exact = est == "exact" or (est == "auto" and n <= AUTO_EXACT_MAX)
    return (2 ** n * x_shape[0], 0) if exact and n <= o["max_exact"] else None


@register("contrast_shapley", needs_grad=False, family="channel", cost=_shapley_cost, applies_to=segmenter_only)
def contrast_shapley(model, x, target, cost, groups=None, baseline="zero",
                     estimator: Literal["auto", "exact", "permutation"] = "auto", n_permutations: int = 200,
                     antithetic: bool = True, seed: int = 0, chunk_size: int | None = 16,
                     players: Sequence[str] | None = None, max_exact: int = 16):
    """Shapley values of input channels (MRI contrasts) or channel groups for the ``target`` score, eq. (1).

    ``groups``: None (each channel a player), a list of channels or channel lists, or a dict ``name ->
    channel(s)``; channels in no group are always present. ``players``: player names. ``baseline``
    replaces absent channels: ``"zero"`` (default; the mean on z-scored input), ``"mean"`` (each sample's
    channel mean), a number, ``C`` per-channel constants, or a tensor broadcastable to ``x``.
    ``estimator``: ``"exact"`` (all ``2^n`` coalitions, each evaluated once; at most ``max_exact``
    players), ``"permutation"`` (``n_permutations`` sampled orders, as antithetic pairs when
    ``antithetic``: an odd count is rounded up; deterministic given ``seed``), or ``"auto"`` (exact up to
    10 players). ``chunk_size`` bounds the rows per forward pass. No gradients.
    """
    method = estimator
    b, c = x.shape[:2]
    names, idx = _players(groups, players, c)
    n = len(idx)
    if method == "auto":
        method = "exact" if n <= AUTO_EXACT_MAX else "permutation"
    if method not in ("exact", "permutation"):
        raise InputError(f"method must be 'exact', 'permutation' or 'auto', got {method!r}")
    if method == "exact" and n > max_exact:
        raise InputError(f"{n} players need 2^{n} coalitions; use estimator='permutation' (channel_shapley: "
                         "method='permutation') or raise max_exact")
    if method == "permutation":
        if n > 62:
            raise InputError(f"permutation sampling supports at most 62 players, got {n}")
        if n_permutations < (2 if antithetic else 1):
            raise InputError("n_permutations must be >= 2 with antithetic pairs (>= 1 without)")
    if chunk_size is not None and chunk_size < 1:
        raise InputError("chunk_size must be >= 1 (or None for everything at once)")
    v_fn = _value(target, b)
    base = _baseline(baseline, x)
    member = torch.zeros((n, c), dtype=torch.bool, device=x.device)
    for i, g in enumerate(idx):
        member[i, list(g)] = True
    always = ~member.any(0)
    bits = torch.arange(n, device=x.device)

    with torch.no_grad():
        evaluate = _evaluator(model, x, base, v_fn, member, always, chunk_size, cost)
        if method == "exact":
            codes = torch.arange(2 ** n, device=x.device)
            vals = evaluate(((codes[:, None] >> bits) & 1).bool())
            values = vals @ shapley_weights(n).to(x.device)
            stderr, m = None, None
        else:
            gen = torch.Generator().manual_seed(int(seed))
            q = (n_permutations + 1) // 2 if antithetic else n_permutations
            perm = torch.argsort(torch.rand(q, n, generator=gen), dim=1)
            if antithetic:  # each order followed by its reverse
                perm = torch.stack((perm, perm.flip(1)), 1).reshape(2 * q, n)
            perm = perm.to(x.device)
            m = perm.shape[0]
            pos = torch.argsort(perm, dim=1)                              # position of each player
            chain = pos[:, None, :] < torch.arange(n + 1, device=x.device)[None, :, None]  # (m, n+1, n)
            chain_codes = (chain.long() << bits).sum(-1)
            codes, inverse = torch.unique(chain_codes, return_inverse=True)
            vals = evaluate(((codes[:, None] >> bits) & 1).bool())
            along = vals[:, inverse]                                      # (B, m, n+1)
            marginal = along[..., 1:] - along[..., :-1]                   # of player perm[:, j]
            contrib = marginal.gather(2, pos[None].expand(b, m, n))       # (B, m, n) by player
            est = contrib.view(b, m // 2, 2, n).mean(2) if antithetic else contrib
            values = est.mean(1)
            k = est.shape[1]
            stderr = est.std(1, correction=1) / math.sqrt(k) if k > 1 else torch.full_like(values, float("nan"))
    amap = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    for i, g in enumerate(idx):       # phi_i on every voxel of player i's channels
        amap[:, list(g)] = values[:, i].to(x.dtype).view(b, 1, *[1] * (x.ndim - 2))
    return amap, {"values": values.tolist(), "players": names, "groups": [list(g) for g in idx],
                  "coalitions": {int(code): vals[:, j].tolist() for j, code in enumerate(codes.tolist())},
                  "estimator": method, "n_evaluations": len(codes) * b,
                  "stderr": None if stderr is None else stderr.tolist(), "n_permutations": m,
                  "baseline": baseline if isinstance(baseline, (str, int, float)) else "tensor",
                  "value_fn": getattr(target, "name", type(target).__name__)}


def _value(target, batch: int):
    """The target as a value function ``v(outputs, rows) -> (N,)``."""
    return lambda out, rows: target.scores(out, rows, batch)
