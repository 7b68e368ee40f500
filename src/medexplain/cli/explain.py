"""``medexplain explain IMAGE --model MODEL --method a,b --target T --out DIR``."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import Progress

from . import app

console = Console(stderr=True)


def fail(err: Exception) -> None:
    """Print a medexplain error as one clear line and exit with status 2 (no traceback)."""
    console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(code=2)


def parse_options(opts: list[str]) -> dict:
    """``--option key=value`` pairs; values parsed as int, float, or kept as strings."""
    out = {}
    for o in opts:
        if "=" not in o:
            raise typer.BadParameter(f"--option expects key=value, got {o!r}")
        k, v = o.split("=", 1)
        for cast in (int, float):
            try:
                v = cast(v)
                break
            except ValueError:
                pass
        out[k] = v
    return out


def parse_int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"{what} must be an int or 'predicted', got {value!r}") from None


def predicted_class(net, x) -> int:
    """The model's top class for a single image (summed over voxels for a dense output)."""
    import torch
    with torch.no_grad():
        out = net(x)
    return int(out.flatten(2).sum(2).argmax(1)[0] if out.ndim > 2 else out.argmax(1)[0])


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
    import medexplain as mx
    from medexplain import io
    from medexplain.core import check_input, model_expectations
    from medexplain.errors import MedexplainError
    from medexplain.explain import route_options
    from medexplain.models.loading import load_model

    try:
        methods = [m.strip() for m in method.split(",") if m.strip()]
        per_method = route_options(methods, parse_options(option), layer)  # bad names fail before any work
        img, meta = io.read_image(image)
        net = load_model(model, weights)
        x = check_input(img[None], **model_expectations(net))
        tgt = predicted_class(net, x) if target == "predicted" else parse_int(target, "--target")
        results = {}
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("explaining", total=len(methods))
            for m in methods:
                attr = mx.explain(net, x, method=m, target=tgt, **per_method[m])
                results[m] = attr
                bar.advance(task)
        stem = image.name.split(".")[0]
        info = {"image": str(image), "model": model, "target": tgt, "methods": {}}
        for m, attr in results.items():
            safe = m.replace("+", "p")
            io.write_nifti(attr.map[0], out / f"{stem}_{safe}.nii.gz", meta["affine"])
            io.write_png_overlay(img, attr.map[0], out / f"{stem}_{safe}.png")
            info["methods"][m] = attr.info
        io.write_json(info, out / "info.json")
    except MedexplainError as e:
        fail(e)
    console.print(f"wrote {len(results)} map(s) to [bold]{out}[/]")


@app.command("methods")
def methods_cmd():
    """List the available explanation methods."""
    import medexplain as mx
    sys.stdout.write("\n".join(mx.available_methods()) + "\n")
