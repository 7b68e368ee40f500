"""`make bench`: every benchmark, one after the other, each writing its table to bench/results/.

    .venv/bin/python bench/run_all.py [--only NAME ...]

The commands are the ones whose figures the README and docs quote. On 2 CPU cores the whole set takes
on the order of an hour (training the zoo models the first time included); each script can be run on
its own with the arguments listed here.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {
    "baselines": ["baselines.py"],                       # issue 2: vs Captum / MONAI
    "ssplain": ["ssplain.py"],                           # issue 4
    "medcam": ["medcam.py", "--train-zoo"],              # issue 5
    "patchnet": ["patchnet.py"],                         # issue 6
    "instances": ["instances.py"],                       # issue 7
    "shapley": ["shapley.py", "--threads", "1"],         # issue 8
    "run_throughput": ["run_throughput.py"],             # issue 9
    "validity": ["validity.py"],                         # issue 10: the one table
    "cam_alignment": ["cam_alignment.py"],               # issue 16: aligned vs bilinear CAM upsampling
    "sliding_window": ["sliding_window.py"],             # issue 17: memory and time through windows
    "memory_budget": ["memory_budget.py"],               # issue 27: IG on a radiograph under a 2 GB budget
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", choices=list(BENCHES), help="run only these")
    args = ap.parse_args()
    failed = []
    for name in args.only or BENCHES:
        cmd = [sys.executable, str(HERE / BENCHES[name][0]), *BENCHES[name][1:]]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
        print(f"=== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
