"""Helpers shared by the benchmarks: build a store with the real CLI, read a process's own memory."""

from __future__ import annotations

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPGEO = os.path.join(ROOT, ".venv", "bin", "repgeo")


def extract_store(texts, tokens: int, out: str, model: str, dtype: str):
    """`repgeo extract` of ``texts`` cut to exactly ``tokens`` tokens, one prompt per batch, ``dtype`` storage."""
    prompts = out + ".jsonl"
    with open(prompts, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "doc": i}) + "\n")
    subprocess.run([REPGEO, "extract", "--model", model, "--prompts", prompts, "--out", out, "--dtype", dtype,
                    "--max-tokens", str(tokens), "--min-tokens", str(tokens), "--batch-size", "1"], check=True,
                   capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def proc_status_bytes(field: str) -> int:
    """This process's memory from /proc/self/status (Linux): "VmRSS" now, "VmHWM" its peak, in bytes.

    Not getrusage's ru_maxrss: that survives exec, so a process started by a big parent (a bench that imports
    torch) would report the parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)
