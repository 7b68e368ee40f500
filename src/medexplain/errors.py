"""Typed errors. Every user mistake surfaces as one of these, with a message that says what to change."""
from __future__ import annotations

import difflib


class MedexplainError(Exception):
    """Base class of all medexplain errors."""


class InputError(MedexplainError, ValueError):
    """The input tensor has the wrong shape, channel count, dtype, or contains NaN/Inf."""


class TargetError(MedexplainError, ValueError):
    """The target is out of range, malformed, or does not fit the model output."""


class EmptyRegionError(TargetError):
    """A region target's mask selects no voxel for some sample."""


class LayerNotFoundError(MedexplainError, KeyError):
    """A layer name does not exist in the model; the message lists close matches."""

    def __init__(self, name: str, candidates: list[str]):
        close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.4)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        super().__init__(f"layer {name!r} not found in the model.{hint}")
        self.name, self.close_matches = name, close

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


class UnsupportedModelError(MedexplainError, TypeError):
    """The model cannot provide what a method needs (hooks, gradients)."""


class RepeatedLayerCallError(UnsupportedModelError):
    """A CAM layer ran several times in one forward on same-shaped inputs by code medexplain does not know
    (a user's own test-time augmentation or ensemble wrapper): its calls may see flipped or different
    inputs, and summing their cells would mix orientations. The message names the number of calls and
    the ``mx.Model`` options (``flip_axes=``, an ensemble) that do it right, or ``aligned_calls=True``."""


class UnknownMethodError(MedexplainError, ValueError):
    """No explainer is registered under that name."""


class FileFormatError(MedexplainError, ValueError):
    """A file cannot be read: unsupported type, corrupt content, or missing."""


class ModelLoadError(MedexplainError, ValueError):
    """A model specification (TorchScript path or module:factory + weights) cannot be loaded."""


class OptionError(MedexplainError, ValueError):
    """A method option is unknown (the message lists close matches), of the wrong type, or out of range."""


class MemoryBudgetError(OptionError):
    """Even the smallest model call of a method does not fit the memory budget (``--memory``/``memory=``);
    raised before any compute, naming the options that help (:func:`medexplain.engine.options.plan_memory`)."""


class ModelError(MedexplainError, RuntimeError):
    """The model's own forward raised on the given input. The message names the input that was given
    (shape, dtype, channels), what the model seems to expect, and the option that fixes it."""


class OutputPathError(MedexplainError, ValueError):
    """The output folder cannot be written (a file is in the way, or no write permission)."""


class PartialFailure(MedexplainError):
    """Some of several requested computations failed after others were written; ``failed`` maps each
    failed item to its error message, ``result`` holds what was computed and written."""

    def __init__(self, message: str, failed: dict, result=None):
        super().__init__(message)
        self.failed, self.result = failed, result
