"""The unit of work of a run: explain one chunk of cases with every method, write maps, then records.

:class:`CaseProcessor` loads the model once and is used as it is by the local backend and wrapped as a
Ray actor by the Ray backend, so both backends run the same code on the same chunks and produce the
same numbers.

Reproducibility does not depend on how a run was split or interrupted. A chunk is a fixed slice of the
manifest (``batch_size`` consecutive cases). Within it, the readable cases of equal shape are stacked
into one batch per method, and that batch is always the whole group, also when some of its items are
already complete (only the missing ones are written): the batch a case is explained in is therefore
the same in an uninterrupted run, a resumed one, and on any worker. Before every batch the global RNG is
seeded with the run's seed, and methods that take a ``seed`` option get it.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch

from .. import io
from ..core import check_input, forward, is_scripted, model_expectations, model_guard, require_hooks
from ..errors import InputError, MedexplainError
from ..explain import explain
from ..metrics.localisation import hit_rate
from ..models.loading import load_model
from ..pipelines import predicted_class
from ..registry import get_method
from ..targets import Class, Region, ResolvedTarget, resolve_target
from ..transforms import resample_to_grid
from .manifest import Case
from .store import RunStore


@dataclass
class WorkerSpec:
    """Everything a worker needs, picklable (sent to Ray actors)."""

    model: str
    methods: list[str]
    out: str
    options: dict[str, dict] = field(default_factory=dict)
    weights: str | None = None
    map_format: str = "nifti"
    seed: int = 0
    retry_errors: bool = False
    device: str | None = None      # None: CUDA when available, else CPU
    threads: int | None = None     # torch intra-op threads in this worker (None: leave as is)
    memory: float | None = None    # GB per model call (None: half the memory available here)


def error_message(err: BaseException, stage: str) -> str:
    """One line: our typed errors speak for themselves; others get their type name."""
    msg = str(err) if isinstance(err, MedexplainError) else f"{type(err).__name__}: {err}"
    msg = " ".join(msg.split())
    return f"{stage}: {msg[:500]}"


class CaseProcessor:
    """Loads the model once; :meth:`process` explains a chunk of cases and returns their records."""

    def __init__(self, spec: WorkerSpec, model: torch.nn.Module | None = None):
        self._cpu0 = time.process_time()
        if spec.threads:
            torch.set_num_threads(int(spec.threads))
        self.spec = spec
        self.device = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if model is None:  # a Ray actor loads its own copy, once
            model = load_model(spec.model, spec.weights, map_location=str(self.device))
        self.model = model.to(self.device)
        params = [p for p in self.model.parameters() if torch.is_floating_point(p)]
        self.dtype = params[0].dtype if params else torch.float32
        expect = model_expectations(self.model)    # {} for TorchScript
        self.channels, self.spatial_dims = expect.get("channels"), expect.get("spatial_dims")
        self.store = RunStore(spec.out, spec.map_format)
        self.warnings: dict[str, list[str]] = {}   # per case: the reader's warnings (e.g. a zero pixel spacing)

    def ping(self) -> str:
        return str(self.device)

    def stats(self) -> dict:
        """This worker's process and the CPU time it used since it started (model loading included)."""
        return {"pid": os.getpid(), "device": str(self.device), "cpu_seconds": time.process_time() - self._cpu0}

    # --- one chunk ---------------------------------------------------------------------------------
    def process(self, cases: list[Case]) -> list[dict]:
        """Explain ``cases`` with every method; write each missing item's map, then its record."""
        todo = {c.case_id: [m for m in self.spec.methods
                            if not self.store.is_done(c.case_id, m, self.spec.retry_errors)] for c in cases}
        if not any(todo.values()):
            return []
        records: list[dict] = []
        loaded, groups = {}, {}
        for c in cases:
            stage = "image"
            try:
                x, affine, prep = self._image(c)
                stage = "mask"
                loaded[c.case_id] = (x, affine, self._mask(c, prep.prepared.original_shape), prep)
            except Exception as e:  # a bad case is recorded and the run goes on
                records += self._errors(c, todo[c.case_id], e, stage)
                continue
            groups.setdefault(tuple(x.shape[1:]), []).append(c)
        for group in groups.values():
            records += self._group(group, loaded, todo)
        return records

    def _image(self, case: Case):
        """The case's model input (after its manifest preprocessing, :class:`medexplain.transforms.Preprocessing`),
        the image's affine, and the preprocessing record (to put the maps back on the image grid)."""
        img, meta = io.read_image(case.image)
        self.warnings[case.case_id] = list(meta.get("warnings", []))
        pre = case.preprocessing_spec().build()
        prep = _CasePrep(pre, pre.apply(img, meta["affine"]))
        x = check_input(prep.prepared.image[None], spatial_dims=self.spatial_dims, channels=self.channels)
        return x.to(self.device, self.dtype), meta["affine"], prep  # the model's dtype: float32 files, float64 models

    def _mask(self, case: Case, shape: tuple):
        """The evidence mask as bool ``(*spatial)`` (any channel > 0), on the image grid."""
        if not case.mask:
            return None
        m, _ = io.read_image(case.mask)
        if tuple(m.shape[1:]) != tuple(shape):
            raise InputError(f"mask grid {tuple(m.shape[1:])} does not match the image grid {tuple(shape)}")
        return (m > 0).any(0)

    def _region(self, case: Case, prep: "_CasePrep"):
        """The manifest's ``region``: None / ``predicted`` / ``all``, or its mask file on the model's grid."""
        if case.region in (None, "predicted", "all"):
            return case.region
        m, meta = io.read_image(case.region)
        p = prep.prepared
        return resample_to_grid(m, meta["affine"], tuple(p.image.shape[1:]), p.affine)[None]

    def _group(self, group: list[Case], loaded: dict, todo: dict) -> list[dict]:
        """Cases of one shape: predict, resolve targets, then explain the whole group per method."""
        records = []
        xb = torch.cat([loaded[c.case_id][0] for c in group])
        try:
            with torch.no_grad(), model_guard(self.model):
                outs = forward(self.model, xb)
        except Exception:  # isolate the case(s) the model cannot run on
            outs = None
        keep, targets, preds = [], [], []
        for i, c in enumerate(group):
            try:
                if outs is None:
                    with torch.no_grad(), model_guard(self.model):
                        o = forward(self.model, loaded[c.case_id][0])
                else:
                    o = outs[i:i + 1]
                pred = _default_class(o, self.model)
            except Exception as e:
                records += self._errors(c, todo[c.case_id], e, "model")
                continue
            try:  # the one target grammar: a segmenter's default is its largest predicted foreground region
                t = resolve_target(o, c.target, self._region(c, loaded[c.case_id][3]), model=self.model)
            except Exception as e:
                records += self._errors(c, todo[c.case_id], e, "target", predicted=pred)
                continue
            keep.append(c)
            targets.append(t)
            preds.append(pred)
        if not keep:
            return records
        xb = torch.cat([loaded[c.case_id][0] for c in keep])
        for m in self.spec.methods:
            need = [i for i, c in enumerate(keep) if m in todo[c.case_id]]
            if not need:
                continue
            results = self._explain(m, xb, targets, need)
            for i in need:
                c = keep[i]
                base = self._base(c, m, targets[i], preds[i])
                res = results[i]
                if isinstance(res, Exception):
                    records.append(self._write_error(base, res, "explain"))
                    continue
                amap, info = res
                try:
                    amap = loaded[c.case_id][3].invert(amap)          # back on the image grid
                except Exception as e:
                    records.append(self._write_error(base, e, "preprocessing"))
                    continue
                try:
                    records.append(self._write_ok(base, amap, info, loaded[c.case_id][1], loaded[c.case_id][2]))
                except Exception as e:  # a map that cannot be written is the case's error row, not the run's end
                    records.append(self._write_error(base, e, "write"))
        return records

    def _explain(self, method: str, xb: torch.Tensor, targets: list[ResolvedTarget], need: list[int]) -> dict:
        """Maps of the whole group (reproducible batch); on failure, case by case to isolate bad ones."""
        opts = dict(self.spec.options.get(method, {}))
        torch.manual_seed(self.spec.seed)
        try:
            attr = explain(self.model, xb, method, target=_batch_target(targets), memory=self.spec.memory, **opts)
            return {i: (attr.map[i], _per_case_info(attr.info, xb.shape[0], i)) for i in need}
        except Exception as group_error:
            if xb.shape[0] == 1:
                return {i: group_error for i in need}
        out = {}
        for i in need:
            torch.manual_seed(self.spec.seed)
            try:
                attr = explain(self.model, xb[i:i + 1], method, target=targets[i].target, memory=self.spec.memory,
                               **opts)
                out[i] = (attr.map[0], _per_case_info(attr.info, 1, 0))
            except Exception as e:
                out[i] = e
        return out

    # --- records -----------------------------------------------------------------------------------
    def _base(self, c: Case, method: str, target=None, predicted=None) -> dict:
        resolved = target if isinstance(target, ResolvedTarget) else None
        target = resolved.class_index if resolved is not None else target
        source = None if target is None else ("manifest" if c.target is not None else "predicted")
        rec = {"case_id": c.case_id, "index": c.index, "image": c.image, "mask": c.mask, "label": c.label,
               "target": target, "target_source": source, "predicted": predicted, "method": method}
        if resolved is not None and resolved.region is not None:
            rec.update(region=resolved.region, region_voxels=resolved.voxels[0])
        if c.preprocessing:
            rec["preprocessing"] = dict(c.preprocessing)
        return rec

    def _errors(self, c: Case, methods: list[str], err: Exception, stage: str, predicted=None) -> list[dict]:
        return [self._write_error(self._base(c, m, c.target, predicted), err, stage) for m in methods]

    def _write_error(self, base: dict, err: Exception, stage: str) -> dict:
        rec = {**base, "status": "error", "error_type": type(err).__name__, "error": error_message(err, stage)}
        self.store.write_record(rec)
        return rec

    def _write_ok(self, base: dict, amap: torch.Tensor, info: dict, affine, mask) -> dict:
        amap = amap.detach().float().cpu()
        rel = self.store.write_map(base["case_id"], base["method"], amap, affine)   # the map first ...
        rec = {**base, "status": "ok", "map": rel, "map_shape": "x".join(map(str, amap.shape)),
               "map_sum": float(amap.double().sum()), "map_abs_max": float(amap.abs().max()),
               "seconds": info.pop("seconds"), "n_forward": info.pop("n_forward"),
               "n_backward": info.pop("n_backward"), "info": info}
        notes = list(self.warnings.get(base["case_id"], []))
        if mask is not None:
            hit = float(hit_rate(amap[None], mask[None])[0])
            rec["hit_rate"] = None if math.isnan(hit) else hit
            if math.isnan(hit):
                notes.append("mask is empty: hit_rate undefined (excluded from means)")
        if notes:
            rec["note"] = "; ".join(notes)
        self.store.write_record(rec)                                                   # ... then the record
        return rec


@dataclass
class _CasePrep:
    """A case's preprocessor and what it did to the image (:mod:`medexplain.transforms`)."""

    pre: object
    prepared: object

    def invert(self, amap: torch.Tensor) -> torch.Tensor:
        return self.pre.invert(amap, self.prepared)


def _default_class(out: torch.Tensor, model=None) -> int | None:
    """The class the one target grammar explains by default (``predicted``), or None when the model
    predicts no foreground; recorded as ``predicted``."""
    if out.ndim == 2:
        return int(predicted_class(out)[0])
    try:
        return resolve_target(out, model=model).class_index
    except MedexplainError:
        return None


def _batch_target(targets: list[ResolvedTarget]):
    """One target for a group of cases: per-sample classes, or per-sample regions stacked."""
    ts = [t.target for t in targets]
    if all(isinstance(t, Class) for t in ts):
        return Class([t.class_index for t in targets])
    if all(isinstance(t, Region) for t in ts):
        return Region([t.class_index for t in targets], torch.cat([t.mask for t in ts]))
    raise MedexplainError("the cases of this group mix region and whole-image targets")  # explained one by one


def _per_case_info(info: dict, b: int, i: int) -> dict:
    """Case ``i``'s share of a batch of ``b``. The methods' convention: per-sample values are lists (or
    tensors) of length ``b``, configuration echoes are scalars or tuples; costs are divided evenly."""
    def pick(v):
        if isinstance(v, dict):
            return {k: pick(w) for k, w in v.items()}
        if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == b:
            v = v[i]
        elif isinstance(v, list) and len(v) == b:
            v = v[i]
        return v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v

    out = {k: pick(v) for k, v in info.items() if k not in ("seconds", "n_forward", "n_backward")}
    out["seconds"] = float(info.get("seconds", float("nan"))) / b
    for k in ("n_forward", "n_backward"):
        v = info.get(k, 0)
        out[k] = v // b if v % b == 0 else v / b
    return out


def check_methods(methods: list[str], model) -> list[str]:
    """Canonical method names; a method that needs hooks on a TorchScript model fails before any work."""
    names = [get_method(m).name for m in methods]
    if len(set(names)) != len(names):
        raise MedexplainError(f"a method is listed twice: {methods}")
    for n in names:
        if get_method(n).needs_hooks and is_scripted(model):
            try:
                require_hooks(model)
            except MedexplainError as e:
                raise type(e)(f"method {n!r}: {e}") from None
    return names
