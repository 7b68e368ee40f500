"""medexplain: explain medical-imaging neural networks (2D/3D, classification and segmentation).

>>> import medexplain as mx
>>> attr = mx.explain(model, x, method="gradcam", target=1, layer="features.7")

Every name here loads on first use, so importing the package (and ``medexplain --help``) imports no torch.
"""
import importlib

from medexplain import errors

__version__ = "0.1.0"

__all__ = ["Attribution", "Model", "ModelSpec", "available_methods", "errors", "explain", "load_model", "normalize", "register",
           "targets"]

#: Public names and the module that defines each (loaded on first use).
_NAMES = {"Attribution": "engine.attribution", "available_methods": "engine.explain", "explain": "engine.explain",
          "normalize": "engine.ops", "register": "engine.registry", "channel_shapley": "segmentation.shapley",
          "Model": "models.model", "ModelSpec": "models.spec", "load_model": "models.model"}
#: Packages and modules reachable as attributes (``mx.metrics``, ``mx.targets``), loaded on first use: the
#: layers (docs/design.md, "The layers") and the engine's modules by their short names.
_MODULES = {name: name for name in ("engine", "models", "methods", "metrics", "segmentation", "io", "pipelines",
                                    "data", "examples")}
_MODULES.update({name: f"engine.{name}" for name in ("targets", "ops", "core", "registry")})


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _MODULES:
        return importlib.import_module(f".{_MODULES[name]}", __name__)
    raise AttributeError(f"module 'medexplain' has no attribute {name!r}")
