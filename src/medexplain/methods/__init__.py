"""Explainers. Importing this package registers every method with :func:`medexplain.explain`."""
from . import cam, gradient, occlusion  # noqa: F401

for _optional in ("ssplain", "medcam"):  # seed methods live in their own modules
    try:
        __import__(f"{__name__}.{_optional}")
    except ModuleNotFoundError as e:  # not written yet in this checkout
        if e.name != f"{__name__}.{_optional}":
            raise
