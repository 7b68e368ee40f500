"""Memory as a checked cost (issue 27): integrated gradients on a full-size radiograph under a memory budget.

    .venv/bin/python bench/memory_budget.py [--size 1955 1841] [--budget 2] [--steps 16] [--threads 1]

Before issue 27, integrated gradients sent up to ``chunk_size=64`` integration steps of a 1955 x 1841
radiograph through the model in one call, and ``run`` was killed by the kernel at 20.5 GB with no message.
Now each method's plan measures the peak of one model call on a probe row
(:func:`medexplain.engine.options.probe_row_bytes`), caps ``chunk_size`` to the budget and refuses before any compute
when one row does not fit (:func:`medexplain.engine.options.plan_memory`).

Model: a slim MONAI ResNet (basic blocks, one per stage, widths 16-32-64-128, the usual 7x7 stride-2 stem and
max-pool), 1 input channel, 2 classes, random weights, float32: a radiograph classifier small enough to run
here. Input 1 x 1 x H x W uniform noise. Every row of the table is a fresh Python process: ``peak`` is its
maximum resident set size (``ru_maxrss``), ``base`` its RSS maximum before the measured call (interpreter,
torch, MONAI, model, input), ``work = peak - base``:

- ``forward``: the model's own forward of the one image, no gradients (the "model's own forward" of the goal);
- ``forward+backward``: one saliency map (one row forward and backward), what the probe estimates;
- ``IG, budget B``: ``mx.explain(model, x, "integrated_gradients", steps=S, memory=B)``;
- ``IG, budget 1 GB``: below one row: refused before compute (:class:`~medexplain.errors.MemoryBudgetError`),
  on the probe of a centre crop alone.

The goal: IG under a budget of B GB completes (or refuses before compute) with ``work <= B + work(forward)``.
The uncapped call (``chunk_size=64``) is not run (it would take the estimated 64 x bytes per row, beyond this
machine); its estimate is stated. Writes ``bench/results/memory_budget.md``.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_model():
    import torch
    from monai.networks.nets import ResNet
    torch.manual_seed(0)
    return ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[16, 32, 64, 128], spatial_dims=2,
                  n_input_channels=1, num_classes=2).eval()


def maxrss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # kilobytes on Linux


def worker(cfg: dict) -> dict:
    """One measurement (run in its own process)."""
    import torch
    torch.set_num_threads(cfg["threads"])
    import medexplain as mx
    from medexplain.engine.options import MemoryBudgetError, probe_row_bytes

    model = build_model()
    x = torch.rand((1, 1, *cfg["size"]), generator=torch.Generator().manual_seed(1))
    base = maxrss_gb()
    t0 = time.perf_counter()
    res = {}
    if cfg["what"] == "forward":
        with torch.no_grad():
            model(x)
    elif cfg["what"] == "forward+backward":
        attr = mx.explain(model, x, "saliency", target=1, memory=1000)
        res["n_forward"] = attr.info["n_forward"]
    elif cfg["what"] == "probe":
        res["bytes_per_row"] = probe_row_bytes(model, x)
    else:
        try:
            attr = mx.explain(model, x, "integrated_gradients", target=1, steps=cfg["steps"], memory=cfg["budget"])
            res.update(n_forward=attr.info["n_forward"], rows_per_call=attr.info["memory"]["rows_per_call"],
                       bytes_per_row=attr.info["memory"]["bytes_per_row"], outcome="completed")
        except MemoryBudgetError as e:
            res.update(outcome=f"refused before compute: {str(e).split('; nothing was computed')[0]}")
    res.update(seconds=time.perf_counter() - t0, base_gb=base, peak_gb=maxrss_gb())
    return res


def measure(cfg: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, nargs=2, default=[1955, 1841])
    ap.add_argument("--budget", type=float, default=2.0, help="GB")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    sys.path.insert(0, str(HERE))
    from common import machine, markdown_table, write_result

    t_all = time.perf_counter()
    common = {"size": args.size, "threads": args.threads, "steps": args.steps}
    runs = [("forward", {"what": "forward"}), ("forward+backward (saliency)", {"what": "forward+backward"}),
            ("probe only", {"what": "probe"}),
            (f"IG steps={args.steps}, budget {args.budget:g} GB", {"what": "ig", "budget": args.budget}),
            ("IG, budget 1 GB", {"what": "ig", "budget": 1.0})]
    got = {}
    for name, cfg in runs:
        got[name] = r = measure({**common, **cfg})
        print(name, r, flush=True)
    fwd = got["forward"]
    ig = got[f"IG steps={args.steps}, budget {args.budget:g} GB"]
    rows = []
    for name, r in got.items():
        work = r["peak_gb"] - r["base_gb"]
        rows.append([name, r.get("outcome", "completed"), r.get("rows_per_call", "-"), r.get("n_forward", "-"),
                     round(r["base_gb"], 2), round(r["peak_gb"], 2), round(work, 2), round(r["seconds"], 1)])
    per_row = got["probe only"]["bytes_per_row"] / 1e9
    fwd_work = fwd["peak_gb"] - fwd["base_gb"]
    ig_work = ig["peak_gb"] - ig["base_gb"]
    fb_work = got["forward+backward (saliency)"]["peak_gb"] - got["forward+backward (saliency)"]["base_gb"]
    ok = ig_work <= args.budget + fwd_work
    cmd = (f".venv/bin/python bench/memory_budget.py --size {args.size[0]} {args.size[1]} --budget {args.budget:g} "
           f"--steps {args.steps} --threads {args.threads}")
    text = f"""# Memory as a checked cost (bench/memory_budget.py)

Command: `{cmd}` (total {time.perf_counter() - t_all:.0f} s). Machine: {machine()}; {args.threads} torch thread(s)
per measurement, other jobs sharing the 2 cores. GB = 10^9 bytes.

Model: a slim MONAI ResNet (basic blocks, one per stage, widths 16-32-64-128, 7x7 stride-2 stem, max-pool),
1 channel in, 2 classes, random weights, float32. Input 1 x 1 x {args.size[0]} x {args.size[1]} (a full-size
radiograph). Each row is a fresh process: `base` = its RSS maximum before the call (interpreter, libraries,
model, input), `peak` = its `ru_maxrss`, `work = peak - base`.

{markdown_table(["call", "outcome", "rows per call", "rows forward", "base GB", "peak GB", "work GB", "seconds"], rows)}

- The probe's estimate of one model call: **{per_row:.2f} GB per row** (saved tensors + input, output and
  input gradient + twice the largest saved tensor); measured work of one row forward and backward
  (saliency): {fb_work:.2f} GB.
- Integrated gradients with the default `chunk_size=64` would send 64 rows per call: an estimated
  {64 * per_row:.0f} GB (the kernel killed `run` at 20.5 GB in the audit). Under a {args.budget:g} GB budget the plan
  caps it to {ig.get('rows_per_call', '-')} row(s) per call.
- Goal: work of IG under {args.budget:g} GB <= budget + the model's own forward ({fwd_work:.2f} GB):
  {ig_work:.2f} <= {args.budget + fwd_work:.2f}: **{'met' if ok else 'NOT met'}**.
- Under 1 GB (less than one row) the call is refused before any compute, naming `--memory`, `--roi-size`
  and `--spacing`; its cost is the probe of a centre crop (about a quarter of each side, scaled by the voxel
  count: {got['IG, budget 1 GB'].get('outcome', '').split('needs ~')[-1].split(' in one')[0]} estimated for the
  full row), so the refusal itself stays within the budget.
"""
    write_result("memory_budget", text)


if __name__ == "__main__":
    main()
