"""``medexplain explain IMAGE --model MODEL --method a,b --target T --out DIR`` and ``medexplain methods``.

The work is :func:`medexplain.pipelines.explain_image`; maps are named ``<stem>_<method>`` with the stem
of :func:`medexplain.io.file_stem` (``scan.v2.nii.gz`` -> ``scan.v2_saliency.nii.gz``).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.progress import Progress

from ..explain import available_methods
from ..pipelines import explain_image
from . import app
from ._common import cli_errors, console, parse_options, split_list


def parse_target(value: str) -> int | None:
    """``predicted`` (None: the model's top class) or a class index."""
    if value == "predicted":
        return None
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"--target must be an int or 'predicted', got {value!r}") from None


@app.command("explain")
def explain_cmd(
    image: Path = typer.Argument(..., help="PNG/JPEG, DICOM, NIfTI (4D = channels last) or .npy (C, *spatial)"),
    model: str = typer.Option(..., "--model", "-m", help="TorchScript file, package.module:factory, or zoo:<task>"),
    weights: Optional[str] = typer.Option(None, help="state dict for a package.module:factory model"),
    method: str = typer.Option("saliency", help="comma-separated method names (see `medexplain methods`)"),
    target: str = typer.Option("predicted", help="class index, or 'predicted' for the model's top class"),
    layer: Optional[str] = typer.Option(None, help="layer for CAM methods (dotted name); default: last conv"),
    option: list[str] = typer.Option([], "--option", "-o", help="method option key=value (repeatable); "
                                     "goes to every chosen method that accepts it, or method.key=value for one"),
    out: Path = typer.Option(Path("medexplain_out"), help="output directory"),
):
    """Explain one image with one or more methods; writes NIfTI maps on the input's affine, PNG overlays
    and info.json."""
    methods, options, tgt = split_list(method), parse_options(option), parse_target(target)
    with cli_errors(), Progress(console=console, transient=True) as bar:
        task = bar.add_task("explaining", total=len(methods))
        res = explain_image(image, model, methods, out, weights=weights, target=tgt, layer=layer, options=options,
                            on_method=lambda _m: bar.advance(task))
    console.print(f"wrote {len(res.attributions)} map(s) to [bold]{out}[/]")


@app.command("methods")
def methods_cmd():
    """List the available explanation methods."""
    sys.stdout.write("\n".join(available_methods()) + "\n")
