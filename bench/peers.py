"""medexplain against the peers, method by method, same model, input and targets, in one process.

    .venv/bin/python bench/peers.py [--rounds 5] [--threads 1] [--quick]

Every method that Captum, pytorch-grad-cam or MONAI also implements: saliency, SmoothGrad, integrated
gradients, input x gradient, GradientSHAP, occlusion, Grad-CAM, Grad-CAM++, Score-CAM, feature ablation,
KernelSHAP, LIME (a MONAI ResNet, 2D and 3D) and LRP (a plain CNN, 2D: Captum's LRP has no rule for a
residual sum). Each round times every (method, peer) pair once, ours and the peer back to back, the order
alternating from round to round (so a change in the machine's load hits both alike); ``--warmup`` rounds
first are not counted. Reported: the median over rounds of ours / peer and its range. The machine is
shared (other jobs running): absolute seconds are noisy, the ratios of back-to-back runs much less so.
Writes ``bench/results/peers.md`` and prints the README table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TQDM_DISABLE", "1")   # pytorch-grad-cam's progress bars
sys.path.insert(0, str(HERE))
warnings.filterwarnings("ignore")


def import_pytorch_grad_cam():
    """pytorch-grad-cam's CAMs are pure torch; only its image utilities import torchvision (not installed: it
    would replace the CPU torch). Stub those modules first (as tests/conftest.py does)."""
    for name, attrs in [("torchvision", {}), ("torchvision.transforms", dict(Compose=object, Normalize=object, ToTensor=object)),
                        ("torchvision.transforms.functional", dict(resize=object))]:
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = []
            mod.__dict__.update(attrs)
            sys.modules[name] = mod
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    return pytorch_grad_cam, ClassifierOutputTarget


class PlainCNN(nn.Module):
    """Three conv-ReLU-pool stages and a linear head (every module one Captum LRP has a rule for)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(64, 2)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def pairs(nd: int, model, x, layer: str, cnn, quick: bool):
    """``(method, peer name, ours(), peer())`` for one case."""
    import captum.attr as ca

    import medexplain as mx
    gc, Target = import_pytorch_grad_cam()
    b, spatial = x.shape[0], tuple(x.shape[2:])
    tl = [i % 2 for i in range(b)]
    t = torch.tensor(tl)
    n_noise, steps, n_samples = (4, 4, 16) if quick else (8, 8, 32)
    window = spatial[0] // 4
    n_feat = 16
    from medexplain.methods.captum_methods import feature_groups
    groups = feature_groups(x, "grid", n_feat, 0.3)
    mod = dict(model.named_modules())[layer]
    targets = [Target(i) for i in tl]
    out = [
        ("saliency", "Captum Saliency", lambda: mx.explain(model, x, "saliency", target=tl),
         lambda: ca.Saliency(model).attribute(x, target=t, abs=False)),
        (f"smoothgrad N={n_noise}", "Captum NoiseTunnel(Saliency)",
         lambda: mx.explain(model, x, "smoothgrad", target=tl, n_samples=n_noise, chunk_size=b * n_noise),
         lambda: ca.NoiseTunnel(ca.Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=n_noise,
                                                             nt_samples_batch_size=n_noise, stdevs=0.15, target=t, abs=False)),
        (f"integrated_gradients {steps} steps", "Captum IntegratedGradients",
         lambda: mx.explain(model, x, "integrated_gradients", target=tl, steps=steps, chunk_size=b * steps),
         # ours reports the completeness error (one forward of x and the baseline): the peer computes it too
         lambda: ca.IntegratedGradients(model).attribute(x, target=t, n_steps=steps, internal_batch_size=b * steps,
                                                         return_convergence_delta=True)),
        ("inputxgradient", "Captum InputXGradient", lambda: mx.explain(model, x, "inputxgradient", target=tl),
         lambda: ca.InputXGradient(model).attribute(x, target=t)),
        (f"gradientshap {n_noise} samples", "Captum GradientShap",
         lambda: mx.explain(model, x, "gradientshap", target=tl, n_samples=n_noise, n_baselines=1),
         lambda: ca.GradientShap(model).attribute(x, baselines=torch.zeros_like(x[:1]), n_samples=n_noise, target=t)),
        (f"occlusion {4 ** nd} windows", "Captum Occlusion",
         lambda: mx.explain(model, x, "occlusion", target=tl, window=window, chunk_size=b * 16),
         lambda: ca.Occlusion(model).attribute(x, sliding_window_shapes=(1,) + (window,) * nd,
                                               strides=(1,) + (window,) * nd, target=t, baselines=0.0,
                                               perturbations_per_eval=16)),
        ("gradcam", "Captum LayerGradCam", lambda: mx.explain(model, x, "gradcam", target=tl, layer=layer),
         lambda: ca.LayerGradCam(model, mod).attribute(x, target=t)),
        ("gradcam", "pytorch-grad-cam GradCAM", lambda: mx.explain(model, x, "gradcam", target=tl, layer=layer),
         lambda: gc.GradCAM(model, [mod])(x, targets)),
        ("gradcam++", "pytorch-grad-cam GradCAMPlusPlus", lambda: mx.explain(model, x, "gradcam++", target=tl, layer=layer),
         lambda: gc.GradCAMPlusPlus(model, [mod])(x, targets)),
        (f"feature_ablation {n_feat} groups", "Captum FeatureAblation",
         lambda: mx.explain(model, x, "feature_ablation", target=tl, features="grid", n_features=n_feat, chunk_size=b * 16),
         lambda: ca.FeatureAblation(model).attribute(x, target=t, feature_mask=groups, baselines=0.0,
                                                     perturbations_per_eval=16)),
        (f"kernelshap {n_samples} samples", "Captum KernelShap",
         lambda: mx.explain(model, x, "kernelshap", target=tl, features="grid", n_features=n_feat, n_samples=n_samples,
                            chunk_size=16),
         lambda: ca.KernelShap(model).attribute(x, target=t, feature_mask=groups, baselines=0.0, n_samples=n_samples,
                                                perturbations_per_eval=16)),
        (f"lime {n_samples} samples", "Captum Lime",
         lambda: mx.explain(model, x, "lime", target=tl, features="grid", n_features=n_feat, n_samples=n_samples,
                            chunk_size=16),
         lambda: ca.Lime(model).attribute(x, target=t, feature_mask=groups, baselines=0.0, n_samples=n_samples,
                                          perturbations_per_eval=16)),
    ]
    if nd == 2:   # pytorch-grad-cam's ScoreCAM upsamples in 2D only
        out.append(("scorecam", "pytorch-grad-cam ScoreCAM",
         lambda: mx.explain(model, x, "scorecam", target=tl, layer=layer, chunk_size=16),
         lambda: _scorecam(gc, model, mod, x, targets)))
        out.append(("lrp (epsilon)", "Captum LRP (plain CNN)", lambda: mx.explain(cnn, x, "lrp", target=tl, composite="epsilon"),
                    lambda: ca.LRP(cnn).attribute(x, target=t)))
    return out


def _scorecam(gc, model, mod, x, targets):
    cam = gc.ScoreCAM(model, [mod])
    cam.batch_size = 16
    return cam(x, targets)


def median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def timed(fn) -> tuple[float, float]:
    """Wall-clock and CPU seconds of ``fn()`` (the process's CPU time: on a shared machine the wait for a core
    shows in the first only)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3, help="counted rounds")
    ap.add_argument("--warmup", type=int, default=0, help="uncounted rounds first")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smaller inputs and fewer samples (a smoke run)")
    ap.add_argument("--only", help="only the methods whose name contains this (written to peers_only.md)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from monai.networks.nets import resnet10, resnet18

    from common import machine, markdown_table, write_result
    torch.manual_seed(0)
    s2, s3 = (64, 24) if args.quick else (96, 32)
    cases = [(f"2D resnet18 4x{s2}^2", 2, resnet18(spatial_dims=2, n_input_channels=1, num_classes=2).eval(),
              torch.randn(4, 1, s2, s2), "layer4", PlainCNN().eval()),
             (f"3D resnet10 2x{s3}^3", 3, resnet10(spatial_dims=3, n_input_channels=1, num_classes=2).eval(),
              torch.randn(2, 1, s3, s3, s3), "layer4", None)]
    jobs = [(name, *p) for name, nd, model, x, layer, cnn in cases for p in pairs(nd, model, x, layer, cnn, args.quick)
            if not args.only or args.only in p[0]]
    ratios = {i: [] for i in range(len(jobs))}
    cpu_ratios = {i: [] for i in range(len(jobs))}
    secs = {i: ([], []) for i in range(len(jobs))}
    load = []
    t_all = time.perf_counter()
    for r in range(args.warmup + args.rounds):
        load.append(os.getloadavg()[0])
        for i, (_case, _m, _peer, ours, peer) in enumerate(jobs):
            if (r + i) % 2:
                (tp, cp), (to, co) = timed(peer), timed(ours)
            else:
                (to, co), (tp, cp) = timed(ours), timed(peer)
            if r >= args.warmup:
                ratios[i].append(to / tp)
                cpu_ratios[i].append(co / cp)
                secs[i][0].append(to)
                secs[i][1].append(tp)
        print(f"round {r} done ({time.perf_counter() - t_all:.0f} s)", flush=True)
    total = time.perf_counter() - t_all
    rows, short = [], []
    for i, (case, method, peer, _o, _p) in enumerate(jobs):
        med = median(ratios[i])
        rows.append([case, method, peer, f"{median(secs[i][0]):.3f}", f"{median(secs[i][1]):.3f}", f"{med:.2f}",
                     f"{min(ratios[i]):.2f}-{max(ratios[i]):.2f}", "yes" if med <= 1.05 else "**no**",
                     f"{median(cpu_ratios[i]):.2f}"])
        short.append([case.split()[0], method, peer, f"{med:.2f}"])
    header = ["case", "method", "peer", "ours s (median)", "peer s (median)", "ours / peer (median)", "range",
              "<= 1.05", "CPU time ours / peer (median)"]
    text = f"""# medexplain against the peers (bench/peers.py)

Command: `.venv/bin/python bench/peers.py --rounds {args.rounds} --warmup {args.warmup} --threads {args.threads}{' --quick' if args.quick else ''}{f' --only {args.only}' if args.only else ''}`
(total {total:.0f} s). Machine: {machine()}; {args.threads} torch thread(s); load average {min(load):.1f}-{max(load):.1f}
on {os.cpu_count()} CPUs during the run (the bench uses {args.threads}; more is other jobs): absolute seconds are noisy
under load, the ratios of back-to-back runs less so. {args.rounds} counted rounds after {args.warmup} warm-up round(s); in each round ours and the peer run back to back, the
order alternating. Models: MONAI `resnet18` (2D) and `resnet10` (3D), 1 input channel, 2 classes, random weights,
eval mode, float32; LRP on a plain 3-conv CNN (Captum's LRP has no rule for a residual sum); targets class
`i % 2` per sample. Feature methods on a 4 x 4 (x 4) grid of groups; perturbations per model call 16 on both sides.
The goal column reads the wall-clock ratio; the last column is the ratio of the process's CPU time over the
same calls (what each side computed, without the waits for a core that the other jobs cause).

{markdown_table(header, rows)}
"""
    write_result("peers_only" if args.only else "peers", text)
    print("\nREADME table:\n" + markdown_table(["case", "method", "peer", "ours / peer"], short))


if __name__ == "__main__":
    main()
