"""``medexplain run MANIFEST.csv --model MODEL --methods a,b,c --out DIR [--backend local|ray] [--resume]``.

Explains every case of a manifest with every method (:func:`medexplain.run.run_manifest`); writes per
case x method a map and a record, then ``results.csv`` (+ ``results.parquet`` with pyarrow) and
``run.json``. Safe to kill at any moment: ``--resume`` continues where it stopped. See ``docs/run.md``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..run import run_manifest
from . import app
from ._common import (
    cli_errors,
    console,
    divisible_by_option,
    intensity_option,
    memory_option,
    min_spatial_size_option,
    orientation_option,
    parse_options,
    spacing_option,
    spatial_size_option,
    stop_signals,
)


@app.command("run")
def run_cmd(
    manifest: Path = typer.Argument(..., help="CSV with columns image (required), mask, label, target (class or "
                                    "predicted), region (predicted, all or a mask file), case_id, and the "
                                    "preprocessing columns spacing, orientation, spatial_size, divisible_by, intensity"),
    model: str = typer.Option(..., "--model", "-m", help="TorchScript file, package.module:factory, or zoo:<task>"),
    methods: str = typer.Option("saliency", "--methods", "--method", help="comma-separated method names"),
    out: Path = typer.Option(..., "--out", help="output folder (a run folder is continued with --resume)"),
    weights: Optional[str] = typer.Option(None, help="state dict for a package.module:factory model"),
    layer: Optional[str] = typer.Option(None, help="layer for CAM methods (dotted name); default: last conv"),
    option: list[str] = typer.Option([], "--option", "-o", help="method option key=value (repeatable); "
                                     "method.key=value for one method"),
    backend: str = typer.Option("local", help="local (in-process) or ray"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (HOST:6379, or auto on a cluster node); "
                                          "default: start a local Ray cluster"),
    resume: bool = typer.Option(False, "--resume", help="continue a run: skip complete items, redo the rest"),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="with --resume, also redo error rows"),
    batch_size: int = typer.Option(4, "--batch-size", help="cases per chunk (equal shapes are batched)"),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="local: torch threads; ray: actors "
                                              "(default: one per CPU, or per GPU)"),
    map_format: str = typer.Option("nifti", "--map-format", help="nifti (on the image affine) or npz"),
    seed: int = typer.Option(0, help="seed of every method's randomness"),
    spacing: Optional[str] = spacing_option(),
    orientation: Optional[str] = orientation_option(),
    spatial_size: Optional[str] = spatial_size_option(),
    divisible_by: Optional[str] = divisible_by_option(),
    min_spatial_size: Optional[str] = min_spatial_size_option(),
    memory: Optional[float] = memory_option(),
    intensity: Optional[str] = intensity_option(),
):
    """Explain a dataset: every manifest case x every method, resumable, locally or on Ray. The
    preprocessing flags are run-wide defaults of the manifest's preprocessing columns (a case's cell wins).
    Ctrl-C (SIGINT) or SIGTERM stop it with "stopped; rerun with --resume to continue" and exit 130 / 143."""
    with stop_signals(), cli_errors(), Progress(TextColumn("[bold]run"), BarColumn(), MofNCompleteColumn(),
                                                TimeRemainingColumn(), console=console, transient=True) as bar:
        options = parse_options(option)   # text, typed by each method's signature
        task = bar.add_task("items", total=None)
        res = run_manifest(manifest, model, methods, out, weights=weights, options=options, layer=layer,
                           backend=backend, address=address, resume=resume, batch_size=batch_size,
                           num_workers=num_workers, map_format=map_format, seed=seed, retry_errors=retry_errors,
                           on_progress=lambda d, t: bar.update(task, completed=d, total=t), memory=memory,
                           preprocessing={"spacing": spacing, "orientation": orientation, "spatial_size": spatial_size,
                                          "divisible_by": divisible_by, "intensity": intensity,
                                          "min_spatial_size": min_spatial_size})
    msg = (f"{len(res.rows)} item(s): [green]{res.n_ok} ok[/], "
           + (f"[red]{res.n_error} error(s)[/]" if res.n_error else "0 errors")
           + f"; computed {res.computed}, already complete {res.skipped}")
    if res.removed_partials:
        msg += f"; removed {len(res.removed_partials)} partial file(s) of the interrupted run"
    console.print(msg)
    console.print(f"results: [bold]{res.tables[0]}[/]" + (f", {res.tables[1]}" if len(res.tables) > 1 else "")
                  + f"; run record: {res.record}")
