"""Model-randomisation sanity check (Adebayo et al. 2018, "Sanity Checks for Saliency Maps", sec. 3.1).

Cascading randomisation: re-initialise the model's parameterised layers one by one from the output
towards the input, re-explain after each step, and compare the map with the original one by Spearman
rank correlation and SSIM. A method faithful to the model changes as the weights are destroyed; a map
that stays the same is explaining the input, not the model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity

from medexplain.engine.core import model_guard
from medexplain.engine.ops import normalize
from medexplain.errors import InputError
from medexplain.models.model import as_model

__all__ = ["randomization_check", "RandomizationResult"]


@dataclass
class RandomizationResult:
    """``spearman`` and ``ssim`` are ``(n_steps, B)``: row i after randomising ``layers[: i + 1]``."""

    layers: list[str]
    spearman: torch.Tensor
    ssim: torch.Tensor
    info: dict = field(default_factory=dict)

    def passed(self, threshold: float = 0.3) -> bool:
        """Mean Spearman correlation with the fully randomised model's map below ``threshold``."""
        return bool(self.spearman[-1].mean() < threshold)

    def rows(self) -> list[dict]:
        return [{"layer": n, "spearman": float(s.mean()), "ssim": float(m.mean())}
                for n, s, m in zip(self.layers, self.spearman, self.ssim)]


def _parameterised_layers(model: torch.nn.Module) -> list[str]:
    """Leaf-most modules with their own parameters and a reset, in forward-definition order."""
    return [n for n, m in model.named_modules()
            if n and hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False))]


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    win = min(7, *a.shape)
    win -= 1 - win % 2  # odd window no larger than the smallest side
    if win < 3:
        return float("nan")
    return float(structural_similarity(a, b, win_size=win, data_range=1.0))


def randomization_check(model, x, method: str, target=None, layers: list[str] | None = None,
                        absolute: bool = True, seed: int = 0, cascade: bool = True,
                        **options) -> RandomizationResult:
    """Cascading randomisation from the top layer down (``layers`` default: every parameterised layer).

    ``cascade=False`` skips the intermediate steps and reports only the fully randomised model (one
    row, named ``"all"``): the figure the pass/fail rule uses, at the cost of one explanation.

    Maps are summed over channels, optionally taken in absolute value (Adebayo et al. report both), and
    min-max normalised before SSIM. The user's model is never modified: a deep copy is randomised.
    ``model``: an ``mx.Model`` or an ``nn.Module`` (wrapped in one, :func:`medexplain.models.model.as_model`);
    ``layers`` are named as in its (first) network, and an ensemble has that layer re-initialised in every member.
    """
    from medexplain.engine.explain import explain
    model = as_model(model)
    layers = list(reversed(layers or _parameterised_layers(model.networks[0])))

    def flat_maps(net):
        m = explain(net, x, method=method, target=target, **options).map.sum(1, keepdim=True)
        return normalize(m.abs() if absolute else m, "minmax")[:, 0].double().cpu().numpy()

    ref = flat_maps(model)
    with model_guard(model):  # the copy inherits the policy's modes; the original is restored as found
        rand = copy.deepcopy(model)
    members = [dict(net.named_modules()) for net in rand.networks]
    unknown = [n for n in layers if not hasattr(members[0].get(n), "reset_parameters")]
    if unknown:
        raise InputError(f"layer(s) {unknown} are not parameterised layers of the model; layers: "
                         f"{list(reversed(_parameterised_layers(model.networks[0])))}")
    gen_state = torch.random.get_rng_state()
    sp, ss = [], []
    try:
        torch.manual_seed(seed)
        steps = [[n] for n in layers] if cascade else [layers]
        for step in steps:
            for name in step:
                for named in members:
                    if name in named:
                        named[name].reset_parameters()
            cur = flat_maps(rand)
            sp.append([spearmanr(r.ravel(), c.ravel())[0] for r, c in zip(ref, cur)])
            ss.append([_ssim(r, c) for r, c in zip(ref, cur)])
    finally:
        torch.random.set_rng_state(gen_state)
    nan_to_zero = lambda v: torch.nan_to_num(torch.tensor(v, dtype=torch.float64), nan=0.0)  # noqa: E731
    return RandomizationResult(layers if cascade else ["all"], nan_to_zero(sp), torch.tensor(ss, dtype=torch.float64),
                               {"method": method, "absolute": absolute, "seed": seed})
