"""The result every explainer returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Attribution:
    """A raw, signed attribution on the input's spatial grid.

    ``map`` has shape ``(B, C_or_1, *spatial)``; it is never normalised or inverted (use
    :func:`medexplain.normalize`, i.e. :func:`medexplain.engine.ops.normalize`, explicitly). ``info`` holds at
    least ``n_forward`` and ``n_backward`` (sample evaluations: one row through the model counts one) and
    ``seconds``. The conventions are in ``docs/design.md``.
    """

    map: torch.Tensor
    method: str
    target: Any
    info: dict = field(default_factory=dict)

    @property
    def shape(self):
        return tuple(self.map.shape)

    def numpy(self):
        return self.map.detach().cpu().numpy()
