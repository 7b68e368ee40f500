"""medexplain: explain medical-imaging neural networks (2D/3D, classification and segmentation).

>>> import medexplain as mx
>>> attr = mx.explain(model, x, method="gradcam", target=1, layer="features.7")
"""
from . import errors, targets
from .attribution import Attribution
from .explain import available_methods, explain
from .models.model import Model, load_model
from .ops import normalize
from .registry import register

__version__ = "0.1.0"

__all__ = ["Attribution", "Model", "available_methods", "errors", "explain", "load_model", "normalize", "register",
           "targets"]


def __getattr__(name):
    # Sub-packages load on first use so `import medexplain` stays fast (no MONAI import for the core).
    import importlib
    if name in ("metrics", "segmentation", "models", "data", "io", "report", "shapley", "run", "training", "demo",
                "evaluation", "pipelines", "render", "ops", "core", "registry", "examples"):
        return importlib.import_module(f".{name}", __name__)
    if name == "channel_shapley":
        return importlib.import_module(".shapley", __name__).channel_shapley
    raise AttributeError(f"module 'medexplain' has no attribute {name!r}")
