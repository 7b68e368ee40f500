"""File-to-file pipelines behind ``medexplain explain``, ``instances`` and ``shapley``: read the inputs,
load the model, call the library and write every output atomically (:mod:`medexplain.io`). The command
line only parses arguments, calls one of these and prints; Python code can call them the same way.

Output names derived from an input file use the one stem rule, :func:`medexplain.io.file_stem`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from medexplain import io
from medexplain.engine.attribution import Attribution
from medexplain.engine.core import check_input, model_expectations
from medexplain.engine.explain import explain
from medexplain.engine.ops import detect_activation
from medexplain.engine.options import counting, estimate_cost, plan_memory
from medexplain.engine.registry import get_method, route_options
from medexplain.engine.sliding import inferer_settings
from medexplain.engine.targets import REGION_WORDS, resolve_target
from medexplain.errors import InputError, OptionError, PartialFailure, TargetError, UnsupportedModelError
from medexplain.models.loading import checked_forward
from medexplain.models.model import Model, source_kind
from medexplain.models.spec import ModelSpec
from medexplain.models.transforms import Prepared, Preprocessing, Preprocessor, resample_to_grid

__all__ = ["CaseState", "CaseWriter", "case_model", "explain_case", "explain_method",
           "write_method_outputs", "write_case_report", "method_options", "model_kind", "model_record",
           "prepare_input", "read_case", "resolve_case_target", "write_map", "input_files", "ExplainedImage",
           "LesionInstances", "ContrastShapley", "predicted_class", "explain_image", "explain_lesion_instances",
           "contrast_shapley", "shapley_value_function", "SHAPLEY_VALUE_HELP"]


def _model_input(img: torch.Tensor, model: Model) -> torch.Tensor:
    """An image read from a file (float32, ``(C, *spatial)``) as a checked batch of one in the model's
    floating dtype (a float64 model gets float64), on the model's device."""
    expect = model_expectations(model)
    return model.to_input(check_input(img[None].to(expect.get("dtype", img.dtype)), **expect))


def predicted_class(out: torch.Tensor) -> torch.Tensor:
    """The top class per sample ``(B,)`` of a model output: the argmax of class logits ``(B, K)``, or of
    the logits summed over the voxels for a dense output ``(B, K, *spatial)``."""
    return (out.flatten(2).sum(2) if out.ndim > 2 else out).argmax(1)


# --------------------------------------------------------------------------------------------------
# preparation shared by the commands (issue 15): the output folder, the image through the model's
# preprocessing, one checked forward, the output activation, the target grammar, the method plan
# --------------------------------------------------------------------------------------------------
def _as_preprocessing(preprocessing) -> Preprocessing:
    if preprocessing is None:
        return Preprocessing()
    if isinstance(preprocessing, Preprocessing):
        return preprocessing
    if isinstance(preprocessing, dict):
        return Preprocessing(**preprocessing)
    raise InputError(f"preprocessing must be a medexplain.models.transforms.Preprocessing or a dict, got "
                     f"{type(preprocessing).__name__}")


def warn_series(path, img: torch.Tensor) -> None:
    """Warn when a 4D NIfTI that looks like a time series (time units in its header, or more than 8
    volumes) is read as input channels (contrasts)."""
    import warnings

    name = str(path).lower()
    if img.shape[0] < 2 or not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return
    try:
        import nibabel as nib
        hdr = nib.load(str(path)).header
        timed = hdr.get_xyzt_units()[1] not in ("unknown", None) and int(hdr["dim"][0]) == 4
    except Exception:
        timed = False
    if timed or img.shape[0] > 8:
        warnings.warn(f"{Path(path).name}: the 4th axis ({img.shape[0]} volumes"
                      + (", with time units in the header" if timed else "")
                      + ") is read as input channels (contrasts); if it is a time series, explain one volume",
                      stacklevel=2)


@dataclass
class PreparedInput:
    """An image ready for the model: the original ``img`` ``(C, *spatial)`` and ``meta`` as read, the
    ``prepared`` preprocessing record, the model input ``x`` ``(1, C, *s')``, the model's ``out``put
    (``output=`` applied), the resolved ``activation`` with the reason, and the seconds per row of that
    first forward pass."""

    img: torch.Tensor
    meta: dict
    prepared: Prepared
    preprocessor: Preprocessor
    x: torch.Tensor
    out: torch.Tensor
    activation: str
    activation_how: str
    seconds_per_row: float

    def invert(self, amap: torch.Tensor, nearest: bool = False) -> torch.Tensor:
        """A map ``(C_or_1, *s')`` on the model grid back on the image's own grid."""
        return self.preprocessor.invert(amap, self.prepared, nearest=nearest)

    def record(self) -> dict:
        p = self.prepared
        return {**self.preprocessor.prep.describe(), "model_grid": list(p.image.shape[1:]),
                "model_affine": p.affine.tolist(), "image_grid": list(p.original_shape)}


def prepare_input(img: torch.Tensor, meta: dict, model) -> PreparedInput:
    """The prepare stage of the one case pipeline: ``img`` through the model's preprocessing
    (``Model.preprocessing``, :class:`~medexplain.models.transforms.Preprocessing`, nnU-Net's or a bundle's),
    checked against the model, and one forward of the model object (:func:`case_model` of ``model``: the
    prediction the methods explain, under the Model's train/eval policy; an error inside the model becomes a
    :class:`~medexplain.errors.ModelError` naming what was given and expected); the Model's ``activation``
    resolved (``auto``: :func:`medexplain.engine.ops.detect_activation`)."""
    import time

    m = case_model(model)
    pre = m.preprocessor()
    prepared = pre.apply(img, meta.get("affine", np.eye(4)))
    x = _model_input(prepared.image, m)
    t0 = time.perf_counter()
    out = checked_forward(m, x)
    spr = (time.perf_counter() - t0) / x.shape[0]
    act = m.activation
    act, how = (detect_activation(out, m) if act == "auto" else (act, f"activation {act} (the model's)"))
    return PreparedInput(img, meta, prepared, pre, x, out, act, how, spr)


def read_region(region, prep: PreparedInput):
    """``--region``: ``None``/``"predicted"``/``"all"`` as is, or a mask file (NIfTI/PNG/NPY/DICOM, any
    channel > 0 inside) read and resampled by its geometry onto the model's input grid
    (:func:`medexplain.models.transforms.resample_to_grid`). Returns ``(region for resolve_target, name)``."""
    if region is None or isinstance(region, torch.Tensor):
        return region, None
    if isinstance(region, str) and region.strip().lower() in REGION_WORDS:
        return region.strip().lower(), None
    mask, mmeta = io.read_image(region)
    p = prep.prepared
    m = resample_to_grid(mask, mmeta.get("affine", np.eye(4)), tuple(p.image.shape[1:]), p.affine)
    if tuple(m.shape) != tuple(prep.out.shape[2:]):
        raise TargetError(f"--region {region}: the model's output grid {tuple(prep.out.shape[2:])} differs from its "
                          f"input grid {tuple(m.shape)}; give a mask on the output grid from Python")
    return m[None].to(prep.out.device), Path(region).name


def read_case(images, series: str | None = None) -> tuple[torch.Tensor, dict]:
    """The read stage of the one case pipeline (``explain``, ``run``, ``instances``, ``shapley``): ``images`` (one
    file or DICOM series folder, or a list of one file per channel) as ``(C, *spatial)`` with its meta
    (:func:`medexplain.io.read_channels`), warning when a 4D file looks like a time series (:func:`warn_series`)."""
    img, meta = io.read_channels(images, series=series)
    warn_series(images if isinstance(images, (str, os.PathLike)) else list(images)[0], img)
    return img, meta


def resolve_case_target(prep: PreparedInput, target=None, region=None, *, model=None, threshold: float = 0.5):
    """The target stage of the one case pipeline: ``region`` (``predicted``, ``all`` or a mask file on the image,
    :func:`read_region`) and the target grammar on the prepared prediction
    (:func:`medexplain.engine.targets.resolve_target`, read with the activation :func:`prepare_input` resolved)."""
    reg, reg_name = read_region(region, prep)
    return resolve_target(prep.out, target, reg, activation=prep.activation, model=model, threshold=threshold,
                          region_name=reg_name)


def plan_methods(methods: Sequence[str], net, out: torch.Tensor, layer=None,
                 skip_unsupported: bool = False) -> tuple[list[str], dict[str, str]]:
    """The canonical names of ``methods`` that apply to ``net`` (whose output is ``out``) and
    ``{name: reason}`` of those that do not (:meth:`medexplain.engine.registry.Method.why_not`). A method that
    does not apply is an :class:`~medexplain.errors.UnsupportedModelError` naming the methods that do,
    unless ``skip_unsupported``. ``layer`` must exist and be taken by some chosen method."""
    from medexplain.engine.core import find_layer
    from medexplain.engine.registry import registered

    names = [get_method(m).name for m in methods]
    if not names:
        raise OptionError("no method given")
    if len(set(names)) != len(names):
        raise OptionError(f"a method is listed twice: {list(methods)}")
    why = {n: get_method(n).why_not(net, out) for n in names}
    bad = {n: r for n, r in why.items() if r}
    if bad and not skip_unsupported:
        fits = sorted(n for n, m in registered().items() if m.applies_to(net, out))
        raise UnsupportedModelError(
            "; ".join(f"method {n!r} does not apply to this model: it {r}" for n, r in bad.items())
            + f". Methods that apply: {', '.join(fits)}. Drop it, or pass --skip-unsupported to explain with the "
            "others and record it as skipped")
    run = [n for n in names if n not in bad]
    if layer is not None:
        find_layer(net, layer)
        if not any((get_method(n).options() is None or "layer" in get_method(n).options()) for n in run):
            raise OptionError(f"--layer {layer!r} is given but none of {run} takes a layer (CAM methods do)")
    return run, bad


# --------------------------------------------------------------------------------------------------
# the model of a call
# --------------------------------------------------------------------------------------------------
def case_model(model) -> Model:
    """The one place a pipeline turns its ``model`` argument into a loaded :class:`~medexplain.models.model.Model`,
    once per call (per worker of a run): a ``Model`` as it is, a :class:`~medexplain.models.spec.ModelSpec` loaded
    (:meth:`~medexplain.models.spec.ModelSpec.load`, after its :meth:`~medexplain.models.spec.ModelSpec.check`),
    and anything else :func:`medexplain.models.model.load_model` takes (an ``nn.Module``, a path, a specification
    string, a list of them: an ensemble) as the source of a default ModelSpec. What a pipeline needs besides the
    networks travels on the Model: ``name`` (recorded in ``info.json``), ``preprocessing``, ``inferer``,
    ``postprocessing`` (a bundle's) and ``origin`` (the loaded bundle or nnU-Net model)."""
    if isinstance(model, Model):
        return model
    spec = model if isinstance(model, ModelSpec) else ModelSpec(source=model)
    return spec.load()


def method_options(methods: Sequence[str], options: dict | None, layer: str | None = None,
                   seed: int | None = None) -> dict[str, dict]:
    """Options per method (:func:`medexplain.engine.registry.route_options`, typed by each method's signature);
    with ``seed``, the methods that take a ``seed`` option get it unless given one."""
    from medexplain.engine.registry import accepted_options

    routed = route_options(list(methods), options, layer)
    if seed is not None:
        for m in methods:
            acc = accepted_options(m)
            if acc is not None and "seed" in acc:
                routed[m].setdefault("seed", seed)
    return routed


# --------------------------------------------------------------------------------------------------
# one case: read, prepare, plan, resolve the target, explain, write (explain and run share it)
# --------------------------------------------------------------------------------------------------
@dataclass
class CaseState:
    """What :func:`explain_case` knows about one case as it goes: the ``stage`` it is at (``image``,
    ``model``, ``plan``, ``target``, ``explain``, ``write``: an error says where it happened), the image
    and its ``meta``, the :class:`PreparedInput`, the methods to ``run`` and those ``skipped``, the resolved
    target and the ``info`` record (what ``info.json`` holds)."""

    images: list
    stage: str = "image"
    img: torch.Tensor | None = None
    meta: dict | None = None
    prep: PreparedInput | None = None
    run: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    resolved: object = None
    info: dict = field(default_factory=dict)

    def predicted(self, net) -> int | None:
        """The class the target grammar explains by default (a classifier's top class, a segmenter's largest
        predicted foreground class), or None when the model predicts no foreground."""
        if self.prep is None:
            return None
        out = self.prep.out
        if out.ndim == 2:
            return int(predicted_class(out)[0])
        try:
            return resolve_target(out, model=net, activation=self.prep.activation).class_index
        except TargetError:
            return None


class CaseWriter:
    """Where :func:`explain_case` puts a case's results: ``read`` once the image is read (checks of what will be
    written that need the image, before any compute), ``ready`` once the target is resolved, ``method``
    after each method (the map on the image grid), ``failed`` for a method that raised, ``finish`` at the end.
    ``explain`` writes NIfTI, PNG and ``info.json`` (:class:`FileWriter`); ``run`` writes its map and record."""

    def read(self, state: CaseState) -> None:
        pass

    def ready(self, state: CaseState) -> None:
        pass

    def method(self, state: CaseState, method: str, attr: Attribution, amap: torch.Tensor) -> list[Path]:
        return []

    def failed(self, state: CaseState, method: str, error: Exception) -> None:
        pass

    def finish(self, state: CaseState) -> list[Path]:
        return []


def write_map(amap: torch.Tensor, path, meta: dict, spatial_dims: int) -> Path:
    """A map ``(C_or_1, *spatial)`` on the image grid as NIfTI on the image's affine and sform/qform code
    (:func:`medexplain.io.write_nifti`): the one map writer of ``explain`` and ``run``."""
    return io.write_nifti(amap, path, meta["affine"], spatial_dims=spatial_dims, xform_code=meta.get("xform_code", 1))


def model_record(model: Model) -> dict:
    """What ``info.json`` records of the model of a case: its ``model`` name, the ``output`` it explains, its
    sliding window (``inferer``) and the ``bundle`` / ``nnunet`` model it was built from (None otherwise)."""
    out = model.output_adapter
    origin, kind = model.origin, type(model.origin).__name__
    return {"model": model.name, "output": out if out is None or isinstance(out, (int, str)) else repr(out),
            "inferer": inferer_settings(model.inferer) if model.inferer is not None else None,
            "bundle": origin.describe() if kind == "Bundle" else None,
            "nnunet": origin.describe() if kind == "NnUNetModel" else None}


def explain_case(model, images: list, methods: Sequence[str], writer: CaseWriter, *,
                 per_method: dict[str, dict], target=None, region=None, layer: str | None = None,
                 threshold: float = 0.5, skip_unsupported: bool = False,
                 series: str | None = None, seed: int | None = None, memory: float | None = None,
                 state: CaseState | None = None,
                 on_estimate: Callable | None = None,
                 on_progress: Callable[[str, int, int | None], None] | None = None) -> CaseState:
    """The one case pipeline: read ``images`` (one file or DICOM folder, or one file per channel), prepare them
    for ``model`` (:func:`case_model`: a Model, a module, a :class:`~medexplain.models.spec.ModelSpec`; loaded once
    per call) and run it once (:func:`prepare_input`), plan the ``methods`` (:func:`plan_methods`), resolve the
    target (:func:`medexplain.engine.targets.resolve_target` with ``region``: :func:`read_region`), then explain
    with each method (the global RNG seeded with ``seed`` first, when given) and hand each map, put back on the
    image grid, to ``writer``. A method that raises goes to ``writer.failed`` and the others go on; an error
    before the methods propagates, with ``state.stage`` saying where (pass ``state`` to read it).
    ``target``: the target grammar (a class index, ``predicted``) with ``region``, or a callable
    ``(state) -> ResolvedTarget`` called at the target stage (after the prediction and the plan, before the memory
    plan): a command's own target, e.g. the lesion instances as a :class:`~medexplain.engine.targets.Regions` target
    (``instances``) or a contrast-Shapley value target (``shapley``); it may complete options of ``per_method`` that
    depend on the prediction (a layer) and empty ``state.run`` when there is nothing to explain.
    ``per_method``: each method's options (:func:`method_options`). ``memory``: the budget in GB of one model call
    (default half the memory available; :func:`medexplain.engine.options.plan_memory`: ``chunk_size`` is capped to fit,
    and a method that cannot fit one row refuses the case before any method runs)."""
    st = state if state is not None else CaseState(list(images))
    st.stage = "model"
    model = case_model(model)
    st.stage = "image"
    st.img, st.meta = read_case(images, series)
    writer.read(st)
    st.stage = "model"
    st.prep = prep = prepare_input(st.img, st.meta, model)
    st.stage = "plan"
    st.run, st.skipped = plan_methods(methods, model, prep.out, layer, skip_unsupported)
    st.stage = "target"
    st.resolved = (target(st) if callable(target) else   # a command's own target: lesion instances, a value target
                   resolve_case_target(prep, target, region, model=model, threshold=threshold))
    record = model_record(model)
    st.info = {"image": str(images[0]) if len(images) == 1 else [str(p) for p in images], "model": record.pop("model"),
               "target": st.resolved.class_index, "target_info": st.resolved.info(), "output": record.pop("output"),
               "preprocessing": prep.record(), "methods": {}, "skipped": dict(st.skipped), "failed": {},
               "input": io.geometry_record(st.meta), "warnings": list(st.meta.get("warnings", [])), **record}
    st.stage = "memory"
    per_method, plans = dict(per_method), {}
    for m in st.run:  # the memory of every method's model calls, before any of them runs
        per_method[m], plans[m] = ((per_method[m], None) if model.inferer is not None else
                                   plan_memory(m, get_method(m).fn, model, prep.x, per_method[m], memory))
    writer.ready(st)
    for m in st.run:
        st.stage = "explain"
        try:
            attr, est = explain_method(model, prep.x, m, st.resolved.target, per_method[m], memory=memory, seed=seed,
                                       seconds_per_row=prep.seconds_per_row, plan=plans[m], on_estimate=on_estimate,
                                       on_progress=on_progress)
            st.stage = "preprocessing"
            amap = prep.invert(attr.map[0].detach().cpu())
        except Exception as e:  # recorded; the finished methods' files stay
            st.info["failed"][m] = f"{type(e).__name__}: {e}"
            writer.failed(st, m, e)
            continue
        st.info["methods"][m] = {**attr.info, "estimate": est.as_dict()}
        st.stage = "write"
        writer.method(st, m, attr, amap)
    st.stage = "write"
    writer.finish(st)
    return st


def explain_method(model, x: torch.Tensor, method: str, target, options: dict, *,
                   memory: float | None = None, seed: int | None = None, seconds_per_row: float = 0.0, plan=None,
                   on_estimate: Callable | None = None,
                   on_progress: Callable[[str, int, int | None], None] | None = None):
    """The explain stage of the one case pipeline: one ``method`` (its checked ``options``) of ``model``
    (:func:`case_model`) on the model input ``x`` (a batch) for ``target``. Its cost estimate first
    (:func:`medexplain.engine.options.estimate_cost` at ``seconds_per_row``, one timed forward's seconds per row,
    with the memory ``plan``; handed to ``on_estimate``), the global RNG seeded with ``seed`` when given, then
    :func:`medexplain.engine.explain` with every model call's rows counted (``on_progress(method, rows_done,
    rows_expected_or_None)``) through the model object (:func:`medexplain.engine.options.counting`: every setting
    of the :class:`~medexplain.models.model.Model` kept). :func:`explain_case` runs it for each method of a case,
    ``medexplain demo`` for each method on its batch of test images. Returns ``(Attribution, CostEstimate)``."""
    model = case_model(model)
    est = estimate_cost(method, get_method(method).fn, x.shape, options, seconds_per_row, plan)
    if on_estimate:
        on_estimate(est)
    done = [0]

    def rows(n):
        done[0] += n
        if on_progress:
            on_progress(method, done[0], est.n_forward)

    if seed is not None:
        torch.manual_seed(seed)
    # the model object with its passes counted: every setting of a Model (the eval policy) is kept
    attr = explain(counting(model, rows), x, method=method, target=target, memory=memory, **options)
    return attr, est


# --------------------------------------------------------------------------------------------------
# explain one image
# --------------------------------------------------------------------------------------------------
@dataclass
class ExplainedImage:
    """What :func:`explain_image` computed and wrote: the explained ``target`` class, how it was chosen
    (``target_info``: class, region, region voxels, how), one :class:`~medexplain.Attribution` per
    method that ran (its map on the model's input grid), the methods ``skipped`` (not applicable, with
    ``skip_unsupported``) and ``failed`` (with their errors), and the files (``<stem>_<method>.nii.gz``
    and ``.png`` per method, ``<stem>_info.json``), and the reader's ``warnings`` (e.g. a zero pixel spacing
    replaced by 1 mm)."""

    target: int
    attributions: dict[str, Attribution]
    files: list[Path] = field(default_factory=list)
    target_info: dict = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)   # SOP Instance UIDs sent to a PACS (medexplain.io.pacs.explain_pacs)


class FileWriter(CaseWriter):
    """``explain``'s files of one case in ``out``: per method ``<stem>_<method>.nii.gz`` (:func:`write_map`),
    ``.png`` and the DICOM objects, as ``formats`` asks (:func:`_write_method_files`,
    :func:`medexplain.io.dicom.write_dicom_objects`), ``<stem>_info.json`` rewritten after every method, and a
    bundle's own prediction; with ``report``, ``<stem>_report.html`` at the end (:func:`write_case_report`)."""

    def __init__(self, model: Model, out: Path, stem: str, on_method: Callable[[str], None] | None = None, *,
                 formats=("nifti", "png"), dicom_reference=None, dicom_threshold="otsu", series: str | None = None,
                 figure: dict | None = None, report: bool = False):
        self.model, self.out, self.stem, self.on_method = model, out, stem, on_method
        self.report = report
        self.maps: dict[str, torch.Tensor] = {}  # each method's map on the image grid, for the report
        self.figure = dict(figure or {})         # render.figure options of the PNGs (checked by the caller)
        self.formats, self.dicom_reference, self.dicom_threshold, self.series = (formats, dicom_reference,
                                                                                 dicom_threshold, series)
        self.info_path = out / f"{stem}_info.json"
        self.files: list[Path] = []
        self.attributions: dict[str, Attribution] = {}
        self.dicom_src = None

    def read(self, state):
        from medexplain.io.dicom import dicom_source_for  # the DICOM study the objects join, checked before any compute

        self.dicom_src = dicom_source_for(state.images, state.meta, self.formats, self.dicom_reference, self.series)

    def ready(self, state):
        src = self.dicom_src
        state.info.update(formats=list(self.formats), dicom=None if src is None else {
            "study": src.study_uid, "source": str(src.path), "frame_of_reference": src.frame_of_reference_uid,
            "threshold": self.dicom_threshold}, zoo=_zoo_card(self.model))

    def method(self, state, method, attr, amap):
        self.attributions[method] = attr
        if self.report:
            self.maps[method] = amap
        self.files += write_method_outputs(state, method, amap, self.out, self.stem, self.formats, self.dicom_src,
                                           self.dicom_threshold, self.figure)
        io.write_json(state.info, self.info_path)
        if self.on_method:
            self.on_method(method)

    def failed(self, state, method, error):
        io.write_json(state.info, self.info_path)
        if self.on_method:
            self.on_method(method)

    def finish(self, state):
        post = self.model.postprocessing
        if post is not None:  # the bundle's own prediction, on the image grid, of what its network outputs
            pred = self.model.network_output(state.prep.x, state.prep.out)
            self.files.append(io.write_nifti(post(pred[0], state.prep.prepared),
                                             self.out / f"{self.stem}_prediction.nii.gz", state.meta["affine"],
                                             spatial_dims=state.img.ndim - 1,
                                             xform_code=state.meta.get("xform_code", 1)))
        if not state.run:
            io.write_json(state.info, self.info_path)
        self.files.append(self.info_path)
        if self.report:
            self.files.append(write_case_report(state, self.maps, self.out / f"{self.stem}_report.html"))


def explain_image(image, model, methods: Sequence[str] | str, out, *, target=None,
                  region=None, layer: str | None = None, options: dict | None = None, threshold: float = 0.5,
                  skip_unsupported: bool = False, on_method: Callable[[str], None] | None = None,
                  on_estimate: Callable | None = None, overwrite: bool = False, series: str | None = None,
                  on_progress: Callable[[str, int, int | None], None] | None = None,
                  seed: int | None = None, formats=None, dicom_reference=None,
                  dicom_threshold="otsu", memory: float | None = None,
                  figure: dict | None = None, report: bool = False) -> ExplainedImage:
    """Explain one image with each of ``methods`` and write NIfTI maps on the input's affine, PNG
    overlays and ``info.json`` into ``out``: :func:`explain_case` (the one case pipeline, which ``run``
    uses too) with :class:`FileWriter`. ``image``: one file (or DICOM series folder), or a list of
    single-channel files on one grid, one per input channel (:func:`medexplain.io.read_channels`; with an
    nnU-Net model nnU-Net's ``CASE_0000.nii.gz`` names are ordered by their suffix and name the outputs ``CASE``).

    ``model``: an :class:`mx.Model <medexplain.models.model.Model>`, an ``nn.Module`` (wrapped), an
    :class:`mx.ModelSpec <medexplain.models.spec.ModelSpec>` (loaded once the cheap checks pass) or anything
    :func:`medexplain.models.model.load_model` takes (a file, ``package.module:factory``, ``zoo:<task>``, a MONAI
    bundle or nnU-Net folder, a list of these: an ensemble); :func:`case_model`. Everything about the model lives
    there: weights, output adapter, activation (``auto`` detects probabilities), preprocessing (applied before the
    model and inverted for the maps, so they land on the input's own grid), sliding window (every method then runs
    through it, window by window, :mod:`medexplain.engine.sliding`), flips, ensemble, device, train/eval policy.
    A bundle's postprocessing writes the bundle's own prediction on the image grid as ``<stem>_prediction.nii.gz``
    (of what its network outputs: probabilities where it ends in a Softmax, :meth:`Model.network_output
    <medexplain.models.model.Model.network_output>`).

    ``target``/``region``: the one target grammar (:func:`medexplain.engine.targets.resolve_target`):
    ``target`` a class index or ``None``/``"predicted"`` (a classifier's top class; a segmenter's
    foreground class with the most predicted voxels), ``region`` for segmenters ``"predicted"``
    (default), ``"all"`` or a mask file resampled onto the image grid by its geometry. ``options``: ``{"key": v}`` for every
    method accepting ``key`` or ``{"method.key": v}`` for one, typed by each method's signature (text
    parsed); ``layer`` for every method that takes one; ``seed`` seeds the global RNG before each method and
    goes to the methods that take a ``seed`` option. ``figure``: options of the PNG figures
    (:func:`medexplain.io.render.figure_options`: ``alpha``, ``percentile``, ``cmap``, ``planes``, ``point``).
    ``report``: also write ``<stem>_report.html``, the self-contained HTML report of the case
    (:func:`write_case_report`: the input, each method's map, the tri-planar viewer for volumes).

    Everything that can fail before compute is checked first: option names and types, the output
    folder, the image, the model on it, every method against the model (:func:`plan_methods`; with
    ``skip_unsupported`` a method that does not apply is recorded as skipped), the layer, the target and
    the memory of each method's model calls (``memory``: the budget in GB, default half the memory available;
    :func:`medexplain.engine.options.plan_memory`: ``chunk_size`` is capped to fit, and a method that cannot fit one
    row refuses the call before any method runs).
    Then each method runs and its files and ``info.json`` are written at once; a method that fails is
    recorded in ``info.json`` with its error and the others go on, and a
    :class:`~medexplain.errors.PartialFailure` is raised at the end (its ``result`` is this function's
    return value). ``on_estimate(CostEstimate)`` is called before each method, ``on_progress(method,
    rows_done, rows_total_or_None)`` as rows pass through the model, ``on_method(name)`` after each.
    Files are named ``<file_stem(image)>_<method>`` (a DICOM series folder: its name), plus
    ``<file_stem(image)>_info.json`` (with the input's geometry and the reader's warnings); a file of this
    call that already exists is refused before any compute unless ``overwrite``. ``series``: the
    SeriesInstanceUID to read when ``image`` is a folder holding several DICOM series.

    ``formats``: any of ``nifti``, ``png``, ``dicom`` (a list or comma-separated; default ``nifti,png``).
    ``dicom`` writes each map as a Parametric Map, a Segmentation (thresholded by ``dicom_threshold``, the
    ``metrics`` rule) and a Secondary Capture in the source study (:mod:`medexplain.io.dicom`,
    ``docs/dicom.md``); a non-DICOM ``image`` needs ``dicom_reference``, the DICOM series it was made from.
    """
    from medexplain.io.dicom import parse_formats

    formats = parse_formats(formats)
    methods = [m.strip() for m in methods.split(",") if m.strip()] if isinstance(methods, str) else list(methods)
    methods = [get_method(m).name for m in methods]
    per_method = method_options(methods, options, layer, seed)
    from medexplain.io import render
    figure = render.figure_options(figure)
    kind = model_kind(model)
    out = io.check_output_dir(out)
    images, stem = input_files(image, kind == "nnunet")
    _check_outputs(stem, methods, out, overwrite, formats, report)
    if kind == "bundle":
        io.check_output_dir(out, [out / f"{stem}_prediction.nii.gz"], overwrite=overwrite)
    model = case_model(model)
    writer = FileWriter(model, out, stem, on_method, formats=formats, dicom_reference=dicom_reference,
                        dicom_threshold=dicom_threshold, series=series, figure=figure, report=report)
    st = explain_case(model, images, methods, writer, per_method=per_method, target=target, region=region, layer=layer,
                      threshold=threshold, skip_unsupported=skip_unsupported,
                      series=series, seed=seed, memory=memory, on_estimate=on_estimate, on_progress=on_progress)
    res = ExplainedImage(st.resolved.class_index, writer.attributions, writer.files, st.info["target_info"],
                         dict(st.skipped), dict(st.info["failed"]), st.info["warnings"])
    if res.failed:
        raise PartialFailure(f"{len(res.failed)} of {len(methods)} method(s) failed: "
                             + "; ".join(f"{m}: {e}" for m, e in res.failed.items())
                             + f". The other maps and info.json (with the errors) are in {out}", res.failed, res)
    return res


def method_table(model=None, *, image=None) -> list[dict]:
    """``medexplain methods``: :func:`medexplain.engine.registry.describe_methods` for ``model`` (:func:`case_model`:
    a Model, a module, a :class:`~medexplain.models.spec.ModelSpec`, a specification); ``image``: a file the model
    is run on once (no gradients) so that classifier-only methods are judged on its real output."""
    from medexplain.engine.registry import describe_methods
    if model is None:
        return describe_methods()
    m = case_model(model)
    out = None
    if image is not None:
        img, _ = io.read_image(image)
        out = checked_forward(m, _model_input(img, m))
    return describe_methods(m, out)


def model_kind(model) -> str | None:
    """``"nnunet"``, ``"bundle"`` or None: what a pipeline's ``model`` argument (a Model, a
    :class:`~medexplain.models.spec.ModelSpec`, a source) is built from, known before it is loaded
    (:func:`medexplain.models.model.source_kind`)."""
    if isinstance(model, ModelSpec):
        if model.nnunet is not None:
            return "nnunet"
        if model.bundle is not None:
            return "bundle"
        model = model.source
    return source_kind(model)


def input_files(image, nnunet: bool) -> tuple[list, str]:
    """``(files, stem)`` of :func:`explain_image`'s ``image``: a list of one file (or series folder) or of one
    file per channel; the output stem is :func:`medexplain.io.file_stem` of the first, or the nnU-Net case
    identifier (``CASE`` of ``CASE_0000.nii.gz``) when the files are an nnU-Net case's channels."""
    if isinstance(image, (str, os.PathLike)):
        return [image], io.file_stem(image)
    images = list(image)
    if not images:
        raise InputError("no image file given")
    if nnunet and len(images) > 1:
        from medexplain.models.nnunet import case_stem, order_channel_files
        images = order_channel_files(images)
        return images, case_stem(images[0]) or io.file_stem(images[0])
    return images, io.file_stem(images[0])


def _output_names(stem: str, methods: Sequence[str], out: Path, formats=("nifti", "png"),
                  report: bool = False) -> tuple[list[Path], Path]:
    """The files :func:`explain_image` writes under ``stem``: per method ``<stem>_<method>.nii.gz`` (``nifti``),
    ``.png`` (``png``) and ``_pm.dcm``, ``_seg.dcm``, ``_sc.dcm`` (``dicom``), ``<stem>_report.html`` (``report``)
    and ``<stem>_info.json``."""
    from medexplain.io.dicom import dicom_output_names

    exts = [e for f, e in (("nifti", ".nii.gz"), ("png", ".png")) if f in formats]
    maps = [out / f"{stem}_{io.method_file(m)}{ext}" for m in methods for ext in exts]
    if "dicom" in formats:
        maps += [p for m in methods for p in dicom_output_names(out, stem, m)]
    if report:
        maps.append(out / f"{stem}_report.html")
    return maps, out / f"{stem}_info.json"


def _check_outputs(stem: str, methods: Sequence[str], out: Path, overwrite: bool, formats=("nifti", "png"),
                   report: bool = False) -> Path:
    """Before any compute: refuse (naming them) files of this call that already exist, unless ``overwrite``;
    returns the ``info.json`` path."""
    maps, info_path = _output_names(stem, methods, out, formats, report)
    io.check_output_dir(out, maps + [info_path], overwrite=overwrite)
    return info_path


def _figure_title(method: str, info: dict) -> tuple[str, str]:
    """(title, subtitle) of a method's PNG figure: method, target and model; the input and its geometry."""
    t = info.get("target_info") or {}
    target = f"target {info.get('target')}" + (f", region {t['region']}" if t.get("region") not in (None, "") else "")
    geo = info.get("input", {})
    spacing = " x ".join(f"{v:.3g}" for v in geo.get("spacing", ())) + " mm" if geo.get("spacing") else ""
    sub = " \u00b7 ".join(x for x in (Path(str(info.get("image", ""))).name, geo.get("modality") or "", spacing,
                                       "; ".join(info.get("warnings", []))) if x)
    return f"{method} \u00b7 {target} \u00b7 model {info.get('model')}", sub


def write_method_outputs(state: CaseState, method: str, amap: torch.Tensor, out: Path, stem: str, formats,
                         dicom_src=None, dicom_threshold="otsu", figure: dict | None = None) -> list[Path]:
    """One method's outputs as ``formats`` asks, the one writer of ``explain`` (:class:`FileWriter`) and ``run``
    (its case folder, ``stem`` empty): the NIfTI map and PNG figure (:func:`_write_method_files`) and, with
    ``dicom_src`` (:func:`medexplain.io.dicom.dicom_source_for`, found before any compute), the Parametric Map,
    Segmentation (thresholded by ``dicom_threshold``) and Secondary Capture
    (:func:`medexplain.io.dicom.write_dicom_objects`). The figure draws the explained region and names a
    perturbation baseline; ``figure``: the user's options of :func:`medexplain.io.render.figure`. Returns the paths written."""
    title = _figure_title(method, state.info)
    fig = {**(figure or {}), "region": _figure_region(state.resolved.target, state.prep),
           "caption": _figure_caption(state.info.get("methods", {}).get(method, {}))}
    files = _write_method_files(state.img, amap, out, stem, method, state.meta, title, formats, fig)
    if dicom_src is not None:
        from medexplain.io.dicom import write_dicom_objects
        files += write_dicom_objects(dicom_src, state.img, amap, state.meta, out, stem, method,
                                     target=state.resolved.class_index, model=state.info["model"], title=title,
                                     threshold=dicom_threshold)
    return files


def _zoo_card(net) -> dict | None:
    """The card of a zoo model (:func:`medexplain.models.zoo.model_card`, set by ``zoo:<task>``) inside ``net``
    (also when wrapped in an ``mx.Model``), for ``info.json``; None for other models."""
    return next((m.zoo_info.get("card") for m in net.modules() if isinstance(getattr(m, "zoo_info", None), dict)),
                None) if isinstance(net, torch.nn.Module) else None


def _figure_region(target, prep):
    """The explained region of a :class:`~medexplain.engine.targets.Region` target on the image grid (bool), for the
    figure's planes and outline; None for class targets (or when it cannot be put back on the image grid)."""
    mask = getattr(target, "mask", None)
    if mask is None:
        return None
    m = mask[0]
    m = m[0] if m.ndim == prep.x.ndim - 1 else m
    try:
        return prep.invert(m[None].float(), nearest=True)[0] > 0.5
    except Exception:  # a figure annotation only: the map and its files do not depend on it
        return None


def _figure_caption(info: dict) -> str:
    """What a method's figure must say beyond the scale: a perturbation method's baseline."""
    return f"Perturbation baseline (what replaced each removed region): {info['baseline']}." if info.get("baseline") else ""


def _cost_text(info: dict) -> str:
    """A method's cost as the report states it: its model passes and seconds (``info`` of one method)."""
    parts = [f"{info[k]} {w}" for k, w in (("n_forward", "forward"), ("n_backward", "backward")) if info.get(k)]
    if info.get("seconds") is not None:
        parts.append(f"{float(info['seconds']):.2f} s")
    return ", ".join(parts)


def write_case_report(state: CaseState, maps: dict, path: Path) -> Path:
    """The HTML report of one explained case (:func:`medexplain.io.report.write_report`), from what
    :func:`explain_case` has: the input image, each method's map on the image grid (``maps``), the explained
    region outlined, a caption per method (method, target, model, perturbation baseline) and a table of each
    method's cost and score note; methods skipped or failed are listed with their reasons. A volume gets the
    report's tri-planar viewer on the image's affine."""
    from medexplain.io.report import write_report

    info, img = state.info, state.img
    region = _figure_region(state.resolved.target, state.prep)
    rows, caps = [], {}
    for m in maps:
        mi = info.get("methods", {}).get(m, {})
        caps[m] = " \u00b7 ".join(x for x in (_figure_title(m, info)[0], _figure_caption(mi)) if x)
        rows.append({"method": m, "cost": _cost_text(mi), "baseline": mi.get("baseline"), "score": mi.get("score"),
                     "estimated seconds": (mi.get("estimate") or {}).get("seconds")})
    name = Path(str(info.get("image", ""))).name or "case"
    t = info.get("target_info") or {}
    target = f"class {info.get('target')}" + (f", region {t['region']}" if t.get("region") not in (None, "") else "")
    case = {"image": img, "maps": maps, "mask": region, "title": f"{name}: {target}, model {info.get('model')}",
            "captions": caps}
    if img.ndim == 4:
        case.update(affine=state.meta.get("affine"), oriented=bool(state.meta.get("oriented", False)))
    sub = _figure_title("", info)[1]
    notes = ([f"Input: {sub}."] if sub else []) + ([f"Target: {t['how']}."] if t.get("how") else [])
    if img.shape[0] not in (1, 3):
        notes.append(f"The image has {img.shape[0]} channels: channel 0 is shown; the maps are summed over channels.")
    notes += [f"Skipped {m}: {why}" for m, why in info.get("skipped", {}).items()]
    notes += [f"Failed {m}: {err}" for m, err in info.get("failed", {}).items()]
    notes += [f"Warning: {w}" for w in info.get("warnings", [])]
    return Path(write_report(path, [case], list(maps), rows, title=f"medexplain explain: {name}", notes=notes,
                             mask_label="the explained region (outline)" if region is not None else
                             "no region outline (a class target: the whole image is explained)"))


def _write_method_files(img: torch.Tensor, amap: torch.Tensor, out: Path, stem: str, method: str, meta: dict,
                        title: tuple[str, str] = ("", ""), formats=("nifti", "png"), figure: dict | None = None) -> list[Path]:
    """One method's files: the map ``(C_or_1, *spatial)`` on the image grid as NIfTI on the input's
    affine (channels on the 4th axis, also for 2D; ``nifti`` in ``formats``) and as a PNG figure on the image
    (``png``; ``figure``: options of :func:`medexplain.io.render.figure`), each written atomically, named
    ``<stem>_<method>`` (``<method>`` with an empty ``stem``)."""
    nd = img.ndim - 1
    files = []
    name = f"{stem + '_' if stem else ''}{io.method_file(method)}"
    if "nifti" in formats:
        files.append(write_map(amap, out / f"{name}.nii.gz", meta, spatial_dims=nd))
    if "png" in formats:
        files.append(io.write_png_overlay(img, amap, out / f"{name}.png", affine=meta["affine"],
                                          oriented=meta.get("oriented", False), title=title[0], subtitle=title[1],
                                          label=method, patient_orientation=meta.get("patient_orientation"),
                                          **(figure or {})))
    return files


# the lesion-instance and contrast-Shapley pipelines live in their own modules (re-exported here)
from medexplain.pipelines.instances import LesionInstances, explain_lesion_instances  # noqa: E402
from medexplain.pipelines.shapley import SHAPLEY_VALUE_HELP, ContrastShapley, contrast_shapley, shapley_value_function  # noqa: E402
