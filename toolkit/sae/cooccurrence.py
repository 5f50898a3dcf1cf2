"""``repgeo sae cooccurrence``: count SAE feature co-occurrence over an activation store with Dask, then analyse.

Two stages:

1. **Counting** (distributed): each Dask task takes a range of prompts, encodes their vectors at the layer with
   the SAE, marks which features occur in which block (`block_occurrence`) and adds the exact integer counts
   Oᵀ O of its blocks into its worker's dense int32 (feature, feature) sum (`cooccurrence_counts`); at the end
   the workers' sums are added pairwise on the workers and only the total goes to the client (one matrix per
   worker moves once, however many tasks there were). Integer sums do not depend on their order, so the counts
   are the same for any number of workers.
   Memory per worker, whatever the corpus size: its sum, 4 · d_sae² bytes (1 GiB at 16k features; twice that
   while it adds a partner's sum at the end),
   plus the float32 scratch of one product band, 4 · d_sae · 2048 bytes (128 MiB), plus up to FLUSH_BLOCKS
   blocks of occurrences and one prompt's vectors and activations (tokens × d_sae float32: 64 MiB for 1024 tokens
   at 16k), plus the SAE's weights (2 · d_in · d_sae float32, loaded once per worker process). Dense counts,
   because with 256-token blocks a 16k-feature SAE's co-occurrence matrix is mostly nonzero (bench/sae.py:
   ~65 %), where sparse storage would cost 12 bytes per pair. The client receives the int32 total (4 · d_sae²)
   and keeps it as int64 (8 · d_sae²): 3 GiB at 16k.
2. **Analysis** (on the client): affinities, their spectra and lobes, lobe-vs-geometry tests and galaxy spectra.
   It holds a few dense (feature, feature) float64 matrices at once: ~5 · 8 · d_sae² bytes (10 GB at 16k
   features), so run it where that fits.
"""

from __future__ import annotations

import datetime
import functools
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp

from .. import __version__
from ..errors import UserError
from ..observables import (AFFINITIES, affinity, affinity_spectrum, block_occurrence, cooccurrence_counts,
                           covariance_spectrum, default_fit_range, isotropic_reference, lobe_ami,
                           lobe_logreg_accuracy, power_law_slope, spectral_lobes)
from ..store.activations import source_identity
from ..runtime.partial import Partial
from ..store.sae_results import create_sae_results_store
from ..store.validate import require_consistent
from ..store.zarr_io import consolidate
from ..models import file_sha256
from ..runtime.cluster import completed, task_settings
from .files import CFG_FILE, WEIGHTS_FILE, encode, load_sae
from .layer import StoreLayer

#: Fewest prompts per counting task: enough work per task to hide the scheduling cost.
PROMPTS_PER_TASK = 4
#: Blocks of occurrences gathered before one counting product (bounds that buffer, amortises the product).
FLUSH_BLOCKS = 256


@dataclass(frozen=True)
class CooccurrenceSettings:
    store: str
    sae: str
    layer: int
    out: str
    threshold: float = 1.0
    block: int = 256
    clusters: tuple = (2, 4, 8)
    seed: int = 0
    permutations: int = 100
    galaxy_tokens: int = 2048

    def recorded(self) -> dict:
        """The parameters as recorded in the results store (paths are recorded with the store and SAE identity)."""
        values = asdict(self)
        for path in ("store", "sae", "out"):
            del values[path]
        return dict(values, clusters=list(self.clusters))


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def sae_identity(directory: str, sae) -> dict:
    """What identifies an SAE: its directory, the sha256 of its two files, and its shape and architecture."""
    digests = {name: file_sha256(os.path.join(directory, name)) for name in (CFG_FILE, WEIGHTS_FILE)}
    return {"path": os.path.abspath(directory), "weights_sha256": digests[WEIGHTS_FILE],
            "cfg_sha256": digests[CFG_FILE], "architecture": sae.architecture, "d_in": sae.d_in,
            "d_sae": sae.d_sae, "k": sae.k, "hook_name": sae.cfg.get("hook_name")}


@functools.lru_cache(maxsize=2)
def _worker_sae(directory: str, d_model: int, weights_sha256: str):
    """The SAE, loaded once per worker process (the hash keys the cache, so a changed file is reloaded)."""
    return load_sae(directory, d_model)


#: In each worker process: job → {"blocks", "tasks", "counts"}, the sum of every counting task this worker ran
#: for that job. Tasks add into it in place and return only their block count; the sums leave the workers once,
#: at the end, reduced pairwise between workers (`count_cooccurrence`).
_ACCUMULATED = {}


def count_task(store: str, layer: int, prompts: list, task: int, sae_dir: str, weights_sha256: str,
               threshold: float, block: int, job: str) -> int:
    """Add the counts of a range of prompts into this worker's sum for ``job``; return the number of blocks.

    Occurrences wait in the worker's pending list, across tasks, until FLUSH_BLOCKS blocks are there: each product
    passes over the whole dense (feature, feature) sum (1 GiB at 16k features, memory-bound), so the fewer
    products the better, and workers sharing a node's memory bandwidth scale with their number.
    """
    with task_settings():
        source = StoreLayer(store, layer)
        sae = _worker_sae(sae_dir, source.d_model, weights_sha256)
        entry = _ACCUMULATED.setdefault(job, {"blocks": 0, "tasks": [], "counts": None, "pending": []})
        if entry["counts"] is None:
            entry["counts"] = np.zeros((sae.d_sae, sae.d_sae), dtype=np.int32)
        n_blocks = 0
        for p in prompts:
            vectors, special = source.slab(p)
            occurrence = block_occurrence(encode(sae, vectors), len(vectors), special, threshold, block)
            entry["pending"].append(occurrence)
            n_blocks += occurrence.shape[0]
            if sum(o.shape[0] for o in entry["pending"]) >= FLUSH_BLOCKS:
                _flush(entry)
        entry["blocks"] += n_blocks
        entry["tasks"].append(task)
        return n_blocks


def _flush(entry: dict):
    """Add the pending blocks' counts into the worker's sum: one matrix product for all of them."""
    if entry["pending"]:
        cooccurrence_counts(sp.vstack(entry["pending"], format="csr"), out=entry["counts"])
        entry["pending"] = []


def take_counts(job: str) -> tuple:
    """This worker's sum for ``job`` as (blocks, task ids, int32 counts or None), forgotten here."""
    entry = _ACCUMULATED.pop(job, None)
    if entry is None:
        return 0, [], None
    _flush(entry)
    return entry["blocks"], entry["tasks"], entry["counts"]


def add_counts(a: tuple, b: tuple) -> tuple:
    """The sum of two `take_counts` results (into a's array: each partial sum is used once)."""
    counts = b[2] if a[2] is None else a[2] if b[2] is None else np.add(a[2], b[2], out=a[2])
    return a[0] + b[0], a[1] + b[1], counts


def _forget(job: str):
    _ACCUMULATED.pop(job, None)


def _task_prompts(prompts: list, n_workers: int) -> list:
    """Prompts split into contiguous ranges: ~4 tasks per worker (balance and progress), each ≥ PROMPTS_PER_TASK
    prompts."""
    size = max(PROMPTS_PER_TASK, -(-len(prompts) // (4 * n_workers)))
    return [prompts[i:i + size] for i in range(0, len(prompts), size)]


def count_cooccurrence(client, settings: CooccurrenceSettings, source: StoreLayer, sae_id: dict) -> tuple:
    """Stage 1 on the Dask ``client``: (n_blocks, summed (feature, feature) int64 counts).

    Each worker adds its tasks' counts into one int32 matrix of its own; then the workers' matrices are added
    pairwise on the workers (a tree: log2(workers) rounds, each moving one matrix per pair), and only the total
    reaches the client. Every task id must arrive exactly once: a worker lost mid-job (its sum lost with it) is
    an error, never silently missing counts.
    """
    workers = list(client.nthreads())
    groups = _task_prompts([int(p) for p in source.prompts], len(workers))
    job = f"cooccurrence-{uuid.uuid4().hex}"
    tokens = [int(source.n_tokens[g].sum()) for g in groups]
    _log(f"sae cooccurrence: counting {len(source.prompts)} prompts ({sum(tokens)} tokens) in {len(groups)} tasks "
         f"on {len(workers)} workers")
    try:
        tasks = client.map(count_task, [settings.store] * len(groups), [settings.layer] * len(groups), groups,
                           range(len(groups)), sae_dir=settings.sae, weights_sha256=sae_id["weights_sha256"],
                           threshold=settings.threshold, block=settings.block, job=job, pure=False)
        for _ in completed(tasks, tokens, _log, "sae cooccurrence", "tokens"):
            pass
        sums = [client.submit(take_counts, job, workers=[w], allow_other_workers=False, pure=False)
                for w in client.nthreads()]  # every worker now, including any that joined after planning
        while len(sums) > 1:
            sums = [client.submit(add_counts, *sums[i:i + 2], pure=False) if i + 1 < len(sums) else sums[i]
                    for i in range(0, len(sums), 2)]
        n_blocks, task_ids, counts = sums.pop().result()
    finally:
        client.run(_forget, job)  # a failed run leaves no sums in long-lived workers
    if sorted(task_ids) != list(range(len(groups))):
        raise UserError(f"a Dask worker was lost while counting (tasks counted: {len(task_ids)} of {len(groups)}); "
                        f"rerun the command")
    if counts is None:
        counts = np.zeros((sae_id["d_sae"], sae_id["d_sae"]), dtype=np.int32)
    return n_blocks, counts.astype(np.int64)


def _galaxy_sample(source: StoreLayer, sae, size: int) -> np.ndarray:
    """Feature activations (token, feature) of the first ``size`` non-special tokens of the store, in prompt order."""
    rows, total = [], 0
    for p in source.prompts:
        vectors, special = source.slab(int(p))
        rows.append(encode(sae, vectors[~special][: size - total]))
        total += len(rows[-1])
        if total >= size:
            break
    return np.concatenate(rows)


def _galaxy(clouds: dict, seed: int) -> dict:
    """Galaxy spectra of each named cloud (row, dim), their power-law slopes, and the same for isotropic Gaussians.

    The fit range is `default_fit_range` of the cloud's spectrum; the isotropic slope uses the same ranks.
    """
    width = max(X.shape[1] for X in clouds.values())
    out = {name: np.full((len(clouds), width), np.nan)
           for name in ("galaxy_eigenvalues", "galaxy_isotropic_eigenvalues")}
    out.update({name: np.full(len(clouds), np.nan) for name in ("galaxy_slope", "galaxy_isotropic_slope")})
    out.update({name: np.full(len(clouds), -1, dtype=np.int64) for name in ("galaxy_fit_first", "galaxy_fit_last")})
    for i, X in enumerate(clouds.values()):
        if len(X) < 2:
            continue
        lam = covariance_spectrum(X)
        iso = isotropic_reference(X.shape[0], X.shape[1], seed)
        out["galaxy_eigenvalues"][i, : lam.size] = lam
        out["galaxy_isotropic_eigenvalues"][i, : iso.size] = iso
        first, last = default_fit_range(lam)
        if first < last and (lam[first - 1:last] > 0).all():
            out["galaxy_fit_first"][i], out["galaxy_fit_last"][i] = first, last
            out["galaxy_slope"][i] = power_law_slope(lam, (first, last))
            if (iso[first - 1:last] > 0).all():
                out["galaxy_isotropic_slope"][i] = power_law_slope(iso, (first, last))
    return out


def _lobe_statistics(A, occurring, sae, settings: CooccurrenceSettings, metric: str) -> dict:
    """Lobes of one affinity for every cluster count, and how well decoder directions explain them.

    Only features that occur in some block are clustered (for simple matching, two silent features have affinity
    1 — they agree on every block — which says nothing about function); the others get lobe −1.
    """
    shape = (len(settings.clusters),)
    out = {"lobe": np.full(shape + (A.shape[0],), -1, dtype=np.int64)}
    for name in ("lobe_ami", "lobe_ami_null_mean", "lobe_ami_null_std", "lobe_ami_z", "lobe_logreg_accuracy",
                 "lobe_logreg_random_accuracy"):
        out[name] = np.full(shape, np.nan)
    A, directions = A[np.ix_(occurring, occurring)], sae.W_dec[occurring]
    for j, n_clusters in enumerate(settings.clusters):
        try:
            lobes = spectral_lobes(A, n_clusters, settings.seed)
        except ValueError as e:
            _log(f"sae cooccurrence: {metric}, {n_clusters} lobes: skipped ({e})")
            continue
        out["lobe"][j, occurring] = lobes
        try:
            (out["lobe_ami"][j], out["lobe_ami_null_mean"][j], out["lobe_ami_null_std"][j],
             out["lobe_ami_z"][j]) = lobe_ami(lobes, directions, n_clusters, settings.permutations, settings.seed)
        except ValueError as e:
            _log(f"sae cooccurrence: {metric}, {n_clusters} lobes: no AMI ({e})")
        try:
            out["lobe_logreg_accuracy"][j], out["lobe_logreg_random_accuracy"][j] = lobe_logreg_accuracy(
                lobes, directions, settings.seed)
        except ValueError as e:
            _log(f"sae cooccurrence: {metric}, {n_clusters} lobes: no logistic regression ({e})")
    return out


def analyse_and_write(settings: CooccurrenceSettings, source: StoreLayer, sae, sae_id: dict, n_blocks: int,
                      counts, directory: str) -> None:
    """Stage 2: write counts, affinities, spectra, lobes and galaxy spectra to a new results store in
    ``directory``."""
    galaxy = _galaxy({"decoder": sae.W_dec, "activations": _galaxy_sample(source, sae, settings.galaxy_tokens)},
                     settings.seed)
    attrs = {"toolkit_version": __version__, "source": source_identity(settings.store, source.group),
             "sae": sae_id, "layer": settings.layer, "special_token_ids": source.special_ids.tolist(),
             "parameters": settings.recorded(),
             "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    group = create_sae_results_store(directory, d_sae=sae.d_sae, clusters=settings.clusters,
                                              galaxy_width=galaxy["galaxy_eigenvalues"].shape[1], attrs=attrs)
    group["n_blocks"][...] = n_blocks
    group["cooccurrence"][...] = counts
    occurring = np.diagonal(counts) > 0
    for i, metric in enumerate(AFFINITIES):
        t0 = time.monotonic()
        A = affinity(counts, n_blocks, metric)
        group["affinity"][i] = A
        group["affinity_spectrum"][i] = affinity_spectrum(A)
        for name, values in _lobe_statistics(A, occurring, sae, settings, metric).items():
            group[name][i] = values
        _log(f"sae cooccurrence: {metric}: affinity, spectrum and lobes ({time.monotonic() - t0:.1f} s)")
    for name, values in galaxy.items():
        group[name][...] = values
    consolidate(directory)


def check_inputs(settings: CooccurrenceSettings) -> tuple:
    """Everything refused before work starts: (source layer, SAE, SAE identity)."""
    if os.path.exists(settings.out):
        raise UserError(f"{settings.out} already exists; choose a new --out")
    if settings.block < 1 or settings.permutations < 2 or settings.galaxy_tokens < 2:
        raise UserError("--block must be at least 1, --permutations and --galaxy-tokens at least 2")
    if not settings.clusters or min(settings.clusters) < 2:
        raise UserError("--clusters must list cluster counts of at least 2, e.g. 2,4,8")
    require_consistent(settings.store, "activations")
    source = StoreLayer(settings.store, settings.layer)
    sae = load_sae(settings.sae, source.d_model)
    return source, sae, sae_identity(settings.sae, sae)


def run_cooccurrence(settings: CooccurrenceSettings, client, checked: tuple) -> None:
    """The whole job on the Dask ``client``; ``checked`` is what `check_inputs` returned."""
    source, sae, sae_id = checked
    t0 = time.monotonic()
    with Partial(settings.out, "repgeo sae cooccurrence") as partial:  # claimed first: a second start is refused now
        n_blocks, counts = count_cooccurrence(client, settings, source, sae_id)
        if n_blocks == 0:
            raise UserError(f"no prompt of {settings.store} has {settings.block} tokens: no complete block to count; "
                            f"pass a smaller --block")
        _log(f"sae cooccurrence: {n_blocks} blocks of {settings.block} tokens, {np.count_nonzero(counts)} "
             f"co-occurring pairs ({time.monotonic() - t0:.1f} s)")
        analyse_and_write(settings, source, sae, sae_id, n_blocks, counts, partial.path)
        partial.finish()
    _log(f"sae cooccurrence: complete: {settings.out} ({time.monotonic() - t0:.1f} s)")

