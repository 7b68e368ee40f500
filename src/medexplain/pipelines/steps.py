"""What the commands built on the one case pipeline (:func:`medexplain.pipelines.explain_case`) share: the cost
estimate and progress of a step that is more than the declared cost of one registered call (:class:`StepEstimate`;
``instances``: every lesion instance of a case; ``shapley``: the coalitions of one fold model)."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from medexplain.engine.options import CostEstimate, estimate_cost


class StepEstimate:
    """Replaces the estimate :func:`medexplain.pipelines.explain_method` makes of the method (from its declared cost
    model, which does not know the regions of a ``Regions`` target or bounds permutation sampling) by the step's
    (:func:`medexplain.engine.options.estimate_cost` with ``fn=None``: ``step`` over ``x_shape`` with ``options``,
    at the measured seconds per row and with the method's memory plan), names it ``label``, and reports the rows
    against that total. ``x_shape`` and ``options`` are set by the target stage, once the case is known."""

    def __init__(self, step: str, label: str, on_estimate: Callable | None = None,
                 on_progress: Callable[[str, int, int | None], None] | None = None):
        self.step, self.label, self.on_estimate_, self.on_progress_ = step, label, on_estimate, on_progress
        self.x_shape: tuple = ()
        self.options: dict = {}
        self.est: CostEstimate | None = None

    def on_estimate(self, est: CostEstimate) -> None:
        self.est = replace(estimate_cost(self.step, None, self.x_shape, self.options, est.seconds_per_row, est.memory),
                           method=self.label)
        if self.on_estimate_:
            self.on_estimate_(self.est)

    def on_progress(self, _method: str, done: int, _total: int | None) -> None:
        if self.on_progress_:
            self.on_progress_(self.label, done, None if self.est is None else self.est.n_forward)
