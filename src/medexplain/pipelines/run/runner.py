"""Dataset-scale runs: many cases x several methods, resumable after a crash, local or on Ray.

>>> from medexplain.pipelines.run import run_manifest
>>> res = run_manifest("cases.csv", "model.pt", ["saliency", "integrated_gradients"], "out/")
>>> res.rows[0]["status"], res.tables   # 'ok', [out/results.csv, out/results.parquet]

Order of work: everything that can be checked up front is checked before anything is written (the
manifest, the methods and their options, the model loads, hooks for CAM methods on TorchScript, the
output folder); then the run record is written, the chunks that are not complete are processed, and
the results table and the final run record are rebuilt from the per-item records.
"""
from __future__ import annotations

import json
import platform
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

from medexplain.engine.options import memory_budget
from medexplain.engine.registry import default_method, get_method, route_options
from medexplain.errors import MedexplainError, OptionError
from medexplain.io import check_output_dir
from medexplain.models.model import Model
from medexplain.models.spec import ModelSpec
from medexplain.pipelines import case_model, method_options, model_kind, plan_methods
from medexplain.pipelines.run import backends
from medexplain.pipelines.run.manifest import PREPROCESSING_COLUMNS, Case, read_manifest, sha256_file
from medexplain.pipelines.run.store import MAP_FORMATS, RUN_RECORD, RunStore, atomic_json
from medexplain.pipelines.run.worker import CaseProcessor, WorkerSpec

# What a resumed run must share with the run it continues (otherwise its items would mix two setups).
FINGERPRINT = ("manifest_sha256", "model", "model_sha256", "weights_sha256", "methods", "options",
               "map_format", "seed", "batch_size", "preprocessing", "target", "region", "series", "layer", "formats",
               "dicom_reference", "dicom_threshold", "figure", "pacs")


@dataclass
class RunResult:
    """What :func:`run_manifest` returns. ``rows``: one dict per case x method (the results table)."""

    out: Path
    rows: list[dict]
    tables: list[Path]
    record: Path
    computed: int = 0        # items computed in this call (ok or error)
    skipped: int = 0         # items already complete (resume)
    removed_partials: list[Path] = field(default_factory=list)
    report: Path | None = None   # report.html, the run's index (report=True)

    @property
    def n_ok(self) -> int:
        return sum(r["status"] == "ok" for r in self.rows)

    @property
    def n_error(self) -> int:
        return sum(r["status"] != "ok" for r in self.rows)


def versions(extra: tuple[str, ...] = ()) -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("medexplain", "torch", "numpy", "monai", "nibabel", "pydicom", "pillow", "pyarrow", "ray", *extra):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _is_run_dir(out: Path) -> bool:
    """Ours when it holds a run record, or is empty but for a run record's temporary file."""
    if (out / RUN_RECORD).is_file():
        return True
    return all(p.name.startswith(f".{RUN_RECORD}.") for p in out.iterdir())


def run_manifest(manifest, model=None, methods=None, out="medexplain_out", *,
                 options: dict | None = None, layer: str | None = None, backend: str = "local",
                 address: str | None = None, resume: bool = False, batch_size: int = 4, num_workers: int | None = None,
                 map_format: str = "nifti", seed: int = 0, retry_errors: bool = False,
                 on_progress: Callable[[int, int], None] | None = None,
                 target=None, region=None, skip_unsupported: bool = False,
                 overwrite: bool = False, series: str | None = None, memory: float | None = None, formats=None,
                 dicom_reference=None, dicom_threshold="otsu", figure: dict | None = None, pacs=None,
                 pacs_netrc=None, pacs_ca_bundle=None, report: bool = False) -> RunResult:
    """Explain every case of ``manifest`` with every method and write maps, metrics, a table and a record.

    Every case goes through ``explain``'s one case pipeline (:func:`medexplain.pipelines.explain_case`), so a
    run takes every option :func:`medexplain.pipelines.explain_image` takes, with the same meaning, and writes
    the same maps.

    Args:
        manifest: CSV path (columns: image, mask, label, target, region, series, case_id and the preprocessing
            columns; see :mod:`.manifest`).
        model: the run-wide model: an :class:`mx.ModelSpec <medexplain.models.spec.ModelSpec>` (a TorchScript path,
            ``package.module:factory`` with ``weights``, ``zoo:<task>``, a list of them: an ensemble; a MONAI
            ``bundle``; an ``nnunet`` folder with its options; the output adapter, activation, preprocessing,
            sliding window, flips, device, train/eval policy), anything :func:`medexplain.models.model.load_model`
            takes (a spec of it), or an ``mx.Model`` / ``nn.Module`` (then run in this process, not on Ray). Each
            worker loads the spec once; the manifest's preprocessing columns are ``Model.replace`` of each case.
            The run records ``spec.describe()``.
        methods: names (list or comma-separated) from :func:`medexplain.available_methods`.
        out: output folder (created). A folder holding a run is continued only with ``resume=True`` (or
            recomputed with ``overwrite=True``).
        options: method options, ``key`` for every method that accepts it, ``method.key`` for one; ``layer``
            for every method that takes one.
        target, region, series: run-wide defaults of the manifest's columns (a case's own cell wins).
        skip_unsupported: as for ``explain`` (a method that does not apply to a case is that item's ``skipped``
            row with ``skip_unsupported``, else an error row).
        The model's ``preprocessing`` given as a dict of text (``{"spacing": "1,1,1", ...}``, as the cells and the
            command line's ``--spacing`` etc. write it) is the run-wide default of the manifest's preprocessing
            columns; a case's own cell overrides its column. Its ``device`` (``auto``, ``cpu``, ``cuda[:N]``) is
            where every worker places its own copy.
        backend: ``"local"`` (in-process, default) or ``"ray"`` (``address`` joins an existing cluster).
        resume: skip items whose record exists, redo the rest; the setup must match the first run's.
        overwrite: recompute every item, also those a run in ``out`` completed (not with ``resume``).
        batch_size: cases per chunk of work (a Ray task).
        num_workers: local: worker processes (default one per core, each with its share of the cores as torch
            threads; one per GPU on CUDA; a model given as a module object runs in this process with
            ``num_workers`` torch threads); Ray: actors (default: one per CPU, or per GPU).
        map_format: ``"nifti"`` (on the image's affine) or ``"npz"`` (``map`` and ``affine`` arrays).
        seed: seeds the global RNG before each method of each case, and every method's ``seed`` option.
        retry_errors: with ``resume``, also redo items recorded as errors.
        on_progress: called as ``on_progress(items_done, items_total)`` after each chunk.
        memory: the budget in GB of one model call (default: half the memory available to the worker);
            ``chunk_size`` is capped to fit, and a case whose one row does not fit is an error row
            (:func:`medexplain.engine.options.plan_memory`).
        formats: outputs besides the map, as ``explain``'s ``formats`` (``png``, ``dicom``; ``nifti`` is the
            map, always written as ``map_format`` asks; default none): each case's figures and DICOM objects
            (Parametric Map, Segmentation thresholded by ``dicom_threshold``, Secondary Capture) are written
            into its folder by ``explain``'s writer (:func:`medexplain.pipelines.write_method_outputs`);
            ``dicom_reference`` as for ``explain``. A case that is not DICOM is then an error row. ``figure``: the
            options of the PNG figures, as ``explain``'s (:func:`medexplain.io.render.figure_options`).
        pacs: a DICOMweb URL (``pacs_netrc``, ``pacs_ca_bundle``: :class:`medexplain.io.pacs.Pacs`): the
            manifest's ``study`` rows are retrieved from it, explained, and their DICOM objects stored back
            (``dicom`` is added to ``formats``). A PACS that is down or refuses is that case's error row;
            ``resume`` retries such rows (they are ``transient``).
        report: also write ``report.html``, the run's index (:func:`medexplain.io.report.write_index`): a table of
            cases x methods with each item's status, links to its map and figures, and each error row's message;
            rebuilt from the records at the end of every session, as the table is.

    A bad case (missing, corrupt or NaN image, wrong channels, mask off-grid, target out of range, a
    method failing on it) becomes an error row; everything else raises a typed error before writing.
    """
    t_start, cpu_start, started = time.perf_counter(), time.process_time(), _now()
    # 1. checks that need no writes
    methods = _check_arguments(methods, backend, map_format, batch_size, num_workers, address)
    methods = [get_method(m).name for m in methods]
    if resume and overwrite:
        raise OptionError("--resume continues a run and --overwrite recomputes it: give one")
    from medexplain.io import render
    figure = render.figure_options(figure)
    loaded = model if isinstance(model, Model) else None
    spec = model if isinstance(model, ModelSpec) else ModelSpec(source=model)
    spec = spec.check().absolute()   # so a resume from elsewhere and remote workers find its files
    defaults = spec.preprocessing if isinstance(spec.preprocessing, dict) else {}
    preprocessing = {k: str(v) for k, v in defaults.items() if v not in (None, "")}
    cases = with_defaults(read_manifest(manifest), preprocessing, target=target, region=region, series=series)
    formats, pacs_spec = _check_outputs_and_pacs(cases, formats, dicom_reference, pacs, pacs_netrc, pacs_ca_bundle)
    if model_kind(loaded if loaded is not None else spec) is not None and any(c.preprocessing for c in cases):
        raise OptionError("--bundle and --nnunet give the model's preprocessing: drop the preprocessing options and "
                          "the manifest's preprocessing columns")
    if backend == "ray" and (loaded is not None or not spec.sendable):
        raise OptionError("the ray backend loads the model in each worker: give it as a file or "
                          "package.module:factory, not as a module object")
    if backend == "local" and spec.sendable and loaded is None:   # the fork server imports while this process checks
        backends.prestart(WorkerSpec(model=spec, methods=methods, out=str(out)), num_workers,
                          -(-len(cases) // batch_size))
    memory_budget(memory)  # a bad --memory is an OptionError now
    routed = method_options(methods, options, layer, seed)
    if backend == "ray":
        backends.ray_module()
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or not _is_run_dir(out)):
        raise MedexplainError(f"{out} exists and is not a medexplain run folder (no {RUN_RECORD}); choose a new --out")
    check_output_dir(out)  # creatable and writable, before the model loads
    loaded = case_model(loaded if loaded is not None else spec)   # once here, for the checks and in-process work
    plan_methods(methods, loaded, None, layer, skip_unsupported)   # hooks, the layer: before any case
    config = {"manifest": str(Path(manifest).resolve()), "manifest_sha256": sha256_file(manifest),
              # the ModelSpec's fields that differ from the defaults; where it runs is "device" (a resume may move it)
              "model": _jsonable({k: v for k, v in spec.describe().items() if k != "device"}),
              "model_sha256": _sha(spec.source),
              "weights_sha256": _sha(spec.weights),
              "methods": methods, "options": _jsonable(routed), "layer": layer,
              "target": target, "region": region, "series": series,
              "skip_unsupported": skip_unsupported, "device": spec.device,
              "map_format": map_format, "seed": seed, "batch_size": batch_size, "backend": backend,
              "address": address, "num_workers": num_workers, "retry_errors": retry_errors,
              "preprocessing": dict(sorted((preprocessing or {}).items())) or None, "memory": memory,
              # None when unused, as a run record written before these options has them
              "formats": list(formats) or None, "dicom_threshold": dicom_threshold if "dicom" in formats else None,
              "dicom_reference": str(Path(dicom_reference).resolve()) if dicom_reference is not None else None,
              "figure": _jsonable(figure) or None, "pacs": pacs}
    previous = _previous_run(out, config, resume, overwrite)
    if previous is not None and not overwrite:
        methods, routed = _extend_run(previous, config, methods, routed)

    # 2. the run record, then the work
    store = RunStore(out, map_format)
    out.mkdir(parents=True, exist_ok=True)
    removed = store.remove_partials()
    session = {"started": started, "ended": None, "backend": backend, "resumed": previous is not None and resume,
               "overwrite": overwrite, "host": socket.gethostname(), "removed_partial_files": len(removed)}
    previous = previous if resume else None
    record = {"format": "medexplain-run/1", "status": "running", "config": config,
              "versions": versions(), "seeds": {"run": seed, "methods": {m: routed[m].get("seed", seed) for m in methods}},
              "started": (previous or {}).get("started", started), "ended": None,
              "sessions": (previous or {}).get("sessions", []) + [session], "counts": None}
    atomic_json(record, out / RUN_RECORD)
    wspec = WorkerSpec(model=spec, methods=methods, out=str(out), options=routed, map_format=map_format, seed=seed,
                       retry_errors=retry_errors, layer=layer, skip_unsupported=skip_unsupported, redo=overwrite,
                       memory=memory, formats=formats, dicom_reference=config["dicom_reference"],
                       dicom_threshold=dicom_threshold, figure=figure or None, pacs=pacs_spec)
    progress = _Progress(store, cases, methods, retry_errors, on_progress, redo=overwrite)
    workers = _execute(progress.pending(batch_size), wspec, loaded, backend, num_workers, address, progress.on_chunk,
                       spec.sendable and not isinstance(model, Model))

    # 3. the table and the record, rebuilt from the items
    rows = store.collect(cases, methods)
    tables = store.write_table(rows)
    index = None
    if report:
        from medexplain.io.report import write_index
        index = Path(write_index(out / "report.html", rows, methods, root=out, title=f"medexplain run: {out.name}",
                                 notes=[f"manifest {config['manifest']}; model {loaded.name}",
                                        "Figures are linked when the run writes them (--format png)."]))
    session.update(ended=_now(), seconds=round(time.perf_counter() - t_start, 3),
                   cpu_seconds=round(time.process_time() - cpu_start, 3),  # this process (the driver for Ray)
                   computed_items=progress.computed, skipped_items=progress.skipped, **workers)
    counts = {"items": len(rows), **{s: sum(r["status"] == s for r in rows) for s in ("ok", "error", "skipped",
                                                                                        "missing")}}
    record.update(status="complete" if counts["missing"] == 0 else "incomplete", ended=session["ended"], counts=counts,
                  tables=[str(p.relative_to(out)) for p in tables])
    atomic_json(record, out / RUN_RECORD)
    return RunResult(out=out, rows=rows, tables=tables, record=out / RUN_RECORD, computed=progress.computed,
                     skipped=progress.skipped, removed_partials=removed,
                     report=index)


def _check_outputs_and_pacs(cases: list[Case], formats, dicom_reference, pacs, netrc, ca_bundle):
    """Before any work: the run's outputs besides the map (``formats`` without ``nifti``, the map itself; with a
    PACS ``dicom`` added) and the PACS settings the workers connect with (None without ``pacs``). A manifest
    with studies needs ``pacs``, and ``pacs`` a manifest with studies; the PACS URL and credentials are
    checked now (:class:`medexplain.io.pacs.Pacs`), the studies themselves when each case runs."""
    from medexplain.io.dicom import parse_formats

    formats = tuple(f for f in (parse_formats(formats) if formats is not None else ()) if f != "nifti")
    studies = [c for c in cases if c.study]
    if pacs is None:
        if studies:
            raise OptionError(f"the manifest lists PACS studies ({len(studies)} row(s), e.g. {studies[0].case_id}): "
                              "give the PACS with --pacs URL")
        if dicom_reference is not None and "dicom" not in formats:
            raise OptionError("--dicom-reference is for --format dicom; add dicom to --format or drop it")
        return formats, None
    if not studies:
        raise OptionError("--pacs reads the manifest's studies: add a study column (StudyInstanceUIDs)")
    from medexplain.io.pacs import Pacs
    spec = {"url": pacs, "netrc": None if netrc is None else str(Path(netrc).resolve()),
            "ca_bundle": None if ca_bundle is None else str(Path(ca_bundle).resolve())}
    Pacs(**spec)   # the URL and the credentials, now (the PACS is reached when the cases run)
    return tuple(dict.fromkeys(formats + ("dicom",))), spec


def _sha(spec):
    """SHA-256 of a specification's file(s) (None for what is not a file)."""
    if isinstance(spec, (list, tuple)):
        return [_sha(s) for s in spec]
    return sha256_file(spec) if isinstance(spec, str) and Path(spec).is_file() else None


def with_defaults(cases: list[Case], preprocessing: dict | None = None, **columns) -> list[Case]:
    """``cases`` with run-wide defaults filled in where a case's own cell is empty: the preprocessing columns
    (:func:`with_default_preprocessing`) and ``target``, ``region``, ``series`` (``None``: no default)."""
    from medexplain.engine.targets import parse_target

    cases = with_default_preprocessing(cases, preprocessing)
    fill = {k: v for k, v in columns.items() if v is not None}
    if "target" in fill:
        fill["target"] = parse_target(fill["target"])
    if "region" in fill and str(fill["region"]).strip().lower() in ("predicted", "all"):
        fill["region"] = str(fill["region"]).strip().lower()
    elif "region" in fill:
        fill["region"] = str(Path(fill["region"]).resolve())
    fill = {k: v for k, v in fill.items() if v is not None}
    return [replace(c, **{k: v for k, v in fill.items() if getattr(c, k) is None}) for c in cases]


def with_default_preprocessing(cases: list[Case], defaults: dict | None) -> list[Case]:
    """``cases`` with the run-wide preprocessing ``defaults`` (column -> cell text) filled in where a case's
    own column is empty; an unknown column or a bad value is an :class:`~medexplain.errors.OptionError` now."""
    defaults = {k: str(v) for k, v in (defaults or {}).items() if v not in (None, "")}
    if not defaults:
        return cases
    from medexplain.errors import OptionError
    from medexplain.models.transforms import Preprocessing
    unknown = sorted(set(defaults) - set(PREPROCESSING_COLUMNS))
    if unknown:
        raise OptionError(f"unknown preprocessing setting(s) {unknown}; choose from {list(PREPROCESSING_COLUMNS)}")
    try:
        Preprocessing(**defaults)
    except MedexplainError as e:
        raise OptionError(f"run preprocessing: {e}") from None
    out = []
    for c in cases:
        cells = {**defaults, **dict(c.preprocessing)}
        out.append(replace(c, preprocessing=tuple((k, cells[k]) for k in PREPROCESSING_COLUMNS if k in cells)))
    return out


def _check_arguments(methods, backend: str, map_format: str, batch_size, num_workers, address) -> list[str]:
    """The arguments checkable without reading anything; returns the method names as a list."""
    if backend not in backends.BACKENDS:
        raise MedexplainError(f"unknown backend {backend!r}; use one of {list(backends.BACKENDS)}")
    if map_format not in MAP_FORMATS:
        raise MedexplainError(f"unknown map format {map_format!r}; use one of {sorted(MAP_FORMATS)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise MedexplainError(f"batch_size must be a positive integer, got {batch_size!r}")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 1):
        raise MedexplainError(f"num_workers must be a positive integer, got {num_workers!r}")
    if address and backend != "ray":
        raise MedexplainError("--address is for the ray backend; add --backend ray")
    if methods is None:                           # the registry's default method
        methods = [default_method()]
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not methods:
        raise MedexplainError("no method given")
    return list(methods)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _previous_run(out: Path, config: dict, resume: bool, overwrite: bool = False) -> dict | None:
    """The record of the run held in ``out`` (None when there is none), after checking that this call
    may continue it: ``resume`` is set and the setup matches the first run's (:data:`FINGERPRINT`), or
    ``overwrite`` (every item is recomputed, so the setups need not match)."""
    if not (out / RUN_RECORD).is_file():
        return None
    previous = json.loads((out / RUN_RECORD).read_text())
    if overwrite:
        return previous
    if not resume:
        raise MedexplainError(f"{out} already holds a run ({previous.get('status')}); pass --resume to "
                              "continue it, --overwrite to recompute it, or choose a new --out")
    old = previous.get("config", {})
    old_opts = old.get("options", {})
    diff = [f"{k}: first run {old.get(k)!r}, now {config[k]!r}" for k in FINGERPRINT
            if k not in ("methods", "options") and old.get(k) != config[k]]
    diff += [f"options of {m}: first run {old_opts[m]}, now {config['options'][m]}" for m in config["methods"]
             if m in old_opts and old_opts[m] != config["options"][m]]
    if diff:
        hint = (" A case that failed need not leave the manifest: --resume keeps its error row and goes on, "
                "--resume --retry-errors redoes it." if any(d.startswith("manifest_sha256") for d in diff) else "")
        raise MedexplainError(f"cannot resume {out}: the setup differs from the first run's ({'; '.join(diff)}); "
                              f"repeat the first run's options, or use a new --out.{hint}")
    return previous


def _extend_run(previous: dict, config: dict, methods: list[str], routed: dict) -> tuple[list[str], dict]:
    """A resumed run covers the first run's methods and any added now (``config`` updated in place)."""
    old = previous.get("config", {})
    old_opts = old.get("options", {})
    methods = list(dict.fromkeys(old.get("methods", []) + methods))
    for m in methods:
        routed.setdefault(m, old_opts.get(m, {}))
    config["methods"] = methods
    config["options"] = _jsonable(routed)
    return methods, routed


class _Progress:
    """Which items are complete, which chunks remain, and the ``on_progress(done, total)`` callbacks."""

    def __init__(self, store: RunStore, cases: list[Case], methods: list[str], retry_errors: bool,
                 on_progress: Callable[[int, int], None] | None, redo: bool = False):
        self.store, self.cases, self.methods, self.retry, self.redo = store, cases, methods, retry_errors, redo
        self.total = len(cases) * len(methods)
        self.skipped = 0 if redo else sum(store.is_done(c.case_id, m, retry_errors) for c in cases for m in methods)
        self.done, self.computed, self.on_progress = self.skipped, 0, on_progress
        if on_progress:
            on_progress(self.done, self.total)

    def pending(self, batch_size: int) -> list[list[Case]]:
        """Chunks of ``batch_size`` consecutive cases with at least one item not complete."""
        chunks = [self.cases[i:i + batch_size] for i in range(0, len(self.cases), batch_size)]
        return [ch for ch in chunks if self.redo
                or not all(self.store.is_done(c.case_id, m, self.retry) for c in ch for m in self.methods)]

    def on_chunk(self, recs: list) -> None:
        self.computed += len(recs)
        self.done += len(recs)
        if self.on_progress:
            self.on_progress(self.done, self.total)


def _execute(pending: list, spec: WorkerSpec, model, backend: str, num_workers, address, on_chunk,
             sendable: bool = False) -> dict:
    """Process the pending chunks on the backend; returns the workers summary of the session."""
    if not pending:
        return {"workers": 1}
    if backend == "local":
        workers, threads = backends.local_workers(spec, num_workers, len(pending))
        if workers > 1 and sendable:
            return backends.run_processes(pending, spec, workers, threads, on_chunk)
        spec.threads = num_workers   # in this process (one worker, or a module object): torch threads
        proc = CaseProcessor(spec, model=model)  # reuses the model loaded for the checks
        backends.run_local(pending, spec, on_chunk=on_chunk, processor=proc)
        return {"workers": 1}
    return backends.run_ray(pending, spec, num_workers=num_workers, address=address, on_chunk=on_chunk)


__all__ = ["Case", "RunResult", "route_options", "run_manifest"]
