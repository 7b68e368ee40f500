"""The ``medexplain instances`` pipeline: per-lesion saliency of a segmentation model (Spagnolo et al.; seed 001),
file to file."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from medexplain import io
from medexplain.engine.ops import probabilities
from medexplain.engine.options import check_options, counting, estimate_cost, plan_memory
from medexplain.engine.sliding import inferer_settings
from medexplain.errors import TargetError
from medexplain.models.model import as_model
from medexplain.models.transforms import resample_to_grid
from medexplain.pipelines import (
    load_setup,
    prepare_input,
    read_case,
    read_region,
    resolve_case_target,
)


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
    info: dict = field(default_factory=dict)


def explain_lesion_instances(images, model, out, *, weights: str | None = None, threshold: float = 0.5,
                             method: str | None = None, aggregate: str = "mean", channel: int | None = None,
                             n_samples: int = 50, sigma: float = 0.05, seed: int = 0, min_size: int = 6,
                             connectivity: int | None = None, reference=None, reference_threshold: float | None = None,
                             rings: int = 5, context: int = 0,
                             layer: str | None = None, channel_names: Sequence[str] | None = None,
                             chunk_size: int | None = 10, activation: str = "auto", output=None, region=None,
                             preprocessing=None, inferer=None, nnunet=None, nnunet_options: dict | None = None,
                             device=None, flip_axes=None, eval: str = "auto", variant: str = "paper",
                             upsample: str | None = None,
                             on_progress: Callable[[str, int, int | None], None] | None = None,
                             on_estimate: Callable | None = None, memory: float | None = None, formats=None,
                             dicom_reference=None, dicom_threshold="otsu", amp: bool = False) -> LesionInstances:
    """Per-lesion, per-channel saliency of a segmentation model (Spagnolo et al.; seed 001).

    ``images``: one multi-channel file or one file per channel (:func:`medexplain.io.read_channels`).
    The lesion probability of class ``channel`` (the target grammar: ``None`` = the foreground class
    with the most predicted voxels, :func:`medexplain.engine.targets.resolve_target`), read with the output
    ``activation`` (``auto`` detects a model that already outputs probabilities), is thresholded into
    instances (:func:`medexplain.segmentation.find_instances`, labelled TP/FP/FN against ``reference``: a
    label-map file, or a probability map with ``reference_threshold``; any other image is refused with the
    values found, :func:`medexplain.segmentation.reference_foreground`),
    each explained (:func:`medexplain.segmentation.explain_instances`) and quantified. ``region``: a
    mask file whose connected components are the instances instead (resampled onto the image grid by
    its geometry). ``preprocessing``: a :class:`~medexplain.models.transforms.Preprocessing` applied before
    the model; the instances and the table are computed on the model's grid and every map is put back
    on the input's grid. Every option is checked before anything is written. Writes into ``out``,
    NIfTI on the first input's affine: ``probability.nii.gz``, ``instances.nii.gz``, ``instances.csv``,
    ``instance_<k>_<kind>.nii.gz``, ``info.json`` (class, activation, preprocessing); with ``reference``
    ``statistics.csv``; with ``context`` > 0 ``context.csv`` (the context experiment up to that many dilations).
    ``inferer``: a ``SlidingWindowInferer`` or its settings as a dict (:func:`explain_image`); the model,
    the saliency and the context experiment then run window by window (:mod:`medexplain.engine.sliding`).
    ``nnunet``: an nnU-Net v2 model or its folder instead of ``model`` (:func:`explain_image`); its channel
    files may be given as nnU-Net names them (``CASE_0000.nii.gz``, ...: ordered by the suffix).
    ``on_estimate(CostEstimate)`` is called once the instances are found, before any file is written or
    the saliency runs (the rows, time and memory it will take, as :func:`explain_image`'s); then
    ``on_progress(method, rows_done, rows_total)`` as the saliency's rows pass through the model.
    ``memory``: the budget in GB of one model call (:func:`medexplain.engine.options.plan_memory`: ``chunk_size``
    capped to fit, refused before any compute if one row does not).
    ``variant`` / ``upsample``: Grad-CAM++'s formula and upsampling (:func:`medexplain.segmentation.explain_instances`).
    ``formats``: the instance maps as ``nifti`` and ``png`` (default: one figure per lesion,
    :func:`medexplain.io.render.instance_figures`) and/or ``dicom``: per instance map
    ``instance_<k>_<kind>_<method>_{pm,seg,sc}.dcm`` (:func:`medexplain.io.dicom.write_dicom_objects`, ``explain``'s
    objects: a Parametric Map of the map summed over channels, a SEG with one segment, the map thresholded by
    ``dicom_threshold``, and a Secondary Capture, each naming the instance), in the study of the DICOM input
    (or of ``dicom_reference``); the probability and instance label maps stay NIfTI. A non-DICOM input without
    ``dicom_reference`` is refused before any compute.
    """
    from medexplain import segmentation as seg
    from medexplain.io import render
    from medexplain.io.dicom import dicom_source_for, parse_formats

    formats = parse_formats(formats) if formats is not None else ("nifti", "png")
    check_options("instances", seg.explain_instances, {"aggregate": aggregate, "n_samples": n_samples,
                                                        "sigma": sigma, "seed": seed, "chunk_size": chunk_size})
    # the method that explains the instances and the options it takes, checked before anything is written
    spec, _ = seg.instance_options(method, aggregate=aggregate, n_samples=n_samples, sigma=sigma, seed=seed,
                                   chunk_size=chunk_size, layer=layer, variant=variant, upsample=upsample)
    seg.check_threshold(threshold, "--threshold")
    if reference_threshold is not None:
        seg.check_threshold(reference_threshold, "--reference-threshold")
    if isinstance(region, str) and region.strip().lower() == "all":
        raise TargetError("instances need regions: --region predicted (default) or a mask file, not 'all'")
    if nnunet is not None:
        from medexplain.models.nnunet import order_channel_files
        images = order_channel_files(images)
    setup = load_setup(model, weights, nnunet=nnunet, nnunet_options=nnunet_options, preprocessing=preprocessing,
                       inferer=inferer, device=device, flip_axes=flip_axes, eval=eval, amp=amp)
    nnm, net, preprocessing, inferer = setup.nnunet, setup.net, setup.preprocessing, setup.inferer
    out = io.check_output_dir(out)
    img, meta = read_case(images)
    listed = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    dicom_src = dicom_source_for(listed, meta, formats, dicom_reference)   # the study the objects join, before compute
    if reference is not None:  # a label map (or a probability map with reference_threshold), before any compute
        r_img, r_meta = io.read_image(reference)
        ref_fg = seg.reference_foreground(r_img.numpy(), reference_threshold, f"--reference {Path(reference).name}")
    prep = prepare_input(img, meta, net, preprocessing=preprocessing, output=output, activation=activation,
                         inferer=inferer)
    x, logits, act = prep.x, prep.out, prep.activation
    if logits.ndim != x.ndim:
        raise TargetError(f"the model output {tuple(logits.shape)} is not a segmentation (B, K, *spatial)")
    if channel is None:
        try:
            channel = resolve_case_target(prep, None, "predicted", threshold=threshold).class_index
            how = "default: the foreground class with the most predicted voxels"
        except TargetError:
            channel = 1 if logits.shape[1] > 1 else 0
            how = f"default: no foreground voxel is predicted, so class {channel}"
    else:
        how = "given"
    if not 0 <= channel < logits.shape[1]:
        raise TargetError(f"the model output {tuple(logits.shape)} is not a segmentation with channel {channel}; "
                          "set --target")
    reg, _ = read_region(region, prep)
    prob = probabilities(logits, act, channel)[0]
    ref = None
    if reference is not None:
        ref = resample_to_grid(torch.from_numpy(ref_fg).float(), r_meta.get("affine", np.eye(4)), tuple(x.shape[2:]),
                               prep.prepared.affine)
    found = prob if reg is None or isinstance(reg, str) else reg[0]
    insts = seg.find_instances(found, threshold=threshold, connectivity=connectivity, min_size=min_size, reference=ref)
    est = None
    if insts:  # what the saliency will cost (rows, time, memory of one call), before anything is written
        opts, plan = (({"chunk_size": chunk_size}, None) if inferer is not None else
                      plan_memory("instances", seg.explain_instances, net, x, {"chunk_size": chunk_size}, memory))
        chunk_size = opts["chunk_size"]
        est = replace(estimate_cost("instances", None, x.shape, {"n_instances": len(insts), "n_samples": n_samples,
                                                                 "noise": spec.takes("n_samples")},
                                    prep.seconds_per_row, plan), method=spec.name)
        if on_estimate:
            on_estimate(est)
    affine = meta["affine"]
    info = {"images": [str(p) for p in (images if isinstance(images, (list, tuple)) else [images])],
            "model": setup.name,
            "class": int(channel), "how": how, "activation": act, "activation_how": prep.activation_how,
            "region": "predicted" if reg is None or isinstance(reg, str) else str(region),
            "preprocessing": prep.record(), "instances": len(insts), "probability_max": float(prob.max()),
            "inferer": inferer_settings(inferer) if inferer is not None else None,
            "nnunet": nnm.describe() if nnm is not None else None,
            "estimate": est.as_dict() if est is not None else None}
    files = [io.write_nifti(prep.invert(prob[None])[0], out / "probability.nii.gz", affine),
             io.write_nifti(prep.invert(seg.label_map(insts, tuple(prob.shape)).float()[None], nearest=True)[0],
                            out / "instances.nii.gz", affine)]
    if not insts:
        seg.write_csv([], out / "instances.csv")
        files += [out / "instances.csv", io.write_json(info, out / "info.json")]
        return LesionInstances([], [], 0.0, files, info)
    done = [0]

    def rows(n):
        done[0] += n
        if on_progress:
            on_progress(spec.name, done[0], est.n_forward)

    attr = seg.explain_instances(counting(net, rows, output, inferer), x, insts, method=method, aggregate=aggregate,
                                 channel=channel, n_samples=n_samples, sigma=sigma, seed=seed, chunk_size=chunk_size,
                                 layer=layer, variant=variant, upsample=upsample)
    names = list(channel_names) if channel_names else None
    rows = seg.quantify(insts, attr.map, rings=rings, connectivity=connectivity,
                        channel_names=names if attr.map.shape[1] == x.shape[1] else None)
    for k, (inst, m) in enumerate(zip(insts, attr.map), start=1):
        stem, m = f"instance_{k:03d}_{inst.kind or 'pred'}", prep.invert(m)
        if "nifti" in formats:
            files.append(io.write_nifti(m, out / f"{stem}.nii.gz", affine))
        if dicom_src is not None:
            from medexplain.io.dicom import write_dicom_objects
            label = f"{spec.name} instance {k} {inst.kind or 'pred'}"
            files += write_dicom_objects(dicom_src, img, m, meta, out, stem, spec.name, target=int(channel),
                                         model=setup.name,
                                         title=(f"{label} \u00b7 class {channel} \u00b7 model {setup.name}", ""),
                                         threshold=dicom_threshold, label=label)
    if "png" in formats:
        files += [io.write_figure(fig, out / name) for name, fig in render.instance_figures(img, [prep.invert(m) for m in attr.map], [prep.invert(i.mask[None].float(), nearest=True)[0] > 0.5 for i in insts], [i.kind for i in insts], affine=affine, oriented=meta.get("oriented", False), channel_names=names)]  # noqa: E501
    seg.write_csv(rows, out / "instances.csv")
    files.append(out / "instances.csv")
    if ref is not None:
        seg.write_csv(seg.group_statistics(rows), out / "statistics.csv")
        files.append(out / "statistics.csv")
    if context > 0:
        crow = [{"instance": k, "kind": inst.kind or "", **r} for k, inst in enumerate(insts, start=1)
                for r in seg.context_experiment(as_model(net, output=output, inferer=inferer).replace(activation=act),
                                                x, inst, d_max=context, channel=channel, threshold=threshold,
                                                connectivity=connectivity)]
        seg.write_csv(crow, out / "context.csv")
        files.append(out / "context.csv")
    files.append(io.write_json(info, out / "info.json"))
    return LesionInstances(insts, rows, float(attr.info["seconds"]), files, info)
