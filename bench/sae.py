"""Benchmark: `repgeo sae cooccurrence` — tokens/s and memory of the counting stage for 1 and N Dask workers.

    cd /work/main && .venv/bin/python bench/sae.py          # the defaults below; ~6 min on the 2-core dev machine
    .venv/bin/python bench/sae.py [--prompts 24] [--tokens 1024] [--layer 15] [--features 16384]
                                  [--k 32] [--workers N] [--cli-features 2048] [--store PATH]

Offline (HF_HUB_OFFLINE=1 is set). Steps, on the same machine one after another:

1. Extract a SmolLM2 store (`repgeo extract`, float16, ``--prompts`` prompts of ``--tokens`` tokens), or reuse
   ``--store``.
2. Build a **synthetic** TopK SAE (``--features`` features, ``--k`` active per token, d_in = the store's d_model):
   decoder rows are random unit vectors, W_enc = scale · W_decᵀ, b_enc = 0, b_dec = the mean of the layer's
   vectors, with the scale set so that on average 16 of the k active features per token exceed the threshold
   (1.0). Throughput and memory do not depend on the SAE having been trained (encoding is one dense matmul and a
   TopK whatever the weights hold); the density of the co-occurrence counts does, so it is reported: features
   firing per token, features occurring per block, nonzero pairs of the counts.
3. The counting stage (`count_cooccurrence`, the distributed reduction) on `local_client(1)` and
   `local_client(N)` (N = cores), each in a fresh process. Its seconds exclude cluster start-up and include
   each worker's one-off SAE load (under a second). Memory: peak RSS of each worker process and of the client
   process (the client also holds the SAE, as the CLI does), each next to its RSS before counting; the bytes of
   one worker's sum (`count_task` on the first PROMPTS_PER_TASK prompts, run here: a dense int32 matrix,
   4 · d_sae² bytes); and the nonzeros of the summed counts (a dense int64 matrix on the client). The counts of 1
   and N workers are asserted identical.
4. The whole CLI (`repgeo sae cooccurrence --workers N`: counting and analysis) on a smaller synthetic SAE
   (``--cli-features``): seconds of each stage from its log, and the client's peak RSS (the analysis holds
   a few dense (feature, feature) float64 matrices).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from common import extract_store, proc_status_bytes  # noqa: E402

from toolkit.sae.cooccurrence import PROMPTS_PER_TASK  # noqa: E402

THRESHOLD = 1.0
#: Features firing per token (of the k active) that the synthetic SAE's scale aims at.
FIRING = 16
#: Prompts whose vectors set b_dec and the scale, and on which firing per token is measured.
CALIBRATION_PROMPTS = 4


def synthetic_sae(store, layer, d_sae, k, directory, seed=0) -> float:
    """Save a synthetic TopK SAE (see the module docstring) to ``directory``; return the mean number of features
    firing (activation > THRESHOLD) per non-special token of the calibration prompts."""
    from toolkit.sae.files import encode, load_sae, save_sae
    from toolkit.sae.layer import StoreLayer, sae_hook_name

    source = StoreLayer(store, layer)
    slabs = [source.slab(int(p)) for p in source.prompts[:CALIBRATION_PROMPTS]]
    X = np.concatenate([vectors[~special] for vectors, special in slabs])
    rng = np.random.default_rng(seed)
    W_dec = rng.standard_normal((d_sae, X.shape[1])).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    b_dec = X.mean(axis=0)
    pre = (X - b_dec) @ W_dec.T
    top = np.partition(pre, d_sae - k, axis=1)[:, -k:]
    # FIRING of the k top pre-activations of a token exceed THRESHOLD on average when the threshold sits at this
    # quantile of all tokens' top-k values.
    scale = THRESHOLD / np.quantile(top, 1 - FIRING / k)
    save_sae(directory, W_dec.T * scale, np.zeros(d_sae), W_dec, b_dec, "topk", k=k,
             extra_cfg={"hook_name": sae_hook_name(layer), "synthetic": True})
    acts = encode(load_sae(directory, X.shape[1]), X)
    return float((acts > THRESHOLD).sum(axis=1).mean())


def count_run(store, sae_dir, layer, workers, block):
    """In a fresh process: `count_cooccurrence` on `local_client(workers)`; prints a JSON line."""
    import hashlib

    from toolkit.sae.cooccurrence import CooccurrenceSettings, check_inputs, count_cooccurrence
    from toolkit.runtime.cluster import local_client

    settings = CooccurrenceSettings(store=store, sae=sae_dir, layer=layer, out=os.devnull + "/unused",
                                    threshold=THRESHOLD, block=block)
    source, _, sae_id = check_inputs(settings)
    with local_client(workers) as client:
        worker_start = client.run(proc_status_bytes, "VmRSS")
        client_start = proc_status_bytes("VmRSS")
        t0 = time.perf_counter()
        n_blocks, counts = count_cooccurrence(client, settings, source, sae_id)
        seconds = time.perf_counter() - t0
        worker_peak = client.run(proc_status_bytes, "VmHWM")
    print(json.dumps({
        "seconds": seconds, "n_blocks": n_blocks, "n_tokens": int(source.n_tokens[source.prompts].sum()),
        "nnz": int(np.count_nonzero(counts)), "bytes": int(counts.nbytes),
        "sha256": hashlib.sha256(counts.tobytes()).hexdigest(),
        "occurring_per_block": float(np.diagonal(counts).sum() / max(n_blocks, 1)),
        "worker_start": [worker_start[a] for a in sorted(worker_start)],
        "worker_peak": [worker_peak[a] for a in sorted(worker_peak)],
        "client_start": client_start, "client_peak": proc_status_bytes("VmHWM")}))


def one_task(store, sae_dir, layer, block) -> tuple:
    """(seconds, bytes of its counts) of one `count_task` on the store's first PROMPTS_PER_TASK prompts."""
    from toolkit.sae.cooccurrence import count_task, take_counts
    from toolkit.sae.layer import StoreLayer

    prompts = [int(p) for p in StoreLayer(store, layer).prompts[:PROMPTS_PER_TASK]]
    t0 = time.perf_counter()
    count_task(store, layer, prompts, 0, sae_dir, "", THRESHOLD, block, job="one task")
    seconds = time.perf_counter() - t0
    return seconds, int(take_counts("one task")[2].nbytes)


def _in_fresh_process(code: str) -> tuple:
    """Run ``code`` (with this module importable as ``sae``) in a new interpreter: (stdout, stderr)."""
    prelude = f"import sys; sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'bench')!r}]; "
    out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    if out.returncode != 0:
        raise RuntimeError(f"{code}\nfailed with exit status {out.returncode}:\n{out.stderr[-4000:]}")
    return out.stdout, out.stderr


def count_in_fresh_process(store, sae_dir, layer, workers, block) -> dict:
    stdout, _ = _in_fresh_process(f"from sae import count_run; count_run({store!r}, {sae_dir!r}, {layer}, "
                                  f"{workers}, {block})")
    return json.loads(stdout.strip().splitlines()[-1])


def cli_in_fresh_process(store, sae_dir, layer, workers, block, out) -> dict:
    """The whole `repgeo sae cooccurrence` in a new interpreter: wall seconds, the seconds of its counting stage
    (from its log), and the peak RSS of its client process (bytes)."""
    code = ("import time; from common import proc_status_bytes; from toolkit.cli import main; "
            "t0 = time.perf_counter(); "
            f"rc = main(['sae', 'cooccurrence', '--store', {store!r}, '--sae', {sae_dir!r}, '--layer', '{layer}', "
            f"'--out', {out!r}, '--block', '{block}', '--workers', '{workers}']); "
            "print(rc, time.perf_counter() - t0, proc_status_bytes('VmHWM'))")
    stdout, stderr = _in_fresh_process(code)
    rc, wall, peak = stdout.split()
    assert rc == "0", stderr
    counting = float(re.search(r"co-occurring pairs \(([\d.]+) s\)", stderr).group(1))
    return {"wall_s": float(wall), "counting_s": counting, "client_peak": int(peak)}


def mib(n_bytes) -> str:
    return f"{n_bytes / 2**20:.0f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--features", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--cli-features", type=int, default=2048, help="SAE size of the full CLI run (0: skip)")
    parser.add_argument("--store", help="reuse this activation store instead of extracting one")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"

    with tempfile.TemporaryDirectory() as tmp:
        store = args.store
        if store is None:
            # The extract benchmark's corpus helper; it imports torch, which the count processes must not.
            from extract import long_texts

            from toolkit.models import load_tokenizer, resolve_model

            store = os.path.join(tmp, "store.zarr")
            t0 = time.perf_counter()
            extract_store(long_texts(load_tokenizer(resolve_model(args.model)), args.prompts, args.tokens),
                          args.tokens, store, args.model, "float16")
            print(f"extracted {args.prompts} x {args.tokens} tokens ({args.model}) in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        sae_dir = os.path.join(tmp, "sae")
        firing = synthetic_sae(store, args.layer, args.features, args.k, sae_dir)
        task_seconds, task_bytes = one_task(store, sae_dir, args.layer, args.block)
        runs = {}
        for workers in sorted({1, args.workers}):
            runs[workers] = count_in_fresh_process(store, sae_dir, args.layer, workers, args.block)
        identical = len({r["sha256"] for r in runs.values()}) == 1
        assert identical, "counts differ between 1 and N workers"
        cli = None
        if args.cli_features:
            small_dir = os.path.join(tmp, "sae_small")
            small_firing = synthetic_sae(store, args.layer, args.cli_features, args.k, small_dir)
            cli = cli_in_fresh_process(store, small_dir, args.layer, args.workers, args.block,
                                       os.path.join(tmp, "results.zarr"))

    one = runs[1]
    d = args.features
    print(f"store: {one['n_tokens']} tokens, layer {args.layer}, {one['n_blocks']} blocks of {args.block} tokens; "
          f"{os.cpu_count()} cores")
    print(f"synthetic TopK SAE {d} features, k={args.k}: {firing:.1f} features fire (> {THRESHOLD}) per token "
          f"(first {CALIBRATION_PROMPTS} prompts), {one['occurring_per_block']:.0f} occur per block")
    print(f"summed counts: {one['nnz']} nonzero pairs ({one['nnz'] / d**2:.1%} of {d}²), dense int64 "
          f"{mib(one['bytes'])} MiB on the client")
    print(f"one task ({PROMPTS_PER_TASK} prompts, one process): {task_seconds:.1f} s, its counts "
          f"{mib(task_bytes)} MiB")
    print("workers  seconds  tokens/s  worker RSS MiB start→peak  client RSS MiB start→peak")
    for workers, r in runs.items():
        per_worker = ", ".join(f"{mib(a)}→{mib(b)}" for a, b in zip(r["worker_start"], r["worker_peak"]))
        print(f"{workers:7d}  {r['seconds']:7.1f}  {r['n_tokens'] / r['seconds']:8.0f}  {per_worker:26s}  "
              f"{mib(r['client_start'])}→{mib(r['client_peak'])}")
    if len(runs) > 1:
        print(f"speed-up {max(runs)} vs 1 workers: {one['seconds'] / runs[max(runs)]['seconds']:.2f}x; "
              f"counts identical: {identical}")
    if cli:
        print(f"CLI, {args.cli_features} features ({small_firing:.1f} fire per token), {args.workers} workers: "
              f"{cli['wall_s']:.1f} s in all, counting {cli['counting_s']:.1f} s, the rest (start-up, analysis, "
              f"writing) {cli['wall_s'] - cli['counting_s']:.1f} s; client peak RSS "
              f"{mib(cli['client_peak'])} MiB")


if __name__ == "__main__":
    main()
