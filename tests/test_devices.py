"""Devices (issue 26): every registered method runs with the model and input on CUDA when a GPU is present
(maps back on the CPU, equal to the CPU's where the method draws no random numbers), and asking for CUDA
without a GPU is a typed error before any work. Without a GPU the CUDA test is skipped."""
import copy
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import medexplain as mx
from conftest import TinyClassifier, image, make, region_targets, rel_err
from medexplain.cli import app
from medexplain.engine.options import option_types
from medexplain.engine.registry import get_method, registered
from medexplain.errors import InputError, OptionError

pytestmark = pytest.mark.usefixtures("one_thread")

#: small settings so every method runs in a moment on the tiny models
FAST = {"smoothgrad": {"n_samples": 3}, "integrated_gradients": {"steps": 4}, "kernelshap": {"n_samples": 12},
        "lime": {"n_samples": 12}, "gradientshap": {"n_samples": 3, "n_baselines": 2}, "occlusion": {"window": 4},
        "noise_tunnel": {"n_samples": 2}}
for _m in ("kernelshap", "lime", "feature_ablation"):
    FAST.setdefault(_m, {}).update({"features": "grid", "n_features": 4})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_every_registered_method_runs_on_cuda_and_returns_maps_on_the_cpu():
    ran = check_every_method("cls", "cuda") | check_every_method("seg", "cuda") | check_patchnet("cuda")
    assert ran == set(registered())


def check_patchnet(device):
    """PatchNet saliency needs a PatchNet (tests/test_patchnet.py's tiny one)."""
    from medexplain.models.patchnet import PatchNet
    from test_patchnet import conv_backbone
    torch.manual_seed(5)
    net = PatchNet(conv_backbone(3, c=2, k=2), (2, 4, 4), spatial_dims=3).eval()
    x = torch.randn(2, 2, 4, 8, 8)
    opts = dict(target=1, offset=(1, 2, 2), kind="scaled", chunk_size=4)
    got = mx.explain(mx.Model(copy.deepcopy(net), device=device), x, "patchnet", **opts).map
    ref = mx.explain(mx.Model(copy.deepcopy(net), device="cpu"), x, "patchnet", **opts).map
    assert got.device.type == "cpu" and rel_err(got, ref) <= 1e-5
    return {"patchnet"}


def check_every_method(kind, device):
    """Every method that applies to the tiny ``kind`` model runs with the model on ``device`` (the input on
    the CPU): maps on the CPU, finite, equal to the CPU's where no random numbers are drawn; the names run."""
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
    return set(names)


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


def tiny_cls3d():
    """A 3D classifier for the command line (``--model test_devices:tiny_cls3d``), float32 as a user's."""
    torch.manual_seed(0)
    return TinyClassifier(3, cin=1).eval()


def test_amp_on_the_command_line_runs_saliency_and_gradcam_and_info_records_it(tmp_path):
    """``--amp`` (bfloat16 autocast on the CPU) runs saliency and Grad-CAM end to end: the maps are written,
    finite, not those of the full-precision run (it did run in lower precision) but close to them, and
    info.json records amp in each method's model description (absent without it)."""
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 9, 10)).astype(np.float32), np.eye(4)),
             str(tmp_path / "v.nii.gz"))
    maps = {}
    for flag in ("--amp", "--no-amp"):
        out = tmp_path / flag.strip("-")
        res = CliRunner().invoke(app, ["explain", str(tmp_path / "v.nii.gz"), "--model", "test_devices:tiny_cls3d",
                                       "--method", "saliency,gradcam", "--layer", "features.2", "--target", "1",
                                       "--device", "cpu", flag, "--out", str(out)])
        assert res.exit_code == 0, res.output
        info = json.loads((out / "v_info.json").read_text())
        for m in ("saliency", "gradcam"):
            assert info["methods"][m]["model"].get("amp", False) is (flag == "--amp"), (flag, m)
            maps[flag, m] = torch.from_numpy(nib.load(str(out / f"v_{m}.nii.gz")).get_fdata())
    for m in ("saliency", "gradcam"):
        a, f = maps["--amp", m], maps["--no-amp", m]
        assert torch.isfinite(a).all() and not torch.equal(a, f), m
        assert torch.nn.functional.cosine_similarity(a.flatten(), f.flatten(), dim=0) >= 0.98, m


def test_every_method_runs_under_amp_or_refuses_it_by_its_declaration():
    """Which methods tolerate mixed precision is declared per method (``register(no_amp="reason")``,
    docs/devices.md): under ``mx.Model(amp=True)`` every other applicable method gives a finite map in the
    input's dtype, and a declared one is refused before any work (a typed error naming amp; not listed by
    ``available_methods``), with the model left as found."""
    declared = {n for n, s in registered().items() if s.no_amp}
    assert declared == {"lrp", "deeplift", "deepliftshap"}
    ran = set()
    for kind in ("cls", "seg"):
        net, x = make(kind, 2, dtype=torch.float32), image(2, dtype=torch.float32)
        target = [0, 2, 1] if kind == "cls" else region_targets(x)[0]
        amp = mx.Model(net, amp=True)
        names = mx.available_methods(model=amp, x=x)
        assert not declared & set(names) and declared <= set(mx.available_methods(model=net, x=x))
        for name in names:
            opts = {k: v for k, v in FAST.get(name, {}).items() if k in option_types(get_method(name).fn)}
            got = mx.explain(amp, x, name, target=target, **opts).map
            assert got.dtype == torch.float32 and torch.isfinite(got).all(), name
            ran.add(name)
        before = copy.deepcopy(net.state_dict())
        for name in declared:
            with pytest.raises(OptionError, match="mixed precision"):
                mx.explain(amp, x, name, target=target)
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert ran | declared | {"patchnet"} == set(registered())   # PatchNet saliency needs a PatchNet
