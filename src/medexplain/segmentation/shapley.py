"""Contrast-level Shapley values for segmentation (Ren et al. 2025, arXiv:2512.07224): the API.

The players are the input contrasts (channels, or groups of channels) of a multi-contrast MRI and the
value of a coalition is a score of the model run with only those contrasts present; the definition and
the estimators are stated in :mod:`medexplain.methods.shapley`.

The estimator is the registered channel attribution ``contrast_shapley`` (:mod:`medexplain.methods.shapley`:
exact enumeration of the ``2^n`` coalitions, or antithetic permutation sampling beyond ten players), whose
value function is a target: ``mx.explain(model, x, "contrast_shapley", target=dice("WT", seg))``.
:func:`channel_shapley` calls it and returns a :class:`ShapleyResult`; :func:`fold_consensus` combines the
results of several models (folds).

Value functions map a batch of model outputs ``(N, K, *spatial)`` and ``rows`` (``(N,)`` long: for each
output row, the index of the sample of ``x`` it belongs to, as :mod:`medexplain.engine.targets` does) to scores
``(N,)``. Provided as targets (:mod:`medexplain.engine.targets`): :func:`dice` (per label, label set, or BraTS
region ET/TC/WT against a reference label map per sample), :func:`volume` and
:func:`mean_foreground_probability`; any callable ``f(outputs)`` or ``f(outputs, rows)`` and any other
target also work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

import torch

from medexplain.engine.targets import Dice, MeanProbability, Prediction, ValueTarget, Volume
from medexplain.errors import InputError, TargetError
from medexplain.methods.shapley import AUTO_EXACT_MAX, contrast_shapley, shapley_weights

__all__ = ["AUTO_EXACT_MAX", "BRATS_REGIONS", "ONE_PLAYER", "ShapleyResult", "bind_model", "channel_shapley", "dice",
           "fold_map_agreement", "mean_foreground_probability", "shapley_result", "volume", "Dice",
           "MeanForegroundProbability", "Volume", "shapley_weights"]

#: BraTS label conventions up to 2021 (1 necrotic core, 2 oedema, 4 enhancing tumour). BraTS 2023+
#: (GLI) writes enhancing tumour as 3: pass ``regions={"ET": (3,), "TC": (1, 3), "WT": (1, 2, 3)}``.
BRATS_REGIONS: dict[str, tuple[int, ...]] = {"ET": (4,), "TC": (1, 4), "WT": (1, 2, 4), "NCR": (1,), "ED": (2,)}

#: The value target of :func:`mean_foreground_probability` (its former name).
MeanForegroundProbability = MeanProbability


# --------------------------------------------------------------------------------------------------
# value functions: targets of medexplain.engine.targets, built with the conventions of segmentation challenges
# --------------------------------------------------------------------------------------------------

def _labels(label_or_region, regions: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
    if isinstance(label_or_region, str):
        by_name = {k.upper(): v for k, v in regions.items()}
        if label_or_region.upper() not in by_name:
            raise TargetError(f"unknown region {label_or_region!r}; known: {', '.join(regions)} (or give labels)")
        labels = tuple(int(v) for v in by_name[label_or_region.upper()])
    else:
        labels = tuple(int(v) for v in torch.as_tensor(label_or_region).flatten().tolist())
    if not labels:
        raise TargetError("a value function of the prediction needs at least one label")
    return labels


def _prediction(labels, class_labels, activation, channel, threshold, soft) -> Prediction:
    return Prediction(labels, None if class_labels is None else tuple(int(c) for c in class_labels), activation,
                      channel, float(threshold), bool(soft))


def _check_activation(activation: str | None, channel, what: str) -> None:
    if activation not in (None, "auto", "softmax", "sigmoid", "none"):
        raise TargetError(f"activation must be None (the model's), 'auto', 'softmax', 'sigmoid' or 'none', "
                          f"got {activation!r}")
    if (activation == "softmax" and channel is not None) or (activation == "sigmoid" and channel is None):
        raise TargetError(f"{what}: give channel= (the output channel of this region) with activation='sigmoid' (or "
                          "'none' for probability channels), and not with 'softmax' (there the labels come from "
                          "class_labels)")


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
    ``2 |P and G| / (|P| + |G|)`` (:func:`medexplain.engine.ops.dice`); ``empty`` (default 1) when both are
    empty, the BraTS convention. ``activation`` is the model's output activation (``docs/design.md``);
    ``None`` (default): the model's own (``mx.Model(activation=)``, bound by :func:`channel_shapley`).
    """
    labels = _labels(label_or_region, regions)
    ref = torch.as_tensor(reference_seg)
    if torch.is_floating_point(ref):
        if not torch.equal(ref, ref.round()):
            raise TargetError("the Dice reference must be an integer label map")
        ref = ref.long()
    _check_activation(activation, channel, "dice")
    name = f"dice_{label_or_region}" if isinstance(label_or_region, str) else "dice_" + "+".join(map(str, labels))
    return Dice(_prediction(labels, class_labels, activation, channel, threshold, soft), ref, float(empty), name)


def volume(label_or_region: Union[int, str, Sequence[int]], *, class_labels: Sequence[int] | None = None,
           activation: str | None = None, channel: int | None = None, threshold: float = 0.5, soft: bool = False,
           voxel_volume: float = 1.0, regions: Mapping[str, Sequence[int]] = BRATS_REGIONS) -> Volume:
    """Value function: the predicted volume of a label, label set or region (read as in :func:`dice`): the
    voxel count times ``voxel_volume`` (e.g. mm^3 per voxel); ``soft=True`` sums the probabilities.
    ``activation`` ``None`` (default): the model's own (``mx.Model(activation=)``, :func:`bind_model`)."""
    labels = _labels(label_or_region, regions)
    _check_activation(activation, channel, "volume")
    name = f"volume_{label_or_region}" if isinstance(label_or_region, str) else "volume_" + "+".join(map(str, labels))
    return Volume(_prediction(labels, class_labels, activation, channel, threshold, soft), float(voxel_volume), name)


def mean_foreground_probability(channel: int = 1, activation: str | None = None, mask=None) -> MeanProbability:
    """Value function: mean probability of output ``channel`` over all voxels, or inside ``mask``
    (bool ``(B, *spatial)``, row ``r`` uses ``mask[rows[r]]``). ``activation``: ``None`` (default) the model's
    own output activation (``mx.Model(activation=)``, ``auto``: softmax over several channels of logits,
    sigmoid for one, none for probabilities; bound by :func:`channel_shapley`), or ``"softmax"`` over the
    channels, ``"sigmoid"`` of that channel, ``"none"`` (outputs already probabilities)."""
    if activation not in (None, "auto", "softmax", "sigmoid", "none"):
        raise TargetError(f"activation must be None (the model's), 'auto', 'softmax', 'sigmoid' or 'none', "
                          f"got {activation!r}")
    return MeanProbability(int(channel), activation, mask, f"mean_probability_{channel}")


def bind_model(value_fn, model):
    """``value_fn`` with the model's output activation where it leaves it to the model (``activation=None``):
    a value target (:class:`~medexplain.engine.targets.ValueTarget`) then reads probabilities as the model object
    does (``mx.Model(activation=)``; a bare module is wrapped, :func:`medexplain.models.model.as_model`).
    :func:`medexplain.engine.explain` (so :func:`channel_shapley`) binds every value target this way; anything else
    is returned as given."""
    if isinstance(value_fn, ValueTarget):
        from medexplain.models.model import as_model
        return value_fn.bind(as_model(model))
    return value_fn


# --------------------------------------------------------------------------------------------------
# the result
# --------------------------------------------------------------------------------------------------

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


def channel_shapley(model, x: torch.Tensor, value_fn, groups=None, baseline="zero",
                    method: str = "auto", n_permutations: int = 200, antithetic: bool = True, seed: int = 0,
                    chunk_size: int | None = 16, players: Sequence[str] | None = None,
                    max_exact: int = 16) -> ShapleyResult:
    """Shapley values of input channels (MRI contrasts) or channel groups for a model's output, eq. (1).

    The registered method ``contrast_shapley`` (:mod:`medexplain.methods.shapley`) run by
    :func:`medexplain.engine.explain` with ``value_fn`` as the target, read into a :class:`ShapleyResult`.
    ``x`` (B, C, *spatial), 2D or 3D. ``value_fn``: see the module docstring (:func:`dice`,
    :func:`volume`, :func:`mean_foreground_probability`, a target, or a callable ``f(outputs)`` /
    ``f(outputs, rows)`` returning ``(N,)``). ``groups``: None (each channel a player), a list of channels
    or channel lists, or a dict ``name -> channel(s)``; channels in no group are always present.
    ``players``: player names. ``baseline`` replaces absent channels: ``"zero"`` (default; the mean on
    z-scored input), ``"mean"`` (each sample's channel mean), a number, ``C`` per-channel constants, or a
    tensor broadcastable to ``x``. ``method``: the estimator, ``"exact"`` (all ``2^n`` coalitions, each
    evaluated once; at most ``max_exact`` players), ``"permutation"`` (``n_permutations`` sampled orders,
    as antithetic pairs when ``antithetic``: an odd count is rounded up; deterministic given ``seed``), or
    ``"auto"`` (exact up to 10 players). ``chunk_size`` bounds the rows per forward pass. The model runs
    without gradients under its train/eval policy and is left as found. ``model``: an :class:`mx.Model
    <medexplain.models.model.Model>` (its sliding window, passes, output adapter, activation, eval policy;
    through a sliding window ``info`` counts windows, ``n_evaluations`` still images) or an ``nn.Module``,
    wrapped in one (:func:`medexplain.models.model.as_model`). Value functions that leave the activation to
    the model (``activation=None``) read the model's (:func:`bind_model`).
    """
    import warnings

    from medexplain.engine.explain import explain

    attr = explain(model, x, contrast_shapley, target=value_fn, groups=groups, baseline=baseline,
                   estimator=method, n_permutations=n_permutations, antithetic=antithetic, seed=seed,
                   chunk_size=chunk_size, players=players, max_exact=max_exact)
    if len(attr.info["players"]) == 1:
        warnings.warn(ONE_PLAYER, stacklevel=2)
    return shapley_result(attr)


def shapley_result(attr) -> ShapleyResult:
    """The :class:`ShapleyResult` of an :class:`~medexplain.Attribution` of the registered ``contrast_shapley``
    (its ``info``: values, players, groups, coalition table, estimator, standard error): what
    :func:`channel_shapley` returns, and what the ``shapley`` pipeline reads from each fold's case."""
    i = attr.info
    as64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    info = {k: v for k, v in i.items() if k not in ("values", "players", "groups", "coalitions", "stderr")}
    return ShapleyResult(as64(i["values"]), list(i["players"]), [tuple(g) for g in i["groups"]],
                         {int(k): as64(v) for k, v in i["coalitions"].items()}, i["estimator"], i["n_evaluations"],
                         None if i["stderr"] is None else as64(i["stderr"]), i["n_permutations"], info)


#: Why one player (one input channel, or one channel group) makes a contrast ranking meaningless.
ONE_PLAYER = ("one player (a single input channel or group): its Shapley value is just v(all) - v(none), its rank is "
              "1 for every model, so a ranking and its rank variance across folds (always 0) say nothing. To compare "
              "the folds, explain each fold's map (e.g. `medexplain explain --nnunet DIR --folds K` per fold) and "
              "measure their agreement with medexplain.segmentation.shapley.fold_map_agreement")


def fold_map_agreement(maps: Sequence[torch.Tensor]) -> dict:
    """The agreement of several models' (the folds of a cross-validation) saliency maps of one case, where a
    contrast ranking is degenerate (one input channel, :data:`ONE_PLAYER`): the Spearman rank correlation of
    every pair of maps over the voxels (:func:`medexplain.metrics.randomisation.spearman`, ties averaged),
    ``{"pairs": [[i, j, rho], ...], "mean": ..., "min": ..., "n_models": F}``. ``maps``: F >= 2 maps of
    equal shape (any, e.g. ``Attribution.map[0]``)."""
    from medexplain.metrics.randomisation import spearman

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
    from medexplain.metrics.ranking import rank_agreement, rank_uncertainty, resolve_ranking

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
