"""``medexplain explain IMAGE --model MODEL --method a,b --target T --out DIR`` and ``medexplain methods``.

The work is :func:`medexplain.pipelines.explain_image`; maps are named ``<stem>_<method>`` with the stem
of :func:`medexplain.io.file_stem` (``scan.v2.nii.gz`` -> ``scan.v2_saliency.nii.gz``). The options are the
shared ones of :mod:`medexplain.cli.params` (``EXPLAIN``); the library is imported when the command runs.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from medexplain.cli import app
from medexplain.cli._common import cli_errors, console, parse_options, pass_progress
from medexplain.cli._dicom import output_kwargs, pacs_of
from medexplain.cli.params import DICOM_OUTPUT, EXPLAIN, Flags, declared_methods, takes

IMAGE_HELP = ("PNG/JPEG, DICOM (a file, or a folder holding one series), NIfTI (4D = channels last) or .npy "
              "(C, *spatial); or one single-channel file per input channel, on one grid (nnU-Net's CASE_0000.nii.gz "
              "names are ordered); none with --pacs")


def explain_kwargs(flags: Flags) -> dict:
    """The keyword arguments of :func:`medexplain.pipelines.explain_image` the shared options give besides the
    model (``flags.model_spec()``; ``run`` passes the same ones to :func:`medexplain.pipelines.run.run_manifest`)."""
    from medexplain.engine.targets import parse_target

    return {"target": parse_target(flags.target or "predicted"), "region": flags.region, "layer": flags.layer,
            "options": parse_options(flags.option), "skip_unsupported": flags.skip_unsupported,
            "overwrite": flags.overwrite, "series": flags.series, "seed": flags.seed, "report": flags.report,
            "memory": flags.memory, "figure": flags.figure}


@app.command("explain")
@takes(*EXPLAIN, *DICOM_OUTPUT)
def explain_cmd(image: Optional[list[Path]] = typer.Argument(None, help=IMAGE_HELP), flags: Flags = None):
    """Explain one image (one file, or one file per channel) with one or more methods; writes NIfTI maps
    on the input's own grid and affine, PNG overlays and info.json (target, region, activation and
    preprocessing recorded). Everything is checked before any compute; each method's files are written as
    soon as it finishes."""
    from medexplain.pipelines import explain_image

    with cli_errors(), pass_progress() as bar:
        pacs = pacs_of(flags)
        if (pacs is None) == (not image):
            raise typer.BadParameter("give the IMAGE file(s), or --pacs URL --study UID (not both)")
        model = flags.model_spec()
        kw = {**explain_kwargs(flags), **output_kwargs(flags), "on_estimate": bar.estimate, "on_progress": bar.update}
        if pacs is not None:
            from medexplain.io.pacs import explain_pacs
            kw.pop("dicom_reference")
            res = explain_pacs(pacs, flags.study, model, flags.methods(declared_methods().default), flags.out, **kw)
        else:
            res = explain_image(image[0] if len(image) == 1 else image, model,
                                flags.methods(declared_methods().default), flags.out, **kw)
    t = res.target_info
    console.print(f"explained class {t['class']}" + (f", region {t['region']} ({t['region_voxels']} voxels)"
                                                      if t.get("region") else "") + f" ({t['how']})")
    for m, why in res.skipped.items():
        console.print(f"skipped {m}: {why}")
    for w in res.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    console.print(f"wrote {len(res.attributions)} map(s) to [bold]{flags.out}[/]")
    for f in res.files:
        if str(f).endswith("_report.html"):
            console.print(f"report: {f}")
    if res.stored:
        console.print(f"stored {len(res.stored)} DICOM object(s) in study {flags.study} on the PACS")


@app.command("methods")
@takes("model", "weights")
def methods_cmd(image: Optional[Path] = typer.Option(None, "--image", help="with --model: an input for the model (one "
                                                     "forward tells a classifier from a segmenter)"),
                names: bool = typer.Option(False, "--names/--no-names", help="only the names, one a line"),
                flags: Flags = None):
    """The explanation methods: name, family, what it computes (its docstring), the models it explains, and with
    --model whether each applies to that model and why not."""
    from rich.table import Table

    from medexplain.engine.explain import available_methods
    from medexplain.pipelines import method_table
    if names:
        sys.stdout.write("\n".join(available_methods()) + "\n")
        return
    with cli_errors():
        model = flags.models("model")
        rows = method_table(flags.model_spec() if model else None, image=image)
    tab = Table(title="explanation methods" + (f" for {model}" if model else ""), show_lines=False)
    cols = ["method", "family", "models", "what it computes"] + (["applies to the model"] if model else [])
    for c in cols:
        tab.add_column(c, overflow="fold")
    for r in rows:
        cells = [r["name"], r["family"], r["models"], r["description"]]
        if model:
            cells.append("yes" if r["applies"] else f"no: {r['why_not']}")
        tab.add_row(*cells)
    from rich.console import Console
    Console(width=max(Console().width, 160)).print(tab)
