"""``medexplain shapley IMAGE --model MODEL [--model MODEL ...] --contrasts T1,T1c,T2,FLAIR --out DIR``.

Contrast-level Shapley values of one multi-contrast image for one or several models (several models =
the folds of a cross-validation, Ren et al. 2025), with the agreement of each model's contrast ranking
with a reference ranking and the rank uncertainty across the models. The work is
:func:`medexplain.pipelines.contrast_shapley` (the consensus: :func:`medexplain.shapley.fold_consensus`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..pipelines import SHAPLEY_VALUE_HELP, contrast_shapley
from . import app
from ._common import (
    ACTIVATION_HELP,
    TARGET_HELP,
    ModelInputs,
    cli_errors,
    console,
    model_input_options,
    output_option,
    parse_output,
    pass_progress,
    split_list,
)


@app.command("shapley")
@model_input_options
def shapley_cmd(
    image: list[Path] = typer.Argument(..., help="one multi-contrast image (4D NIfTI with channels last, or .npy "
                                       "(C, *spatial)), or one file per contrast in the order of --contrasts"),
    model: list[str] = typer.Option([], "--model", "-m", help="TorchScript file, package.module:factory, or "
                                    "zoo:<task>; repeat for fold models (or give --nnunet: its folds)"),
    weights: list[str] = typer.Option([], "--weights", help="state dict per --model (package.module:factory models); "
                                      "repeat in the order of --model"),
    contrasts: Optional[str] = typer.Option(None, help="comma-separated contrast names, one per channel, "
                                            "e.g. T1,T1c,T2,FLAIR (default: channel 0, channel 1, ...)"),
    reference_ranking: Optional[str] = typer.Option(None, "--reference-ranking", help="contrasts most important "
                                                    "first (comma-separated), or ET, WT, TC, ED, NCR for the "
                                                    "clinician rankings of docs/shapley.md"),
    value: Optional[str] = typer.Option(None, help=SHAPLEY_VALUE_HELP),
    target: Optional[str] = typer.Option(None, "--target", help="instead of --value: the mean probability of this "
                                         f"class ({TARGET_HELP}) inside --region"),
    region: Optional[str] = typer.Option(None, "--region", help="with --target: 'all' (default), 'predicted' (the "
                                         "first model's predicted region of the class) or a mask file"),
    seg: Optional[Path] = typer.Option(None, help="reference label map (NIfTI/.npy) for dice values"),
    class_labels: Optional[str] = typer.Option(None, help="label of each output channel for dice, e.g. 0,1,2,4"),
    activation: str = typer.Option("auto", "--activation", help=ACTIVATION_HELP + "; sigmoid with --channel: one "
                                   "channel per region"),
    channel: Optional[int] = typer.Option(None, help="output channel of the region for sigmoid dice"),
    baseline: str = typer.Option("zero", help="absent contrasts: zero (the mean of z-scored input), mean, or a number"),
    method: str = typer.Option("auto", help="exact (all 2^n coalitions), permutation, or auto (exact up to 10)"),
    n_permutations: int = typer.Option(200, help="sampled orders for method=permutation"),
    seed: int = typer.Option(0),
    chunk_size: int = typer.Option(16, help="rows per forward pass"),
    output: Optional[str] = output_option(),
    out: Path = typer.Option(Path("medexplain_shapley"), help="output directory"),
    inputs: ModelInputs = None,
):
    """Contrast-level Shapley values of IMAGE for each model; writes values.csv, coalitions.csv,
    ranking.json (with each model's output activation), agreement.json (with --reference-ranking) and
    uncertainty.json (two or more models). The image is fed to the models as read unless preprocessing
    options are given (normalise it as they were trained: e.g. --intensity zscore)."""
    def progress(i, r):
        console.print(f"model {i + 1}: {r.n_evaluations} evaluations, {r.info['seconds']:.2f} s")

    with cli_errors(), pass_progress() as bar:
        res = contrast_shapley(list(image), list(model), out, weights=list(weights),
                               contrasts=split_list(contrasts) or None, reference_ranking=reference_ranking, value=value,
                               seg=seg, class_labels=split_list(class_labels) or None, activation=activation,
                               channel=channel, baseline=baseline, method=method, n_permutations=n_permutations,
                               seed=seed, chunk_size=chunk_size, target=target, region=region,
                               output=parse_output(output), on_model=progress, on_progress=bar.update,
                               on_estimate=bar.estimate,
                               **inputs.pipeline_kwargs())
    table = Table(title=f"contrast Shapley values ({value or 'probability:1'})")
    table.add_column("contrast")
    for m in range(len(res.results)):
        table.add_column(f"model {m}", justify="right")
    for j, p in enumerate(res.players):
        table.add_row(p, *[f"{float(r.values[0, j]):+.4f} (#{int(r.ranks[0, j])})" for r in res.results])
    Console().print(table)
    console.print(f"wrote {', '.join(f.name for f in res.files)} to {out}")
