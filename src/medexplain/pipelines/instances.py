"""The ``medexplain instances`` pipeline: per-lesion saliency of a segmentation model (Spagnolo et al.; seed 001),
file to file."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from medexplain import io
from medexplain.engine.ops import probabilities
from medexplain.engine.options import check_options
from medexplain.engine.sliding import inferer_settings
from medexplain.engine.targets import Class, Regions, ResolvedTarget
from medexplain.errors import TargetError
from medexplain.models.transforms import resample_to_grid
from medexplain.pipelines import (
    CaseState,
    CaseWriter,
    case_model,
    explain_case,
    read_region,
    resolve_case_target,
)
from medexplain.pipelines.steps import StepEstimate


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


def explain_lesion_instances(images, model, out, *, threshold: float = 0.5, method: str | None = None,
                             aggregate: str = "mean", channel: int | None = None, n_samples: int = 50,
                             sigma: float = 0.05, seed: int = 0, min_size: int = 6, connectivity: int | None = None,
                             reference=None, reference_threshold: float | None = None, rings: int = 5,
                             context: int = 0, layer: str | None = None, channel_names: Sequence[str] | None = None,
                             chunk_size: int | None = 10, region=None, variant: str = "paper",
                             upsample: str | None = None,
                             on_progress: Callable[[str, int, int | None], None] | None = None,
                             on_estimate: Callable | None = None, memory: float | None = None, formats=None,
                             dicom_reference=None, dicom_threshold="otsu") -> LesionInstances:
    """Per-lesion, per-channel saliency of a segmentation model (Spagnolo et al.; seed 001).

    ``images``: one multi-channel file or one file per channel (:func:`medexplain.io.read_channels`).
    ``model``: an :class:`mx.Model <medexplain.models.model.Model>`, an ``nn.Module``, an
    :class:`mx.ModelSpec <medexplain.models.spec.ModelSpec>` or anything :func:`medexplain.load_model` takes, loaded
    once after the cheap checks (:func:`medexplain.pipelines.case_model`): its output adapter, activation,
    preprocessing, sliding window, flips, ensemble, device and train/eval policy are the Model's.
    The lesion probability of class ``channel`` (the target grammar: ``None`` = the foreground class
    with the most predicted voxels, :func:`medexplain.engine.targets.resolve_target`), read with the Model's output
    activation (``auto`` detects a model that already outputs probabilities), is thresholded into
    instances (:func:`medexplain.segmentation.find_instances`, labelled TP/FP/FN against ``reference``: a
    label-map file, or a probability map with ``reference_threshold``; any other image is refused with the
    values found, :func:`medexplain.segmentation.reference_foreground`),
    each explained (the registered instance method over a :class:`~medexplain.engine.targets.Regions` target, through
    the one case pipeline :func:`medexplain.pipelines.explain_case`) and quantified. ``region``: a
    mask file whose connected components are the instances instead (resampled onto the image grid by
    its geometry). With the Model's preprocessing the instances and the table are computed on the model's grid
    and every map is put back on the input's grid. Every option is checked before anything is written. Writes
    into ``out``, NIfTI on the first input's affine: ``probability.nii.gz``, ``instances.nii.gz``, ``instances.csv``,
    ``instance_<k>_<kind>.nii.gz``, ``info.json`` (class, activation, preprocessing); with ``reference``
    ``statistics.csv``; with ``context`` > 0 ``context.csv`` (the context experiment up to that many dilations).
    Through the Model's sliding window the model, the saliency and the context experiment run window by window
    (:mod:`medexplain.engine.sliding`). An nnU-Net model's channel files may be given as nnU-Net names them
    (``CASE_0000.nii.gz``, ...: ordered by the suffix).
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
    from medexplain.io.dicom import parse_formats

    formats = parse_formats(formats) if formats is not None else ("nifti", "png")
    check_options("instances", seg.explain_instances, {"aggregate": aggregate, "n_samples": n_samples,
                                                        "sigma": sigma, "seed": seed, "chunk_size": chunk_size})
    # the method that explains the instances and the options it takes, checked before anything is written
    spec, own = seg.instance_options(method, aggregate=aggregate, n_samples=n_samples, sigma=sigma, seed=seed,
                                     chunk_size=chunk_size, layer=layer, variant=variant, upsample=upsample)
    seg.check_threshold(threshold, "--threshold")
    if reference_threshold is not None:
        seg.check_threshold(reference_threshold, "--reference-threshold")
    if isinstance(region, str) and region.strip().lower() == "all":
        raise TargetError("instances need regions: --region predicted (default) or a mask file, not 'all'")
    out = io.check_output_dir(out)
    ref_fg = r_meta = None
    if reference is not None:  # a label map (or a probability map with reference_threshold), before any compute
        r_img, r_meta = io.read_image(reference)
        ref_fg = seg.reference_foreground(r_img.numpy(), reference_threshold, f"--reference {Path(reference).name}")
    listed = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    model = case_model(model)   # once, after the cheap checks
    if type(model.origin).__name__ == "NnUNetModel":
        from medexplain.models.nnunet import order_channel_files
        listed = order_channel_files(listed)
    per_method = {spec.name: own}
    step = StepEstimate("instances", spec.name, on_estimate, on_progress)
    writer = InstanceWriter(model, out, formats, dicom_reference, dicom_threshold, step, rings=rings,
                            context=context, threshold=threshold, connectivity=connectivity,
                            channel_names=channel_names)

    def lesions(st: CaseState) -> ResolvedTarget:
        """The target stage: the lesion instances of the prediction (or of ``region``) as a Regions target."""
        x, logits, act = st.prep.x, st.prep.out, st.prep.activation
        if logits.ndim != x.ndim:
            raise TargetError(f"the model output {tuple(logits.shape)} is not a segmentation (B, K, *spatial)")
        ch, how = channel, "given"
        if ch is None:
            try:
                ch = resolve_case_target(st.prep, None, "predicted", threshold=threshold).class_index
                how = "default: the foreground class with the most predicted voxels"
            except TargetError:
                ch = 1 if logits.shape[1] > 1 else 0
                how = f"default: no foreground voxel is predicted, so class {ch}"
        if not 0 <= ch < logits.shape[1]:
            raise TargetError(f"the model output {tuple(logits.shape)} is not a segmentation with channel {ch}; "
                              "set --target")
        reg, _ = read_region(region, st.prep)
        prob = probabilities(logits, act, ch)[0]
        ref = None
        if ref_fg is not None:
            ref = resample_to_grid(torch.from_numpy(ref_fg).float(), r_meta.get("affine", np.eye(4)),
                                   tuple(x.shape[2:]), st.prep.prepared.affine)
        found = prob if reg is None or isinstance(reg, str) else reg[0]
        insts = seg.find_instances(found, threshold=threshold, connectivity=connectivity, min_size=min_size,
                                   reference=ref)
        writer.found(ch, how, prob, insts, "predicted" if reg is None or isinstance(reg, str) else str(region),
                     ref is not None)
        step.x_shape, step.options = x.shape, {"n_instances": len(insts), "n_samples": n_samples,
                                               "noise": spec.takes("n_samples")}
        if not insts:                  # nothing to explain: the probability and the empty table are written
            st.run = []
            return ResolvedTarget(Class(ch), [ch], writer.info_region, [0], how, act)
        if spec.takes("layer") and own.get("layer") is None:   # the decoder layer (the paper's), on this model
            own["layer"] = seg.instance_layer(model, x, spec)
        target = Regions(ch, torch.stack([i.mask for i in insts]), [i.sample for i in insts])
        return ResolvedTarget(target, [ch], writer.info_region, [int(i.mask.sum()) for i in insts], how, act)

    explain_case(model, listed, [spec.name], writer, per_method=per_method, target=lesions,
                       layer=own.get("layer"), threshold=threshold, memory=memory, on_estimate=step.on_estimate,
                       on_progress=step.on_progress)
    return writer.result()


class InstanceWriter(CaseWriter):
    """The files of one ``instances`` case in ``out`` (:func:`explain_lesion_instances`), written once the
    instances are explained (nothing is written when the explanation fails): ``probability.nii.gz``,
    ``instances.nii.gz``, per instance ``instance_<k>_<kind>.nii.gz`` (``nifti``), its DICOM objects (``dicom``)
    and figure (``png``, :func:`medexplain.io.render.instance_figures`), ``instances.csv``
    (:func:`medexplain.segmentation.quantify`), ``statistics.csv`` (with a reference), ``context.csv`` (the
    context experiment) and ``info.json``."""

    def __init__(self, model, out: Path, formats, dicom_reference=None, dicom_threshold="otsu",
                 step: StepEstimate | None = None, *,
                 rings: int = 5, context: int = 0, threshold: float = 0.5, connectivity: int | None = None,
                 channel_names: Sequence[str] | None = None):
        self.model, self.out, self.formats, self.step = model, out, formats, step   # step: the saliency's estimate
        self.dicom_reference, self.dicom_threshold = dicom_reference, dicom_threshold
        self.rings, self.context, self.threshold, self.connectivity = rings, context, threshold, connectivity
        self.names = list(channel_names) if channel_names else None
        self.dicom_src, self.attr, self.instances, self.rows = None, None, [], []
        self.files: list[Path] = []
        self.info: dict = {}

    def read(self, state):
        from medexplain.io.dicom import dicom_source_for  # the study the objects join, before any compute
        self.dicom_src = dicom_source_for(state.images, state.meta, self.formats, self.dicom_reference)

    def found(self, channel: int, how: str, prob: torch.Tensor, instances: list, region: str,
              reference: bool) -> None:
        """What the target stage found: the lesion class, how it was chosen, its probability on the model
        grid, the instances, and whether they are labelled against a reference."""
        self.channel, self.how, self.prob, self.instances = channel, how, prob, instances
        self.info_region, self.reference = region, reference

    def method(self, state, method, attr, amap):
        self.attr = attr

    def failed(self, state, method, error):
        raise error    # one method: its error is the command's

    def finish(self, state):
        from medexplain import segmentation as seg
        from medexplain.io import render

        prep, insts, out, affine = state.prep, self.instances, self.out, state.meta["affine"]
        model, name = self.model, state.info["model"]
        est = self.step.est.as_dict() if self.step is not None and self.step.est is not None else None
        self.info = {"images": [str(p) for p in state.images], "model": name, "class": int(self.channel),
                     "how": self.how, "activation": prep.activation, "activation_how": prep.activation_how,
                     "region": self.info_region, "preprocessing": prep.record(), "instances": len(insts),
                     "probability_max": float(self.prob.max()),
                     "inferer": inferer_settings(model.inferer) if model.inferer is not None else None,
                     "nnunet": model.origin.describe() if type(model.origin).__name__ == "NnUNetModel" else None,
                     "estimate": est}
        files = [io.write_nifti(prep.invert(self.prob[None])[0], out / "probability.nii.gz", affine),
                 io.write_nifti(prep.invert(seg.label_map(insts, tuple(self.prob.shape)).float()[None],
                                            nearest=True)[0], out / "instances.nii.gz", affine)]
        if not insts:
            seg.write_csv([], out / "instances.csv")
            self.files = files + [out / "instances.csv", io.write_json(self.info, out / "info.json")]
            return self.files
        attr, x, method = self.attr, prep.x, state.run[0]
        maps = [prep.invert(m) for m in attr.map]
        self.rows = seg.quantify(insts, attr.map, rings=self.rings, connectivity=self.connectivity,
                                 channel_names=self.names if attr.map.shape[1] == x.shape[1] else None)
        for k, (inst, m) in enumerate(zip(insts, maps), start=1):
            stem = f"instance_{k:03d}_{inst.kind or 'pred'}"
            if "nifti" in self.formats:
                files.append(io.write_nifti(m, out / f"{stem}.nii.gz", affine))
            if self.dicom_src is not None:
                from medexplain.io.dicom import write_dicom_objects
                label = f"{method} instance {k} {inst.kind or 'pred'}"
                files += write_dicom_objects(self.dicom_src, state.img, m, state.meta, out, stem, method,
                                             target=int(self.channel), model=name,
                                             title=(f"{label} \u00b7 class {self.channel} \u00b7 model {name}", ""),
                                             threshold=self.dicom_threshold, label=label)
        if "png" in self.formats:
            masks = [prep.invert(i.mask[None].float(), nearest=True)[0] > 0.5 for i in insts]
            files += [io.write_figure(fig, out / fname) for fname, fig in render.instance_figures(
                state.img, maps, masks, [i.kind for i in insts], affine=affine, oriented=state.meta.get("oriented", False),
                channel_names=self.names)]
        seg.write_csv(self.rows, out / "instances.csv")
        files.append(out / "instances.csv")
        if self.reference:
            seg.write_csv(seg.group_statistics(self.rows), out / "statistics.csv")
            files.append(out / "statistics.csv")
        if self.context > 0:
            probs = model.replace(activation=prep.activation)   # the probability the instances were found on
            crow = [{"instance": k, "kind": inst.kind or "", **r} for k, inst in enumerate(insts, start=1)
                    for r in seg.context_experiment(probs, x, inst, d_max=self.context, channel=self.channel,
                                                    threshold=self.threshold, connectivity=self.connectivity)]
            seg.write_csv(crow, out / "context.csv")
            files.append(out / "context.csv")
        files.append(io.write_json(self.info, out / "info.json"))
        self.files = files
        return files

    def result(self) -> LesionInstances:
        """What :func:`explain_lesion_instances` returns."""
        seconds = float(self.attr.info["seconds"]) if self.attr is not None else 0.0
        return LesionInstances(self.instances, self.rows, seconds, self.files, self.info)
