"""MedicalPatchNet: patch geometry, averaging, shifted smoothing and its border options."""
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import medexplain as mx
from medexplain.errors import InputError, TargetError, UnsupportedModelError
from medexplain.models.patchnet import PatchNet, shift_offsets


def conv_backbone(dims=2, c=1, k=3):
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    pool = nn.AdaptiveAvgPool2d if dims == 2 else nn.AdaptiveAvgPool3d
    return nn.Sequential(conv(c, 4, 3, padding=1), nn.ReLU(), conv(4, 4, 3, padding=1), nn.Tanh(),
                         pool(1), nn.Flatten(), nn.Linear(4, k))


class PatchMean(nn.Module):
    """Logit = mean of the patch (channel 0), times a per-class factor: a linear, position-free backbone."""

    def __init__(self, k=1):
        super().__init__()
        self.scale = nn.Parameter(torch.arange(1, k + 1, dtype=torch.float64))

    def forward(self, x):
        return x[:, 0].flatten(1).mean(1, keepdim=True) * self.scale


@pytest.mark.parametrize("dims,size", [(2, (16, 16)), (3, (8, 8, 8))])
def test_patch_equal_to_image_is_the_backbone(dims, size):
    torch.manual_seed(0)
    bb = conv_backbone(dims).double()
    x = torch.randn(3, 1, *size, dtype=torch.float64)
    net = PatchNet(bb, size, spatial_dims=dims)
    assert torch.equal(net(x), bb(x))
    assert net.patch_logits(x).shape == (3, 3, *[1] * dims)


@pytest.mark.parametrize("dims,size,p", [(2, (12, 8), (4, 2)), (3, (4, 6, 4), 2)])
def test_patch_logits_and_mean(dims, size, p):
    torch.manual_seed(1)
    bb = conv_backbone(dims, c=2).double()
    x = torch.randn(2, 2, *size, dtype=torch.float64)
    net = PatchNet(bb, p, spatial_dims=dims)
    z = net.patch_logits(x)
    ps = net.patch_size
    grid = [s // q for s, q in zip(size, ps)]
    assert z.shape == (2, 3, *grid)
    for g in itertools.product(*[range(n) for n in grid]):      # independent: one patch at a time
        sl = tuple(slice(i * q, (i + 1) * q) for i, q in zip(g, ps))
        torch.testing.assert_close(z[(slice(None), slice(None), *g)], bb(x[(slice(None), slice(None), *sl)]))
    torch.testing.assert_close(net(x), z.flatten(2).mean(2))


def test_shift_offsets_follow_the_reference():
    assert shift_offsets(64, 1) == list(range(-32, 32))
    assert shift_offsets(64, 64) == [0]
    assert shift_offsets(8, 2) == [-4, -2, 0, 2]
    with pytest.raises(InputError):
        shift_offsets(8, 3)


def brute_force_map(x, p, o, border):
    """Shifted smoothing (MedicalPatchNet, section 2) written out voxel by voxel for the PatchMean backbone:
    shift x_s(j) = x(j + s) with zero padding, patch means, paint, shift back M(j) += M_s(j - s), divide."""
    x = x[0, 0].numpy()
    shape = x.shape
    shifts = list(itertools.product(*[shift_offsets(p, o)] * x.ndim))
    total, count = np.zeros(shape), np.zeros(shape)
    for s in shifts:
        for j in itertools.product(*[range(n) for n in shape]):
            u = [ji - si for ji, si in zip(j, s)]                # j in the shifted image's frame
            if any(ui < 0 or ui >= n for ui, n in zip(u, shape)):
                continue
            start = [(ui // p) * p for ui in u]
            vals = []
            for w in itertools.product(*[range(st, st + p) for st in start]):
                src = [wi + si for wi, si in zip(w, s)]
                inside = all(0 <= v < n for v, n in zip(src, shape))
                vals.append(x[tuple(src)] if inside else 0.0)
            total[j] += np.mean(vals)
            count[j] += 1
    return total / (len(shifts) if border == "reference" else count)


@pytest.mark.parametrize("border", ["reference", "coverage"])
@pytest.mark.parametrize("dims,size,p,o", [(2, 8, 4, 1), (2, 8, 4, 2), (3, 4, 2, 1)])
def test_shifted_map_matches_brute_force(border, dims, size, p, o):
    torch.manual_seed(2)
    x = torch.rand(1, 1, *[size] * dims, dtype=torch.float64)
    net = PatchNet(PatchMean(), p, spatial_dims=dims)
    got = net.saliency(x, offset=o, border=border, chunk_size=3)
    np.testing.assert_allclose(got[0, 0].numpy(), brute_force_map(x, p, o, border), atol=1e-12)


def test_shift_and_return_reproduces_position():
    """Backbone logit = mean row index of the patch content; on an image holding its own row index the
    smoothed (o = 1) map equals the row index wherever no shifted patch touches the padding."""
    s, p = 24, 4
    rows = torch.arange(s, dtype=torch.float64).view(1, 1, s, 1).expand(1, 1, s, s).clone()
    net = PatchNet(PatchMean(), p)
    m = net.saliency(rows, offset=1)[0, 0]
    inner = slice(p, s - p)
    torch.testing.assert_close(m[inner, inner], rows[0, 0, inner, inner])
    plain = net.saliency(rows)[0, 0]                            # o = p: patch centres, a staircase
    torch.testing.assert_close(plain[:, 0], (torch.arange(s) // p * p + (p - 1) / 2).double())


def test_reference_border_attenuates_by_coverage():
    torch.manual_seed(3)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    net = PatchNet(PatchMean(), 4)
    ref = net.saliency(x, offset=1, border="reference")
    cov = net.saliency(x, offset=1, border="coverage")
    # shifts -2..1 per axis: pixel 0 is covered by s <= 0 (3 of 4), pixel 7 by s >= 0 (2 of 4)
    torch.testing.assert_close(ref[..., 0, 0], cov[..., 0, 0] * 9 / 16)
    torch.testing.assert_close(ref[..., 7, 7], cov[..., 7, 7] * 4 / 16)
    torch.testing.assert_close(ref[..., 3, 3], cov[..., 3, 3])


def test_plain_and_scaled_maps_and_targets():
    torch.manual_seed(4)
    bb = conv_backbone(2, k=3).double()
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    net = PatchNet(bb, 4)
    z, zg = net.patch_logits(x), net(x)
    i, j = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    raw = net.saliency(x)
    torch.testing.assert_close(raw, z[:, :, i // 4, j // 4])
    scaled = net.saliency(x, kind="scaled")
    torch.testing.assert_close(scaled, raw * torch.sigmoid(zg)[:, :, None, None])
    soft = net.saliency(x, kind="scaled", activation="softmax")
    torch.testing.assert_close(soft, raw * torch.softmax(zg, 1)[:, :, None, None])
    full = net.saliency(x, offset=2, kind="scaled")
    per = net.saliency(x, target=[2, 0, 1], offset=2, kind="scaled", chunk_size=1)
    torch.testing.assert_close(per[:, 0], full[torch.arange(3), torch.tensor([2, 0, 1])])
    torch.testing.assert_close(net.saliency(x, target=1, offset=2)[:, 0], net.saliency(x, offset=2)[:, 1])
    ml = net.saliency(x, target=mx.targets.MultiLabel([0, 2]), offset=2)
    torch.testing.assert_close(ml[:, 0], full_raw := net.saliency(x, offset=2)[:, 0] + net.saliency(x, offset=2)[:, 2])
    assert ml.shape == (3, 1, 16, 16) and full_raw.shape == (3, 16, 16)
    with pytest.raises(TargetError):
        net.saliency(x, target=3)


def test_explain_entry_point_and_model_state():
    torch.manual_seed(5)
    bb = conv_backbone(3, c=2, k=2)
    net = PatchNet(bb, (2, 4, 4), spatial_dims=3)
    net.train()
    bb[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 2, 4, 8, 8)
    a = mx.explain(net, x, method="patchnet", target=1, offset=(1, 2, 2), kind="scaled", chunk_size=4)
    assert a.map.shape == (2, 1, 4, 8, 8) and a.method == "patchnet"
    assert a.info["n_forward"] == 2 * 2 * 2 * 2 * 2 * 4       # shifts x images x patches
    assert net.training and all(m.training for m in net.modules())
    assert not bb[0].weight.requires_grad and bb[2].weight.requires_grad
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(UnsupportedModelError):
        mx.explain(bb, x, method="patchnet", target=0)


def test_monai_backbone_2d_and_3d():
    from monai.networks.nets import DenseNet
    torch.manual_seed(6)
    for dims in (2, 3):
        bb = DenseNet(spatial_dims=dims, in_channels=1, out_channels=2, init_features=4, growth_rate=4,
                      block_config=(1, 1), bn_size=2)
        net = PatchNet(bb, 8, spatial_dims=dims).eval()
        x = torch.randn(2, 1, *[16] * dims)
        assert net(x).shape == (2, 2)
        assert net.saliency(x, target=0, offset=4).shape == (2, 1, *[16] * dims)


def test_errors():
    net = PatchNet(PatchMean(), 4)
    with pytest.raises(InputError, match="multiple of the patch size"):
        net(torch.zeros(1, 1, 10, 8))
    with pytest.raises(InputError):
        net.saliency(torch.zeros(1, 1, 8, 8), offset=3)
    with pytest.raises(InputError):
        net.saliency(torch.zeros(1, 1, 8, 8), kind="log")
    with pytest.raises(InputError):
        net(torch.zeros(1, 1, 8, 8, 8))                         # 3D input to a 2D PatchNet
    with pytest.raises(InputError):
        PatchNet(PatchMean(), 4, spatial_dims=1)
    with pytest.raises(UnsupportedModelError):
        PatchNet(nn.Conv2d(1, 2, 1), 4)(torch.zeros(1, 1, 8, 8))  # not a classifier backbone


def test_paper_augment_identity_ranges_and_3d():
    from medexplain.data.augment import PaperAugment
    torch.manual_seed(7)
    x = torch.rand(4, 1, 16, 16)
    ident = PaperAugment(scale=(1, 1), ratio=(1, 1), degrees=0, brightness=0)
    torch.testing.assert_close(ident(x), x)
    bright = PaperAugment(scale=(1, 1), ratio=(1, 1), degrees=0, brightness=0.3, seed=1)(x)
    f = bright.flatten(1).sum(1) / x.flatten(1).sum(1)
    torch.testing.assert_close(bright, x * f.view(-1, 1, 1, 1))
    assert bool(((f >= 0.7) & (f <= 1.3)).all()) and f.std() > 0
    aug = PaperAugment(seed=3)
    y, m = aug(x, x[:, 0] > 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(aug(x, torch.tensor([0, 1, 1, 0]))[1], torch.tensor([0, 1, 1, 0]))
    assert y.shape == x.shape and m.dtype == torch.bool and not torch.equal(y, x)
    again = PaperAugment(seed=99)(x, None, torch.Generator().manual_seed(3))
    torch.testing.assert_close(again, y)
    v = torch.rand(2, 2, 8, 8, 8)
    y3 = PaperAugment(degrees=5, seed=0)(v)
    assert y3.shape == v.shape and torch.isfinite(y3).all()
    th = PaperAugment(scale=(0.25, 0.25), ratio=(1, 1), degrees=0, brightness=0).theta(3, (16, 16))
    assert torch.allclose(th[:, 0, 0], torch.full((3,), 0.5, dtype=th.dtype))
    assert bool((th[:, :, 2].abs() <= 0.5 + 1e-9).all())


def tiny_backbone(in_channels, num_classes):
    """A factory for ``medexplain train --backbone test_patchnet:tiny_backbone`` (keeps the test fast)."""
    return conv_backbone(2, c=in_channels, k=num_classes)


@pytest.mark.slow
def test_train_cli_planted_and_manifest(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from medexplain.cli import app
    from medexplain.models.trained import load_trained
    run = CliRunner().invoke(app, ["train", "chest_xray", "--out", str(tmp_path / "pn"), "--patch-size", "16",
                                   "--image-size", "32", "--n", "16", "--epochs", "1", "--batch-size", "8",
                                   "--backbone", f"{__name__}:tiny_backbone"])
    assert run.exit_code == 0, run.output
    net = load_trained(tmp_path / "pn")
    assert isinstance(net, PatchNet) and net.patch_size == (16, 16) and net(torch.rand(2, 1, 32, 32)).shape == (2, 2)
    rows = ["path,effusion,nodule,split"]
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray((rng.random((20, 24)) * 255).astype(np.uint8)).save(tmp_path / f"im{i}.png")
        rows.append(f"im{i}.png,{i % 2},{(i // 2) % 2},{'val' if i >= 4 else 'train'}")
    (tmp_path / "m.csv").write_text("\n".join(rows))
    run = CliRunner().invoke(app, ["train", str(tmp_path / "m.csv"), "--out", str(tmp_path / "base"),
                                   "--image-size", "16", "--epochs", "1", "--batch-size", "4", "--no-augment",
                                   "--backbone", f"{__name__}:tiny_backbone"])
    assert run.exit_code == 0, run.output
    base = load_trained(tmp_path / "base")
    assert not isinstance(base, PatchNet) and base(torch.rand(1, 1, 16, 16)).shape == (1, 2)
    bad = CliRunner().invoke(app, ["train", "chest_xray", "--patch-size", "5", "--image-size", "32"])
    assert bad.exit_code == 2


def published_scaled_map(bb, img, p, steps, batch=4, broadcast_bug=True):
    """MedicalPatchNet's published scaled-map pipeline (TruhnLab/MedicalPatchNet: its shift loader in batches of
    ``batch`` shifted images, its scaled patch logits and its map assembly), restated here for one 2D image
    ``(1, 1, S, S)``. The published code multiplies the patch logits ``(N, P, K)`` of a batch of N shifted images
    by their probabilities shaped ``(N, 1, 1, K)``, which broadcasts to ``(N, N, P, K)`` (every image's logits
    times every image's probability); the assembly then reshapes to ``(-1, n, n, K)`` and averages as many maps
    as the first dimension counts, each placed at the shift of that index. ``broadcast_bug=False`` multiplies each
    image's logits by its own probability, the paper's scaled logits (section 2: z_i * y-hat)."""
    s, n, half = img.shape[-1], img.shape[-1] // p, p // 2
    offs = shift_offsets(p, p // steps)                       # the published getShiftSteps(steps, p)
    shifts = [(a, b) for a in offs for b in offs]

    def window(t, dx, dy):                                    # zero-padded by p/2, the window moved by (dx, dy)
        t = torch.nn.functional.pad(t, (half,) * 4)
        return t[:, dx + half:dx + half + s, dy + half:dy + half + s]

    feats = []
    for k in range(0, len(shifts), batch):
        xs = torch.stack([window(img[0], *sh) for sh in shifts[k:k + batch]])
        patches = xs.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(-1, 1, p, p)
        raw = bb(patches).reshape(len(xs), n * n, -1)
        prob = torch.sigmoid(raw.mean(1))
        feats.append(raw * (prob[:, None, None, :] if broadcast_bug else prob[:, None, :]))
    feats = torch.cat(feats)
    grid = feats.reshape(-1, n, n, feats.shape[-1])
    total = torch.zeros(feats.shape[-1], s, s, dtype=feats.dtype)
    for i in range(feats.shape[0]):
        m = grid[i].permute(2, 0, 1).repeat_interleave(p, 1).repeat_interleave(p, 2)
        total += window(m, -shifts[i][0], -shifts[i][1])
    return total / feats.shape[0]


def test_scaled_maps_against_the_published_code_and_its_broadcasting_bug():
    """Our scaled map equals the published pipeline with each image's logits scaled by its own probability (the
    paper's definition) to float64 rounding; the published code as shipped scales every shifted image's logits by
    every other image's probability of the same batch and misplaces the maps, and differs (docs/patchnet.md states
    the size, in the published code's own map units: logits clipped to +-200 and mapped to [0, 1])."""
    torch.manual_seed(6)
    bb = conv_backbone(2, k=2).double().eval()
    with torch.no_grad():                                     # patch logits of a few units, as a trained model's
        bb[-1].weight.mul_(40.0)
    x = torch.randn(1, 1, 16, 16, dtype=torch.float64) * 2
    ours = PatchNet(bb, 8).eval().saliency(x, kind="scaled", offset=2, border="reference")[0]
    with torch.no_grad():
        fixed = published_scaled_map(bb, x, 8, 4, broadcast_bug=False)
        shipped = published_scaled_map(bb, x, 8, 4)
    torch.testing.assert_close(ours, fixed, rtol=1e-12, atol=1e-12)

    def units(m):                                             # the published map units (NORM_VAL = 200)
        return (m.clamp(-200, 200) + 200) / 400
    gap = float((units(shipped) - units(ours)).abs().max())
    print(f"published scaled map vs ours: max {gap:.2e} in its [0, 1] units, "
          f"{float((shipped - ours).abs().max() / ours.abs().max()):.2f} of our map's maximum")
    assert gap > 1e-3
