"""The ``medexplain`` command line (Typer + Rich). Each sub-command lives in its own module here."""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Explain medical-imaging neural networks (2D/3D, classification and segmentation).")

# Sub-command modules register themselves on `app` when imported.
for _mod in ("explain", "demo", "train", "evaluate", "instances", "shapley", "run", "examples"):
    try:
        importlib.import_module(f"{__name__}.{_mod}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{_mod}":
            raise


def main():
    app()
