"""The ``repgeo summarize`` job: check the stores, then compute per-prompt and group observables with Dask."""

from __future__ import annotations

import datetime
import os
import shutil
import sys
import time

import numpy as np

from .. import __version__
from ..errors import UserError
from ..runtime.cluster import completed
from ..store.activations import open_activation_group, source_identity
from ..store.info import LAYOUT
from ..store.validate import require_consistent
from ..store.zarr_io import consolidate
from ..store.results import NAMES, VARIABLES, create_results_store, open_results_group, write_prompt_results
from .bpc import store_bpc
from .cloud import empty_prompt_results
from .params import GROUP_OBSERVABLES, PROMPT_OBSERVABLES, SummarizeParams
from .tasks import group_task, group_values, prompt_task, store_group_members


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def _variables(params, n_layers: int) -> list:
    names = list(empty_prompt_results(params, n_layers, 1))
    for obs_name in ("contributions", "bpc"):
        if params.wants(obs_name):
            names += list(PROMPT_OBSERVABLES[obs_name])
    for obs_name, variables in GROUP_OBSERVABLES.items():
        if params.wants(obs_name):
            names += list(variables)
    return [n for n in VARIABLES if n in names]


def check_inputs(store: str, out: str, params: SummarizeParams, resume: bool):
    """Everything that can be refused before any work starts; returns the group values (None without --groupby)."""
    source = require_consistent(store, "activations")
    labels = [name for name, _ in source.arrays() if name not in LAYOUT]
    groups = None
    clash = sorted(set(labels) & NAMES)  # a store extracted before a results name existed
    if clash:
        raise UserError(f"label {clash[0]!r} of {store} collides with a results variable; re-extract with the "
                        f"label renamed")
    if params.wants("contributions") and "head_norm" not in source:
        raise UserError(f"{store} was extracted without --contributions; re-extract it with --contributions for "
                        f"--observables contributions")
    if params.reference is not None and not params.groupby:
        raise UserError("--reference names a group: give --groupby LABEL too")
    if params.groupby:
        if params.groupby not in labels:
            raise UserError(f"unknown label {params.groupby!r} for --groupby; {store} has labels: "
                            f"{', '.join(labels) or '(none)'}")
        groups = group_values(source[params.groupby][:])
        if params.reference is not None and params.reference not in [str(g) for g in groups]:
            raise UserError(f"--reference {params.reference!r} is not a value of label {params.groupby}; values: "
                            f"{', '.join(map(str, groups))}")
    if os.path.exists(out):
        if not resume:
            raise UserError(f"{out} already exists; pass --resume to complete it, or choose a new --out")
        old = dict(require_consistent(out, "results").attrs)
        if old["source"] != source_identity(store, source) or old["parameters"] != params.recorded():
            raise UserError(f"{out} was computed from another store or with other parameters; --resume needs the "
                            f"same ones, or choose a new --out")
    if not source["done"][:].any():
        raise UserError(f"{store} has no finished prompt; complete it with repgeo extract --resume first")
    if params.distance_dtype:
        _distance_space(source, out, params)
    longest = int(source["n_tokens"][:].max())
    if params.skip_tokens + 3 > longest:
        raise UserError(f"--skip-tokens {params.skip_tokens} leaves fewer than 3 tokens in every prompt of {store} "
                        f"(the longest has {longest}); skip fewer")
    return groups


def _distance_space(source, out: str, params):
    """Print the size of --save-distances (n_tokens² per (prompt, layer)) and refuse it when the disk lacks room."""
    n = source["n_tokens"][:].astype(np.int64) - params.skip_tokens
    need = int((np.clip(n, 0, None) ** 2).sum()) * source["hidden"].shape[1] * np.dtype(params.distance_dtype).itemsize
    parent = os.path.dirname(os.path.abspath(out)) or "."
    free = shutil.disk_usage(parent).free if os.path.isdir(parent) else None
    _log(f"summarize: the distance matrices take up to {need / 2**20:.1f} MiB at {params.distance_dtype}"
         + (f"; {free / 2**30:.1f} GiB free in {parent}" if free is not None else ""))
    if free is not None and need > free:
        raise UserError(f"{parent} has {free / 2**30:.2f} GiB free but --save-distances needs up to "
                        f"{need / 2**30:.2f} GiB; free space, use --distance-dtype float16, or choose another --out")


def summarize(store: str, out: str, params: SummarizeParams, client, groups) -> None:
    """Fill the results store at ``out`` (creating it if needed) using the Dask ``client``."""
    source = open_activation_group(store)
    n_prompts, n_layers = source["hidden"].shape[:2]
    if not os.path.exists(out):
        attrs = {"toolkit_version": __version__, "source": source_identity(store, source),
                 "source_attributes": dict(source.attrs), "parameters": params.recorded(),
                 "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        create_results_store(out, source=source, params=params, variables=_variables(params, n_layers),
                             groups=[str(g) for g in groups] if groups else None, attrs=attrs)
    results = open_results_group(out, "r+")
    source_done = source["done"][:]
    source_loss = source["loss"][:]  # read after done: final for every done prompt (extract sets done last)
    todo = [p for p in np.flatnonzero(source_done & ~results["done"][:]).tolist()]
    if not source_done.all():
        _log(f"summarize: {int((~source_done).sum())} prompts of {store} are not extracted yet and are skipped")
    _log(f"summarize: {len(todo)} prompts to do, {int(results['done'][:].sum())} done before, "
         f"{len(client.nthreads())} workers")

    t0 = time.monotonic()
    # Results are written and released one at a time: workers never keep finished ones (--save-knn is large).
    tasks = client.map(prompt_task, [store] * len(todo), todo, params=params, out=os.path.abspath(out), pure=False)
    # bpc here, on the client, while the workers compute: one tokenizer load, one encoding per prompt
    bpc = store_bpc(store, source, todo, _log) if params.wants("bpc") else {}
    for _, (prompt, values) in completed(tasks, [1] * len(todo), _log, "summarize", "prompts"):
        # loss too: the copy made at creation lacks the prompts extracted since (a resumed partial store)
        extra = {"bpc": bpc[prompt]} if params.wants("bpc") else {}
        write_prompt_results(results, prompt, dict(values, loss=source_loss[prompt], **extra))

    if groups and not results.attrs.get("groups_done") and not source_done.all():
        # Pools of a partial store would differ from the final ones (and may lack the reference group): wait.
        _log(f"summarize: group observables wait until {store} is complete; then rerun with --resume")
    elif groups and not results.attrs.get("groups_done"):
        members = store_group_members(source, params)  # the same the workers derive
        tasks = client.map(group_task, [store] * n_layers, range(n_layers), params=params, pure=False)
        index = {g: i for i, g in enumerate(str(g) for g in groups)}
        rows = [index[g] for g in members]
        for _, (layer, values) in completed(tasks, [1] * n_layers, _log, "summarize: groups", "layers"):
            for name, value in values.items():
                full = results[name][:]
                full[rows, layer] = value
                results[name][:] = full
        results.attrs["groups_done"] = True
        _log(f"summarize: group observables of {len(members)} groups by {params.groupby} done")
    consolidate(out)
    _log(f"summarize: complete: {out} ({time.monotonic() - t0:.1f} s)")
