"""Devices (issue 26): every registered method runs with the model and input on CUDA when a GPU is present
(maps back on the CPU, equal to the CPU's where the method draws no random numbers), and asking for CUDA
without a GPU is a typed error before any work. Without a GPU the CUDA test is skipped."""
import copy

import pytest
import torch
from typer.testing import CliRunner

import medexplain as mx
from conftest import image, make, region_targets, rel_err
from medexplain.cli import app
from medexplain.engine.options import option_types
from medexplain.engine.registry import get_method
from medexplain.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

#: small settings so every method runs in a moment on the tiny models
FAST = {"smoothgrad": {"n_samples": 3}, "integrated_gradients": {"steps": 4}, "kernelshap": {"n_samples": 12},
        "lime": {"n_samples": 12}, "gradientshap": {"n_samples": 3, "n_baselines": 2}, "occlusion": {"window": 4},
        "noise_tunnel": {"n_samples": 2}}
for _m in ("kernelshap", "lime", "feature_ablation"):
    FAST.setdefault(_m, {}).update({"features": "grid", "n_features": 4})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("kind", ["cls", "seg"])
def test_every_registered_method_runs_on_cuda_and_returns_maps_on_the_cpu(kind):
    check_every_method(kind, "cuda")


def check_every_method(kind, device):
    net, x = make(kind, 2), image(2)
    target = [0, 2, 1] if kind == "cls" else region_targets(x)[0]
    on_cpu, on_gpu = mx.Model(copy.deepcopy(net), device="cpu"), mx.Model(copy.deepcopy(net), device=device)
    names = mx.available_methods(model=on_gpu, x=x)
    assert names == mx.available_methods(model=on_cpu, x=x) and len(names) > 10
    failed = {}
    for name in names:
        opts = {k: v for k, v in FAST.get(name, {}).items() if k in option_types(get_method(name).fn)}
        try:
            got = mx.explain(on_gpu, x, name, target=target, **opts)
        except Exception as e:   # collect every failure, not only the first
            failed[name] = f"{type(e).__name__}: {e}"
            continue
        assert got.map.device.type == "cpu" and torch.isfinite(got.map).all(), name
        if "seed" not in option_types(get_method(name).fn):   # CUDA generators draw other numbers than the CPU's
            ref = mx.explain(on_cpu, x, name, target=target, **opts).map
            assert rel_err(got.map, ref) <= 1e-6, name
    assert not failed, failed
    assert next(on_gpu.passes.parameters()).device.type == torch.device(device).type


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_is_a_typed_error_before_any_work(tmp_path):
    net = make("cls", 2)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(InputError, match="no such CUDA device"):
            mx.Model(net, device=device)
        with pytest.raises(InputError, match="no such CUDA device"):
            mx.explain(mx.Model(net, device=device), image(2), "saliency", target=0)
    res = CliRunner().invoke(app, ["explain", str(tmp_path / "x.nii"), "--model", "zoo:chest_xray", "--device", "cuda",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no such CUDA device" in res.output and not (tmp_path / "o").exists()


def test_mixed_precision_is_an_option_of_the_model_and_stays_close_for_gradients_and_cams():
    """``mx.Model(amp=True)`` runs the networks' forward under autocast (bfloat16 on the CPU); the output and
    the maps stay in the input's dtype, close to full precision for a tolerant method, and the model is left
    as found; without amp the maps are exactly those of the plain network."""
    net, x = make("cls", 2, dtype=torch.float32), image(2, dtype=torch.float32)
    full = mx.Model(copy.deepcopy(net))
    amp = mx.Model(copy.deepcopy(net), amp=True)
    assert amp.describe()["amp"] is True and "amp" not in full.describe()
    for method, opts in [("saliency", {}), ("gradcam", {"layer": "features.2"})]:
        a = mx.explain(amp, x, method, target=[0, 2, 1], **opts)
        f = mx.explain(full, x, method, target=[0, 2, 1], **opts)
        assert a.map.dtype == torch.float32 and torch.isfinite(a.map).all()
        assert not torch.equal(a.map, f.map)                        # it did run in lower precision
        cos = torch.nn.functional.cosine_similarity(a.map.flatten(), f.map.flatten(), dim=0)
        assert cos >= 0.98, (method, float(cos))                     # bfloat16 keeps 8 bits of mantissa
    assert torch.equal(mx.explain(full, x, "saliency", target=0).map, mx.explain(net, x, "saliency", target=0).map)
    assert amp.replace(eval="always").passes.amp
