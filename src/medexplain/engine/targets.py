"""Targets: which scalar per sample is explained.

A target maps a model output ``(N, K, *spatial_or_nothing)`` to scores ``(N,)``. Methods that expand
the batch (noise samples, IG steps, occlusion windows) pass ``rows``: for each output row, the index of
the original sample it belongs to, so per-sample targets follow their sample through any expansion.
``batch`` is the number of original samples. ``docs/design.md`` ("The target contract") states the
contract; logits are explained, not probabilities.

Gradient targets: :class:`Class`, :class:`MultiLabel`, :class:`Region` (a segmenter's logits over a
region), :class:`Regions` (several regions, one score each: one map per region, e.g. per lesion
instance), :class:`Function`. Value targets, scores of the prediction a channel attribution (contrast
Shapley) reads: :class:`Dice`, :class:`Volume`, :class:`MeanProbability`; hard ones are not
differentiable (``differentiable = False``) and gradient methods refuse them.
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from medexplain.engine.ops import detect_activation, probabilities, resolve_activation
from medexplain.engine.ops import dice as dice_score
from medexplain.errors import EmptyRegionError, TargetError


class Target:
    """Base class. Subclasses implement :meth:`resolve` (per-sample tensors) and :meth:`reduce`.
    ``differentiable``: whether a gradient of the score means anything (False for hard predictions)."""

    differentiable = True

    def scores(self, output: torch.Tensor, rows: torch.Tensor | None = None, batch: int | None = None) -> torch.Tensor:
        if batch is None:
            batch = output.shape[0] if rows is None else int(rows.max()) + 1
        if output.ndim < 2:
            raise TargetError(f"model output must be (B, K, ...); got shape {tuple(output.shape)}")
        per_sample = self.resolve(output, batch)
        if rows is not None:
            per_sample = [p[rows.to(p.device)] for p in per_sample]
        return self.reduce(output, *per_sample)

    def validate(self, output: torch.Tensor, batch: int) -> None:
        """Raise a :class:`TargetError` now if this target does not fit ``output``."""
        if output.ndim < 2:
            raise TargetError(f"model output must be (B, K, ...); got shape {tuple(output.shape)}")
        self.resolve(output, batch)

    def resolve(self, output: torch.Tensor, batch: int) -> list[torch.Tensor]:
        raise NotImplementedError

    def reduce(self, output: torch.Tensor, *per_sample: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def class_index(self, batch: int) -> torch.Tensor | None:
        """Per-sample class channel when the target has one."""
        return None


def _per_sample(index, batch: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(index, dtype=torch.long).flatten()
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise TargetError(f"{what}: got {t.numel()} indices for a batch of {batch}; give one, or one per sample")
    return t


def _check_range(idx: torch.Tensor, k: int) -> None:
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= k):
        raise TargetError(f"target class {sorted(set(idx.tolist()))} out of range for a model with {k} outputs (0..{k - 1})")


def _on_grid(m: torch.Tensor, spatial: tuple[int, ...], what: str) -> torch.Tensor:
    """A per-sample map ``(B or 1, *spatial)`` from ``(B or 1, *spatial)``, ``(B or 1, 1, *spatial)`` or
    ``(*spatial)``, checked against the output grid ``spatial``."""
    if m.ndim == len(spatial) + 2 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim == len(spatial):
        m = m.unsqueeze(0)
    if tuple(m.shape[1:]) != spatial:
        raise TargetError(f"{what} has spatial shape {tuple(m.shape[1:])}; it does not match the model output's "
                          f"{spatial}")
    return m


def _pick(output: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    return output[torch.arange(output.shape[0], device=output.device), channel.to(output.device)]


@dataclass
class Class(Target):
    """Class index (int or one per sample). On a dense (segmentation) output: the channel's sum of logits."""

    index: Union[int, Sequence[int], torch.Tensor]

    def class_index(self, batch):
        return _per_sample(self.index, batch, "Class target")

    def resolve(self, output, batch):
        idx = self.class_index(batch)
        _check_range(idx, output.shape[1])
        return [idx]

    def reduce(self, output, idx):
        z = _pick(output, idx)
        return z.flatten(1).sum(1) if z.ndim > 1 else z


@dataclass
class MultiLabel(Target):
    """A set of classes (shared, or one set per sample); the score is the sum of their logits."""

    indices: Union[Sequence[int], Sequence[Sequence[int]]]

    def resolve(self, output, batch):
        ind, k = list(self.indices), output.shape[1]
        nested = bool(ind) and not isinstance(ind[0], int)
        sets = ind if nested else [ind] * batch
        if len(sets) != batch:
            raise TargetError(f"MultiLabel: got {len(sets)} label sets for a batch of {batch}")
        m = torch.zeros(batch, k, dtype=output.dtype, device=output.device)
        for b, s in enumerate(sets):
            s = [int(i) for i in s]
            if not s:
                raise TargetError(f"MultiLabel: sample {b} has an empty label set")
            _check_range(torch.tensor(s), k)
            m[b, s] = 1.0
        return [m]

    def reduce(self, output, m):
        z = output.flatten(2).sum(2) if output.ndim > 2 else output
        return (z * m).sum(1)


@dataclass
class Region(Target):
    """Segmentation target: class channel + boolean region, reduced by ``sum`` (default) or ``mean`` of logits.

    ``mask`` is bool ``(B, *spatial)`` or ``(B, 1, *spatial)`` on the output grid (``B`` may be 1 to share
    one region across the batch). ``channel`` is an int or one per sample.
    """

    channel: Union[int, Sequence[int], torch.Tensor]
    mask: torch.Tensor
    reduce_: str = "sum"

    def __init__(self, channel, mask, reduce: str = "sum"):
        if reduce not in ("sum", "mean"):
            raise TargetError(f"Region reduce must be 'sum' or 'mean', got {reduce!r}")
        m = torch.as_tensor(mask)
        if m.dtype != torch.bool:
            if not torch.all((m == 0) | (m == 1)):
                raise TargetError("Region mask must be boolean (or 0/1)")
            m = m.bool()
        self.channel, self.mask, self.reduce_ = channel, m, reduce

    def class_index(self, batch):
        return _per_sample(self.channel, batch, "Region channel")

    def resolve(self, output, batch):
        if output.ndim < 3:
            raise TargetError(f"Region targets need a dense output (B, K, *spatial); got {tuple(output.shape)}")
        ch = self.class_index(batch)
        _check_range(ch, output.shape[1])
        spatial = tuple(output.shape[2:])
        m = _on_grid(self.mask, spatial, "Region mask")
        if m.shape[0] == 1:
            m = m.expand(batch, *spatial)
        if m.shape[0] != batch:
            raise TargetError(f"Region mask has {m.shape[0]} samples for a batch of {batch}")
        empty = (~m.flatten(1).any(1)).nonzero().flatten().tolist()
        if empty:
            raise EmptyRegionError(f"Region mask is empty for sample(s) {empty}: nothing to explain there")
        return [ch, m.to(output.device)]

    def reduce(self, output, ch, m):
        s = (_pick(output, ch) * m).flatten(1).sum(1)
        return s / m.flatten(1).sum(1) if self.reduce_ == "mean" else s


class Regions(Target):
    """Several regions, one score each: region ``r`` is ``Region(channel, masks[r], reduce)`` of image
    ``samples[r]`` (e.g. the lesion instances of a segmentation, Spagnolo et al.). ``masks`` is bool
    ``(R, *spatial)`` on the output grid, ``samples`` ``(R,)`` (default: every region of image 0),
    ``channel`` an int or one per region.

    :func:`medexplain.engine.explain` gives one map per region, ``(R, C_or_1, *spatial)``: a method declared
    ``regions=True`` (instance SmoothGrad) takes the target as is and shares the forward passes of an
    image among its regions; any other method runs on each region's image (:meth:`per_region`), so
    Grad-CAM++ over ``Regions`` is the instance Grad-CAM++ of the paper. On the rows of
    :meth:`per_region` the scores are those of the :class:`Region` of each row.
    """

    def __init__(self, channel, masks, samples=None, reduce: str = "sum"):
        m = torch.as_tensor(masks)
        if m.dtype != torch.bool:
            if not torch.all((m == 0) | (m == 1)):
                raise TargetError("Regions masks must be boolean (or 0/1)")
            m = m.bool()
        if m.ndim < 2:
            raise TargetError(f"Regions masks must be (R, *spatial), got shape {tuple(m.shape)}")
        s = torch.zeros(m.shape[0], dtype=torch.long) if samples is None else torch.as_tensor(samples).long().flatten()
        if s.numel() != m.shape[0]:
            raise TargetError(f"Regions: {s.numel()} sample indices for {m.shape[0]} regions")
        empty = (~m.flatten(1).any(1)).nonzero().flatten().tolist()
        if empty:
            raise EmptyRegionError(f"region(s) {empty} are empty: nothing to explain there")
        self.channel, self.masks, self.samples, self.region = channel, m, s, Region(channel, m, reduce)

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def per_region(self, x: torch.Tensor) -> tuple[torch.Tensor, "Region"]:
        """``(x[samples], Region(channel, masks))``: one row per region, each with its own region target."""
        if len(self) and not 0 <= int(self.samples.min()) <= int(self.samples.max()) < x.shape[0]:
            raise TargetError(f"Regions refer to image(s) {sorted(set(self.samples.tolist()))}; the input has "
                              f"{x.shape[0]} image(s)")
        return x[self.samples.to(x.device)], self.region

    def class_index(self, batch):
        return self.region.class_index(batch)

    def resolve(self, output, batch):
        return self.region.resolve(output, batch)

    def reduce(self, output, *per_sample):
        return self.region.reduce(output, *per_sample)


class Function(Target):
    """A user function ``f(output) -> (N,)``; with per-row data, ``f(output, rows)`` (``rows``: for each
    output row the sample it belongs to). ``takes_rows=None`` reads it from the signature (two positional
    parameters, or ``*args``)."""

    def __init__(self, fn, takes_rows: bool | None = None):
        self.fn, self.takes_rows = fn, _takes_rows(fn) if takes_rows is None else takes_rows
        self.name = getattr(fn, "name", getattr(fn, "__name__", type(fn).__name__))

    def scores(self, output, rows=None, batch=None):
        if self.takes_rows and rows is None:
            rows = torch.arange(output.shape[0], device=output.device)
        s = self.fn(output, rows) if self.takes_rows else self.fn(output)
        if not isinstance(s, torch.Tensor) or s.shape != (output.shape[0],):
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise TargetError(f"target function must return a tensor of shape ({output.shape[0]},) for "
                              f"{output.shape[0]} output rows, got {got}")
        return s

    def validate(self, output, batch):
        pass


def _takes_rows(fn) -> bool:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return len(params) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)


# --------------------------------------------------------------------------------------------------
# value targets: scores of the prediction (Dice, volume, mean probability), e.g. for contrast Shapley
# --------------------------------------------------------------------------------------------------

class ValueTarget(Target):
    """A score of the model's prediction per output row, ``scores(outputs (N, K, *spatial), rows) -> (N,)``
    in float64; also callable as ``v(outputs, rows)`` (the value-function protocol of
    :func:`medexplain.segmentation.shapley.channel_shapley`). ``name`` names it in records."""

    name = "value"

    def __call__(self, outputs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.scores(outputs, rows)

    def scores(self, output, rows=None, batch=None):
        rows = torch.arange(output.shape[0], device=output.device) if rows is None else rows
        return self.value(output, rows)

    def value(self, outputs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def bind(self, model) -> "ValueTarget":
        """This target with ``model``'s output activation where it leaves it to the model
        (``activation=None``); :func:`medexplain.engine.explain` binds every value target to the model it explains."""
        return self

    def validate(self, output, batch):
        self.value(output, torch.arange(output.shape[0], device=output.device) % max(1, batch))


def _check_dense(outputs: torch.Tensor, what: str) -> None:
    if outputs.ndim < 3:
        raise TargetError(f"{what} needs a dense model output (N, K, *spatial); got {tuple(outputs.shape)}")


def _per_sample_maps(ref: torch.Tensor, rows: torch.Tensor, spatial: tuple[int, ...], what: str) -> torch.Tensor:
    ref = _on_grid(ref, spatial, what)
    if ref.shape[0] == 1:
        return ref.expand(rows.shape[0], *spatial)
    if int(rows.max()) >= ref.shape[0]:
        raise TargetError(f"{what} has {ref.shape[0]} samples; rows refer to sample {int(rows.max())}")
    return ref[rows.to(ref.device)]


@dataclass
class Prediction:
    """The model's prediction of a label set, ``(N, *spatial)``: hard (bool) or ``soft`` (float64
    probabilities). Without ``channel`` (``activation="softmax"``, or ``"none"`` for class probabilities):
    the label map ``class_labels[argmax_k z_k]`` falls in ``labels`` (soft: the summed probabilities of those
    channels); with ``channel`` (``"sigmoid"`` or ``"none"``): ``p_channel > threshold`` (soft: ``p_channel``).
    ``activation=None``: the model's own output activation once bound to a model (:meth:`bind`,
    ``mx.Model(activation=)``), else ``auto`` (:func:`medexplain.engine.ops.resolve_activation`)."""

    labels: tuple[int, ...]
    class_labels: tuple[int, ...] | None = None
    activation: str | None = None
    channel: int | None = None
    threshold: float = 0.5
    soft: bool = False
    model: object = field(default=None, repr=False, compare=False)

    def bind(self, model) -> "Prediction":
        """This prediction read with ``model``'s output activation where it leaves it to the model."""
        if self.activation is not None:
            return self
        return replace(self, activation=getattr(model, "activation", None) or "auto", model=model)

    def _probabilities(self, outputs: torch.Tensor, channel: int | None = None) -> torch.Tensor:
        return probabilities(outputs.double(), self.activation or "auto", channel, model=self.model)

    def __call__(self, outputs: torch.Tensor) -> torch.Tensor:
        if self.channel is not None:  # one sigmoid (or probability) channel per region
            p = self._probabilities(outputs, self.channel)
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
            shape = (1, k, *[1] * (outputs.ndim - 2))
            return (self._probabilities(outputs) * in_region.view(shape)).sum(1)
        return in_region[outputs.argmax(1)]


@dataclass
class _OfPrediction(ValueTarget):
    """A value of the model's :class:`Prediction`; differentiable when the prediction is soft."""

    prediction: Prediction

    @property
    def differentiable(self) -> bool:
        return self.prediction.soft

    def bind(self, model):
        return replace(self, prediction=self.prediction.bind(model))


@dataclass
class Dice(_OfPrediction):
    """Dice of the predicted region (:class:`Prediction`) against a reference label map, per row:
    ``2 |P and G| / (|P| + |G|)`` (:func:`medexplain.engine.ops.dice`; soft: ``2 sum(p g) / (sum p + sum g)``),
    ``empty`` when both are empty (the BraTS convention). Row ``r`` is compared with
    ``reference[rows[r]]`` (one map, ``B = 1``, is shared). Built by :func:`medexplain.segmentation.shapley.dice`."""

    reference: torch.Tensor
    empty: float = 1.0
    name: str = "dice"

    def value(self, outputs, rows):
        _check_dense(outputs, "Dice")
        ref = _per_sample_maps(self.reference, rows, tuple(outputs.shape[2:]), "the Dice reference")
        truth = torch.isin(ref.to(outputs.device), torch.tensor(self.prediction.labels, device=outputs.device))
        return dice_score(self.prediction(outputs), truth, empty=self.empty)


@dataclass
class Volume(_OfPrediction):
    """The predicted volume of a label set (:class:`Prediction`), per row: the voxel count times
    ``voxel_volume`` (soft: the summed probabilities), in float64. Built by :func:`medexplain.segmentation.shapley.volume`."""

    voxel_volume: float = 1.0
    name: str = "volume"

    def value(self, outputs, rows):
        _check_dense(outputs, "Volume")
        return self.prediction(outputs).double().flatten(1).sum(1) * float(self.voxel_volume)


@dataclass
class MeanProbability(ValueTarget):
    """Mean probability of output ``channel`` over the volume, or inside a per-sample ``mask`` (row ``r``
    uses ``mask[rows[r]]``), in float64; ``activation`` as :func:`medexplain.engine.ops.probabilities`; ``None``:
    the model's own once bound to a model (:meth:`bind`), else ``auto``."""

    channel: int = 1
    activation: str | None = None
    mask: torch.Tensor | None = None
    name: str = "mean_probability"
    model: object = field(default=None, repr=False, compare=False)

    def bind(self, model) -> "MeanProbability":
        if self.activation is not None:
            return self
        return replace(self, activation=getattr(model, "activation", None) or "auto", model=model)

    def value(self, outputs, rows):
        _check_dense(outputs, "mean_foreground_probability")
        p = probabilities(outputs.double(), self.activation or "auto", self.channel, model=self.model).flatten(1)
        if self.mask is None:
            return p.mean(1)
        m = _per_sample_maps(torch.as_tensor(self.mask).bool(), rows, tuple(outputs.shape[2:]), "the mask")
        m = m.to(outputs.device).flatten(1).double()
        if (m.sum(1) == 0).any():
            raise TargetError("mean_foreground_probability: the mask is empty for some sample")
        return (p * m).sum(1) / m.sum(1)


def as_target(target) -> Target:
    """Normalise what users pass (int, list of ints, Target, callable) into a :class:`Target`."""
    if isinstance(target, Target):
        return target
    if target is None:
        raise TargetError("a target is required: a class index, one per sample, or mx.targets.Region(...)")
    if isinstance(target, bool) or isinstance(target, float):
        raise TargetError(f"target must be an int, a list of ints, or a target object, not {target!r}")
    if isinstance(target, (int, list, tuple)) or (isinstance(target, torch.Tensor) and not torch.is_floating_point(target)):
        return Class(target)
    if callable(target):
        return Function(target)
    raise TargetError(f"cannot interpret target {target!r}")


def target_probability(output: torch.Tensor, target: Target, rows: torch.Tensor | None = None,
                       batch: int | None = None):
    """Log-probability, probability and correctness of ``target`` in ``output``, per row.

    Defined for the targets that have a class:

    - :class:`~medexplain.engine.targets.Class` on a classifier output ``(N, K)``: ``log softmax(z)[y]``
      (``log sigmoid(z)`` for a single-logit model); correct when ``argmax z == y`` (``z > 0``).
    - :class:`~medexplain.engine.targets.Region` on a segmentation output ``(N, K, *spatial)``: the voxel-wise
      cross-entropy analogue, i.e. the **mean over the region's voxels** of ``log softmax_k(z)[c]``
      (``log sigmoid`` when K = 1); probability = mean voxel probability of channel ``c`` in the region;
      correct when more than half of the region's voxels are predicted as ``c``.

    Returns ``(log_p, p, correct)`` as ``(N,)`` tensors, or ``None`` for targets without a class
    (MultiLabel, Function, Class on a dense output): callers then fall back to the raw target score.
    ``rows``/``batch`` follow :meth:`medexplain.engine.targets.Target.scores` (row -> original sample).
    """
    if batch is None:
        batch = output.shape[0] if rows is None else int(rows.max()) + 1
    if isinstance(target, Class) and output.ndim == 2:
        (idx,) = target.resolve(output, batch)
        idx = (idx if rows is None else idx[rows]).to(output.device)
        ar = torch.arange(output.shape[0], device=output.device)
        if output.shape[1] == 1:
            z = output[:, 0]
            return F.logsigmoid(z), torch.sigmoid(z), (z > 0).to(output.dtype)
        logp = output.log_softmax(1)
        return logp[ar, idx], logp[ar, idx].exp(), (output.argmax(1) == idx).to(output.dtype)
    if isinstance(target, Region) and output.ndim > 2:
        ch, m = target.resolve(output, batch)
        if rows is not None:
            ch, m = ch[rows], m[rows]
        ch, m = ch.to(output.device), m.to(output.dtype)
        ar = torch.arange(output.shape[0], device=output.device)
        if output.shape[1] == 1:
            logp_c = F.logsigmoid(output[:, 0])
            pred_c = output[:, 0] > 0
        else:
            logp_c = output.log_softmax(1)[ar, ch]
            pred_c = output.argmax(1) == ch.view(-1, *[1] * (output.ndim - 2))
        n = m.flatten(1).sum(1)
        log_p = (logp_c * m).flatten(1).sum(1) / n
        p = (logp_c.exp() * m).flatten(1).sum(1) / n
        frac = (pred_c.to(output.dtype) * m).flatten(1).sum(1) / n
        return log_p, p, (frac > 0.5).to(output.dtype)
    return None


# --------------------------------------------------------------------------------------------------
# the one target grammar of the commands: --target class|predicted, --region predicted|all|<mask>
# --------------------------------------------------------------------------------------------------
#: A region with fewer voxels than this is explained with a warning (a few voxels rarely mean a finding).
SMALL_REGION = 10

REGION_WORDS = ("predicted", "all")


def parse_target(value) -> int | None:
    """``--target``: ``predicted`` (or ``None``) for the default, else a class index ``>= 0``."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("predicted", "")):
        return None
    if isinstance(value, bool):
        raise TargetError(f"target must be a class index or 'predicted', got {value!r}")
    try:
        k = int(value) if not isinstance(value, float) or float(value).is_integer() else None
    except (TypeError, ValueError):
        k = None
    if k is None or k < 0:
        raise TargetError(f"--target must be a class index (0, 1, ...) or 'predicted', got {value!r}")
    return k


@dataclass
class ResolvedTarget:
    """A target chosen by :func:`resolve_target`: what is explained and how it was chosen.

    ``target`` is what ``mx.explain`` gets (:class:`Class` or :class:`Region`); ``classes`` the class
    per sample; ``region`` ``None`` (a classifier), ``"predicted"``, ``"all"`` or the mask's name;
    ``voxels`` the region's voxel count per sample; ``how`` one sentence; ``activation`` the output
    activation the prediction was read with (``softmax``, ``sigmoid`` or ``none``)."""

    target: Target
    classes: list[int]
    region: str | None
    voxels: list[int] | None
    how: str
    activation: str

    @property
    def class_index(self) -> int:
        return self.classes[0]

    def info(self, sample: int = 0) -> dict:
        """The record of sample ``sample`` for ``info.json``: class, region, voxel count, how chosen."""
        return {"class": self.classes[sample], "region": self.region,
                "region_voxels": None if self.voxels is None else self.voxels[sample],
                "how": self.how, "activation": self.activation}


def _exclusive(out: torch.Tensor, activation: str) -> bool:
    """Whether the channels are mutually exclusive classes (argmax) rather than independent labels."""
    if out.shape[1] == 1:
        return False
    if activation == "softmax":
        return True
    if activation == "none":
        return bool(torch.allclose(out.detach().sum(1).double(), torch.ones((), dtype=torch.float64, device=out.device),
                                   atol=1e-3))
    return False


def predicted_masks(out: torch.Tensor, activation: str, threshold: float = 0.5) -> torch.Tensor:
    """The model's own prediction per channel, bool ``(B, K, *spatial)``: ``argmax == k`` for mutually
    exclusive classes (softmax, or probabilities that sum to 1), ``probability > threshold`` for
    independent (sigmoid) channels. ``activation`` is a resolved one (``softmax|sigmoid|none``)."""
    if _exclusive(out, activation):
        return F.one_hot(out.argmax(1), out.shape[1]).movedim(-1, 1).bool()
    return probabilities(out, activation) > threshold


def resolve_target(out: torch.Tensor, target=None, region=None, *, activation: str = "auto", model=None,
                   threshold: float = 0.5, region_name: str | None = None) -> ResolvedTarget:
    """The target of the commands' one grammar, resolved on the model output ``out`` (``(B, K)`` or
    ``(B, K, *spatial)``).

    ``target``: a class index, or ``None``/``"predicted"``: for a classifier the top class; for a
    segmenter the **foreground class with the most predicted voxels** (never the background, channel 0
    of mutually exclusive classes, unless asked for by index). ``region`` (segmenters only):
    ``"predicted"`` (default: the model's own predicted region of that class, :func:`predicted_masks`),
    ``"all"`` (the class logits summed over the image, :class:`Class`), or a bool mask ``(B or 1,
    *spatial)`` on the output grid (``region_name`` names it in the record). ``activation``
    (``auto|softmax|sigmoid|none``) says how the prediction is read (:func:`medexplain.engine.ops.resolve_activation`).
    Warns when a region has fewer than :data:`SMALL_REGION` voxels; an empty one is an
    :class:`~medexplain.errors.EmptyRegionError`.
    """
    if not isinstance(out, torch.Tensor) or out.ndim < 2:
        raise TargetError(f"model output must be (B, K, ...); got {getattr(out, 'shape', type(out).__name__)}")
    k_out, b = out.shape[1], out.shape[0]
    act = resolve_activation(out, activation, model)
    how_act = f"activation {act}: " + (detect_activation(out, model)[1] if activation == "auto" else "as given")
    k = parse_target(target)
    if out.ndim == 2:                                                    # a classifier
        if region is not None and not (isinstance(region, str) and region == "all"):
            raise TargetError(f"--region is for segmentation outputs (B, K, *spatial); this model returns "
                              f"{tuple(out.shape)} (a classifier): give --target only")
        if k is None:
            classes = out.argmax(1).tolist() if k_out > 1 else [0] * b
            how = "default: the top class (argmax of the outputs)" if k_out > 1 else "default: the single output"
        else:
            _check_range(torch.tensor([k]), k_out)
            classes, how = [k] * b, "given"
        how = f"{how}; {how_act}"
        return ResolvedTarget(Class(classes if b > 1 else classes[0]), classes, None, None, how, act)

    spatial = tuple(out.shape[2:])
    exclusive = _exclusive(out, act)
    pred = predicted_masks(out, act, threshold)                          # (B, K, *s)
    counts = pred.flatten(2).sum(2)                                      # (B, K)
    if k is None:
        fg = list(range(1, k_out)) if exclusive else list(range(k_out))
        if not fg:
            raise TargetError("the model has one output channel of mutually exclusive classes; give --target")
        best = counts[:, fg].argmax(1)
        classes = [fg[int(i)] for i in best]
        empty = [i for i in range(b) if int(counts[i, classes[i]]) == 0]
        if empty:
            what = "foreground voxel (every voxel is class 0)" if exclusive else f"voxel above {threshold}"
            raise EmptyRegionError(f"the model predicts no {what} for sample(s) {empty}: give --target K "
                                   "(with --region all to explain class K over the whole image, or a mask file)")
        per = ", ".join(f"{c}: {int(n)}" for c, n in enumerate(counts[0].tolist()))
        rule = "argmax over the channels" if exclusive else f"probability > {threshold}"
        how = f"default: the foreground class with the most predicted voxels ({rule}; voxels per class {{{per}}})"
    else:
        _check_range(torch.tensor([k]), k_out)
        classes, how = [k] * b, "given"
    how = f"{how}; {how_act}"
    region = "predicted" if region is None else region
    if isinstance(region, str) and region == "all":
        return ResolvedTarget(Class(classes if b > 1 else classes[0]), classes, "all",
                              [math.prod(spatial)] * b, how, act)
    if isinstance(region, str) and region == "predicted":
        mask = pred[torch.arange(b, device=pred.device), torch.tensor(classes, device=pred.device)]   # (B, *s)
        name = "predicted"
    elif isinstance(region, str):
        raise TargetError(f"region must be 'predicted', 'all' or a mask, got {region!r}")
    else:
        mask = torch.as_tensor(region)
        if mask.ndim == len(spatial) + 2 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.ndim == len(spatial):
            mask = mask[None]
        if tuple(mask.shape[1:]) != spatial:
            raise TargetError(f"the region mask has spatial shape {tuple(mask.shape[1:])}; the model output has "
                              f"{spatial}")
        mask = (mask > 0.5 if mask.is_floating_point() else mask.bool()).expand(b, *spatial)
        name = region_name or "mask"
    voxels = mask.flatten(1).sum(1).tolist()
    empty = [i for i, n in enumerate(voxels) if n == 0]
    if empty:
        raise EmptyRegionError(f"the {name} region of class {classes[empty[0]]} is empty for sample(s) {empty}"
                               + (": the model predicts no voxel of that class; use --region all or a mask file"
                                  if name == "predicted" else ""))
    small = [i for i, n in enumerate(voxels) if n < SMALL_REGION]
    if small:
        warnings.warn(f"the {name} region of class {classes[small[0]]} has only {voxels[small[0]]} voxel(s) "
                      f"(fewer than {SMALL_REGION}): the explanation rests on very little", stacklevel=2)
    return ResolvedTarget(Region(classes if b > 1 else classes[0], mask), classes, name, [int(v) for v in voxels],
                          how, act)
