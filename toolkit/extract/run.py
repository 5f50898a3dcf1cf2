"""The ``repgeo extract`` job: validate everything, create or reopen the store, compute and write on every rank."""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass

import numpy as np

from .. import __version__
from ..errors import UserError, unexpected
from ..models import (load_model, load_tokenizer, model_description, resolve_model, tokenizer_fingerprint,
                      weights_sha256)
from ..prompts import read_prompts
from ..store.activations import PromptWriter, create_activation_store, label_arrays, open_activation_group
from ..store.validate import require_consistent
from ..store.zarr_io import consolidate
from .plan import batches_of_rank, first_token_id, make_batches, make_plan
from .progress import Progress
from ..runtime.ranks import binding, cpu_threads, mpi_ranks, select_device
from .writer import BackgroundWriter

#: Bytes on disk per stored value, before compression (an upper bound: real activations compress ~1.1×).
BYTES_PER_VALUE = {"float16": 2, "bfloat16": 2, "float32": 4}
#: Signals that ask a job to stop: Slurm's warning signal (--signal=USR1@...), preemption and scancel (TERM).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@dataclass
class ExtractSettings:
    model: str
    prompts: str
    out: str
    dtype: str = "float16"
    compute_dtype: str = "auto"
    max_tokens: int | None = None
    min_tokens: int | None = None
    batch_size: int = 4
    shuffle_levels: tuple = ()
    seed: int = 0
    resume: bool = False
    withhold_texts: bool = False
    device: str = "auto"
    device_map: str | None = None
    bos: str = "auto"  # auto: the tokenizer's own special tokens; always: --bos-token first; never: none
    bos_token: str | None = None
    contributions: bool = False
    flow_targets: object = None  # "last" (default), "all" or positions; with contributions only
    flow_weighting: str | None = None  # "mean" (default) or "norm"; with contributions only
    flow_gradients: bool = False
    yes: bool = False  # accept --flow-targets all with --flow-gradients on long prompts

    @property
    def flow(self):
        """The flow settings of a --contributions run (None without)."""
        from .contributions import FlowSettings

        if not self.contributions:
            return None
        return FlowSettings(self.flow_targets or "last", self.flow_weighting or "mean", self.flow_gradients)

    def recorded(self) -> dict:
        """The settings that decide the store's content; a resume must use the same ones."""
        flow = self.flow
        return {"max_tokens": self.max_tokens, "min_tokens": self.min_tokens, "batch_size": self.batch_size,
                "shuffle_levels": list(self.shuffle_levels), "seed": self.seed,
                "compute_dtype": self.compute_dtype, "add_special_tokens": self.bos == "auto", "bos": self.bos,
                "withhold_texts": self.withhold_texts, "contributions": self.contributions,
                "flow": None if flow is None else {"targets": flow.targets if isinstance(flow.targets, str)
                                                   else list(flow.targets), "weighting": flow.weighting,
                                                   "gradients": flow.gradients}}


def on_root(ranks, fn):
    """Run ``fn`` on rank 0 only and give every rank its result; a :class:`UserError` there is raised everywhere."""
    result, error = None, None
    if ranks.is_root:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    result, error = ranks.comm.bcast((result, error), root=0)
    if error is not None:
        raise UserError(error)
    return result


def _identity(attrs: dict) -> dict:
    """What must match for ``--resume``: model weights, tokenizer, dtype, settings, prompt file."""
    model = attrs["model"]
    return {"model": model.get("weights_sha256") or model.get("id"),
            "tokenizer": attrs["tokenizer_fingerprint"], "dtype": attrs["dtype"],
            "settings": attrs["settings"], "prompt file": attrs["prompts"]["sha256"]}


def _check_resumable(out: str, attrs: dict):
    group = require_consistent(out, "activations")  # a done prompt whose data went missing would stay missing
    made_by = [job for job in ("subset", "merge") if job in group.attrs]
    if made_by:  # its prompts are not the prompt file's: extract would write them at the wrong places
        raise UserError(f"{out} was made by repgeo {made_by[0]} and holds only done prompts: it cannot be resumed; "
                        f"resume the store it came from, or choose a new --out")
    old, new = _identity(dict(group.attrs)), _identity(attrs)
    differ = [k for k in new if old[k] != new[k]]
    if differ:
        raise UserError(f"{out} was extracted with a different {' and '.join(differ)}; --resume needs the same "
                        f"model, settings and prompt file, or choose a new --out")


def _resolve_compute_dtype(setting: str, device: str, dtype: str):
    import torch

    if setting == "auto":
        setting = "float32" if device == "cpu" or dtype == "float32" else "bfloat16"
    return getattr(torch, setting)


def _disk_check(out: str, n_values: int, dtype: str, n_contribution_values: int = 0):
    """Print the expected size (hidden states at ``dtype``, contribution arrays at float32) and refuse it when the
    disk lacks room."""
    need = n_values * BYTES_PER_VALUE[dtype] + n_contribution_values * 4
    parent = os.path.dirname(os.path.abspath(out)) or "."
    free = shutil.disk_usage(parent).free
    extra = f" + {n_contribution_values} contribution values at float32" if n_contribution_values else ""
    print(f"extract: expected size on disk up to {need / 2**20:.1f} MiB ({n_values} values at {dtype}{extra}); "
          f"{free / 2**30:.1f} GiB free in {parent}", file=sys.stderr, flush=True)
    if need > free:
        raise UserError(f"{parent} has {free / 2**30:.2f} GiB free but the store needs up to {need / 2**30:.2f} GiB; "
                        f"free space or choose another --out")


class _StopFlag:
    """Set by a stop signal; the loop finishes the batch it is on and returns."""

    def __init__(self):
        self.signal = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._set)

    def _set(self, signum, _frame):
        self.signal = signal.Signals(signum).name

    def ignore_slurm(self):
        """Ignore Slurm's SIGTERM and SIGUSR1 from now on (SIG_IGN, unlike a Python handler, lasts through the
        interpreter's exit)."""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)


def run_extract(s: ExtractSettings) -> int:
    # Stop signals are caught from the start (a rank asked to stop while it loads stops before its first batch)
    # and ignored once this rank's exit code is decided: srun --kill-on-bad-exit sends SIGTERM to the ranks still
    # exiting when the first one exits non-zero (a stop or an error every rank raises alike), and being killed by
    # it would turn their exit code into 143.
    stop, ranks = _StopFlag(), None
    try:
        ranks = mpi_ranks()
        return _run(s, ranks, stop)
    except UserError:
        raise
    except BaseException as e:
        if ranks is not None and ranks.size > 1:  # one failed rank must not leave the others waiting forever
            print(f"repgeo extract: error (rank {ranks.rank}): {unexpected(e)}", file=sys.stderr, flush=True)
            ranks.comm.Abort(2)
        raise
    finally:
        stop.ignore_slurm()


def _run(s: ExtractSettings, ranks, stop: _StopFlag) -> int:
    root = ranks.is_root
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if root else (lambda msg: None)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    # Validate everything on every rank (cheap and deterministic) before anything is written.
    if s.max_tokens is not None and s.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1 (got {s.max_tokens}); omit it to keep whole prompts")
    if s.min_tokens and s.max_tokens and s.min_tokens > s.max_tokens:
        raise UserError(f"--min-tokens {s.min_tokens} exceeds --max-tokens {s.max_tokens}; no prompt could be kept")
    if s.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {s.batch_size})")
    exists = os.path.exists(s.out)
    if exists and not s.resume:
        raise UserError(f"{s.out} already exists; pass --resume to complete it, or choose a new --out")
    if s.bos_token is not None and s.bos != "always":
        raise UserError("--bos-token names the token that --bos always prepends; add --bos always or drop it")
    if not s.contributions and (s.flow_targets or s.flow_weighting or s.flow_gradients):
        raise UserError("--flow-targets, --flow-weighting and --flow-gradients go with --contributions; add it")
    source = read_prompts(s.prompts)
    ref = resolve_model(s.model)
    tokenizer = load_tokenizer(ref)
    first_token = first_token_id(tokenizer, s.bos_token) if s.bos == "always" else None
    plan = make_plan(source, tokenizer, min_tokens=s.min_tokens, max_tokens=s.max_tokens,
                     shuffle_levels=s.shuffle_levels, seed=s.seed, add_special_tokens=s.bos == "auto",
                     first_token=first_token)
    label_arrays(plan.prompts)  # refuses reserved label names now, not after the model has loaded
    flow = s.flow
    if flow and flow.targets == "all" and flow.gradients and int(plan.n_tokens.max()) > 256 and not s.yes:
        raise UserError(f"--flow-targets all with --flow-gradients runs one backward pass per token and stores "
                        f"targets x layers x tokens values (the longest prompt has {int(plan.n_tokens.max())} "
                        f"tokens); pass --yes to go ahead, or choose a few --flow-targets")
    device = select_device(ranks.local_rank, s.device)
    sha = on_root(ranks, lambda: weights_sha256(ref))

    import torch

    from .forward import forward_batch  # torch is imported only once the input is known to be good

    compute_dtype = _resolve_compute_dtype(s.compute_dtype, device, s.dtype)
    # The resolved compute dtype, not "auto": a resume on another device must not mix float32 and bfloat16.
    settings = dict(s.recorded(), compute_dtype=str(compute_dtype).removeprefix("torch."), bos_token_id=first_token)
    identity = {"model": {"id": ref.name, "weights_sha256": sha}, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                "dtype": s.dtype, "settings": settings, "prompts": {"sha256": source.sha256}}
    if exists:  # refuse a mismatched resume before spending minutes loading a large model
        on_root(ranks, lambda: _check_resumable(s.out, identity))

    torch.set_num_threads(cpu_threads(ranks.local_size))
    if s.device_map:  # one rank spans the node's GPUs; inputs go where the first layers are
        model = load_model(ref, compute_dtype, device_map=s.device_map)
        device = str(model.get_input_embeddings().weight.device)
    else:
        model = load_model(ref, compute_dtype).to(device)
    model.requires_grad_(False)  # inference: no weight gradients, even in --flow-gradients' backward passes
    if flow:
        from .attention import use_weights_attention
        from .contributions import ContributionRecorder, check_supported, contribution_values, gradient_norms

        check_supported(model.config, ref.name)
        use_weights_attention(model)  # SDPA, and the attention weights from the modules while the recorder records
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and int(plan.n_tokens.max()) > limit:
        raise UserError(f"the longest prompt has {int(plan.n_tokens.max())} tokens but {ref.name} takes at most "
                        f"{limit}; pass --max-tokens {limit}")
    placed = binding(ranks, device)
    attrs = {
        "toolkit_version": __version__,
        "model": dict(model_description(ref, model), weights_sha256=sha),
        "tokenizer_fingerprint": identity["tokenizer_fingerprint"],
        "special_token_ids": sorted({int(i) for i in tokenizer.all_special_ids} | ({first_token} if first_token
                                                                                    is not None else set())),
        "dtype": s.dtype,
        "settings": identity["settings"],
        "prompts": {"path": os.path.abspath(s.prompts), "sha256": source.sha256, "n_input": plan.n_input,
                    "n_dropped_short": plan.n_dropped_short, "n_truncated": plan.n_truncated,
                    "n_stored": len(plan.prompts)},
        "created": started,
        "ranks": ranks.size,
    }
    n_layers, d_model = attrs["model"]["n_layers"] + 1, attrs["model"]["d_model"]

    n_tokens = plan.n_tokens
    log(f"extract: {len(plan.prompts)} prompts from {plan.n_input} inputs ({plan.n_dropped_short} shorter than "
        f"--min-tokens dropped, {plan.n_truncated} truncated), {n_layers} layers x {d_model} dims, "
        f"{s.dtype}, {ranks.size} rank(s)")
    log(placed)

    def prepare():
        done = open_activation_group(s.out)["done"][:] if exists else np.zeros(len(plan.prompts), bool)
        _disk_check(s.out, int(n_tokens[~done].sum()) * n_layers * d_model, s.dtype,
                    contribution_values(model.config, flow, n_tokens[~done]) if flow else 0)
        if not exists:
            spec = None if not flow else {"heads": int(model.config.num_attention_heads), "gradients": flow.gradients,
                                          "targets": [flow.positions(int(n)) for n in n_tokens]}
            create_activation_store(s.out, plan, n_layers=n_layers, d_model=d_model, dtype=s.dtype, attrs=attrs,
                                    withhold_texts=s.withhold_texts, contributions=spec)
        group = open_activation_group(s.out, "r+")
        runs = list(group.attrs.get("runs", []))
        runs.append({"started": started, "ranks": ranks.size, "device": device, "resumed": exists,
                     "host": socket.gethostname()})
        group.attrs.update({"runs": runs, "ranks": ranks.size})
        return done

    done = on_root(ranks, prepare)
    group = open_activation_group(s.out, "r+")
    writer = PromptWriter(group)

    # A batch with any prompt left is recomputed whole, so every prompt sees the same batch as in one run.
    batches = [b for b in make_batches(n_tokens, s.batch_size) if not done[b].all()]
    mine = batches_of_rank(batches, ranks.rank, ranks.size)
    todo = [p for b in batches for p in b if not done[p]]
    progress = Progress(ranks, len(plan.prompts), int(n_tokens[todo].sum()), already_done=int(done.sum()))
    background = BackgroundWriter(writer.write, s.out)
    recorder = ContributionRecorder(model, flow.weighting) if flow else contextlib.nullcontext()
    t0 = time.monotonic()
    try:
        with recorder:
            for batch in mine:
                if stop.signal:
                    break
                results = forward_batch(model, [plan.prompts[p].input_ids for p in batch], batch, device, s.dtype,
                                        recorder if flow else None, flow)
                for p, (hidden, token_loss, extras) in zip(batch, results):
                    if done[p]:
                        continue
                    if flow and flow.gradients:
                        extras["grad_norm"] = gradient_norms(model, plan.prompts[p].input_ids,
                                                             flow.positions(len(token_loss)))
                    background.put(p, hidden, token_loss, extras)
                left = [p for p in batch if not done[p]]
                progress.add(len(left), int(n_tokens[left].sum()))
        background.close()
    except UserError as e:
        if ranks.size > 1:  # only this rank knows: say it here and stop the others
            fix = "" if getattr(e, "keep_store", False) else f"; remove {s.out} before rerunning"
            print(f"repgeo extract: error (rank {ranks.rank}): {e}{fix}", file=sys.stderr, flush=True)
            ranks.comm.Abort(2)
            os._exit(2)  # Abort may return before the process is ended
        if not exists and not getattr(e, "keep_store", False):
            # the store is this run's own and unusable with these settings: leave nothing behind
            background.abandon()
            shutil.rmtree(s.out, ignore_errors=True)
        else:
            background.close_quietly()  # keep what is finished: --resume continues from it
        raise
    progress.finish()
    stopped = ranks.comm.allreduce(stop.signal or "", op=lambda a, b, _=None: a or b)
    if stopped:
        log(f"extract: stopped by {stopped}; rerun with --resume to finish {s.out}")
        return 128 + int(getattr(signal, stopped))
    if root:
        consolidate(s.out)  # the runs attribute changed
        complete = bool(open_activation_group(s.out)["done"][:].all())
        log(f"extract: {'complete' if complete else 'INCOMPLETE'}: {s.out} ({time.monotonic() - t0:.1f} s)")
    return 0

