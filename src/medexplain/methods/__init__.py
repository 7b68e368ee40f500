"""Explainers. Importing this package registers every method with :func:`medexplain.explain`."""
from ..models import patchnet  # noqa: F401,E402  (registers "patchnet": saliency of a PatchNet model)
from . import cam, gradient, medcam, occlusion, ssplain  # noqa: F401  # noqa: F401,E402  (seed methods, one module each)
