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
* with ``--reference``: ``statistics.csv`` (TP / FP / FN tests); with ``--context D``: ``context.csv``;
* with ``--format dicom`` (DICOM input, or ``--dicom-reference``): per instance map
  ``instance_<k>_<kind>_<method>_{pm,seg,sc}.dcm``, explain's three objects (docs/dicom.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional

import typer

from medexplain.cli import app
from medexplain.cli._common import cli_errors, console, pass_progress, split_list
from medexplain.cli._dicom import output_kwargs
from medexplain.cli.params import FORMAT_OUTPUT, MODEL_INPUT, Flags, declared_methods, takes


@app.command("instances")
@takes("model", "weights", "method", "target", "region", "activation", "output", "layer", "seed", "chunk_size",
       "contrasts", "out", *MODEL_INPUT, *FORMAT_OUTPUT)
def instances_cmd(
    image: List[Path] = typer.Argument(..., help="one NIfTI with channels last (X Y Z C), or one 3D file per channel"),
    probability_threshold: float = typer.Option(0.5, "--probability-threshold", min=0, max=1,
                                                help="lesion probability threshold (reference: 0.3-0.4)"),
    threshold: Optional[float] = typer.Option(None, "--threshold", hidden=True, help="old spelling of "
                                              "--probability-threshold"),
    aggregate: Literal["mean", "max"] = typer.Option("mean", help="SmoothGrad aggregation over the lesion"),
    n_samples: int = typer.Option(50, min=1, help="SmoothGrad noise samples"),
    sigma: float = typer.Option(0.05, min=0, help="noise sd as a fraction of the first channel's range"),
    min_size: int = typer.Option(6, min=0, help="drop components with fewer voxels"),
    connectivity: Optional[int] = typer.Option(None, help="rank 1..3 or neighbours 6/18/26 (default 18)"),
    reference: Optional[Path] = typer.Option(None, help="ground-truth label map (integer or binary values): labels "
                                             "instances TP/FP/FN; another image is refused"),
    reference_threshold: Optional[float] = typer.Option(None, "--reference-threshold", help="read --reference as "
                                                        "a probability map in [0, 1], inside where > this"),
    rings: int = typer.Option(5, min=1, help="ring profile distances 1..R"),
    context: int = typer.Option(0, min=0, help="context experiment up to this many dilations (0: skip)"),
    upsample: Optional[Literal["aligned", "bilinear"]] = typer.Option(None, help="Grad-CAM++: how the layer's map "
                                                                      "reaches the input grid: aligned (receptive-field "
                                                                      "aligned; default) or bilinear (MONAI's)"),
    flags: Flags = None,
):
    """Find lesion instances in the model's segmentation and explain each one per input channel (--method:
    instance SmoothGrad by default, gradcam++, or any registered method run on each instance's region). The
    probability is read with --activation (auto: a model that already outputs probabilities is not softmaxed
    again); info.json records the class, activation and preprocessing."""
    from rich.table import Table

    from medexplain.engine.targets import parse_target
    from medexplain.pipelines import explain_lesion_instances

    threshold = probability_threshold if threshold is None else threshold
    methods = flags.methods(declared_methods().instance_default)
    if len(methods) != 1:
        raise typer.BadParameter("instances takes one method (e.g. smoothgrad: instance SmoothGrad, or gradcam++)",
                                 param_hint="--method")
    with cli_errors(), pass_progress() as bar:
        chunk = {} if flags.chunk_size is None else {"chunk_size": flags.chunk_size}
        res = explain_lesion_instances(list(image), flags.model_spec(), flags.out, threshold=threshold,
                                       method=methods[0], aggregate=aggregate, channel=parse_target(flags.target),
                                       n_samples=n_samples, sigma=sigma, seed=flags.seed, min_size=min_size,
                                       connectivity=connectivity, reference=reference,
                                       reference_threshold=reference_threshold, rings=rings, context=context,
                                       layer=flags.layer, upsample=upsample,
                                       channel_names=split_list(flags.contrasts) or None, region=flags.region,
                                       memory=flags.memory, on_progress=bar.update, on_estimate=bar.estimate,
                                       **chunk, **output_kwargs(flags))
    out = flags.out
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
