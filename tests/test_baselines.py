"""Baselines against independent implementations (Captum, MONAI) and a method matrix (Captum's test-config style):
every method x {2D, 3D} x {class, region target} x batch 3 == three batches of 1, model untouched."""
import pytest
import torch

import medexplain as mx
from conftest import check_batch_matrix, image, make, rel_err
from medexplain.engine.targets import Region

captum = pytest.importorskip("captum.attr")
CAMS = ["gradcam", "gradcam++", "eigencam", "hirescam", "xgradcam", "layercam", "gradcam_elementwise", "scorecam",
        "ablationcam"]
BASELINES = ["saliency", "smoothgrad", "integrated_gradients", "occlusion"] + CAMS
OPTS = {"smoothgrad": {"n_samples": 4}, "integrated_gradients": {"steps": 8}, "occlusion": {"window": 4},
        **{m: {"layer": "features.2"} for m in CAMS}}
SEG_OPTS = dict(OPTS, **{m: {"layer": "body.2"} for m in CAMS})


@pytest.mark.parametrize("nd", [2, 3])
def test_saliency_ig_occlusion_match_captum(nd):
    model, x, t = make("cls", nd), image(nd), [0, 2, 1]
    ours = mx.explain(model, x, "saliency", target=t).map
    assert rel_err(ours, captum.Saliency(model).attribute(x, target=t, abs=False)) <= 1e-5
    for rule in ("gausslegendre", "riemann_left", "riemann_middle", "riemann_right", "riemann_trapezoid"):
        ours = mx.explain(model, x, "integrated_gradients", target=t, steps=20, rule=rule).map
        ref = captum.IntegratedGradients(model).attribute(x, target=t, n_steps=20, method=rule)
        if rule == "riemann_trapezoid":  # Captum's trapezoid weights sum to 1 - 1/n; ours are textbook
            ref = ref * 20 / 19
        assert rel_err(ours, ref) <= 1e-5
    win = (2,) + (4,) * nd
    ref = captum.Occlusion(model).attribute(x, sliding_window_shapes=win, strides=(2,) + (2,) * nd, target=t, baselines=0.0)
    ours = mx.explain(model, x, "occlusion", target=t, window=4, stride=2).map
    assert rel_err(ours, ref[:, :1]) <= 1e-5
    assert torch.allclose(ref[:, 0], ref[:, 1])  # Captum's window spans both channels, like ours


@pytest.mark.parametrize("nd", [2, 3])
def test_smoothgrad_matches_noise_tunnel_with_shared_noise(nd):
    model, x, t = make("cls", nd), image(nd), [1, 0, 2]
    n, sd = 6, 0.3
    torch.manual_seed(123)
    ref = captum.NoiseTunnel(captum.Saliency(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=n, stdevs=sd, target=t, abs=False)
    torch.manual_seed(123)  # the same draw Captum makes: rows sample-major, (B*N, *x.shape[1:])
    noise = torch.normal(0, torch.tensor(sd).repeat((x.shape[0] * n,) + tuple(x.shape[1:])))
    noise = noise.view(x.shape[0], n, *x.shape[1:]).transpose(0, 1).to(x.dtype)
    ours = mx.explain(model, x, "smoothgrad", target=t, n_samples=n, noise=noise, chunk_size=7).map
    assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("nd", [2, 3])
def test_gradcam_family_matches_monai(nd):
    from monai.visualize import GradCAM, GradCAMpp
    model, x = make("cls", nd), image(nd, b=1)
    model.features[3].inplace = False  # MONAI's backward hooks fail on an in-place op after the layer; ours do not
    ident = lambda m: m  # noqa: E731  (MONAI's default post-processing min-max normalises)
    ref = GradCAM(model, target_layers="features.2", postprocessing=ident)(x, class_idx=2)
    ours = mx.explain(model, x, "gradcam", target=2, layer="features.2", upsample="bilinear").map
    assert rel_err(ours, ref) <= 1e-5
    ref = GradCAMpp(model, target_layers="features.2", postprocessing=ident)(x, class_idx=2)
    ours = mx.explain(model, x, "gradcam++", target=2, layer="features.2", variant="monai", upsample="bilinear").map
    assert rel_err(ours, ref) <= 1e-5


def test_gradcam_pp_paper_formula_by_hand():
    """Grad-CAM++ eq. 19 on a linear head: S = sum_k v_k mean(A_k) so g_k = v_k / N at every position."""
    torch.manual_seed(0)
    model = make("cls", 2)
    x = image(2, b=1)
    cap = {}
    h = model.features[3].register_forward_hook(lambda m, i, o: cap.update(a=o.detach().clone()))
    model(x)
    h.remove()
    a = cap["a"]
    n = a[0, 0].numel()
    g = (model.fc.weight[1] / n).view(1, -1, 1, 1).expand_as(a)
    alpha = g ** 2 / (2 * g ** 2 + a.sum((2, 3), keepdim=True) * g ** 3)
    w = (alpha * g.clamp(min=0)).sum((2, 3), keepdim=True)
    expected = torch.relu((w * a).sum(1, keepdim=True))
    ours = mx.explain(model, x, "gradcam++", target=1, layer="features.3").map  # post-ReLU: g = v/N
    assert rel_err(ours, expected) <= 1e-10


def _first_principal_component(a):
    """Projection of one sample's centred activations ``(K, *s)``, as ``N`` points in ``K`` dims, on their
    first principal direction (SVD), ``(N,)``: Eigen-CAM before its sign rule."""
    flat = a.flatten(1).T
    flat = flat - flat.mean(0)
    _, _, vt = torch.linalg.svd(flat, full_matrices=False)
    return flat @ vt[0]


def test_eigencam_projects_the_conv_output_not_the_inplace_relu_after_it():
    """Eigen-CAM at a conv followed by ``ReLU(inplace=True)`` (``features.2`` -> ``features.3``) is the SVD
    projection of the conv's own output, computed here by running the layers by hand, not of the
    ReLU's output (which an aliased, uncloned capture would see)."""
    model, x = make("cls", 2), image(2, b=2)
    assert isinstance(model.features[3], torch.nn.ReLU) and model.features[3].inplace
    m = mx.explain(model, x, "eigencam", layer="features.2").map
    with torch.no_grad():
        conv = model.features[2](model.features[1](model.features[0](x)))   # the conv's output, by hand
    relu = conv.clamp(min=0)
    assert conv.min() < 0                                                    # so the in-place ReLU changes it
    for b in range(2):
        ours, expect = m[b, 0].flatten(), _first_principal_component(conv[b])
        mean_act = conv[b].mean(0).flatten()
        sign = 1.0 if torch.corrcoef(torch.stack([expect, mean_act]))[0, 1] >= 0 else -1.0  # the sign rule
        torch.testing.assert_close(ours, sign * expect, rtol=0, atol=1e-10)
        post_relu = _first_principal_component(relu[b])
        assert (ours.abs() - post_relu.abs()).abs().max() > 1e-2             # the two really differ here
        assert torch.corrcoef(torch.stack([ours, mean_act]))[0, 1] >= 0


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("kind", ["cls", "seg"])
def test_matrix_batched_equals_unbatched_and_model_untouched(method, nd, kind):
    check_batch_matrix(method, nd, kind, (OPTS if kind == "cls" else SEG_OPTS).get(method, {}))


def test_region_target_is_the_gradient_of_the_region_logit_sum():
    model, x = make("seg", 2), image(2, b=2)
    mask = torch.zeros(2, 12, 12, dtype=torch.bool)
    mask[0, 3:6, 3:6] = True
    mask[1, 7:9, 2:4] = True
    for reduce in ("sum", "mean"):
        xx = x.clone().requires_grad_(True)
        z = model(xx)[:, 1]
        s = (z * mask).flatten(1).sum(1)
        if reduce == "mean":
            s = s / mask.flatten(1).sum(1)
        (g,) = torch.autograd.grad(s.sum(), xx)
        ours = mx.explain(model, x, "saliency", target=Region(1, mask, reduce=reduce)).map
        assert rel_err(ours, g) <= 1e-12


def test_integrated_gradients_completeness():
    model, x = make("cls", 3), image(3, b=2)
    a = mx.explain(model, x, "integrated_gradients", target=[0, 1], steps=64)
    assert max(a.info["completeness_error"]) < 1e-4
    assert a.info["n_forward"] == 2 * 64 + 4 and a.info["n_backward"] == 2 * 64


def test_multilabel_target_sums_logits():
    model, x = make("cls", 2), image(2, b=1)
    a = mx.explain(model, x, "saliency", target=mx.targets.MultiLabel([0, 2])).map
    b = mx.explain(model, x, "saliency", target=0).map + mx.explain(model, x, "saliency", target=2).map
    assert rel_err(a, b) <= 1e-12


def test_smoothgrad_is_deterministic_and_chunk_independent():
    from medexplain.engine.ops import NoiseSource
    model, x = make("cls", 2), image(2, b=2)
    a = mx.explain(model, x, "smoothgrad", target=1, n_samples=5, seed=3, chunk_size=100).map
    torch.manual_seed(999)                                     # the global RNG plays no part
    again = mx.explain(model, x, "smoothgrad", target=1, n_samples=5, seed=3, chunk_size=100).map
    assert torch.equal(a, again)
    chunked = mx.explain(model, x, "smoothgrad", target=1, n_samples=5, seed=3, chunk_size=2).map  # 1 sample/call
    torch.testing.assert_close(chunked, a, rtol=1e-12, atol=1e-14)
    c = mx.explain(model, x, "smoothgrad", target=1, n_samples=5, seed=4, chunk_size=100).map
    assert (a - c).abs().max() > 1e-6
    # the draws are ops.NoiseSource's (one per noise sample, scaled by each image's range)
    given = NoiseSource(x, 5, 0.15, 3).take(5)
    torch.testing.assert_close(mx.explain(model, x, "smoothgrad", target=1, n_samples=5, noise=given).map, a,
                               rtol=1e-12, atol=1e-14)


def test_float32_and_gradients_flow_only_to_inputs():
    model, x = make("cls", 2, dtype=torch.float32), image(2, dtype=torch.float32)
    mx.explain(model, x, "saliency", target=0)
    assert all(p.grad is None for p in model.parameters())
