"""The unit of work of a run: explain one chunk of cases with every method, write maps, then records.

:class:`CaseProcessor` loads the run's :class:`~medexplain.models.spec.ModelSpec` once
(:func:`medexplain.pipelines.case_model`, as ``explain`` does) and
is used as it is by the local backend and wrapped as a Ray actor by the Ray backend, so both backends run the
same code on the same chunks and produce the same numbers. Each case goes through the one case pipeline of
``explain`` (:func:`medexplain.pipelines.explain_case`: read, prepare, plan, resolve the target, explain), with
a writer that puts each map and its record in the run folder: a case's maps are byte for byte the maps
``medexplain explain`` writes for it with the same options.

With ``formats`` the writer also writes each map's PNG figure and DICOM objects into the case folder through
``explain``'s writer (:func:`medexplain.pipelines.write_method_outputs`). A case that names a PACS ``study`` is
retrieved first (:func:`medexplain.io.pacs.fetch_case`, into a temporary folder), and each method's DICOM objects
are stored back (STOW-RS) before its record is written; a PACS error is the item's error row, marked
``transient`` so that ``--resume`` retries it.

Reproducibility does not depend on how a run was split or interrupted: every case is explained on its own,
and before every method the global RNG is seeded with the run's seed (methods that take a ``seed`` option
get it too), as ``explain --seed`` does.
"""
from __future__ import annotations

import math
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medexplain import io
from medexplain.engine.targets import ResolvedTarget
from medexplain.errors import InputError, MedexplainError
from medexplain.io.pacs import Pacs, PacsError, fetch_case
from medexplain.metrics.localisation import hit_rate
from medexplain.models.spec import ModelSpec
from medexplain.pipelines import (
    CaseState,
    CaseWriter,
    case_model,
    explain_case,
    input_files,
    model_kind,
    write_method_outputs,
)
from medexplain.pipelines.run.manifest import Case
from medexplain.pipelines.run.store import RunStore


@dataclass
class WorkerSpec:
    """Everything a worker needs, picklable (sent to worker processes and Ray actors): the run-wide model (a
    :class:`~medexplain.models.spec.ModelSpec`, which each worker loads once), the run-wide settings of the case
    pipeline, and the run's layout."""

    model: ModelSpec
    methods: list[str]
    out: str
    options: dict[str, dict] = field(default_factory=dict)
    map_format: str = "nifti"
    seed: int = 0
    retry_errors: bool = False
    threads: int | None = None     # torch intra-op threads in this worker (None: leave as is)
    layer: str | None = None
    skip_unsupported: bool = False
    redo: bool = False             # --overwrite: recompute items that are complete
    memory: float | None = None    # GB per model call (None: half the memory available here)
    formats: tuple = ()            # outputs besides the map: "png", "dicom" (explain's writer)
    dicom_reference: str | None = None
    dicom_threshold: object = "otsu"
    figure: dict | None = None     # options of the PNG figures (medexplain.io.render.figure_options)
    pacs: dict | None = None       # the PACS of the manifest's studies: Pacs(**pacs) (url, netrc, ca_bundle)

    @property
    def device(self) -> str | None:
        """The model's device setting (None: where the model loads; "auto": CUDA when available, else CPU)."""
        return self.model.device


def error_message(err: BaseException, stage: str) -> str:
    """One line: our typed errors speak for themselves; others get their type name."""
    msg = str(err) if isinstance(err, MedexplainError) else f"{type(err).__name__}: {err}"
    msg = " ".join(msg.split())
    return f"{stage}: {msg[:500]}"


class CaseProcessor:
    """Loads the model once; :meth:`process` explains a chunk of cases and returns their records."""

    def __init__(self, spec: WorkerSpec, model=None):
        if spec.threads:
            torch.set_num_threads(int(spec.threads))
        self.spec = spec
        # the run's Model: the one loaded for the run's checks in this process, else loaded here, once
        self.model = model if model is not None else case_model(spec.model)
        self.store = RunStore(spec.out, spec.map_format)
        self._pacs = None

    @property
    def pacs(self) -> Pacs:
        """The PACS of the manifest's studies, connected once per worker (credentials from this process's
        environment, :func:`medexplain.io.pacs.pacs_session`)."""
        if self._pacs is None:
            self._pacs = Pacs(**self.spec.pacs)
        return self._pacs

    @property
    def device(self) -> torch.device:
        return self.model.device

    def ping(self) -> str:
        return str(self.device)

    def todo(self, case: Case) -> list[str]:
        return [m for m in self.spec.methods
                if self.spec.redo or not self.store.is_done(case.case_id, m, self.spec.retry_errors)]

    # --- one chunk ---------------------------------------------------------------------------------
    def process(self, cases: list[Case]) -> list[dict]:
        """Explain each case with every method it still needs; write each map, then its record."""
        records: list[dict] = []
        for c in cases:
            todo = self.todo(c)
            if todo:
                records += self.case(c, todo)
        return records

    def case(self, case: Case, methods: list[str]) -> list[dict]:
        """One case through the case pipeline; an error before the methods is every method's error row."""
        spec, model = self.spec, self.model
        if case.preprocessing:   # the manifest's preprocessing columns: the case's model (the same networks)
            model = model.replace(preprocessing=case.preprocessing_spec())
        writer = _RunWriter(self, case)
        state = CaseState(case.images)
        fetched = tempfile.TemporaryDirectory(prefix="medexplain-pacs-") if case.study else nullcontext()
        try:
            with fetched as tmp:
                images = case.images
                if case.study:   # the study's series from the PACS (WADO-RS), read as a local series
                    state.stage = "pacs"
                    folder, writer.series = fetch_case(self.pacs, case.study, case.series, tmp)
                    images = [str(folder)]
                state.images = images = input_files(images, model_kind(model) == "nnunet")[0]   # as explain orders them
                explain_case(model, images, methods, writer, per_method=spec.options, target=case.target,
                             region=case.region, layer=spec.layer, skip_unsupported=spec.skip_unsupported,
                             series=writer.series, seed=spec.seed, memory=spec.memory, state=state)
        except Exception as e:  # a bad case is recorded and the run goes on
            if writer.predicted is None and state.prep is not None:
                try:
                    writer.predicted = state.predicted(model)
                except Exception:
                    pass
            for m in methods:
                if m not in writer.records:
                    writer.records[m] = self._write_error(self._base(case, m, state.resolved or case.target,
                                                                     writer.predicted), e, state.stage)
        return list(writer.records.values())

    # --- records -----------------------------------------------------------------------------------
    def _base(self, c: Case, method: str, target=None, predicted=None) -> dict:
        resolved = target if isinstance(target, ResolvedTarget) else None
        target = resolved.class_index if resolved is not None else target
        source = None if target is None else ("manifest" if c.target is not None else "predicted")
        image = c.image or f"study {c.study}"
        rec = {"case_id": c.case_id, "index": c.index, "image": image, "mask": c.mask, "label": c.label,
               "target": target, "target_source": source, "predicted": predicted, "method": method}
        if resolved is not None and resolved.region is not None:
            rec.update(region=resolved.region, region_voxels=resolved.voxels[0])
        if c.preprocessing:
            rec["preprocessing"] = dict(c.preprocessing)
        return rec

    def _write_error(self, base: dict, err: Exception, stage: str, status: str = "error") -> dict:
        rec = {**base, "status": status, "error_type": type(err).__name__, "error": error_message(err, stage)}
        if isinstance(err, PacsError):   # the PACS was down or refused: --resume retries the item
            rec["transient"] = True
        self.store.write_record(rec)
        return rec

    def _write_ok(self, base: dict, amap: torch.Tensor, info: dict, meta: dict, mask, notes: list[str],
                  outputs=None) -> dict:
        amap = amap.detach().cpu()
        rel = self.store.write_map(base["case_id"], base["method"], amap, meta)    # the map first ...
        extra = outputs() if outputs is not None else {}                             # figures, DICOM, PACS
        a = amap.double()
        rec = {**base, **extra, "status": "ok", "map": rel, "map_shape": "x".join(map(str, amap.shape)),
               "map_sum": float(a.sum()), "map_abs_max": float(a.abs().max()),
               "seconds": info.pop("seconds"), "n_forward": info.pop("n_forward"),
               "n_backward": info.pop("n_backward"), "info": info}
        notes = list(notes)
        if mask is not None:
            hit = float(hit_rate(amap.float()[None], mask[None])[0])
            rec["hit_rate"] = None if math.isnan(hit) else hit
            if math.isnan(hit):
                notes.append("mask is empty: hit_rate undefined (excluded from means)")
        if notes:
            rec["note"] = "; ".join(notes)
        self.store.write_record(rec)                                                   # ... then the record
        return rec


def _mask(case: Case, shape: tuple):
    """The evidence mask as bool ``(*spatial)`` (any channel > 0), on the image grid."""
    if not case.mask:
        return None
    m, _ = io.read_image(case.mask)
    if tuple(m.shape[1:]) != tuple(shape):
        raise InputError(f"mask grid {tuple(m.shape[1:])} does not match the image grid {tuple(shape)}")
    return (m > 0).any(0)


class _RunWriter(CaseWriter):
    """A case's results in the run folder: per method its map (:meth:`RunStore.write_map`, the map writer of
    ``explain``) then its record; a method that fails or does not apply gets its record only."""

    def __init__(self, proc: CaseProcessor, case: Case):
        self.proc, self.case = proc, case
        self.records: dict[str, dict] = {}
        self.predicted = self.mask = self.dicom_src = None
        self.notes: list[str] = []
        self.series = case.series

    def read(self, st: CaseState) -> None:
        from medexplain.io.dicom import dicom_source_for  # the study the DICOM objects join, checked before any compute

        spec = self.proc.spec
        self.dicom_src = dicom_source_for(st.images, st.meta, spec.formats, spec.dicom_reference, self.series)

    def outputs(self, st: CaseState, m: str, amap) -> dict:
        """The method's figure and DICOM objects in the case folder (explain's writer), stored on the PACS for a
        PACS case; their paths (relative to the run folder) and the SOP Instance UIDs stored, for the record."""
        spec, store = self.proc.spec, self.proc.store
        formats = tuple(f for f in spec.formats if f != "nifti")     # the map itself is the store's
        if not formats:
            return {}
        files = write_method_outputs(st, m, amap, store.case_dir(self.case.case_id), "", formats, self.dicom_src,
                                     spec.dicom_threshold, spec.figure)
        extra = {"outputs": [str(Path(f).relative_to(store.out)) for f in files]}
        if self.case.study:
            extra["stored"] = self.proc.pacs.store([f for f in files if str(f).endswith(".dcm")])
        return extra

    def ready(self, st: CaseState) -> None:
        self.predicted = st.predicted(self.proc.model)
        self.notes = list(st.meta.get("warnings", []))
        st.stage = "mask"
        self.mask = _mask(self.case, tuple(st.img.shape[1:]))
        for m, why in st.skipped.items():
            self.records[m] = self.proc._write_error(self._base(st, m), MedexplainError(f"does not apply: it {why}"),
                                                     "plan", status="skipped")

    def _base(self, st: CaseState, m: str) -> dict:
        return self.proc._base(self.case, m, st.resolved, self.predicted)

    def method(self, st, m, attr, amap):
        base = self._base(st, m)
        try:
            self.records[m] = self.proc._write_ok(base, amap, _per_case_info(attr.info, 1, 0), st.meta, self.mask,
                                                  self.notes, lambda: self.outputs(st, m, amap))
        except Exception as e:  # a map that cannot be written or stored is the case's error row, not the run's end
            self.records[m] = self.proc._write_error(base, e, "store" if isinstance(e, PacsError) else "write")
        return []

    def failed(self, st, m, error):
        self.records[m] = self.proc._write_error(self._base(st, m), error, st.stage)


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
