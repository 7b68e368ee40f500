"""Explanations through sliding-window inference (medexplain.engine.sliding, medexplain.engine.sliding_cam).

The reference is autograd (and hooks) through MONAI's own ``sliding_window_inference``: the window-by-window
gradient must equal it to 1e-8 in float64, touch only the windows a target touches, and CAMs must be the
plain CAM when one window covers the input. Tiny MONAI U-Nets, 4^3 windows (float64 convolutions are slow on
CPU): every test takes a few seconds.
"""
import pytest
import torch
from monai.inferers import SlidingWindowInferer, sliding_window_inference
from monai.networks.nets import UNet

import medexplain as mx
from medexplain.engine.sliding import SlidingWindowModel, with_inferer
from medexplain.engine.targets import Region
from medexplain.errors import InputError, MemoryBudgetError, UnsupportedModelError
from medexplain.segmentation import Instance, explain_instances

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


class MonaiSW(torch.nn.Module):
    """The reference: the network run by MONAI's sliding_window_inference, differentiated by autograd."""

    def __init__(self, net, **kw):
        super().__init__()
        self.net, self.kw = net, kw

    def forward(self, x):
        return sliding_window_inference(x, predictor=self.net, **self.kw)


def unet(nd=3, cin=2, seed=0):
    torch.manual_seed(seed)
    return UNet(nd, cin, 2, channels=(4, 8), strides=(2,)).double().eval()


def volume(shape, b=2, c=2, seed=1):
    return torch.randn((b, c, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def box(shape, *sl):
    m = torch.zeros(shape, dtype=torch.bool)
    m[sl] = True
    return m


def windows_touching(net, x, mask):
    """Windows (MONAI's order) whose box holds a voxel of ``mask`` (no padding in these tests)."""
    geo = net.geometry(x)
    return [w for w, sl in enumerate(geo.slices) if bool(mask[sl].any())]


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.0, 0.5])
def test_saliency_and_smoothgrad_equal_autograd_through_monai(mode, overlap):
    shape = (7, 6, 5)                                      # not divisible by the 4^3 ROI
    model, x = unet(), volume(shape)
    kw = dict(roi_size=(4, 4, 4), sw_batch_size=3, overlap=overlap, mode=mode)
    inf, ref = SlidingWindowInferer(**kw), MonaiSW(model, **kw)
    net = SlidingWindowModel(model, inf)
    with torch.no_grad():
        assert torch.equal(net(x), ref(x))                  # the forward is MONAI's own
    target = Region(1, box(shape, slice(1, 6), slice(2, 5), slice(1, 4)))
    touched = windows_touching(net, x, target.mask)
    assert len(touched) > 1                                # the region spans several windows
    for method, opts in [("saliency", {}), ("smoothgrad", {"n_samples": 2, "sigma": 0.2, "seed": 4})]:
        ours = mx.explain(mx.Model(model, inferer=inf), x, method, target=target, **opts)
        theirs = mx.explain(ref, x, method, target=target, **opts)   # the same seeded noise
        assert ours.map.abs().max() > 1e-3
        assert (ours.map - theirs.map).abs().max() <= 1e-8
        assert ours.info["windows"] == touched
        assert ours.info["n_backward"] == x.shape[0] * len(touched) * opts.get("n_samples", 1)


def test_roi_larger_than_the_image_pads_as_monai_and_2d_works():
    model, x = unet(nd=2), volume((3, 7))
    kw = dict(roi_size=(4, 4), sw_batch_size=2, overlap=0.25, mode="gaussian", padding_mode="replicate")
    target = Region(1, box((3, 7), slice(0, 3), slice(0, 7)))
    ours = mx.explain(mx.Model(model, inferer=SlidingWindowInferer(**kw)), x, "integrated_gradients", target=target, steps=3)
    theirs = mx.explain(MonaiSW(model, **kw), x, "integrated_gradients", target=target, steps=3)
    assert (ours.map - theirs.map).abs().max() <= 1e-8 and ours.map.abs().max() > 1e-3


def test_a_lesion_in_one_corner_backpropagates_only_its_windows():
    shape = (10, 10, 10)                                   # 4^3 ROI, overlap 0.25: 3 x 3 x 3 = 27 windows
    model, x = unet(), volume(shape, b=1)
    kw = dict(roi_size=(4, 4, 4), sw_batch_size=4, overlap=0.25, mode="gaussian")
    inf = SlidingWindowInferer(**kw)
    for lesion, n_touched in [(box(shape, slice(0, 2), slice(0, 2), slice(0, 2)), 1),
                              (box(shape, slice(3, 4), slice(0, 1), slice(0, 1)), 2)]:   # in two windows' overlap
        target = Region(1, lesion)
        attr = mx.explain(mx.Model(model, inferer=inf), x, "saliency", target=target)
        assert attr.info["n_windows"] == 27
        expected = windows_touching(SlidingWindowModel(model, inf), x, lesion)
        assert attr.info["windows"] == expected and len(expected) == n_touched
        assert attr.info["n_backward"] == n_touched
        if n_touched == 2:
            ref = mx.explain(MonaiSW(model, **kw), x, "saliency", target=target).map
            assert (attr.map - ref).abs().max() <= 1e-8


def test_instance_saliency_of_two_lesions_in_different_windows_equals_per_lesion_autograd():
    shape = (8, 8, 8)
    model, x = unet(), volume(shape, b=1)
    kw = dict(roi_size=(4, 4, 4), sw_batch_size=2, overlap=0.0, mode="gaussian")
    lesions = [box(shape, slice(0, 2), slice(1, 3), slice(0, 2)), box(shape, slice(6, 8), slice(5, 8), slice(5, 7))]
    insts = [Instance(m, "TP", int(m.sum())) for m in lesions]
    noise = 0.1 * volume(shape, b=2, seed=7)                 # (n_samples, C, *s)
    attr = explain_instances(mx.Model(model, inferer=SlidingWindowInferer(**kw)), x, insts, n_samples=2, noise=noise)
    ref = MonaiSW(model, **kw)
    for k, m in enumerate(lesions):                         # per lesion: autograd through MONAI, the same noise
        xn = (x + noise).detach().requires_grad_(True)
        (g,) = torch.autograd.grad((ref(xn)[:, 1] * m).sum(), xn)
        assert (attr.map[k] - g.mean(0)).abs().max() <= 1e-8
    assert attr.info["windows"] == [0, 7] and attr.info["n_backward"] == 2 * 2   # one window per lesion and sample
    assert attr.info["strategy"] == "loop"


def test_gradcam_with_one_window_covering_the_input_is_plain_gradcam():
    model, x = unet(), volume((4, 4, 4), b=3)
    target = Region(1, box((4, 4, 4), slice(1, 3), slice(0, 3), slice(1, 4)))
    for method in ("gradcam", "gradcam++"):
        for mode in ("gaussian", "constant"):
            win = mx.explain(mx.Model(model, inferer=SlidingWindowInferer((4, 4, 4), mode=mode)), x, method,
                             target=target, layer="model.1")
            plain = mx.explain(model, x, method, target=target, layer="model.1")
            assert plain.map.abs().max() > 1e-3
            assert (win.map - plain.map).abs().max() <= 1e-6 * plain.map.abs().max()


def test_gradcam_through_several_windows_has_the_batch_of_the_input():
    shape = (8, 6, 6)
    model, x = unet(), volume(shape, b=3)
    inf = SlidingWindowInferer((4, 4, 4), sw_batch_size=3, overlap=0.5, mode="gaussian")
    target = Region(1, box(shape, slice(0, 3), slice(0, 3), slice(0, 3)))
    attr = mx.explain(mx.Model(model, inferer=inf), x, "gradcam", target=target)
    assert attr.map.shape == (3, 1, *shape) and attr.info["n_windows"] == 3 * 2 * 2
    singles = torch.cat([mx.explain(mx.Model(model, inferer=inf), x[i:i + 1], "gradcam", target=target).map for i in range(3)])
    assert (attr.map - singles).abs().max() <= 1e-10
    assert attr.info["windows"] == windows_touching(SlidingWindowModel(model, inf), x, target.mask)
    with pytest.raises(UnsupportedModelError):             # a hook on MONAI's loop: refused, never the wrong batch
        mx.explain(MonaiSW(model, roi_size=(4, 4, 4), sw_batch_size=3, overlap=0.5), x, "gradcam", target=target,
                   layer="net.model.1")


def test_occlusion_reruns_only_the_windows_an_occluder_touches():
    shape = (8, 4, 4)                                      # two windows
    model, x = unet(), volume(shape, b=2)
    kw = dict(roi_size=(4, 4, 4), sw_batch_size=4, overlap=0.0, mode="constant")
    target = Region(1, box(shape, slice(0, 8), slice(0, 4), slice(0, 4)))
    ours = mx.explain(mx.Model(model, inferer=SlidingWindowInferer(**kw)), x, "occlusion", target=target, window=2)
    ref = mx.explain(MonaiSW(model, **kw), x, "occlusion", target=target, window=2)
    assert (ours.map - ref.map).abs().max() <= 1e-10 and ref.map.abs().max() > 1e-3
    # 16 occluders x 2 images, each inside one window: 1 window each, plus the 2 x 2 windows of the unchanged
    # images and the 2 x 2 of the first forward; re-running every row would be (1 + 16) x 2 x 2 = 68 windows
    assert ours.info["n_forward"] == 4 + 4 + 16 * 2 and ours.info["windows"] == 16


def test_perturbation_metrics_and_shapley_run_through_the_inferer():
    from medexplain.metrics import deletion_insertion
    from medexplain.segmentation import context_experiment
    from medexplain.segmentation.shapley import channel_shapley, mean_foreground_probability

    shape = (6, 6, 6)
    model, x = unet(), volume(shape, b=1)
    kw = dict(roi_size=(4, 4, 4), sw_batch_size=2, overlap=0.5, mode="gaussian")
    inf, ref = SlidingWindowInferer(**kw), MonaiSW(model, **kw)
    windowed = mx.Model(model, inferer=inf)   # every analysis takes the model object, its sliding window included
    a = channel_shapley(windowed, x, mean_foreground_probability(1))
    b = channel_shapley(ref, x, mean_foreground_probability(1))
    assert torch.allclose(a.values, b.values, atol=1e-12) and a.info["n_forward"] == 4 * 8   # 2^2 coalitions x 8 windows
    lesion = box(shape, slice(2, 4), slice(2, 4), slice(2, 4))
    maps = torch.rand((1, 1, *shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d1 = deletion_insertion(windowed, x, maps, Region(1, lesion), fractions=4)
    d2 = deletion_insertion(ref, x, maps, Region(1, lesion), fractions=4)
    assert torch.allclose(d1.deletion_score, d2.deletion_score, atol=1e-10)
    inst = Instance(lesion, "TP", 8)
    r1 = context_experiment(windowed, x, inst, d_max=2)
    r2 = context_experiment(ref, x, inst, d_max=2)
    assert [r["mean_probability"] for r in r1] == pytest.approx([r["mean_probability"] for r in r2], abs=1e-12)


def test_the_model_is_left_as_found_also_on_error():
    model, x = unet(), volume((6, 6, 6), b=1)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    inf = SlidingWindowInferer((4, 4, 4), overlap=0.5)
    mx.explain(mx.Model(model, inferer=inf), x, "gradcam",
               target=Region(1, box((6, 6, 6), slice(0, 2), slice(0, 2), slice(0, 2))))
    with pytest.raises(mx.errors.TargetError):
        mx.explain(mx.Model(model, inferer=inf), x, "saliency",
                   target=Region(5, box((6, 6, 6), slice(0, 2), slice(0, 2), slice(0, 2))))
    assert all(m.training for m in model.modules()) and all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_bad_settings_are_typed_errors_before_any_work():
    model, x = unet(), volume((6, 6, 6), b=1)
    t = Region(1, box((6, 6, 6), slice(0, 2), slice(0, 2), slice(0, 2)))
    with pytest.raises(UnsupportedModelError, match="SlidingWindowInferer"):
        mx.explain(mx.Model(model, inferer=object()), x, "saliency", target=t)
    with pytest.raises(InputError, match="roi_size"):
        mx.explain(mx.Model(model, inferer=SlidingWindowInferer((4, 4))), x, "saliency", target=t)
    with pytest.raises(UnsupportedModelError, match="buffer_steps"):
        with_inferer(model, SlidingWindowInferer((4, 4, 4), buffer_steps=2))
    with pytest.raises(UnsupportedModelError, match="Score-CAM"):
        mx.explain(mx.Model(model, inferer=SlidingWindowInferer((4, 4, 4))), x, "scorecam", target=t)
    from conftest import TinyClassifier
    with pytest.raises(UnsupportedModelError, match="dense output"):
        mx.explain(mx.Model(TinyClassifier(3).double(), inferer=SlidingWindowInferer((4, 4, 4))), x, "saliency", target=0)
    with pytest.raises(InputError, match="vmap"):
        explain_instances(mx.Model(model, inferer=SlidingWindowInferer((4, 4, 4))), x, [Instance(t.mask, "TP", 8)],
                          n_samples=1, strategy="vmap")


def test_memory_budget_keeps_recomputes_or_memory_maps_with_the_same_gradient():
    """``memory=`` through windows: a budget that holds every window graph keeps them all (no recompute),
    one that holds the four volume arrays and one window call recomputes every window, and one below that
    memory-maps the arrays; the gradient is the same in all three, and autograd's through MONAI."""
    shape = (8, 8, 8)
    model, x = unet(), volume(shape)
    kw = dict(roi_size=(4, 4, 4), sw_batch_size=2, overlap=0.5, mode="gaussian")
    inf = SlidingWindowInferer(**kw)
    target = Region(1, box(shape, slice(0, 5), slice(2, 8), slice(1, 8)))
    ref = mx.explain(MonaiSW(model, **kw), x, "saliency", target=target).map
    every = mx.explain(mx.Model(model, inferer=inf), x, "saliency", target=target, memory=100.0)
    mem = every.info["memory"]
    n_rows = x.shape[0] * every.info["n_windows"]
    assert mem["kept_window_rows"] == n_rows and mem["recomputed_window_rows"] == 0 and not mem["memmap"]
    assert every.info["n_forward"] == n_rows                       # one forward per window, none recomputed
    window, arrays = mem["window_call_bytes"], mem["volume_arrays_bytes"]
    assert window > 0 and arrays == x.shape[0] * 8 ** 3 * (2 * 2 + 2 * 2) * 8
    one = mx.explain(mx.Model(model, inferer=inf), x, "saliency", target=target, memory=(arrays + 1.5 * window) / 1e9)
    probe = mem["window_call_probe_bytes"]                          # what the plan checks before compute
    assert probe < arrays
    low = mx.explain(mx.Model(model, inferer=inf), x, "saliency", target=target, memory=1.1 * probe / 1e9)
    assert one.info["memory"]["kept_window_rows"] == 0 and not one.info["memory"]["memmap"]
    assert low.info["memory"]["kept_window_rows"] == 0 and low.info["memory"]["memmap"]
    touched = windows_touching(SlidingWindowModel(model, inf), x, target.mask)
    assert one.info["memory"]["recomputed_window_rows"] == x.shape[0] * len(touched)
    assert every.map.abs().max() > 1e-3
    assert (every.map - ref).abs().max() <= 1e-12
    for a in (one, low):
        assert (a.map - every.map).abs().max() <= 1e-12
        assert a.info["windows"] == every.info["windows"] == touched


def test_a_memory_budget_below_one_window_call_is_refused_before_compute():
    model, x = unet(), volume((8, 8, 8))
    inf = SlidingWindowInferer(roi_size=(4, 4, 4), sw_batch_size=2, overlap=0.5)
    target = Region(1, box((8, 8, 8), slice(0, 5), slice(0, 5), slice(0, 5)))
    with pytest.raises(MemoryBudgetError, match="one sliding-window call"):
        mx.explain(mx.Model(model, inferer=inf), x, "saliency", target=target, memory=1e-9)


def test_volume_arrays_are_memory_mapped_files_removed_at_once(tmp_path, monkeypatch):
    import tempfile

    from medexplain.engine.sliding import _volume_array
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    a = _volume_array((2, 3, 4), torch.float64, "cpu", memmap=True)
    a += 1.5
    assert a.dtype == torch.float64 and float(a.sum()) == 1.5 * 24
    assert list(tmp_path.iterdir()) == []      # nothing left on disk


def test_the_gradient_reads_the_count_map_one_window_at_a_time_bit_identically():
    """The window-by-window gradient never holds the full-volume count map ``c`` (one array less at a one-window
    budget): each window's ``P_w^T c`` is summed from the windows that overlap it, bit-identical to the window
    of the full map, padded ROI and uneven overlaps included."""
    for shape, roi, overlap in [((9, 8, 7), (4, 4, 4), 0.5), ((5, 6, 3), (6, 6, 4), 0.25), ((12, 10, 9), (6, 6, 4), 0.3)]:
        net = SlidingWindowModel(unet(), SlidingWindowInferer(roi_size=roi, overlap=overlap, mode="gaussian"))
        x = volume(shape).requires_grad_(True)
        net(x)[:, 1].sum().backward()
        geo = net.geometry(x)
        assert geo._count is None and x.grad.abs().max() > 0
        per_window = [geo.count_in(w) for w in range(len(geo.slices))]
        assert all(torch.equal(c, geo.count[(slice(None), slice(None), *sl)]) for c, sl in zip(per_window, geo.slices))
