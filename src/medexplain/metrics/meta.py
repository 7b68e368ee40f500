"""What each peer-style metric is: its direction and what it applies to, declared once (as Quantus declares
``score_direction``, ``evaluation_category`` and ``data_applicability`` on its metric classes).

Every metric of :mod:`.perturbation`, :mod:`.robustness` and :mod:`.randomisation` is registered here with a
:class:`MetricInfo`; :func:`available_metrics` lists them, optionally only those that apply to a target, so
a bench or report does not special-case metric names.
"""
from __future__ import annotations

from dataclasses import dataclass

from medexplain.engine.targets import Class, MultiLabel, Region, Target, as_target
from medexplain.errors import TargetError

__all__ = ["MetricInfo", "METRICS", "available_metrics", "metric_info", "explanation_options", "reexplaining"]

TARGET_KINDS = ("Class", "MultiLabel", "Region")


@dataclass(frozen=True)
class MetricInfo:
    """``directions``: for each summary figure of the result, ``"higher"`` or ``"lower"`` is better;
    ``primary`` names the figure a table shows. ``applies_to``: the target kinds the metric is defined for
    (``Class`` on a classifier, ``MultiLabel``, ``Region`` on a segmenter). ``needs``: ``"maps"`` (scores
    precomputed maps) or ``"method"`` (re-explains with a registered method). ``peer``: the reference
    implementation the tests compare with."""

    name: str
    category: str
    directions: dict
    primary: str
    applies_to: tuple
    needs: str
    reference: str
    peer: str

    @property
    def higher_is_better(self) -> bool:
        return self.directions[self.primary] == "higher"

    def check(self, target) -> Target:
        """The target as a :class:`Target`, or a :class:`TargetError` when the metric is not defined for it."""
        t = as_target(target)
        kind = _kind(t)
        if kind not in self.applies_to:
            raise TargetError(f"{self.name} is defined for {', '.join(self.applies_to)} targets, not {kind}")
        return t


def _kind(t: Target) -> str:
    for cls in (Region, MultiLabel, Class):
        if isinstance(t, cls):
            return cls.__name__
    base = getattr(t, "base", None)  # a RowTarget (noise tunnel) is its base's kind
    return _kind(base) if isinstance(base, Target) else type(t).__name__


METRICS: dict[str, MetricInfo] = {}


def register_metric(info: MetricInfo):
    def deco(fn):
        METRICS[info.name] = info
        fn.info = info
        return fn
    return deco


def metric_info(name: str) -> MetricInfo:
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; available: {sorted(METRICS)}")
    return METRICS[name]


def available_metrics(target=None) -> list[str]:
    """Names of the registered peer-style metrics; with ``target``, those defined for its kind."""
    if target is None:
        return sorted(METRICS)
    kind = _kind(as_target(target))
    return sorted(n for n, m in METRICS.items() if kind in m.applies_to)


def explanation_options(method_options: dict | None, options: dict) -> dict:
    """The options a metric that re-explains passes to every explanation: ``method_options`` (a dict, for
    names the metric takes itself, such as ``n_samples``), then the other keyword arguments. The model is
    an ``mx.Model`` (its sliding window, passes and output adapter go with it into every explanation)."""
    return {**(method_options or {}), **options}


def reexplaining(metric, model, x, target, method_options: dict | None, options: dict) -> tuple:
    """The prologue of a metric that re-explains with a registered ``method`` (``MetricInfo.needs == "method"``):
    ``(target, options, model, x)``, the target checked against the kinds ``metric`` applies to
    (:meth:`MetricInfo.check`), the options of every explanation (:func:`explanation_options`), the model object
    (:func:`medexplain.models.model.as_model`) and the checked input (:func:`medexplain.engine.core.check_input`).
    What each such metric takes: ``method_options``, options of ``method`` as a dict, for names the metric takes
    itself (``n_samples``, ``seed``, ``chunk_size``), other keyword arguments going to the method too; ``model``, an
    ``mx.Model`` or an ``nn.Module`` (wrapped in one)."""
    from medexplain.engine.core import check_input
    from medexplain.models.model import as_model

    return metric.info.check(target), explanation_options(method_options, options), as_model(model), check_input(x)
