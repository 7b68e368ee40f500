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
    activation_option,
    cli_errors,
    configuration_option,
    console,
    divisible_by_option,
    folds_option,
    intensity_option,
    nnunet_model,
    nnunet_option,
    no_mirroring_option,
    orientation_option,
    output_option,
    parse_options,
    parse_output,
    pass_progress,
    preprocessing,
    region_option,
    spacing_option,
    spatial_size_option,
    split_list,
    target_option,
    transform_option,
    trust_checkpoint_option,
)


def roi_size_option():
    return typer.Option(None, "--roi-size", help="run the model by sliding windows of this size (one value, or one per "
                        "axis: 96,96,64), as MONAI's SlidingWindowInferer; gradients are taken window by window")


def overlap_option():
    return typer.Option(0.25, "--overlap", help="sliding-window overlap in [0, 1) (with --roi-size)")


def sw_batch_size_option():
    return typer.Option(1, "--sw-batch-size", help="windows per model call (with --roi-size)")


def sw_mode_option():
    return typer.Option("constant", "--sw-mode", help="blending of overlapping windows: constant or gaussian")


def sliding_window(roi_size: Optional[str], overlap: float, sw_batch_size: int, sw_mode: str) -> dict | None:
    """The sliding-window flags as the settings dict the pipelines take (None without --roi-size)."""
    if roi_size is None:
        return None
    try:
        roi = [int(v) for v in split_list(roi_size.replace("x", ","))]
    except ValueError:
        raise typer.BadParameter(f"--roi-size must be integers separated by commas, got {roi_size!r}") from None
    return {"roi_size": roi[0] if len(roi) == 1 else roi, "overlap": overlap, "sw_batch_size": sw_batch_size,
            "mode": sw_mode}


@app.command("explain")
def explain_cmd(
    image: list[Path] = typer.Argument(..., help="PNG/JPEG, DICOM (a file, or a folder holding one series), NIfTI "
                                       "(4D = channels last) or .npy (C, *spatial); or one single-channel file per "
                                       "input channel, on one grid (nnU-Net's CASE_0000.nii.gz names are ordered)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="TorchScript file, package.module:factory, or "
                                        "zoo:<task> (or give --bundle)"),
    weights: Optional[str] = typer.Option(None, help="state dict for a package.module:factory model"),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="a MONAI bundle folder (configs/inference.json, "
                                          "models/model.pt): its network, preprocessing and inferer"),
    nnunet: Optional[Path] = nnunet_option(),
    folds: str = folds_option(),
    no_mirroring: bool = no_mirroring_option(),
    configuration: str = configuration_option(),
    trust_checkpoint: bool = trust_checkpoint_option(),
    roi_size: Optional[str] = roi_size_option(),
    overlap: float = overlap_option(),
    sw_batch_size: int = sw_batch_size_option(),
    sw_mode: str = sw_mode_option(),
    method: str = typer.Option("saliency", help="comma-separated method names (see `medexplain methods`)"),
    target: str = target_option(),
    region: Optional[str] = region_option(),
    layer: Optional[str] = typer.Option(None, help="layer for CAM methods (dotted name); default: last conv"),
    option: list[str] = typer.Option([], "--option", "-o", help="method option key=value (repeatable), typed by the "
                                     "method (-o abs=false, -o n_samples=20); goes to every chosen method that "
                                     "accepts it, or method.key=value for one"),
    activation: str = activation_option(),
    output: Optional[str] = output_option(),
    spacing: Optional[str] = spacing_option(),
    orientation: Optional[str] = orientation_option(),
    spatial_size: Optional[str] = spatial_size_option(),
    divisible_by: Optional[str] = divisible_by_option(),
    intensity: Optional[str] = intensity_option(),
    transform: Optional[str] = transform_option(),
    skip_unsupported: bool = typer.Option(False, "--skip-unsupported", help="explain with the methods that apply "
                                          "to the model and record the others as skipped (default: fail before "
                                          "any compute)"),
    out: Path = typer.Option(Path("medexplain_out"), help="output directory"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace this image's files already in --out "
                                   "(default: refuse, naming them)"),
    series: Optional[str] = typer.Option(None, "--series", help="SeriesInstanceUID to read when IMAGE is a folder "
                                         "holding several DICOM series (the error lists them)"),
):
    """Explain one image (one file, or one file per channel) with one or more methods; writes NIfTI maps
    on the input's own grid and affine, PNG overlays and info.json (target, region, activation and
    preprocessing recorded). Everything is checked before any compute; each method's files are written as
    soon as it finishes."""
    with cli_errors(), pass_progress() as bar:
        res = explain_image(image[0] if len(image) == 1 else image, model, split_list(method), out, weights=weights,
                            target=parse_target(target), region=region, layer=layer, options=parse_options(option),
                            output=parse_output(output),
                            activation=activation, skip_unsupported=skip_unsupported,
                            preprocessing=preprocessing(spacing, orientation, spatial_size, divisible_by, intensity,
                                                        transform),
                            on_estimate=bar.estimate, on_progress=bar.update, overwrite=overwrite, series=series,
                            inferer=sliding_window(roi_size, overlap, sw_batch_size, sw_mode), bundle=bundle,
                            nnunet=nnunet_model(nnunet, folds, no_mirroring, configuration, trust_checkpoint))
    t = res.target_info
    console.print(f"explained class {t['class']}" + (f", region {t['region']} ({t['region_voxels']} voxels)"
                                                      if t.get("region") else "") + f" ({t['how']})")
    for m, why in res.skipped.items():
        console.print(f"skipped {m}: {why}")
    for w in res.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    console.print(f"wrote {len(res.attributions)} map(s) to [bold]{out}[/]")


@app.command("methods")
def methods_cmd():
    """List the available explanation methods."""
    sys.stdout.write("\n".join(available_methods()) + "\n")
