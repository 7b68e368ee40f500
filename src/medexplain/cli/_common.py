"""What every command shares: the one error handler, the error console and ``--option key=value`` parsing."""
from __future__ import annotations

import contextlib

import typer
from rich.console import Console

from ..errors import MedexplainError

#: Messages and progress go to stderr; tables and listings to stdout.
console = Console(stderr=True)


@contextlib.contextmanager
def cli_errors():
    """The one CLI error handler: a :class:`~medexplain.errors.MedexplainError` raised in the body is printed
    as one line (no traceback) and the command exits with status 2."""
    try:
        yield
    except MedexplainError as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(code=2) from None


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


def split_list(value: str | None) -> list[str]:
    """A comma-separated option as a list of its non-empty, stripped items."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]
