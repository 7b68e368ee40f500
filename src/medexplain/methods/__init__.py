"""Explainers, one module per method family. Importing this package registers every method with the
registry (:mod:`medexplain.registry`), so :func:`medexplain.explain` can find them; ``docs/design.md``
lists what lives where."""
from . import cam, gradient, medcam, occlusion, patchnet, ssplain  # noqa: F401  (each registers its methods)
from . import captum_methods, lrp  # noqa: F401,E402  (Captum adapters and LRP, issue 19)
