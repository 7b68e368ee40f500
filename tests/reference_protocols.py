"""The published protocols that medexplain reproduces, written out independently for comparison, and the
measured size of every documented difference from the reference code (issue 20).

Run ``.venv/bin/python tests/reference_protocols.py`` to print the figures quoted in the "Differences from
the reference code" sections of ``docs/patchnet.md`` and ``docs/instances.md``. The tests import the
reference procedures and the synthetic cases from here (``tests/test_localisation.py``,
``tests/test_segmentation.py``).

* :func:`chexlocalize_segmentation`: CheXlocalize's Otsu segmentation of one 2D map (Saporta et al. 2022,
  ``heatmap_to_segmentation.cam_to_segmentation``) with the libraries it uses: OpenCV's ``THRESH_OTSU``
  on ``uint8(255 * minmax(map))``, ``findContours(RETR_TREE, CHAIN_APPROX_SIMPLE)``, and every contour of
  more than one point drawn as a filled PIL polygon. Needs ``opencv-python-headless`` (a test
  dependency; the library does not import OpenCV).
* :func:`chexlocalize_iou`: ``eval.calculate_iou`` (``true_pos_only`` True / False).
* :func:`synthetic_cases`: CAM-like maps (coarse random grids, bilinearly upsampled, some with noise or
  peaks) and box masks, some empty, for ``k`` classes.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F


def chexlocalize_segmentation(m: np.ndarray) -> np.ndarray:
    """CheXlocalize's Otsu segmentation of a 2D map (float32 as its pickles hold), as a bool array."""
    import cv2
    from PIL import Image, ImageDraw

    m = np.asarray(m, dtype=np.float32)
    m = m - m.min()
    if not m.max() > 0:
        return np.zeros(m.shape, bool)      # the reference divides 0 by 0; uint8(NaN) is 0: nothing predicted
    u = np.uint8(255 * (m / m.max()))
    _, binary = cv2.threshold(u, 0, int(u.max()), cv2.THRESH_OTSU)
    found = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    contours = found[0] if len(found) == 2 else found[1]
    canvas = Image.new("1", (u.shape[1], u.shape[0]))
    for c in contours:
        if len(c) > 1:
            ImageDraw.Draw(canvas).polygon([(int(p[0][0]), int(p[0][1])) for p in c], outline=1, fill=1)
    return np.array(canvas, dtype=bool)


def chexlocalize_iou(pred: np.ndarray, gt: np.ndarray, true_pos_only: bool) -> float:
    """``eval.calculate_iou``: NaN if either mask is empty (``true_pos_only``) or if both are."""
    inter, union = np.logical_and(pred, gt).sum(), np.logical_or(pred, gt).sum()
    if true_pos_only and (pred.sum() == 0 or gt.sum() == 0) or union == 0:
        return math.nan
    return inter / union


def synthetic_cases(n: int = 40, k: int = 5, size: int = 48, seed: int = 0):
    """``(maps (n, k, size, size) float32, masks (n, k, size, size) bool)``: per (case, class) a coarse
    random grid (2..11 cells a side) upsampled bilinearly, every third one sharpened (``** 4``), every
    fifth with added noise, every seventh with a second isolated peak; one box mask, empty for every
    fourth pair (a negative)."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.zeros(n, k, size, size)
    masks = torch.zeros(n, k, size, size, dtype=torch.bool)
    for i in range(n * k):
        b, c = divmod(i, k)
        h = int(torch.randint(2, 12, (1,), generator=g))
        small = torch.rand(1, 1, h, h, generator=g)
        if i % 3 == 0:
            small = small ** 4
        m = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        if i % 5 == 0:
            m = m + 0.3 * torch.rand(size, size, generator=g)
        if i % 7 == 0:
            y, x = (int(v) for v in torch.randint(0, size, (2,), generator=g))
            m[y, x] = m.max() * 1.2
        maps[b, c] = m
        if i % 4:
            y0, x0 = (int(v) for v in torch.randint(0, size - 12, (2,), generator=g))
            hh, ww = (int(v) for v in torch.randint(4, 12, (2,), generator=g))
            masks[b, c, y0:y0 + hh, x0:x0 + ww] = True
    return maps, masks


def _otsu_figures(n: int = 40, k: int = 5) -> list[str]:
    from medexplain.metrics.localisation import binarize, iou

    maps, masks = synthetic_cases(n, k)
    ref = np.stack([[chexlocalize_segmentation(maps[b, c].numpy()) for c in range(k)] for b in range(n)])
    ref_iou = np.array([[chexlocalize_iou(ref[b, c], masks[b, c].numpy(), False) for c in range(k)]
                        for b in range(n)])
    lines = [f"CheXlocalize Otsu on {n * k} synthetic maps ({n} cases x {k} classes, {maps.shape[-1]}^2 px):"]
    for rule in ("otsu", "otsu_float"):
        ours = binarize(maps, rule).numpy()
        differ = int((ours != ref).reshape(n * k, -1).any(1).sum())
        v = iou(maps, masks, threshold=rule, mode="tp_fp_fn").numpy()
        both = ~np.isnan(v) & ~np.isnan(ref_iou)
        case = float(np.abs(v - ref_iou)[both].max(initial=0.0))
        per_class = float(np.abs(np.nanmean(v, 0) - np.nanmean(ref_iou, 0)).max())
        lines.append(f"  threshold={rule!r:13s} masks differing from the reference: {differ:3d} / {n * k}; "
                     f"max |IoU difference| per case {case:.3f}, per-class mIoU {per_class:.4f}")
    return lines


def binary_shapes(n: int = 2000, seed: int = 0):
    """``n`` near-binary 2D maps (8 to 33 px a side) that stress the contour filling: random pixel sets of
    density 0.2-0.8, every other one opened or closed (holes, one-pixel diagonal links, shapes touching
    the border), with small noise or integer levels so that Otsu has something to choose."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s = int(rng.choice([8, 12, 20, 33]))
        b = rng.random((s, s)) < rng.random() * 0.6 + 0.2
        if i % 2:
            b = ndimage.binary_opening(b) if i % 4 == 1 else ndimage.binary_closing(b)
        levels = 1 + rng.integers(0, 3, (s, s)) if i % 3 == 0 else 1 + 0.01 * rng.random((s, s))
        out.append((b * levels).astype(np.float32))
    return out


def _shape_figures(n: int = 2000) -> list[str]:
    from medexplain.metrics.localisation import binarize

    differ = sum(not np.array_equal(binarize(torch.from_numpy(m)[None, None], "otsu")[0, 0].numpy(),
                                    chexlocalize_segmentation(m)) for m in binary_shapes(n))
    return [f"CheXlocalize Otsu on {n} near-binary shapes (holes, diagonal links, border contact): "
            f"masks differing from the reference: {differ}"]


def few_level_maps(n: int = 5000, seed: int = 0):
    """``n`` 2D maps (2 to 11 px a side) of 2-5 distinct levels, half of them drawn from the symmetric set
    {0, 64, 127, 128, 191, 255} / 255, a third with both extremes forced: histograms on which Otsu's
    between-class variance can tie exactly between two thresholds."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s, n_levels = int(rng.integers(2, 12)), int(rng.integers(2, 6))
        levels = rng.choice(256, n_levels, replace=False) if i % 2 else \
            rng.choice([0, 64, 127, 128, 191, 255], n_levels, replace=False)
        u = levels[rng.integers(0, n_levels, (s, s))]
        if i % 3 == 0:
            u.flat[0], u.flat[-1] = 0, 255
        out.append((u / 255).astype(np.float32))
    return out


def _tie_figures(n: int = 5000) -> list[str]:
    import cv2

    from medexplain.metrics.localisation import binarize

    maps = few_level_maps(n)
    ours = [binarize(torch.from_numpy(m)[None, None], "otsu")[0, 0].numpy() for m in maps]
    lines = [f"CheXlocalize Otsu on {n} few-level maps (exact ties of the between-class variance occur):"]
    ipp = cv2.ipp.useIPP()
    try:
        for use in (ipp, not ipp):
            cv2.ipp.setUseIPP(use)
            differ = sum(not np.array_equal(o, chexlocalize_segmentation(m)) for o, m in zip(ours, maps))
            lines.append(f"  OpenCV with Intel IPP {'on ' if use else 'off'}: masks differing from it: {differ}")
    finally:
        cv2.ipp.setUseIPP(ipp)
    return lines


def _mode_figures(n: int = 40, k: int = 5) -> list[str]:
    from medexplain.metrics.localisation import binarize, iou

    maps, masks = synthetic_cases(n, k)
    prob = torch.rand(n, k, generator=torch.Generator().manual_seed(1))
    keep = (prob >= 0.5).numpy()[..., None, None]
    pred = binarize(maps, "otsu").numpy() & keep
    lines = [f"IoU modes against CheXlocalize's calculate_iou on the same {n * k} maps (Otsu, cutoff 0.5 on "
             "random probabilities, so that false negatives occur):"]
    for tpo, modes in ((True, ("tp",)), (False, ("tp_fp_fn", "tp_fn"))):
        want = np.array([[chexlocalize_iou(pred[b, c], masks[b, c].numpy(), tpo) for c in range(k)]
                         for b in range(n)])
        for mode in modes:
            got = iou(maps, masks, threshold="otsu", mode=mode, prob=prob, cutoff=0.5).numpy()
            same = (np.isnan(got) & np.isnan(want)) | np.isclose(got, want, rtol=0, atol=1e-12)
            lines.append(f"  true_pos_only={tpo!s:5s} vs mode={mode!r:11s} mismatches: {int((~same).sum()):3d}")
    return lines


def _bootstrap_figures(n: int = 40, k: int = 5) -> list[str]:
    from medexplain.metrics.localisation import bootstrap_ci, iou

    maps, masks = synthetic_cases(n, k)
    v = iou(maps, masks, threshold="otsu", mode="tp_fp_fn")
    order = bootstrap_ci(v, n=1000, method="order-statistic", mean_of="bootstrap")
    pct = bootstrap_ci(v, n=1000, method="percentile", mean_of="point")
    srt = np.sort(order.replicates, 0)
    same = bool(np.array_equal(order.lower, srt[24]) and np.array_equal(order.upper, srt[974]))
    return [f"Bootstrap on the {n} cases' IoUs (1000 replicates, {k} classes + their mean):",
            f"  order-statistic bounds are sorted[24] and sorted[974]: {same}; |order-statistic - percentile| "
            f"lower <= {np.abs(order.lower - pct.lower).max():.1e}, upper <= {np.abs(order.upper - pct.upper).max():.1e}",
            f"  |bootstrap mean - point estimate| <= {np.abs(order.bs_mean - order.mean).max():.1e}"]


def ies_volumes(n: int = 20, size: int = 24, seed: int = 0):
    """``n`` synthetic ``(truth, probability)`` pairs ``(size,) * 3`` in float64: the truth holds eight
    0/1 cubes of radius 1-3 (27 to 343 voxels); the probability is a segmenter-like blurred copy in
    which each lesion has its own contrast ``a ~ U(0.3, 1)`` (``a * box3(lesion)``, so faint lesions come
    out as a few voxels or not at all), plus sparse spikes (specks of one to a few voxels)."""
    from scipy import ndimage

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        gt, prob = np.zeros((size,) * 3), np.zeros((size,) * 3)
        for _ in range(8):
            c = torch.randint(3, size - 3, (3,), generator=g).tolist()
            r = int(torch.randint(1, 4, (1,), generator=g))
            one = np.zeros((size,) * 3)
            one[c[0] - r:c[0] + r + 1, c[1] - r:c[1] + r + 1, c[2] - r:c[2] + r + 1] = 1.0
            gt = np.maximum(gt, one)
            prob = np.maximum(prob, (0.3 + 0.7 * float(torch.rand(1, generator=g))) * ndimage.uniform_filter(one, 3))
        spikes = torch.rand((size,) * 3, generator=g, dtype=torch.float64).numpy() ** 40
        out.append((gt, np.clip(prob + spikes, 0, 1)))
    return out


def _kinds(insts) -> tuple[int, int, int]:
    return tuple(sum(i.kind == k for i in insts) for k in ("TP", "FP", "FN"))


def _instance_figures(n: int = 20) -> list[str]:
    """Each IES edge rule alone. Rule 1 compares the two ``rules`` on 0/1 truths and continuous
    probabilities (where rules 2 and 3 cannot act); rules 2 and 3 compare two inputs under
    ``rules="reference"`` that differ only in what that rule sees (ties moved below the threshold; the
    soft truth binarised at the threshold first)."""
    from scipy import ndimage

    from medexplain.segmentation import find_instances

    vols = ies_volumes(n)
    t = 0.5
    total = {k: np.zeros(3, int) for k in ("med", "ref", "ties", "noties", "soft", "hard")}
    n_gt = 0
    for gt, prob in vols:
        n_gt += int(ndimage.label(gt, ndimage.generate_binary_structure(3, 2))[1])
        total["med"] += _kinds(find_instances(prob, t, reference=gt, rules="medexplain"))
        total["ref"] += _kinds(find_instances(prob, t, reference=gt, rules="reference"))
        q = np.round(prob * 20) / 20                                          # quantised: p == 0.5 occurs
        total["ties"] += _kinds(find_instances(q, t, reference=gt, rules="reference"))
        total["noties"] += _kinds(find_instances(np.where(q == t, t - 1e-9, q), t, reference=gt, rules="reference"))
        soft = ndimage.uniform_filter(gt, 3)                                  # a resampled-looking truth
        total["soft"] += _kinds(find_instances(prob, t, reference=soft, rules="reference"))
        total["hard"] += _kinds(find_instances(prob, t, reference=soft > t, rules="reference"))

    def f(k):
        return "TP/FP/FN " + "/".join(map(str, total[k]))

    return [f"IES instance rules, each alone, on {n} synthetic 24^3 volumes ({n_gt} true lesions; threshold 0.5):",
            f"  1 detection by any predicted voxel:  medexplain {f('med')}  vs reference {f('ref')}",
            f"  2 p == threshold kept (p in 0.05 steps): reference {f('ties')}  vs with ties dropped {f('noties')}",
            f"  3 truth >= 1.0 (truth box-filtered):  reference {f('soft')}  vs truth > threshold {f('hard')}"]


def _gradcam_figures() -> list[str]:
    from monai.networks.nets import UNet

    from medexplain.segmentation import Instance, instance_saliency

    corr = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = UNet(3, 2, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=0).double().eval()
        x = torch.randn(1, 2, 16, 16, 16, dtype=torch.float64)
        insts = []
        for lo in (2, 7, 11):
            m = torch.zeros(16, 16, 16, dtype=torch.bool)
            m[lo:lo + 3, lo:lo + 3, lo:lo + 3] = True
            insts.append(Instance(m, None, 27))
        paper = instance_saliency(model, x, insts, method="gradcam++")
        monai = instance_saliency(model, x, insts, method="gradcam++", variant="monai")
        for a, b in zip(paper, monai):
            corr.append(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]))
    return [f"Instance Grad-CAM++ paper vs monai variant (3 random MONAI UNets, 9 instances): Pearson r "
            f"{min(corr):.2f} - {max(corr):.2f} (median {float(np.median(corr)):.2f})"]


def main() -> None:
    for part in (_otsu_figures, _shape_figures, _tie_figures, _mode_figures, _bootstrap_figures, _instance_figures,
                 _gradcam_figures):
        print("\n".join(part()))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
