"""medexplain: explain medical-imaging neural networks (2D/3D, classification and segmentation).

>>> import medexplain as mx
>>> attr = mx.explain(model, x, method="gradcam", target=1, layer="features.7")

Every name here loads on first use, so importing the package (and ``medexplain --help``) imports no torch.
"""
import importlib
import types

from . import errors

__version__ = "0.1.0"

__all__ = ["Attribution", "Model", "available_methods", "errors", "explain", "load_model", "normalize", "register",
           "targets"]

#: Public names and the module that defines each (loaded on first use).
_NAMES = {"Attribution": "attribution", "available_methods": "explain", "explain": "explain", "normalize": "ops",
          "register": "registry", "channel_shapley": "shapley", "Model": "models.model", "load_model": "models.model"}
#: Sub-packages and modules reachable as attributes (``mx.metrics``), loaded on first use.
_MODULES = ("targets", "metrics", "segmentation", "models", "data", "io", "report", "shapley", "run", "training",
            "demo", "evaluation", "pipelines", "render", "ops", "core", "registry", "examples")


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'medexplain' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Importing the submodule ``medexplain.explain`` binds it on the package (Python's import system does
    ``setattr(package, "explain", module)``); the public name ``mx.explain`` is the function, so that
    binding is dropped (the module stays in ``sys.modules``)."""

    def __setattr__(self, name, value):
        if name in _NAMES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _Package
