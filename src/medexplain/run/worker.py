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
from ..targets import Class
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
                x, affine = self._image(c)
                stage = "mask"
                loaded[c.case_id] = (x, affine, self._mask(c, x))
            except Exception as e:  # a bad case is recorded and the run goes on
                records += self._errors(c, todo[c.case_id], e, stage)
                continue
            groups.setdefault(tuple(x.shape[1:]), []).append(c)
        for group in groups.values():
            records += self._group(group, loaded, todo)
        return records

    def _image(self, case: Case):
        img, meta = io.read_image(case.image)
        x = check_input(img[None], spatial_dims=self.spatial_dims, channels=self.channels)
        return x.to(self.device, self.dtype), meta["affine"]  # the model's dtype: float32 files, float64 models

    def _mask(self, case: Case, x: torch.Tensor):
        """The evidence mask as bool ``(*spatial)`` (any channel > 0), on the image grid."""
        if not case.mask:
            return None
        m, _ = io.read_image(case.mask)
        if tuple(m.shape[1:]) != tuple(x.shape[2:]):
            raise InputError(f"mask grid {tuple(m.shape[1:])} does not match the image grid {tuple(x.shape[2:])}")
        return (m > 0).any(0)

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
                pred = int(predicted_class(o)[0])
            except Exception as e:
                records += self._errors(c, todo[c.case_id], e, "model")
                continue
            t = pred if c.target is None else c.target
            try:
                Class(t).validate(o, 1)
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
                records.append(self._write_ok(base, amap, info, loaded[c.case_id][1], loaded[c.case_id][2]))
        return records

    def _explain(self, method: str, xb: torch.Tensor, targets: list[int], need: list[int]) -> dict:
        """Maps of the whole group (reproducible batch); on failure, case by case to isolate bad ones."""
        opts = dict(self.spec.options.get(method, {}))
        torch.manual_seed(self.spec.seed)
        try:
            attr = explain(self.model, xb, method, target=list(targets), **opts)
            return {i: (attr.map[i], _per_case_info(attr.info, xb.shape[0], i)) for i in need}
        except Exception as group_error:
            if xb.shape[0] == 1:
                return {i: group_error for i in need}
        out = {}
        for i in need:
            torch.manual_seed(self.spec.seed)
            try:
                attr = explain(self.model, xb[i:i + 1], method, target=[targets[i]], **opts)
                out[i] = (attr.map[0], _per_case_info(attr.info, 1, 0))
            except Exception as e:
                out[i] = e
        return out

    # --- records -----------------------------------------------------------------------------------
    def _base(self, c: Case, method: str, target=None, predicted=None) -> dict:
        source = None if target is None else ("manifest" if c.target is not None else "predicted")
        return {"case_id": c.case_id, "index": c.index, "image": c.image, "mask": c.mask, "label": c.label,
                "target": target, "target_source": source, "predicted": predicted, "method": method}

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
        if mask is not None:
            hit = float(hit_rate(amap[None], mask[None])[0])
            rec["hit_rate"] = None if math.isnan(hit) else hit
            if math.isnan(hit):
                rec["note"] = "mask is empty: hit_rate undefined (excluded from means)"
        self.store.write_record(rec)                                                   # ... then the record
        return rec


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
