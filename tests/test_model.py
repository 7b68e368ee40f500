"""The one model object (mx.Model, mx.load_model): ensembles and test-time flips with exact gradients and
per-pass un-flipped CAMs, pass counting, the refusal of a user's own TTA wrapper, the train/eval policy,
logits at a final Softmax/Sigmoid, device and dtype, and building a Model from every source."""
import copy
import itertools
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medexplain as mx
from conftest import TinySegmenter, assert_untouched, snapshot
from medexplain import errors
from medexplain.engine.targets import Region

pytestmark = pytest.mark.usefixtures("one_thread")


class Seg3D(nn.Module):
    """A plain-PyTorch 3D segmenter: a full-resolution branch and a stride-2 branch upsampled and fused."""

    def __init__(self, cin=2, k=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(cin, 4, 3, padding=1), nn.Tanh())
        self.down = nn.Sequential(nn.Conv3d(4, 6, 3, stride=2, padding=1), nn.Tanh())
        self.fuse = nn.Sequential(nn.Conv3d(10, 5, 3, padding=1), nn.Tanh())
        self.head = nn.Conv3d(5, k, 1)

    def forward(self, x):
        s = self.stem(x)
        d = F.interpolate(self.down(s), size=s.shape[2:], mode="trilinear", align_corners=False)
        return self.head(self.fuse(torch.cat([s, d], 1)))


def members(n=2):
    nets = []
    for seed in range(n):
        torch.manual_seed(seed)
        nets.append(Seg3D().double().eval())
    return nets


def volume(b=2):
    g = torch.Generator().manual_seed(5)
    return torch.randn((b, 2, 8, 6, 10), generator=g, dtype=torch.float64)   # non-cubic: axes cannot be confused


def region(x):
    mask = torch.zeros(x.shape[2:], dtype=torch.bool)
    mask[2:6, 1:4, 3:8] = True
    return Region(1, mask[None])


def subsets(axes):
    dims = [a + 2 for a in axes]
    return [()] + [c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]


def by_hand(nets, x, axes, layer):
    """The mean over members x flips written out, each pass's layer output recorded by a plain hook."""
    outs, acts = [], []
    for net in nets:
        for dims in subsets(axes):
            rec = []
            h = dict(net.named_modules())[layer].register_forward_hook(lambda m, i, o, rec=rec: rec.append(o))
            try:
                y = net(torch.flip(x, dims) if dims else x)
            finally:
                h.remove()
            outs.append(torch.flip(y, dims) if dims else y)
            acts.append((rec[0], dims))
    return sum(outs) / len(outs), acts


def score(out, x):
    mask = region(x).mask
    return (out[:, 1] * mask).flatten(1).sum(1)


# ----------------------------------------------------------------------- ensembles and flips: exactness
def test_ensemble_with_flips_on_three_axes_saliency_smoothgrad_exact_and_counted():
    nets, x = members(), volume()
    model = mx.Model(nets, flip_axes=(0, 1, 2))
    assert model.n_passes == 16
    xr = x.clone().requires_grad_(True)
    out, _ = by_hand(nets, xr, (0, 1, 2), "fuse")
    (ref,) = torch.autograd.grad(score(out, xr).sum(), xr)
    a = mx.explain(model, x, "saliency", target=region(x))
    assert ref.abs().max() > 0
    torch.testing.assert_close(a.map, ref, rtol=0, atol=1e-10)
    assert a.info["n_forward"] == 16 * x.shape[0] and a.info["n_backward"] == 16 * x.shape[0]
    assert a.info["model"]["passes"] == 16 and a.info["model"]["networks"] == 2
    # SmoothGrad: the mean over the same noise of the gradient through the mean of the 16 passes
    g = torch.Generator().manual_seed(3)
    noise = 0.1 * torch.randn((3, *x.shape), generator=g, dtype=x.dtype)
    refs = []
    for n in noise:
        xn = (x + n).requires_grad_(True)
        refs.append(torch.autograd.grad(score(by_hand(nets, xn, (0, 1, 2), "fuse")[0], xn).sum(), xn)[0])
    s = mx.explain(model, x, "smoothgrad", target=region(x), noise=noise, n_samples=3)
    torch.testing.assert_close(s.map, sum(refs) / 3, rtol=0, atol=1e-10)
    assert s.info["n_forward"] == 3 * 16 * x.shape[0]
    # the passes really differ (the test could fail): one member without flips gives another map
    plain = mx.explain(nets[0], x, "saliency", target=region(x)).map
    assert (plain - ref).abs().max() > 1e-3


@pytest.mark.parametrize("layer,upsample", [("fuse", "bilinear"), ("down", "bilinear")])
def test_gradcam_through_flips_and_ensemble_is_the_per_pass_unflipped_definition(layer, upsample):
    nets, x = members(), volume()
    xr = x.clone()
    out, acts = by_hand(nets, xr, (0, 1, 2), layer)
    gs = torch.autograd.grad(score(out, xr).sum(), [a for a, _ in acts])
    terms = [(torch.flip(g, d) if d else g).mean((2, 3, 4), keepdim=True) * (torch.flip(a, d) if d else a)
             for (a, d), g in zip(acts, gs)]
    cells = torch.relu(sum(t.sum(1, keepdim=True) for t in terms)).detach()
    if cells.shape[2:] != x.shape[2:]:
        cells = F.interpolate(cells, size=x.shape[2:], mode="trilinear", align_corners=False)
    a = mx.explain(mx.Model(nets, flip_axes=(0, 1, 2)), x, "gradcam", target=region(x), layer=layer, upsample=upsample)
    assert cells.abs().max() > 0
    torch.testing.assert_close(a.map, cells, rtol=1e-8, atol=1e-10)
    assert a.info["n_forward"] == 16 * x.shape[0] and a.info["calls"] == 16   # the layer plan's probe is not counted
    again = mx.explain(mx.Model(nets, flip_axes=(0, 1, 2)), x, "gradcam", target=region(x), layer=layer,
                       upsample=upsample)                                        # the plan is cached now: the same
    assert again.info["n_forward"] == again.info["n_backward"] == 16 * x.shape[0]
    # summing the passes' cells without flipping them back is another map (what a user's wrapper gave)
    naive = torch.relu(sum(((g.mean((2, 3, 4), keepdim=True) * a_).sum(1, keepdim=True))
                           for (a_, _), g in zip(acts, gs))).detach()
    if naive.shape[2:] != x.shape[2:]:
        naive = F.interpolate(naive, size=x.shape[2:], mode="trilinear", align_corners=False)
    assert (naive - cells).abs().max() > 1e-4 * cells.abs().max()


def test_flips_and_ensemble_through_a_sliding_window_equal_the_plain_model_on_one_window():
    """One window covering the image: the windowed CAM through passes is the CAM of the passes (1e-6)."""
    nets, x = members(), volume(1)
    model = mx.Model(nets, flip_axes=(0, 2))
    windowed = model.replace(inferer={"roi_size": list(x.shape[2:]), "overlap": 0.0})
    for method in ("gradcam", "hirescam", "saliency"):
        a = mx.explain(model, x, method, target=region(x), **({"layer": "fuse"} if method != "saliency" else {}))
        b = mx.explain(windowed, x, method, target=region(x), **({"layer": "fuse"} if method != "saliency" else {}))
        torch.testing.assert_close(b.map, a.map, rtol=1e-6, atol=1e-9)
        one = mx.explain(mx.Model(nets[0], inferer=windowed.inferer), x, method, target=region(x),
                         **({"layer": "fuse"} if method != "saliency" else {}))
        assert b.info["n_forward"] == 8 * one.info["n_forward"] and b.info["n_backward"] == 8 * one.info["n_backward"]


def test_gradient_free_and_single_call_methods_through_passes():
    nets, x = members(), volume(1)
    model = mx.Model(nets, flip_axes=(1,))
    occ = mx.explain(model, x, "occlusion", target=region(x), window=4, stride=4)
    assert occ.info["n_forward"] % 4 == 0 and occ.map.abs().max() > 0
    with pytest.raises(errors.UnsupportedModelError, match="passes"):
        mx.explain(model, x, "eigencam", layer="fuse")


# ----------------------------------------------------------------------- a user's own TTA wrapper
class UserTTA(nn.Module):
    """A wrapper that mirrors internally, as users write one: the layer runs twice on same-shaped inputs."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return (self.net(x) + torch.flip(self.net(torch.flip(x, (2,))), (2,))) / 2


def test_a_user_tta_wrapper_is_refused_for_cams_and_the_model_option_does_it_right():
    net, x = members(1)[0], volume(1)
    wrapped = UserTTA(net)
    before = snapshot(net)
    with pytest.raises(errors.RepeatedLayerCallError, match=r"called 2 times.*flip_axes.*aligned_calls"):
        mx.explain(wrapped, x, "gradcam", target=region(x), layer="net.fuse")
    with pytest.raises(errors.RepeatedLayerCallError, match="flip_axes"):   # the default layer says so too
        mx.explain(wrapped, x, "gradcam", target=region(x))
    assert_untouched(net, before)
    # the gradient methods are exact through it anyway; the same passes as a Model option give the same score
    s1 = mx.explain(wrapped, x, "saliency", target=region(x)).map
    s2 = mx.explain(mx.Model(net, flip_axes=(0,)), x, "saliency", target=region(x)).map
    torch.testing.assert_close(s1, s2, rtol=0, atol=1e-12)
    # the user says the calls are aligned: their cells are summed as recorded (not flipped back)
    aligned = mx.explain(mx.Model(wrapped, aligned_calls=True), x, "gradcam", target=region(x), layer="net.fuse")
    right = mx.explain(mx.Model(net, flip_axes=(0,)), x, "gradcam", target=region(x), layer="fuse")
    assert aligned.info["calls"] == right.info["calls"] == 2
    assert (aligned.map - right.map).abs().max() > 1e-6


# ----------------------------------------------------------------------- train/eval policy
class NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1)
        self.norm = nn.InstanceNorm3d(4, affine=True, track_running_stats=True)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))))


def norm_net():
    torch.manual_seed(0)
    net = NormNet().double().eval()
    net.norm.train()                           # per-image statistics, as its author keeps it
    with torch.no_grad():
        net.norm.running_mean.fill_(0.7)
        net.norm.running_var.fill_(3.0)
    return net


def test_mixed_modes_are_used_as_given_and_buffers_restored():
    net, x = norm_net(), volume()
    as_given = copy.deepcopy(net)
    xr = x.clone().requires_grad_(True)
    y = as_given(xr)
    (ref,) = torch.autograd.grad(score(y, xr).sum(), xr)
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    torch.testing.assert_close(mx.Model(net).predict(x), y.detach(), rtol=0, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # eval="auto" uses it as given: no warning
        a = mx.explain(net, x, "saliency", target=region(x))
    torch.testing.assert_close(a.map, ref, rtol=0, atol=1e-10)
    assert "mixed" in a.info["eval"]
    assert all(torch.equal(buffers[k], v) for k, v in net.state_dict().items())   # running stats, batch counter
    assert [m.training for m in net.modules()] == modes
    # as the issue found it: eval() everywhere predicts something else (the stored running statistics)
    switched = copy.deepcopy(net).eval()
    assert (switched(x) - y).abs().max() > 1e-2
    with pytest.warns(UserWarning, match=r"norm.*running statistics"):
        b = mx.explain(mx.Model(net, eval="always"), x, "saliency", target=region(x))
    assert (b.map - a.map).abs().max() > 1e-6
    assert all(torch.equal(buffers[k], v) for k, v in net.state_dict().items())
    never = mx.explain(mx.Model(net, eval="never"), x, "saliency", target=region(x))
    torch.testing.assert_close(never.map, ref, rtol=0, atol=1e-10)


def test_a_model_entirely_in_training_mode_is_switched_to_eval_and_info_says_so():
    net, x = norm_net(), volume()
    ref_net = copy.deepcopy(net).eval()
    net.train()
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(score(ref_net(xr), xr).sum(), xr)
    a = mx.explain(net, x, "saliency", target=region(x))
    torch.testing.assert_close(a.map, ref, rtol=0, atol=1e-10)
    assert "switched to eval" in a.info["eval"]
    assert all(m.training for m in net.modules())
    with pytest.raises(errors.InputError, match="eval must be"):
        mx.Model(net, eval="sometimes")


# ----------------------------------------------------------------------- logits at a final Softmax/Sigmoid
class EndsInSigmoid(TinySegmenter):
    def __init__(self):
        super().__init__(nd=2)
        self.act = nn.Sigmoid()

    def forward(self, x):
        return self.act(super().forward(x))


def test_a_network_ending_in_softmax_is_explained_through_its_logits():
    torch.manual_seed(0)
    seg = TinySegmenter(nd=3).double().eval()
    with_softmax = nn.Sequential(seg, nn.Softmax(dim=1)).eval()
    x = volume()[..., :6, :6, :6]
    tgt = Region(1, torch.ones((1, 6, 6, 6), dtype=torch.bool))
    for method, opts in (("saliency", {}), ("gradcam", {"layer": "body.2"})):
        ref = mx.explain(seg, x, method, target=tgt, **opts)
        opts_sm = {"layer": "0.body.2"} if opts else {}
        got = mx.explain(with_softmax, x, method, target=tgt, **opts_sm)
        assert ref.map.abs().max() > 0
        torch.testing.assert_close(got.map, ref.map, rtol=1e-6, atol=1e-9)
        assert "logits" in got.info["score"] and "Softmax" in got.info["score"]
    # probabilities=True keeps the probabilities: autograd through the softmax
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(with_softmax(xr)[:, 1].sum(), xr)
    p = mx.explain(mx.Model(with_softmax, probabilities=True), x, "saliency", target=tgt)
    torch.testing.assert_close(p.map, ref, rtol=0, atol=1e-10)
    assert "score" not in p.info
    # the target grammar reads the Model's logits with the network's softmax
    out = mx.Model(with_softmax).predict(x)
    assert mx.ops.detect_activation(out, mx.Model(with_softmax))[0] == "softmax"


def test_a_sigmoid_called_inside_forward_is_found_too():
    torch.manual_seed(1)
    net = EndsInSigmoid().double().eval()
    plain = TinySegmenter(nd=2).double().eval()
    plain.load_state_dict({k: v for k, v in net.state_dict().items()})
    x = torch.randn((2, 2, 8, 8), dtype=torch.float64)
    tgt = Region(0, torch.ones((1, 8, 8), dtype=torch.bool))
    a = mx.explain(net, x, "gradcam", target=tgt, layer="body.2")
    b = mx.explain(plain, x, "gradcam", target=tgt, layer="body.2")
    torch.testing.assert_close(a.map, b.map, rtol=1e-6, atol=1e-9)
    assert "act (Sigmoid)" in a.info["score"]
    assert no_hooks_left(net)


def no_hooks_left(net):
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in net.modules())


# ----------------------------------------------------------------------- device and dtype
def test_device_and_dtype():
    torch.manual_seed(0)
    net = TinySegmenter(nd=2).float().eval()
    x = torch.randn((1, 2, 8, 8))
    tgt = Region(1, torch.ones((1, 8, 8), dtype=torch.bool))
    m = mx.Model(copy.deepcopy(net), device="auto", dtype="float64")
    assert m.device == torch.device("cuda" if torch.cuda.is_available() else "cpu") and m.dtype == torch.float64
    a = mx.explain(m, x, "saliency", target=tgt)                  # float32 input cast once to the model's dtype
    assert a.map.dtype == torch.float64 and a.map.device.type == "cpu"
    ref = mx.explain(net.double(), x.double(), "saliency", target=tgt)
    torch.testing.assert_close(a.map, ref.map)
    assert mx.Model(net, device="cpu").device.type == "cpu"
    with pytest.raises(errors.InputError, match="device"):
        mx.Model(net, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(errors.InputError, match="no such CUDA device"):
            mx.Model(net, device="cuda:0")
    with pytest.raises(errors.InputError, match="dtype"):
        mx.Model(net, dtype="int8")


# ----------------------------------------------------------------------- building a Model from every source
def test_load_model_from_modules_torchscript_factories_and_ensembles(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = TinySegmenter(nd=2).double().eval()
    x = torch.randn((1, 2, 8, 8), dtype=torch.float64)
    ref = net(x)
    m = mx.load_model(net)
    assert isinstance(m, mx.Model) and torch.equal(m.predict(x), ref.detach())
    scripted = torch.jit.script(net)
    torch.jit.save(scripted, str(tmp_path / "net.pt"))
    ts = mx.load_model(tmp_path / "net.pt")
    torch.testing.assert_close(ts.predict(x), ref.detach())
    (tmp_path / "mynets.py").write_text("from conftest import TinySegmenter\n\n\ndef build():\n"
                                        "    return TinySegmenter(nd=2).double()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    fm = mx.load_model("mynets:build", weights=str(tmp_path / "w.pt"))
    torch.testing.assert_close(fm.predict(x), ref.detach())
    ens = mx.load_model([net, "mynets:build"], weights=[None, str(tmp_path / "w.pt")], flip_axes=(1,))
    assert ens.n_passes == 4 and len(ens.networks) == 2
    torch.testing.assert_close(ens.predict(x), ((ref + torch.flip(net(torch.flip(x, (3,))), (3,))) / 2).detach())
    with pytest.raises(errors.ModelLoadError, match="no such file"):
        mx.load_model("not-a-model")
    sys.modules.pop("mynets", None)


def test_the_model_settings_live_on_the_model_and_available_methods_takes_one():
    """output= and inferer= beside a bare module are refused, naming mx.Model (issue 23: the model object holds them)."""
    torch.manual_seed(0)
    net = TinySegmenter(nd=2).double().eval()
    x = torch.randn((1, 2, 8, 8), dtype=torch.float64)
    tgt = Region(1, torch.ones((1, 8, 8), dtype=torch.bool))
    via_model = mx.explain(mx.Model(net, inferer={"roi_size": [8, 8]}), x, "saliency", target=tgt)
    assert via_model.info["n_windows"] == 1
    for kw in ({"inferer": {"roi_size": [8, 8]}}, {"output": 0}):
        with pytest.raises(errors.OptionError, match=r"mx\.Model"):
            mx.explain(net, x, "saliency", target=tgt, **kw)
    names = mx.available_methods(mx.Model(net, flip_axes=(0,)), x)
    assert "gradcam" in names and names == mx.available_methods(net, x)


def test_wrappers_keep_an_ensemble_whole():
    """The pipelines' counting adapter and output adapters around an ensemble with flips keep every pass
    (layer names resolve on the first network; the passes are not dropped)."""
    from medexplain.engine.core import Passes, with_output
    from medexplain.engine.options import CountingModel

    nets, x = members(), volume(1)
    passes = Passes(nets, (0, 1))
    rows = []
    counted = CountingModel(passes, None, rows.append)
    ref = mx.explain(mx.Model(nets, flip_axes=(0, 1)), x, "gradcam", target=region(x), layer="fuse")
    got = mx.explain(counted, x, "gradcam", target=region(x), layer="fuse")
    torch.testing.assert_close(got.map, ref.map, rtol=0, atol=1e-12)
    assert got.info["calls"] == 8 and rows
    torch.testing.assert_close(with_output(passes, lambda o: o[:, 1:])(x), passes(x)[:, 1:])


def test_a_classifier_with_flips_averages_its_class_scores_and_unflips_its_cams():
    from conftest import make

    net = make("cls", 2)
    x = torch.randn((2, 2, 12, 10), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = mx.Model(net, flip_axes=(1,))
    xr = x.clone().requires_grad_(True)
    out = (net(xr) + net(torch.flip(xr, (3,)))) / 2
    (ref,) = torch.autograd.grad(out[:, 1].sum(), xr)
    torch.testing.assert_close(mx.explain(model, x, "saliency", target=1).map, ref, rtol=0, atol=1e-10)
    rec = []

    def keep(_m, _i, o):   # a copy on the path, so the in-place ReLU after the layer leaves it intact
        rec.append(o.clone())
        return rec[-1] * 1
    h = net.features[2].register_forward_hook(keep)
    try:
        out = (net(x) + net(torch.flip(x, (3,)))) / 2
    finally:
        h.remove()
    gs = torch.autograd.grad(out[:, 1].sum(), rec)
    terms = [(g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True) for a, g in zip(rec, gs)]
    cells = torch.relu(terms[0] + torch.flip(terms[1], (3,))).detach()   # the flipped pass's cells flipped back
    cam = mx.explain(model, x, "gradcam", target=1, layer="features.2", upsample="bilinear")
    torch.testing.assert_close(cam.map, cells, rtol=1e-8, atol=1e-12)


def test_the_model_carries_its_preprocessing_and_inverse():
    import numpy as np

    from medexplain.models.transforms import Preprocessing

    torch.manual_seed(0)
    net = TinySegmenter(nd=2).double().eval()
    model = mx.Model(net, preprocessing=Preprocessing(divisible_by=8, intensity="zscore"))
    img = torch.randn((2, 10, 13), generator=torch.Generator().manual_seed(1))
    prep = model.prepare(img, np.eye(4))
    assert tuple(prep.image.shape) == (2, 16, 16)
    x = prep.image[None].double()
    a = mx.explain(model, x, "saliency", target=Region(1, torch.ones((1, 16, 16), dtype=torch.bool)))
    back = model.invert(a.map[0], prep)
    assert tuple(back.shape) == (2, 10, 13)
    # DivisiblePad pads symmetrically (the smaller half first): its inverse crops the image's own voxels back
    torch.testing.assert_close(back.double(), a.map[0][:, 3:13, 1:14].double())
