"""Explainers. Importing this package registers every method with :func:`medexplain.explain`."""
from . import cam, gradient, occlusion  # noqa: F401

from . import medcam, ssplain  # noqa: F401,E402  (seed methods, one module each)
from ..models import patchnet  # noqa: F401,E402  (registers "patchnet": saliency of a PatchNet model)
