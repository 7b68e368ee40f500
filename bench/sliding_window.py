"""Full-resolution explanations through sliding-window inference (issue 17): peak memory and time.

    .venv/bin/python bench/sliding_window.py [--sizes 64 112 160] [--roi 64] [--threads 1]
    .venv/bin/python bench/sliding_window.py --budgets [--size 160] [--rounds 2]   (issue 26: memory=)

``--budgets``: whole-volume saliency at one size under ``memory=`` budgets from "everything" (every window
graph kept) through "half" and "one window" (the four full-volume arrays plus about one window call) to
"memmap" (below the arrays: they are memory-mapped files), against autograd through MONAI's
``sliding_window_inference``, and "one window" again with glibc's mmap threshold fixed
(``MALLOC_MMAP_THRESHOLD_``: the allocator's share of the peak), in rounds (each round runs every configuration once, in a fresh process each),
medians over rounds. Its section of ``bench/results/sliding_window.md`` (after ``## Memory budgets``) is
replaced; the size sweep above it is kept.

A MONAI UNet of realistic depth (5 levels, channels 8-16-32-64-128, strides 2, 2 residual units per level:
the architecture of MONAI's spleen CT bundle at half its widths; random weights) on 1 x 4 x S^3 volumes,
ROI 64^3, overlap 0.25, Gaussian blending, one window per model call. For each S: saliency and Grad-CAM
(default layer) for (a) the whole-volume region target (class 1 summed over every voxel) and (b) one small
lesion (a 6^3 cube at the volume centre), through ``mx.explain(..., inferer=SlidingWindowInferer)``
(window by window), against (c) autograd through MONAI's ``sliding_window_inference`` (saliency; a hook
on MONAI's loop cannot give a Grad-CAM of the right batch) where it fits in memory, and the reference
"one window": the network's forward + backward on one 64^3 input (S = 64 without an inferer).

Every figure is measured in a fresh Python process (imports, model and input, then the one explanation):
``peak`` is that process's maximum resident set size (``ru_maxrss``), ``base`` its RSS maximum before the
explanation (interpreter, torch, MONAI, model, input), ``work = peak - base``. Times are wall seconds of the
explanation alone, on a shared machine (other jobs running), so they are noisy. Writes
``bench/results/sliding_window.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_model():
    import torch
    from monai.networks.nets import UNet
    torch.manual_seed(0)
    return UNet(3, 4, 3, channels=(8, 16, 32, 64, 128), strides=(2, 2, 2, 2), num_res_units=2).eval()


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def worker(cfg: dict) -> dict:
    """One measurement (run in its own process)."""
    import torch
    torch.set_num_threads(cfg["threads"])
    from monai.inferers import SlidingWindowInferer, sliding_window_inference

    import medexplain as mx
    from medexplain.engine.targets import Region

    s, roi = cfg["size"], cfg["roi"]
    model = build_model()
    x = torch.randn((1, 4, s, s, s), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros((s, s, s), dtype=torch.bool)
    if cfg["target"] == "region":
        mask[:] = True
    else:
        c = s // 2
        mask[c - 3:c + 3, c - 3:c + 3, c - 3:c + 3] = True
    target = Region(1, mask)
    kw = dict(roi_size=(roi,) * 3, sw_batch_size=1, overlap=0.25, mode="gaussian")
    base = maxrss_mb()
    t0 = time.perf_counter()
    if cfg["engine"] == "windows":
        attr = mx.explain(mx.Model(model, inferer=SlidingWindowInferer(**kw)), x, cfg["method"], target=target,
                          memory=cfg.get("memory"))
    elif cfg["engine"] == "monai":
        class MonaiSW(torch.nn.Module):
            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, v):
                return sliding_window_inference(v, predictor=self.net, **kw)
        attr = mx.explain(MonaiSW(model), x, cfg["method"], target=target)
    else:  # the whole input through the network at once (the one-window reference when S = ROI)
        attr = mx.explain(model, x, cfg["method"], target=target)
    seconds = time.perf_counter() - t0
    info = attr.info
    return {**cfg, "seconds": seconds, "base_mb": base, "peak_mb": maxrss_mb(), "n_forward": info.get("n_forward"),
            "n_backward": info.get("n_backward"), "n_windows": info.get("n_windows"),
            "windows": len(info["windows"]) if isinstance(info.get("windows"), list) else None,
            "layer": info.get("layer"), "map_max": float(attr.map.abs().max()), "memory_plan": info.get("memory")}


def run(cfg: dict, timeout: float, env: dict | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **env} if env else None)
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"timeout after {timeout:.0f} s"}
    if p.returncode != 0:
        return {**cfg, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    print(json.dumps(out), flush=True)
    return out


def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 1024
    return float("inf")


def median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


#: glibc's allocator with a fixed mmap threshold (its default, 128 kB, without the dynamic raise): every block
#: above it is its own mapping, returned to the system when freed, so the resident peak is the live tensors.
STATIC_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}
ONE_STATIC = "one window, MALLOC_MMAP_THRESHOLD_=131072"


def budgets(args) -> None:
    """The ``--budgets`` section (module docstring)."""
    sys.path.insert(0, str(HERE))
    from common import machine, markdown_table

    t_all = time.perf_counter()
    common = {"roi": args.roi, "threads": args.threads, "method": "saliency", "target": "region"}
    every = run({**common, "size": args.size, "engine": "windows", "memory": 64.0}, args.timeout)
    plan = every["memory_plan"]
    arrays, probe, call = plan["volume_arrays_bytes"], plan["window_call_probe_bytes"], plan["window_call_bytes"]
    n = every["n_windows"]
    one_gb = (arrays + 1.2 * max(probe, call)) / 1e9
    configs = {"everything (64 GB)": 64.0, "half the graphs": (arrays + call * (n // 2 + 1)) / 1e9,
               "one window": one_gb, ONE_STATIC: one_gb, "memmap": 1.2 * probe / 1e9, "monai": None}
    results: dict = {k: [] for k in configs}
    load, ones = [], []
    for _ in range(args.rounds):
        # the reference varies from process to process (the allocator's layout): measured in every round
        ones.append(run({**common, "size": args.roi, "engine": "whole"}, args.timeout))
        for name, gb in configs.items():
            load.append(os.getloadavg()[0])
            cfg = {**common, "size": args.size, "engine": "monai" if name == "monai" else "windows"}
            if gb is not None:
                cfg["memory"] = gb
            results[name].append(run(cfg, args.timeout, STATIC_MMAP if name == ONE_STATIC else None))
    total = time.perf_counter() - t_all
    one_works = [r["peak_mb"] - r["base_mb"] for r in ones if "error" not in r]
    one_work = median(one_works)
    t_monai = median([r["seconds"] for r in results["monai"] if "error" not in r])
    rows = []
    for name, gb in configs.items():
        ok = [r for r in results[name] if "error" not in r]
        if not ok:
            rows.append([name, "-", "-", "-", "-", "-", "-", "-", "-", "-", results[name][0]["error"]])
            continue
        p = ok[0].get("memory_plan") or {}
        peak, work = median([r["peak_mb"] for r in ok]), median([r["peak_mb"] - r["base_mb"] for r in ok])
        sec = median([r["seconds"] for r in ok])
        rows.append([name, "-" if gb is None else f"{gb * 1e3:.0f}", p.get("kept_window_rows", "-"),
                     p.get("recomputed_window_rows", "-"), p.get("memmap", "-"), f"{peak:.0f}", f"{work:.0f}",
                     f"{one_work + arrays / 1e6:.0f}", f"{sec:.1f}",
                     f"{min(r['seconds'] for r in ok):.1f}-{max(r['seconds'] for r in ok):.1f}", f"{sec / t_monai:.2f}"])
    goal = one_work + arrays / 1e6
    works = {name: median([r["peak_mb"] - r["base_mb"] for r in results[name] if "error" not in r])
             for name in ("one window", ONE_STATIC) if any("error" not in r for r in results[name])}
    verdict = []
    for name, w in works.items():
        runs = ", ".join(f"{r['peak_mb'] - r['base_mb']:.1f}" for r in results[name] if "error" not in r)
        verdict.append(f"`{name}`: work {w:.1f} MB (runs: {runs}) against the goal {goal:.1f} MB: "
                       + (f"met, {goal - w:.1f} MB below" if w <= goal else f"{w - goal:.1f} MB ({(w - goal) / goal:.1%}) above")
                       + f" (against the smallest reference run, {min(one_works) + arrays / 1e6:.1f} MB: "
                       + f"{w - min(one_works) - arrays / 1e6:+.1f} MB)")
    header = ["budget", "memory= MB", "kept window rows", "recomputed", "memmap", "peak RSS MB (median)",
              "work MB (median)", "one window's work + 4 arrays, MB", "seconds (median)", "seconds (range)",
              "time / MONAI autograd"]
    text = f"""## Memory budgets

Command: `.venv/bin/python bench/sliding_window.py --budgets --size {args.size} --roi {args.roi} --threads {args.threads} --rounds {args.rounds}`
(total {total:.0f} s). Machine: {machine()}; {args.threads} torch thread(s) per measurement; load average
{min(load):.1f}-{max(load):.1f} on {os.cpu_count()} CPUs while it ran (the bench uses {args.threads}; more is other jobs), so times are noisy: medians of
{args.rounds} interleaved rounds, each configuration in a fresh process.

Whole-volume saliency (class 1 summed over every voxel) of the model above at S = {args.size} ({n} windows of
{args.roi}^3, `sw_batch_size=1`) under `memory=`: `everything` keeps every window graph from the forward (no
recompute), `half the graphs` about half of them, `one window` = the four full-volume arrays (input, output,
cotangent, gradient: {arrays / 1e6:.0f} MB here) plus 1.2 x one window call (the larger of its probe before
compute, {probe / 1e6:.0f} MB, and its graph measured in the forward, {call / 1e6:.0f} MB), `memmap` = 1.2 x the
probe (below the arrays: the engine's gradient array is a memory-mapped file);
`monai` = autograd through MONAI's `sliding_window_inference`. `one window's work` = the work MB of the network's
forward + backward on one {args.roi}^3 input (median {one_work:.0f} MB; runs: {', '.join(f'{w:.0f}' for w in one_works)}; a fresh
process each, in each round).

{markdown_table(header, rows)}

The one-window goal (peak <= one window's work + the four arrays): {'; '.join(verdict)}.
`{ONE_STATIC}` is the same run with glibc's mmap threshold fixed at its default (the environment variable; no
other change): glibc raises that threshold, up to 32 MB, each time a larger block is freed, so after the
first full-volume temporary every window tensor comes from the heap, and what a window's backward frees stays
resident there, fragmented. The engine holds three full-volume arrays through the backward (the output is freed
before it; the input is part of the base), reads the count map one window at a time, and trims the heap
(`malloc_trim`) between window calls (`docs/sliding_window.md`, "Memory"); what the default allocator keeps
beyond that is the difference between the two rows.
"""
    path = HERE / "results" / "sliding_window.md"
    old = path.read_text() if path.exists() else ""
    head = old.split("## Memory budgets")[0].rstrip()
    path.write_text((head + "\n\n" if head else "") + text)
    print(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", action="store_true", help="the memory= section (module docstring)")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 112, 160])
    ap.add_argument("--roi", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.budgets:
        budgets(args)
        return
    sys.path.insert(0, str(HERE))
    from common import machine, markdown_table, write_result

    t_all = time.perf_counter()
    common = {"roi": args.roi, "threads": args.threads}
    one = run({**common, "size": args.roi, "engine": "whole", "method": "saliency", "target": "region"}, args.timeout)
    one_cam = run({**common, "size": args.roi, "engine": "whole", "method": "gradcam", "target": "region"}, args.timeout)
    rows = []
    for s in args.sizes:
        for method in ("saliency", "gradcam"):
            for target in ("region", "lesion"):
                rows.append(run({**common, "size": s, "engine": "windows", "method": method, "target": target},
                                args.timeout))
        win = next(r for r in rows if r.get("size") == s and r.get("method") == "saliency" and r.get("target") == "region")
        need = (one["peak_mb"] - one["base_mb"]) * (win.get("n_windows") or 1) if "peak_mb" in one else float("inf")
        if need < 0.6 * mem_available_mb():
            rows.append(run({**common, "size": s, "engine": "monai", "method": "saliency", "target": "region"},
                            args.timeout))
        else:
            rows.append({**common, "size": s, "engine": "monai", "method": "saliency", "target": "region",
                         "error": f"not run: needs about {need / 1024:.1f} GB"})
    total = time.perf_counter() - t_all

    def row(r):
        if "error" in r:
            return [r["size"], r["engine"], r["method"], r["target"], "-", "-", "-", "-", "-", r["error"]]
        ref = one if r["method"] == "saliency" else one_cam
        return [r["size"], r["engine"], r["method"], r["target"], r.get("n_windows") or 1,
                r.get("n_backward"), f"{r['peak_mb']:.0f}", f"{r['peak_mb'] - r['base_mb']:.0f}",
                f"{r['peak_mb'] / ref['peak_mb']:.2f}", f"{r['seconds']:.1f}"]

    header = ["S", "engine", "method", "target", "windows", "n_backward", "peak RSS MB", "work MB",
              "peak / one window (same method)", "seconds"]
    table = markdown_table(header, [row(one), row(one_cam)] + [row(r) for r in rows])
    ok = [r for r in rows if "error" not in r and r["engine"] == "windows"]
    flat = {m: [f"{r['size']}: {r['peak_mb'] / (one if m == 'saliency' else one_cam)['peak_mb']:.2f}x"
                for r in ok if r["method"] == m and r["target"] == "region"] for m in ("saliency", "gradcam")}
    text = f"""# Sliding-window explanations (bench/sliding_window.py)

Command: `.venv/bin/python bench/sliding_window.py --sizes {' '.join(map(str, args.sizes))} --roi {args.roi} --threads {args.threads}`
(total {total:.0f} s). Machine: {machine()}; {args.threads} torch thread(s) per measurement, other jobs sharing the 2 cores.

Model: MONAI `UNet(3, 4, 3, channels=(8, 16, 32, 64, 128), strides=(2, 2, 2, 2), num_res_units=2)` (the
spleen CT bundle's architecture at half its widths), random weights, float32. Input 1 x 4 x S^3; ROI
{args.roi}^3, overlap 0.25, Gaussian blending, `sw_batch_size=1`. Targets: `region` = class 1 summed over every
voxel; `lesion` = class 1 summed over a 6^3 cube at the volume centre. Engines: `windows` =
`mx.explain(..., inferer=SlidingWindowInferer(...))` (the window-by-window gradient; Grad-CAM at the default
layer `{next((r['layer'] for r in ok if r.get('layer')), '?')}`); `monai` = autograd through MONAI's
`sliding_window_inference`; `whole` = the network on the whole S = {args.roi} input at once, i.e. one window's
forward + backward (the reference of the memory goal). Each row is a fresh process: `peak RSS` = its
`ru_maxrss`, `work` = peak minus its RSS before the explanation (interpreter, libraries, model, input:
{one.get('base_mb', float('nan')):.0f} MB for S = {args.roi}). `n_backward` counts window backward passes (for `whole`
and `monai`: images).

{table}

Peak / one window, whole-volume region target: saliency {', '.join(flat['saliency'])}; Grad-CAM
{', '.join(flat['gradcam'])} (goal: flat, within 1.5x).
"""
    write_result("sliding_window", text)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
