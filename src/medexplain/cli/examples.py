"""``medexplain examples [NAME ...] --out DIR``: write the example inputs and tiny models that the docs use
(:func:`medexplain.examples.write`)."""
from __future__ import annotations

import typer

from medexplain.cli import app
from medexplain.cli._common import cli_errors, console
from medexplain.cli.params import Flags, takes
from medexplain.examples import GENERATED, INSTALLED, write


@app.command("examples")
@takes("out")
def examples_cmd(names: list[str] = typer.Argument(None, help="which examples (default: all that are installed): "
                                                   + ", ".join([*INSTALLED, *GENERATED])),
                 flags: Flags = None):
    """Write example inputs (pydicom's CT/MR slices and chest radiograph, nibabel's T1) and tiny models (TorchScript,
    a factory module, a MONAI bundle, an nnU-Net folder, a run manifest) that the docs' commands run on."""
    with cli_errors():
        written = write(flags.out, names or None)
    for name, p in written.items():
        what = INSTALLED[name][0] if name in INSTALLED else GENERATED[name]
        console.print(f"{p}  [dim]{what}[/dim]")
