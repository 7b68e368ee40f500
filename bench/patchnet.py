"""MedicalPatchNet on the planted chest radiograph set (issue 6).

One command: ``python bench/patchnet.py`` (``--quick`` for a smaller run). It prints a markdown table and
writes it to ``bench/results/patchnet.md``:

1. AUROC of PatchNets (patch 16 and 32 on 64x64 images) against the image-level baseline with the same
   backbone (the zoo's MONAI ResNet, one logit, BCE), all trained with medexplain.models.training.train and the
   paper's augmentations (crop area 100% by default, so no positive loses its nodule). Goal: within 0.02.
   The PatchNets get more epochs (40 vs 25): from scratch a p=16 PatchNet sits on a loss plateau near
   0.69 for about 17 epochs, since the fixed mean over the 16 patches gives the one nodule patch 1/16 of
   the image's gradient while the 15 background patches only add noise.
2. Hit rate and mIoU (TP only; TP+FP+FN with a probability cutoff of 0.5) with 95% bootstrap intervals
   for every PatchNet's raw and scaled maps against Grad-CAM, Grad-CAM++ and Eigen-CAM on the baseline:
   the paper's Tables 2/3 in kind. Thresholds are tuned per method on a validation half of the held-out
   set and applied to the other half.
3. Shortcut variant (bright corner marker in every positive): how often the first PatchNet's map peaks
   on the marker, by the first-maximum rule and by the tie-aware rule. Goal: >= 90% of marked images.
4. Throughput of shifted saliency against the backbone alone on the same patches. Goal: >= 0.9x.

The data are **planted** (a faint blob on views of one real radiograph, pydicom-data RG1_UNCR.dcm): the
labels are not diagnostic, and the truth is where the blob was planted.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import medexplain as mx
from medexplain import data
from medexplain.data.augment import PaperAugment
from medexplain.metrics.localisation import bootstrap_ci, hit_rate, iou, tune_thresholds
from medexplain.models import zoo
from medexplain.models.patchnet import PatchNet
from medexplain.models.training import evaluate, train


def fmt(r, i=0):
    return f"{r.mean[i]:.3f} [{r.lower[i]:.3f}-{r.upper[i]:.3f}]"


def maps_for(method, pn, base, x, offset, chunk):
    if method in ("raw", "scaled"):
        return torch.cat([pn.saliency(x[i:i + chunk], target=0, kind=method, offset=offset, chunk_size=64)
                          for i in range(0, len(x), chunk)])
    return torch.cat([mx.explain(base, x[i:i + chunk], method=method, target=0, layer=zoo.cam_layer(base)).map
                      for i in range(0, len(x), chunk)])


def throughput(pn, x, offset, chunk_size, repeats):
    """Seconds for shifted saliency vs the backbone alone on exactly the patches it evaluates."""
    from medexplain.models.patchnet import shift_offsets
    p = pn.patch_size
    shifts = torch.cartesian_prod(*[torch.tensor(shift_offsets(pa, o)) for pa, o in zip(p, (offset,) * 2)])
    half = [pa // 2 for pa in p]
    xp = torch.nn.functional.pad(x, (half[1], p[1] - half[1], half[0], p[0] - half[0]))
    s = x.shape[-1]
    shifted = torch.stack([xp[:, :, h0 + a:h0 + a + s, h1 + b:h1 + b + s]
                           for (a, b), h0, h1 in zip(shifts.tolist(), [half[0]] * len(shifts), [half[1]] * len(shifts))])
    rows = [pn.patches(shifted[i:i + chunk_size].flatten(0, 1)) for i in range(0, len(shifted), chunk_size)]
    t_sal, t_bb = [], []
    with torch.no_grad():
        for rep in range(repeats + 2):                   # interleaved; the first two rounds are warm-up
            t0 = time.process_time()                     # CPU seconds of this process: other jobs on the
            for r in rows:                               # shared machine do not count
                pn.backbone(r)
            t1 = time.process_time()
            pn.saliency(x, target=0, offset=offset, chunk_size=chunk_size)
            t2 = time.process_time()
            if rep >= 2:
                t_bb.append(t1 - t0)
                t_sal.append(t2 - t1)
    n_rows = sum(len(r) for r in rows)
    ratio = statistics.median(b / s for b, s in zip(t_bb, t_sal))
    return n_rows, min(t_bb), min(t_sal), ratio


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1200, help="planted images (80% train, 10% validation, 10% test)")
    ap.add_argument("--n-shortcut", type=int, default=1200,
                    help="shortcut images (as many as the main set: with 800 the PatchNet gets fewer steps and "
                         "was still near its plateau after 40 epochs, test AUROC 0.70)")
    ap.add_argument("--epochs", type=int, default=25, help="epochs of the image-level baseline")
    ap.add_argument("--epochs-patchnet", type=int, default=40,
                    help="epochs of both PatchNets (the mean over the patch grid gives each patch 1/|G| of the "
                         "image gradient: from scratch the PatchNet sits on a loss plateau near 0.69 for ~17 "
                         "epochs before it finds the nodule)")
    ap.add_argument("--lr", type=float, default=5e-3, help="OneCycle peak learning rate (all arms)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for training and maps (1: small models run faster single-threaded here)")
    ap.add_argument("--timing-threads", type=int, default=1,
                    help="torch threads for the throughput section (1: least disturbed by other processes)")
    ap.add_argument("--patch", type=int, nargs="+", default=[16, 32],
                    help="PatchNet patch sizes; the first is the one of the shortcut and throughput sections")
    ap.add_argument("--offset", type=int, default=4, help="shift step o of the smoothed PatchNet maps")
    ap.add_argument("--amplitude", type=float, nargs=2, default=(0.3, 0.45), help="planted nodule peak range")
    ap.add_argument("--crop-min", type=float, default=1.0,
                    help="smallest area of the random resized crop (paper 0.5; 1 = no crop, which keeps the "
                         "planted nodule in every positive)")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="small run for a smoke check")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "patchnet.md"))
    a = ap.parse_args(argv)
    if a.quick:
        a.n, a.n_shortcut, a.epochs, a.epochs_patchnet, a.n_boot = 160, 120, 1, 1, 200
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    p0 = a.patch[0]

    def offset_for(p):  # the same number of shifts (p / o)^2 for every patch size
        return max(1, p * a.offset // p0)

    lines = ["# MedicalPatchNet on the planted chest radiograph set\n",
             f"Command: `python bench/patchnet.py {' '.join(sys.argv[1:] if argv is None else argv)}`  ",
             f"Data: medexplain.data.chest_xray(n={a.n}, size=64, amplitude={tuple(a.amplitude)}) (planted nodule "
             f"on views of a real radiograph; labels planted, not diagnostic); split 80/10/10 (train / threshold "
             f"tuning / test). Backbone: zoo.classifier_2d(1, 1) (MONAI ResNet), BCE, AdamW + OneCycle "
             f"(peak lr {a.lr}), {a.epochs} epochs for the baseline and {a.epochs_patchnet} for the PatchNets, batch 32, paper augmentations (crop area {a.crop_min}-1, "
             f"rotation 5 deg, brightness 0.3). PatchNet patch {' and '.join(map(str, a.patch))}; maps shifted "
             f"with offset {', '.join(str(offset_for(p)) for p in a.patch)} ({(p0 // a.offset) ** 2} shifts), border='reference'. torch.set_num_threads({a.threads}) for training and maps, "
             f"{a.timing_threads} for the throughput timing.\n"]

    # ---- 1. classification -------------------------------------------------------------------------
    ds = data.chest_xray(n=a.n, size=64, seed=0, amplitude=tuple(a.amplitude))
    tr, rest = ds.split(0.8)
    va, te = rest.split(0.5)
    models, hist = {}, {}
    arms = [("baseline", None, a.epochs)] + [(f"patchnet{p}", p, a.epochs_patchnet) for p in a.patch]
    for name, patch, epochs in arms:
        torch.manual_seed(0)
        bb = zoo.classifier_2d(1, 1)
        net = PatchNet(bb, patch) if patch else bb
        hist[name] = train(net, tr, None, epochs=epochs, batch_size=32, lr=a.lr, seed=0, loss="bce",
                           augment=PaperAugment(scale=(a.crop_min, 1.0), seed=0), description=f"training {name}")
        models[name] = net.eval()
    auc = {k: evaluate(m, te)["auroc"] for k, m in models.items()}
    lines += ["## Classification (test split)\n",
              "| model | epochs | epochs on the plateau (loss > 0.65) | final train loss | AUROC | train seconds |",
              "|---|---|---|---|---|---|"]
    for k in models:
        plateau = next((i for i, v in enumerate(hist[k]["loss"]) if v <= 0.65), len(hist[k]["loss"]))
        lines.append(f"| {'PatchNet p=' + k[8:] if k.startswith('patchnet') else 'image-level baseline'} | "
                     f"{hist[k]['epochs']} | {plateau} | {hist[k]['loss'][-1]:.3f} | {auc[k]:.3f} | "
                     f"{hist[k]['seconds']:.0f} |")
        print(lines[-1], flush=True)
    lines.append("")
    for p in a.patch:
        diff = auc[f"patchnet{p}"] - auc["baseline"]
        lines.append(f"AUROC difference PatchNet p={p} - baseline: {diff:+.3f} (goal |diff| <= 0.02: "
                     f"{'met' if abs(diff) <= 0.02 else 'MISSED'})  ")
    lines.append("")

    # ---- 2. localisation ---------------------------------------------------------------------------
    base = models["baseline"]
    methods = {f"PatchNet p={p} {kind}": (kind, f"patchnet{p}") for p in a.patch for kind in ("raw", "scaled")}
    methods.update({"Grad-CAM": ("gradcam", "baseline"), "Grad-CAM++": ("gradcam++", "baseline"),
                    "Eigen-CAM": ("eigencam", "baseline")})
    with torch.no_grad():
        prob = {"va": {k: torch.sigmoid(m(va.images))[:, 0] for k, m in models.items()},
                "te": {k: torch.sigmoid(m(te.images))[:, 0] for k, m in models.items()}}
    lines += ["## Localisation (test split; 95% bootstrap CI, 1000 case resamples)\n",
              f"Hit rate on the {int(te.labels.sum())} positive test images (first maximum, CheXlocalize's rule; "
              "'any': some maximal pixel lies in the mask, which forgives the o x o blocks of a shifted patch map "
              "and is lenient by as much); mIoU TP-only and TP+FP+FN with "
              f"thresholds tuned per method on the validation split ({len(va)} images; TP+FP+FN uses a "
              "probability cutoff of 0.5, so a negative predicted positive is an FP scoring 0 and a missed "
              "positive an FN scoring 0), and TP-only with Otsu (CheXlocalize's default).\n",
              "| method | hit rate | hit rate, ties 'any' | mIoU TP (tuned) | mIoU TP+FP+FN (tuned, cutoff 0.5) | "
              "mIoU TP (Otsu) |", "|---|---|---|---|---|---|"]
    t_maps = {}
    for label, (method, owner) in methods.items():
        pn = models[owner]
        off = offset_for(pn.patch_size[0]) if owner != "baseline" else None
        t0 = time.perf_counter()
        mv = maps_for(method, pn, base, va.images, off, 16)
        mt = maps_for(method, pn, base, te.images, off, 16)
        t_maps[label] = time.perf_counter() - t0
        hr = bootstrap_ci(hit_rate(mt, te.masks), n=a.n_boot)
        hr_any = bootstrap_ci(hit_rate(mt, te.masks, ties="any"), n=a.n_boot)
        th_tp = tune_thresholds(mv, va.masks, mode="tp")
        th_all = tune_thresholds(mv, va.masks, mode="tp_fp_fn", prob=prob["va"][owner], cutoff=0.5)
        tp = bootstrap_ci(iou(mt, te.masks, threshold=th_tp, mode="tp"), n=a.n_boot)
        allm = bootstrap_ci(iou(mt, te.masks, threshold=th_all, mode="tp_fp_fn", prob=prob["te"][owner],
                                cutoff=0.5), n=a.n_boot)
        otsu = bootstrap_ci(iou(mt, te.masks, threshold="otsu", mode="tp"), n=a.n_boot)
        lines.append(f"| {label} | {fmt(hr)} | {fmt(hr_any)} | {fmt(tp)} (t={float(th_tp[0]):.2f}) | {fmt(allm)} "
                     f"(t={float(th_all[0]):.2f}) | {fmt(otsu)} |")
        print(lines[-1], flush=True)

    # ---- 3. shortcut -------------------------------------------------------------------------------
    dss = data.chest_xray(n=a.n_shortcut, size=64, seed=1, shortcut=True, amplitude=tuple(a.amplitude))
    str_, ste = dss.split(0.8)
    torch.manual_seed(0)
    spn = PatchNet(zoo.classifier_2d(1, 1), p0)
    train(spn, str_, None, epochs=a.epochs_patchnet, batch_size=32, lr=a.lr, seed=0, loss="bce",
          augment=PaperAugment(scale=(a.crop_min, 1.0), seed=0), description="training shortcut PatchNet")
    marked = ste.marker_masks.flatten(1).any(1)
    xs, mk = ste.images[marked], ste.marker_masks[marked]
    s_auc = evaluate(spn, ste)["auroc"]
    lines += ["\n## Shortcut variant (marker in every positive, weak nodule)\n",
              f"PatchNet p={p0} trained on {len(str_)} images (test AUROC {s_auc:.3f}); share of the "
              f"{int(marked.sum())} marked test images whose map peaks on the marker (goal >= 0.90). 'first': "
              "CheXlocalize's first maximum in C order, which on a map of constant patch blocks is the top-left "
              "pixel of the best block; 'any': some pixel where the map is maximal lies on the marker (for the "
              "plain map: the patch with the highest logit contains the marker).\n",
              "| map | peak on marker (first) | peak on marker (any) | peak on nodule (first) | peak on nodule (any) |",
              "|---|---|---|---|---|"]
    shortcut_hits = {}
    for label, kw in (("raw, plain patches (no shift)", {}),
                      (f"raw, offset {a.offset}, border reference", {"offset": a.offset}),
                      (f"raw, offset {a.offset}, border coverage", {"offset": a.offset, "border": "coverage"})):
        m = torch.cat([spn.saliency(xs[i:i + 16], target=0, **kw) for i in range(0, len(xs), 16)])
        hits = [float(torch.nanmean(hit_rate(m, where, ties=t))) for where in (mk, ste.masks[marked])
                for t in ("first", "any")]
        shortcut_hits[label] = hits[1]
        lines.append(f"| {label} | " + " | ".join(f"{h:.3f}" for h in hits) + " |")
        print(lines[-1], flush=True)
    plain = shortcut_hits["raw, plain patches (no shift)"]
    lines.append(f"\nPlain patch map, 'any' rule: {plain:.3f} (goal >= 0.90: {'met' if plain >= 0.9 else 'MISSED'}). "
                 "The shifted maps peak on the marker less often; a likely reason is that they pad the shifted image "
                 "with zeros, so most windows that hold a corner marker also hold up to p/2 px of zero "
                 "padding, which training images do not show.\n")

    # ---- 4. throughput -----------------------------------------------------------------------------
    torch.set_num_threads(a.timing_threads)
    n_rows, t_bb, t_sal, ratio = throughput(models[f"patchnet{p0}"], te.images[:8], a.offset, 64, 9)
    torch.set_num_threads(a.threads)
    lines += ["\n## Shifted saliency throughput\n",
              f"PatchNet p={p0}, 8 images, offset {a.offset} ({(p0 // a.offset) ** 2} shifts), chunks of 64 shifted images: "
              f"{n_rows} patch rows, {a.timing_threads} torch thread(s). "
              "9 interleaved rounds after 2 warm-up rounds, CPU seconds of this process (time.process_time): "
              "fastest time of each, ratio = median over rounds of backbone seconds / saliency seconds.\n",
              "| what | seconds | patch rows / s |", "|---|---|---|",
              f"| backbone alone on the same patches | {t_bb:.3f} | {n_rows / t_bb:.0f} |",
              f"| PatchNet.saliency (shift, run, assemble) | {t_sal:.3f} | {n_rows / t_sal:.0f} |",
              f"\nThroughput ratio {ratio:.2f}x (goal >= 0.9x: {'met' if ratio >= 0.9 else 'MISSED'}).",
              "\nMap seconds (validation + test): " + ", ".join(f"{k} {v:.1f}" for k, v in t_maps.items()),
              f"\nTotal bench time {time.perf_counter() - t_start:.0f} s (2 shared CPU cores)."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
