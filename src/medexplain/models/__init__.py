"""Models: PatchNet (MedicalPatchNet), the planted-data model zoo, classifiers trained into a folder
(``medexplain train``), model loading from a specification string, MONAI bundles (``load_bundle``) and nnU-Net v2
model folders (``load_nnunet``, needs the optional nnunetv2)."""
import importlib as _importlib

_LAZY = {"PatchNet": ("patchnet", "PatchNet"), "load_model": ("loading", "load_model"),
         "load_trained": ("trained", "load_trained"), "build_model": ("trained", "build_model"),
         "load_bundle": ("bundle", "load_bundle"), "Bundle": ("bundle", "Bundle"),
         "load_nnunet": ("nnunet", "load_nnunet"), "NnUNetModel": ("nnunet", "NnUNetModel"),
         "Model": ("model", "Model"), "ModelSpec": ("spec", "ModelSpec")}


def __getattr__(name):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(_importlib.import_module(f"{__name__}.{mod}"), attr)
    if name in ("zoo", "patchnet", "loading", "trained", "bundle", "nnunet", "model", "spec"):
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
