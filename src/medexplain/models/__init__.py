"""Models: PatchNet (MedicalPatchNet), the planted-data model zoo, classifiers trained into a folder
(``medexplain train``), and model loading from a specification string."""
import importlib as _importlib

_LAZY = {"PatchNet": ("patchnet", "PatchNet"), "load_model": ("loading", "load_model"),
         "load_trained": ("trained", "load_trained"), "build_model": ("trained", "build_model")}


def __getattr__(name):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(_importlib.import_module(f"{__name__}.{mod}"), attr)
    if name in ("zoo", "patchnet", "loading", "trained"):
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
