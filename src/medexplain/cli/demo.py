"""``medexplain demo``: planted nodules on a real chest radiograph, every applicable method, one report
(:func:`medexplain.pipelines.demo.run_demo`)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from medexplain.cli import app
from medexplain.cli._common import cli_errors
from medexplain.cli.params import Flags, takes


@app.command("demo")
@takes("out", "seed", "method", "device")
def demo(n_cases: int = typer.Option(8, "--n-cases", min=1, help="positive test images to explain"),
         size: Literal["demo", "small"] = typer.Option("demo", help="demo, or small (seconds; for smoke tests)"),
         retrain: bool = typer.Option(False, "--retrain/--no-retrain", help="ignore cached weights and train again"),
         progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="progress bars on stderr "
                                                 "(default: only when stderr is a terminal)"),
         flags: Flags = None):
    """Planted-nodule demo: train (or load) a classifier, explain it with every method, write report.html, maps/
    and metrics.json into --out."""
    from rich.console import Console
    from rich.table import Table

    from medexplain.pipelines.demo import run_demo

    console = Console()
    console.print("[bold]medexplain demo[/bold]: planted nodules on a real chest radiograph (labels are planted)")
    with cli_errors():
        res = run_demo(flags.out, seed=flags.seed, size=size, n_cases=n_cases, methods=flags.methods() or None,
                       retrain=retrain, log=console.print, progress=progress, device=flags.device)
    tab = Table(title="hit rate against the planted nodule masks")
    for c in ("method", "hit rate", "hits", "hits, any maximal pixel (median pixels at max)", "bilinear (MONAI) hit rate",
              "random baseline", "seconds"):
        tab.add_column(c, justify="left" if c == "method" else "right")
    for r in res["rows"]:
        bil = r.get("hit rate (bilinear upsampling)")
        bil = f"{bil:.3f} ({r['hits (bilinear upsampling)']})" if bil is not None else "-"
        anyp = f"{r['hits (any maximal pixel)']} ({r['maximal pixels (median)']:.0f} of {r['pixels']})"
        tab.add_row(r["method"], f"{r['hit rate']:.3f}", r["hits"], anyp, bil,
                    f"{r['random baseline']:.3f}", f"{r['seconds']:.1f}")
    console.print(tab)
    console.print(f"test accuracy {res['accuracy']:.3f}; total {res['seconds']:.0f} s")
    console.print(f"report: [bold]{Path(res['report']).resolve()}[/bold]")
