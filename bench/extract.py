"""Benchmark: `repgeo extract` against a bare forward and against the token-geometry way of saving activations.

Same prompts, same model, same batch size, same threads, run one after another (never at the same time):

- bare:    the forward pass with output_hidden_states=True; hidden states computed and discarded.
- repgeo:  the real CLI (`repgeo extract --dtype float16`, compressed, checksummed, written in the background);
           its own timer covers the compute-and-write loop, so model loading is excluded as for the others.
- npsave:  one prompt at a time, hidden states as float32 numpy, one `np.save` per prompt (the notebooks' way).
- contributions: the real CLI with `--contributions` (head, attention and MLP writes, flow to the last token:
           SDPA plus the attention weights, and hooks), and with `--contributions --flow-gradients` (one backward
           pass per target).

Prints seconds, tokens/s, the ratio to the bare forward, bytes on disk per stored value, and, for the
contributions runs, their ratio to the plain repgeo run and the bytes they add per prompt.

    .venv/bin/python bench/extract.py [--model smollm2-135m] [--prompts 8] [--tokens 1024] [--batch-size 1]
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
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from toolkit.extract.plan import make_batches  # noqa: E402
from toolkit.runtime.ranks import cpu_threads  # noqa: E402
from toolkit.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from toolkit.store.info import disk_usage  # noqa: E402

INAUGURAL = os.path.join(ROOT, "..", "shared", "data", "corpora", "inaugural")


def _read_text(path: str) -> str:
    raw = open(path, "rb").read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # a few speeches are Latin-1
        return raw.decode("latin-1")


def long_texts(tokenizer, n: int, tokens: int) -> list:
    """``n`` texts of at least ``tokens`` tokens: inaugural speeches when ../shared is there, else the demo's."""
    if os.path.isdir(INAUGURAL):
        candidates = [_read_text(os.path.join(INAUGURAL, f)) for f in sorted(os.listdir(INAUGURAL))]
    else:
        with open(os.path.join(ROOT, "toolkit", "data", "demo.jsonl"), encoding="utf-8") as f:
            candidates = [json.loads(line)["text"] for line in f]
    chosen = [t for t in candidates if len(tokenizer(t)["input_ids"]) >= tokens]
    if len(chosen) < n:
        chosen = (chosen * n)[:n]  # repeat when the corpus is short; each copy is still a full forward
    return chosen[:n]


def bare(model, batches, ids) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            x = torch.tensor(np.stack([ids[p] for p in batch]), dtype=torch.long)
            out = model(input_ids=x, output_hidden_states=True, use_cache=False)
            del out
    return time.perf_counter() - t0


def npsave(model, ids, directory) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p, row in enumerate(ids):
            out = model(input_ids=torch.tensor(row[None], dtype=torch.long), output_hidden_states=True, use_cache=False)
            hidden = np.stack([h[0].float().numpy() for h in out.hidden_states])  # (layer, token, dim) float32
            np.save(os.path.join(directory, f"prompt{p}.npy"), hidden)
    return time.perf_counter() - t0


def repgeo(args, prompts_file, out, *extra) -> float:
    cmd = [os.path.join(ROOT, ".venv", "bin", "repgeo"), "extract", "--model", args.model, "--prompts", prompts_file,
           "--out", out, "--dtype", "float16", "--max-tokens", str(args.tokens), "--min-tokens", str(args.tokens),
           "--batch-size", str(args.batch_size), "--device", args.device, *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if run.returncode != 0:
        sys.exit(f"repgeo extract failed:\n{run.stderr}")
    return float(re.search(r"complete: .* \(([0-9.]+) s\)", run.stderr).group(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(cpu_threads(1))
    ref = resolve_model(args.model)
    tokenizer = load_tokenizer(ref)
    texts = long_texts(tokenizer, args.prompts, args.tokens)
    ids = [np.asarray(tokenizer(t)["input_ids"][: args.tokens]) for t in texts]
    model = load_model(ref, torch.float32).to(args.device)
    batches = make_batches(np.array([len(i) for i in ids]), args.batch_size)
    n_tokens = sum(len(i) for i in ids)
    n_values = n_tokens * (model.config.num_hidden_layers + 1) * model.config.hidden_size

    times = {"bare": [], "repgeo": [], "npsave": [], "contrib": [], "contrib+grad": []}
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = os.path.join(tmp, "prompts.jsonl")
        with open(prompts_file, "w", encoding="utf-8") as f:
            for i, t in enumerate(texts):
                f.write(json.dumps({"text": t, "doc": i}) + "\n")
        for r in range(args.repeats):
            times["bare"].append(bare(model, batches, ids))
            out = os.path.join(tmp, f"store{r}.zarr")
            times["repgeo"].append(repgeo(args, prompts_file, out))
            sizes["repgeo"] = disk_usage(out)
            npdir = os.path.join(tmp, f"np{r}")
            os.makedirs(npdir)
            times["npsave"].append(npsave(model, ids, npdir))
            sizes["npsave"] = disk_usage(npdir)
            for way, extra in (("contrib", ["--contributions"]),
                               ("contrib+grad", ["--contributions", "--flow-gradients"])):
                out = os.path.join(tmp, f"{way}{r}.zarr")
                times[way].append(repgeo(args, prompts_file, out, *extra))
                sizes[way] = disk_usage(out)

    base = float(np.median(times["bare"]))
    print(f"{args.prompts} prompts x {args.tokens} tokens, batch {args.batch_size}, {args.model}, "
          f"{torch.get_num_threads()} threads, device {args.device}, median of {args.repeats}")
    print(f"{'way':12s} {'seconds':>8s} {'tokens/s':>9s} {'vs bare':>8s} {'bytes/value':>12s}")
    for way, ts in times.items():
        t = float(np.median(ts))
        per_value = f"{sizes[way] / n_values:.3f}" if way in sizes else "-"
        print(f"{way:12s} {t:8.2f} {n_tokens / t:9.0f} {t / base:8.3f} {per_value:>12s}")
    plain = float(np.median(times["repgeo"]))
    for way in ("contrib", "contrib+grad"):
        added = (sizes[way] - sizes["repgeo"]) / args.prompts
        print(f"{way}: {float(np.median(times[way])) / plain:.2f}x the plain repgeo extract, "
              f"{added / 2**20:.2f} MiB added per prompt on disk")


if __name__ == "__main__":
    main()
