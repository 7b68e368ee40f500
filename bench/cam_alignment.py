"""Receptive-field aligned vs bilinear CAM upsampling (issue 16).

    .venv/bin/python bench/cam_alignment.py [--cases 64] [--validity-cases 12] [--sanity-cases 3] [--no-validity]

1. **The demo model** (``zoo.pretrained("chest_xray", size="demo")``, the classifier ``make demo``
   explains) on its first ``--cases`` planted positive test images: every CAM member at ``layer4`` (the
   default layer; an 8x8 map on the 64x64 input) with ``upsample="aligned"`` (the default) and
   ``upsample="bilinear"`` (MONAI's and pytorch-grad-cam's placement): hit rate (pointing game, first
   maximum) with its 95% bootstrap interval, and where the map's peak lies relative to the planted
   nodule's centre (mean signed offset in rows and columns, mean distance, in pixels).
2. **The validity table's CAM rows** (``bench/validity.py``'s ``evaluate``, the same metrics and cases)
   on every planted task, aligned beside bilinear.

Writes ``bench/results/cam_alignment.md``. The labels of every task are planted (docs/data.md).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import medexplain as mx  # noqa: E402
import validity  # noqa: E402
from common import machine, markdown_table, write_result  # noqa: E402
from medexplain.errors import MedexplainError  # noqa: E402
from medexplain.methods.cam_layers import layer_plan  # noqa: E402
from medexplain.metrics import bootstrap_ci, hit_rate  # noqa: E402
from medexplain.models import zoo  # noqa: E402

warnings.filterwarnings("ignore")
CAMS = ["gradcam", "gradcam++", "eigencam", "hirescam", "xgradcam", "layercam", "gradcam_elementwise", "scorecam",
        "ablationcam"]
MODES = ("aligned", "bilinear")


def demo_cases(n: int):
    """The demo classifier and its first ``n`` planted positive test images, masks and nodule centres."""
    model, ds = zoo.pretrained("chest_xray", size="demo", progress=False)
    _, test = ds.split(ds.meta_info.get("train_frac", 0.8))
    sub = test.subset((test.labels == 1).nonzero().flatten()[:n])
    centres = torch.tensor([m["nodules"][0]["center"] for m in sub.meta], dtype=torch.float64)
    return model, sub.images, sub.masks, centres


def peak_offsets(maps: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``(B, 2)`` signed (row, col) offsets of each map's first maximum from the nodule centre."""
    flat = maps[:, 0].flatten(1).argmax(1)
    w = maps.shape[-1]
    peak = torch.stack([flat // w, flat % w], 1).to(torch.float64)
    return peak - centres


def demo_table(n: int):
    model, x, masks, centres = demo_cases(n)
    plan = layer_plan(model, x)        # the default rule's layer
    assert plan.name == "layer4", plan.name
    rows = []
    for method in CAMS:
        for mode in MODES:
            t0 = time.perf_counter()
            attr = mx.explain(model, x, method, target=1, layer="layer4", upsample=mode)
            secs = time.perf_counter() - t0
            hits = hit_rate(attr.map, masks)
            ci = bootstrap_ci(hits)
            off = peak_offsets(attr.map, centres)
            rows.append([method, mode, f"{ci.mean[0]:.3f} [{ci.lower[0]:.2f}, {ci.upper[0]:.2f}]",
                         f"{int(hits.nansum())}/{int((~hits.isnan()).sum())}", float(off[:, 0].mean()),
                         float(off[:, 1].mean()), float(off.norm(dim=1).mean()), secs / len(x)])
            print(f"{method:<20} {mode:<8} hit {rows[-1][2]}  offset rows {rows[-1][4]:+.2f} cols {rows[-1][5]:+.2f}",
                  flush=True)
    header = ["method", "upsample", "hit rate [95% CI]", "hits", "peak - nodule, rows (px)", "peak - nodule, cols (px)",
              "mean distance (px)", "s/image"]
    centres_txt = ", ".join(f"cell i at {o:g} + {s:g} i" for o, s in plan.centres)
    bil = ", ".join(f"{(s - 1) / 2:g} + {s:g} i" for _, s in plan.centres)
    head = (f"Demo classifier (zoo chest_xray/demo), layer4 ({plan.chosen}), its first {len(x)} planted "
            f"positive test images (64x64, target class 1). Cell centres from the graph ({plan.geometry}): rows / cols "
            f"{centres_txt}; bilinear upsampling (align_corners=False) places them at {bil}. Random baseline (mean mask "
            f"area): {float(masks.flatten(1).float().mean()):.3f}.")
    return head, markdown_table(header, rows)


def validity_table(n_cases: int, n_sanity: int):
    rows = []
    for task in validity.TASKS_2D + validity.TASKS_3D:
        n = n_cases if task in validity.TASKS_2D else max(2, n_cases // 4)
        model, x, target, masks, cls = validity.task_cases(task, n)
        applicable = mx.available_methods(model=model, x=x[:1])
        layer = layer_plan(model, x).name
        for method in [m for m in CAMS if m in applicable]:
            for mode in MODES:
                print(f"{task}: {method} ({mode}) on {len(x)} cases", flush=True)
                try:
                    r = validity.evaluate(task, method, model, x, target, masks, cls, n_sanity, extra={"upsample": mode})
                except MedexplainError as e:
                    rows.append([task, method, mode, f"n/a: {e}"] + [""] * 7)
                    continue
                san = r["sanity"]
                verdict = f"{san:.2f} ({'pass' if san < 0.3 else 'FAIL'})" if isinstance(san, float) else san
                rows.append([task, method, mode, layer, validity.fmt_ci(r["hit"]), validity.fmt_ci(r["iou"]), r["del"],
                             r["ins"], verdict, r["secs"], len(x)])
    header = ["task", "method", "upsample", "layer", "hit rate [95% CI]", "mIoU Otsu TP [95% CI]",
              "deletion AUC (lower better)", "insertion AUC (higher better)", "sanity Spearman (full rand.)", "s/case",
              "cases"]
    return markdown_table(header, rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=64, help="planted positives of the demo model")
    ap.add_argument("--validity-cases", type=int, default=12, help="2D cases per task in the validity rows (3D: a quarter)")
    ap.add_argument("--sanity-cases", type=int, default=3)
    ap.add_argument("--no-validity", action="store_true", help="only the demo-model table")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    head, demo = demo_table(args.cases)
    text = (f"# CAM upsampling: receptive-field aligned vs bilinear ({machine()})\n\n"
            f"Command: `.venv/bin/python bench/cam_alignment.py --cases {args.cases} --validity-cases "
            f"{args.validity_cases} --sanity-cases {args.sanity_cases}` ({args.threads} torch thread(s)).\n\n"
            f"## The demo model\n\n{head}\n\n{demo}\n")
    if not args.no_validity:
        text += ("\n## The validity table's CAM rows, aligned beside bilinear\n\n"
                 "`bench/validity.py`'s metrics on the same planted cases (the shortcut task is scored against the "
                 "marker; the 3D tasks explain the largest planted lesion per volume with a Region target). Layer: the "
                 "default rule (layer4 of the 2D ResNets, the last decoder map of the 3D U-Nets).\n\n"
                 + validity_table(args.validity_cases, args.sanity_cases) + "\n")
    write_result("cam_alignment", text)


if __name__ == "__main__":
    main()
