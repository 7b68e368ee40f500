"""The peer methods (Captum adapters, LRP, noise tunnel; issue 19): the baseline matrix (2D/3D x class/region
target x batch 3 == three batches of 1, model untouched, also after an error), equality with Captum on 2D
classification with the same seeds, and LRP on Conv3d where Captum alone raises."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import medexplain as mx
from conftest import assert_untouched, check_batch_matrix, image, make, rel_err, snapshot
from medexplain.engine.targets import Region
from medexplain.errors import InputError, MedexplainError, UnsupportedModelError
from medexplain.methods.captum_methods import feature_groups, reference_distribution

ca = pytest.importorskip("captum.attr")

NEW = ["inputxgradient", "guided_backprop", "deconvolution", "deeplift", "deepliftshap", "gradientshap",
       "feature_ablation", "kernelshap", "lime", "lrp", "noise_tunnel"]
GROUPS = {"features": "grid", "n_features": 8}
OPTS = {"kernelshap": {"n_samples": 12, **GROUPS}, "lime": {"n_samples": 12, **GROUPS}, "feature_ablation": GROUPS,
        "gradientshap": {"n_samples": 3, "n_baselines": 2}, "deepliftshap": {"n_baselines": 2},
        "noise_tunnel": {"n_samples": 2, "base": "inputxgradient", "nt_type": "vargrad"},
        "lrp": {"composite": "epsilon_gamma_box"}}


@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("kind", ["cls", "seg"])
def test_matrix_batched_equals_unbatched_and_model_untouched(method, nd, kind):
    full = check_batch_matrix(method, nd, kind, OPTS.get(method, {}))
    assert torch.isfinite(full.map).all()
    assert full.map.abs().max() > 0 or method == "lime"  # LIME's Lasso (alpha 0.01) may zero a tiny model's effects
    if mx.registry.get_method(method).needs_grad:
        assert full.info["n_backward"] >= 3


def raising_target(after_calls, cls=0):
    """A target whose score raises on its ``after_calls``-th evaluation (while the library's hooks are on)."""
    calls = [0]

    def fn(out):
        calls[0] += 1
        if calls[0] >= after_calls:
            raise RuntimeError("planted failure inside the forward")
        return out[:, cls] if out.ndim == 2 else out[:, cls].flatten(1).sum(1)
    return fn


@pytest.mark.parametrize("method", NEW)
def test_model_untouched_after_an_error_inside_the_library_call(method):
    model, x = make("cls", 2), image(2, b=2)
    model.train()
    snap = snapshot(model)
    after = 2 if method == "lrp" else 1  # LRP: fail in its second pass, after rules changed the weights
    with pytest.raises((RuntimeError, MedexplainError)):
        mx.explain(model, x, method, target=raising_target(after), **OPTS.get(method, {}))
    assert_untouched(model, snap)


def test_lrp_gamma_restores_weights_and_user_rules_after_an_error_in_3d():
    from captum.attr._utils.lrp_rules import EpsilonRule
    model, x = make("seg", 3), image(3, b=2)
    own = EpsilonRule(epsilon=0.5)
    model.head.rule = own                       # a rule the user set must survive (Captum deletes it)
    snap = snapshot(model)
    with pytest.raises((RuntimeError, MedexplainError)):
        mx.explain(model, x, "lrp", target=raising_target(2, 1), composite="epsilon_gamma_box")
    assert model.head.rule is own
    assert_untouched(model, snap)
    mx.explain(model, x, "lrp", target=Region(1, torch.ones(2, 8, 8, 8, dtype=torch.bool)), composite="epsilon_gamma_box")
    assert model.head.rule is own
    assert_untouched(model, snap)


# --------------------------------------------------------------------------------- equality with Captum


def test_gradient_adapters_equal_captum_on_2d_classification():
    model, x, t = make("cls", 2), image(2), [0, 2, 1]
    for name, cls in [("inputxgradient", ca.InputXGradient), ("guided_backprop", ca.GuidedBackprop),
                      ("deconvolution", ca.Deconvolution)]:
        ours = mx.explain(model, x, name, target=t, chunk_size=2)  # 2 samples per call
        assert rel_err(ours.map, cls(model).attribute(x, target=t)) <= 1e-10, name
        assert ours.info["n_forward"] == 3 and ours.info["n_backward"] == 3
    ours = mx.explain(model, x, "deeplift", target=t, baselines=0.1).map
    assert rel_err(ours, ca.DeepLift(model).attribute(x, baselines=0.1, target=t)) <= 1e-10
    ref = reference_distribution(x, None, 4, 0)
    ours = mx.explain(model, x, "deepliftshap", target=t, n_baselines=4, chunk_size=8)  # one sample (2 x 4 rows) a call
    assert rel_err(ours.map, ca.DeepLiftShap(model).attribute(x, baselines=ref, target=t)) <= 1e-10
    assert ours.info["n_forward"] == 3 * 2 * 4


def test_gradientshap_equals_captum_with_the_same_seed_per_sample():
    model, x, t = make("cls", 2), image(2), [0, 2, 1]
    ref = reference_distribution(x, None, 4, 5)
    expected = []
    for i in range(3):
        torch.manual_seed(5)
        np.random.seed(5)
        expected.append(ca.GradientShap(model).attribute(x[i:i + 1], baselines=ref, n_samples=6, stdevs=0.1, target=t[i]))
    torch.manual_seed(999)
    state = torch.random.get_rng_state()
    ours = mx.explain(model, x, "gradientshap", target=t, n_baselines=4, n_samples=6, stdevs=0.1, seed=5)
    assert rel_err(ours.map, torch.cat(expected)) <= 1e-10
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is left as found
    other = mx.explain(model, x, "gradientshap", target=t, n_baselines=4, n_samples=6, stdevs=0.1, seed=6).map
    assert (other - ours.map).abs().max() > 1e-6


def test_perturbation_adapters_equal_captum_with_the_same_groups_and_seeds():
    model, x, t = make("cls", 2), image(2), [0, 2, 1]
    g = feature_groups(x, "grid", 9)
    ours = mx.explain(model, x, "feature_ablation", target=t, features="grid", n_features=9, chunk_size=6)
    ref = ca.FeatureAblation(model).attribute(x, target=t, feature_mask=g, baselines=0.0)
    assert rel_err(ours.map, ref[:, :1]) <= 1e-10
    assert ours.info["n_forward"] == 3 + 3 * 9 and ours.info["n_features"] == [9, 9, 9]
    gs = feature_groups(x, "slic", 16)
    for name, cls in (("kernelshap", ca.KernelShap), ("lime", ca.Lime)):
        expected = []
        for i in range(3):
            torch.manual_seed(3)
            np.random.seed(3)
            expected.append(cls(model).attribute(x[i:i + 1], target=t[i], feature_mask=gs[i:i + 1], n_samples=16,
                                                 baselines=0.0))
        ours = mx.explain(model, x, name, target=t, n_features=16, n_samples=16, seed=3, chunk_size=7)
        assert rel_err(ours.map, torch.cat(expected)[:, :1]) <= 1e-10, name
        assert ours.info["n_forward"] == 3 * 16


def test_lrp_epsilon_equals_captum_on_2d_and_composites_differ():
    model, x, t = make("cls", 2), image(2), [0, 2, 1]
    ours = mx.explain(model, x, "lrp", target=t, composite="epsilon").map
    assert rel_err(ours, ca.LRP(model).attribute(x, target=t)) <= 1e-8
    maps = {c: mx.explain(model, x, "lrp", target=t, composite=c).map
            for c in ("epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1")}
    for c, m in maps.items():
        assert torch.isfinite(m).all() and rel_err(m, ours) > 1e-3, c


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel_equals_captum_noise_tunnel_with_the_same_noise(nt_type):
    model, x, t = make("cls", 2), image(2), [1, 0, 2]
    n, sd = 5, 0.3
    torch.manual_seed(123)
    ref = ca.NoiseTunnel(ca.InputXGradient(model)).attribute(x, nt_type=nt_type, nt_samples=n, stdevs=sd, target=t)
    torch.manual_seed(123)  # Captum's draw: rows sample-major, (B*N, *x.shape[1:])
    noise = torch.normal(0, torch.tensor(sd).repeat((x.shape[0] * n,) + tuple(x.shape[1:])))
    noise = noise.view(x.shape[0], n, *x.shape[1:]).transpose(0, 1).to(x.dtype)
    ours = mx.explain(model, x, "noise_tunnel", target=t, base="inputxgradient", nt_type=nt_type, n_samples=n,
                      noise=noise, chunk_size=6).map
    assert rel_err(ours, ref) <= 1e-10


def test_noise_tunnel_over_saliency_is_smoothgrad_from_the_one_noise_source():
    model, x = make("seg", 3), image(3, b=2)
    tgt = Region(1, torch.ones(2, 8, 8, 8, dtype=torch.bool))
    a = mx.explain(model, x, "noise_tunnel", target=tgt, base="saliency", n_samples=4, sigma=0.2, seed=7, chunk_size=4)
    b = mx.explain(model, x, "smoothgrad", target=tgt, n_samples=4, sigma=0.2, seed=7)
    assert rel_err(a.map, b.map) <= 1e-12
    ig = mx.explain(model, x, "noise_tunnel", target=tgt, base="integrated_gradients", n_samples=2,
                    base_options={"steps": 4}).map
    assert ig.shape == x.shape and torch.isfinite(ig).all()
    with pytest.raises(InputError, match="gradient methods"):
        mx.explain(model, x, "noise_tunnel", target=tgt, base="occlusion")
    with pytest.raises(InputError, match="no option"):
        mx.explain(model, x, "noise_tunnel", target=tgt, base="saliency", base_options={"steps": 3})


# --------------------------------------------------------------------------------------------- LRP in 3D


class BiasFree3D(nn.Module):
    """conv-relu-maxpool-conv-relu-avgpool-linear, no biases: LRP-0 conserves relevance exactly."""

    def __init__(self, k=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool3d(2),
                                  nn.Conv3d(4, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool3d(1), nn.Flatten())
        self.fc = nn.Linear(4, k, bias=False)

    def forward(self, x):
        return self.fc(self.body(x))


def test_lrp_runs_on_conv3d_where_captum_alone_raises_and_conserves_relevance():
    torch.manual_seed(0)
    model = BiasFree3D().double().eval()
    model.body[4].running_mean.zero_()        # an identity batch norm, so the net stays bias-free
    x = image(3, b=2)
    with pytest.raises(TypeError, match="Conv3d"):
        ca.LRP(model).attribute(x, target=[0, 1])
    with torch.no_grad():
        logits = model(x)
    a = mx.explain(model, x, "lrp", target=[0, 1], epsilon=1e-12, composite="epsilon")
    score = logits[[0, 1], [0, 1]]
    assert a.map.shape == x.shape
    torch.testing.assert_close(a.map.flatten(1).sum(1), score, rtol=1e-6, atol=1e-9)   # relevance conservation
    assert not any(m._forward_hooks or m._backward_hooks or hasattr(m, "rule") or hasattr(m, "activations")
                   for m in model.modules())


def test_lrp_region_target_on_a_3d_segmenter_seeds_each_voxel_with_its_own_logit():
    """A bias-free 3D segmenter and a Region target: the input relevance sums to the region's logit sum,
    and equals the sum of the per-voxel LRP maps each seeded with that voxel's logit (linearity)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1, bias=False), nn.ReLU(),
                          nn.Conv3d(3, 2, 1, bias=False)).double().eval()
    x = image(3, b=1)
    mask = torch.zeros(1, 8, 8, 8, dtype=torch.bool)
    mask[0, 2:4, 3:5, 4:6] = True
    with torch.no_grad():
        z = model(x)[0, 1]
    a = mx.explain(model, x, "lrp", target=Region(1, mask), epsilon=1e-12, composite="epsilon").map
    torch.testing.assert_close(a.sum(), z[mask[0]].sum(), rtol=1e-6, atol=1e-9)
    per_voxel = sum(mx.explain(model, x, "lrp", target=Region(1, one[None]), epsilon=1e-12, composite="epsilon").map
                    for one in _single_voxel_masks(mask[0]))
    torch.testing.assert_close(a, per_voxel, rtol=1e-6, atol=1e-10)


def _single_voxel_masks(mask):
    for idx in mask.nonzero():
        m = torch.zeros_like(mask)
        m[tuple(idx)] = True
        yield m


def test_alpha_beta_flat_and_zbox_rules_match_their_formulas_on_one_linear_layer():
    from medexplain.methods.lrp import _make_rule_classes
    AlphaBeta, Flat, ZBox, *_ = _make_rule_classes()
    torch.manual_seed(2)
    layer = nn.Linear(5, 1).double()
    a = torch.randn(1, 5, dtype=torch.float64)
    w, b = layer.weight[0].detach(), layer.bias.detach()
    z = (a[0] * w).sum() + b
    r_out = z.view(1, 1)
    with torch.no_grad():
        ab = AlphaBeta(2.0, 1.0, stabilizer=0.0).relevance(layer, a, r_out)
        ap, an, wp, wn = a[0].clamp(min=0), a[0].clamp(max=0), w.clamp(min=0), w.clamp(max=0)
        zp = (ap * wp).sum() + (an * wn).sum() + b.clamp(min=0)
        zn = (ap * wn).sum() + (an * wp).sum() + b.clamp(max=0)
        expect = 2 * (ap * wp + an * wn) / zp * z - 1 * (ap * wn + an * wp) / zn * z
        torch.testing.assert_close(ab[0], expect)
        flat = Flat(stabilizer=0.0).relevance(layer, a, r_out)[0]
        torch.testing.assert_close(flat, torch.full((5,), z.item() / 5, dtype=torch.float64))
        low, high = -2.0, 3.0
        zb = ZBox(low, high, stabilizer=0.0).relevance(layer, a, r_out)[0]
        den = (a[0] * w).sum() + b - (low * wp).sum() - b - (high * wn).sum() - b
        torch.testing.assert_close(zb, (a[0] * w - low * wp - high * wn) / den * z)


def test_zplus_rule_equals_captums_alpha1_beta0_on_nonnegative_inputs():
    """Our alpha-beta rule with alpha=1, beta=0 (z+) against Captum's Alpha1_Beta0_Rule where every input
    of the rule's layers is non-negative (after a ReLU), on a bias-free 2D classifier."""
    from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule

    from medexplain.methods.lrp import _make_rule_classes
    AlphaBeta, *_ = _make_rule_classes()
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, bias=False),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3, bias=False)).double().eval()
    x = image(2, b=2)
    maps = []
    for rule in (Alpha1_Beta0_Rule, lambda: AlphaBeta(1.0, 0.0, stabilizer=1e-9)):
        model[0].rule, model[2].rule, model[6].rule = EpsilonRule(), rule(), rule()
        model[4].rule, model[5].rule = EpsilonRule(), EpsilonRule()
        maps.append(ca.LRP(model).attribute(x, target=[0, 2]))
    assert rel_err(maps[1], maps[0]) <= 1e-8


def test_lrp_refuses_shared_layers_and_unknown_layer_types_with_typed_errors():
    shared = nn.Conv2d(2, 2, 3, padding=1).double()
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2)).double().eval()
    with pytest.raises(UnsupportedModelError):
        mx.explain(model, image(2, b=1), "lrp", target=0)

    class Odd(nn.Module):
        def forward(self, x):
            return x * 2
    odd = nn.Sequential(nn.Conv2d(2, 2, 3), Odd(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2)).double().eval()
    assert "lrp" not in mx.available_methods(model=odd)
    with pytest.raises(UnsupportedModelError, match="Odd"):
        mx.explain(odd, image(2, b=1), "lrp", target=0)
    with pytest.raises(InputError, match="composite"):
        mx.explain(make("cls", 2), image(2, b=1), "lrp", target=0, composite="nope")


# ------------------------------------------------------------------------------------- feature groups etc.


def test_feature_groups_grid_slic_and_given_in_3d():
    x = image(3, b=2, size=12)
    g = feature_groups(x, "grid", 27)
    assert g.shape == (2, 1, 12, 12, 12) and int(g.max()) == 26
    assert torch.equal(g[0, 0, :4, :4, :4], torch.zeros(4, 4, 4, dtype=torch.long))
    assert int(g[0, 0, 11, 11, 11]) == 26 and int(g[0, 0, 0, 0, 4]) == 1
    s = feature_groups(x, "slic", 8)
    counts = (s.flatten(1).amax(1) + 1).tolist()
    assert all(2 <= c <= 27 for c in counts)
    for row in s.flatten(1):  # contiguous ids
        assert torch.equal(row.unique(), torch.arange(int(row.max()) + 1))
    given = feature_groups(x, torch.full((1, 12, 12, 12), 5))
    assert int(given.max()) == 0 and given.shape == (2, 1, 12, 12, 12)
    with pytest.raises(InputError):
        feature_groups(x, torch.zeros(1, 1, 12, 12))
    with pytest.raises(InputError):
        feature_groups(x, "superpixels")


def test_surrogates_refuse_a_single_feature_and_bad_baselines_before_work():
    model, x = make("cls", 2), image(2, b=1)
    with pytest.raises(InputError, match="single feature"):
        mx.explain(model, x, "kernelshap", target=0, features=torch.zeros(1, 1, 12, 12))
    with pytest.raises(InputError, match="baselines"):
        mx.explain(model, x, "deeplift", target=0, baselines=torch.zeros(2, 3, 5))
    with pytest.raises(InputError, match="baselines"):
        mx.explain(model, x, "deepliftshap", target=0, baselines=torch.zeros(4, 3, 12, 12))


def test_every_new_method_is_listed_and_applies_to_classifiers_and_segmenters():
    listed = set(mx.available_methods())
    assert set(NEW) <= listed
    for kind in ("cls", "seg"):
        assert set(NEW) <= set(mx.available_methods(model=make(kind, 3), x=image(3, b=1)))


@pytest.mark.parametrize("mids", [
    lambda: [nn.Dropout(0.0), nn.InstanceNorm3d(4), nn.PReLU()],      # MONAI's ADN order (norm, dropout, act)
    lambda: [nn.InstanceNorm3d(4), nn.Dropout(0.0), nn.ELU()],
    lambda: [nn.ReLU(), nn.Dropout3d(0.0), nn.Identity(), nn.LeakyReLU(0.1)],
], ids=["dropout-in-prelu", "in-dropout-elu", "relu-dropout3d-identity-leaky"])
def test_lrp_passes_relevance_through_norms_dropout_and_activations_in_3d(mids):
    """Bias-free conv - (elementwise and norm layers) - conv on a Region: LRP-epsilon conserves the region's
    logit sum. Captum's IdentityRule after an nn.Dropout would lose it (the Dropout forwards the raw gradient)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1, bias=False), *mids(), nn.Conv3d(4, 2, 1, bias=False)).double().eval()
    x = image(3, b=2)
    mask = torch.zeros(2, 8, 8, 8, dtype=torch.bool)
    mask[:, :4] = True
    tgt = Region(1, mask)
    with torch.no_grad():
        score = tgt.scores(model(x))
    a = mx.explain(model, x, "lrp", target=tgt, epsilon=1e-12, composite="epsilon").map
    torch.testing.assert_close(a.flatten(1).sum(1), score, rtol=1e-6, atol=1e-9)


def test_deeplift_names_the_shared_relu_it_cannot_handle():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.act = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.act(self.c2(self.act(self.c1(x)))).mean((2, 3)))
    model = Shared().double().eval()
    snap = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"\['act'\]"):
        mx.explain(model, image(2, b=1), "deeplift", target=0)
    assert_untouched(model, snap)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_models_get_the_hook_free_adapters_only():
    x = image(2, b=2)
    scripted = torch.jit.trace(make("cls", 2), x)
    got = set(mx.available_methods(model=scripted, x=x[:1])) & set(NEW)
    assert got == {"inputxgradient", "gradientshap", "feature_ablation", "kernelshap", "lime", "noise_tunnel"}
    eager = mx.explain(make("cls", 2), x, "inputxgradient", target=[0, 1]).map
    assert rel_err(mx.explain(scripted, x, "inputxgradient", target=[0, 1]).map, eager) <= 1e-12
    with pytest.raises(UnsupportedModelError):
        mx.explain(scripted, x, "lrp", target=0, composite="epsilon")


def test_lrp_after_a_failed_captum_lrp_call_that_left_rules_behind():
    """Captum's LRP raises on AdaptiveMaxPool2d after it has set ``rule = None`` on earlier ReLUs (and never
    removes it); medexplain's LRP still runs on that model and leaves those leftovers as it found them."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                          nn.Linear(3, 2)).double().eval()
    x = image(2, b=2)
    with pytest.raises(TypeError, match="AdaptiveMaxPool2d"):
        ca.LRP(model).attribute(x, target=0)
    assert "rule" in model[1].__dict__ and model[1].rule is None            # Captum's leftover
    snap = snapshot(model)
    a = mx.explain(model, x, "lrp", target=[0, 1], composite="epsilon").map
    assert torch.isfinite(a).all() and a.abs().max() > 0
    assert_untouched(model, snap)
    assert model[1].rule is None


# --------------------------------------------------------------------------------- LRP on residual networks


def _debiased(model):
    """Zero every bias and batch-norm mean (in place), so LRP-epsilon must conserve relevance exactly."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "bias", None), torch.Tensor):
                m.bias.zero_()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.zero_()
    return model


def _resnet(nd, block="basic", cin=2, k=3):
    from monai.networks.nets import ResNet
    torch.manual_seed(0)
    net = ResNet(block=block, layers=[1, 1, 1, 1], block_inplanes=[2, 4, 4, 4], spatial_dims=nd, n_input_channels=cin,
                 conv1_t_size=3, conv1_t_stride=1, no_max_pool=True, num_classes=k, act=("relu", {"inplace": False}))
    return _debiased(net.double().eval())


def _modules_and_forwards(model):
    return [(n, type(m).__name__, "forward" in m.__dict__) for n, m in model.named_modules()]


# Tolerance: float64 nets with zero biases and epsilon 1e-12, so the only loss is the stabiliser (~1e-12 per
# unit) and rounding; 1e-6 relative leaves room for the proportional splits of near-cancelling summands.
@pytest.mark.parametrize("nd,block,composite", [(2, "basic", "epsilon"), (2, "basic", "epsilon_plus_flat"),
                                                (3, "bottleneck", "epsilon")])
def test_lrp_conserves_relevance_through_canonized_resnet_blocks(nd, block, composite):
    model, x = _resnet(nd, block), image(nd, b=2)
    if composite == "epsilon_plus_flat":  # z+ conserves where every z+ > 0: non-negative weights after the first conv
        with torch.no_grad():
            for m in list(model.modules())[2:]:
                if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                    m.weight.abs_()
    snap, names = snapshot(model), _modules_and_forwards(model)
    with torch.no_grad():
        score = model(x)[[0, 1], [0, 2]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # a canonized net must not warn
        a = mx.explain(model, x, "lrp", target=[0, 2], composite=composite, epsilon=1e-12)
    assert a.info["canonized_blocks"] == 4 and a.info["uncanonized_additions"] == 0
    torch.testing.assert_close(a.map.flatten(1).sum(1), score, rtol=1e-6, atol=1e-9)
    assert_untouched(model, snap)
    assert _modules_and_forwards(model) == names


def test_lrp_conserves_a_region_score_through_the_3d_unets_residual_units_and_skips():
    from medexplain.models import zoo
    torch.manual_seed(0)
    model = _debiased(zoo.unet_3d(2, 2, channels=(4, 8), strides=(2,)).double().eval())
    x = image(3, b=2)
    mask = torch.zeros(2, 8, 8, 8, dtype=torch.bool)
    mask[:, 2:6, 1:4, 3:7] = True
    with torch.no_grad():
        score = (model(x)[:, 1] * mask).flatten(1).sum(1)
    snap, names = snapshot(model), _modules_and_forwards(model)
    a = mx.explain(model, x, "lrp", target=Region(1, mask), epsilon=1e-12, composite="epsilon")
    assert a.info["canonized_blocks"] >= 3   # ResidualUnits and the SkipConnection
    torch.testing.assert_close(a.map.flatten(1).sum(1), score, rtol=1e-6, atol=1e-9)
    assert_untouched(model, snap)
    assert _modules_and_forwards(model) == names


def test_without_the_canonizer_relevance_explodes_and_an_uncovered_addition_warns(monkeypatch):
    """The same ResNet with the canonizer switched off: Captum counts both summands (not conserved), and the
    additions are named in a warning instead of a silently exploded map."""
    import medexplain.methods.lrp as lrp_mod
    model, x = _resnet(2), image(2, b=2)
    with torch.no_grad():
        score = model(x)[[0, 1], [0, 2]]
    monkeypatch.setattr(lrp_mod, "_canonical_forward", lambda m: None)
    with pytest.warns(UserWarning, match="4 pair\\(s\\) of computed tensors"):
        a = mx.explain(model, x, "lrp", target=[0, 2], epsilon=1e-12, composite="epsilon")
    assert a.info["uncanonized_additions"] == 4
    assert (a.map.flatten(1).sum(1) - score).abs().max() > 0.1 * score.abs().max()


class OwnResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.act, self.head = nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.ReLU(), nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.act(x + self.conv(x)).mean((2, 3)))


def test_lrp_warns_on_an_addition_no_canonizer_covers():
    model = OwnResidual().double().eval()
    with pytest.warns(UserWarning, match="not conserved"):
        a = mx.explain(model, image(2, b=1), "lrp", target=0)
    assert a.info["uncanonized_additions"] == 1


def test_canonized_blocks_compute_the_same_output_and_are_restored_after_an_error():
    from medexplain.methods.lrp import residual_canonizer
    from medexplain.models import zoo
    unet = zoo.unet_3d(2, 2, channels=(4, 8), strides=(2,)).double().eval()
    for model, x in [(_resnet(2), image(2, b=2)), (unet, image(3, b=2))]:
        names = _modules_and_forwards(model)
        with torch.no_grad():
            ref = model(x)
        with residual_canonizer(model) as blocks, torch.no_grad():
            assert blocks and all("forward" in b.__dict__ for b in blocks)
            torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-12)
        assert _modules_and_forwards(model) == names
    model, x = _resnet(2), image(2, b=2)
    snap, names = snapshot(model), _modules_and_forwards(model)
    with pytest.raises((RuntimeError, MedexplainError)):
        mx.explain(model, x, "lrp", target=raising_target(2), composite="epsilon")
    assert_untouched(model, snap)
    assert _modules_and_forwards(model) == names


def test_canonized_lrp_epsilon_equals_input_x_gradient_on_a_resnet_with_biases():
    """LRP-0 on a piecewise-linear net equals input x gradient (Ancona et al. 2018, ICLR, proposition 1),
    biases and batch-norm shifts included; it holds through the residual additions only once they are
    canonized (without the canonizer both summands get the whole relevance)."""
    model, x = _resnet(2), image(2, b=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.bias.normal_(0, 0.5, generator=g)
        model.fc.bias.normal_(0, 0.5, generator=g)
    lrp_map = mx.explain(model, x, "lrp", target=[0, 2], epsilon=1e-12, composite="epsilon").map
    ixg = mx.explain(model, x, "inputxgradient", target=[0, 2]).map
    assert rel_err(lrp_map, ixg) < 1e-6


def test_lrp_default_composite_is_epsilon_plus_flat():
    """Zennit's recommendation for CNNs is the default; the plain epsilon rules are one option away."""
    model, x = make("cls", 2), image(2, b=2)
    a = mx.explain(model, x, "lrp", target=[0, 1])
    b = mx.explain(model, x, "lrp", target=[0, 1], composite="epsilon_plus_flat")
    c = mx.explain(model, x, "lrp", target=[0, 1], composite="epsilon")
    assert a.info["composite"] == "epsilon_plus_flat" and torch.equal(a.map, b.map)
    assert (a.map - c.map).abs().max() > 1e-3 * c.map.abs().max()


def _monai_3d(name):
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    small = dict(spatial_dims=3, in_channels=1, out_channels=2)
    build = {
        "BasicUNet": lambda: (nets.BasicUNet(**small, features=(4, 4, 8, 8, 16, 4)), 32),   # 4 poolings: >= 32
        "SegResNetVAE": lambda: (nets.SegResNetVAE(input_image_size=(16,) * 3, **small, init_filters=8,
                                                   blocks_down=(1, 1), blocks_up=(1,)), 16),
        "UNet": lambda: (nets.UNet(**small, channels=(4, 8), strides=(2,)), 16),
        "DynUNet": lambda: (nets.DynUNet(**small, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                                         filters=[4, 8, 16]), 16),
        "SegResNet": lambda: (nets.SegResNet(**small, init_filters=8, blocks_down=(1, 1), blocks_up=(1,)), 16),
        "AttentionUnet": lambda: (nets.AttentionUnet(**small, channels=(4, 8), strides=(2,)), 16),
    }[name]
    net, s = build()
    return net.eval(), torch.randn(1, 1, s, s, s, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["BasicUNet", "SegResNetVAE", "UNet", "DynUNet", "SegResNet", "AttentionUnet"])
def test_lrp_registry_and_reality_agree_on_monai_3d_networks(name):
    """LRP was listed for BasicUNet and SegResNetVAE and then died with a raw Captum AttributeError (a module
    registered under two parents, a shared activation module, in-place activations, a tensor read by two layers).
    For each architecture: listed by available_methods and runs (finite, non-zero, the model left as found), or
    refused before any work with the registry's reason. All six run now."""
    net, x = _monai_3d(name)
    output = 0 if name == "SegResNetVAE" else None                       # SegResNetVAE returns (seg, vae_loss)
    listed = "lrp" in mx.available_methods(model=mx.Model(net, output=output), x=x)
    reason = mx.registry.get_method("lrp").why_not(net, None)
    mask = torch.zeros(1, *x.shape[2:], dtype=torch.bool)
    mask[:, 4:12, 4:12, 4:12] = True
    snap = snapshot(net)
    if not listed:
        assert reason
        with pytest.raises(UnsupportedModelError):
            mx.explain(mx.Model(net, output=output), x, "lrp", target=Region(1, mask))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                                 # additions no canonizer covers
            attr = mx.explain(mx.Model(net, output=output), x, "lrp", target=Region(1, mask))
        assert attr.map.shape == x.shape and torch.isfinite(attr.map).all() and attr.map.abs().sum() > 0
    assert_untouched(net, snap)
    assert listed, reason                                                  # the aim: LRP runs on all six


@pytest.mark.parametrize("up", ["nearest", "trilinear", "monai_nontrainable", "monai_pixelshuffle"])
def test_lrp_passes_relevance_through_upsampling(up):
    """Nearest and linear upsampling (nn.Upsample, and MONAI's UpSample wrappers: nontrainable = nn.Upsample,
    pixelshuffle = conv, padding, pooling and a shuffle) are linear: LRP-epsilon on a bias-free network conserves the
    region's logit sum through them."""
    from monai.networks.blocks import UpSample
    torch.manual_seed(0)
    upsample = {"nearest": lambda: nn.Upsample(scale_factor=2, mode="nearest"),
                "trilinear": lambda: nn.Upsample(scale_factor=2, mode="trilinear"),
                "monai_nontrainable": lambda: UpSample(3, 4, 4, 2, mode="nontrainable"),
                "monai_pixelshuffle": lambda: UpSample(3, 4, 4, 2, mode="pixelshuffle", bias=False)}[up]()
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1, bias=False), nn.MaxPool3d(2), upsample,
                          nn.Conv3d(4, 2, 1, bias=False)).double().eval()
    for m in model.modules():
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    x = torch.rand(1, 1, 8, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 8, 8, 8, dtype=torch.bool)
    mask[:, 2:6, 2:6, 2:6] = True
    assert "lrp" in mx.available_methods(model=model, x=x)
    attr = mx.explain(model, x, "lrp", target=Region(1, mask), composite="epsilon", epsilon=1e-12)
    with torch.no_grad():
        score = model(x)[:, 1][mask].sum()
    torch.testing.assert_close(attr.map.sum(), score, rtol=1e-8, atol=1e-10)


def test_lrp_reason_reads_after_it():
    """The registry's reason is shown as "... does not apply to this model: it <reason>" (was "it LRP has no rule")."""
    class Odd(nn.Module):
        def forward(self, x):
            return x * 2
    odd = nn.Sequential(nn.Conv2d(1, 2, 3), Odd(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2)).eval()
    reason = mx.registry.get_method("lrp").why_not(odd, None)
    assert reason.startswith("has layer type(s) ['Odd'] that no LRP rule covers")


def test_kernelshap_and_lime_fill_each_model_call_across_the_samples():
    """The seeded surrogates draw per sample, but their model calls are pooled across the batch:
    ceil(B n_samples / chunk_size) calls of chunk_size rows (one sample at a time would make
    B ceil(n_samples / chunk_size)), and the maps are those of one sample at a time."""
    import math
    model, x, t = make("cls", 2), image(2), [0, 2, 1]
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        for name in ("kernelshap", "lime"):
            calls.clear()
            ours = mx.explain(model, x, name, target=t, n_features=16, n_samples=16, seed=3, chunk_size=7)
            rows = [n for n in calls if n != 1]   # without the registry's probe rows
            assert sum(rows) == 3 * 16 and len(rows) == math.ceil(3 * 16 / 7) and max(rows) == 7, name
            alone = torch.cat([mx.explain(model, x[i:i + 1], name, target=t[i], n_features=16, n_samples=16, seed=3,
                                          chunk_size=7).map for i in range(3)])
            assert torch.equal(ours.map, alone) or rel_err(ours.map, alone) <= 1e-10, name
    finally:
        handle.remove()


def test_surrogates_sample_once_per_sample_where_pooling_saves_no_model_call(monkeypatch):
    """Pooling runs Captum's draws and surrogate fit twice per sample (record, replay): done only where it
    makes fewer model calls. 3 samples x 16 rows in calls of 8: 6 calls either way, so each sample is drawn
    and fitted once; in calls of 7 pooling makes 7 calls instead of 9, and each sample is drawn twice."""
    import captum.attr as ca
    model, x, t = make("cls", 2), image(2), [0, 2, 1]
    runs = []
    for name, cls in (("kernelshap", ca.KernelShap), ("lime", ca.Lime)):
        original = cls.attribute

        def counted(self, *a, _original=original, **k):
            runs.append(1)
            return _original(self, *a, **k)
        monkeypatch.setattr(cls, "attribute", counted)
        for chunk, expected in ((8, 3), (7, 6)):
            runs.clear()
            mx.explain(model, x, name, target=t, n_features=16, n_samples=16, seed=3, chunk_size=chunk)
            assert len(runs) == expected, (name, chunk)


class TwoBranch(nn.Module):
    """conv-relu, then two convolutions reading the same activation, concatenated (an Inception-style fork):
    piecewise linear and bias-free, so LRP-0 equals input x gradient."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.ReLU())
        self.a = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.b = nn.Conv2d(4, 3, 1, bias=False)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2, bias=False))

    def forward(self, x):
        h = self.stem(x)
        return self.head(torch.cat([self.a(h), self.b(h)], 1))


class DeadHead(TwoBranch):
    """A fork whose second branch is computed and dropped (a deep-supervision head in eval): the score never
    reads ``b``'s output, but ``b`` reads ``h``, so ``a`` must not share ``h`` with it."""

    def forward(self, x):
        h = self.stem(x)
        self.b(h)
        return self.head(torch.cat([self.a(h), torch.zeros(h.shape[0], 3, *h.shape[2:], dtype=h.dtype)], 1))


def test_lrp_copies_a_layers_input_only_where_the_tensor_has_several_consumers(monkeypatch):
    """Captum's rules replace a tensor's gradient in a hook on the tensor (registered once per tensor): the
    relevance of one consumer only. The probe finds the layers whose input has several consumers in the
    backward graph (the two branches of a fork) and hands only those a copy; a plain chain gets none. The
    maps equal those with a copy for every layer (the behaviour before the probe decided); with no copy at
    all the fork's z+ map is wrong (its branches share one hook)."""
    from medexplain.engine.core import model_guard
    from medexplain.methods import lrp as lrp_module
    torch.manual_seed(0)
    fork, chain = TwoBranch().double().eval(), BiasFree3D().double().eval()
    dead = DeadHead().double().eval()
    for model, x, copied in ((fork, image(2, b=2), {"a", "b"}), (chain, image(3, b=2), set()),
                             (dead, image(2, b=2), {"a", "b"})):
        with model_guard(model):
            names = {m: n for n, m in model.named_modules()}
            leaves = lrp_module._leaf_layers(model)
            assert {names[leaves[i]] for i in lrp_module._probe(model, x, None)[1]} == copied
    probe = lrp_module._probe

    def explained(model, x, composite, copies=None):
        if copies is not None:
            monkeypatch.setattr(lrp_module, "_probe", lambda m, x_, c: (probe(m, x_, c)[0], copies(m)))
        try:
            return mx.explain(model, x, "lrp", target=[0, 1], composite=composite).map
        finally:
            monkeypatch.setattr(lrp_module, "_probe", probe)

    for model, x in ((fork, image(2, b=2)), (chain, image(3, b=2))):
        for composite in ("epsilon", "epsilon_plus_flat"):
            every = explained(model, x, composite, lambda m: frozenset(range(len(lrp_module._leaf_layers(m)))))
            assert torch.equal(explained(model, x, composite), every), composite
    x = image(2, b=2)
    assert rel_err(explained(fork, x, "epsilon_plus_flat", lambda m: frozenset()),
                   explained(fork, x, "epsilon_plus_flat")) > 0.1
