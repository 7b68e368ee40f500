"""Throughput of ``medexplain run``: the Ray backend against the local backend at equal cores.

    .venv/bin/python bench/run_throughput.py [--cases 32] [--cores 2] [--repeat 3]

Workload: planted-evidence chest radiograph patches (``medexplain.data.chest_xray``, real anatomy from
pydicom's ``RG1_UNCR.dcm`` with a planted nodule; 64x64, written as 2D NIfTI with their masks), the zoo's
small MONAI ResNet classifier (untrained: throughput does not depend on the weights), methods saliency,
Grad-CAM (``layer4``) and integrated gradients (16 steps), batch size 4, hit rate against the masks.

Equal cores: local = ``cores`` worker processes of one torch thread each (the local backend's default on a
machine of ``cores`` cores); Ray = ``cores`` actors of one CPU and one thread each, on a local Ray cluster
limited to ``cores`` CPUs. Ray's throughput is measured on an already
started cluster (as with ``--address``: the cluster outlives runs), actor start-up and model loading
included; the one-off cluster start is reported on its own. ``repeat`` runs each, alternating; best and
median wall time, and cases per CPU-second (robust to other load on a shared machine).
The goal (issue 26): local within 10% of Ray's cases/s. Both backends' outputs are checked to be identical.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, markdown_table, write_result  # noqa: E402
from medexplain import data, io  # noqa: E402
from medexplain.pipelines.run import read_table, run_manifest  # noqa: E402

METHODS = ["saliency", "gradcam", "integrated_gradients"]
OPTIONS = {"integrated_gradients.steps": 16}


def model():
    """The benchmark model (``run_throughput:model`` for the run): the zoo's 2D classifier, seed 0."""
    from medexplain.models import zoo
    torch.manual_seed(0)
    return zoo.classifier_2d(1, 2).eval()


def write_cases(folder: Path, n: int) -> Path:
    ds = data.chest_xray(n=n, size=64, seed=0)
    rows = ["image,mask,label"]
    for i in range(n):
        io.write_nifti(ds.images[i], folder / f"cxr{i:03d}.nii.gz")
        io.write_nifti(ds.masks[i].to(torch.uint8), folder / f"cxr{i:03d}_mask.nii.gz")
        rows.append(f"cxr{i:03d}.nii.gz,cxr{i:03d}_mask.nii.gz,{int(ds.labels[i])}")
    (folder / "cases.csv").write_text("\n".join(rows) + "\n")
    return folder / "cases.csv"


def one_run(csv, out: Path, backend: str, cores: int) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process + its worker processes or the Ray workers; Ray's own daemons
    not counted)."""
    shutil.rmtree(out, ignore_errors=True)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    child0 = children.ru_utime + children.ru_stime
    t0 = time.perf_counter()
    res = run_manifest(csv, "run_throughput:model", METHODS, out, options=OPTIONS, layer="layer4", batch_size=4,
                       backend=backend, num_workers=cores)
    wall = time.perf_counter() - t0
    session = json.loads(res.record.read_text())["sessions"][-1]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    local_workers = children.ru_utime + children.ru_stime - child0 if backend == "local" else 0.0
    return wall, session["cpu_seconds"] + session.get("worker_cpu_seconds", 0.0) + local_workers


def differences(a: Path, b: Path) -> list[str]:
    """Items whose map bytes or table values (timing aside) differ between two runs."""
    out = []
    for ra, rb in zip(read_table(a / "results.csv"), read_table(b / "results.csv")):
        out += [f"{ra['case_id']}/{ra['method']}: {k}" for k in ra if k != "seconds" and ra[k] != rb[k]]
    for p in sorted(a.rglob("*.nii.gz")):
        q = b / p.relative_to(a)
        if not q.is_file() or p.read_bytes() != q.read_bytes():
            out.append(f"map {p.relative_to(a)}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=32)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="mx_run_bench_"))
    try:
        csv = write_cases(work, args.cases)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        ray.init(num_cpus=args.cores, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": ":".join(p for p in sys.path if p)}})
        t_cluster = time.perf_counter() - t0
        runs = {"local": [], "ray": []}  # (wall s, cpu s), alternating so both see the same load
        for _ in range(args.repeat):
            for backend in ("local", "ray"):
                runs[backend].append(one_run(csv, work / f"out_{backend}", backend, args.cores))
        ray.shutdown()
        # a cold run: `--backend ray` with no cluster yet, its start included
        cold, cold_cpu = one_run(csv, work / "out_ray_cold", "ray", args.cores)
        diffs = differences(work / "out_local", work / "out_ray") + differences(work / "out_local", work / "out_ray_cold")
        load_after = os.getloadavg()[0]
        n = args.cases
        best = {k: min(w for w, _ in v) for k, v in runs.items()}
        med = {k: float(np.median([w for w, _ in v])) for k, v in runs.items()}
        cpu = {k: min(c for _, c in v) for k, v in runs.items()}
        rows = []
        for k, label, cores in (("local", "local (worker processes)", f"{args.cores} processes x 1 thread"),
                                ("ray", "ray, running cluster", f"{args.cores} actors x 1 thread")):
            rows.append([label, cores, best[k], n / best[k], (n / best[k]) / (n / best["local"]), med[k],
                         (n / med[k]) / (n / med["local"]), n / cpu[k], (n / cpu[k]) / (n / cpu["local"]),
                         ", ".join(f"{w:.1f}" for w, _ in runs[k])])
        rows.append(["ray, cold (starts its cluster)", f"{args.cores} actors x 1 thread", cold, n / cold,
                     best["local"] / cold, cold, med["local"] / cold, n / cold_cpu, cpu["local"] / cold_cpu, f"{cold:.1f}"])
        table = markdown_table(["backend", "cores", "best wall s", "cases/s (best)", "x local (best)", "median wall s",
                                "x local (median)", "cases per CPU-s", "x local (CPU)", "all runs s"], rows)
        ratio = best["ray"] / best["local"]   # local cases/s relative to Ray's
        verdict = "meets" if ratio >= 0.9 else "misses"
        text = (f"# medexplain run: Ray vs local backend at equal cores\n\n"
                f"Command: `.venv/bin/python bench/run_throughput.py --cases {n} --cores {args.cores} --repeat {args.repeat}`\n\n"
                f"{n} chest-radiograph cases (64x64, planted nodule) x {len(METHODS)} methods "
                f"({', '.join(METHODS)}; IG 16 steps), batch size 4, MONAI ResNet (zoo.classifier_2d). "
                f"Machine: {machine()}; {args.cores} cores for each backend; {args.repeat} runs each, alternating.\n\n"
                f"{table}\n\n"
                f"Ray cluster start (one-off, not in the running-cluster rows): {t_cluster:.1f} s. "
                f"Goal local >= 0.9x Ray's cases/s (best wall time, running cluster): {verdict} ({ratio:.2f}x). "
                f"CPU seconds: this process plus its worker processes or the Ray workers (Ray's daemons not "
                f"counted; local includes the workers' spawn and imports), a measure that "
                f"does not depend on how busy the machine is. "
                f"Outputs of both backends identical (maps byte for byte, table but timing): {not diffs}"
                + (f" (differences: {'; '.join(diffs[:8])})" if diffs else "") + ". "
                f"Load average of the machine (shared with other work) before/after: {load_before:.1f} / "
                f"{load_after:.1f} on {os.cpu_count()} CPUs.")
        write_result("run_throughput", text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
