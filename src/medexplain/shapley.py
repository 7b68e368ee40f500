"""Contrast-level Shapley values for segmentation.

Ren et al. 2025, "Clinical Interpretability of Deep Learning Segmentation Through Shapley-Derived
Agreement and Uncertainty Metrics" (arXiv:2512.07224): the players are the input contrasts (channels, or
groups of channels) of a multi-contrast MRI; the value of a coalition ``S`` is a score of the model run
with only the contrasts in ``S`` present, the others replaced by a baseline. The Shapley value of player
``i`` among ``n`` is (Shapley 1953)

    phi_i = sum_{S subset of N minus {i}}  |S|! (n - |S| - 1)! / n!  [ v(S + i) - v(S) ]          (1)

and the values satisfy efficiency, ``sum_i phi_i = v(N) - v(empty)``.

For a few players every one of the ``2^n`` coalitions is evaluated exactly once: the coalition inputs of
all samples are stacked on the batch axis and go through the model in chunks of ``chunk_size`` rows, and
(1) becomes one matrix product ``phi = V W`` with the closed-form weights ``W``. Beyond about ten players
the values are estimated from sampled permutations (Castro et al. 2009), with antithetic pairs (each
permutation and its reverse, Mitchell et al. 2022) and a standard error; distinct coalitions met along the
permutations are again evaluated once each.

Value functions map a batch of model outputs ``(N, K, *spatial)`` and ``rows`` (``(N,)`` long: for each
output row, the index of the sample of ``x`` it belongs to, as :mod:`medexplain.targets` does) to scores
``(N,)``. Provided: :func:`dice` (per label, label set, or BraTS region ET/TC/WT against a reference label
map per sample) and :func:`mean_foreground_probability`; any callable ``f(outputs)`` or
``f(outputs, rows)`` and any :mod:`medexplain.targets` target also work.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence, Union

import torch

from .core import Cost, check_input, chunks, forward, model_expectations, model_guard
from .errors import InputError, TargetError
from .models.model import as_model
from .ops import dice as dice_score
from .ops import probabilities
from .sliding import is_sliding, window_info
from .targets import Target

__all__ = ["BRATS_REGIONS", "ShapleyResult", "channel_shapley", "dice", "mean_foreground_probability",
           "Dice", "MeanForegroundProbability", "shapley_weights"]

#: BraTS label conventions up to 2021 (1 necrotic core, 2 oedema, 4 enhancing tumour). BraTS 2023+
#: (GLI) writes enhancing tumour as 3: pass ``regions={"ET": (3,), "TC": (1, 3), "WT": (1, 2, 3)}``.
BRATS_REGIONS: dict[str, tuple[int, ...]] = {"ET": (4,), "TC": (1, 4), "WT": (1, 2, 4), "NCR": (1,), "ED": (2,)}

#: Largest player count for which ``method="auto"`` enumerates all coalitions.
AUTO_EXACT_MAX = 10


# --------------------------------------------------------------------------------------------------
# value functions
# --------------------------------------------------------------------------------------------------

class ValueFunction:
    """Base class: ``v(outputs (N, K, *spatial), rows (N,)) -> (N,)`` float64 scores."""

    def __call__(self, outputs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _check_dense(outputs: torch.Tensor, what: str) -> None:
    if outputs.ndim < 3:
        raise TargetError(f"{what} needs a dense model output (N, K, *spatial); got {tuple(outputs.shape)}")


def _probabilities(outputs: torch.Tensor, channel: int | None, activation: str | None, model=None) -> torch.Tensor:
    """Channel ``channel`` of the output probabilities in float64 (:func:`medexplain.ops.probabilities`);
    ``activation`` None is ``auto`` (detected with ``model`` when the value function is bound to one)."""
    return probabilities(outputs.double(), activation or "auto", channel, model=model)


def bind_model(value_fn, model):
    """``value_fn`` with the model's output activation where it leaves it to the model (``activation=None``):
    :func:`channel_shapley` reads how probabilities are read from the model object (``mx.Model(activation=)``)."""
    if isinstance(value_fn, (Dice, MeanForegroundProbability)) and value_fn.activation is None:
        return replace(value_fn, activation=getattr(model, "activation", "auto"), model=model)
    return value_fn


def _per_sample_maps(ref: torch.Tensor, rows: torch.Tensor, spatial: tuple[int, ...], what: str) -> torch.Tensor:
    if ref.ndim == len(spatial) + 2 and ref.shape[1] == 1:
        ref = ref[:, 0]
    if ref.ndim == len(spatial):
        ref = ref.unsqueeze(0)
    if tuple(ref.shape[1:]) != spatial:
        raise TargetError(f"{what} has spatial shape {tuple(ref.shape[1:])}; the model output has {spatial}")
    if ref.shape[0] == 1:
        return ref.expand(rows.shape[0], *spatial)
    if int(rows.max()) >= ref.shape[0]:
        raise TargetError(f"{what} has {ref.shape[0]} samples; rows refer to sample {int(rows.max())}")
    return ref[rows.to(ref.device)]


@dataclass
class Dice(ValueFunction):
    """Dice of the predicted region against a reference label map, per sample (see :func:`dice`)."""

    labels: tuple[int, ...]
    reference: torch.Tensor
    class_labels: tuple[int, ...] | None = None
    activation: str | None = None
    channel: int | None = None
    threshold: float = 0.5
    soft: bool = False
    empty: float = 1.0
    name: str = "dice"
    model: object = field(default=None, repr=False, compare=False)

    def _prediction(self, outputs: torch.Tensor) -> torch.Tensor:
        """Hard (bool) or soft (float64 probability) prediction of the region, ``(N, *spatial)``."""
        if self.channel is not None:  # one sigmoid (or probability) channel per region
            p = _probabilities(outputs, self.channel, self.activation, self.model)
            return p if self.soft else p > self.threshold
        k = outputs.shape[1]
        cl = tuple(range(k)) if self.class_labels is None else tuple(self.class_labels)
        if len(cl) != k:
            raise TargetError(f"class_labels has {len(cl)} entries; the model has {k} output channels")
        in_region = torch.tensor([c in self.labels for c in cl], device=outputs.device)
        if not in_region.any():
            raise TargetError(f"no output channel predicts labels {self.labels} (class_labels={cl}); "
                              "pass class_labels=(label of channel 0, label of channel 1, ...)")
        if self.soft:  # softmax of logits, or outputs that already are class probabilities ("none")
            p = _probabilities(outputs, None, self.activation, self.model)
            return (p * in_region.view(1, k, *[1] * (outputs.ndim - 2))).sum(1)
        return in_region[outputs.argmax(1)]

    def __call__(self, outputs, rows):
        _check_dense(outputs, "Dice")
        ref = _per_sample_maps(self.reference, rows, tuple(outputs.shape[2:]), "the Dice reference")
        truth = torch.isin(ref.to(outputs.device), torch.tensor(self.labels, device=outputs.device))
        return dice_score(self._prediction(outputs), truth, empty=self.empty)


def dice(label_or_region: Union[int, str, Sequence[int]], reference_seg, *, class_labels: Sequence[int] | None = None,
         activation: str | None = None, channel: int | None = None, threshold: float = 0.5, soft: bool = False,
         empty: float = 1.0, regions: Mapping[str, Sequence[int]] = BRATS_REGIONS) -> Dice:
    """Value function: Dice of the model's segmentation of a label or region against a reference.

    ``label_or_region``: one label (``1``), a label set (``(1, 4)``), or a region name in ``regions``
    (BraTS ``"ET"``, ``"TC"``, ``"WT"``, ``"NCR"``, ``"ED"`` from label maps ``{1, 2, 4}`` by default).
    ``reference_seg``: integer label map ``(B, *spatial)`` (or ``(B, 1, *spatial)``) on the output grid;
    row ``r`` of the outputs is compared with ``reference_seg[rows[r]]`` (a single map, ``B = 1`` or
    ``(*spatial)``, is shared by every sample).

    Prediction: without ``channel`` the label map is ``class_labels[argmax_k z_k]``
    (``class_labels`` defaults to ``0..K-1``; a 4-channel BraTS model predicting labels {0, 1, 2, 4}
    needs ``class_labels=(0, 1, 2, 4)``) and the region is where that label map falls in the label set.
    With ``channel`` (region-based models: one sigmoid channel per region) it is the channel's probability
    ``> threshold`` (``activation="sigmoid"``: ``sigmoid(z_channel)``; ``"none"``: the channel is already a
    probability).
    ``soft=True`` uses the probabilities instead (soft Dice: ``2 sum(p g) / (sum p + sum g)``). Dice =
    ``2 |P and G| / (|P| + |G|)`` (:func:`medexplain.ops.dice`); ``empty`` (default 1) when both are
    empty, the BraTS convention. ``activation`` is the model's output activation (``docs/design.md``);
    ``None`` (default): the model's own (``mx.Model(activation=)``, bound by :func:`channel_shapley`).
    """
    if isinstance(label_or_region, str):
        by_name = {k.upper(): v for k, v in regions.items()}
        if label_or_region.upper() not in by_name:
            raise TargetError(f"unknown region {label_or_region!r}; known: {', '.join(regions)} (or give labels)")
        labels = tuple(int(v) for v in by_name[label_or_region.upper()])
    else:
        labels = tuple(int(v) for v in torch.as_tensor(label_or_region).flatten().tolist())
    if not labels:
        raise TargetError("dice needs at least one label")
    ref = torch.as_tensor(reference_seg)
    if torch.is_floating_point(ref):
        if not torch.equal(ref, ref.round()):
            raise TargetError("the Dice reference must be an integer label map")
        ref = ref.long()
    if activation not in (None, "auto", "softmax", "sigmoid", "none"):
        raise TargetError(f"activation must be None (the model's), 'auto', 'softmax', 'sigmoid' or 'none', "
                          f"got {activation!r}")
    if (activation == "softmax" and channel is not None) or (activation == "sigmoid" and channel is None):
        raise TargetError("dice: give channel= (the output channel of this region) with activation='sigmoid' (or "
                          "'none' for probability channels), and not with 'softmax' (there the labels come from "
                          "class_labels)")
    name = f"dice_{label_or_region}" if isinstance(label_or_region, str) else "dice_" + "+".join(map(str, labels))
    return Dice(labels, ref, None if class_labels is None else tuple(int(c) for c in class_labels), activation,
                channel, float(threshold), bool(soft), float(empty), name)


@dataclass
class MeanForegroundProbability(ValueFunction):
    """Mean class probability over the volume (or a per-sample mask); see :func:`mean_foreground_probability`."""

    channel: int = 1
    activation: str | None = None
    mask: torch.Tensor | None = None
    name: str = "mean_probability"
    model: object = field(default=None, repr=False, compare=False)

    def __call__(self, outputs, rows):
        _check_dense(outputs, "mean_foreground_probability")
        p = _probabilities(outputs, self.channel, self.activation, self.model).flatten(1)
        if self.mask is None:
            return p.mean(1)
        m = _per_sample_maps(torch.as_tensor(self.mask).bool(), rows, tuple(outputs.shape[2:]), "the mask")
        m = m.to(outputs.device).flatten(1).double()
        if (m.sum(1) == 0).any():
            raise TargetError("mean_foreground_probability: the mask is empty for some sample")
        return (p * m).sum(1) / m.sum(1)


def mean_foreground_probability(channel: int = 1, activation: str | None = None,
                                mask=None) -> MeanForegroundProbability:
    """Value function: mean probability of output ``channel`` over all voxels, or inside ``mask``
    (bool ``(B, *spatial)``, row ``r`` uses ``mask[rows[r]]``). ``activation``: ``None`` (default) the model's
    own output activation (``mx.Model(activation=)``, ``auto``: softmax over several channels of logits,
    sigmoid for one, none for probabilities; bound by :func:`channel_shapley`), or ``"softmax"`` over the
    channels, ``"sigmoid"`` of that channel, ``"none"`` (outputs already probabilities)."""
    return MeanForegroundProbability(int(channel), activation, mask, f"mean_probability_{channel}")


def _as_value_fn(value_fn, batch: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if isinstance(value_fn, ValueFunction):
        return value_fn
    if isinstance(value_fn, Target):
        return lambda out, rows: value_fn.scores(out, rows, batch)
    if not callable(value_fn):
        raise TargetError(f"value_fn must be callable (outputs[, rows]) -> (N,), got {type(value_fn).__name__}")
    try:
        params = [p for p in inspect.signature(value_fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
        takes_rows = len(params) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)
    except (TypeError, ValueError):  # builtins without a signature
        takes_rows = False
    return value_fn if takes_rows else (lambda out, rows: value_fn(out))


# --------------------------------------------------------------------------------------------------
# players, baselines, the result
# --------------------------------------------------------------------------------------------------

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


@dataclass
class ShapleyResult:
    """Contrast-level Shapley values of a batch.

    ``values`` (B, n_players) float64; ``players`` their names; ``groups`` the channels of each player;
    ``coalitions`` maps a coalition bitmask (bit ``i`` set = player ``i`` present) to its value per sample
    ``(B,)`` (all ``2^n`` for the exact method, those met along the permutations otherwise);
    ``n_evaluations`` model rows evaluated (one sample through the model counts one: ``B * 2^n`` exact);
    ``stderr`` (B, n) standard error of sampled values (None when exact).
    """

    values: torch.Tensor
    players: list[str]
    groups: list[tuple[int, ...]]
    coalitions: dict[int, torch.Tensor]
    method: str
    n_evaluations: int
    stderr: torch.Tensor | None = None
    n_permutations: int | None = None
    info: dict = field(default_factory=dict)

    @property
    def ranking(self) -> torch.Tensor:
        """(B, n) player indices sorted by value, largest first (ties: lower index first)."""
        return torch.argsort(-self.values, dim=1, stable=True)

    @property
    def ranks(self) -> torch.Tensor:
        """(B, n) rank of each player, 1 = largest value (ties broken as in :attr:`ranking`)."""
        r = torch.empty_like(self.ranking)
        r.scatter_(1, self.ranking, torch.arange(1, self.values.shape[1] + 1).expand_as(r).contiguous())
        return r

    @property
    def n_coalitions(self) -> int:
        return len(self.coalitions)

    def bitmask(self, coalition: Sequence[Union[int, str]]) -> int:
        """Bitmask of a coalition given by player indices or names."""
        code = 0
        for p in coalition:
            i = self.players.index(p) if isinstance(p, str) else int(p)
            if not 0 <= i < len(self.players):
                raise InputError(f"player {p!r} out of range")
            code |= 1 << i
        return code

    def value_of(self, coalition: Sequence[Union[int, str]]) -> torch.Tensor:
        """v(S) per sample for a coalition of player indices or names (must have been evaluated)."""
        code = self.bitmask(coalition)
        if code not in self.coalitions:
            raise KeyError(f"coalition {list(coalition)} was not evaluated")
        return self.coalitions[code]

    def table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (M,), values (B, M)): the coalition table sorted by bitmask."""
        codes = sorted(self.coalitions)
        return torch.tensor(codes, dtype=torch.long), torch.stack([self.coalitions[k] for k in codes], 1)

    def efficiency_gap(self) -> torch.Tensor:
        """(B,) ``sum_i phi_i - (v(N) - v(empty))``: zero up to rounding for both methods."""
        full = (1 << len(self.players)) - 1
        return self.values.sum(1) - (self.coalitions[full] - self.coalitions[0])


# --------------------------------------------------------------------------------------------------
# the estimator
# --------------------------------------------------------------------------------------------------

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


def channel_shapley(model: torch.nn.Module, x: torch.Tensor, value_fn, groups=None, baseline="zero",
                    method: str = "auto", n_permutations: int = 200, antithetic: bool = True, seed: int = 0,
                    chunk_size: int | None = 16, players: Sequence[str] | None = None,
                    max_exact: int = 16) -> ShapleyResult:
    """Shapley values of input channels (MRI contrasts) or channel groups for a model's output, eq. (1).

    ``x`` (B, C, *spatial), 2D or 3D. ``value_fn``: see the module docstring (:func:`dice`,
    :func:`mean_foreground_probability`, a target, or a callable ``f(outputs)`` / ``f(outputs, rows)``
    returning ``(N,)``). ``groups``: None (each channel a player), a list of channels or channel lists, or
    a dict ``name -> channel(s)``; channels in no group are always present. ``players``: player names.
    ``baseline`` replaces absent channels: ``"zero"`` (default; the mean on z-scored input), ``"mean"``
    (each sample's channel mean), a number, ``C`` per-channel constants, or a tensor broadcastable to
    ``x``. ``method``: ``"exact"`` (all ``2^n`` coalitions, each evaluated once; at most ``max_exact``
    players), ``"permutation"`` (``n_permutations`` sampled orders, as antithetic pairs when
    ``antithetic``: an odd count is rounded up; deterministic given ``seed``), or ``"auto"`` (exact up
    to 10 players). ``chunk_size`` bounds the rows per forward pass. The model runs without gradients under
    its train/eval policy and is left as found. ``model``: an :class:`mx.Model <medexplain.models.model.Model>`
    (its sliding window, passes, output adapter, activation, eval policy; through a sliding window ``info``
    counts windows, ``n_evaluations`` still images) or an ``nn.Module``, wrapped in one
    (:func:`medexplain.models.model.as_model`). Value functions that leave the activation to the model
    (``activation=None``) read the model's (:func:`bind_model`).
    """
    model = as_model(model)
    x = check_input(x, **model_expectations(model))
    if is_sliding(model.runner):
        model.runner.reset()   # a Model keeps its sliding-window module: count this call's windows only
    value_fn = bind_model(value_fn, model)
    b, c = x.shape[:2]
    names, idx = _players(groups, players, c)
    n = len(idx)
    if n == 1:
        import warnings
        warnings.warn(ONE_PLAYER, stacklevel=2)
    if method == "auto":
        method = "exact" if n <= AUTO_EXACT_MAX else "permutation"
    if method not in ("exact", "permutation"):
        raise InputError(f"method must be 'exact', 'permutation' or 'auto', got {method!r}")
    if method == "exact" and n > max_exact:
        raise InputError(f"{n} players need 2^{n} coalitions; use method='permutation' or raise max_exact")
    if method == "permutation":
        if n > 62:
            raise InputError(f"permutation sampling supports at most 62 players, got {n}")
        if n_permutations < (2 if antithetic else 1):
            raise InputError("n_permutations must be >= 2 with antithetic pairs (>= 1 without)")
    if chunk_size is not None and chunk_size < 1:
        raise InputError("chunk_size must be >= 1 (or None for everything at once)")
    v_fn = _as_value_fn(value_fn, b)
    base = _baseline(baseline, x)
    member = torch.zeros((n, c), dtype=torch.bool, device=x.device)
    for i, g in enumerate(idx):
        member[i, list(g)] = True
    always = ~member.any(0)
    cost = Cost()
    bits = torch.arange(n, device=x.device)

    with model_guard(model), torch.no_grad():
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
    coalitions = {int(code): vals[:, j] for j, code in enumerate(codes.tolist())}
    info = window_info(model.runner, cost.info(baseline=baseline if isinstance(baseline, (str, int, float)) else "tensor",
                                        value_fn=getattr(value_fn, "name", getattr(value_fn, "__name__",
                                                                                   type(value_fn).__name__))))
    return ShapleyResult(values, names, idx, coalitions, method, cost.n_forward, stderr, m, info)


#: Why one player (one input channel, or one channel group) makes a contrast ranking meaningless.
ONE_PLAYER = ("one player (a single input channel or group): its Shapley value is just v(all) - v(none), its rank is "
              "1 for every model, so a ranking and its rank variance across folds (always 0) say nothing. To compare "
              "the folds, explain each fold's map (e.g. `medexplain explain --nnunet DIR --folds K` per fold) and "
              "measure their agreement with medexplain.shapley.fold_map_agreement")


def fold_map_agreement(maps: Sequence[torch.Tensor]) -> dict:
    """The agreement of several models' (the folds of a cross-validation) saliency maps of one case, where a
    contrast ranking is degenerate (one input channel, :data:`ONE_PLAYER`): the Spearman rank correlation of
    every pair of maps over the voxels (:func:`medexplain.metrics.randomisation.spearman`, ties averaged),
    ``{"pairs": [[i, j, rho], ...], "mean": ..., "min": ..., "n_models": F}``. ``maps``: F >= 2 maps of
    equal shape (any, e.g. ``Attribution.map[0]``)."""
    from .metrics.randomisation import spearman

    maps = [torch.as_tensor(m).detach().double().cpu() for m in maps]
    if len(maps) < 2:
        raise InputError(f"fold_map_agreement needs the maps of two or more models, got {len(maps)}")
    if len({tuple(m.shape) for m in maps}) != 1:
        raise InputError(f"fold_map_agreement: the maps differ in shape: {[tuple(m.shape) for m in maps]}")
    pairs = [[i, j, float(spearman(maps[i].reshape(1, -1), maps[j].reshape(1, -1))[0])]
             for i in range(len(maps)) for j in range(i + 1, len(maps))]
    rho = [p[2] for p in pairs]
    return {"pairs": pairs, "mean": float(sum(rho) / len(rho)), "min": float(min(rho)), "n_models": len(maps),
            "definition": "Spearman rank correlation of every pair of maps over the voxels"}


def fold_consensus(results: Sequence[ShapleyResult], reference_ranking=None, case: int = 0) -> dict:
    """The consensus of several models' contrast Shapley values on one case (the folds of a
    cross-validation, Ren et al. 2025, arXiv:2512.07224): ``{"ranking", "agreement", "uncertainty"}``.

    ``ranking``: the players, each model's ranking (largest value first), the mean value per player over
    the models and the consensus ranking (players by mean value, ties to the lower index), the method and
    each model's evaluation count. ``agreement`` (with ``reference_ranking``: indices, names or a region
    of :data:`medexplain.metrics.ranking.CLINICIAN_RANKINGS`; else None): each model's Kendall tau-b,
    Spearman rho, top-1 and Somers' d against it (:func:`medexplain.metrics.ranking.rank_agreement`) and
    their means. ``uncertainty`` (two or more models, else None): the rank variance of each contrast
    across the models (ddof=0) and its mean (:func:`medexplain.metrics.ranking.rank_uncertainty`).
    """
    from .metrics.ranking import rank_agreement, rank_uncertainty, resolve_ranking

    results = list(results)
    if not results:
        raise InputError("fold_consensus needs at least one ShapleyResult")
    names = list(results[0].players)
    if any(list(r.players) != names for r in results):
        raise InputError("fold_consensus: the results have different players")
    values = torch.stack([r.values[case] for r in results])                 # (models, players)
    mean = values.mean(0)
    ranking = {"players": names, "method": results[0].method,
               "per_model": [[names[j] for j in torch.argsort(-v, stable=True).tolist()] for v in values],
               "mean_values": {p: float(mean[j]) for j, p in enumerate(names)},
               "consensus": [names[j] for j in torch.argsort(-mean, stable=True).tolist()],
               "n_evaluations": [r.n_evaluations for r in results]}
    agreement = None
    if reference_ranking is not None:
        ref = resolve_ranking(reference_ranking, len(names), names)
        agr = rank_agreement(values, ref)
        agreement = {"reference": [names[j] for j in ref],
                     "per_model": [{k: float(v[m]) for k, v in agr.items()} for m in range(len(results))],
                     "mean": {k: float(torch.nanmean(v)) for k, v in agr.items()}}
    uncertainty = None
    if len(results) > 1:
        per_player = rank_uncertainty(values[:, None], per_player=True)[0]
        uncertainty = {"rank_variance": float(per_player.mean()), "n_models": len(results),
                       "per_contrast": {p: float(per_player[j]) for j, p in enumerate(names)},
                       "definition": "variance of each contrast's rank across the models (ddof=0), averaged"}
    return {"ranking": ranking, "agreement": agreement, "uncertainty": uncertainty}
