"""The ``medexplain shapley`` pipeline: contrast-level Shapley values of one case for several (fold) models
(Ren et al. 2025), file to file."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from medexplain import io
from medexplain.engine.targets import Region, ResolvedTarget, parse_target
from medexplain.errors import InputError, OptionError
from medexplain.models.transforms import resample_nearest
from medexplain.pipelines import (
    CaseState,
    CaseWriter,
    _as_preprocessing,
    case_model,
    explain_case,
    read_case,
    resolve_case_target,
)
from medexplain.pipelines.steps import StepEstimate

# --------------------------------------------------------------------------------------------------
# contrast Shapley values of one case for several (fold) models
# --------------------------------------------------------------------------------------------------
SHAPLEY_VALUE_HELP = ("value of a coalition: 'probability:K' = mean probability of output channel K (default "
                      "probability:1); 'dice:REGION' against --seg, REGION = ET, TC, WT, NCR, ED (BraTS labels 1, 2, 4) "
                      "or labels joined by '+' (dice:1, dice:1+4)")


def shapley_value_function(value: str, seg=None, class_labels=None, activation: str = "softmax",
                           channel: int | None = None):
    """The value function of a specification: ``probability:K``
    (:func:`medexplain.segmentation.shapley.mean_foreground_probability`) or ``dice:REGION`` against the label
    map ``seg`` ``(1, *spatial)`` (:func:`medexplain.segmentation.shapley.dice`;
    REGION a BraTS region or labels joined by ``+``)."""
    from medexplain.segmentation.shapley import BRATS_REGIONS, dice, mean_foreground_probability

    kind, _, arg = value.partition(":")
    kind = kind.strip().lower()
    if kind in ("probability", "prob"):
        try:
            k = int(arg or 1)
        except ValueError:
            raise InputError(f"--value probability:K needs an output channel index, got {arg!r}") from None
        return mean_foreground_probability(k, activation)
    if kind == "dice":
        if seg is None:
            raise InputError("--value dice:... needs the reference label map --seg")
        if not arg:
            raise InputError(f"--value dice needs a region or labels, e.g. dice:WT or dice:1 ({SHAPLEY_VALUE_HELP})")
        region = arg if arg.upper() in BRATS_REGIONS else [int(v) for v in arg.split("+")]
        return dice(region, seg, class_labels=class_labels, activation=activation,
                    channel=channel if activation != "softmax" else None)
    raise InputError(f"unknown --value {value!r}: {SHAPLEY_VALUE_HELP}")


def _baseline(baseline):
    if isinstance(baseline, (int, float)) or baseline in ("zero", "mean"):
        return baseline
    try:
        return float(baseline)
    except ValueError:
        raise InputError(f"--baseline must be zero, mean or a number, got {baseline!r}") from None


@dataclass
class ContrastShapley:
    """What :func:`contrast_shapley` computed and wrote: the player names, one
    :class:`~medexplain.segmentation.shapley.ShapleyResult` per model, the fold consensus
    (:func:`medexplain.segmentation.shapley.fold_consensus`) and the files."""

    players: list[str]
    results: list
    consensus: dict
    files: list[Path] = field(default_factory=list)


def contrast_shapley(images, models, out, *, contrasts: Sequence[str] | None = None, reference_ranking=None,
                     value: str | None = None, seg=None, class_labels=None, channel: int | None = None,
                     baseline="zero", method: str = "auto", n_permutations: int = 200, seed: int = 0,
                     chunk_size: int | None = 16, target=None, region=None,
                     on_model: Callable[[int, object], None] | None = None,
                     on_progress: Callable[[str, int, int | None], None] | None = None,
                     on_estimate: Callable | None = None, memory: float | None = None) -> ContrastShapley:
    """Contrast-level Shapley values (Ren et al. 2025, arXiv:2512.07224) of one multi-contrast image for each
    of ``models`` (the folds of a cross-validation), with their consensus.

    ``models``: a list of model objects (:class:`mx.Model <medexplain.models.model.Model>`, ``nn.Module``,
    :class:`mx.ModelSpec <medexplain.models.spec.ModelSpec>`, or anything :func:`medexplain.load_model` takes), one
    per fold, or one of them; a ModelSpec of several sources or of an nnU-Net folder with several folds is one model
    per member (:meth:`~medexplain.models.spec.ModelSpec.members`: each fold with nnU-Net's preprocessing, sliding
    window and mirroring; the contrasts then default to its channel names). Each is loaded after the cheap checks
    (:func:`medexplain.pipelines.case_model`) and runs the one case pipeline
    (:func:`medexplain.pipelines.explain_case`) with its own preprocessing, output adapter and activation.
    ``images``: one multi-channel file or one file per contrast (:func:`medexplain.io.read_channels`), fed to each
    model in its floating dtype. ``contrasts``: one name per channel; ``value``:
    :func:`shapley_value_function` (default ``probability:1``; ``seg``: a label-map file for dice values,
    resampled onto the model grid by its geometry); ``target``/``region`` (the commands' one target
    grammar, :func:`medexplain.engine.targets.resolve_target` on the first model's output) make the value the
    mean probability of that class inside that region (``region`` default ``all``). Each model's output activation
    (``auto`` detects models that output probabilities) is recorded in ``ranking.json``. ``baseline``: ``zero``,
    ``mean`` or a number. Writes ``values.csv``, ``coalitions.csv``, ``ranking.json``, ``agreement.json`` (with
    ``reference_ranking``) and ``uncertainty.json`` (two or more models) into ``out``. ``on_model(i, result)`` is
    called after each model, ``on_estimate(CostEstimate)`` before each model runs (its coalition rows, time and the
    memory of one call; ``memory``: the budget in GB, :func:`medexplain.engine.options.plan_memory` caps
    ``chunk_size`` to fit and refuses before any compute if one row does not), ``on_progress("model i/k",
    rows_done, rows_total)`` as coalitions pass through it.
    """
    from medexplain.methods.shapley import contrast_shapley as shapley_method
    from medexplain.metrics.ranking import resolve_ranking
    from medexplain.models.spec import ModelSpec
    from medexplain.segmentation.shapley import mean_foreground_probability

    by_target = target is not None or region is not None
    if by_target and value is not None and not value.strip().lower().startswith("prob"):
        raise InputError(f"--target/--region define a probability value; they do not combine with --value {value}")
    value = value or "probability:1"
    given = [models] if isinstance(models, ModelSpec) or not isinstance(models, (list, tuple)) else list(models)
    members = [s for m in given for s in (m.check().members() if isinstance(m, ModelSpec) else [m])]
    if not members:
        raise OptionError("give the models (--model, one per fold) or an nnU-Net model folder (--nnunet)")
    if by_target and ":" in value and parse_target(target) is not None and value.partition(":")[2].strip() != str(target):
        raise InputError(f"--value {value} and --target {target} name different classes; give one of them")
    out = io.check_output_dir(out)
    listed = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    seg_img = io.read_image(seg) if seg is not None else None
    try:
        labels = [int(v) for v in class_labels] if class_labels else None
    except ValueError:
        raise InputError(f"--class-labels must be integers, got {list(class_labels)}") from None
    check_activation = "softmax" if channel is None else "sigmoid"   # the value's syntax, before any model runs
    shapley_value_function(value, torch.zeros(1, 1, dtype=torch.long) if seg_img is not None else None, labels,
                           check_activation, channel)
    options = shapley_method.spec.check_options({"baseline": _baseline(baseline), "estimator": method, "seed": seed,
                                                 "n_permutations": n_permutations, "chunk_size": chunk_size})
    first = case_model(members[0])   # the first model: an nnU-Net folder names and orders the channels
    nnm = first.origin if type(first.origin).__name__ == "NnUNetModel" else None
    if nnm is not None:
        from medexplain.models.nnunet import order_channel_files
        listed, contrasts = order_channel_files(listed), contrasts or nnm.channel_names
    img, meta = read_case(listed)   # the channel checks before any model runs (explain_case reads it per model)
    if nnm is not None:
        nnm.check_image(img)
    names = list(contrasts) if contrasts else [f"channel {i}" for i in range(img.shape[0])]
    if len(names) != img.shape[0]:
        raise InputError(f"--contrasts names {len(names)} contrasts; the image has {img.shape[0]} channels")
    if img.shape[0] < 2:  # a ranking of one contrast is degenerate (rank variance 0 by construction)
        from medexplain.segmentation.shapley import ONE_PLAYER
        raise InputError(f"contrast Shapley values need two or more input channels; the image has 1: {ONE_PLAYER}")
    ref = resolve_ranking(reference_ranking, len(names), names) if reference_ranking else None
    options = {**options, "players": names}
    writer = ShapleyWriter(out, names, ref, value if not by_target else None, listed, on_model)
    chosen = []   # by target: one class and region for every fold, so their values are comparable
    folds = []    # the nnU-Net folds the members are
    for i, member in enumerate(members):
        model = first if i == 0 else case_model(member)   # the model step of every command, once per model
        if type(model.origin).__name__ == "NnUNetModel":
            folds += [f for f in model.origin.folds if f not in folds]
        step = StepEstimate("shapley", f"model {i + 1}/{len(members)}", on_estimate, on_progress)

        def value_target(st: CaseState, net=model, step=step) -> ResolvedTarget:
            """The target stage: the coalition value of this fold, read with its output activation."""
            prep = st.prep
            step.x_shape, step.options = prep.x.shape, {"n_players": len(names), "method": method,
                                                        "n_permutations": n_permutations}
            if by_target:
                if not chosen:
                    chosen.append(resolve_case_target(prep, target, "all" if region is None else region, model=net))
                mask = chosen[0].target.mask if isinstance(chosen[0].target, Region) else None
                return replace(chosen[0], target=mean_foreground_probability(chosen[0].class_index, prep.activation,
                                                                             mask))
            seg_t = None
            if seg_img is not None:
                seg_t = resample_nearest(seg_img[0][:1], seg_img[1].get("affine", np.eye(4)), tuple(prep.x.shape[2:]),
                                         prep.prepared.affine)[0].round().long()[None]
            value_fn = shapley_value_function(value, seg_t, labels, prep.activation, channel)
            return ResolvedTarget(value_fn, [channel], None, None, f"--value {value}", prep.activation)

        explain_case(model, listed, [shapley_method.spec.name], writer,
                           per_method={shapley_method.spec.name: options}, target=value_target, memory=memory,
                           on_estimate=step.on_estimate, on_progress=step.on_progress)
    if by_target:
        writer.value = f"probability:{chosen[0].class_index} in region {chosen[0].region}"
    writer.extra.update(target=None if not chosen else chosen[0].info(),
                        preprocessing=_as_preprocessing(first.preprocessing).describe(),
                        nnunet={**nnm.describe(), "folds": folds} if nnm is not None else None)
    files = writer.write()
    return ContrastShapley(names, writer.results, writer.consensus, files)


class ShapleyWriter(CaseWriter):
    """The files of :func:`contrast_shapley`: collects one :class:`~medexplain.segmentation.shapley.ShapleyResult`
    per fold model (:func:`explain_case` once per model; ``on_model(i, result)`` after each) and, once every model's
    result is in (:meth:`write`), writes ``values.csv``, ``coalitions.csv``, ``ranking.json``, ``agreement.json``
    (with a reference ranking) and ``uncertainty.json`` (two or more models) with the consensus
    (:func:`medexplain.segmentation.shapley.fold_consensus`)."""

    def __init__(self, out: Path, names, reference, value, images,
                 on_model: Callable[[int, object], None] | None = None):
        self.out, self.names, self.reference, self.value = out, names, reference, value
        self.images, self.on_model = images, on_model
        self.models: list[str] = []   # each model's name (info.json's "model"), in values.csv
        self.results: list = []
        self.extra: dict = {"activation": []}
        self.consensus: dict = {}

    def method(self, state, method, attr, amap):
        from medexplain.segmentation.shapley import shapley_result

        i = len(self.results)
        self.results.append(shapley_result(attr))
        self.models.append(state.info["model"])
        self.extra["activation"].append({"model": i, "activation": state.prep.activation,
                                         "how": state.prep.activation_how})
        if self.on_model:
            self.on_model(i, self.results[-1])

    def failed(self, state, method, error):
        raise error    # one method per fold: its error is the command's

    def write(self) -> list[Path]:
        """The files, once every model's result is in."""
        from medexplain.segmentation.shapley import fold_consensus

        self.consensus = fold_consensus(self.results, self.reference)
        return _write_shapley(self.out, self.models, self.names, self.results, self.consensus, self.value,
                              self.images, self.extra)


def _write_shapley(out: Path, models, names, results, consensus, value, images, extra=None) -> list[Path]:
    rows, crow = [], []
    for m, r in enumerate(results):
        spec = models[m]
        for j, p in enumerate(names):
            se = None if r.stderr is None else float(r.stderr[0, j])
            rows.append([m, spec, p, float(r.values[0, j]), int(r.ranks[0, j]), se])
        for code, v in sorted(r.coalitions.items()):
            crow.append([m, code, "+".join(p for j, p in enumerate(names) if code >> j & 1), float(v[0])])
    paths = [Path(images)] if isinstance(images, (str, Path)) else [Path(p) for p in images]
    ranking = {**consensus["ranking"], "value": value, "image": [str(p) for p in paths], **(extra or {})}
    files = [io.write_csv(rows, out / "values.csv", ["model", "spec", "contrast", "shapley_value", "rank", "stderr"]),
             io.write_csv(crow, out / "coalitions.csv", ["model", "bitmask", "contrasts_present", "value"]),
             io.write_json(ranking, out / "ranking.json")]
    if consensus["agreement"] is not None:
        files.append(io.write_json(consensus["agreement"], out / "agreement.json"))
    if consensus["uncertainty"] is not None:
        files.append(io.write_json(consensus["uncertainty"], out / "uncertainty.json"))
    return files
