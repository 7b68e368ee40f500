"""Speed of the baseline explainers against their Captum / MONAI counterparts, same model, input, run.

    .venv/bin/python bench/baselines.py [--quick]

Cases: a MONAI ResNet-18 2D classifier at 224x224, batch 8, and a MONAI ResNet-10 3D classifier at
64^3, batch 2. Columns: our time, the peer's time, the ratio ours/peer (goal <= 1.0), and the cost of each
method in units of one forward+backward pass per sample, noise sample or step (goals: Grad-CAM family
<= 1.05x Captum's LayerGradCam; SmoothGrad and IG <= 1.1 passes per sample or step).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from captum.attr import IntegratedGradients, LayerGradCam, NoiseTunnel, Occlusion, Saliency
from monai.networks.nets import resnet10, resnet18
from monai.visualize import GradCAM, GradCAMpp

sys.path.insert(0, str(Path(__file__).parent))
import medexplain as mx  # noqa: E402
from common import best_time, machine, markdown_table, write_result  # noqa: E402

warnings.filterwarnings("ignore")


def fwd_bwd(model, x, target):
    xx = x.detach().requires_grad_(True)
    torch.autograd.grad(model(xx)[torch.arange(len(x)), target].sum(), xx)


def frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def run_case(name, model, x, layer, n_noise, n_steps, window, repeat):
    b = x.shape[0]
    target = torch.arange(b) % 2
    tl = target.tolist()
    ident = lambda m: m  # noqa: E731
    # One forward+backward of the batch w.r.t. the input, weights frozen: the unit of cost.
    unit = best_time(lambda: fwd_bwd(frozen(model), x, target), repeat)
    for p in model.parameters():
        p.requires_grad_(True)
    spatial = tuple(x.shape[2:])
    rows = []

    def add(method, ours_fn, peer_name, peer_fn, passes):
        k = repeat if passes <= 1 else 1  # best of `repeat` for the one-pass methods; one run of the long ones
        t_ours = best_time(ours_fn, k)
        t_peer = best_time(peer_fn, k) if peer_fn else float("nan")
        rows.append([name, method, t_ours, peer_name, t_peer, t_ours / t_peer if peer_fn else "-",
                     t_ours / (unit * passes)])

    add("saliency", lambda: mx.explain(model, x, "saliency", target=tl),
        "Captum Saliency", lambda: Saliency(model).attribute(x, target=target, abs=False), 1)
    add(f"smoothgrad (N={n_noise})", lambda: mx.explain(model, x, "smoothgrad", target=tl, n_samples=n_noise, chunk_size=b * n_noise),
        "Captum NoiseTunnel", lambda: NoiseTunnel(Saliency(model)).attribute(
            x, nt_type="smoothgrad", nt_samples=n_noise, nt_samples_batch_size=n_noise, stdevs=0.1, target=target, abs=False),
        n_noise)
    add(f"integrated_gradients ({n_steps} steps)",
        lambda: mx.explain(model, x, "integrated_gradients", target=tl, steps=n_steps, chunk_size=b * n_steps),
        "Captum IG", lambda: IntegratedGradients(model).attribute(x, target=target, n_steps=n_steps,
                                                                  internal_batch_size=b * n_steps), n_steps)
    n_win = 1
    for s in spatial:
        n_win *= s // window
    add(f"occlusion ({n_win} windows)", lambda: mx.explain(model, x, "occlusion", target=tl, window=window, chunk_size=b * 16),
        "Captum Occlusion", lambda: Occlusion(model).attribute(
            x, sliding_window_shapes=(x.shape[1],) + (window,) * len(spatial), strides=(x.shape[1],) + (window,) * len(spatial),
            target=target, baselines=0.0, perturbations_per_eval=16), n_win)
    add("gradcam", lambda: mx.explain(model, x, "gradcam", target=tl, layer=layer),
        "Captum LayerGradCam", lambda: LayerGradCam(model, dict(model.named_modules())[layer]).attribute(x, target=target), 1)
    add("gradcam", lambda: mx.explain(model, x, "gradcam", target=tl, layer=layer),
        "MONAI GradCAM (batch)", lambda: GradCAM(model, target_layers=layer, postprocessing=ident)(x, class_idx=target[0].item()), 1)
    x1 = x[:1]
    add("gradcam++ (batch 1)", lambda: mx.explain(model, x1, "gradcam++", target=0, layer=layer),
        "MONAI GradCAMpp (batch 1)", lambda: GradCAMpp(model, target_layers=layer, postprocessing=ident)(x1, class_idx=0),
        1 / b)
    add("eigencam", lambda: mx.explain(model, x, "eigencam", layer=layer), "(no peer installable)", None, 1)
    return rows, unit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller inputs (a smoke run, not the reported figures)")
    args = ap.parse_args()
    torch.manual_seed(0)
    size2, size3, rep = (96, 32, 1) if args.quick else (224, 64, 3)
    m2 = resnet18(spatial_dims=2, n_input_channels=1, num_classes=2).eval()
    m3 = resnet10(spatial_dims=3, n_input_channels=1, num_classes=2).eval()
    rows2, u2 = run_case(f"2D resnet18 {size2}^2 b8", m2, torch.randn(8, 1, size2, size2), "layer4", 8, 16, size2 // 4, rep)
    rows3, u3 = run_case(f"3D resnet10 {size3}^3 b2", m3, torch.randn(2, 1, size3, size3, size3), "layer4", 4, 8, size3 // 2, rep)
    header = ["case", "method", "ours s", "peer", "peer s", "ours/peer", "fwd+bwd passes per sample/step"]
    text = (f"# Baselines vs Captum / MONAI ({machine()})\n\nCommand: `.venv/bin/python bench/baselines.py`"
            f"{' --quick' if args.quick else ''}\n\nUnit (one forward+backward of the batch w.r.t. the input): "
            f"2D {u2:.3f} s, 3D {u3:.3f} s. Times are the best of {rep} for one-pass methods, one run otherwise.\n\n" + markdown_table(header, rows2 + rows3))
    write_result("baselines" + ("_quick" if args.quick else ""), text)


if __name__ == "__main__":
    main()
