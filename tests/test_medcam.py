"""Med-CAM (arXiv:2604.13695): every loss term on a constructed case, the straight-through
estimator, 2D and 3D, determinism, early stopping, option errors, the classifier left untouched, and one
end-to-end case whose minimal evidence is known by construction."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medexplain as mx
from conftest import no_hooks
from medexplain.engine.ops import total_variation
from medexplain.errors import InputError, LayerNotFoundError, TargetError, UnsupportedModelError
from medexplain.methods import medcam as mc

FAST = dict(steps=4, min_steps=4, patience=2, unet_channels=4)


@pytest.fixture(autouse=True)
def _one_thread():
    # the per-step work is tiny: one thread avoids OpenMP overhead on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cnn(nd=2, c=1, k=2, seed=0):
    torch.manual_seed(seed)
    C, P = (nn.Conv2d, nn.AdaptiveAvgPool2d) if nd == 2 else (nn.Conv3d, nn.AdaptiveAvgPool3d)
    return nn.Sequential(C(c, 4, 3, padding=1), nn.ReLU(), C(4, 6, 3, padding=1), nn.ReLU(), P(1), nn.Flatten(),
                         nn.Linear(6, k)).double().eval()


def _img(nd=2, b=2, c=1, s=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((b, c) + (s,) * nd, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------------------ loss terms

def test_all_ones_mask_gives_zero_kl_and_activation_loss():
    model, x = _cnn(), _img()
    soft = torch.full((2, 1, 16, 16), 0.9, dtype=torch.float64, requires_grad=True)
    m = mc.straight_through(soft)
    assert torch.equal(m, torch.ones_like(m))          # hardened forward is exactly 1
    e = m * x
    assert torch.equal(e, x)
    acts = {}
    hooks = [model[i].register_forward_hook(lambda _m, _i, o, i=i: acts.setdefault(i, []).append(o)) for i in (1, 3)]
    lx, le = model(x), model(e)
    for h in hooks:
        h.remove()
    ax, ae = [[acts[1][0]], [acts[3][0]]], [[acts[1][1]], [acts[3][1]]]
    for dist in (["cosine", "cosine"], ["mse", "mse"]):
        assert torch.allclose(mc.activation_loss(ax, ae, [0.3, 0.7], dist), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(mc.kl_loss(lx, le), torch.zeros(2, dtype=torch.float64), atol=1e-15)
    # and a different explanation gives positive values of both
    ae0 = [[model[1](model[0](0.2 * x))]]
    assert (mc.activation_loss([[acts[1][0]]], ae0, [1.0], ["mse"]) > 1e-3).all()
    assert (mc.kl_loss(lx, model(x.flip(-1) * 3)) > 0).all()


def test_kl_and_ce_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    lx, le = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    px, pe = lx.softmax(1), le.softmax(1)
    assert torch.allclose(mc.kl_loss(lx, le), (px * (px / pe).log()).sum(1))
    y = torch.tensor([0, 3, 2])
    assert torch.allclose(mc.ce_loss(le, y), -pe[torch.arange(3), y].log())


def test_distances_cosine_scale_invariant_mse_standardised():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 5, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(mc.activation_loss([[a]], [[2.5 * a]], [1.0], ["cosine"]), torch.zeros(2, dtype=torch.float64),
                          atol=1e-12)
    # b = a + one per-channel sd: every standardised difference is 1, so the MSE is exactly 1
    sd = a.flatten(2).std(2, unbiased=False)[..., None, None]
    assert torch.allclose(mc.activation_loss([[a]], [[a + sd]], [1.0], ["mse"]), torch.ones(2, dtype=torch.float64))
    # orthogonal activations: cosine distance 1; weights scale the term
    u, v = torch.zeros(1, 2, 2, 2, dtype=torch.float64), torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    u[0, 0], v[0, 1] = 1, 1
    assert torch.allclose(mc.activation_loss([[u]], [[v]], [0.25], ["cosine"]), torch.tensor([0.25], dtype=torch.float64))


@pytest.mark.parametrize("nd", [2, 3])
def test_area_and_tv_exact_on_a_known_mask(nd):
    m = torch.zeros((1, 1) + (8,) * nd, dtype=torch.float64)
    m[(0, 0) + (slice(2, 5),) * nd] = 1                  # a cube/square of side 3 away from the border
    n_vox, side = 8 ** nd, 3
    area = side ** nd
    faces = 2 * nd * side ** (nd - 1)                    # each axis: 2 boundary faces per row of the cube
    assert mc.area_loss(m, "sum").item() == area
    assert mc.area_loss(m, "mean").item() == pytest.approx(area / n_vox, abs=1e-15)
    assert total_variation(m, "sum").item() == faces        # Med-CAM's L_tv is the one TV of medexplain.engine.ops
    assert total_variation(m, "mean").item() == pytest.approx(faces / n_vox, abs=1e-15)
    assert mc.bin_loss(m, "sum").item() == 0
    half = torch.full_like(m, 0.5)
    assert mc.bin_loss(half, "mean").item() == 0.25 and total_variation(half, "sum").item() == 0
    with pytest.raises(InputError):
        total_variation(m, "max")
    with pytest.raises(InputError, match="prior_reduction"):
        mx.explain(_cnn(nd), torch.rand((1, 1) + (8,) * nd, dtype=torch.float64), "medcam", prior_reduction="max", **FAST)


def test_straight_through_forward_hard_backward_identity():
    soft = torch.tensor([[0.1, 0.5, 0.51, 0.99]], dtype=torch.float64, requires_grad=True)
    m = mc.straight_through(soft)
    assert m.tolist() == [[0.0, 0.0, 1.0, 1.0]]
    w = torch.tensor([[1.0, -2.0, 3.0, 4.0]], dtype=torch.float64)
    (g,) = torch.autograd.grad((m * w).sum(), soft)
    assert torch.equal(g, w)


def test_gradient_reaches_the_unet_through_the_hard_mask():
    # With the priors off, the only path from the loss to the U-Net is the straight-through estimator.
    model, x = _cnn(), _img(b=1)
    kw = dict(FAST, steps=6, min_steps=100, weights=dict(area=0, bin=0, tv=0), return_soft=True, lr=1e-2)
    s1 = mx.explain(model, x, "medcam", **{**kw, "steps": 1}).map
    s6 = mx.explain(model, x, "medcam", **kw).map
    assert (s6 - s1).abs().max() > 1e-4


# ------------------------------------------------------------------------------------- the explainer

@pytest.mark.parametrize("nd", [2, 3])
def test_binary_mask_on_the_input_grid_and_info(nd):
    model, x = _cnn(nd, c=2), _img(nd, b=2, c=2, s=16 if nd == 2 else 8)
    a = mx.explain(model, x, "medcam", **FAST)
    assert a.map.shape == (2, 1, *x.shape[2:])
    assert set(a.map.unique().tolist()) <= {0.0, 1.0}
    info = a.info
    p = F.softmax(model(x), 1)
    assert info["label"] == p.argmax(1).tolist()
    assert info["p_y_x"] == pytest.approx(p.max(1).values.tolist())
    assert info["area"] == pytest.approx(a.map.flatten(1).mean(1).tolist())
    e = a.map * x
    assert info["p_y_e"] == pytest.approx(F.softmax(model(e), 1).gather(1, p.argmax(1)[:, None])[:, 0].tolist())
    assert set(info["p_y_e_tilde_by_background"]) == {"zeros", "gaussian", "uniform"}
    assert info["steps"] == [4, 4]
    # reference 2 rows + 4 steps x (e, e~) x 2 images + decision check 2 + final (e + 3 backgrounds) x 2
    assert info["n_forward"] == 2 + 4 * 4 + 2 + 4 * 2 and info["n_backward"] == 4 * 4


def test_soft_mask_option_thresholds_to_the_binary_mask():
    model, x = _cnn(), _img()
    hard = mx.explain(model, x, "medcam", **FAST).map
    soft = mx.explain(model, x, "medcam", return_soft=True, **FAST).map
    assert ((soft > 0) & (soft < 1)).all()
    assert torch.equal((soft > 0.5).double(), hard)


def test_deterministic_and_batch_independent():
    model, x = _cnn(), _img(b=3)
    a = mx.explain(model, x, "medcam", return_soft=True, **FAST).map
    b = mx.explain(model, x, "medcam", return_soft=True, **FAST).map
    assert torch.equal(a, b)
    single = torch.cat([mx.explain(model, x[i:i + 1], "medcam", return_soft=True, **FAST).map for i in range(3)])
    assert torch.allclose(a, single, atol=1e-8)        # one U-Net per image: the batch does not couple them
    chunked = mx.explain(model, x, "medcam", return_soft=True, images_per_step=2, **FAST).map
    assert torch.allclose(a, chunked, atol=1e-8)
    c = mx.explain(model, x, "medcam", return_soft=True, seed=5, **FAST).map
    assert not torch.allclose(a, c)


def test_target_given_or_predicted():
    model, x = _cnn(k=3), _img()
    pred = model(x).argmax(1)
    other = ((pred + 1) % 3).tolist()
    assert mx.explain(model, x, "medcam", **FAST).info["label"] == pred.tolist()
    a = mx.explain(model, x, "medcam", target=other, **FAST)
    assert a.info["label"] == other
    with pytest.raises(TargetError):
        mx.explain(model, x, "medcam", target=3, **FAST)
    with pytest.raises(TargetError):
        mx.explain(model, x, "medcam", target=mx.targets.MultiLabel([0, 1]), **FAST)


def test_default_layers_activation_modules_in_call_order_and_weights():
    model, x = _cnn(), _img()
    info = mx.explain(model, x, "medcam", **FAST).info
    assert info["layers"] == ["1", "3"] and info["distances"] == ["cosine", "mse"]
    assert info["layer_weights"] == pytest.approx([1 / 9, 8 / 9])   # 2^linspace(0, 3, 2), normalised
    assert mc.default_layers(model, [str(i) for i in range(9)], 5) == ["0", "2", "4", "6", "8"]
    info = mx.explain(model, x, "medcam", layers="3", layer_weights=[2.0], distance="cosine", **FAST).info
    assert info["layers"] == ["3"] and info["layer_weights"] == [1.0] and info["distances"] == ["cosine"]


def test_early_stopping_when_mask_and_loss_settle():
    # lr 0 and a fixed background: the mask and the loss never change, so every image stops at min_steps.
    model, x = _cnn(), _img()
    info = mx.explain(model, x, "medcam", steps=50, lr=0.0, backgrounds="zeros", min_steps=6, patience=3,
                      unet_channels=4).info
    assert info["steps"] == [6, 6] and info["settled"] == [True, True]
    info = mx.explain(model, x, "medcam", steps=8, lr=0.0, backgrounds="zeros", min_steps=100, patience=3,
                      unet_channels=4).info
    assert info["steps"] == [8, 8] and info["settled"] == [False, False]


def test_option_and_model_errors():
    model, x = _cnn(), _img()
    with pytest.raises(LayerNotFoundError, match="Close matches"):
        mx.explain(model, x, "medcam", layers=["12"], **FAST)
    with pytest.raises(InputError, match="unknown medcam weight"):
        mx.explain(model, x, "medcam", weights={"areaa": 1}, **FAST)
    with pytest.raises(InputError):
        mx.explain(model, x, "medcam", backgrounds=("checkerboard",), **FAST)
    with pytest.raises(InputError):
        mx.explain(model, x, "medcam", layers=["1", "3"], layer_weights=[1.0], **FAST)
    seg = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU()).double()
    with pytest.raises(UnsupportedModelError, match="classifiers"):
        mx.explain(seg, x, "medcam", **FAST)
    with pytest.raises(UnsupportedModelError, match="TorchScript"):
        mx.explain(torch.jit.trace(model, x), x, "medcam", **FAST)


def test_classifier_untouched_also_on_error():
    model, x = _cnn(), _img()
    model.train()
    model[2].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    mx.explain(model, x, "medcam", **FAST)
    with pytest.raises(InputError):
        mx.explain(model, x, "medcam", layers=["1", "3"], layer_weights=[1.0, -1.0], **FAST)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert no_hooks(model)


# ------------------------------------------------------------------------------ known minimal evidence

def _bright_spot_model():
    """Class-1 logit = 0.5 * sum ReLU(x - 0.8), class-0 logit = 1: only pixels brighter than 0.8 carry
    evidence, and about 10 of them (at 1.0) suffice for class 1; dimmer pixels do not move any logit."""
    conv, lin = nn.Conv2d(1, 1, 1).double(), nn.Linear(1, 2).double()
    with torch.no_grad():
        conv.weight.fill_(1.0), conv.bias.fill_(-0.8)
        lin.weight.copy_(torch.tensor([[0.0], [0.5]])), lin.bias.copy_(torch.tensor([1.0, 0.0]))
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(1), _Sum(), lin).eval()


class _Sum(nn.Module):
    def forward(self, a):
        return a.sum(1, keepdim=True)


def _bright_spot_case(b=2, s=24):
    g = torch.Generator().manual_seed(3)
    x = 0.3 + 0.1 * torch.rand(b, 1, s, s, generator=g, dtype=torch.float64)
    r = torch.zeros(b, s, s, dtype=torch.bool)
    r[0, 4:10, 13:19] = True                          # a bright 6 x 6 square per image: the only evidence
    if b > 1:
        r[1, 14:20, 3:9] = True
    x[:, 0][r] = 1.0
    return x, r


def test_keep_decision_falls_back_to_the_last_mask_that_kept_it():
    # Only the area prior: from an all-ones start (decision kept) the mask shrinks to nothing.
    model, (x, _) = _bright_spot_model(), _bright_spot_case(b=1)
    kw = dict(steps=40, lr=3e-2, min_steps=100, unet_channels=4, mask_init=0.95,
              weights=dict(act=0, ce=0, kl=0, rob=0, tv=0, bin=0))
    plain = mx.explain(model, x, "medcam", keep_decision=False, **kw).info
    safe = mx.explain(model, x, "medcam", **kw).info
    assert plain["keeps_decision"] == [False] and plain["fell_back"] == [False]
    assert safe["keeps_decision"] == [True] and safe["fell_back"] == [True]
    assert 0 < safe["area"][0] and plain["area"][0] < safe["area"][0]


@pytest.mark.slow
def test_end_to_end_mask_keeps_the_decision_inside_the_known_evidence():
    s = 24
    x, r = _bright_spot_case(2, s)
    model = _bright_spot_model()
    assert (model(x).argmax(1) == 1).all()
    a = mx.explain(model, x, "medcam", steps=150, seed=0)
    m = a.map[:, 0].bool()
    inside = (m & r).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
    assert all(a.info["keeps_decision"]), a.info
    assert (inside >= 0.8).all(), inside
    assert max(a.info["area"]) <= 36 / s ** 2 + 0.02   # no larger than the evidence (6% of the image)
