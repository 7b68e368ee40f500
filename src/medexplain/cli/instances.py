"""``medexplain instances IMAGE... --model MODEL --out DIR``: per-lesion, per-channel saliency of a
segmentation model (Spagnolo et al., seed 001).

IMAGE is either one NIfTI with the channels (contrasts) as the 4th axis, as nibabel stores them
(``X x Y x Z x C``), or one 3D file per channel given in channel order (``flair.nii.gz t1.nii.gz``; all on
the same grid). The work and the files written are :func:`medexplain.pipelines.explain_lesion_instances`:

* ``instances.csv``: one row per instance (kind, size, per-channel saliency measures, ring profile);
* ``instances.nii.gz``: the instance label map (value k = row k of the table);
* ``probability.nii.gz``: the model's lesion probability;
* ``instance_<k>_<kind>.nii.gz``: the saliency map of instance k, one volume per input channel
  (4D, channels last; Grad-CAM++ gives one volume);
* with ``--reference``: ``statistics.csv`` (TP / FP / FN tests); with ``--context D``: ``context.csv``.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..pipelines import explain_lesion_instances
from ..targets import parse_target
from . import app
from ._common import (
    ModelInputs,
    activation_option,
    cli_errors,
    console,
    model_input_options,
    output_option,
    parse_output,
    pass_progress,
    split_list,
    target_option,
)


@app.command("instances")
@model_input_options
def instances_cmd(
    image: List[Path] = typer.Argument(..., help="one NIfTI with channels last (X Y Z C), or one 3D file per channel"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="TorchScript file, package.module:factory, or "
                                        "zoo:<task> (or give --nnunet)"),
    out: Path = typer.Option(..., "--out", help="output directory"),
    weights: Optional[str] = typer.Option(None, help="state dict for a package.module:factory model"),
    threshold: float = typer.Option(0.5, help="lesion probability threshold (reference: 0.3-0.4)"),
    method: str = typer.Option("smoothgrad", help="smoothgrad or gradcam++"),
    aggregate: str = typer.Option("mean", help="SmoothGrad aggregation over the lesion: mean or max"),
    target: str = target_option(),
    channel: Optional[int] = typer.Option(None, help="the lesion class's output channel (the same as --target K)"),
    region: Optional[str] = typer.Option(None, "--region", help="'predicted' (default: the thresholded prediction) "
                                         "or a mask file whose connected components are the instances"),
    activation: str = activation_option(),
    output: Optional[str] = output_option(),
    n_samples: int = typer.Option(50, help="SmoothGrad noise samples"),
    sigma: float = typer.Option(0.05, help="noise sd as a fraction of the first channel's range"),
    seed: int = typer.Option(0, help="noise seed"),
    min_size: int = typer.Option(6, help="drop components with fewer voxels"),
    connectivity: Optional[int] = typer.Option(None, help="rank 1..3 or neighbours 6/18/26 (default 18)"),
    reference: Optional[Path] = typer.Option(None, help="ground-truth label map (integer or binary values): labels "
                                             "instances TP/FP/FN; another image is refused"),
    reference_threshold: Optional[float] = typer.Option(None, "--reference-threshold", help="read --reference as "
                                                        "a probability map in [0, 1], inside where > this"),
    rings: int = typer.Option(5, help="ring profile distances 1..R"),
    context: int = typer.Option(0, help="context experiment up to this many dilations (0: skip)"),
    layer: Optional[str] = typer.Option(None, help="Grad-CAM++ layer (default: decoder conv at half resolution)"),
    upsample: Optional[str] = typer.Option(None, help="Grad-CAM++: how the layer's map reaches the input grid: aligned "
                                           "(receptive-field aligned; default) or bilinear (MONAI's)"),
    channel_names: Optional[str] = typer.Option(None, help="comma-separated input channel names for the table"),
    chunk_size: int = typer.Option(10, help="noise samples per forward pass"),
    inputs: ModelInputs = None,
):
    """Find lesion instances in the model's segmentation and explain each one per input channel. The
    probability is read with --activation (auto: a model that already outputs probabilities is not
    softmaxed again); info.json records the class, activation and preprocessing."""
    with cli_errors(), pass_progress() as bar:
        tgt = parse_target(target)
        res = explain_lesion_instances(list(image), model, out, weights=weights, threshold=threshold, method=method,
                                       aggregate=aggregate, channel=channel if channel is not None else tgt,
                                       n_samples=n_samples, sigma=sigma, seed=seed, min_size=min_size,
                                       connectivity=connectivity, reference=reference,
                                       reference_threshold=reference_threshold, rings=rings, context=context,
                                       layer=layer, upsample=upsample, channel_names=split_list(channel_names) or None,
                                       chunk_size=chunk_size, activation=activation, output=parse_output(output),
                                       region=region, on_progress=bar.update, on_estimate=bar.estimate,
                                       **inputs.pipeline_kwargs())
    i = res.info
    console.print(f"class {i['class']} ({i['how']}); probability read with activation {i['activation']} "
                  f"({i['activation_how']}): max {i['probability_max']:.4g}")
    if not res.instances:
        console.print(f"no lesion instance above threshold {threshold} (min size {min_size}); wrote "
                      f"the probability map to [bold]{out}[/]")
        return
    rows = res.rows
    cols = ["instance", "kind", "size", *[c for c in rows[0] if c.startswith("channel_share_")],
            *[c for c in rows[0] if c.startswith("ring0_")]]
    table = Table(title=f"{len(res.instances)} instance(s), {res.seconds:.1f} s")
    for col in cols:
        table.add_column(col)
    for r in rows:
        table.add_row(*[f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols])
    console.print(table)
    console.print(f"wrote the table and {len(res.instances)} map(s) to [bold]{out}[/]")
