"""Benchmark: `repgeo summarize` against the token-geometry study's summarize algorithm.

On the same 1024-token SmolLM2 prompts (one activation store: float32 by default, or `--dtype float16`, what
`repgeo extract` writes by default) and the same 2 cores:

- baseline: the study's published summarize script, re-implemented here from a description of what it does
  (not its code), with the matrices of its extraction step computed in-process instead of loaded from disk.
  Per prompt, for every layer l = 0..L of hidden[prompt, l, :n] as float32 (the study's hidden states):
    * extraction step: the (token, token) float32 distance matrix (sklearn `pairwise_distances`) and cosine
      similarity matrix (sklearn `cosine_similarity`);
    * GRIDE at layers 1..L (not the embedding layer): duplicate tokens dropped with
      `np.unique(D, axis=0, return_index=True)` on the distance-matrix rows, the matrix indexed to those rows
      and columns, then `dadapy.Data(distances=D, maxk=300).return_id_scaling_gride(range_max=256)`;
    * cosine: mean and std over the whole cosine matrix (diagonal included);
    * neighbourhood overlap of each pair (l, l+1), l = 1..L-1: a full row-wise `np.argsort` of both distance
      matrices, then a Python loop over tokens i that allocates two boolean flag arrays of length
      (maximum of the whole argsorted matrix) + 1, that maximum recomputed per matrix and per token, and an
      inner loop knn = 1..31 that flags the knn-th entry of row i in each array and stores (positions flagged
      in both) / knn, counted with `np.sum` as the study does; the result is the mean over tokens for each
      knn (column 0 stays 0).
  Prompts are spread over processes with joblib `Parallel(n_jobs=2)` (loky: one BLAS thread per process),
  as the study's script parallelises over its files with `n_jobs=-1` (one process per core).
- repgeo: `repgeo summarize --workers 2` with every per-prompt observable (GRIDE, TwoNN, overlap k = 1..32,
  cosine, anisotropy, reciprocity and nn cosine, norm), all in exact float64; and with the study's observables
  only (`--observables gride,overlap,cosine`).

Both are timed as fresh processes; seconds per prompt in steady state are differences between two prompt
counts, (t(N) - t(N0)) / (N - N0), so that start-up and imports cancel, from each count's fastest of --repeats
runs (the machine is shared: other users only ever slow a run down). Reported as wall seconds and as CPU
seconds of all the processes (scheduler, workers), which other users disturb less. The bench also checks that
the baseline's GRIDE equals repgeo's on the same clouds (layers 1..L) and reports how far its overlap is from
repgeo's (float32 against float64 distances: near-ties may order differently), the ms per cloud of each of
repgeo's observables (one core), and the peak memory of one worker either way.

    .venv/bin/python bench/summarize.py [--prompts 10] [--prompts-small 2] [--baseline-prompts 4]
                                        [--baseline-prompts-small 2] [--repeats 3] [--tokens 1024]
                                        [--dtype float32|float16]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from common import REPGEO, extract_store, proc_status_bytes  # noqa: E402

OVERLAP_K = 32  # the study's overlap array has columns 0..31: knn = 1..31


def peak_rss_mib() -> float:
    """Peak RSS (MiB) of this process (VmHWM; see `proc_status_bytes`)."""
    return proc_status_bytes("VmHWM") / 2**20


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------------------------------------------
# The study's summarize step


def study_gride(D):
    """GRIDE ids of one float32 distance matrix, duplicates dropped by their distance rows."""
    from dadapy import Data

    _, rows = np.unique(D, axis=0, return_index=True)
    return Data(distances=D[rows][:, rows], maxk=300).return_id_scaling_gride(range_max=256)[0]


def study_overlap(D_a, D_b):
    """Mean overlap of the knn = 1..31 nearest neighbours in two distance matrices (column 0 stays 0)."""
    order_a = np.argsort(D_a, axis=1)
    order_b = np.argsort(D_b, axis=1)
    overlaps = np.zeros((len(D_a), OVERLAP_K))
    for i in range(len(D_a)):
        flags_a = np.zeros(order_a.max() + 1, dtype=bool)
        flags_b = np.zeros(order_b.max() + 1, dtype=bool)
        for knn in range(1, OVERLAP_K):
            flags_a[order_a[i, knn]] = True
            flags_b[order_b[i, knn]] = True
            overlaps[i, knn] = np.sum(flags_a & flags_b) / knn
    return overlaps.mean(axis=0)


def study_prompt(store, prompt):
    """The study's extraction matrices and summarize step for one prompt of an activation store.

    Returns GRIDE (layer 1..L, n2), cosine mean and std (layer 0..L, 2), overlap (pair 1..L-1, 32), and the
    worker's peak RSS (MiB), BLAS threads, process id and CPU seconds so far.
    """
    import zarr
    from sklearn.metrics.pairwise import cosine_similarity, pairwise_distances
    from threadpoolctl import threadpool_info

    n = int(zarr.open_array(os.path.join(store, "n_tokens"), mode="r")[prompt])
    layers = zarr.open_array(os.path.join(store, "hidden"), mode="r")[prompt, :, :n].astype(np.float32, copy=False)
    distances = [pairwise_distances(X) for X in layers]  # float32, as saved by the extraction step
    cosines = [cosine_similarity(X) for X in layers]
    gride = np.array([study_gride(D) for D in distances[1:]])
    cosine = np.array([(C.mean(), C.std()) for C in cosines])
    overlap = np.array([study_overlap(distances[l], distances[l + 1]) for l in range(1, len(distances) - 1)])
    threads = max(pool["num_threads"] for pool in threadpool_info())
    return gride, cosine, overlap, peak_rss_mib(), threads, os.getpid(), own_cpu_seconds()


def run_study(store, count, workers, out):
    """The study's way over the first `count` prompts with joblib (loky) processes; results to `out` (npz)."""
    from joblib import Parallel, delayed

    results = Parallel(n_jobs=workers)(delayed(study_prompt)(store, p) for p in range(count))
    gride, cosine, overlap, rss, threads, pids, cpus = zip(*results)
    # CPU of every process, counted by itself: loky's workers may outlive this process, unreaped
    worker_cpu = {pid: max(c for p, c in zip(pids, cpus) if p == pid) for pid in pids}
    np.savez(out, gride=np.array(gride), cosine=np.array(cosine), overlap=np.array(overlap),
             rss_mib=np.array(rss), threads=np.array(threads), cpu=sum(worker_cpu.values()) + own_cpu_seconds())


# ------------------------------------------------------------------------------------------------------------
# Timings


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every reaped descendant: Dask's workers included
    return usage.ru_utime + usage.ru_stime


def timed_run(cmd) -> tuple:
    """(wall seconds, CPU seconds of all its processes) of one command."""
    cpu, t0 = children_cpu_seconds(), time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{run.stderr}")
    return time.perf_counter() - t0, children_cpu_seconds() - cpu


def steady(runs_small, runs_large, n_small, n_large) -> tuple:
    """Wall and CPU seconds per prompt in steady state, from the fastest run of each count (other users of
    the machine only ever slow a run down)."""
    small, large = np.min(runs_small, axis=0), np.min(runs_large, axis=0)
    return tuple((large - small) / (n_large - n_small))


def per_cloud_ms(store, prompt) -> dict:
    """repgeo's pure functions on every layer of one prompt, one thread: observable → ms per cloud (median, mean)."""
    from threadpoolctl import threadpool_limits

    from toolkit import observables as obs
    from toolkit.store.activations import open_activation_group

    group = open_activation_group(store)
    hidden = group["hidden"]
    n = int(group["n_tokens"][prompt])
    timings = defaultdict(list)

    def timed(name, fn):
        t0 = time.perf_counter()
        result = fn()
        timings[name].append((time.perf_counter() - t0) * 1e3)
        return result

    previous = None
    # Layer 0 has duplicate tokens (zero distances): its ids are undefined without de-duplication, which is
    # left out here; only the times count.
    with threadpool_limits(1), np.errstate(divide="ignore", invalid="ignore"):
        for layer in range(hidden.shape[1]):
            stored = timed(f"read the slab (zarr, {hidden.dtype})", lambda: hidden[prompt, layer, :n])
            X = timed("float64 copy", lambda: stored.astype(np.float64))
            D2 = timed("squared_distances", lambda: obs.squared_distances(X))
            idx, d2 = timed("sorted_neighbors k=32, 256 distances", lambda: obs.sorted_neighbors(D2, 32, 256))
            dist = timed("square roots of the 256 distances", lambda: np.sqrt(d2))
            timed("gride_scaling", lambda: obs.gride_scaling(dist))
            timed("twonn_id", lambda: obs.twonn_id(dist))
            if previous is not None:
                timed("neighborhood_overlap k=1..32", lambda: obs.neighborhood_overlap(previous, idx))
            previous = idx
            timed("cosine_stats (from D2)", lambda: obs.cosine_stats(X, D2))
            timed("anisotropy", lambda: obs.anisotropy(X))
            timed("nn_reciprocity + nn_cosine", lambda: (obs.nn_reciprocity(idx), obs.nn_cosine(D2, idx)))
            timed("norm_mean", lambda: obs.norm_mean(X))
    return {name: (float(np.median(ms)), float(np.mean(ms))) for name, ms in timings.items()}


# ------------------------------------------------------------------------------------------------------------
# Memory


def task_peak_mib(store, prompt) -> tuple:
    """One prompt task in a fresh process: RSS after imports, peak RSS, peak of traced (numpy) allocations, MiB."""
    code = (f"import sys, tracemalloc; sys.path.insert(0, {os.path.join(ROOT, 'bench')!r}); "
            "from summarize import peak_rss_mib; from toolkit.summarize.tasks import prompt_task; "
            "from toolkit.summarize.params import SummarizeParams; start = peak_rss_mib(); tracemalloc.start(); "
            f"prompt_task({store!r}, {prompt}, SummarizeParams()); "
            "print('PEAK', start, peak_rss_mib(), tracemalloc.get_traced_memory()[1] / 2**20)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    return tuple(map(float, [ln for ln in out.stdout.splitlines() if ln.startswith("PEAK")][-1].split()[1:]))


def dask_worker_peak_mib(store, prompt) -> tuple:
    """Peak RSS (MiB) of a Dask worker process of `repgeo summarize` before and after one prompt task."""
    from toolkit.runtime.cluster import local_client
    from toolkit.summarize.params import SummarizeParams
    from toolkit.summarize.tasks import prompt_task

    with local_client(1) as client:
        before = list(client.run(peak_rss_mib).values())[0]
        client.submit(prompt_task, store, prompt, SummarizeParams(), pure=False).result()
        after = list(client.run(peak_rss_mib).values())[0]
    return before, after


# ------------------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=10, help="repgeo: prompts of the large store")
    parser.add_argument("--prompts-small", type=int, default=2, help="repgeo: prompts of the small store")
    parser.add_argument("--baseline-prompts", type=int, default=4)
    parser.add_argument("--baseline-prompts-small", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each count (the fastest counts)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="storage dtype of the bench store (float16: extract's default)")
    parser.add_argument("--study", nargs=3, metavar=("STORE", "COUNT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.study:  # one timed run of the baseline, in its own process
        return run_study(args.study[0], int(args.study[1]), args.workers, args.study[2])
    counts = (args.prompts_small, args.prompts, args.baseline_prompts_small, args.baseline_prompts)
    if any(c % args.workers for c in counts):
        parser.error("prompt counts must be multiples of --workers: every worker does the same number of prompts")
    if not args.prompts_small < args.prompts or not args.baseline_prompts_small < args.baseline_prompts:
        parser.error("the small counts must be below the large ones")
    if args.baseline_prompts > args.prompts:
        parser.error("--baseline-prompts must not exceed --prompts")
    os.environ["HF_HUB_OFFLINE"] = "1"

    import zarr

    from extract import long_texts  # the extract benchmark's corpus helper
    from toolkit.models import load_tokenizer, resolve_model

    texts = long_texts(load_tokenizer(resolve_model(args.model)), args.prompts, args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        small, large = os.path.join(tmp, "small.zarr"), os.path.join(tmp, "large.zarr")
        extract_store(texts[: args.prompts_small], args.tokens, small, args.model, args.dtype)
        extract_store(texts, args.tokens, large, args.model, args.dtype)

        # (small, large): [(wall, cpu), ...]; "same": only the study's observables (GRIDE, overlap, cosine)
        repgeo_runs, same_runs, study_runs = ([], []), ([], []), ([], [])
        for r in range(args.repeats):
            for runs, extra, name in ((repgeo_runs, [], "results"),
                                      (same_runs, ["--observables", "gride,overlap,cosine"], "same")):
                for i, store in enumerate((small, large)):
                    out = os.path.join(tmp, f"{name}{r}_{i}.zarr")
                    runs[i].append(timed_run([REPGEO, "summarize", "--store", store, "--out", out,
                                              "--workers", str(args.workers)] + extra))
            for i, count in enumerate((args.baseline_prompts_small, args.baseline_prompts)):
                out = os.path.join(tmp, f"study{i}.npz")
                wall, _ = timed_run([sys.executable, os.path.abspath(__file__), "--workers", str(args.workers),
                                     "--study", large, str(count), out])
                study_runs[i].append((wall, float(np.load(out)["cpu"])))
        repgeo_s, repgeo_cpu = steady(*repgeo_runs, args.prompts_small, args.prompts)
        same_s, same_cpu = steady(*same_runs, args.prompts_small, args.prompts)
        study_s, study_cpu = steady(*study_runs, args.baseline_prompts_small, args.baseline_prompts)

        study = np.load(os.path.join(tmp, "study1.npz"))
        ours = zarr.open_group(os.path.join(tmp, "results0_1.zarr"), mode="r")
        count = args.baseline_prompts
        gride_ours = ours["gride_id"][:count, 1:]  # (prompt, layer 1..L, n2)
        gride_diff = np.nanmax(np.abs(gride_ours - study["gride"]) / np.abs(study["gride"]))
        # repgeo's overlap[l, k - 1] compares layers l and l + 1; the study's pairs start at layer 1, knn at column 1
        overlap_diff = np.abs(ours["overlap"][:count, 1:-1, : OVERLAP_K - 1] - study["overlap"][..., 1:]).max()
        n = args.tokens  # cosine over all n^2 entries (diagonal of ones included) from repgeo's i != j ones
        mean, std = ours["cosine_mean"][:count], ours["cosine_std"][:count]
        full_mean = (mean * (n * n - n) + n) / (n * n)
        full_var = ((std**2 + mean**2) * (n * n - n) + n) / (n * n) - full_mean**2
        cosine_diff = max(np.abs(full_mean - study["cosine"][..., 0]).max(),
                          np.abs(np.sqrt(full_var) - study["cosine"][..., 1]).max())
        timings = per_cloud_ms(large, 0)
        start, peak, traced = task_peak_mib(large, 0)
        dask_before, dask_after = dask_worker_peak_mib(large, 0)

    walls = lambda runs: [[round(wall, 1) for wall, _ in count] for count in runs]  # noqa: E731
    print(f"{args.tokens}-token prompts, {args.model}, {args.dtype} store, {args.workers} processes / "
          f"{os.cpu_count()} cores, fastest of {args.repeats} runs per count; wall and CPU (all processes) seconds "
          "per prompt")
    print(f"repgeo summarize     {repgeo_s:7.2f} s  {repgeo_cpu:7.2f} s CPU (steady state, {args.prompts_small} vs "
          f"{args.prompts} prompts; runs {walls(repgeo_runs)} s)")
    print(f"study's summarize    {study_s:7.2f} s  {study_cpu:7.2f} s CPU (steady state, {args.baseline_prompts_small} "
          f"vs {args.baseline_prompts} prompts; runs {walls(study_runs)} s; BLAS threads per worker "
          f"{int(study['threads'].max())})")
    print(f"  the study's observables only (--observables gride,overlap,cosine): {same_s:.2f} s, {same_cpu:.2f} s "
          f"CPU (runs {walls(same_runs)} s)")
    print(f"speed-up             {study_s / repgeo_s:7.1f}x {study_cpu / repgeo_cpu:6.1f}x in CPU time; the study's "
          f"observables only: {study_s / same_s:.1f}x, {study_cpu / same_cpu:.1f}x in CPU time")
    print(f"GRIDE vs study       max relative difference {gride_diff:.1e} ({count} prompts, layers 1..L, all scales)")
    print(f"overlap vs study     max absolute difference {overlap_diff:.1e} (k = 1..31, float32 vs float64 ties)")
    print(f"cosine vs study      max absolute difference {cosine_diff:.1e} (mean and std over all n^2 entries)")
    print(f"memory, repgeo       one prompt task in a fresh process: {start:.0f} MiB RSS after imports, peak "
          f"{peak:.0f} MiB RSS, {traced:.0f} MiB of traced arrays; a Dask worker: {dask_before:.0f} MiB RSS "
          f"before, peak {dask_after:.0f} MiB after one task")
    print(f"memory, study        peak RSS of a joblib worker after its prompts: {study['rss_mib'].max():.0f} MiB")
    print("ms per cloud (one core; median and mean over the 31 layers of prompt 0):")
    for name, (median, mean_ms) in timings.items():
        print(f"  {name:40s} {median:7.1f} {mean_ms:7.1f}")
    total = [sum(t[i] for t in timings.values()) for i in (0, 1)]
    print(f"  {'sum':40s} {total[0]:7.1f} {total[1]:7.1f}")


if __name__ == "__main__":
    main()
