"""The perturbation methods' baseline (issue 25): one rule (methods.occlusion.perturbation_baseline) offering the
peers' choices (zero, mean, median, blur, a number), used by occlusion, feature ablation, KernelSHAP and LIME,
and stated in every map's info and figure caption."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import medexplain as mx
from medexplain.errors import InputError, OptionError
from medexplain.methods.occlusion import perturbation_baseline

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def test_named_baselines_per_image_and_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.rand((2, 3, 9, 11), generator=g)
    mean, what = perturbation_baseline(x, "mean")
    assert what.startswith("mean") and torch.allclose(mean[1, 2], x[1, 2].mean())
    med, what = perturbation_baseline(x, "median")
    assert what.startswith("median") and med[0, 1].item() == x[0, 1].flatten().median().item()
    assert perturbation_baseline(x, 0)[1] == "zero" and perturbation_baseline(x, "0.5") == (0.5, "constant 0.5")
    blur, what = perturbation_baseline(torch.full((1, 1, 20, 20, 20), 3.0), "blur")
    assert what.startswith("blur") and torch.allclose(blur, torch.full_like(blur, 3.0))   # a constant stays
    spike = torch.zeros((1, 1, 40, 40))
    spike[0, 0, 20, 20] = 1.0
    b, _ = perturbation_baseline(spike, "blur")                                          # sigma 2 voxels
    assert b[0, 0, 20, 20] < 0.05 and b.sum().item() == pytest.approx(1.0, rel=1e-4) and b[0, 0, 20, 22] > 0
    for bad in ("black", True):
        with pytest.raises(InputError):
            perturbation_baseline(x, bad)


class Linear(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, int(np.prod(shape))).view(1, *shape))

    def forward(self, x):
        return torch.stack([(self.w * x).flatten(1).sum(1), -(self.w * x).flatten(1).sum(1)], 1)


@pytest.mark.parametrize("baseline", ["zero", "mean", "median", "blur", 0.25])
def test_occlusion_replaces_the_window_by_the_baseline(baseline):
    """On a linear model the drop of a window is sum_window w * (x - baseline): computed here by hand."""
    x = torch.rand((2, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    model = Linear((1, 8, 8)).eval()
    attr = mx.explain(model, x, "occlusion", target=0, window=4, stride=4, baseline=baseline)
    base, what = perturbation_baseline(x, baseline)
    base = torch.as_tensor(base).expand_as(x)
    contrib = model.w.detach() * (x - base)                            # (B, 1, 8, 8)
    expected = contrib.view(2, 1, 2, 4, 2, 4).sum((3, 5)).repeat_interleave(4, 2).repeat_interleave(4, 3)
    assert torch.allclose(attr.map, expected, atol=1e-5)
    assert attr.info["baseline"] == what


def test_occlusion_option_from_text_and_a_bad_name_is_a_typed_error():
    x = torch.rand((1, 1, 8, 8))
    model = Linear((1, 8, 8)).eval()
    with pytest.raises((OptionError, InputError), match="baseline"):
        mx.explain(model, x, "occlusion", target=0, window=4, baseline="black")


@pytest.mark.parametrize("method", ["feature_ablation", "kernelshap", "lime"])
def test_the_captum_perturbation_methods_take_the_same_baselines_and_state_them(method):
    x = torch.rand((2, 1, 16, 16), generator=torch.Generator().manual_seed(2))
    model = Linear((1, 16, 16)).eval()
    opts = {"features": "grid", "n_features": 4} | ({"n_samples": 20} if method != "feature_ablation" else {})
    attr = mx.explain(model, x, method, target=0, baselines="median", **opts)
    assert attr.info["baseline"].startswith("median")
    if method == "feature_ablation":   # each group: sum over the group of w * (x - median), independently
        med = x.flatten(2).median(-1).values.view(2, 1, 1, 1)
        contrib = model.w.detach() * (x - med)
        groups = mx.methods.captum_methods.feature_groups(x, "grid", 4, 0.3)
        for b in range(2):
            for gid in groups[b].unique():
                sel = groups[b, 0] == gid
                assert torch.allclose(attr.map[b, 0][sel], contrib[b, 0][sel].sum().expand(int(sel.sum())), atol=1e-4)


def test_the_baseline_is_in_info_json_and_the_figure_caption(tmp_path):
    from PIL import Image

    from medexplain import pipelines
    from medexplain.models import zoo
    img = (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "cxr.png")
    model, _ = zoo.pretrained("chest_xray", size="small", progress=False, cache=tmp_path / "cache")
    pipelines.explain_image(tmp_path / "cxr.png", model, ["occlusion"], tmp_path / "out", target=1,
                            options={"window": 8, "baseline": "blur"})
    info = json.loads((tmp_path / "out" / "cxr_info.json").read_text())
    assert info["methods"]["occlusion"]["baseline"].startswith("blur (the image under a Gaussian")
    caption = pipelines._figure_caption(info["methods"]["occlusion"])
    assert caption.startswith("Perturbation baseline (what replaced each removed region): blur")
