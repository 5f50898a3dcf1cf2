"""Benchmark: `repgeo summarize` on 1 worker against N workers (default: every core), same store, same machine.

    .venv/bin/python bench/workers.py --store STORE [--workers 2] [--observables gride,overlap,cosine]

Each run is a fresh CLI process writing a new results store; its own "complete" line times the work after the
cluster started (the store is opened, every prompt computed and written, groups none). The ratio is 1-worker
seconds over N-worker seconds. The results of both runs are compared (they must be identical).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPGEO = os.path.join(ROOT, ".venv", "bin", "repgeo")


def summarize(store: str, out: str, workers: int, observables: str) -> float:
    run = subprocess.run([REPGEO, "summarize", "--store", store, "--out", out, "--workers", str(workers),
                          "--observables", observables], capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(run.stderr)
    return float(re.search(r"complete: .* \(([0-9.]+) s\)", run.stderr).group(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--observables", default="gride,overlap,cosine")
    args = parser.parse_args()
    import xarray as xr

    with tempfile.TemporaryDirectory() as tmp:
        seconds = {w: summarize(args.store, os.path.join(tmp, f"w{w}.zarr"), w, args.observables)
                   for w in (1, args.workers)}
        one, many = (xr.open_zarr(os.path.join(tmp, f"w{w}.zarr")) for w in (1, args.workers))
        same = all(np.array_equal(one[v].values, many[v].values, equal_nan=True) for v in one.data_vars)
    n = int(xr.open_zarr(args.store).sizes["prompt"])
    print(f"{n} prompts, observables {args.observables}")
    for w, s in seconds.items():
        print(f"{w} worker(s): {s:.1f} s ({n / s:.2f} prompts/s)")
    print(f"speed-up {args.workers} vs 1 workers: {seconds[1] / seconds[args.workers]:.2f}x; identical results: {same}")


if __name__ == "__main__":
    main()
