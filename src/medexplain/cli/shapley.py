"""``medexplain shapley IMAGE --model MODEL [--model MODEL ...] --contrasts T1,T1c,T2,FLAIR --out DIR``.

Contrast-level Shapley values of one multi-contrast image for one or several models (several models =
the folds of a cross-validation, Ren et al. 2025), with the agreement of each model's contrast ranking
with a reference ranking and the rank uncertainty across the models. The work is
:func:`medexplain.pipelines.contrast_shapley` (the consensus: :func:`medexplain.segmentation.shapley.fold_consensus`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from medexplain.cli import app
from medexplain.cli._common import cli_errors, console, pass_progress, split_list
from medexplain.cli.params import MODEL_INPUT, Flags, takes

#: medexplain.pipelines.SHAPLEY_VALUE_HELP (a test checks they agree).
SHAPLEY_VALUE_HELP = ("value of a coalition: 'probability:K' = mean probability of output channel K (default "
                      "probability:1); 'dice:REGION' against --seg, REGION = ET, TC, WT, NCR, ED (BraTS labels 1, 2, 4) "
                      "or labels joined by '+' (dice:1, dice:1+4)")


@app.command("shapley")
@takes("model", "weights", "contrasts", "target", "region", "activation", "output", "seed", "chunk_size", "out",
       *MODEL_INPUT)
def shapley_cmd(
    image: list[Path] = typer.Argument(..., help="one multi-contrast image (4D NIfTI with channels last, or .npy "
                                       "(C, *spatial)), or one file per contrast in the order of --contrasts"),
    reference_ranking: Optional[str] = typer.Option(None, "--reference-ranking", help="contrasts most important "
                                                    "first (comma-separated), or ET, WT, TC, ED, NCR for the "
                                                    "clinician rankings of docs/shapley.md"),
    value: Optional[str] = typer.Option(None, help=SHAPLEY_VALUE_HELP + "; or give --target (and --region): the mean "
                                        "probability of that class inside that region"),
    seg: Optional[Path] = typer.Option(None, help="reference label map (NIfTI/.npy) for dice values"),
    class_labels: Optional[str] = typer.Option(None, help="label of each output channel for dice, e.g. 0,1,2,4"),
    channel: Optional[int] = typer.Option(None, min=0, help="output channel of the region for sigmoid dice "
                                          "(--activation sigmoid: one channel per region)"),
    baseline: str = typer.Option("zero", help="absent contrasts: zero (the mean of z-scored input), mean, or a number"),
    sampling: Literal["auto", "exact", "permutation"] = typer.Option("auto", "--sampling", help="exact (all 2^n "
                                                                      "coalitions), permutation (sampled orders), or "
                                                                      "auto (exact up to 10 contrasts)"),
    n_permutations: int = typer.Option(200, min=1, help="sampled orders for --sampling permutation"),
    flags: Flags = None,
):
    """Contrast-level Shapley values of IMAGE for each model (repeat --model, one per fold, or --nnunet with
    --folds); writes values.csv, coalitions.csv, ranking.json (with each model's output activation),
    agreement.json (with --reference-ranking) and uncertainty.json (two or more models). The image is fed to the
    models as read unless preprocessing options are given (normalise it as they were trained: e.g. --intensity
    zscore)."""
    from rich.console import Console
    from rich.table import Table

    from medexplain.pipelines import contrast_shapley

    def progress(i, r):
        console.print(f"model {i + 1}: {r.n_evaluations} evaluations, {r.info['seconds']:.2f} s")

    out = flags.out
    with cli_errors(), pass_progress() as bar:
        chunk = {} if flags.chunk_size is None else {"chunk_size": flags.chunk_size}
        res = contrast_shapley(list(image), flags.model_spec(), out, contrasts=split_list(flags.contrasts) or None,
                               reference_ranking=reference_ranking, value=value, seg=seg,
                               class_labels=split_list(class_labels) or None, channel=channel, baseline=baseline,
                               method=sampling, n_permutations=n_permutations, seed=flags.seed, target=flags.target,
                               region=flags.region, memory=flags.memory, on_model=progress, on_progress=bar.update,
                               on_estimate=bar.estimate, **chunk)
    table = Table(title=f"contrast Shapley values ({value or 'probability:1'})")
    table.add_column("contrast")
    for m in range(len(res.results)):
        table.add_column(f"model {m}", justify="right")
    for j, p in enumerate(res.players):
        table.add_row(p, *[f"{float(r.values[0, j]):+.4f} (#{int(r.ranks[0, j])})" for r in res.results])
    Console().print(table)
    console.print(f"wrote {', '.join(f.name for f in res.files)} to {out}")
