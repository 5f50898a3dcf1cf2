"""Benchmark: `repgeo summarize` against the token-geometry way of computing the same observables.

On the same 1024-token SmolLM2 prompts and the same 2 cores:

- baseline: per prompt and layer, float32 sklearn distances and cosines, dadapy GRIDE from the distance matrix,
  and the per-token Python loop (np.intersect1d per token and k) for neighbourhood overlap k = 1..32, as the
  token-geometry notebooks do; the bench also times a faster set-based loop for comparison.
- repgeo:   `repgeo summarize --workers 2` (GRIDE, TwoNN, overlap, cosine, anisotropy, reciprocity, norm).

Steady-state seconds per prompt exclude start-up by differencing two prompt counts (time(N) - time(N0)) /
(N - N0). Also reports the agreement of GRIDE with the baseline, ms per cloud for each observable, and the peak
memory of one worker task.

    .venv/bin/python bench/summarize.py [--prompts 4] [--baseline-prompts 2] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from extract import long_texts  # noqa: E402  (the extract benchmark's corpus helper)

REPGEO = os.path.join(ROOT, ".venv", "bin", "repgeo")


def extract_store(texts, tokens, out, model):
    prompts = out + ".jsonl"
    with open(prompts, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "doc": i}) + "\n")
    subprocess.run([REPGEO, "extract", "--model", model, "--prompts", prompts, "--out", out, "--dtype", "float32",
                    "--max-tokens", str(tokens), "--min-tokens", str(tokens), "--batch-size", "1"], check=True,
                   capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def summarize_seconds(store, out, workers) -> float:
    t0 = time.perf_counter()
    subprocess.run([REPGEO, "summarize", "--store", store, "--out", out, "--workers", str(workers)], check=True,
                   capture_output=True)
    return time.perf_counter() - t0


def overlap_loop(previous, order, n, ks):
    """The notebooks' neighbourhood overlap: for every k, a Python loop over tokens with np.intersect1d."""
    return [np.mean([len(np.intersect1d(previous[i, :k], order[i, :k])) / k for i in range(n)]) for k in ks]


def overlap_set_loop(previous, order, n, ks):
    """A faster pure-Python variant with sets, to show how much of the baseline is the loop itself."""
    return [np.mean([len(set(previous[i, :k]) & set(order[i, :k])) / k for i in range(n)]) for k in ks]


def baseline_prompt(hidden, n, ks=range(1, 33)):
    """The token-geometry way for one prompt: returns GRIDE ids (layer, scale)."""
    from dadapy import Data
    from sklearn.metrics.pairwise import cosine_similarity, pairwise_distances

    ids, previous = [], None
    for layer in range(hidden.shape[0]):
        X = np.asarray(hidden[layer, :n], dtype=np.float32)
        D = pairwise_distances(X)
        cosine_similarity(X)
        Xu = np.unique(X, axis=0)
        Du = pairwise_distances(Xu).astype(np.float64)
        data = Data(distances=Du, maxk=min(300, len(Xu) - 1), verbose=False)
        ids.append(data.return_id_scaling_gride(range_max=256)[0])
        order = np.argsort(D, axis=1)[:, 1:33]
        if previous is not None:
            overlap_loop(previous, order, n, ks)
        previous = order
    return ids


def per_observable_ms(X):
    from toolkit import observables as obs

    X = np.asarray(X, dtype=np.float64)
    timings = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        result = fn()
        timings[name] = (time.perf_counter() - t0) * 1e3
        return result

    D = timed("pairwise_distances", lambda: obs.pairwise_distances(X))
    idx, dist = timed("sorted_neighbors k=300", lambda: obs.sorted_neighbors(D, 300))
    timed("gride_scaling", lambda: obs.gride_scaling(dist))
    timed("twonn_id", lambda: obs.twonn_id(dist))
    timed("neighborhood_overlap k=1..32", lambda: obs.neighborhood_overlap(idx, idx))
    timed("cosine_stats", lambda: obs.cosine_stats(X))
    timed("anisotropy", lambda: obs.anisotropy(X))
    timed("nn_reciprocity + nn_cosine", lambda: (obs.nn_reciprocity(idx), obs.nn_cosine(X, idx)))
    timed("norm_mean", lambda: obs.norm_mean(X))
    return timings


def worker_peak_mib(store, prompt) -> tuple:
    """One prompt task in a fresh process: peak RSS (MiB) and peak of numpy's traced allocations (MiB)."""
    code = ("import resource, tracemalloc; from toolkit.summarize.tasks import prompt_task; "
            "from toolkit.summarize.params import SummarizeParams; tracemalloc.start(); "
            f"prompt_task({store!r}, {prompt}, SummarizeParams()); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, tracemalloc.get_traced_memory()[1])")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("PEAK")][-1]
    rss_kib, traced = map(int, line.split()[1:])
    return rss_kib / 1024, traced / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--baseline-prompts", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"

    import zarr

    from toolkit.models import load_tokenizer, resolve_model

    texts = long_texts(load_tokenizer(resolve_model(args.model)), args.prompts, args.tokens)
    n0 = 1
    with tempfile.TemporaryDirectory() as tmp:
        small, large = os.path.join(tmp, "small.zarr"), os.path.join(tmp, "large.zarr")
        extract_store(texts[:n0], args.tokens, small, args.model)
        extract_store(texts, args.tokens, large, args.model)
        t_small = summarize_seconds(small, os.path.join(tmp, "r_small.zarr"), args.workers)
        t_large = summarize_seconds(large, os.path.join(tmp, "r_large.zarr"), args.workers)
        repgeo_per_prompt = (t_large - t_small) / (args.prompts - n0)

        hidden = zarr.open_array(os.path.join(large, "hidden"), mode="r")
        n = args.tokens
        times = []
        for count in (1, args.baseline_prompts):
            t0 = time.perf_counter()
            for p in range(count):
                ids = baseline_prompt(hidden[p], n)
            times.append(time.perf_counter() - t0)
        baseline_per_prompt = (times[1] - times[0]) / (args.baseline_prompts - 1)

        results = zarr.open_group(os.path.join(tmp, "r_large.zarr"), mode="r")
        ours = results["gride_id"][args.baseline_prompts - 1]
        diffs = [np.max(np.abs(ours[l, : len(b)] - b) / np.abs(b)) for l, b in enumerate(ids)]
        timings = per_observable_ms(hidden[0, 15, :n])
        peak, traced = worker_peak_mib(large, 0)
        loops = {}
        from sklearn.metrics.pairwise import pairwise_distances as sk_distances

        a, b = (np.argsort(sk_distances(hidden[0, layer, :n]), axis=1)[:, 1:33] for layer in (14, 15))
        for name, loop in (("intersect1d loop", overlap_loop), ("set loop", overlap_set_loop)):
            t0 = time.perf_counter()
            loop(a, b, n, range(1, 33))
            loops[name] = time.perf_counter() - t0

    print(f"{args.tokens}-token prompts, {args.model}, {args.workers} workers / {os.cpu_count()} cores")
    print(f"repgeo summarize   {repgeo_per_prompt:8.2f} s per prompt (steady state, {n0} vs {args.prompts} prompts)")
    print(f"token-geometry way {baseline_per_prompt:8.2f} s per prompt (steady state, 1 vs {args.baseline_prompts})")
    print(f"speed-up           {baseline_per_prompt / repgeo_per_prompt:8.1f}x")
    print(f"GRIDE vs baseline  max relative difference {max(diffs):.1e} (float32 sklearn distances there)")
    print(f"worker task peak   {peak:.0f} MiB RSS, {traced:.0f} MiB of arrays (one prompt, all layers)")
    for name, seconds in loops.items():
        print(f"baseline overlap, one layer pair, {name}: {seconds:.2f} s")
    print("ms per 1024x576 cloud:")
    for name, ms in timings.items():
        print(f"  {name:30s} {ms:8.1f}")


if __name__ == "__main__":
    main()
