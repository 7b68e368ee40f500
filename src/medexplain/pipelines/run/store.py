"""The run directory: layout, atomic writes, done-records, and the results table rebuilt from them.

Layout of ``OUT``::

    run.json                      the run record (config, versions, seeds, sessions, counts)
    results.csv, results.parquet  one row per case x method, rebuilt from the records
    cases/<case folder>/<method>.nii.gz (or .npz)   the map, on the image's affine
    (the case folder is io.safe_file_name(case_id): the id, unsafe characters percent-encoded)
    cases/<case folder>/<method>.png, <method>_{pm,seg,sc}.dcm   with --format png / dicom (explain's writer)
    cases/<case folder>/<method>.json               the item's record: written AFTER its map and outputs

Crash safety rests on two facts. Every file is written through :func:`medexplain.io.atomic_path`
(a temporary file in the same folder, then ``os.replace``), so a file with its final name is always
complete. And an item (case x method) counts as done only when its record exists, which is written
last: a SIGKILL between the map and the record leaves a complete map and no record, and ``--resume``
simply redoes that item. The temporary files a kill leaves behind (``.<name>.<random>``) are removed at
the start of every run. The table is derived data: it is rebuilt from the records at the end.
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from medexplain import io
from medexplain.io import method_file, safe_file_name
from medexplain.pipelines import write_map

RUN_RECORD = "run.json"
TABLE_CSV = "results.csv"
TABLE_PARQUET = "results.parquet"
CASES = "cases"
MAP_FORMATS = {"nifti": ".nii.gz", "npz": ".npz"}

# Columns of the results table, in order. Numbers that do not depend on the machine's speed are exact
# functions of the inputs; ``seconds`` is the only timing column.
COLUMNS = ["case_id", "index", "image", "mask", "label", "target", "target_source", "predicted", "method",
           "status", "error_type", "error", "note", "hit_rate", "seconds", "n_forward", "n_backward",
           "map", "map_shape", "map_sum", "map_abs_max", "info"]

_TMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}")  # tempfile.mkstemp(prefix=".<name>.") names


class RunStore:
    """Paths and atomic reads/writes inside one run directory."""

    def __init__(self, out, map_format: str = "nifti"):
        self.out = Path(out)
        if map_format not in MAP_FORMATS:
            raise ValueError(f"map format must be one of {sorted(MAP_FORMATS)}, got {map_format!r}")
        self.map_format = map_format

    # --- paths -------------------------------------------------------------------------------------
    def case_dir(self, case_id: str) -> Path:
        return self.out / CASES / safe_file_name(case_id)

    def map_path(self, case_id: str, method: str) -> Path:
        return self.case_dir(case_id) / (method_file(method) + MAP_FORMATS[self.map_format])

    def record_path(self, case_id: str, method: str) -> Path:
        return self.case_dir(case_id) / (method_file(method) + ".json")

    # --- done records ------------------------------------------------------------------------------
    def read_record(self, case_id: str, method: str) -> dict | None:
        """The item's record, or None when the item is not complete (no record, or its map or one of its
        other outputs, the figures and DICOM objects, is gone)."""
        p = self.record_path(case_id, method)
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            return None
        if rec.get("status") == "ok" and not all((self.out / f).is_file()
                                                 for f in [rec.get("map", "")] + list(rec.get("outputs") or [])):
            return None
        return rec

    def is_done(self, case_id: str, method: str, retry_errors: bool = False) -> bool:
        """Whether the item is complete: its record exists, and it is not an error to redo (``retry_errors``,
        or a ``transient`` error: a PACS that could not be reached or refused a request, which ``--resume``
        always retries)."""
        rec = self.read_record(case_id, method)
        return rec is not None and not (rec.get("status") == "error" and (retry_errors or rec.get("transient")))

    def write_map(self, case_id: str, method: str, amap: torch.Tensor, meta: dict) -> str:
        """Write one map ``(C_or_1, *spatial)`` on the image grid atomically (``meta``: the image's, with its
        ``affine``); NIfTI through ``explain``'s map writer (:func:`medexplain.pipelines.write_map`), so the
        bytes are those ``explain`` writes. Returns the path relative to the run folder."""
        path = self.map_path(case_id, method)
        if self.map_format == "nifti":
            write_map(amap.detach().cpu(), path, meta, spatial_dims=amap.ndim - 1)  # (C_or_1, *spatial)
        else:
            arr = amap.detach().cpu().numpy().astype(np.float32)
            with io.atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
                np.savez_compressed(f, map=arr, affine=np.asarray(meta["affine"], dtype=np.float64))
        return str(path.relative_to(self.out))

    def write_record(self, rec: dict) -> None:
        """Write the item's record atomically: the item is complete from this moment on."""
        io.write_json(_clean(rec), self.record_path(rec["case_id"], rec["method"]))

    # --- maintenance -------------------------------------------------------------------------------
    def remove_partials(self) -> list[Path]:
        """Delete the temporary files an interrupted run left behind (never a file with a final name)."""
        removed = []
        if not self.out.is_dir():
            return removed
        dirs = [self.out] + ([d for d in (self.out / CASES).iterdir() if d.is_dir()] if (self.out / CASES).is_dir() else [])
        for d in dirs:
            for f in d.iterdir():
                if f.is_file() and _TMP.match(f.name):
                    f.unlink()
                    removed.append(f)
        return removed

    def partial_files(self) -> list[Path]:
        """Temporary files present now (used by tests and ``--resume`` reporting)."""
        return [f for f in self.out.rglob(".*") if f.is_file() and _TMP.match(f.name)]

    # --- the table ---------------------------------------------------------------------------------
    def collect(self, cases, methods) -> list[dict]:
        """One row per case x method in manifest then method order, from the records on disk."""
        rows = []
        for case in cases:
            for m in methods:
                rec = self.read_record(case.case_id, m)
                if rec is None:  # only when a backend stopped early
                    rec = {"case_id": case.case_id, "index": case.index, "image": case.image, "mask": case.mask,
                           "label": case.label, "target": case.target, "method": m, "status": "missing",
                           "error": "not computed (interrupted run: use --resume)"}
                rows.append(rec)
        return rows

    def write_table(self, rows: list[dict]) -> list[Path]:
        """Write ``results.csv`` (and ``results.parquet`` when pyarrow is importable) atomically."""
        flat = [{c: _cell(r.get(c)) for c in COLUMNS} for r in rows]
        paths = [self.out / TABLE_CSV]
        io.write_csv(flat, paths[0], COLUMNS)
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            return paths
        table = pa.Table.from_pylist(flat, schema=_parquet_schema(pa))
        paths.append(self.out / TABLE_PARQUET)
        with io.atomic_path(paths[1], suffix=".parquet") as tmp:
            pq.write_table(table, str(tmp))
        return paths


def read_table(path) -> list[dict]:
    """Read ``results.csv`` back with typed columns (ints, floats, None for empty cells)."""
    ints = {"index", "label", "target", "predicted", "n_forward", "n_backward"}
    floats = {"hit_rate", "seconds", "map_sum", "map_abs_max"}
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            out.append({k: (None if v == "" else int(v) if k in ints else float(v) if k in floats else v)
                        for k, v in r.items()})
    return out


def _parquet_schema(pa):
    ints = {"index", "label", "target", "predicted", "n_forward", "n_backward"}
    floats = {"hit_rate", "seconds", "map_sum", "map_abs_max"}
    return pa.schema([(c, pa.int64() if c in ints else pa.float64() if c in floats else pa.string()) for c in COLUMNS])


def _cell(v):
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _clean(o):
    """JSON-safe copy: NaN/Inf -> None, tensors and NumPy scalars -> Python numbers."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, torch.Tensor):
        return _clean(o.tolist()) if o.numel() <= 64 else f"tensor{tuple(o.shape)}"
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, (str, int, float, bool)) or o is None:
        return o
    return str(o)


def atomic_json(obj, path) -> Path:
    return io.write_json(_clean(obj), path)

