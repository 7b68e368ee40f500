"""Throughput of ``medexplain run``: the local backend against Ray at equal cores (issue 26).

    .venv/bin/python bench/run_throughput.py [--cases 32] [--cores 2] [--repeat 3]

Writes ``bench/results/run_throughput.md`` by itself.

Workload: planted-evidence chest radiograph patches (``medexplain.data.chest_xray``, real anatomy from
pydicom's ``RG1_UNCR.dcm`` with a planted nodule; 64x64, written as 2D NIfTI with their masks), the zoo's
small MONAI ResNet classifier (untrained: throughput does not depend on the weights), methods saliency,
Grad-CAM (``layer4``) and integrated gradients (16 steps), batch size 4, hit rate against the masks.

Equal cores: the whole bench (this process, the local workers, the Ray cluster) is pinned to ``cores`` CPUs;
local = ``cores`` worker processes of one torch thread each (the local backend's default on ``cores`` cores),
Ray = ``cores`` actors of one CPU and one thread each on a local cluster of ``cores`` CPUs. Two pairs:

- warm: the local backend with its fork server already running (a second run in the same process) against
  Ray's already running cluster (as with ``--address``). Actor start-up, worker forks and model loading are
  in both.
- cold: the local backend starting its fork server (imports of torch, MONAI, medexplain, as every
  ``medexplain run`` command does) against Ray starting its cluster (``--backend ray`` without an address).

Each of the ``repeat`` rounds runs local cold, local warm and Ray warm in an order that rotates from round to
round; the Ray cold runs follow (the cluster must be stopped for them). Reported: best and median wall time,
cases/s and the ratio local / Ray on cases/s, and CPU seconds per case (this process, the workers' whole
processes and, cold, the fork server; Ray's daemons not counted), which depends less on other load. The load
average of the machine is recorded before and after each run. Outputs are checked to be identical (maps byte
for byte, table but timing) across both backends and an in-process run (one worker).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
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


def _forkserver():
    from multiprocessing import forkserver
    return forkserver._forkserver   # private: the bench stops it to time cold runs


@contextmanager
def spawned():
    """The local workers spawned (each importing torch, MONAI, medexplain itself), as before issue 26: where
    the local backend's start-up CPU went."""
    from medexplain.pipelines.run import backends
    real, backends.start_method = backends.start_method, lambda: "spawn"
    try:
        yield
    finally:
        backends.start_method = real


def one_run(csv, out: Path, backend: str, cores: int, cold: bool = False) -> dict:
    """One run: wall seconds, CPU seconds (this process + the workers' whole processes; cold local: + the fork
    server's own, its imports) and the load average around it. A cold local run stops the fork server first
    and leaves the new one running, for the warm runs."""
    shutil.rmtree(out, ignore_errors=True)
    if backend == "local" and cold:
        _forkserver()._stop()
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = run_manifest(csv, "run_throughput:model", METHODS, out, options=OPTIONS, layer="layer4", batch_size=4,
                       backend=backend, num_workers=cores)
    wall = time.perf_counter() - t0
    session = json.loads(res.record.read_text())["sessions"][-1]
    cpu = session["cpu_seconds"] + session.get("worker_cpu_seconds", 0.0)
    if backend == "local" and cold:
        fields = Path(f"/proc/{_forkserver()._forkserver_pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime
    return {"wall": wall, "cpu": cpu, "load": (load0, os.getloadavg()[0]), "session": session}


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


ROWS = (("local_spawn", "local, spawned workers (before issue 26)", "processes"),
        ("local_cold", "local, cold (starts its fork server)", "processes"),
        ("ray_cold", "ray, cold (starts its cluster)", "actors"),
        ("local_warm", "local, warm (fork server running)", "processes"),
        ("ray_warm", "ray, warm (cluster running)", "actors"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=32)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import ray

    available = sorted(os.sched_getaffinity(0))
    if args.cores > len(available):
        raise SystemExit(f"--cores {args.cores}: this process may use {len(available)} CPUs")
    os.sched_setaffinity(0, available[:args.cores])   # equal cores: Ray's processes and the workers inherit it
    work = Path(tempfile.mkdtemp(prefix="mx_run_bench_"))
    try:
        csv = write_cases(work, args.cases)
        inproc = one_run(csv, work / "out_inprocess", "local", 1)   # the reference outputs (one worker, here)
        t0 = time.perf_counter()
        ray.init(num_cpus=args.cores, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": ":".join(p for p in sys.path if p)}})
        t_cluster = time.perf_counter() - t0
        runs = {k: [] for k, _, _ in ROWS}
        order = [("local_cold", "local", True), ("local_warm", "local", False), ("ray_warm", "ray", False),
                 ("local_spawn", "local", False)]
        for r in range(args.repeat):   # interleaved; the order rotates so that no kind always comes first
            for key, backend, cold in order[r % 4:] + order[:r % 4]:
                with spawned() if key == "local_spawn" else nullcontext():
                    runs[key].append(one_run(csv, work / f"out_{key}", backend, args.cores, cold))
        ray.shutdown()
        for _ in range(args.repeat):   # `--backend ray` with no cluster: it starts (and stops) its own
            runs["ray_cold"].append(one_run(csv, work / "out_ray_cold", "ray", args.cores))
        diffs = [f"{k}: {d}" for k in runs for d in differences(work / "out_inprocess", work / f"out_{k}")]
        n = args.cases
        best = {k: min(x["wall"] for x in v) for k, v in runs.items()}
        med = {k: float(np.median([x["wall"] for x in v])) for k, v in runs.items()}
        cpu = {k: float(np.median([x["cpu"] for x in v])) for k, v in runs.items()}
        peer = {"local_spawn": "ray_cold", "local_cold": "ray_cold", "ray_cold": "ray_cold", "local_warm": "ray_warm",
                "ray_warm": "ray_warm"}
        rows = [[label, f"{args.cores} {unit} x 1 thread", best[k], n / best[k], best[peer[k]] / best[k], med[k],
                 n / med[k], med[peer[k]] / med[k], n / cpu[k], ", ".join(f"{x['wall']:.1f}" for x in runs[k])]
                for k, label, unit in ROWS]
        table = markdown_table(["backend", "cores", "best wall s", "cases/s (best)", "x Ray (best)", "median wall s",
                                "cases/s (median)", "x Ray (median)", "cases per CPU-s (median)", "all runs s"], rows)
        loads = [v for runs_k in runs.values() for x in runs_k for v in x["load"]]
        warm_best, warm_med = best["ray_warm"] / best["local_warm"], med["ray_warm"] / med["local_warm"]
        cold_best, cold_med = best["ray_cold"] / best["local_cold"], med["ray_cold"] / med["local_cold"]
        verdict = lambda r: "meets" if r >= 0.9 else "misses"  # noqa: E731
        per_run = cpu   # median CPU seconds of a run
        startup = (f"Start-up CPU (a run's median CPU seconds minus the warm local run's): spawned workers "
                   f"{per_run['local_spawn'] - per_run['local_warm']:.1f} s a run "
                   f"({(per_run['local_spawn'] - per_run['local_warm']) / args.cores:.1f} s per worker: each imports "
                   f"torch, MONAI and medexplain), the fork server "
                   f"{per_run['local_cold'] - per_run['local_warm']:.1f} s once per process; the run's own process "
                   f"{float(np.median([x['session']['cpu_seconds'] for x in runs['local_warm']])):.2f} s a warm run "
                   f"(it sleeps while the workers compute). ")
        busy = max(loads) > args.cores + 0.5   # the bench's own workers load args.cores CPUs
        text = (f"# medexplain run: local backend vs Ray at equal cores\n\n"
                f"Command: `.venv/bin/python bench/run_throughput.py --cases {n} --cores {args.cores} "
                f"--repeat {args.repeat}`\n\n"
                f"{n} chest-radiograph cases (64x64, planted nodule) x {len(METHODS)} methods "
                f"({', '.join(METHODS)}; IG 16 steps), batch size 4, MONAI ResNet (zoo.classifier_2d). "
                f"Machine: {machine()}; the bench pinned to {args.cores} of {len(available)} CPUs, the same cores "
                f"for both backends; {args.repeat} rounds, interleaved (local cold, local warm, Ray warm, local "
                f"with spawned workers, in rotating order), then {args.repeat} Ray cold runs. x Ray: Ray's wall time / local's (the "
                f"ratio of cases/s, local / Ray; 1 = equal, above 1 = local faster), against the Ray row of the same "
                f"kind (cold with cold, warm with warm; spawned workers start cold).\n\n"
                f"{table}\n\n"
                f"Goal (issue 26): the local backend >= 0.9x Ray's cases/s. Warm: {warm_best:.2f}x best, "
                f"{warm_med:.2f}x median ({verdict(min(warm_best, warm_med))}); cold: {cold_best:.2f}x best, "
                f"{cold_med:.2f}x median ({verdict(min(cold_best, cold_med))}). "
                f"{startup}"
                f"Ray cluster start on its own (before the warm rows): {t_cluster:.1f} s. "
                f"In-process run (1 worker, the outputs' reference): {inproc['wall']:.1f} s. "
                f"CPU seconds: this process plus the workers' whole processes (local: since the fork, and cold "
                f"also the fork server's imports; Ray: each actor's process, its start and imports included; "
                f"Ray's daemons not counted). "
                f"Outputs identical across the in-process run, both backends, cold and warm (maps byte for byte, "
                f"table but timing): {not diffs}" + (f" (differences: {'; '.join(diffs[:8])})" if diffs else "") + ". "
                f"Load average (1 min) of the machine around the runs: {min(loads):.1f} to {max(loads):.1f} on "
                f"{os.cpu_count()} CPUs" + ("; the machine was busy with other work, so wall times are noisy "
                                            "(best-of and CPU seconds are the steadier figures)." if busy else
                                            "; the machine was otherwise quiet."))
        write_result("run_throughput", text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
