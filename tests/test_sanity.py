"""The randomisation sanity check separates a model-dependent map from a model-independent one."""
import torch

import medexplain as mx
from conftest import image, make
from medexplain.engine import registry


def _input_only(model, x, target, cost):
    """An 'explanation' that ignores the model: the failure mode the check must catch."""
    return x.abs().sum(1, keepdim=True), {}


def test_gradient_map_decorrelates_and_model_untouched():
    model, x = make("cls", 2), image(2, b=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = mx.metrics.randomization_check(model, x, "saliency", target=[0, 1])
    assert res.layers == ["fc", "features.2", "features.0"]
    assert res.spearman.shape == (3, 2) and res.ssim.shape == (3, 2)
    assert res.passed(0.3), res.rows()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    full = mx.metrics.randomization_check(model, x, "saliency", target=[0, 1], cascade=False)
    assert full.layers == ["all"] and torch.allclose(full.spearman[0], res.spearman[-1])


def test_model_independent_map_fails(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "input_only", registry.Method("input_only", _input_only, needs_grad=False))
    model, x = make("cls", 2), image(2, b=2)
    res = mx.metrics.randomization_check(model, x, "input_only", target=0)
    assert torch.allclose(res.spearman, torch.ones_like(res.spearman)) and not res.passed()
