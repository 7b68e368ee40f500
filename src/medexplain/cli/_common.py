"""What every command shares: the one error handler (typed errors and warnings printed as one line),
the error console, ``--option key=value`` parsing, and the options of the one target grammar, output
activation, output selection and preprocessing that ``explain``, ``instances``, ``shapley`` and ``run``
all take (declared once here so their names and help texts agree), and :func:`model_input_options`, which
gives ``explain``, ``instances`` and ``shapley`` the preprocessing, sliding-window and nnU-Net flags in one line."""
from __future__ import annotations

import contextlib
import functools
import inspect
import signal
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..errors import MedexplainError
from ..options import parse_pairs
from ..transforms import INTENSITY_HELP, Preprocessing

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
    method's signature (:func:`medexplain.options.check_options`). A typed error for a pair without ``=``."""
    return parse_pairs(opts)


def parse_output(value: str | None):
    """``--output``: a tuple index (``0``, ``-1``) or a dict key; ``None`` for the default."""
    if value is None or not value.strip():
        return None
    try:
        return int(value)
    except ValueError:
        return value.strip()


# ---- the options every explaining command shares -------------------------------------------------------
TARGET_HELP = ("class index, or 'predicted': a classifier's top class; a segmenter's foreground class with the most "
               "predicted voxels (never the background unless asked by index)")
REGION_HELP = ("segmenters: 'predicted' (the model's own predicted region of the class; default), 'all' (the "
               "class over the whole image), or a mask file (NIfTI/PNG/NPY/DICOM, resampled onto the image grid "
               "by its geometry)")
ACTIVATION_HELP = ("the model's output activation: auto (outputs in [0, 1] summing to 1 over channels, or a final "
                   "Softmax/Sigmoid, are probabilities; else softmax for several channels, sigmoid for one), "
                   "softmax, sigmoid, or none (already probabilities)")
OUTPUT_HELP = ("which model output to explain when it returns a tuple (index), stacked heads (B, heads, K, ...; index) or "
               "a dict (key); default: the first element, a one-key dict's value")
TRANSFORM_HELP = ("package.module:factory returning a MONAI Compose (dictionary or array transforms) applied before "
                  "the model and inverted for the maps (the current folder is importable)")


def target_option(default: str = "predicted"):
    return typer.Option(default, "--target", help=TARGET_HELP)


def region_option():
    return typer.Option(None, "--region", help=REGION_HELP)


def activation_option():
    return typer.Option("auto", "--activation", help=ACTIVATION_HELP)


def output_option():
    return typer.Option(None, "--output", help=OUTPUT_HELP)


def spacing_option():
    return typer.Option(None, "--spacing", help="resample to this voxel spacing in mm (one value, or one per axis: 1,1,2)")


def orientation_option():
    return typer.Option(None, "--orientation", help="reorient to these axis codes first, e.g. RAS")


def spatial_size_option():
    return typer.Option(None, "--spatial-size", help="centred pad/crop to this size (e.g. 128,128,64)")


def divisible_by_option():
    return typer.Option(None, "--divisible-by", help="pad every side up to a multiple of N (the model's stride); "
                        "with --min-spatial-size: at least that size and a multiple of N")


def min_spatial_size_option():
    return typer.Option(None, "--min-spatial-size", help="centred pad up to at least this size (one value, or one per axis; "
                        "never crops); with --divisible-by K: at least this size and a multiple of K (e.g. --min-spatial-size "
                        "128 --divisible-by 16)")


def intensity_option():
    return typer.Option(None, "--intensity", help=f"intensity normalisation: {INTENSITY_HELP}")


def transform_option():
    return typer.Option(None, "--transform", help=TRANSFORM_HELP)


def preprocessing(spacing: Optional[str], orientation: Optional[str], spatial_size: Optional[str],
                  divisible_by: Optional[str], intensity: Optional[str], transform: Optional[str],
                  min_spatial_size: Optional[str] = None) -> Preprocessing:
    """The preprocessing flags as one :class:`~medexplain.transforms.Preprocessing` (parsed and checked
    there; call inside :func:`cli_errors`)."""
    return Preprocessing(spacing=spacing, orientation=orientation, spatial_size=spatial_size,
                         divisible_by=divisible_by, intensity=intensity, transform=transform,
                         min_spatial_size=min_spatial_size)


# ---- sliding windows (medexplain.sliding, docs/sliding_window.md) -----------------------------------------
def roi_size_option():
    return typer.Option(None, "--roi-size", help="run the model by sliding windows of this size (one value, or one per "
                        "axis: 96,96,64), as MONAI's SlidingWindowInferer; gradients are taken window by window")


def overlap_option():
    return typer.Option(0.25, "--overlap", help="sliding-window overlap in [0, 1) (with --roi-size)")


def sw_batch_size_option():
    return typer.Option(1, "--sw-batch-size", help="windows per model call (with --roi-size)")


def sw_mode_option():
    return typer.Option("constant", "--sw-mode", help="blending of overlapping windows: constant or gaussian")


def memory_option():
    return typer.Option(None, "--memory", help="memory budget in GB of one model call (default: half the memory "
                        "available): the rows per call are capped to fit, and a method that cannot fit one row is "
                        "refused before any compute")


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


# ---- nnU-Net v2 model folders (medexplain.models.nnunet, docs/nnunet.md) ----------------------------------
def nnunet_option():
    return typer.Option(None, "--nnunet", help="an nnU-Net v2 trained-model folder (plans.json, dataset.json, "
                        "fold_K/checkpoint_final.pth): its networks, preprocessing, sliding window and mirroring")


def folds_option():
    return typer.Option("0", "--folds", help="with --nnunet: comma-separated folds (the mean of their scores), e.g. "
                        "0,1,2,3,4, or all (fold_all)")


def no_mirroring_option():
    return typer.Option(False, "--no-mirroring", help="with --nnunet: no mirroring test-time augmentation (default: "
                        "the mean over the mirrored passes, as nnU-Net predicts)")


def configuration_option():
    return typer.Option("3d_fullres", "--configuration", help="with --nnunet: the plans' configuration the folder "
                        "was trained with")


def trust_checkpoint_option():
    return typer.Option(False, "--trust-checkpoint", help="with --nnunet: unpickle checkpoints fully (as nnU-Net "
                        "does); default: tensors and plain values only")


def nnunet_model(folder, folds: str, no_mirroring: bool, configuration: str, trust_checkpoint: bool = False):
    """The nnU-Net flags as a loaded :class:`~medexplain.models.nnunet.NnUNetModel` (None without --nnunet;
    call inside :func:`cli_errors`)."""
    if folder is None:
        return None
    from ..models.nnunet import load_nnunet

    return load_nnunet(folder, configuration, split_list(folds), use_mirroring=not no_mirroring,
                       trusted=trust_checkpoint)


# ---- the model-input flags of explain, instances and shapley, declared once --------------------------------
#: (parameter, type, option factory): the flags that prepare the model's input and run the model on it.
MODEL_INPUT_FLAGS = (
    ("spacing", Optional[str], spacing_option), ("orientation", Optional[str], orientation_option),
    ("spatial_size", Optional[str], spatial_size_option),
    ("min_spatial_size", Optional[str], min_spatial_size_option),
    ("divisible_by", Optional[str], divisible_by_option),
    ("intensity", Optional[str], intensity_option), ("transform", Optional[str], transform_option),
    ("roi_size", Optional[str], roi_size_option), ("overlap", float, overlap_option),
    ("sw_batch_size", int, sw_batch_size_option), ("sw_mode", str, sw_mode_option),
    ("nnunet", Optional[Path], nnunet_option), ("folds", str, folds_option),
    ("no_mirroring", bool, no_mirroring_option), ("configuration", str, configuration_option),
    ("trust_checkpoint", bool, trust_checkpoint_option), ("memory", Optional[float], memory_option),
)


@dataclass(frozen=True)
class ModelInputs:
    """The :data:`MODEL_INPUT_FLAGS` of one call; :meth:`pipeline_kwargs` turns them into the pipelines'
    ``preprocessing=``, ``inferer=`` and ``nnunet=`` (parsing, and loading an nnU-Net folder: call it inside
    :func:`cli_errors`)."""

    flags: dict

    def pipeline_kwargs(self) -> dict:
        f = self.flags
        return {"preprocessing": preprocessing(f["spacing"], f["orientation"], f["spatial_size"], f["divisible_by"],
                                               f["intensity"], f["transform"], f["min_spatial_size"]),
                "inferer": sliding_window(f["roi_size"], f["overlap"], f["sw_batch_size"], f["sw_mode"]),
                "nnunet": nnunet_model(f["nnunet"], f["folds"], f["no_mirroring"], f["configuration"],
                                       f["trust_checkpoint"]),
                "memory": f["memory"]}


def model_input_options(command):
    """Decorate a command (below ``@app.command``) that takes ``inputs: ModelInputs``: Typer then sees the
    command's own parameters followed by the :data:`MODEL_INPUT_FLAGS`, and the command is called with those
    flags packed into ``inputs``. Typer reads a command's ``__signature__`` and type hints, which are rewritten
    here (hints of the command's own parameters still resolve in its module, through ``__wrapped__``)."""
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "inputs"]
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=make(), annotation=t)
             for n, t, make in MODEL_INPUT_FLAGS]

    @functools.wraps(command)
    def wrapper(**kwargs):
        flags = {n: kwargs.pop(n) for n, _, _ in MODEL_INPUT_FLAGS}
        return command(**kwargs, inputs=ModelInputs(flags))

    wrapper.__signature__ = inspect.Signature(own + extra)
    wrapper.__annotations__ = {**{k: v for k, v in command.__annotations__.items() if k != "inputs"},
                               **{n: t for n, t, _ in MODEL_INPUT_FLAGS}}
    return wrapper


def split_list(value: str | None) -> list[str]:
    """A comma-separated option as a list of its non-empty, stripped items."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


class _PassProgress:
    """A Rich progress bar per method over the rows it sends through the model, and the cost estimate
    printed before a call expected to take more than about a minute
    (:attr:`medexplain.options.CostEstimate.long`)."""

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
