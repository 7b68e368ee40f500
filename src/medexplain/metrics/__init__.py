"""Evaluation metrics: localisation, faithfulness, smoothness, ranking, sanity checks.

All are N-D (2D and 3D) and batched over cases, torch in and out.
"""
import importlib as _importlib

_SUBMODULES = ("localisation", "faithfulness", "ranking", "sanity",
               "meta", "perturbation", "robustness", "randomisation")  # the last four: peer metrics (issue 19)
for _name in _SUBMODULES:
    try:
        _mod = _importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _e:  # a module not written yet in this checkout
        if _e.name != f"{__name__}.{_name}":
            raise
        continue
    for _public in getattr(_mod, "__all__", []):
        globals()[_public] = getattr(_mod, _public)
