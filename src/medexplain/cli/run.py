"""``medexplain run MANIFEST.csv --model MODEL --method a,b,c --out DIR [--backend local|ray] [--resume]``.

Explains every case of a manifest with every method (:func:`medexplain.pipelines.run.run_manifest`); writes per
case x method a map and a record, then ``results.csv`` (+ ``results.parquet`` with pyarrow) and
``run.json``. Safe to kill at any moment: ``--resume`` continues where it stopped. See ``docs/run.md``.
``run`` takes every option of ``explain`` (the same declaration, :data:`medexplain.cli.params.EXPLAIN`) with the
same meaning; ``--target``, ``--region``, ``--series`` and the preprocessing options are run-wide defaults of
the manifest's columns (a case's own cell wins). ``--format png,dicom`` adds each case's figures and DICOM
objects (explain's writer; ``--figure key=value`` draws the figures as explain's do); ``--pacs URL`` reads the
manifest's ``study`` rows from a PACS and stores their objects back (``docs/dicom.md``); ``--study`` is refused
(the manifest names each case's study).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from medexplain.cli import app
from medexplain.cli._common import cli_errors, console, stop_signals
from medexplain.cli._dicom import output_kwargs
from medexplain.cli.explain import explain_kwargs
from medexplain.cli.params import DICOM_OUTPUT, EXPLAIN, Flags, declared_methods, takes


@app.command("run")
@takes(*EXPLAIN, *DICOM_OUTPUT, "batch_size")
def run_cmd(
    manifest: Path = typer.Argument(..., help="CSV with columns image (required), mask, label, target (class or "
                                    "predicted), region (predicted, all or a mask file), series, case_id, study (with --pacs: a "
                                    "StudyInstanceUID instead of an image), and the "
                                    "preprocessing columns spacing, orientation, spatial_size, min_spatial_size, "
                                    "divisible_by, intensity, transform"),
    backend: Literal["local", "ray"] = typer.Option("local", help="local (in-process) or ray"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (HOST:6379, or auto on a cluster node); "
                                          "default: start a local Ray cluster"),
    resume: bool = typer.Option(False, "--resume/--no-resume", help="continue a run: skip complete items, redo the "
                                "rest"),
    retry_errors: bool = typer.Option(False, "--retry-errors/--no-retry-errors", help="with --resume, also redo "
                                      "error rows"),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", min=1, help="local: worker processes, each with its "
                                              "share of the cores as threads; ray: actors (default: one per CPU, or "
                                              "per GPU)"),
    map_format: Literal["nifti", "npz"] = typer.Option("nifti", "--map-format", help="nifti (on the image affine, "
                                                         "as explain writes it) or npz"),
    flags: Flags = None,
):
    """Explain a dataset: every manifest case x every method, resumable, locally or on Ray. Each case goes through
    explain's pipeline with the same options, so its maps are the ones explain writes. Ctrl-C (SIGINT) or SIGTERM
    stop it with "stopped; rerun with --resume to continue" and exit 130 / 143."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from medexplain.errors import OptionError
    from medexplain.pipelines.run import run_manifest

    with stop_signals(), cli_errors(), Progress(TextColumn("[bold]run"), BarColumn(), MofNCompleteColumn(),
                                                TimeRemainingColumn(), console=console, transient=True) as bar:
        if flags.study is not None:
            raise OptionError("run reads each case's study from the manifest's study column; --study is for explain")
        model = flags.model_spec()
        kwargs = {**explain_kwargs(flags), **output_kwargs(flags), "pacs": flags.pacs, "pacs_netrc": flags.pacs_netrc,
                  "pacs_ca_bundle": flags.pacs_ca_bundle}
        task = bar.add_task("items", total=None)
        res = run_manifest(manifest, model, flags.methods(declared_methods().default), flags.out, backend=backend,
                           address=address, resume=resume, batch_size=flags.batch_size or 4, num_workers=num_workers,
                           map_format=map_format, retry_errors=retry_errors,
                           on_progress=lambda d, t: bar.update(task, completed=d, total=t), **kwargs)
    msg = (f"{len(res.rows)} item(s): [green]{res.n_ok} ok[/], "
           + (f"[red]{res.n_error} error(s)[/]" if res.n_error else "0 errors")
           + f"; computed {res.computed}, already complete {res.skipped}")
    if res.removed_partials:
        msg += f"; removed {len(res.removed_partials)} partial file(s) of the interrupted run"
    console.print(msg)
    console.print(f"results: [bold]{res.tables[0]}[/]" + (f", {res.tables[1]}" if len(res.tables) > 1 else "")
                  + f"; run record: {res.record}" + (f"; report: {res.report}" if res.report else ""))
