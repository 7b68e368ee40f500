"""``medexplain instances IMAGE... --model MODEL --out DIR``: per-lesion, per-channel saliency of a
segmentation model (Spagnolo et al., seed 001).

IMAGE is either one NIfTI with the channels (contrasts) as the 4th axis, as nibabel stores them
(``X x Y x Z x C``), or one 3D file per channel given in channel order (``flair.nii.gz t1.nii.gz``; all on
the same grid). Every output is written atomically into DIR, NIfTI on the (first) input's affine:

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
from rich.console import Console
from rich.table import Table

from . import app

console = Console(stderr=True)


def read_channels(paths: list[Path]):
    """``(C, *spatial)`` float32 tensor and the first file's meta from one multi-channel file or one
    file per channel (same grid required)."""
    import numpy as np
    import torch

    from medexplain import io
    from medexplain.errors import FileFormatError
    imgs, metas = zip(*[io.read_image(p) for p in paths])
    if len(imgs) > 1:
        if any(i.shape[0] != 1 for i in imgs):
            raise FileFormatError("with several IMAGE files, each must hold one channel (a 3D volume)")
        if len({tuple(i.shape) for i in imgs}) != 1:
            raise FileFormatError(f"the channel files have different grids: {[tuple(i.shape[1:]) for i in imgs]}")
        if not all(np.allclose(m["affine"], metas[0]["affine"], atol=1e-4) for m in metas):
            raise FileFormatError("the channel files have different affines: resample them to one grid first")
    return torch.cat(imgs), metas[0]


@app.command("instances")
def instances_cmd(
    image: List[Path] = typer.Argument(..., help="one NIfTI with channels last (X Y Z C), or one 3D file per channel"),
    model: str = typer.Option(..., "--model", "-m", help="TorchScript file, package.module:factory, or zoo:<task>"),
    out: Path = typer.Option(..., "--out", help="output directory"),
    weights: Optional[str] = typer.Option(None, help="state dict for a package.module:factory model"),
    threshold: float = typer.Option(0.5, help="lesion probability threshold (reference: 0.3-0.4)"),
    method: str = typer.Option("smoothgrad", help="smoothgrad or gradcam++"),
    aggregate: str = typer.Option("mean", help="SmoothGrad aggregation over the lesion: mean or max"),
    channel: int = typer.Option(1, help="output channel of the lesion class"),
    n_samples: int = typer.Option(50, help="SmoothGrad noise samples"),
    sigma: float = typer.Option(0.05, help="noise sd as a fraction of the first channel's range"),
    seed: int = typer.Option(0, help="noise seed"),
    min_size: int = typer.Option(6, help="drop components with fewer voxels"),
    connectivity: Optional[int] = typer.Option(None, help="rank 1..3 or neighbours 6/18/26 (default 18)"),
    reference: Optional[Path] = typer.Option(None, help="ground-truth mask: labels instances TP/FP/FN"),
    rings: int = typer.Option(5, help="ring profile distances 1..R"),
    context: int = typer.Option(0, help="context experiment up to this many dilations (0: skip)"),
    layer: Optional[str] = typer.Option(None, help="Grad-CAM++ layer (default: decoder conv at half resolution)"),
    channel_names: Optional[str] = typer.Option(None, help="comma-separated input channel names for the table"),
    chunk_size: int = typer.Option(10, help="noise samples per forward pass"),
):
    """Find lesion instances in the model's segmentation and explain each one per input channel."""
    import torch

    from medexplain import io
    from medexplain import segmentation as seg
    from medexplain.core import check_input, model_expectations
    from medexplain.errors import MedexplainError, TargetError
    from medexplain.models.loading import load_model

    from .explain import fail

    try:
        img, meta = read_channels(list(image))
        net = load_model(model, weights)
        x = check_input(img[None], **model_expectations(net))
        names = [n.strip() for n in channel_names.split(",")] if channel_names else None
        with torch.no_grad():
            logits = net(x)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        if logits.ndim != x.ndim or not 0 <= channel < logits.shape[1]:
            raise TargetError(f"the model output {tuple(logits.shape)} is not a segmentation with "
                                           f"channel {channel}; set --channel")
        prob = torch.softmax(logits, 1)[0, channel] if logits.shape[1] > 1 else torch.sigmoid(logits[0, channel])
        ref = None
        if reference is not None:
            ref_img, _ = io.read_image(reference)
            ref = ref_img[0] > 0.5
        insts = seg.find_instances(prob, threshold=threshold, connectivity=connectivity, min_size=min_size,
                                   reference=ref)
        out.mkdir(parents=True, exist_ok=True)
        io.write_nifti(prob, out / "probability.nii.gz", meta["affine"])
        io.write_nifti(seg.label_map(insts, tuple(prob.shape)).float(), out / "instances.nii.gz", meta["affine"])
        if not insts:
            seg.write_csv([], out / "instances.csv")
            console.print(f"no lesion instance above threshold {threshold} (min size {min_size}); wrote "
                          f"the probability map to [bold]{out}[/]")
            return
        with console.status(f"explaining {len(insts)} instance(s) with {method}"):
            attr = seg.explain_instances(net, x, insts, method=method, aggregate=aggregate, channel=channel,
                                         n_samples=n_samples, sigma=sigma, seed=seed, chunk_size=chunk_size,
                                         layer=layer)
        rows = seg.quantify(insts, attr.map, rings=rings, connectivity=connectivity,
                            channel_names=names if attr.map.shape[1] == x.shape[1] else None)
        for k, (inst, m) in enumerate(zip(insts, attr.map), start=1):
            io.write_nifti(m, out / f"instance_{k:03d}_{inst.kind or 'pred'}.nii.gz", meta["affine"])
        seg.write_csv(rows, out / "instances.csv")
        if ref is not None:
            seg.write_csv(seg.group_statistics(rows), out / "statistics.csv")
        if context > 0:
            crow = []
            for k, inst in enumerate(insts, start=1):
                for r in seg.context_experiment(net, x, inst, d_max=context, channel=channel, threshold=threshold,
                                                connectivity=connectivity):
                    crow.append({"instance": k, "kind": inst.kind or "", **r})
            seg.write_csv(crow, out / "context.csv")
    except MedexplainError as e:
        fail(e)
    table = Table(title=f"{len(insts)} instance(s), {attr.info['seconds']:.1f} s")
    share_cols = [c for c in rows[0] if c.startswith("channel_share_")]
    for col in ["instance", "kind", "size", *share_cols, *[c for c in rows[0] if c.startswith("ring0_")]]:
        table.add_column(col)
    for r in rows:
        table.add_row(*[f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in
                        ["instance", "kind", "size", *share_cols, *[c for c in r if c.startswith("ring0_")]]])
    console.print(table)
    console.print(f"wrote the table and {len(insts)} map(s) to [bold]{out}[/]")
