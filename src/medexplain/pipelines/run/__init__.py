"""Dataset-scale runs (issue 9): a manifest of cases x several methods, crash-safe and resumable,
in-process or on a Ray cluster.

>>> from medexplain.pipelines.run import run_manifest
>>> res = run_manifest("cases.csv", "model.pt", "saliency,integrated_gradients", "out/", resume=True)

Modules: :mod:`.manifest` (the CSV), :mod:`.store` (layout, atomic writes, done-records, the table),
:mod:`.worker` (one chunk of cases through every method), :mod:`.backends` (local and Ray),
:mod:`.runner` (checks, the run record, orchestration). The command line is ``medexplain run``.
"""
from medexplain.pipelines.run.backends import BackendError
from medexplain.pipelines.run.manifest import Case, ManifestError, read_manifest
from medexplain.pipelines.run.runner import RunResult, route_options, run_manifest
from medexplain.pipelines.run.store import COLUMNS, RunStore, read_table

__all__ = ["BackendError", "COLUMNS", "Case", "ManifestError", "RunResult", "RunStore", "read_manifest",
           "read_table", "route_options", "run_manifest"]
