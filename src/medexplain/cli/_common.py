"""What every command shares at run time: the one error handler (typed errors and warnings printed as one
line), the stop on SIGINT/SIGTERM, the error console, ``--option key=value`` and ``--output`` parsing and the
progress bars. The shared
options themselves are declared once in :mod:`medexplain.cli.params`.

Nothing here imports torch or a medexplain module that does at import time (``medexplain --help`` stays
fast): those imports happen inside the functions, when a command runs."""
from __future__ import annotations

import contextlib
import signal
import threading
import warnings

import typer
from rich.console import Console

from medexplain.cli.params import parse_output, split_list  # noqa: F401  (re-exported for the commands)
from medexplain.errors import MedexplainError

#: Messages and progress go to stderr; tables and listings to stdout.
console = Console(stderr=True)


@contextlib.contextmanager
def cli_errors():
    """The one CLI error handler: a :class:`~medexplain.errors.MedexplainError` raised in the body is printed
    as one line (no traceback) and the command exits with status 2. Warnings raised in the body (several
    model outputs, a 4D series read as channels, a tiny region, ...) are printed as ``warning:`` lines."""
    def show(message, category, filename, lineno, file=None, line=None):
        console.print(f"[bold yellow]warning:[/] {message}")

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.showwarning = show
        try:
            yield
        except MedexplainError as e:
            console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(code=2) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt (past every ``except Exception``, so the atomic writes
    remove their temporary files and no error row is recorded for an item that was merely stopped)."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def stop_signals(message: str = "stopped; rerun with --resume to continue"):
    """SIGINT (Ctrl-C) and SIGTERM end the body with ``message`` and the shell's exit status for the
    signal, 128 + its number (130, 143), instead of a traceback or Click's bare "Aborted!"."""
    def on_term(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    except KeyboardInterrupt as e:
        console.print(f"[bold yellow]{message}[/]")
        raise typer.Exit(code=128 + int(getattr(e, "signum", signal.SIGINT))) from None
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def parse_options(opts: list[str]) -> dict:
    """``--option key=value`` pairs as ``{key: "value"}``; the values stay text, typed later by each
    method's signature (:func:`medexplain.engine.options.check_options`). A typed error for a pair without ``=``."""
    from medexplain.engine.options import parse_pairs

    return parse_pairs(opts)


class _PassProgress:
    """A Rich progress bar per method over the rows it sends through the model, and the cost estimate
    printed before a call expected to take more than about a minute
    (:attr:`medexplain.engine.options.CostEstimate.long`)."""

    def __init__(self, bar):
        self.bar, self.tasks = bar, {}

    def estimate(self, est) -> None:
        if est.long:
            console.print(f"[bold]estimate:[/] {est.describe()}")
        self.tasks[est.method] = self.bar.add_task(est.method, total=est.n_forward)

    def update(self, method: str, done: int, total: int | None) -> None:
        task = self.tasks.get(method)
        if task is None:
            task = self.tasks[method] = self.bar.add_task(method, total=total)
        self.bar.update(task, completed=done, total=total if total is None or done <= total else done)


@contextlib.contextmanager
def pass_progress():
    """``with pass_progress() as p``: ``p.estimate`` and ``p.update`` are the ``on_estimate`` and
    ``on_progress`` callbacks of the library pipelines."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) as bar:
        yield _PassProgress(bar)
