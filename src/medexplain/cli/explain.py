"""``medexplain explain IMAGE --model MODEL --method a,b --target T --out DIR`` and ``medexplain methods``.

The work is :func:`medexplain.pipelines.explain_image`; maps are named ``<stem>_<method>`` with the stem
of :func:`medexplain.io.file_stem` (``scan.v2.nii.gz`` -> ``scan.v2_saliency.nii.gz``).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..explain import available_methods
from ..pipelines import explain_image
from ..targets import parse_target
from . import app
from ._common import (
    ModelInputs,
    activation_option,
    cli_errors,
    console,
    model_input_options,
    output_option,
    parse_options,
    parse_output,
    pass_progress,
    region_option,
    split_list,
    target_option,
)
from ._dicom import OutputOptions, output_format_options


@app.command("explain")
@output_format_options
@model_input_options
def explain_cmd(
    image: Optional[list[Path]] = typer.Argument(None, help="PNG/JPEG, DICOM (a file, or a folder holding one series), "
                                                 "NIfTI (4D = channels last) or .npy (C, *spatial); or one single-channel "
                                                 "file per input channel, on one grid (nnU-Net's CASE_0000.nii.gz names "
                                                 "are ordered); none with --pacs"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="TorchScript file, package.module:factory, or "
                                        "zoo:<task> (or give --bundle)"),
    weights: Optional[str] = typer.Option(None, help="state dict for a package.module:factory model"),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="a MONAI bundle folder (configs/inference.json, "
                                          "models/model.pt): its network, preprocessing and inferer"),
    method: str = typer.Option("saliency", help="comma-separated method names (see `medexplain methods`)"),
    target: str = target_option(),
    region: Optional[str] = region_option(),
    layer: Optional[str] = typer.Option(None, help="layer for CAM methods (dotted name); default: last conv"),
    option: list[str] = typer.Option([], "--option", "-o", help="method option key=value (repeatable), typed by the "
                                     "method (-o abs=false, -o n_samples=20); goes to every chosen method that "
                                     "accepts it, or method.key=value for one"),
    activation: str = activation_option(),
    output: Optional[str] = output_option(),
    skip_unsupported: bool = typer.Option(False, "--skip-unsupported", help="explain with the methods that apply "
                                          "to the model and record the others as skipped (default: fail before "
                                          "any compute)"),
    out: Path = typer.Option(Path("medexplain_out"), help="output directory"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace this image's files already in --out "
                                   "(default: refuse, naming them)"),
    series: Optional[str] = typer.Option(None, "--series", help="SeriesInstanceUID to read when IMAGE is a folder "
                                         "holding several DICOM series (the error lists them)"),
    inputs: ModelInputs = None,
    outputs: OutputOptions = None,
):
    """Explain one image (one file, or one file per channel) with one or more methods; writes NIfTI maps
    on the input's own grid and affine, PNG overlays and info.json (target, region, activation and
    preprocessing recorded). Everything is checked before any compute; each method's files are written as
    soon as it finishes."""
    with cli_errors(), pass_progress() as bar:
        pacs = outputs.pacs
        if (pacs is None) == (not image):
            raise typer.BadParameter("give the IMAGE file(s), or --pacs URL --study UID (not both)")
        kw = dict(weights=weights, target=parse_target(target), region=region, layer=layer,
                  options=parse_options(option), output=parse_output(output), activation=activation,
                  skip_unsupported=skip_unsupported, on_estimate=bar.estimate, on_progress=bar.update,
                  overwrite=overwrite, series=series, bundle=bundle, **inputs.pipeline_kwargs(),
                  **outputs.pipeline_kwargs())
        if pacs is not None:
            from ..pacs import explain_pacs
            kw.pop("dicom_reference")
            res = explain_pacs(pacs, outputs.flags["study"], model, split_list(method), out, **kw)
        else:
            res = explain_image(image[0] if len(image) == 1 else image, model, split_list(method), out, **kw)
    t = res.target_info
    console.print(f"explained class {t['class']}" + (f", region {t['region']} ({t['region_voxels']} voxels)"
                                                      if t.get("region") else "") + f" ({t['how']})")
    for m, why in res.skipped.items():
        console.print(f"skipped {m}: {why}")
    for w in res.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    console.print(f"wrote {len(res.attributions)} map(s) to [bold]{out}[/]")
    if res.stored:
        console.print(f"stored {len(res.stored)} DICOM object(s) in study {outputs.flags['study']} on the PACS")


@app.command("methods")
def methods_cmd():
    """List the available explanation methods."""
    sys.stdout.write("\n".join(available_methods()) + "\n")
