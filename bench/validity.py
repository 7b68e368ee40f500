"""One validity and speed table for every method on every planted task (issue 10).

    .venv/bin/python bench/validity.py [--cases N] [--tasks ...] [--methods ...] [--update]

``--update`` reruns only some rows (a method after a fix): the other rows of the result file are kept and
every command that made a row is listed, in order.

For each planted task of the zoo (2D chest radiograph, fundus, shortcut, 3D lesions, 4-contrast volumes)
and each method that applies to the task's model (``mx.available_methods(model=..., x=...)``): hit rate
and mIoU (Otsu, TP-only) with 95% bootstrap CIs against the planted evidence, deletion and insertion
areas (post-hoc accuracy for classifiers, region probability for segmenters), smoothness, sparseness,
the randomisation sanity check (Spearman of |map| with the fully randomised model's map; pass < 0.3),
seconds per case, and the time ratio against the peer implementation where one exists (Captum / MONAI,
same cases, same run).

A second table scores every method with the peer metrics (issue 19, ``medexplain.metrics``: ROAD, average
drop / increase in confidence, faithfulness correlation, monotonicity, infidelity, max-sensitivity,
SmoothMPRT, EfficientMPRT, random logit), each column marked with its direction from the metric's
``MetricInfo``; the metrics that re-explain run on ``--metric-cases`` cases.

The shortcut task is scored against the marker masks: a high hit rate there means the method shows that
the model relies on the shortcut. The 3D tasks explain one planted lesion per volume (the largest) with a
Region target on the lesion class. The labels of every task are planted (docs/data.md).
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import medexplain as mx  # noqa: E402
from common import machine, markdown_table, write_result  # noqa: E402
from medexplain import metrics as peer_metrics  # noqa: E402  (issue 19's peer metrics)
from medexplain.engine.targets import Region  # noqa: E402
from medexplain.errors import MedexplainError  # noqa: E402
from medexplain.methods.cam_layers import default_layer  # noqa: E402
from medexplain.metrics import bootstrap_ci, deletion_insertion, hit_rate, iou, randomization_check, smoothness, sparseness  # noqa: E402
from medexplain.models import zoo  # noqa: E402

warnings.filterwarnings("ignore")
TASKS_2D = ["chest_xray", "fundus", "shortcut"]
TASKS_3D = ["lesions", "contrasts"]


MEDCAM_STEPS = 100


def method_options(method: str, nd: int, layer: str) -> dict:
    """Reference defaults, with the window of occlusion scaled to the image, the CAM layer named, and
    Med-CAM's per-image training bounded to MEDCAM_STEPS steps (its default is 200)."""
    opts = {"occlusion": {"window": 8 if nd == 2 else 4, "stride": 4 if nd == 2 else 4},
            "medcam": {"steps": MEDCAM_STEPS},
            "noise_tunnel": {"nt_type": "vargrad", "n_samples": 20}}.get(method, {})   # smoothgrad has its own row
    if "layer" in (mx.registry.accepted_options(method) or ()):   # every CAM: the zoo's CAM layer
        opts = {**opts, "layer": layer}
    return opts


def peer(method: str, model, x, target_idx: torch.Tensor, layer: str, opts: dict):
    """The Captum / MONAI counterpart as a thunk, or None (classification targets only)."""
    from captum.attr import IntegratedGradients, LayerGradCam, NoiseTunnel, Occlusion, Saliency
    t = target_idx
    nd = x.ndim - 2
    if method == "saliency":
        return lambda: Saliency(model).attribute(x, target=t, abs=False)
    if method == "smoothgrad":
        sd = float((x.max() - x.min()) * 0.15)
        return lambda: NoiseTunnel(Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=50,
                                                              nt_samples_batch_size=50, stdevs=sd, target=t, abs=False)
    if method == "integrated_gradients":
        return lambda: IntegratedGradients(model).attribute(x, target=t, n_steps=50, internal_batch_size=64 * len(x))
    if method == "occlusion":
        w, s = opts["window"], opts["stride"]
        return lambda: Occlusion(model).attribute(x, sliding_window_shapes=(x.shape[1],) + (w,) * nd,
                                                  strides=(x.shape[1],) + (s,) * nd, target=t, baselines=0.0,
                                                  perturbations_per_eval=64)
    if method == "gradcam":
        return lambda: LayerGradCam(model, dict(model.named_modules())[layer]).attribute(x, target=t)
    import captum.attr as ca  # issue 19: the adapters against Captum called directly (same cases)
    direct = {"inputxgradient": ca.InputXGradient, "guided_backprop": ca.GuidedBackprop,
              "deconvolution": ca.Deconvolution, "deeplift": ca.DeepLift, "lrp": ca.LRP}
    if method in direct and not (method == "lrp" and nd == 3):  # Captum's LRP has no Conv3d rule
        return lambda: direct[method](model).attribute(x, target=t)
    return None


def task_cases(task: str, n: int):
    """(model, x, target, evidence masks, class indices or None) for n test cases with planted evidence."""
    model, ds = zoo.pretrained(task, size="demo", progress=False)
    _, test = ds.split(ds.meta_info.get("train_frac", 0.8))
    if test.labels is not None:
        keep = (test.labels == 1).nonzero().flatten()[:n]
        masks = test.marker_masks[keep] if task == "shortcut" else test.masks[keep]
        if task == "shortcut":  # only the images that carry the marker
            keep = keep[masks.flatten(1).any(1)]
            masks = test.marker_masks[keep]
        cls = test.labels[keep]
        return model, test.images[keep], cls.tolist(), masks, cls
    idx = list(range(min(n, len(test))))
    inst = test.instances[idx]
    regions = torch.zeros_like(inst, dtype=torch.bool)
    for j in range(len(idx)):  # the largest planted lesion of each volume
        ids, counts = inst[j][inst[j] > 0].unique(return_counts=True)
        regions[j] = inst[j] == ids[counts.argmax()]
    return model, test.images[idx], Region(1, regions), regions, None


def evaluate(task, method, model, x, target, masks, cls, n_sanity, extra: dict | None = None):
    """One row of the table; ``extra`` options go to the method too (bench/cam_alignment.py: ``upsample``)."""
    layer = default_layer(model, x)   # the CAMs' default rule: layer4 of the 2D ResNets, the last decoder map of the U-Nets
    opts = {**method_options(method, x.ndim - 2, layer), **(extra or {})}
    t0 = time.perf_counter()
    attr = mx.explain(model, x, method, target=target, **opts)
    secs = (time.perf_counter() - t0) / len(x)
    maps = attr.map.sum(1, keepdim=True)
    hits = hit_rate(maps, masks)
    ious = iou(maps, masks, threshold="otsu", mode="tp")
    hb, ib = bootstrap_ci(hits), bootstrap_ci(ious)
    di = deletion_insertion(model, x, maps, target)
    use_acc = cls is not None
    row = {"hit": (hb.mean[0], hb.lower[0], hb.upper[0]), "iou": (ib.mean[0], ib.lower[0], ib.upper[0]),
           "del": _auc(di, "deletion", use_acc), "ins": _auc(di, "insertion", use_acc),
           "smooth": float(smoothness(maps).mean()), "gini": float(np.nanmean(sparseness(maps).numpy())),
           "secs": secs, "maps": attr.map, "opts": opts}
    sub = slice(0, n_sanity)
    sub_target = Region(1, masks[sub]) if cls is None else target[sub]
    try:
        san = randomization_check(model, x[sub], method, target=sub_target, cascade=False, **opts)
        row["sanity"] = float(san.spearman[-1].mean())
    except MedexplainError as e:
        row["sanity"] = f"n/a ({e})"
    fn = peer(method, model, x, cls, layer, opts) if cls is not None else None
    if fn is not None:
        t0 = time.perf_counter()
        try:
            fn()
            row["ratio"] = secs * len(x) / (time.perf_counter() - t0)
        except (TypeError, RuntimeError) as e:  # e.g. Captum's LRP has no rule for AdaptiveMaxPool2d
            row["ratio"] = f"peer fails ({type(e).__name__})"
    return row


#: The peer-metric columns (issue 19): (metric, figure, header); the direction comes from the metric's MetricInfo.
PEER_COLUMNS = [("road", "morf_auc", "ROAD MoRF AUC"), ("road", "lerf_auc", "ROAD LeRF AUC"),
                ("average_drop_increase", "average_drop", "avg drop %"),
                ("average_drop_increase", "increase_in_confidence", "increase in conf. %"),
                ("faithfulness_correlation", "correlation", "faithfulness corr."),
                ("monotonicity", "fraction", "monotonic steps"), ("infidelity", "infidelity", "infidelity (normalised)"),
                ("max_sensitivity", "max_sensitivity", "max-sensitivity"), ("smooth_mprt", "last", "SmoothMPRT Spearman"),
                ("efficient_mprt", "score", "EfficientMPRT rise"), ("random_logit", "similarity", "random-logit SSIM")]
ROAD_PERCENTAGES = list(range(5, 100, 10))


def peer_metric_row(method, model, x, target, masks, cls, maps, opts, n_sub):
    """The peer metrics of one method on one task: maps-based ones on every case, the ones that re-explain
    (max-sensitivity, SmoothMPRT, EfficientMPRT, random logit) on the first ``n_sub`` cases."""
    M = peer_metrics
    n_vox = x[0, 0].numel()
    sub = slice(0, n_sub)
    sub_target = Region(1, masks[sub]) if cls is None else target[sub]
    runs = {
        "road": lambda: M.road(model, x, maps, target, percentages=ROAD_PERCENTAGES),
        "average_drop_increase": lambda: M.average_drop_increase(model, x, maps, target),
        "faithfulness_correlation": lambda: M.faithfulness_correlation(model, x, maps, target, subset_size=max(1, n_vox // 20)),
        "monotonicity": lambda: M.monotonicity(model, x, maps, target),
        "infidelity": lambda: M.infidelity(model, x, maps.sum(1, keepdim=True), target, patch_size=8, normalize=True),
        "max_sensitivity": lambda: M.max_sensitivity(model, x[sub], method, sub_target, n_samples=5, radius=0.05, method_options=opts),
        "smooth_mprt": lambda: M.smooth_mprt(model, x[sub], method, sub_target, n_samples=5, cascade=False, method_options=opts),
        "efficient_mprt": lambda: M.efficient_mprt(model, x[sub], method, sub_target, method_options=opts),
        "random_logit": lambda: M.random_logit(model, x[sub], method, sub_target, method_options=opts),
    }
    out = {}
    for name, run in runs.items():
        if n_sub < 1 and M.metric_info(name).needs == "method":
            continue
        try:
            res = run()
        except MedexplainError as e:
            out[name] = f"n/a ({type(e).__name__})"
            continue
        for metric, figure, _ in PEER_COLUMNS:
            if metric == name:
                v = res if isinstance(res, torch.Tensor) else getattr(res, figure)
                out[(metric, figure)] = float(torch.as_tensor(v, dtype=torch.float64).nanmean())
    return [out.get((m, f), out.get(m, "-")) for m, f, _ in PEER_COLUMNS]


def _auc(di, kind: str, use_acc: bool) -> float:
    """Area under the accuracy curve (classifiers) or the target-probability curve (segmenters)."""
    return float(getattr(di, f"{kind}_accuracy_auc" if use_acc else f"{kind}_auc").nanmean())


def fmt_ci(v):
    m, lo, hi = v
    return f"{m:.2f} [{lo:.2f}, {hi:.2f}]" if np.isfinite(m) else "n/a"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=24, help="2D cases per task (3D: a quarter of it)")
    ap.add_argument("--sanity-cases", type=int, default=4)
    ap.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--tasks", default=None, help="comma-separated subset of " + ",".join(TASKS_2D + TASKS_3D))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: small models are faster that way)")
    ap.add_argument("--metric-cases", type=int, default=2,
                    help="cases for the peer metrics that re-explain (0: skip those; maps-based ones use every case)")
    ap.add_argument("--no-peer-metrics", action="store_true", help="skip the peer-metric table (issue 19)")
    ap.add_argument("--name", default="validity", help="result file bench/results/<name>.md (partial runs elsewhere)")
    ap.add_argument("--update", action="store_true",
                    help="keep the rows of bench/results/<name>.md and replace only the (task, method) rows this run makes")
    args = ap.parse_args()
    command = ".venv/bin/python bench/validity.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    chosen = args.methods.split(",") if args.methods else None
    tasks = args.tasks.split(",") if args.tasks else TASKS_2D + TASKS_3D
    rows, peer_rows = [], []
    for task in tasks:
        n = args.cases if task in TASKS_2D else max(2, args.cases // 4)
        model, x, target, masks, cls = task_cases(task, n)
        # the methods that apply to this model (the registry's applies_to: no PatchNet saliency for a
        # plain CNN, no classifier-only method for a segmenter); bench/patchnet.py covers PatchNets
        applicable = mx.available_methods(model=model, x=x[:1])
        methods = [m for m in chosen if m in applicable] if chosen else applicable
        for method in methods:
            print(f"{task}: {method} on {len(x)} cases ({time.perf_counter() - start:.0f} s elapsed)", flush=True)
            try:
                r = evaluate(task, method, model, x, target, masks, cls, args.sanity_cases)
            except MedexplainError as e:
                rows.append([task, method, f"n/a: {e}"] + [""] * 9)
                continue
            san = r["sanity"]
            verdict = (f"{san:.2f} ({'pass' if san < 0.3 else 'FAIL'})" if isinstance(san, float) else san)
            rows.append([task, method, fmt_ci(r["hit"]), fmt_ci(r["iou"]), r["del"], r["ins"], r["smooth"],
                         r["gini"], verdict, r["secs"], r.get("ratio", "-"), len(x)])
            if not args.no_peer_metrics:
                peer_rows.append([task, method] + peer_metric_row(method, model, x, target, masks, cls, r["maps"],
                                                                  r["opts"], min(args.metric_cases, len(x))))
    header = ["task", "method", "hit rate [95% CI]", "mIoU Otsu TP [95% CI]", "deletion AUC (lower better)",
              "insertion AUC (higher better)", "smoothness (TV/voxel)", "sparseness (Gini)",
              "sanity Spearman (full rand.)", "s/case", "time / peer", "cases"]
    commands = [command]
    if args.update:  # a rerun of some rows (e.g. one method after a fix): the other rows stay as the earlier runs made them
        old_commands, old_rows, old_peer = read_result(args.name)
        commands = old_commands + commands
        rows, peer_rows = merge_rows(old_rows, rows), merge_rows(old_peer, peer_rows)
    said = (f"Command: `{command}`" if len(commands) == 1 else
            "Commands, in order (the rows a later run made replace the same task and method of the earlier ones): "
            + "; ".join(f"`{c}`" for c in commands))
    text = (f"# Validity and speed of every method on the planted tasks ({machine()})\n\n"
            f"{said} ({args.threads} torch thread(s); Med-CAM {MEDCAM_STEPS} steps per image; "
            f"{time.perf_counter() - start:.0f} s for the last command). Hit rate on the shortcut task is "
            "against the marker (does the map find the shortcut?); deletion/insertion areas are accuracy "
            "for classifiers and mean lesion probability for the 3D segmenters. Peers: Captum Saliency, "
            "NoiseTunnel, IntegratedGradients, Occlusion, LayerGradCam, and for issue 19's adapters InputXGradient, "
            "GuidedBackprop, Deconvolution, DeepLift and LRP (2D only) called directly, on the same cases.\n\n"
            + markdown_table(header, rows))
    if peer_rows:
        peer_header = ["task", "method"] + [f"{h} ({peer_metrics.metric_info(m).directions[f]} better)"
                                            for m, f, h in PEER_COLUMNS]
        text += (f"\n\n{PEER_SECTION}\n\n"
                 f"ROAD at {ROAD_PERCENTAGES[0]}-{ROAD_PERCENTAGES[-1]}% in steps of 10 (MoRF/LeRF areas of the target "
                 "probability), average drop / increase in confidence (the image times the min-max map), faithfulness "
                 "correlation (100 subsets of 5% of the voxels), monotonicity (share of ~100 insertion steps that do "
                 "not lower the probability), infidelity (8-voxel blocks, Captum's normalised form), all on every case; "
                 "max-sensitivity (5 draws, radius 0.05), SmoothMPRT (5 samples, fully randomised model), "
                 "EfficientMPRT and random-logit SSIM on the first `--metric-cases` case(s).\n\n"
                 + markdown_table(peer_header, peer_rows))
    write_result(args.name, text)


PEER_SECTION = "## Peer metrics (issue 19)"


def read_result(name: str):
    """(commands, rows, peer rows) of an earlier bench/results/<name>.md, cells as the strings written."""
    from common import RESULTS
    text = (RESULTS / f"{name}.md").read_text()
    main, _, peer_part = text.partition(PEER_SECTION)
    prose = main.split("\n| ", 1)[0]  # every command the earlier file names before its table, in order
    commands = list(dict.fromkeys(re.findall(r"`(\.venv/bin/python bench/validity\.py[^`]*)`", prose)))

    def table(part):
        lines = [ln for ln in part.splitlines() if ln.startswith("| ")]
        return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[1:]]  # lines[0]: the header
    return commands, table(main), table(peer_part)


def merge_rows(old: list[list], new: list[list]) -> list[list]:
    """``old`` with each (task, method) row of ``new`` put in its place, or after the last row of its task."""
    out = [list(r) for r in old]
    for row in new:
        keys = [(r[0], r[1]) for r in out]
        if (row[0], row[1]) in keys:
            out[keys.index((row[0], row[1]))] = row
        else:
            same_task = [i for i, k in enumerate(keys) if k[0] == row[0]]
            out.insert(same_task[-1] + 1 if same_task else len(out), row)
    return out


if __name__ == "__main__":
    main()
