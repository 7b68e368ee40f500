"""The engine: what every explanation shares, whatever the method or the model.

Input checks, the model guard and the one layer hook (:mod:`.core`), targets (:mod:`.targets`), the
method registry (:mod:`.registry`), option checks and the cost and memory plans (:mod:`.options`),
tensor operations (:mod:`.ops`), the sliding-window engine (:mod:`.sliding`, :mod:`.sliding_cam`) and
the entry points ``mx.explain`` / ``mx.available_methods`` (:mod:`.explain`). It imports no method,
model loader, file format or pipeline (``docs/design.md``, "The layers").
"""
