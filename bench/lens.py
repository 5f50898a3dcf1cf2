"""Benchmark: `repgeo lens` readings per second against the in-memory way, memory per worker, and where the time goes.

    cd /work/main && .venv/bin/python bench/lens.py      # the defaults below; about 25 min on the 2-core dev machine
    .venv/bin/python bench/lens.py [--models tiny-262k,smollm2-135m] [--prompts 2] [--tokens 256] [--top-k 5]
                                   [--workers 2] [--repeats 3] [--block-entries N,...] [--profile-only]
                                   # --models may also name gemma3-270m (real, 262,144 rows)

Offline (HF_HUB_OFFLINE=1 is set). A reading is one (prompt, layer, token) of the store, whatever the number of
decoders (as `repgeo lens` counts its progress). Models: ``tiny-262k``, the tests' random Llama (4 blocks, 64 dims)
with a 262,144-row vocabulary (Gemma 3's) and untied embeddings; ``smollm2-135m`` (30 blocks, 576 dims, 49,152
rows, tied); both from the tests' cache (``.cache/tests``, built on first use). For each model, one after another:

1. Extract a float32 store of ``--prompts`` prompts of exactly ``--tokens`` tokens (`repgeo extract`).
2. **repgeo**: `toolkit.lens.run.lens` (what `repgeo lens` runs) on `local_client(W)`, W = ``--workers`` and 1, with
   the output decoder only and with both decoders, each in a fresh process. Readings per second over the span of its
   tasks (first task start to last task end, from Dask's task stream): model loading, store creation and cluster
   start are left out, as the in-memory way's model loading is; each worker's one-off read of the lens weights is
   in. The whole call's seconds are printed too. CPU seconds (user + system) and minor page faults of the workers
   over the call (torch imported on them beforehand); peak RSS (VmHWM) of each worker.
3. **in-memory** (baseline), in a fresh process with W torch threads: the model loaded with transformers, then
   one prompt at a time: its hidden states of all layers read from the same store, ``lm_head(norm(h))`` of all
   layers in one product, a full softmax and ``torch.topk``; with both decoders also the cosines with every
   input-embedding row and their top-k. Seconds, CPU seconds and page faults of that loop (reading included); peak
   RSS of the process and its RSS once the model is loaded. It computes less than repgeo (no entropy, KL,
   next-token rank): the ratio is repgeo's whole job against the anchors' top-k only.
   Steps 2 and 3 run ``--repeats`` times each, in turns (which goes first alternates), as the machine may be busy
   with other work: each table row gives the medians, and the ratio's median and range over the pairs. Tokens
   per second per core: readings per second / layers / W.
4. **Profile** of one prompt's `lens_task` (both decoders, one thread, in a thread of its own as on a Dask worker):
   its steps timed one by one with the same functions on the same token blocks, next to the task itself (warm: lens
   weights already loaded); wall and CPU seconds, and minor page faults (a fresh page of a new allocation) of this
   thread; and the task's torch operators by self CPU time (torch.profiler).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench"), os.path.join(ROOT, "tests")]

from common import extract_store, proc_status_bytes  # noqa: E402


def cpu_use(who=None) -> dict:
    """CPU seconds (user, system) and minor page faults of this process (``who``: a resource.RUSAGE_* value)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF if who is None else who)
    return {"user": r.ru_utime, "sys": r.ru_stime, "faults": r.ru_minflt}


def used(before: dict, after: dict) -> dict:
    return {key: after[key] - before[key] for key in before}

#: Model name → (cache directory under .cache/tests, builder); the tests' fixtures build the same directories.
MODELS = {"tiny-262k": "tiny-llama-vocab262144-v1", "smollm2-135m": "smollm2-135m-hf-v1",
          "gemma3-270m": "gemma3-270m-hf-v1"}


def model_dir(name: str) -> str:
    """The model's directory in the tests' cache, built there (as the tests build it) when missing."""
    import conftest

    builders = {"tiny-262k": lambda d: conftest.save_tiny_llama(d, conftest.train_tiny_tokenizer(),
                                                                vocab_size=262_144),
                "smollm2-135m": lambda d: conftest.convert_gguf("smollm2-135m", d),
                "gemma3-270m": lambda d: conftest.convert_gguf("gemma3-270m", d)}
    return str(conftest.build_atomically(conftest.CACHE / MODELS[name], builders[name]))


def texts_for(name: str, directory: str, n: int, tokens: int) -> list:
    """``n`` texts of at least ``tokens`` tokens: the tests' words for the tiny tokenizer, speeches otherwise."""
    from extract import long_texts

    from toolkit.models import load_tokenizer, resolve_model

    if name == "tiny-262k":
        import conftest

        return conftest.tiny_texts(n, seed=0, min_words=2 * tokens, max_words=2 * tokens)
    return long_texts(load_tokenizer(resolve_model(directory)), n, tokens)


def _params(store: str, decoders: str, top_k: int):
    import zarr

    from toolkit.lens.run import LensParams

    n_layers = zarr.open_group(store, mode="r")["hidden"].shape[1]
    return LensParams(decoders=tuple(decoders.split(",")), top_k=top_k, layers=tuple(range(n_layers)))


def _import_task_modules():
    """On a worker: import what a lens task imports (torch, zarr, the lens math) before the clocks start."""
    import importlib

    importlib.import_module("toolkit.lens.tasks")


def repgeo_run(store: str, out: str, decoders: str, workers: int, top_k: int):
    """In a fresh process: `lens` on `local_client(workers)`; prints a JSON line."""
    import zarr
    from distributed import get_task_stream

    from toolkit.lens.run import lens
    from toolkit.models import model_of_store
    from toolkit.runtime.cluster import local_client

    params = _params(store, decoders, top_k)
    source = zarr.open_group(store, mode="r")
    ref = model_of_store(dict(source.attrs), None, store)
    with local_client(workers) as client:
        client.run(_import_task_modules)  # as the in-memory process, which has torch loaded before its clock starts
        start, cpu_start = client.run(proc_status_bytes, "VmRSS"), client.run(cpu_use)
        with get_task_stream(client) as stream:
            t0 = time.perf_counter()
            lens(store, out, params, ref, client, "cpu")
            wall = time.perf_counter() - t0
        peak, cpu_end = client.run(proc_status_bytes, "VmHWM"), client.run(cpu_use)
    cpu = [used(cpu_start[w], cpu_end[w]) for w in cpu_start]
    computes = [s for task in stream.data if task["key"].startswith("lens_task")
                for s in task["startstops"] if s["action"] == "compute"]
    span = max(s["stop"] for s in computes) - min(s["start"] for s in computes)
    readings = int(source["n_tokens"][:].sum()) * len(params.layers)
    print(json.dumps({"span_s": span, "wall_s": wall, "readings": readings,
                      "cpu_s": sum(c["user"] + c["sys"] for c in cpu), "sys_s": sum(c["sys"] for c in cpu),
                      "faults": sum(c["faults"] for c in cpu),
                      "worker_start": [start[w] for w in cpu_start], "worker_peak": [peak[w] for w in cpu_start]}))


def in_memory_run(store: str, decoders: str, threads: int, top_k: int):
    """In a fresh process: the in-memory way (module docstring, step 3) with ``threads`` torch threads."""
    import torch
    import zarr

    from toolkit.models import load_model, resolve_model

    torch.set_num_threads(threads)
    source = zarr.open_group(store, mode="r")
    model = load_model(resolve_model(source.attrs["model"]["location"]), torch.float32)
    loaded = proc_status_bytes("VmRSS")
    hidden, n_tokens = source["hidden"], source["n_tokens"][:]
    t0, cpu_start = time.perf_counter(), cpu_use()
    with torch.inference_mode():
        embedding = model.get_input_embeddings().weight
        unit = embedding / embedding.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        for p, n in enumerate(n_tokens):
            h = torch.from_numpy(np.ascontiguousarray(hidden[p, :, :n], dtype=np.float32))  # (layer, token, dim)
            probs = torch.softmax(model.lm_head(model.model.norm(h)), dim=-1)  # (layer, token, vocab)
            top = torch.topk(probs, top_k, dim=-1)
            if "input" in decoders:
                cosines = (h / h.norm(dim=-1, keepdim=True)) @ unit.T
                top = (top, torch.topk(cosines, top_k, dim=-1))
            del probs, top
    seconds, cpu = time.perf_counter() - t0, used(cpu_start, cpu_use())
    print(json.dumps({"seconds": seconds, "readings": int(n_tokens.sum()) * hidden.shape[1], "loaded": loaded,
                      "cpu_s": cpu["user"] + cpu["sys"], "sys_s": cpu["sys"], "faults": cpu["faults"],
                      "peak": proc_status_bytes("VmHWM")}))


def profile_task(store: str, top_k: int, directory: str, block_entries: int | None = None):
    """In a fresh process with one thread: the steps of one `lens_task` (prompt 0, both decoders) timed one by one;
    prints a JSON line: step → [wall s, CPU s, minor page faults], the same of the task itself, and the task's
    torch operators (self CPU s of each, from torch.profiler).

    block_entries: entries of one (token, vocab) block matrix, instead of the toolkit's BLOCK_ENTRIES (the task
    reads that constant when it runs).
    """
    import torch

    from toolkit.lens import tasks

    torch.set_num_threads(1)  # torch then computes in this thread: the thread's CPU clock sees all of it
    tasks.BLOCK_ENTRIES = block_entries or tasks.BLOCK_ENTRIES
    report = []
    # As on a Dask worker, the task runs in a thread other than the main one (glibc serves it from another arena).
    thread = threading.Thread(target=lambda: report.append(_profile_steps(store, top_k, directory)))
    thread.start()
    thread.join()
    print(json.dumps(report[0]))


def _profile_steps(store: str, top_k: int, directory: str) -> dict:
    """`profile_task` in the calling thread: its JSON record."""
    import resource

    import torch
    import zarr
    from torch.profiler import ProfilerActivity, profile

    from toolkit.lens import tasks
    from toolkit.lens.tasks import lens_task
    from toolkit.lens.weights import load_lens_weights, write_lens_weights
    from toolkit.models import load_model, model_of_store
    from toolkit.observables import lens as lm

    params = _params(store, "output,input", top_k)
    source = zarr.open_group(store, mode="r")
    weights = os.path.join(directory, "weights.safetensors")
    write_lens_weights(load_model(model_of_store(dict(source.attrs), None, store), torch.float32), weights)
    spent = defaultdict(lambda: np.zeros(3))

    def timed(step, function, *args):
        t, cpu, faults = time.perf_counter(), time.thread_time(), resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        value = function(*args)
        spent[step] += (time.perf_counter() - t, time.thread_time() - cpu,
                        resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults)
        return value

    # The first task loads the lens weights (once per worker); the second is the steady state. The task's
    # allocator settings (task_settings) stay in the process for the steps below, as on a worker.
    lens_task(store, 0, weights, "profile", params, "cpu")
    timed("the whole lens_task", lens_task, store, 0, weights, "profile", params, "cpu")
    task = spent.pop("the whole lens_task")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        lens_task(store, 0, weights, "profile", params, "cpu")
    operators = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages() if e.self_cpu_time_total > 0}
    parts = load_lens_weights(weights, "profile", "cpu")
    n = int(source["n_tokens"][0])
    final = len(params.layers) - 1
    slabs = timed("read the slabs (zarr)", lambda: [np.ascontiguousarray(source["hidden"][0, layer, :n],
                                                                          dtype=np.float32)
                                                     for layer in params.layers])
    ids = source["input_ids"][0, :n].astype(np.int64)
    next_ids = np.append(ids[1:], -1)
    vocab = parts.unembedding.shape[0]
    layers = list(params.layers)
    step, per_product, groups = tasks.product_plan(layers, final, n, vocab, output=True)
    # The task's matrices and order: per block, the output decoder's products a group of layers at a time (the
    # final layer first, its logits and probabilities kept for the block), then the input decoder's.
    products = torch.empty((per_product * step, vocab))
    final_logits, final_probs, layer_probs = (torch.empty((step, vocab)) for _ in range(3))
    reading = "output: read_output (top-k, rank, softmax, entropy, next token)"
    with torch.inference_mode():
        for start in range(0, n, step):
            at = slice(start, min(n, start + step))
            rows = at.stop - at.start
            X = {layer: torch.from_numpy(slabs[layer][at]) for layer in layers}
            for members in groups["output"]:
                normed = timed("final norm", lambda: torch.cat([X[layer] if layer == final else parts.norm(X[layer])
                                                                for layer in members]))
                block = timed("output: products h @ Wᵀ", lm.output_logits, normed, parts.unembedding,
                              parts.softcap, products[:len(members) * rows])
                for j, layer in enumerate(members):
                    if layer == final:
                        final_read = timed(reading, lambda: lm.read_output(
                            final_logits[:rows].copy_(block[:rows]), top_k, next_ids[at], final_probs[:rows]))
                        read = final_read
                    else:
                        read = timed(reading, lm.read_output, block[j * rows:(j + 1) * rows], top_k, next_ids[at],
                                     layer_probs[:rows])
                    timed("output: KL to the final layer", lm.kl_divergence, final_read[1], read[1])
            for members in groups["input"]:
                cosines = timed("input: cosines (unit rows, products)", lm.input_cosines,
                                torch.cat([X[layer] for layer in members]), parts.unit_embedding,
                                products[:len(members) * rows])
                timed("input: top-k", lm.top_k, cosines, top_k)
    return {"task": task.tolist(), "steps": {k: v.tolist() for k, v in spent.items()}, "tokens": n,
            "layers": len(params.layers), "block": step, "block_entries": tasks.BLOCK_ENTRIES,
            "per_product": per_product, "operators": operators}


def _in_fresh_process(code: str, env: dict | None = None) -> dict:
    """Run ``code`` (with this module importable as ``lens``) in a new interpreter; its last stdout line as JSON."""
    prelude = f"import sys; sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'bench')!r}]; "
    out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **(env or {})))
    if out.returncode != 0:
        raise RuntimeError(f"{code}\nfailed with exit status {out.returncode}:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n_bytes) -> str:
    return f"{n_bytes / 2**20:.0f}"


def bench_model(name: str, args, tmp: str):
    directory = model_dir(name)
    store = os.path.join(tmp, f"{name}.zarr")
    t0 = time.perf_counter()
    extract_store(texts_for(name, directory, args.prompts, args.tokens), args.tokens, store, directory, "float32")
    print(f"\n== {name}: extracted {args.prompts} x {args.tokens} tokens in {time.perf_counter() - t0:.0f} s",
          flush=True)
    if not args.profile_only:
        throughput(store, name, args, tmp)
    for entries in args.block_entries or [None]:
        profile(store, args, tmp, entries)


def throughput(store: str, name: str, args, tmp: str):
    """Steps 2 and 3 (module docstring): repgeo against the in-memory way, one table row per decoders and W.

    Each pair of runs is repeated ``--repeats`` times, repgeo and the in-memory way one after the other (which
    goes first alternates), so that both meet alike whatever else the machine runs; the row gives the medians, and
    the ratio's median and range over the pairs.
    """
    print("| decoders | W | repgeo readings/s (span s; whole call s) | in-memory readings/s (s) | repgeo / in-memory: "
          "median (range) | tokens/s per core: repgeo / in-memory | CPU µs per reading: repgeo (system) / "
          "in-memory (system) | page faults per reading: repgeo / in-memory | peak RSS MiB: each worker / "
          "in-memory (after loading the model) |")
    print("|---|---|---|---|---|---|---|---|---|")
    import zarr

    layers = zarr.open_group(store, mode="r")["hidden"].shape[1]
    for decoders in ("output", "output,input"):
        for workers in sorted({args.workers, 1}, reverse=True):
            pairs = []
            for repeat in range(args.repeats):
                out = os.path.join(tmp, f"{name}-{decoders}-{workers}-{repeat}.zarr")
                runs = {"repgeo": f"from lens import repgeo_run; repgeo_run({store!r}, {out!r}, {decoders!r}, "
                                  f"{workers}, {args.top_k})",
                        "in-memory": f"from lens import in_memory_run; in_memory_run({store!r}, {decoders!r}, "
                                     f"{workers}, {args.top_k})"}
                order = list(runs) if repeat % 2 == 0 else list(runs)[::-1]
                done = {way: _in_fresh_process(runs[way], env={"OMP_NUM_THREADS": str(workers)}
                                               if way == "in-memory" else None) for way in order}
                shutil.rmtree(out, ignore_errors=True)
                pairs.append((done["repgeo"], done["in-memory"]))
            ratios = [r["readings"] / r["span_s"] / (m["readings"] / m["seconds"]) for r, m in pairs]
            r = {key: float(np.median([pair[0][key] for pair in pairs])) for key in
                 ("span_s", "wall_s", "cpu_s", "sys_s", "faults", "readings")}
            m = {key: float(np.median([pair[1][key] for pair in pairs])) for key in
                 ("seconds", "cpu_s", "sys_s", "faults", "readings", "peak", "loaded")}
            peaks = [max(pair[0]["worker_peak"][w] for pair in pairs) for w in range(workers)]
            ours, theirs = r["readings"] / r["span_s"], m["readings"] / m["seconds"]
            per = {way: {key: x[key] / x["readings"] * 1e6 for key in ("cpu_s", "sys_s")} for way, x in
                   (("repgeo", r), ("in-memory", m))}
            print(f"| {decoders} | {workers} | {ours:.0f} ({r['span_s']:.1f}; {r['wall_s']:.1f}) | "
                  f"{theirs:.0f} ({m['seconds']:.1f}) | "
                  f"{np.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) | "
                  f"{ours / layers / workers:.0f} / {theirs / layers / workers:.0f} | "
                  f"{per['repgeo']['cpu_s']:.0f} ({per['repgeo']['sys_s']:.0f}) / "
                  f"{per['in-memory']['cpu_s']:.0f} ({per['in-memory']['sys_s']:.0f}) | "
                  f"{r['faults'] / r['readings']:.0f} / {m['faults'] / m['readings']:.0f} | "
                  f"{', '.join(mib(b) for b in peaks)} / {mib(m['peak'])} ({mib(m['loaded'])}) |", flush=True)


def profile(store: str, args, tmp: str, block_entries: int | None):
    """Step 4 (module docstring): the profile of one lens_task."""
    with tempfile.TemporaryDirectory(dir=tmp) as scratch:
        p = _in_fresh_process(f"from lens import profile_task; profile_task({store!r}, {args.top_k}, {scratch!r}, "
                              f"{block_entries})", env={"OMP_NUM_THREADS": "1"})
    readings = p["tokens"] * p["layers"]
    total = np.sum(list(p["steps"].values()), axis=0)
    print(f"profile, one lens_task (prompt 0: {p['tokens']} tokens x {p['layers']} layers, blocks of {p['block']} "
          f"tokens (BLOCK_ENTRIES {p['block_entries']:,}), {p['per_product']} layers per product, both decoders, "
          f"1 thread): the task "
          f"{p['task'][0]:.2f} s wall, {p['task'][1]:.2f} s CPU, "
          f"{p['task'][2] / readings:.0f} page faults per reading; its steps one by one {total[0]:.2f} s wall, "
          f"{total[1]:.2f} s CPU")
    print(f"  {'step':66s} {'wall s':>7s} {'CPU s':>7s} {'share':>6s} {'µs/reading':>10s} {'faults/reading':>14s}")
    for step, (wall, cpu, faults) in sorted(p["steps"].items(), key=lambda item: -item[1][1]):
        print(f"  {step:66s} {wall:7.3f} {cpu:7.3f} {cpu / total[1]:6.1%} {cpu / readings * 1e6:10.1f} "
              f"{faults / readings:14.0f}")
    ops = sorted(p["operators"].items(), key=lambda item: -item[1])
    whole = sum(p["operators"].values())
    print(f"  torch operators of the task (self CPU, torch.profiler; {whole:.2f} s in all): " + ", ".join(
        f"{name.removeprefix('aten::')} {seconds / whole:.0%}" for name, seconds in ops[:10]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-262k,smollm2-135m", help=f"of {', '.join(MODELS)}")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs (repgeo, in-memory) per table row")
    parser.add_argument("--block-entries", type=lambda text: [int(x) for x in text.split(",")],
                        help="profile with these entries per (token, vocab) block instead of the toolkit's "
                             "BLOCK_ENTRIES, e.g. 16777216,8323072")
    parser.add_argument("--profile-only", action="store_true", help="skip the throughput table (steps 2 and 3)")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    print(f"{os.cpu_count()} cores; {args.prompts} prompts x {args.tokens} tokens, top-k {args.top_k}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            bench_model(name, args, tmp)


if __name__ == "__main__":
    main()
