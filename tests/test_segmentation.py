"""Instance-level saliency for segmentation (mx.segmentation; Spagnolo et al., seed 001)."""
import csv
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import medexplain as mx
from conftest import TinySegmenter
from medexplain.errors import InputError, OptionError, TargetError
from medexplain.segmentation import (
    context_experiment,
    explain_instances,
    find_instances,
    group_statistics,
    instance_saliency,
    label_map,
    quantify,
    write_csv,
)


def seg_model(nd, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return TinySegmenter(nd).to(dtype).eval()


def img(nd, b=1, size=None, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = size or (12 if nd == 2 else 8)
    return torch.randn((b, 2) + (s,) * nd, generator=g, dtype=dtype)


def box(shape, *slices):
    m = torch.zeros(shape, dtype=torch.bool)
    for sl in slices:
        m[sl] = True
    return m


# ---------------------------------------------------------------- find_instances

def test_2d_diagonal_neighbours_join_with_8_connectivity_but_not_4():
    m = box((10, 10), (slice(1, 4), slice(1, 4)), (slice(4, 7), slice(4, 7)))   # 3x3 squares touching at a corner
    assert [i.size for i in find_instances(m)] == [18]                          # default: 8-connectivity
    for c in (1, 4):
        insts = find_instances(m, connectivity=c)
        assert [i.size for i in insts] == [9, 9]
        assert not (insts[0].mask & insts[1].mask).any()


def test_3d_edge_and_corner_neighbours_follow_6_18_26_connectivity():
    edge = box((9, 9, 9), (slice(1, 3), slice(1, 3), slice(1, 4)), (slice(3, 5), slice(3, 5), slice(1, 4)))
    assert len(find_instances(edge)) == 1                    # default 18: edge-adjacent cubes join
    assert len(find_instances(edge, connectivity=6)) == 2
    corner = box((9, 9, 9), (slice(1, 3),) * 3, (slice(3, 5),) * 3)
    assert len(find_instances(corner)) == 2                  # corner contact only: separate under 18
    assert len(find_instances(corner, connectivity=26)) == 1
    assert len(find_instances(corner, connectivity=3)) == 1  # scipy rank 3 = 26


def test_min_size_drops_small_components_and_probabilities_are_thresholded():
    p = torch.zeros(12, 12)
    p[1:4, 1:3] = 0.9            # 6 voxels
    p[8:10, 8:10] = 0.8          # 4 voxels
    p[6, 1:6] = 0.4              # below threshold
    assert [i.size for i in find_instances(p)] == [6]
    assert [i.size for i in find_instances(p, min_size=4)] == [6, 4]
    assert [i.size for i in find_instances(p, threshold=0.3, min_size=4)] == [6, 5, 4]
    assert find_instances(p, min_size=7) == []


def test_tp_fp_fn_against_a_reference_in_3d():
    s = (12, 12, 12)
    pred = box(s, (slice(1, 4),) * 3, (slice(8, 11), slice(1, 4), slice(1, 4)))         # TP, FP
    ref = box(s, (slice(2, 5),) * 3, (slice(7, 10), slice(7, 10), slice(7, 10)),         # overlaps TP; missed
              (slice(1, 2), slice(10, 12), slice(10, 12)))                                 # 4 voxels: under min_size
    insts = find_instances(pred, reference=ref)
    assert [(i.kind, i.size) for i in insts] == [("TP", 27), ("FP", 27), ("FN", 27)]
    assert torch.equal(insts[2].mask, box(s, (slice(7, 10), slice(7, 10), slice(7, 10))))  # FN footprint = GT
    assert [i.label for i in insts] == [1, 2, 3]
    assert insts[0].centroid == (2.0, 2.0, 2.0)


def test_batches_return_one_list_per_sample_with_sample_indices():
    m = torch.zeros(2, 1, 10, 10)
    m[0, 0, 1:4, 1:4] = 1
    m[1, 0, 5:8, 5:8] = 1
    m[1, 0, 0:2, 0:4] = 1
    out = find_instances(m)                     # (B, 1, H, W): a batch of 2D maps
    assert [len(o) for o in out] == [1, 2]
    assert [i.sample for i in out[1]] == [1, 1]
    vol = find_instances(m[:, 0], spatial_dims=2)
    assert [[i.size for i in o] for o in vol] == [[9], [8, 9]]
    single = find_instances(m[:, 0])            # a 3-D array is one volume by default
    assert isinstance(single, list) and all(isinstance(i, mx.segmentation.Instance) for i in single)
    lab = label_map(out)
    assert lab.shape == (10, 10) and int(lab.max()) == 3
    alias = find_instances(mask_or_prob=m)      # spells the argument mask_or_prob
    assert [[i.size for i in o] for o in alias] == [[i.size for i in o] for o in out]


def test_rule_detection_by_any_predicted_voxel():
    """A reference lesion touched only by a 2-voxel prediction (under min_size): medexplain reports it as
    FN; the IES reference counts it detected (no FN). The small component is no instance in either."""
    p = torch.zeros(12, 12)
    p[1:4, 1:4] = 0.9                                   # lesion A fully predicted: TP
    p[8, 8:10] = 0.9                                    # 2 voxels inside lesion B
    ref = box((12, 12), (slice(1, 4), slice(1, 4)), (slice(7, 10), slice(7, 10)))
    med = find_instances(p, reference=ref)
    assert [(i.kind, i.size) for i in med] == [("TP", 9), ("FN", 9)]
    assert torch.equal(med[1].mask, box((12, 12), (slice(7, 10), slice(7, 10))))
    assert [(i.kind, i.size) for i in find_instances(p, reference=ref, rules="reference")] == [("TP", 9)]
    assert [i.kind for i in find_instances(p, reference=ref, rules="medexplain")] == ["TP", "FN"]   # the default


def test_rule_probability_equal_to_the_threshold():
    """p == threshold is background for medexplain (p > t) and foreground for the reference (its code sets
    p > t to 1 and p < t to 0, leaving p == t non-zero)."""
    p = torch.zeros(12, 12, dtype=torch.float64)
    p[1:4, 1:4] = 0.5
    p[7:10, 7:10] = 0.75
    ref = box((12, 12), (slice(1, 4), slice(1, 4)), (slice(7, 10), slice(7, 10)))
    assert [(i.kind, i.size) for i in find_instances(p, reference=ref)] == [("TP", 9), ("FN", 9)]
    assert [(i.kind, i.size) for i in find_instances(p, reference=ref, rules="reference")] == [("TP", 9), ("TP", 9)]
    assert [i.size for i in find_instances(p, threshold=0.75, rules="reference")] == [9]
    assert find_instances(p, threshold=0.75) == []


def test_rule_reference_binarised_at_one():
    """A soft reference: lesion A at 0.7, lesion B at 1.0, lesion C at 0.7 not predicted. medexplain
    binarises it like the prediction (> 0.5: all three lesions); the IES reference at >= 1.0 (only B), so
    the prediction over A becomes an FP and C is no FN. Integer label maps are the same under both."""
    p = torch.zeros(12, 12)
    p[1:4, 1:4] = p[7:10, 7:10] = 0.9
    gt = torch.zeros(12, 12)
    gt[1:4, 1:4] = 0.7
    gt[7:10, 7:10] = 1.0
    gt[1:4, 8:11] = 0.7
    assert [i.kind for i in find_instances(p, reference=gt)] == ["TP", "TP", "FN"]
    assert [i.kind for i in find_instances(p, reference=gt, rules="reference")] == ["FP", "TP"]
    labels = (gt > 0).long() * 2                        # a label map: every label is a lesion under both rules
    for rules in ("medexplain", "reference"):
        assert [i.kind for i in find_instances(p, reference=labels, rules=rules)] == ["TP", "TP", "FN"]
    with pytest.raises(InputError, match="rules"):
        find_instances(p, rules="ies")


def test_find_instances_errors():
    with pytest.raises(InputError, match="connectivity"):
        find_instances(torch.ones(4, 4), connectivity=6)
    with pytest.raises(InputError, match="reference shape"):
        find_instances(torch.ones(4, 4), reference=torch.ones(5, 4))
    with pytest.raises(InputError, match="NaN"):
        find_instances(torch.full((4, 4), float("nan")))


# ---------------------------------------------------------------- instance_saliency

@pytest.mark.parametrize("nd", [2, 3])
def test_smoothgrad_with_zero_noise_is_the_gradient_of_the_summed_lesion_logits(nd):
    model, x = seg_model(nd), img(nd, b=2)
    s = x.shape[2:]
    insts = [mx.segmentation.Instance(box(s, tuple(slice(1, 3) for _ in s)), None, 8, sample=1),
             mx.segmentation.Instance(box(s, tuple(slice(4, 7) for _ in s)), None, 27, sample=0)]
    maps = instance_saliency(model, x, insts, sigma=0.0, n_samples=3)
    assert maps.shape == (2, 2, *s)
    for k, inst in enumerate(insts):
        xi = x[inst.sample:inst.sample + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad((model(xi)[0, 1] * inst.mask).sum(), xi)
        torch.testing.assert_close(maps[k], g[0], rtol=1e-10, atol=1e-12)


def _lesions(nd, n, size):
    s = (size,) * nd
    out = []
    for k in range(n):
        sl = [slice(0, size)] * nd
        sl[0] = slice(2 * k, 2 * k + 2)
        sl[1] = slice(k % 3, k % 3 + 2)
        out.append(mx.segmentation.Instance(box(s, tuple(sl)), None, 0))
    return out


@pytest.mark.parametrize("nd", [2, 3])
def test_batched_instances_equal_separate_instances_for_every_strategy(nd):
    model, x = seg_model(nd), img(nd, size=8)
    insts = _lesions(nd, 4, 8)
    kw = dict(n_samples=3, sigma=0.1, seed=3)
    sep = torch.cat([instance_saliency(model, x, [i], **kw) for i in insts])
    for strategy in ("batched", "loop", "vmap", "replicate"):
        attr = explain_instances(model, x, insts, strategy=strategy, chunk_size=2, backward_rows=4, **kw)
        torch.testing.assert_close(attr.map, sep, rtol=1e-9, atol=1e-12)
    assert attr.info["n_backward"] == 4 * 3


def test_instance_smoothgrad_matches_the_core_smoothgrad_with_a_region_target():
    model, x = seg_model(3), img(3)
    inst = _lesions(3, 1, 8)[0]
    noise = torch.randn((6, *x.shape[1:]), generator=torch.Generator().manual_seed(0), dtype=x.dtype) * 0.2
    ours = instance_saliency(model, x, [inst], n_samples=6, noise=noise)
    core = mx.explain(model, x, method="smoothgrad", target=mx.targets.Region(1, inst.mask[None]), n_samples=6,
                      noise=noise).map
    torch.testing.assert_close(ours, core, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("nd", [2, 3])
def test_instance_saliency_is_the_registered_method_over_a_regions_target(nd):
    """``explain_instances`` is ``mx.explain`` over a ``Regions`` target: instance SmoothGrad (native: one
    forward per image shared by its instances) and Grad-CAM++ (any method, run on each region's image) give
    the maps of the instance API, and each region's Grad-CAM++ equals Grad-CAM++ of that image alone."""
    model, x = seg_model(nd), img(nd, b=2, size=8)
    s = x.shape[2:]
    insts = [mx.segmentation.Instance(box(tuple(s), tuple(slice(1, 3) for _ in s)), None, 2 ** nd, sample=1),
             mx.segmentation.Instance(box(tuple(s), tuple(slice(4, 7) for _ in s)), None, 3 ** nd, sample=0),
             mx.segmentation.Instance(box(tuple(s), tuple(slice(5, 8) for _ in s)), None, 3 ** nd, sample=1)]
    regions = mx.targets.Regions(1, torch.stack([i.mask for i in insts]), [i.sample for i in insts])
    for aggregate in ("mean", "max"):
        attr = mx.explain(model, x, "instance_smoothgrad", target=regions, aggregate=aggregate, n_samples=3, seed=2)
        old = explain_instances(model, x, insts, aggregate=aggregate, n_samples=3, seed=2)
        assert attr.method == old.method == "instance_smoothgrad" and attr.map.shape == (3, 2, *s)
        torch.testing.assert_close(attr.map, old.map, rtol=0, atol=0)
        assert (attr.info["n_forward"], attr.info["n_backward"]) == (old.info["n_forward"], old.info["n_backward"])
    cam = mx.explain(model, x, "gradcam++", target=regions, layer="body.2")
    assert cam.target is regions and cam.map.shape == (3, 1, *s)
    torch.testing.assert_close(cam.map, explain_instances(model, x, insts, method="gradcam++", layer="body.2").map)
    for k, inst in enumerate(insts):
        alone = mx.explain(model, x[inst.sample:inst.sample + 1], "gradcam++", layer="body.2",
                           target=mx.targets.Region(1, inst.mask[None])).map
        torch.testing.assert_close(cam.map[k:k + 1], alone)
    # a Region target is one region per sample
    one = mx.explain(model, x, "instance_smoothgrad", target=mx.targets.Region(1, insts[0].mask[None]), n_samples=2)
    two = mx.explain(model, x, "instance_smoothgrad", n_samples=2,
                     target=mx.targets.Regions(1, insts[0].mask[None].expand(2, *s), [0, 1]))
    torch.testing.assert_close(one.map, two.map, rtol=0, atol=0)
    with pytest.raises(TargetError, match="image"):
        mx.explain(model, x, "gradcam++", target=mx.targets.Regions(1, insts[0].mask[None], [2]))
    assert "instance_smoothgrad" not in mx.available_methods(model=make_classifier(nd), x=x[:1])


def make_classifier(nd):
    from conftest import make
    return make("cls", nd)


def test_noise_sd_is_a_fraction_of_the_first_channel_range_for_every_channel():
    model, x = seg_model(2), img(2)
    x[:, 1] *= 100.0                                     # a huge second channel must not change the noise sd
    inst = _lesions(2, 1, 12)[0]
    from medexplain.engine.ops import NoiseSource  # the one noise rule; instance saliency uses channel0
    eps = NoiseSource(x[:1], 400, 0.05, 0, scale="channel0").take(400)[:, 0]
    sd = 0.05 * float(x[0, 0].max() - x[0, 0].min())
    assert abs(float(eps[:, 0].std()) / sd - 1) < 0.02 and abs(float(eps[:, 1].std()) / sd - 1) < 0.02
    a = instance_saliency(model, x, [inst], n_samples=4, seed=5)
    b = instance_saliency(model, x, [inst], n_samples=4, seed=5, chunk_size=1)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)       # chunking does not change the noise
    given = NoiseSource(x[:1], 4, 0.05, 5, scale="channel0").take(4)[:, 0]
    torch.testing.assert_close(a, instance_saliency(model, x, [inst], n_samples=4, noise=given), rtol=1e-10, atol=1e-12)


class Taps(nn.Module):
    """Lesion logit z_1(i, j) = 1 x(i, j-1) - 3 x(i, j) + 2 x(i, j+1) of channel 0 (channel 1 unused)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, (1, 3), padding=(0, 1), bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[1, 0, 0] = torch.tensor([1.0, -3.0, 2.0])
            self.conv.weight[0, 1, 0, 1] = 1.0

    def forward(self, x):
        return self.conv(x)


def test_max_aggregation_on_a_hand_checked_case():
    model = Taps().double().eval()
    x = img(2, size=6)
    inst = mx.segmentation.Instance(box((6, 6), (slice(1, 2), slice(2, 4))), None, 2)   # voxels (1,2), (1,3)
    got = instance_saliency(model, x, [inst], aggregate="max", n_samples=3, sigma=0.1)[0]
    # voxel (1,2) gives taps 1, -3, 2 at columns 1, 2, 3; voxel (1,3) at columns 2, 3, 4.
    # Largest magnitude per input voxel: col1 1; col2 max(|-3|, |1|) -> -3; col3 max(|2|, |-3|) -> -3; col4 2
    want = torch.zeros(2, 6, 6, dtype=x.dtype)
    want[0, 1, 1:5] = torch.tensor([1.0, -3.0, -3.0, 2.0])
    torch.testing.assert_close(got, want)
    mean = instance_saliency(model, x, [inst], n_samples=2)[0]
    torch.testing.assert_close(mean[0, 1, 1:5], torch.tensor([1.0, -2.0, -1.0, 2.0], dtype=x.dtype))


def test_max_aggregation_equals_a_per_voxel_loop_on_a_nonlinear_model():
    model, x = seg_model(2), img(2, b=2, size=8)
    insts = [mx.segmentation.Instance(box((8, 8), (slice(2, 4), slice(2, 5))), None, 6, sample=1),
             mx.segmentation.Instance(box((8, 8), (slice(5, 7), slice(5, 7))), None, 4, sample=1)]
    noise = torch.randn((2, 2, 8, 8), generator=torch.Generator().manual_seed(1), dtype=x.dtype) * 0.3
    attr = explain_instances(model, x, insts, aggregate="max", n_samples=2, noise=noise, backward_rows=3)
    assert attr.info["n_backward"] == 2 * (6 + 4)
    for k, inst in enumerate(insts):
        want = torch.zeros_like(x[0])
        for n in range(2):
            xn = (x[1] + noise[n])[None].requires_grad_(True)
            out = model(xn)[0, 1]
            best = torch.zeros_like(x[0])
            for v in inst.mask.nonzero():
                (g,) = torch.autograd.grad(out[tuple(v)], xn, retain_graph=True)
                best = torch.where(g[0].abs() > best.abs(), g[0], best)
            want += best
        torch.testing.assert_close(attr.map[k], want / 2, rtol=1e-10, atol=1e-12)


def test_gradcam_pp_per_instance_on_a_monai_unet_and_the_model_is_left_as_found():
    from monai.networks.nets import UNet
    torch.manual_seed(0)
    model = UNet(3, 2, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=0).train()
    x = torch.randn(1, 2, 8, 8, 8)
    assert mx.segmentation.decoder_layer(model, x) == "model.1.submodule.2.conv"   # the reference's layer
    insts = [mx.segmentation.Instance(box((8,) * 3, (slice(1, 3),) * 3), None, 8),
             mx.segmentation.Instance(box((8,) * 3, (slice(5, 8),) * 3), None, 27)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attr = explain_instances(model, x, insts, method="gradcam++")
    assert attr.map.shape == (2, 1, 8, 8, 8) and attr.info["layer"] == "model.1.submodule.2.conv"
    ref = mx.explain(model, x, method="gradcam++", layer="model.1.submodule.2.conv",
                     target=mx.targets.Region(1, insts[1].mask[None])).map
    torch.testing.assert_close(attr.map[1:], ref)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class LesionScore(nn.Module):
    """The lesion's summed class-1 logits as the single output MONAI's CAMs explain (the IES reference's score)."""

    def __init__(self, net, mask):
        super().__init__()
        self.net, self.mask = net, mask

    def forward(self, x):
        return (self.net(x)[:, 1] * self.mask).flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("nd", [2, 3])
def test_gradcam_pp_monai_variant_equals_monai_gradcampp_on_the_lesion_score(nd):
    """``variant="monai"`` is MONAI's GradCAMpp (what the IES reference code calls) with the lesion's summed
    logits as the score: MONAI run on a wrapper whose single output is that sum. The layer runs on the
    input grid, so no upsampling rule enters the comparison. The paper's formula (default) differs."""
    from monai.visualize import GradCAMpp

    model, x = seg_model(nd), img(nd)
    s = x.shape[2:]
    inst = mx.segmentation.Instance(box(tuple(s), tuple(slice(2, 5) for _ in s)), None, 3 ** nd)
    ref = GradCAMpp(LesionScore(model, inst.mask), target_layers="net.body.2",
                    postprocessing=lambda t: t)(x, class_idx=0)
    attr = explain_instances(model, x, [inst], method="gradcam++", variant="monai", layer="body.2")
    assert attr.info["variant"] == "monai"
    torch.testing.assert_close(attr.map, ref.to(attr.map.dtype), rtol=1e-6, atol=1e-9)
    paper = instance_saliency(model, x, [inst], method="gradcam++", layer="body.2")
    assert (paper - attr.map).abs().max() > 0.1 * attr.map.abs().max()
    with pytest.raises(OptionError, match="variant must be one of"):     # the registered method's choices
        instance_saliency(model, x, [inst], method="gradcam++", variant="gradcam")
    with pytest.raises(OptionError, match="smoothgrad"):
        instance_saliency(model, x, [inst], variant="monai")


def test_instance_saliency_errors_leave_the_model_as_found():
    model, x = seg_model(2).train(), img(2)
    inst = _lesions(2, 1, 12)[0]
    with pytest.raises(TargetError, match="out of range"):
        instance_saliency(model, x, [inst], channel=5, n_samples=1)
    assert model.training and all(p.requires_grad for p in model.parameters())
    with pytest.raises(InputError, match="sample"):
        instance_saliency(model, x, [mx.segmentation.Instance(inst.mask, None, 4, sample=3)])
    with pytest.raises(InputError, match="output grid"):
        instance_saliency(model, x, [mx.segmentation.Instance(torch.ones(5, 5, dtype=torch.bool), None, 25)],
                          n_samples=1)
    with pytest.raises(InputError, match="no instances"):
        instance_saliency(model, x, [])
    with pytest.raises(OptionError, match="max"):
        instance_saliency(model, x, [inst], method="gradcam++", aggregate="max")


# ---------------------------------------------------------------- quantify, statistics, context

def test_quantify_on_a_constructed_map():
    s = (9, 9, 9)
    inst = mx.segmentation.Instance(box(s, (slice(3, 6),) * 3), "TP", 27)
    d1 = torch.from_numpy(__import__("scipy").ndimage.binary_dilation(
        inst.mask.numpy(), structure=mx.segmentation.structure(3)))
    ring1 = d1 & ~inst.mask
    m = torch.zeros(1, 2, *s)
    m[0, 1][inst.mask] = 2.0
    m[0, 1][ring1] = -0.5
    m[0, 0][0, 0, 0] = 3.0                       # a little saliency on channel 0, far away
    m[0, 1][4, 4, 4] = 5.0                       # the peak
    (row,) = quantify([inst], m, rings=2, channel_names=["T1", "FLAIR"])
    n1 = int(ring1.sum())
    assert row["kind"] == "TP" and row["size"] == 27
    assert row["sum_FLAIR"] == pytest.approx(26 * 2.0 + 5.0) and row["sum_T1"] == 0.0
    total1 = 26 * 2.0 + 5.0 + 0.5 * n1
    assert row["channel_share_FLAIR"] == pytest.approx(total1 / (total1 + 3.0))
    assert row["inside_share_FLAIR"] == pytest.approx(57.0 / total1)
    assert row["peak_FLAIR"] == 5.0 and row["ring0_FLAIR"] == pytest.approx(57.0 / 27)
    assert row["ring1_FLAIR"] == pytest.approx(-0.5) and row["ring2_FLAIR"] == 0.0
    assert math.isnan(row["inside_share_T1"]) is False and row["inside_share_T1"] == 0.0


def test_group_statistics_kruskal_and_bonferroni_mann_whitney(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"kind": k, "size": 10, "score": float(v)} for k, mu in (("TP", 2.0), ("FP", 0.0), ("FN", -1.0))
            for v in rng.normal(mu, 0.5, 8)]
    (res,) = group_statistics(rows, "score")
    tp, fp, fn = ([r["score"] for r in rows if r["kind"] == k] for k in ("TP", "FP", "FN"))
    assert res["kruskal_p"] == pytest.approx(stats.kruskal(tp, fp, fn).pvalue)
    p = stats.mannwhitneyu(tp, fp, alternative="two-sided").pvalue
    assert res["p_TP_FP"] == pytest.approx(p) and res["p_bonf_TP_FP"] == pytest.approx(min(1, 3 * p))
    assert res["n_TP"] == 8 and res["median_FN"] == pytest.approx(np.median(fn))
    (only_tp,) = group_statistics([r for r in rows if r["kind"] != "FN"], "score")
    assert math.isnan(only_tp["p_TP_FN"]) and only_tp["p_bonf_TP_FP"] == pytest.approx(p)   # one pair tested
    write_csv(rows, tmp_path / "t.csv")
    back = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert len(back) == 24 and back[0]["kind"] == "TP"


class BoxSum(nn.Module):
    """Lesion logit = 3x3 box sum of channel 1 minus 4: a voxel needs its neighbours to be detected."""

    def forward(self, x):
        z = nn.functional.avg_pool2d(x[:, 1:2], 3, stride=1, padding=1, count_include_pad=True) * 9 - 4
        return torch.cat([torch.zeros_like(z), z], 1)


def test_context_experiment_needs_context_and_converges_to_the_full_input():
    x = torch.zeros(1, 2, 11, 11, dtype=torch.float64)
    x[0, 1, 3:8, 3:8] = 1.0
    inst = mx.segmentation.Instance(box((11, 11), (slice(5, 6), slice(5, 6))), None, 1)
    rows = context_experiment(BoxSum(), x, inst, d_max=6, threshold=0.5)
    assert [r["d"] for r in rows] == list(range(7))
    assert [r["kept_voxels"] for r in rows] == [1, 9, 25, 49, 81, 121, 121]
    assert [r["detected"] for r in rows] == [False, True, True, True, True, True, True]
    full = torch.softmax(BoxSum()(x), 1)[0, 1, 5, 5].item()
    assert rows[-1]["mean_probability"] == pytest.approx(full) and rows[0]["mean_probability"] < 0.5


# ---------------------------------------------------------------- CLI

def test_cli_writes_table_and_maps_on_the_input_affine(tmp_path):
    from typer.testing import CliRunner

    from medexplain.cli import app
    model = nn.Conv3d(2, 2, 3, padding=1).eval()      # lesion logit = 2 x FLAIR(v) - 3 + a little T1 context
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.0, -3.0]))
        model.weight[1, 1, 1, 1, 1] = 2.0
        model.weight[1, 0] = 0.01
    torch.jit.save(torch.jit.trace(model, torch.zeros(1, 2, 8, 8, 8)), tmp_path / "m.pt")
    x = torch.zeros(2, 8, 8, 8)
    x[1, 1:4, 1:4, 1:4] = 3.0
    x[1, 5:8, 5:8, 5:8] = 3.0
    with torch.no_grad():
        prob = torch.softmax(model(x[None]), 1)[0, 1]
    n_expected = len(find_instances(prob))
    affine = np.diag([1.2, 0.9, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.moveaxis(x.numpy(), 0, -1), affine), str(tmp_path / "img.nii.gz"))
    res = CliRunner().invoke(app, ["instances", str(tmp_path / "img.nii.gz"), "--model", str(tmp_path / "m.pt"),
                                   "--out", str(tmp_path / "out"), "--n-samples", "2", "--channel-names", "T1,FLAIR",
                                   "--context", "2"])
    assert res.exit_code == 0, res.output
    assert n_expected == 2
    rows = list(csv.DictReader(open(tmp_path / "out" / "instances.csv")))
    assert len(rows) == n_expected and "channel_share_FLAIR" in rows[0]
    maps = sorted((tmp_path / "out").glob("instance_0*.nii.gz"))
    assert len(maps) == n_expected
    im = nib.load(str(maps[0]))
    assert im.shape == (8, 8, 8, 2) and np.allclose(im.affine, affine)
    assert np.allclose(nib.load(str(tmp_path / "out" / "instances.nii.gz")).affine, affine)
    assert len(list(csv.DictReader(open(tmp_path / "out" / "context.csv")))) == 3 * n_expected
    # the same volume as one file per channel gives the same table
    for c, name in enumerate(("t1", "flair")):
        nib.save(nib.Nifti1Image(x[c].numpy(), affine), str(tmp_path / f"{name}.nii.gz"))
    res = CliRunner().invoke(app, ["instances", str(tmp_path / "t1.nii.gz"), str(tmp_path / "flair.nii.gz"),
                                   "--model", str(tmp_path / "m.pt"), "--out", str(tmp_path / "out2"),
                                   "--n-samples", "2", "--channel-names", "T1,FLAIR"])
    assert res.exit_code == 0, res.output
    rows2 = list(csv.DictReader(open(tmp_path / "out2" / "instances.csv")))
    assert [r["sum_FLAIR"] for r in rows2] == [r["sum_FLAIR"] for r in rows]


@pytest.mark.parametrize("nd", [2, 3])
def test_instance_saliency_monai_variant_equals_monai_gradcampp_at_half_resolution(nd):
    """At the default layer (the decoder at half resolution) the upsampling enters: ``variant="monai"`` implies
    MONAI's bilinear / trilinear placement, so the instance map is MONAI's ``GradCAMpp`` on the lesion score
    (it differed by 34-81% of the map maximum when CAMs defaulted to aligned upsampling)."""
    from monai.networks.nets import UNet
    from monai.visualize import GradCAMpp

    torch.manual_seed(0)
    model = UNet(nd, 2, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=0).double().eval()
    x = img(nd, size=8)
    inst = mx.segmentation.Instance(box((8,) * nd, tuple(slice(2, 6) for _ in range(nd))), None, 4 ** nd)
    attr = explain_instances(model, x, [inst], method="gradcam++", variant="monai")
    assert attr.info["layer"] == "model.1.submodule.2.conv" and attr.info["upsample"] == "bilinear"
    ref = GradCAMpp(LesionScore(model, inst.mask), target_layers="net.model.1.submodule.2.conv",
                    postprocessing=lambda t: t)(x, class_idx=0)
    torch.testing.assert_close(attr.map, ref.to(attr.map.dtype), rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    aligned = instance_saliency(model, x, [inst], method="gradcam++", variant="monai", upsample="aligned")
    assert (aligned - attr.map).abs().max() > 0.1 * attr.map.abs().max()          # the upsampling matters here
    with pytest.raises(OptionError, match="do not apply to method 'instance_smoothgrad'"):
        instance_saliency(model, x, [inst], upsample="bilinear")
    with pytest.raises(InputError, match="upsample must be"):
        instance_saliency(model, x, [inst], method="gradcam++", upsample="nearest")
