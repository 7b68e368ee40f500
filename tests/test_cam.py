"""The CAM family (``methods/cam.py``) and where CAMs look (``methods/cam_layers.py``): receptive-field
aligned upsampling (exact cell centres, the impulse test), layer layouts (channels-last, tokens,
``reshape=``), default layers on MONAI networks, layers called several times, equality with
pytorch-grad-cam 1.5.7 and MONAI, and every member leaving the model as found."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import medexplain as mx
from conftest import assert_untouched, conv, import_pytorch_grad_cam, snapshot
from medexplain import errors
from medexplain.engine.targets import Function, Region
from medexplain.methods.cam_layers import layer_plan, upsample_cells

FAMILY = ["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "gradcam_elementwise", "eigencam", "scorecam",
          "ablationcam"]


def peak(m):
    """Index of the first maximum of ``m[0, 0]`` per axis."""
    a = m[0, 0]
    return [int(v) for v in np.unravel_index(int(a.flatten().argmax()), tuple(a.shape))]


# ------------------------------------------------------------------------- aligned upsampling: the impulse
class Stride2Stack(nn.Module):
    """Three stride-2, padding-1, 3x3 convolutions with uniform positive kernels (a symmetric receptive
    field of radius 7 px, so an impulse at a cell centre excites that cell only), average pooling and a
    positive linear head."""

    def __init__(self, nd):
        super().__init__()
        C = conv(nd)
        self.features = nn.Sequential(C(1, 2, 3, 2, 1, bias=False), nn.ReLU(), C(2, 2, 3, 2, 1, bias=False), nn.ReLU(),
                                      C(2, 3, 3, 2, 1, bias=False), nn.ReLU())
        for i, m in enumerate(m for m in self.features if isinstance(m, C)):
            nn.init.constant_(m.weight, 0.1 * (i + 1))
        self.pool = nn.AdaptiveAvgPool2d(1) if nd == 2 else nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


@pytest.mark.parametrize("nd", [2, 3])
def test_aligned_cam_peaks_on_the_impulse_bilinear_does_not(nd):
    """Cell i of three stride-2 padding-1 convolutions is centred at input pixel 8 i; bilinear upsampling
    (MONAI, pytorch-grad-cam) puts it at 8 i + 3.5. An impulse at a cell centre: the aligned peak of every
    member lies on it (distance 0 on every axis), the bilinear peak 3-4 px away."""
    model = Stride2Stack(nd).double().eval()
    where = [8, 16, 24][:nd]
    x = torch.zeros((1, 1) + (32,) * nd, dtype=torch.float64)
    x[(0, 0, *where)] = 1.0
    plan = layer_plan(model, x, "features")
    assert plan.centres == ((0.0, 8.0),) * nd and plan.geometry.startswith("exact")
    for method in FAMILY:
        aligned = mx.explain(model, x, method, target=0, layer="features").map
        bilinear = mx.explain(model, x, method, target=0, layer="features", upsample="bilinear").map
        assert aligned.shape == x.shape and aligned.max() > 0, method
        assert all(abs(p - w) <= 0.5 for p, w in zip(peak(aligned), where)), (method, peak(aligned))
        assert any(abs(p - w) > 0.5 for p, w in zip(peak(bilinear), where)), (method, peak(bilinear))
        assert all(p - w in (3, 4) for p, w in zip(peak(bilinear), where)), method   # 3.5 px: a tie of 2 pixels


# ----------------------------------------------------------------- exact cell centres from the graph
class Linear(nn.Module):
    """A linear network of uniform positive kernels (every receptive field symmetric about its centre)."""

    def __init__(self, *mods):
        super().__init__()
        self.body = nn.Sequential(*mods)
        for m in self.body.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.constant_(m.weight, 1.0)

    def forward(self, x):
        return self.body(x).mean((2, 3) if x.ndim == 4 else (2, 3, 4))


STACKS = {
    "conv-pool-dilated": lambda: Linear(nn.Conv2d(1, 1, 5, bias=False), nn.Conv2d(1, 1, 3, 2, 1, bias=False),
                                        nn.AvgPool2d(2), nn.Conv2d(1, 1, 3, 3, 0, dilation=2, bias=False)),
    # (the transposed convolution last: its outputs receive one or two inputs, so a later mixing of them
    # would weight centroids by those unequal masses)
    "pad-upsample-transposed": lambda: Linear(nn.ConstantPad2d((2, 0, 1, 3), 0.0), nn.Conv2d(1, 1, 3, 2, 1, bias=False),
                                              nn.Conv2d(1, 1, 4, 2, 1, bias=False),
                                              nn.Upsample(scale_factor=2, mode="bilinear"),
                                              nn.Upsample(scale_factor=3, mode="bilinear", align_corners=True),
                                              nn.ConvTranspose2d(1, 1, 3, 2, 1, bias=False)),
    "3d-conv-upsample": lambda: Linear(nn.Conv3d(1, 1, 3, 2, 0, bias=False), nn.AvgPool3d(3, 2, 1),
                                       nn.Upsample(scale_factor=2, mode="trilinear")),
}


@pytest.mark.parametrize("stack", list(STACKS))
def test_cell_centres_are_the_centroids_of_the_receptive_fields(stack):
    """The geometry read from the graph (strides, paddings, dilations, kernels, transposed convolutions,
    upsampling, padding) equals, for interior cells, the centroid of d cell / d input of a network whose
    kernels are uniform and positive (so each receptive field is symmetric about its true centre)."""
    model = STACKS[stack]().double().eval()
    nd = 3 if stack.startswith("3d") else 2
    x = torch.zeros((1, 1) + ((40,) * 3 if nd == 3 else (96, 90)), dtype=torch.float64, requires_grad=True)
    plan = layer_plan(model, x.detach(), "body")
    assert plan.geometry.startswith("exact")
    a = model.body(x)
    grid = a.shape[2:]
    for cell in [tuple(g // 2 + d for g in grid) for d in (-1, 0, 1)]:
        (g,) = torch.autograd.grad(a[(0, 0, *cell)], x, retain_graph=True)
        g = g[0, 0]
        for ax in range(nd):
            prof = g.sum([d for d in range(nd) if d != ax])
            centroid = float((prof * torch.arange(len(prof), dtype=prof.dtype)).sum() / prof.sum())
            offset, step = plan.centres[ax]
            assert abs(centroid - (offset + step * cell[ax])) < 1e-9, (stack, cell, ax, centroid, plan.centres)


def test_bilinear_is_f_interpolate_and_aligned_resamples_at_the_centres():
    cells = torch.randn(2, 1, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(upsample_cells(cells, (32, 40), mode="bilinear"),
                               torch.nn.functional.interpolate(cells, size=(32, 40), mode="bilinear", align_corners=False))
    # the bilinear placement, given as centres, is the same resampling
    same = upsample_cells(cells, (32, 40), ((3.5, 8.0), (3.5, 8.0)), "aligned")
    torch.testing.assert_close(same, upsample_cells(cells, (32, 40), mode="bilinear"))
    up = upsample_cells(cells, (32, 40), ((0.0, 8.0), (2.0, 8.0)), "aligned")
    torch.testing.assert_close(up[:, :, ::8, 2::8], cells)                # the cell values sit at their centres
    torch.testing.assert_close(up[:, :, 4, 2::8], (cells[:, :, 0] + cells[:, :, 1]) / 2)   # halfway: the mean
    torch.testing.assert_close(up[:, :, 30, 0], cells[:, :, 3, 0])        # clamped beyond the outermost centres


def test_bilinear_reproduces_monai_on_a_stride_2_layer_and_aligned_differs():
    from monai.visualize import GradCAM, GradCAMpp
    model = Stride2Stack(2).double().eval()
    torch.manual_seed(0)
    for m in model.features:
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.2, 0.3)
    x = torch.randn(1, 1, 32, 32, dtype=torch.float64)
    ident = lambda m: m  # noqa: E731
    ref = GradCAM(model, target_layers="features", postprocessing=ident)(x, class_idx=1)
    ours = mx.explain(model, x, "gradcam", target=1, layer="features", upsample="bilinear").map
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-12)
    ref = GradCAMpp(model, target_layers="features", postprocessing=ident)(x, class_idx=1)
    ours = mx.explain(model, x, "gradcam++", target=1, layer="features", upsample="bilinear", variant="monai").map
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-12)
    aligned = mx.explain(model, x, "gradcam", target=1, layer="features").map
    assert (aligned - mx.explain(model, x, "gradcam", target=1, layer="features", upsample="bilinear").map).abs().max() > 1e-3


# ------------------------------------------------------------------------------- pytorch-grad-cam 1.5.7
class HeadNet(nn.Module):
    """Stride-1 then stride-2 convolutions and a non-linear 1x1 head, so gradients vary over the cells."""

    def __init__(self, nd=2):
        super().__init__()
        C = conv(nd)
        self.features = nn.Sequential(C(2, 4, 3, 1, 1), nn.ReLU(), C(4, 6, 3, 2, 1), nn.ReLU())
        self.head = nn.Sequential(C(6, 5, 1), nn.Tanh())
        self.pool = nn.AdaptiveAvgPool2d(1) if nd == 2 else nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.pool(self.head(self.features(x))).flatten(1))


def _minmax(m):
    m = m[:, 0].numpy()
    lo = m.reshape(len(m), -1).min(1).reshape(-1, *[1] * (m.ndim - 1))
    hi = m.reshape(len(m), -1).max(1).reshape(-1, *[1] * (m.ndim - 1))
    return (m - lo) / (hi - lo)


def test_every_member_equals_pytorch_grad_cam_in_2d():
    """upsample="bilinear", min-max normalised maps, to 1e-5. Eigen-CAM is returned signed while
    pytorch-grad-cam rectifies before resizing, so it is compared at a full-resolution layer and up to the
    SVD's arbitrary sign; Score-CAM's masks use pytorch-grad-cam's placement (``UpsamplingBilinear2d``:
    align_corners=True); Grad-CAM++ its +1e-6 (``variant="pytorch_grad_cam"``)."""
    pgc = import_pytorch_grad_cam()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    torch.manual_seed(0)
    net = HeadNet().double().eval()
    x = torch.randn(2, 2, 16, 16, dtype=torch.float64)
    t = [1, 2]
    pairs = {"gradcam": (pgc.GradCAM, {}), "gradcam++": (pgc.GradCAMPlusPlus, {"variant": "pytorch_grad_cam"}),
             "hirescam": (pgc.HiResCAM, {}), "xgradcam": (pgc.XGradCAM, {}), "layercam": (pgc.LayerCAM, {}),
             "gradcam_elementwise": (pgc.GradCAMElementWise, {}), "eigencam": (pgc.EigenCAM, {}),
             "scorecam": (pgc.ScoreCAM, {"mask_upsample": "align_corners"}), "ablationcam": (pgc.AblationCAM, {})}
    assert set(pairs) == set(FAMILY)
    maps = {}
    for name, (cls, opts) in pairs.items():
        layer = "features.1" if name == "eigencam" else "features.3"
        theirs_model = copy.deepcopy(net)   # pytorch-grad-cam's AblationCAM swaps the layer in and out
        with cls(theirs_model, [dict(theirs_model.named_modules())[layer]]) as cam:
            if name == "scorecam":
                cam.batch_size = 4
            ref = cam(x.clone(), [ClassifierOutputTarget(c) for c in t])
        ours = mx.explain(net, x, name, target=t, layer=layer, upsample="bilinear", **opts).map
        assert ours.shape == (2, 1, 16, 16) and float(ours.amax()) > 0
        if name == "eigencam":
            err = min(np.abs(_minmax(torch.relu(s * ours)) - ref).max() for s in (1.0, -1.0))
        else:
            err = np.abs(_minmax(ours) - ref).max()
        assert err <= 1e-5, (name, err)
        maps[name] = ours
    # the members really differ from each other here (the comparison is not the same map nine times)
    for a in ("hirescam", "xgradcam", "layercam", "scorecam", "ablationcam", "gradcam++"):
        assert np.abs(_minmax(maps[a]) - _minmax(maps["gradcam"])).max() > 1e-2, a


@pytest.mark.parametrize("method", FAMILY)
def test_every_member_runs_in_3d_batched_with_region_and_class_targets(method):
    """Including Score-CAM and Ablation-CAM, which fail on 5-D input in pytorch-grad-cam 1.5.7."""
    torch.manual_seed(1)
    net = HeadNet(3).double().eval()
    x = torch.randn(3, 2, 8, 8, 8, dtype=torch.float64)
    before = snapshot(net)
    full = mx.explain(net, x, method, target=[0, 2, 1], layer="features.3", chunk_size=5) if method in (
        "scorecam", "ablationcam") else mx.explain(net, x, method, target=[0, 2, 1], layer="features.3")
    parts = torch.cat([mx.explain(net, x[i:i + 1], method, target=[0, 2, 1][i], layer="features.3").map for i in range(3)])
    assert full.map.shape == (3, 1, 8, 8, 8) and torch.isfinite(full.map).all() and full.map.abs().amax() > 0
    torch.testing.assert_close(full.map, parts, rtol=1e-9, atol=1e-12)
    assert_untouched(net, before)
    seg = nn.Sequential(nn.Conv3d(2, 4, 3, 2, 1), nn.ReLU(), nn.ConvTranspose3d(4, 4, 2, 2), nn.ReLU(),
                        nn.Conv3d(4, 2, 1)).double().eval()
    mask = torch.zeros(3, 8, 8, 8, dtype=torch.bool)
    mask[:, 2:5, 2:5, 2:5] = True
    m = mx.explain(seg, x, method, target=Region(1, mask)).map
    assert m.shape == (3, 1, 8, 8, 8) and torch.isfinite(m).all()


# --------------------------------------------------------------------------------------- layer layouts
class ToLast(nn.Module):
    def forward(self, t):
        return t.movedim(1, -1)


class ToFirst(nn.Module):
    def forward(self, t):
        return t.movedim(-1, 1)


class ToTokens(nn.Module):
    def forward(self, t):
        return t.flatten(2).transpose(1, 2)


class FromTokens(nn.Module):
    def __init__(self, grid):
        super().__init__()
        self.grid = grid

    def forward(self, t):
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *self.grid)


class Layouts(nn.Module):
    """One feature map three ways: channels-first (``act``), channels-last (``last``), tokens (``tokens``);
    5 channels on a 4-cell grid, so the channel axis is not ambiguous."""

    def __init__(self, nd):
        super().__init__()
        C = conv(nd)
        self.conv, self.act = C(2, 5, 3, 2, 1), nn.ReLU()
        self.last, self.first, self.tokens, self.back = ToLast(), ToFirst(), ToTokens(), FromTokens((4,) * nd)
        self.head = nn.Sequential(C(5, 3, 1), nn.Tanh())
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        h = self.back(self.tokens(self.first(self.last(self.act(self.conv(x))))))
        return self.fc(self.head(h).flatten(2).mean(2))


@pytest.mark.parametrize("nd", [2, 3])
def test_channels_last_and_token_layers_give_the_channels_first_maps(nd):
    """Every member at the channels-last and the token view of a feature map equals the member at the
    channels-first map (same upsampling), the layout detected or given, and a reshape= callable too;
    forcing the wrong layout gives a different map (the silent misreading the detection prevents)."""
    torch.manual_seed(2)
    model = Layouts(nd).double().eval()
    x = torch.randn(2, 2, *(8,) * nd, dtype=torch.float64)
    assert layer_plan(model, x, "last").view.kind == "channels_last"
    assert layer_plan(model, x, "tokens").view.kind == "tokens"
    for method in FAMILY:
        ref = mx.explain(model, x, method, target=[1, 0], layer="act", upsample="bilinear").map
        for layer, opts in [("last", {}), ("last", {"layout": "channels_last"}), ("tokens", {}),
                            ("tokens", {"reshape": lambda t: t.transpose(1, 2).reshape(t.shape[0], 5, *(4,) * nd)})]:
            got = mx.explain(model, x, method, target=[1, 0], layer=layer, upsample="bilinear", **opts).map
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12, msg=f"{method} at {layer} {opts}")
    wrong = mx.explain(model, x, "gradcam", target=[1, 0], layer="last", layout="channels_first", upsample="bilinear").map
    assert (wrong - mx.explain(model, x, "gradcam", target=[1, 0], layer="act", upsample="bilinear").map).abs().max() > 1e-3


def test_token_count_without_a_grid_asks_for_reshape_and_options_are_checked():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            t = self.proj(x.flatten(2)[:, :, :7].transpose(1, 2))   # 7 tokens: no patch grid of 8x8
            return t.mean(1)[:, :2]

    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(errors.UnsupportedModelError, match="reshape="):
        mx.explain(Odd(), x, "gradcam", target=0, layer="proj")
    model = Layouts(2).eval()
    with pytest.raises(errors.MedexplainError, match="upsample"):
        mx.explain(model, torch.randn(1, 2, 8, 8), "gradcam", target=0, layer="act", upsample="nearest")
    with pytest.raises(errors.MedexplainError, match="layer="):
        mx.explain(model, torch.randn(1, 2, 8, 8), "gradcam", target=0, layout="channels_last")


# ------------------------------------------------------------------------------ MONAI architectures
def _region(spatial, b=1):
    m = torch.zeros((b, *spatial), dtype=torch.bool)
    m[(slice(None),) + tuple(slice(s // 4, s // 2) for s in spatial)] = True
    return Region(1, m)


def _swinunetr():
    from monai.networks.nets import SwinUNETR
    return SwinUNETR(1, 2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4,
                     norm_name="batch"), (1, 1, 32, 32, 32)


def _vit():
    from monai.networks.nets import ViT
    return ViT(1, img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4, classification=True,
               num_classes=3, spatial_dims=2, post_activation=None), (2, 1, 32, 32)


def _unetr():
    from monai.networks.nets import UNETR
    return UNETR(1, 2, img_size=32, feature_size=4, hidden_size=24, mlp_dim=48, num_heads=2), (1, 1, 32, 32, 32)


def _dynunet():
    from monai.networks.nets import DynUNet
    return DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[4, 8, 16],
                   deep_supervision=True, deep_supr_num=1), (1, 1, 16, 16, 16)


def _densenet():
    from monai.networks.nets import DenseNet121
    return DenseNet121(2, 1, 3, init_features=8, growth_rate=4), (2, 1, 64, 64)


def _segresnet():
    from monai.networks.nets import SegResNet
    return SegResNet(3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1, 1), blocks_up=(1, 1),
                     num_groups=4), (1, 1, 16, 16, 16)


def _unet():
    from monai.networks.nets import UNet
    return UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1), (1, 1, 16, 16, 16)


def _resnet():
    from medexplain.models import zoo
    return zoo.classifier_2d(1, 2, widths=(4, 4, 8, 8)), (2, 1, 32, 32)


#: network -> (builder, the default layer the rule picks and its layout, an explicitly named layer (a
#: transformer block where the network has one) and its layout, output=)
NETWORKS = {
    "SwinUNETR": (_swinunetr, ("decoder1", "channels_first"), ("swinViT.layers2.0.blocks.0", "channels_last"), None),
    "ViT": (_vit, ("blocks.0", "tokens"), ("blocks.0", "tokens"), 0),
    "UNETR": (_unetr, ("decoder2", "channels_first"), ("vit.blocks.0", "tokens"), None),
    "DynUNet (deep supervision)": (_dynunet, ("skip_layers", "channels_first"), ("upsamples.0", "channels_first"), None),
    "DenseNet121": (_densenet, ("features", "channels_first"), ("features.denseblock4", "channels_first"), None),
    "SegResNet": (_segresnet, ("up_layers.1", "channels_first"), ("down_layers.2", "channels_first"), None),
    "UNet": (_unet, ("model.2.0", "channels_first"), ("model.1.submodule", "channels_first"), None),
    "ResNet (zoo)": (_resnet, ("layer4", "channels_first"), ("layer3", "channels_first"), None),
}


@pytest.mark.parametrize("net", list(NETWORKS))
def test_gradcam_on_monai_networks_at_the_default_layer_and_a_named_block(net):
    build, default, named, output = NETWORKS[net]
    torch.manual_seed(0)
    model, shape = build()
    x = torch.randn(shape)
    with torch.no_grad():
        out = mx.core.select_output(model.eval()(x), output)
    model.train(net.startswith("DynUNet"))   # (DynUNet: a user's model left in training mode, stacked heads)
    target = [1] * shape[0] if out.ndim == 2 else _region(shape[2:], shape[0])
    before = snapshot(model)
    for layer, (name, kind) in [(None, default), (named[0], named)]:
        a = mx.explain(mx.Model(model, output=output), x, "gradcam", target=target, layer=layer)
        assert a.map.shape == (shape[0], 1, *shape[2:]) and torch.isfinite(a.map).all(), (net, layer)
        assert a.info["layer"] == name and a.info["layout"] == kind, (net, a.info)
    assert_untouched(model, before)


def test_default_layers_skip_what_does_not_reach_the_output():
    """ViT: the last block's patch tokens reach the logits only through the class token (which a CAM
    drops), so naming it is a typed error and the default is the block before; DynUNet: the supervision
    head computed but unused in eval is never the default, is a typed error when named, and instance
    Grad-CAM++ runs (it died with autograd's "element 0 of tensors does not require grad")."""
    torch.manual_seed(0)
    vit, shape = _vit()
    vit.eval()
    plan = layer_plan(mx.core.with_output(vit, 0), torch.randn(shape), "blocks.0")
    assert plan.view.kind == "tokens" and plan.view.drop == 1 and plan.view.grid == (4, 4)
    with pytest.raises(errors.UnsupportedModelError, match="only through its class token"):
        mx.explain(mx.Model(vit, output=0), torch.randn(shape), "gradcam", target=1, layer="blocks.1")
    dyn, shape = _dynunet()
    dyn.train()
    x = torch.randn(shape)
    target = _region(shape[2:])
    with pytest.raises(errors.UnsupportedModelError, match="does not depend"):
        mx.explain(dyn, x, "gradcam", target=target, layer="deep_supervision_heads.0")
    for method in ("gradcam", "gradcam++"):
        assert "deep_supervision" not in mx.explain(dyn, x, method, target=target).info["layer"]
    layer = mx.segmentation.decoder_layer(dyn.eval(), x)       # (in training mode the heads are outputs)
    dyn.train()
    assert "deep_supervision" not in layer
    inst = mx.segmentation.Instance(target.mask[0], None, int(target.mask.sum()))
    attr = mx.segmentation.explain_instances(dyn, x, [inst], method="gradcam++", channel=1)
    assert attr.map.shape == (1, 1, 16, 16, 16) and attr.info["layer"] == layer and dyn.training


def test_swin_stage_equals_its_activations_permuted_by_hand():
    """SwinUNETR's Swin blocks return channels-last (B, D, H, W, C): Grad-CAM there equals Grad-CAM
    computed by hand from the same activations and gradients permuted to channels-first; read as
    channels-first the map is a different one."""
    torch.manual_seed(0)
    model, shape = _swinunetr()
    model.eval()
    x = torch.randn(shape)
    target = _region(shape[2:])
    layer = "swinViT.layers2.0.blocks.0"
    ours = mx.explain(model, x, "gradcam", target=target, layer=layer)
    assert ours.info["layout"] == "channels_last"
    rec = {}
    h = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: rec.update(a=o))
    xx = x.clone()
    try:
        out = model(xx)
    finally:
        h.remove()
    (g,) = torch.autograd.grad(target.scores(out).sum(), rec["a"])
    a, g = rec["a"].detach().movedim(-1, 1), g.movedim(-1, 1)            # (B, C, D, H, W), by hand
    cam = torch.relu((g.mean((2, 3, 4), keepdim=True) * a).sum(1, keepdim=True))
    ref = torch.nn.functional.interpolate(cam, size=shape[2:], mode="trilinear", align_corners=False)
    torch.testing.assert_close(ours.map, ref, rtol=1e-4, atol=1e-6)    # patch cells tile the input: bilinear placement
    wrong = mx.explain(model, x, "gradcam", target=target, layer=layer, layout="channels_first").map
    corr = torch.corrcoef(torch.stack([wrong.flatten(), ref.flatten()]))[0, 1]
    assert corr < 0.5, float(corr)


# --------------------------------------------------------------------- layers called several times
class Shared(nn.Module):
    """One block applied twice to the whole batch (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(2, 2, 3, 1, 1), nn.Tanh())
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(self.block(self.block(x)).mean((2, 3)))


class PerSample(nn.Module):
    """A wrapper that runs the network one sample at a time (as sliding-window inference runs it on
    batches of windows): the layer sees batches of 1."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.cat([self.net(x[i:i + 1]) for i in range(len(x))])


class Crops(nn.Module):
    """The same block on the left and right halves of the image: calls on different input positions."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(2, 2, 3, 1, 1), nn.Tanh())
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        h = torch.cat([self.block(x[..., :4]), self.block(x[..., 4:])], -1)
        return self.fc(h.mean((2, 3)))


def test_a_layer_called_twice_combines_its_calls_and_never_returns_a_wrong_batch():
    torch.manual_seed(0)
    net = Shared().double().eval()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    before = snapshot(net)
    rec = []
    h = net.block.register_forward_hook(lambda m, i, o: rec.append(o))
    try:
        out = net(x.clone())
    finally:
        h.remove()
    gs = torch.autograd.grad(out[torch.arange(3), torch.tensor([0, 2, 1])].sum(), rec)
    expect = {"gradcam": torch.relu(sum((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True) for a, g in zip(rec, gs))),
              "hirescam": torch.relu(sum((g * a).sum(1, keepdim=True) for a, g in zip(rec, gs))),
              "layercam": torch.relu(sum((torch.relu(g) * a).sum(1, keepdim=True) for a, g in zip(rec, gs)))}
    for method, ref in expect.items():
        a = mx.explain(net, x, method, target=[0, 2, 1], layer="block")
        assert a.map.shape == (3, 1, 8, 8) and a.info["calls"] == 2
        torch.testing.assert_close(a.map, ref.detach(), rtol=1e-10, atol=1e-12)
    for method in ("eigencam", "scorecam", "ablationcam"):
        with pytest.raises(errors.UnsupportedModelError, match="called 2 times"):
            mx.explain(net, x, method, target=0, layer="block")
    wrapped = PerSample(net)
    with pytest.raises(errors.UnsupportedModelError, match="whole batch"):
        mx.explain(wrapped, x, "gradcam", target=0, layer="net.block")
    with pytest.raises(errors.UnsupportedModelError, match="different positions"):
        mx.explain(Crops().double().eval(), x, "gradcam", target=0, layer="block")
    assert_untouched(net, before)


# -------------------------------------------------------------------------- the model left as found
@pytest.mark.parametrize("method", FAMILY)
def test_model_left_as_found_by_every_member_also_after_an_error(method):
    torch.manual_seed(0)
    net = HeadNet().double().train()
    net.fc.requires_grad_(False)
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    before = snapshot(net)
    layers = dict(net.named_modules())
    mx.explain(net, x, method, target=[0, 1], layer="features.3")
    assert_untouched(net, before)
    calls = []

    def flaky(out, rows=None):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("the target failed half-way")
        return out[:, 0]

    opts = {"chunk_size": 3} if method in ("scorecam", "ablationcam") else {}
    if method in ("scorecam", "ablationcam"):   # an error between the model calls, hooks live
        with pytest.raises(RuntimeError, match="half-way"):
            mx.explain(net, x, method, target=Function(flaky, takes_rows=True), layer="features.3", **opts)
    with pytest.raises(errors.MedexplainError):   # class 7 of 3 (Eigen-CAM has no target: a layer without cells)
        mx.explain(net, x, method, target=[0, 7], layer="fc" if method == "eigencam" else "features.3")
    assert_untouched(net, before)
    assert all(dict(net.named_modules())[n] is m for n, m in layers.items())    # no layer replaced


def test_score_and_ablation_cost_and_chunking():
    torch.manual_seed(0)
    net = HeadNet().double().eval()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    for method in ("scorecam", "ablationcam"):
        mx.explain(net, x, method, target=[0, 1], layer="features.3")            # the layer plan is cached after this
        a = mx.explain(net, x, method, target=[0, 1], layer="features.3", chunk_size=64)
        b = mx.explain(net, x, method, target=[0, 1], layer="features.3", chunk_size=1)
        torch.testing.assert_close(a.map, b.map, rtol=1e-12, atol=1e-14)
        assert a.info["n_forward"] == 2 * (6 + 1) and a.info["n_backward"] == 0    # B (K + 1) rows, K = 6 channels


def test_no_feature_map_gives_an_error_naming_the_candidates():
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 8 * 8, 3)).eval()
    with pytest.raises(errors.UnsupportedModelError, match="pass layer="):
        mx.explain(model, torch.randn(1, 2, 8, 8), "gradcam", target=0)
