"""Models: PatchNet (MedicalPatchNet), the planted-data model zoo, and model loading for the CLI."""
import importlib as _importlib

_LAZY = {"PatchNet": ("patchnet", "PatchNet"), "load_model": ("loading", "load_model")}


def __getattr__(name):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(_importlib.import_module(f"{__name__}.{mod}"), attr)
    if name in ("zoo", "patchnet", "loading"):
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
