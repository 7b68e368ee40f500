"""Explainers, one module per method family. Importing this package registers every method with the
registry (:mod:`medexplain.engine.registry`), so :func:`medexplain.engine.explain` can find them; ``docs/design.md``
lists what lives where."""
# each module registers its methods; captum_methods and lrp adapt Captum (the peers' methods)
from medexplain.methods import cam, captum_methods, gradient, instance, lrp, medcam, occlusion, patchnet, shapley, ssplain  # noqa: F401
