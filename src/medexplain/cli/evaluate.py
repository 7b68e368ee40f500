"""``medexplain evaluate --maps DIR --masks DIR [--out DIR]``: CheXlocalize-style localisation evaluation
(:func:`medexplain.pipelines.evaluation.evaluate_localisation`; the pairing rule and the files written are
described in :mod:`medexplain.pipelines.evaluation`). Defaults follow CheXlocalize's published code except
``--mode`` (MedicalPatchNet's TP+FP+FN mIoU)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from medexplain.cli import app
from medexplain.cli._common import cli_errors, console
from medexplain.cli.params import Flags, takes


@app.command("evaluate")
@takes("seed", "out")
def evaluate(
    maps: Path = typer.Option(..., "--maps", help="folder of saliency maps (class/case.ext or case.ext)"),
    masks: Path = typer.Option(..., "--masks", help="folder of ground-truth masks, same layout"),
    metric: Literal["all", "hitrate", "miou"] = typer.Option("all", help="the metric(s) computed"),
    mode: Literal["tp", "tp_fp_fn", "tp_fn"] = typer.Option("tp_fp_fn", help="mIoU mode:\
 tp (CheXlocalize's default, true_pos_only=True), "
                                              "tp_fp_fn (CheXlocalize's true_pos_only=False; MedicalPatchNet) or tp_fn"),
    threshold: str = typer.Option("otsu", help="otsu (CheXlocalize's: uint8 Otsu, filled contours), otsu_float "
                                               "(Otsu on the float map, no filling), a float on the min-max "
                                               "normalised map, class=value pairs (nodule=0.4,marker=0.6), a CSV "
                                               "threshold,task (the tuning_results.csv this command or CheXlocalize "
                                               "writes), or 'tuned' (on --val-maps/--val-masks)"),
    val_maps: Optional[Path] = typer.Option(None, help="validation maps for --threshold tuned"),
    val_masks: Optional[Path] = typer.Option(None, help="validation masks for --threshold tuned"),
    probs: Optional[Path] = typer.Option(None, help="CSV img_id,<class>... of model probabilities (for --cutoff)"),
    cutoff: Optional[str] = typer.Option(None, help="no predicted mask where the probability is below this: a float, "
                                                    "class=value pairs, a CSV cutoff,task, or CheXlocalize's "
                                                    "probability_tuning_results.csv (per class the cutoff of best mIoU)"),
    n_boot: int = typer.Option(1000, min=1, help="bootstrap replicates"),
    ci: Literal["order-statistic", "percentile"] = typer.Option("order-statistic", help="95% interval:"
                                                                " order-statistic (CheXlocalize's: the 25th and "
                                                   "975th of 1000 sorted replicates; default) or percentile "
                                                   "(interpolated 2.5 and 97.5 percentiles)"),
    mean: Literal["bootstrap", "point"] = typer.Option("bootstrap", help="the summary's mean column:"
                                                         " bootstrap (mean of the replicates, "
                                               "CheXlocalize's; default) or point (mean over cases); both are "
                                               "also written as bs_mean and point"),
    ties: Literal["first", "any"] = typer.Option("first", help="hit rate ties: first (CheXlocalize's first maximum) or any (some "
                                           "maximal pixel in the mask; for piecewise-constant maps)"),
    flags: Flags = None,
):
    """Hit rate and mIoU with 95% bootstrap intervals, written as CheXlocalize's three CSV files per metric.

    Defaults reproduce CheXlocalize's published protocol (Otsu rule, order-statistic interval, bootstrap
    mean), except --mode, which defaults to MedicalPatchNet's tp_fp_fn."""
    from rich.console import Console
    from rich.table import Table

    from medexplain.pipelines.evaluation import evaluate_localisation

    out, seed = flags.out, flags.seed
    with cli_errors():
        res = evaluate_localisation(maps, masks, out, metric=metric, mode=mode, threshold=threshold,
                                    val_maps=val_maps, val_masks=val_masks, probs=probs, cutoff=cutoff,
                                    n_boot=n_boot, seed=seed, ties=ties, ci=ci, mean_of=mean)
    if res.unpaired_maps:
        console.print(f"[yellow]note:[/] {res.unpaired_maps} map(s) have no mask and are ignored")
    table = Table(title=f"localisation ({len(res.cases)} cases, {len(res.classes)} classes; mean = {mean}, "
                        f"CI = {ci})")
    for col in ("metric", "class", "mean", "95% CI", "n"):
        table.add_column(col)
    for fname, boot in res.results.items():
        for r in boot.rows():
            table.add_row(fname, r["name"], f"{r['mean']:.3f}", f"[{r['lower']:.3f}, {r['upper']:.3f}]",
                          str(r["n_cases"]))
    Console().print(table)
    console.print(f"wrote {out}/")
