"""Deletion/insertion curves (SSplain paper section 5), smoothness (normalised TV) and sparseness (Gini)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import medexplain as mx
from medexplain.errors import InputError
from medexplain.metrics import deletion_insertion, smoothness, sparseness


def _linear(n, w1, dtype=torch.float64):
    """Two-class linear model on a flattened image: logit_1 - logit_0 = sum(w1 * x)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(n, 2, bias=False)).to(dtype)
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1] = w1.flatten()
    return model


def _reference_curves(model, x1, score_map, target, fractions):
    """An independent loop: one sample, numpy argsort (ties: no ties in these maps), one row at a time."""
    n = x1[0, 0].numel()
    order = np.argsort(-score_map.flatten().numpy(), kind="stable")
    dele, ins = [], []
    for j in range(fractions):
        top = order[: (j * n) // (fractions - 1)]
        keep = torch.zeros(n, dtype=torch.bool)
        keep[top] = True
        keep = keep.view(1, 1, *x1.shape[2:])
        with torch.no_grad():
            dele.append(model(torch.where(keep, 0.0, x1)).softmax(1)[0, target].item())
            ins.append(model(torch.where(keep, x1, 0.0)).softmax(1)[0, target].item())
    return np.array(dele), np.array(ins)


def test_curves_match_an_independent_loop_2d_batched():
    torch.manual_seed(0)
    w = torch.randn(1, 6, 5, dtype=torch.float64)
    model = _linear(30, w)
    x = torch.rand(3, 1, 6, 5, dtype=torch.float64)
    maps = torch.randn(3, 1, 6, 5, dtype=torch.float64)
    res = deletion_insertion(model, x, maps, [1, 0, 1], fractions=11, chunk_size=7)
    assert res.deletion_probability.shape == (3, 11) and res.fractions.shape == (11,)
    np.testing.assert_allclose(res.fractions.numpy(), [(j * 30 // 10) / 30 for j in range(11)])
    for i, t in enumerate([1, 0, 1]):
        d, ins = _reference_curves(model, x[i:i + 1], maps[i, 0], t, 11)
        np.testing.assert_allclose(res.deletion_probability[i].numpy(), d, atol=1e-12)
        np.testing.assert_allclose(res.insertion_probability[i].numpy(), ins, atol=1e-12)
        np.testing.assert_allclose(res.deletion_auc[i].item(), np.trapezoid(d, res.fractions.numpy()), atol=1e-12)
        # accuracy = (argmax == target) at every step; the score = the target's logit
        with torch.no_grad():
            full = model(x[i:i + 1])[0]
        assert res.deletion_accuracy[i, 0].item() == float(full.argmax().item() == t)
        assert res.deletion_score[i, 0].item() == pytest.approx(full[t].item())
    # chunking and batching do not change anything
    one = deletion_insertion(model, x[1:2], maps[1:2], 0, fractions=11, chunk_size=None)
    torch.testing.assert_close(one.insertion_probability[0], res.insertion_probability[1])


def test_a_faithful_map_beats_its_reverse_3d():
    """Evidence sits in a known block; ranking that block first must give a low deletion and a high
    insertion area, ranking it last the reverse."""
    w = torch.zeros(1, 4, 4, 4, dtype=torch.float64)
    w[0, 1:3, 1:3, 1:3] = 2.0
    model = _linear(64, w)
    x = torch.ones(2, 1, 4, 4, 4, dtype=torch.float64)
    good = w.expand(2, 1, 4, 4, 4).clone() + 0.01 * torch.rand(2, 1, 4, 4, 4, dtype=torch.float64)
    res_good = deletion_insertion(model, x, good, 1)
    res_bad = deletion_insertion(model, x, -good, 1)
    assert (res_good.deletion_auc < res_bad.deletion_auc - 0.3).all()
    assert (res_good.insertion_auc > res_bad.insertion_auc + 0.3).all()
    assert res_good.fractions.numel() == 26
    # endpoints: nothing deleted = the model on x; everything deleted = the model on zeros (p = 0.5)
    torch.testing.assert_close(res_good.deletion_probability[:, -1], torch.full((2,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(res_good.insertion_probability[:, 0], torch.full((2,), 0.5, dtype=torch.float64))
    p_full = torch.sigmoid(torch.tensor(16.0, dtype=torch.float64))
    torch.testing.assert_close(res_good.deletion_probability[:, 0], p_full.expand(2))
    assert res_good.deletion_accuracy[:, 0].tolist() == [1.0, 1.0]
    assert res_good.deletion_accuracy_auc.shape == (2,) and res_good.insertion_accuracy_auc.shape == (2,)


def test_region_target_and_multichannel_maps():
    torch.manual_seed(1)
    seg = nn.Sequential(nn.Conv3d(2, 3, 1)).double()
    x = torch.rand(2, 2, 3, 4, 4, dtype=torch.float64)
    region = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    region[:, 1, 1:3, 1:3] = True
    tgt = mx.targets.Region(2, region)
    maps = torch.rand(2, 2, 3, 4, 4, dtype=torch.float64)   # per-channel maps: ranked by their sum
    res = deletion_insertion(seg, x, maps, tgt, fractions=5)
    with torch.no_grad():
        p = seg(x).softmax(1)[:, 2]
        pred = seg(x).argmax(1) == 2
    expected_p = torch.stack([p[i][region[i]].mean() for i in range(2)])
    torch.testing.assert_close(res.deletion_probability[:, 0], expected_p)
    expected_acc = torch.stack([(pred[i][region[i]].double().mean() > 0.5).double() for i in range(2)])
    torch.testing.assert_close(res.deletion_accuracy[:, 0], expected_acc)
    same = deletion_insertion(seg, x, maps.sum(1, keepdim=True), tgt, fractions=5)
    torch.testing.assert_close(res.deletion_probability, same.deletion_probability)


def test_ties_are_broken_by_a_seeded_permutation():
    w = torch.zeros(1, 8, 8, dtype=torch.float64)
    w[0, :2] = 1.0                                         # evidence in the first rows: raster order would find it
    model = _linear(64, w)
    x = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    flat = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    first = deletion_insertion(model, x, flat, 1, tie_break="first")
    rand = deletion_insertion(model, x, flat, 1, tie_break="random", seed=0)
    assert first.deletion_auc.item() < rand.deletion_auc.item() - 0.1
    again = deletion_insertion(model, x, flat, 1, tie_break="random", seed=0)
    assert torch.equal(rand.deletion_probability, again.deletion_probability)
    with pytest.raises(InputError, match="tie_break"):
        deletion_insertion(model, x, flat, 1, tie_break="any")


def test_model_left_as_found_and_errors():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.train()
    x = torch.rand(2, 1, 6, 6)
    res = deletion_insertion(model, x, torch.rand(2, 1, 6, 6), 1, fractions=3)
    assert model.training and all(p.requires_grad for p in model.parameters())
    again = deletion_insertion(model, x, torch.rand(2, 1, 6, 6), 1, fractions=3)
    assert torch.equal(res.deletion_probability[:, 0], again.deletion_probability[:, 0])  # eval: no dropout
    with pytest.raises(InputError):
        deletion_insertion(model, x, torch.rand(3, 1, 6, 6), 1)
    with pytest.raises(InputError):
        deletion_insertion(model, x, torch.rand(2, 1, 6, 6), 1, fractions=1)
    with pytest.raises(mx.errors.TargetError):
        deletion_insertion(model, x, torch.rand(2, 1, 6, 6), 5)


def test_smoothness_values():
    checker = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    assert smoothness(checker).item() == pytest.approx(4 / 4)  # four unit jumps over four voxels
    ramp = torch.arange(16.0).view(1, 1, 4, 4)
    # min-max -> /15; rows: 12 jumps of 1/15, columns: 12 jumps of 4/15 -> 60/15 over 16 voxels
    assert smoothness(ramp).item() == pytest.approx(60 / 15 / 16)
    assert smoothness(3 * ramp - 7).item() == pytest.approx(smoothness(ramp).item())
    assert smoothness(torch.full((2, 1, 3, 3, 3), 5.0)).tolist() == [0.0, 0.0]
    noise = torch.rand(1, 1, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    smooth = torch.linspace(0, 1, 6).view(1, 1, 6, 1, 1).expand(1, 1, 6, 6, 6)
    assert smoothness(smooth).item() < smoothness(noise).item()
    with pytest.raises(InputError):
        smoothness(torch.rand(4, 4))


def test_sparseness_gini():
    assert sparseness(torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 1, 2, 2)).item() == pytest.approx(0.5)
    assert sparseness(torch.full((1, 1, 3, 3), 2.0)).item() == pytest.approx(0.0, abs=1e-7)
    one_hot = torch.zeros(1, 1, 4, 5)
    one_hot[0, 0, 2, 3] = -3.0                              # |map|: the sign does not matter
    assert sparseness(one_hot).item() == pytest.approx(1 - 1 / 20)
    v = torch.rand(2, 1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    a = np.sort(v[0].flatten().numpy())
    n = a.size
    gini_def = np.abs(a[:, None] - a[None, :]).sum() / (2 * n * a.sum())   # mean-difference definition
    assert sparseness(v)[0].item() == pytest.approx(gini_def, rel=1e-5)
    assert math.isnan(sparseness(torch.zeros(1, 1, 2, 2)).item())


def test_normalize_modes_per_sample_and_per_channel():
    """``mx.normalize`` (medexplain.engine.ops.normalize): minmax, abs, absmax; per sample (start_dim=1) or per
    (sample, channel) (start_dim=2); a constant map becomes 0; absmax keeps the sign."""
    m = torch.tensor([[[[-2.0, 0.0], [1.0, 2.0]]], [[[3.0, 3.0], [3.0, 3.0]]]], dtype=torch.float64)   # (2, 1, 2, 2)
    mm = mx.normalize(m, "minmax")
    torch.testing.assert_close(mm[0, 0], torch.tensor([[0.0, 0.5], [0.75, 1.0]], dtype=torch.float64))
    assert torch.equal(mm[1], torch.zeros_like(m[1]))                       # constant map -> 0, no NaN
    torch.testing.assert_close(mx.normalize(m, "abs"), m.abs())
    am = mx.normalize(m, "absmax")
    torch.testing.assert_close(am[0, 0], torch.tensor([[-1.0, 0.0], [0.5, 1.0]], dtype=torch.float64))
    assert am[0, 0, 0, 0] < 0 and torch.equal(am[1], torch.ones_like(m[1]))  # sign kept; range [-1, 1]
    # per sample: each sample on its own scale (sample 1 x 10 gives the same normalised map)
    two = torch.stack([m[0], 10 * m[0] + 5])
    torch.testing.assert_close(mx.normalize(two, "minmax")[1], mx.normalize(two, "minmax")[0])
    # start_dim=1 pools the channels of a sample; start_dim=2 normalises each channel on its own
    c = torch.stack([m[0, 0], 4 * m[0, 0]]).unsqueeze(0)                   # (1, 2, 2, 2): channel 1 = 4 x channel 0
    per_channel = mx.normalize(c, "minmax", start_dim=2)
    torch.testing.assert_close(per_channel[0, 1], per_channel[0, 0])
    pooled = mx.normalize(c, "minmax", start_dim=1)
    assert pooled[0, 0].max() < 1 and pooled[0, 1].max() == 1
    torch.testing.assert_close(mx.normalize(c, "absmax", start_dim=2)[0, 1], mx.normalize(c, "absmax", start_dim=2)[0, 0])
    three_d = torch.randn(2, 1, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    n3 = mx.normalize(three_d, "minmax")
    assert n3.flatten(1).amin(1).tolist() == [0.0, 0.0] and n3.flatten(1).amax(1).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="unknown normalisation"):
        mx.normalize(m, "zscore")
