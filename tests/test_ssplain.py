"""SSplain (arXiv:2512.08038): constraints, batching, 2D/3D, region targets, and the ADMM update
rules of both modes checked against a two-iteration example computed by hand (closed-form gradients of a
linear model and Adam's update written out)."""
import numpy as np
import pytest
import torch
from torch import nn

import medexplain as mx
from medexplain.errors import InputError, TargetError
from medexplain.methods.ssplain import keep_top_k


def _cnn2d(k=3, c=1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, k))


def _seg3d(c=2, k=2):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(c, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, k, 1))


# ---------------------------------------------------------------- hand-computed two-iteration example

def _hand_admm(x_row, w, b, y, m0, support, k, lr, rho, lam, iters, dual_step):
    """ADMM for a linear classifier z = W (m * x) + b on a 1 x n image, gradients in closed form:
    dCE/dm = x * W^T (softmax(z) - e_y); dTV/dm_i = sign(m_i - m_{i-1}) - sign(m_{i+1} - m_i) on M~ = m s;
    penalty gradient rho (M - M1 + U1) + rho (M - M2 + U2) on the support; Adam (0.9, 0.999, 1e-8)."""
    s = support.astype(float)

    def topk(v):
        out = np.zeros_like(v)
        idx = [i for i in np.argsort(-v, kind="stable") if support[i]][:k]
        out[idx] = v[idx]
        return out

    m = m0.copy()
    m1, m2 = topk(m), np.clip(m, 0, 1) * s
    u1, u2 = np.zeros_like(m), np.zeros_like(m)
    mom, vel = np.zeros_like(m), np.zeros_like(m)
    for t in range(1, iters + 1):
        mt = m * s
        z = w @ (mt * x_row) + b
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        g_ce = x_row * (w.T @ (p - np.eye(len(b))[y]))
        d = np.sign(np.diff(mt))
        g_tv = np.concatenate([[0.0], d]) - np.concatenate([d, [0.0]])
        g = (g_ce + lam * g_tv + rho * (m - m1 + u1) + rho * (m - m2 + u2)) * s
        mom = 0.9 * mom + 0.1 * g
        vel = 0.999 * vel + 0.001 * g * g
        m = m - lr * (mom / (1 - 0.9 ** t)) / (np.sqrt(vel / (1 - 0.999 ** t)) + 1e-8)
        m1 = topk(m + u1)
        u1 = u1 + dual_step * (m - m1) * s
        m2 = np.clip(m + u2, 0, 1) * s
        u2 = u2 + dual_step * (m - m2) * s
    return m, m1


@pytest.mark.parametrize("mode", ["textbook", "reference"])
def test_admm_iterations_match_hand_computation(mode):
    x_row = np.array([0.2, 0.5, 1.0, 0.8, 0.0])         # the last pixel is the minimum: off the support
    w = np.array([[0.5, -1.0, 1.0, 0.3, 1.0], [-0.4, 0.8, 1.1, 0.6, -2.0]])
    bias = np.array([0.1, -0.2])
    support = x_row > x_row.min()
    m0 = np.where(support, (x_row - 0.2) / 0.8, 0.0)     # min-max of the support's intensities
    lr, rho, lam, k = 0.05, 0.5, 0.05, 2                 # rho large so the dual scaling shows
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 2)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor(w)), model[1].bias.copy_(torch.tensor(bias))
    x = torch.tensor(x_row).view(1, 1, 1, 5)
    attr = mx.explain(model, x, "ssplain", target=1, alpha=2, iterations=4, lr=lr, rho=rho, lambda_tv=lam,
                      mode=mode)
    got = attr.map.view(-1).numpy()
    m_tb, m1_tb = _hand_admm(x_row, w, bias, 1, m0, support, k, lr, rho, lam, 4, dual_step=1.0)
    m_ref, m1_ref = _hand_admm(x_row, w, bias, 1, m0, support, k, lr, rho, lam, 4, dual_step=rho)
    assert np.abs(m_tb - m_ref).max() > 1e-3             # the two rules really differ on this example
    if mode == "textbook":                               # returned: clip(top_k(M), 0, 1)
        keep = np.zeros(5, bool)
        keep[[i for i in np.argsort(-m_tb, kind="stable") if support[i]][:k]] = True
        np.testing.assert_allclose(got, np.where(keep, np.clip(m_tb, 0, 1), 0.0), atol=1e-13, rtol=0)
        assert (got != 0).sum() <= k and 0 < got[got != 0].min() and got.max() < 1  # interior values
        np.testing.assert_allclose(attr.info["residual_l0"][0], np.linalg.norm(m_tb - m1_tb), atol=1e-13, rtol=0)
        np.testing.assert_allclose(attr.info["residual_box"][0], np.linalg.norm(m_tb - np.clip(m_tb, 0, 1)),
                                   atol=1e-13, rtol=0)
    else:                                                # returned: primal M, off-support min(0, min M)
        expected = np.where(support, m_ref, min(0.0, m_ref[support].min()))
        np.testing.assert_allclose(got, expected, atol=1e-13, rtol=0)
        np.testing.assert_allclose(attr.info["residual_l0"][0], np.linalg.norm(m_ref - m1_ref), atol=1e-13, rtol=0)
    assert attr.info["k"] == [k] and attr.info["support_size"] == [4] and attr.info["label"] == [1]


# ---------------------------------------------------------------- constraints, shapes, batching

@pytest.mark.parametrize("shape,k_arg", [((3, 1, 12, 12), None), ((2, 3, 12, 10), [5, 9])])
def test_textbook_meets_budget_and_box_2d(shape, k_arg):
    torch.manual_seed(1)
    x = torch.rand(shape, dtype=torch.float64)
    x[:, :, :2] = 0                                      # background rows: off the support
    model = _cnn2d(c=shape[1]).double()
    attr = mx.explain(model, x, "ssplain", target=[0, 1, 2][:shape[0]], k=k_arg, iterations=5,
                       mode="textbook")
    m, info = attr.map, attr.info
    assert m.shape == (shape[0], 1, *shape[2:])
    assert m.min() >= 0 and m.max() <= 1
    sup = x.mean(1, keepdim=True) > 0
    assert (m[~sup] == 0).all()
    nz = (m != 0).flatten(1).sum(1)
    k = torch.tensor(info["k"])
    expected_k = torch.tensor(k_arg) if k_arg else sup.flatten(1).sum(1) // 4
    assert torch.equal(k, expected_k) and (nz <= k).all() and all(info["budget_met"])
    assert info["nonzeros"] == nz.tolist()


def test_batched_equals_one_by_one_and_is_deterministic():
    torch.manual_seed(2)
    x = torch.rand(3, 1, 10, 10, dtype=torch.float64)
    model = _cnn2d().double()
    opts = dict(target=[2, 0, 1], iterations=4, k=[10, 20, 30], init="random", seed=3)
    together = mx.explain(model, x, "ssplain", **opts).map
    again = mx.explain(model, x, "ssplain", **opts).map
    chunked = mx.explain(model, x, "ssplain", chunk_size=2, **opts).map
    single = torch.cat([mx.explain(model, x[i:i + 1], "ssplain", target=opts["target"][i], k=opts["k"][i],
                                   iterations=4, init="random", seed=3).map for i in range(3)])
    assert torch.equal(together, again)
    torch.testing.assert_close(together, chunked, atol=1e-10, rtol=0)
    torch.testing.assert_close(together, single, atol=1e-10, rtol=0)
    assert not torch.equal(together[0], together[1])


def test_selects_the_evidence_of_a_linear_classifier():
    """Class 1's logit is driven by one 2x2 patch: with a budget of 4 pixels the mask must keep exactly it."""
    w = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    w[1, 0, 5:7, 2:4] = 3.0
    w[0] = 0.2
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2, bias=False)).double()
    with torch.no_grad():
        model[1].weight.copy_(w.view(2, -1))
    x = 0.5 + 0.1 * torch.rand(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    attr = mx.explain(model, x, "ssplain", target=1, k=4, lambda_tv=0.0, mode="textbook")
    expected = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    expected[:, 0, 5:7, 2:4] = True
    assert torch.equal(attr.map != 0, expected)
    assert all(p > q for p, q in zip(attr.info["probability"], attr.info["probability_input"]))


def test_predicted_label_when_no_target():
    torch.manual_seed(3)
    x = torch.rand(4, 1, 8, 8)
    model = _cnn2d(k=5)
    pred = model(x).argmax(1).tolist()
    attr = mx.explain(model, x, "ssplain", iterations=2)
    assert attr.info["label"] == pred


def test_3d_region_target_uses_the_region_only():
    """A voxel-wise segmenter (1x1x1 convs): the region's CE depends on mask voxels inside the region only,
    so without TV and penalty (rho=0) the mask outside the region keeps its initial value."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv3d(2, 3, 1), nn.Tanh(), nn.Conv3d(3, 2, 1)).double()
    x = torch.rand(2, 2, 6, 6, 6, dtype=torch.float64) + 0.1
    region = torch.zeros(2, 6, 6, 6, dtype=torch.bool)
    region[0, 1:3, 1:3, 1:3] = True
    region[1, 3:5, 2:5, 0:2] = True
    tgt = mx.targets.Region(1, region)
    attr = mx.explain(model, x, "ssplain", target=tgt, mode="reference", rho=0.0, lambda_tv=0.0, iterations=3,
                      support="all")
    intensity = x.mean(1, keepdim=True)
    lo, hi = intensity.flatten(1).amin(1), intensity.flatten(1).amax(1)
    init = (intensity - lo.view(-1, 1, 1, 1, 1)) / (hi - lo).view(-1, 1, 1, 1, 1)
    r = region.unsqueeze(1)
    torch.testing.assert_close(attr.map[~r], init[~r], atol=1e-12, rtol=0)
    assert (attr.map[r] - init[r]).abs().min() > 1e-3   # every region voxel moved
    # info["probability"] is the mean voxel probability of class 1 in the region on M~ * x
    with torch.no_grad():
        p = model(attr.map * x).softmax(1)[:, 1]
    expected = [float(p[i][region[i]].mean()) for i in range(2)]
    np.testing.assert_allclose(attr.info["probability"], expected, atol=1e-12)


def test_3d_textbook_constraints_with_region_target():
    torch.manual_seed(5)
    x = torch.rand(2, 2, 6, 8, 8)
    region = torch.zeros(1, 6, 8, 8, dtype=torch.bool)
    region[0, 2:4, 3:6, 3:6] = True
    attr = mx.explain(_seg3d(), x, "ssplain", target=mx.targets.Region(1, region), alpha=8, iterations=3,
                       mode="textbook")
    assert attr.map.shape == (2, 1, 6, 8, 8)
    assert attr.map.min() >= 0 and attr.map.max() <= 1
    assert ((attr.map != 0).flatten(1).sum(1) <= torch.tensor(attr.info["k"])).all()
    assert attr.info["k"] == [(6 * 8 * 8 - 1) // 8] * 2


def test_score_objective_for_targets_without_a_class():
    torch.manual_seed(6)
    x = torch.rand(2, 1, 8, 8)
    model = _cnn2d(k=4)
    attr = mx.explain(model, x, "ssplain", target=mx.targets.MultiLabel([1, 3]), iterations=2)
    assert np.isnan(attr.info["probability"]).all() and len(attr.info["score"]) == 2
    with pytest.raises(TargetError):
        mx.explain(model, x, "ssplain", target=mx.targets.MultiLabel([1, 3]), objective="ce", iterations=1)


def test_model_left_as_found():
    model = _cnn2d()
    model.train()
    model[0].weight.requires_grad_(True)
    model[4].bias.requires_grad_(False)
    before = [p.clone() for p in model.parameters()]
    mx.explain(model, torch.rand(2, 1, 8, 8), "ssplain", target=0, iterations=2)
    assert model.training and all(m.training for m in model.modules())
    assert model[0].weight.requires_grad and not model[4].bias.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(InputError):  # the guard also restores on error
        mx.explain(model, torch.rand(2, 1, 8, 8), "ssplain", target=0, mode="bogus")
    assert model.training and model[0].weight.requires_grad


def test_keep_top_k_per_sample():
    v = torch.tensor([[5.0, 1.0, 4.0, 3.0], [2.0, 9.0, 7.0, 8.0]]).view(2, 1, 1, 4)
    sup = torch.tensor([[True, True, True, True], [True, False, True, True]]).view(2, 1, 1, 4)
    got = keep_top_k(v, sup, torch.tensor([2, 1])).view(2, 4)
    assert torch.equal(got, torch.tensor([[5.0, 0, 4.0, 0], [0, 0, 0, 8.0]]))


def test_errors():
    model = _cnn2d()
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(InputError, match="support"):
        mx.explain(model, torch.ones(1, 1, 8, 8), "ssplain", target=0)
    with pytest.raises(InputError, match="k"):
        mx.explain(model, x, "ssplain", target=0, k=[3, 4, 5])
    with pytest.raises(InputError):
        mx.explain(model, x, "ssplain", target=0, init="gauss")
    with pytest.raises(InputError):
        mx.explain(model, x, "ssplain", target=0, alpha=0)
    with pytest.raises(TargetError):
        mx.explain(model, x, "ssplain", target=7)
    with pytest.raises(TargetError):  # a region target on a classifier
        mx.explain(model, x, "ssplain", target=mx.targets.Region(0, torch.ones(2, 8, 8, dtype=torch.bool)))
    with pytest.raises(TargetError, match="Region"):  # no predicted class for a segmenter
        mx.explain(_seg3d(), torch.rand(1, 2, 4, 4, 4), "ssplain")
