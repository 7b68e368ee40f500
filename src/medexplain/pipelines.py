"""File-to-file pipelines behind ``medexplain explain``, ``instances`` and ``shapley``: read the inputs,
load the model, call the library and write every output atomically (:mod:`medexplain.io`). The command
line only parses arguments, calls one of these and prints; Python code can call them the same way.

Output names derived from an input file use the one stem rule, :func:`medexplain.io.file_stem`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import io
from .attribution import Attribution
from .core import check_input, forward, model_expectations, model_guard
from .errors import InputError, TargetError
from .explain import explain
from .models.loading import load_model
from .ops import probabilities
from .registry import route_options

__all__ = ["ExplainedImage", "LesionInstances", "ContrastShapley", "predicted_class", "explain_image",
           "explain_lesion_instances", "contrast_shapley", "shapley_value_function", "SHAPLEY_VALUE_HELP"]


def _model(model, weights: str | None) -> torch.nn.Module:
    return load_model(model, weights) if isinstance(model, str) else model


def _model_input(img: torch.Tensor, net) -> torch.Tensor:
    """An image read from a file (float32, ``(C, *spatial)``) as a checked batch of one in the model's
    floating dtype (a float64 model gets float64)."""
    expect = model_expectations(net)
    return check_input(img[None].to(expect.get("dtype", img.dtype)), **expect)


def predicted_class(out: torch.Tensor) -> torch.Tensor:
    """The top class per sample ``(B,)`` of a model output: the argmax of class logits ``(B, K)``, or of
    the logits summed over the voxels for a dense output ``(B, K, *spatial)``."""
    return (out.flatten(2).sum(2) if out.ndim > 2 else out).argmax(1)


# --------------------------------------------------------------------------------------------------
# explain one image
# --------------------------------------------------------------------------------------------------
@dataclass
class ExplainedImage:
    """What :func:`explain_image` computed and wrote: the explained ``target``, one
    :class:`~medexplain.Attribution` per method, and the files (``<stem>_<method>.nii.gz`` and ``.png``
    per method, ``info.json``)."""

    target: int
    attributions: dict[str, Attribution]
    files: list[Path] = field(default_factory=list)


def explain_image(image, model, methods: Sequence[str] | str, out, *, weights: str | None = None, target=None,
                  layer: str | None = None, options: dict | None = None, output=None,
                  on_method: Callable[[str], None] | None = None) -> ExplainedImage:
    """Explain one image file with each of ``methods`` and write NIfTI maps on the input's affine, PNG
    overlays and ``info.json`` into ``out``.

    ``model``: a module or a specification for :func:`medexplain.models.loading.load_model` (with
    ``weights``); ``target``: a class index, or None for the model's top class (:func:`predicted_class`);
    ``options``: ``{"key": v}`` for every method accepting ``key`` or ``{"method.key": v}`` for one
    (:func:`medexplain.registry.route_options`), ``layer`` for every method that takes one;
    ``on_method(name)`` is called after each method. Option names are checked before any work, and nothing
    is written unless every method succeeded. Files are named ``<file_stem(image)>_<method>``.
    """
    methods = [m.strip() for m in methods.split(",") if m.strip()] if isinstance(methods, str) else list(methods)
    per_method = route_options(methods, options, layer)
    img, meta = io.read_image(image)
    net = _model(model, weights)
    x = _model_input(img, net)
    if target is None:
        with torch.no_grad(), model_guard(net):
            target = int(predicted_class(forward(net, x, output=output))[0])
    results = {}
    for m in methods:
        results[m] = explain(net, x, method=m, target=int(target), output=output, **per_method[m])
        if on_method:
            on_method(m)
    out, stem = Path(out), io.file_stem(image)
    files = []
    info = {"image": str(image), "model": model if isinstance(model, str) else type(model).__name__,
            "target": int(target), "methods": {}}
    for m, attr in results.items():
        files.append(io.write_nifti(attr.map[0], out / f"{stem}_{io.method_file(m)}.nii.gz", meta["affine"]))
        files.append(io.write_png_overlay(img, attr.map[0], out / f"{stem}_{io.method_file(m)}.png"))
        info["methods"][m] = attr.info
    files.append(io.write_json(info, out / "info.json"))
    return ExplainedImage(int(target), results, files)


# --------------------------------------------------------------------------------------------------
# lesion instances of a segmentation
# --------------------------------------------------------------------------------------------------
@dataclass
class LesionInstances:
    """What :func:`explain_lesion_instances` found and wrote: the instances, one table row per instance
    (:func:`medexplain.segmentation.quantify`), the saliency seconds and the files."""

    instances: list
    rows: list[dict]
    seconds: float
    files: list[Path] = field(default_factory=list)


def explain_lesion_instances(images, model, out, *, weights: str | None = None, threshold: float = 0.5,
                             method: str = "smoothgrad", aggregate: str = "mean", channel: int = 1,
                             n_samples: int = 50, sigma: float = 0.05, seed: int = 0, min_size: int = 6,
                             connectivity: int | None = None, reference=None, rings: int = 5, context: int = 0,
                             layer: str | None = None, channel_names: Sequence[str] | None = None,
                             chunk_size: int | None = 10) -> LesionInstances:
    """Per-lesion, per-channel saliency of a segmentation model (Spagnolo et al.; seed 001).

    ``images``: one multi-channel file or one file per channel (:func:`medexplain.io.read_channels`).
    The lesion probability (channel ``channel``; softmax over several output channels, sigmoid for one)
    is thresholded into instances (:func:`medexplain.segmentation.find_instances`, labelled TP/FP/FN
    against ``reference``), each explained (:func:`medexplain.segmentation.explain_instances`) and
    quantified. Writes into ``out``, NIfTI on the first input's affine: ``probability.nii.gz``,
    ``instances.nii.gz``, ``instances.csv``, ``instance_<k>_<kind>.nii.gz``; with ``reference``
    ``statistics.csv``; with ``context`` > 0 ``context.csv`` (the context experiment up to that many dilations).
    """
    from . import segmentation as seg

    img, meta = io.read_channels(images)
    net = _model(model, weights)
    x = _model_input(img, net)
    with torch.no_grad(), model_guard(net):
        logits = forward(net, x)
    if logits.ndim != x.ndim or not 0 <= channel < logits.shape[1]:
        raise TargetError(f"the model output {tuple(logits.shape)} is not a segmentation with channel {channel}; "
                          "set --channel")
    prob = probabilities(logits, "auto", channel)[0]
    ref = None
    if reference is not None:
        ref = io.read_image(reference)[0][0] > 0.5
    insts = seg.find_instances(prob, threshold=threshold, connectivity=connectivity, min_size=min_size, reference=ref)
    out, affine = Path(out), meta["affine"]
    files = [io.write_nifti(prob, out / "probability.nii.gz", affine),
             io.write_nifti(seg.label_map(insts, tuple(prob.shape)).float(), out / "instances.nii.gz", affine)]
    if not insts:
        seg.write_csv([], out / "instances.csv")
        return LesionInstances([], [], 0.0, files + [out / "instances.csv"])
    attr = seg.explain_instances(net, x, insts, method=method, aggregate=aggregate, channel=channel,
                                 n_samples=n_samples, sigma=sigma, seed=seed, chunk_size=chunk_size, layer=layer)
    names = list(channel_names) if channel_names else None
    rows = seg.quantify(insts, attr.map, rings=rings, connectivity=connectivity,
                        channel_names=names if attr.map.shape[1] == x.shape[1] else None)
    for k, (inst, m) in enumerate(zip(insts, attr.map), start=1):
        files.append(io.write_nifti(m, out / f"instance_{k:03d}_{inst.kind or 'pred'}.nii.gz", affine))
    seg.write_csv(rows, out / "instances.csv")
    files.append(out / "instances.csv")
    if ref is not None:
        seg.write_csv(seg.group_statistics(rows), out / "statistics.csv")
        files.append(out / "statistics.csv")
    if context > 0:
        crow = [{"instance": k, "kind": inst.kind or "", **r} for k, inst in enumerate(insts, start=1)
                for r in seg.context_experiment(net, x, inst, d_max=context, channel=channel, threshold=threshold,
                                                connectivity=connectivity)]
        seg.write_csv(crow, out / "context.csv")
        files.append(out / "context.csv")
    return LesionInstances(insts, rows, float(attr.info["seconds"]), files)


# --------------------------------------------------------------------------------------------------
# contrast Shapley values of one case for several (fold) models
# --------------------------------------------------------------------------------------------------
SHAPLEY_VALUE_HELP = ("value of a coalition: 'probability:K' = mean probability of output channel K (default "
                      "probability:1); 'dice:REGION' against --seg, REGION = ET, TC, WT, NCR, ED (BraTS labels 1, 2, 4) "
                      "or labels joined by '+' (dice:1, dice:1+4)")


def shapley_value_function(value: str, seg=None, class_labels=None, activation: str = "softmax",
                           channel: int | None = None):
    """The value function of a specification: ``probability:K`` (:func:`medexplain.shapley.mean_foreground_probability`)
    or ``dice:REGION`` against the label map ``seg`` ``(1, *spatial)`` (:func:`medexplain.shapley.dice`;
    REGION a BraTS region or labels joined by ``+``)."""
    from .shapley import BRATS_REGIONS, dice, mean_foreground_probability

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
    :class:`~medexplain.shapley.ShapleyResult` per model, the fold consensus
    (:func:`medexplain.shapley.fold_consensus`) and the files."""

    players: list[str]
    results: list
    consensus: dict
    files: list[Path] = field(default_factory=list)


def contrast_shapley(images, models: Sequence, out, *, weights: Sequence[str] = (), contrasts: Sequence[str] | None = None,
                     reference_ranking=None, value: str = "probability:1", seg=None, class_labels=None,
                     activation: str = "softmax", channel: int | None = None, baseline="zero", method: str = "auto",
                     n_permutations: int = 200, seed: int = 0, chunk_size: int | None = 16,
                     on_model: Callable[[int, object], None] | None = None) -> ContrastShapley:
    """Contrast-level Shapley values (Ren et al. 2025, arXiv:2512.07224) of one multi-contrast image for each
    of ``models`` (the folds of a cross-validation), with their consensus.

    ``images``: one multi-channel file or one file per contrast (:func:`medexplain.io.read_channels`), fed
    to the models as read (in each model's floating dtype). ``contrasts``: one name per channel;
    ``value``: :func:`shapley_value_function` (``seg``: a label-map file for dice values); ``baseline``:
    ``zero``, ``mean`` or a number. Writes ``values.csv``, ``coalitions.csv``, ``ranking.json``,
    ``agreement.json`` (with ``reference_ranking``) and ``uncertainty.json`` (two or more models) into
    ``out``. ``on_model(i, result)`` is called after each model.
    """
    from .metrics.ranking import resolve_ranking
    from .shapley import channel_shapley, fold_consensus

    img, _ = io.read_channels(images)
    names = list(contrasts) if contrasts else [f"channel {i}" for i in range(img.shape[0])]
    if len(names) != img.shape[0]:
        raise InputError(f"--contrasts names {len(names)} contrasts; the image has {img.shape[0]} channels")
    weights = list(weights or [])
    if weights and len(weights) != len(models):
        raise InputError(f"{len(weights)} --weights for {len(models)} --model: give one per model (or none)")
    ref = resolve_ranking(reference_ranking, len(names), names) if reference_ranking else None
    seg_t = io.read_image(seg)[0][0].round().long()[None] if seg is not None else None
    try:
        labels = [int(v) for v in class_labels] if class_labels else None
    except ValueError:
        raise InputError(f"--class-labels must be integers, got {list(class_labels)}") from None
    value_fn = shapley_value_function(value, seg_t, labels, activation, channel)
    base = _baseline(baseline)
    results = []
    for i, spec in enumerate(models):
        net = _model(spec, weights[i] if weights else None)
        results.append(channel_shapley(net, _model_input(img, net), value_fn, baseline=base, method=method,
                                       n_permutations=n_permutations, seed=seed, chunk_size=chunk_size, players=names))
        if on_model:
            on_model(i, results[-1])
    consensus = fold_consensus(results, ref)
    files = _write_shapley(Path(out), models, names, results, consensus, value, images)
    return ContrastShapley(names, results, consensus, files)


def _write_shapley(out: Path, models, names, results, consensus, value, images) -> list[Path]:
    rows, crow = [], []
    for m, r in enumerate(results):
        spec = models[m] if isinstance(models[m], str) else type(models[m]).__name__
        for j, p in enumerate(names):
            se = None if r.stderr is None else float(r.stderr[0, j])
            rows.append([m, spec, p, float(r.values[0, j]), int(r.ranks[0, j]), se])
        for code, v in sorted(r.coalitions.items()):
            crow.append([m, code, "+".join(p for j, p in enumerate(names) if code >> j & 1), float(v[0])])
    paths = [Path(images)] if isinstance(images, (str, Path)) else [Path(p) for p in images]
    ranking = {**consensus["ranking"], "value": value, "image": [str(p) for p in paths]}
    files = [io.write_csv(rows, out / "values.csv", ["model", "spec", "contrast", "shapley_value", "rank", "stderr"]),
             io.write_csv(crow, out / "coalitions.csv", ["model", "bitmask", "contrasts_present", "value"]),
             io.write_json(ranking, out / "ranking.json")]
    if consensus["agreement"] is not None:
        files.append(io.write_json(consensus["agreement"], out / "agreement.json"))
    if consensus["uncertainty"] is not None:
        files.append(io.write_json(consensus["uncertainty"], out / "uncertainty.json"))
    return files
