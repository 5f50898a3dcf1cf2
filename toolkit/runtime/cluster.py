"""Where the Dask workers come from (a local cluster, the MPI ranks of this job, or an address), and how tasks
run on them."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import time

from ..errors import UserError

# glibc mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit systems.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20


@functools.cache
def _glibc_malloc():
    """The C library loaded in this process if it is glibc (it has mallopt and malloc_trim), else None."""
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def task_settings():
    """Run a task on a Dask worker process: one BLAS thread, and an allocator that reuses freed memory in it.

    Workers are processes with one thread each: BLAS must not start more on a shared node. Dask's nanny starts
    workers with MALLOC_TRIM_THRESHOLD_=65536, which also pins glibc's mmap threshold at 128 KiB: every
    (token, token) matrix is then mapped afresh and unmapped when freed, and the page faults cost about half
    as much again as the arithmetic (~2 s of system time per 1024-token prompt). So the worker process (the
    setting is process-wide and stays) takes arrays up to 32 MiB from its heap, keeps freed memory while a
    task runs, and hands it back to the system after each task (malloc_trim).
    """
    from threadpoolctl import threadpool_limits

    libc = _glibc_malloc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    try:
        with threadpool_limits(1):
            yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)


@contextlib.contextmanager
def local_client(n_workers: int | None = None):
    """A local cluster of one-thread worker processes, one per usable core."""
    from distributed import Client, LocalCluster

    n_workers = n_workers or len(os.sched_getaffinity(0))
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        yield client


@contextlib.contextmanager
def address_client(address: str):
    from distributed import Client

    try:
        client = Client(address, timeout="20s")
    except (OSError, ValueError, TypeError) as e:  # unreachable, timed out, or not an address distributed parses
        raise UserError(f"cannot reach a Dask scheduler at {address} ({type(e).__name__}: {e}); start one or use "
                        f"--scheduler local") from None
    with client:
        yield client


def start_mpi(scheduler: str):
    """The MPI ranks when ``scheduler`` is "mpi" (else None). Called before any input check, so that an error every
    rank finds alike is printed once, by rank 0."""
    if scheduler != "mpi":
        return None
    from .ranks import mpi_ranks

    return mpi_ranks()


def run_with_client(scheduler: str, workers: int | None, client_function, ranks=None):
    """Run ``client_function(client)`` on the chosen Dask cluster and return its result.

    scheduler: "local" (a cluster of ``workers`` one-thread processes on this node), "mpi" (the ranks from
    `start_mpi`, under mpiexec or srun: every rank returns the result) or the address of a running scheduler.
    """
    if scheduler == "mpi":
        return run_on_mpi(client_function, ranks)
    context = local_client(workers) if scheduler == "local" else address_client(scheduler)
    with context as client:
        return client_function(client)


def run_on_mpi(client_function, ranks) -> object:
    """Run ``client_function(client)`` with Dask on this job's MPI ranks; return its result on every rank.

    Rank 0 hosts the scheduler, the client and a worker; every other rank is a worker (dask-mpi ``execute``
    with shared ranks), so no rank idles. On one node the cluster binds to the loopback interface. An error
    in the client function is carried to rank 0's return, never left to hang the workers.
    """
    from dask_mpi import execute
    from distributed import Client

    outcome = {}

    def client_side():
        try:
            with Client() as client:
                # every rank's worker joins before work is planned (tasks are sized to the workers, and the SAE
                # counts are collected from each of them)
                client.wait_for_workers(ranks.size, timeout=300)
                outcome["result"] = client_function(client)
        except BaseException as e:  # reported by the caller on rank 0
            outcome["error"] = e

    interface = os.environ.get("REPGEO_DASK_INTERFACE") or ("lo" if ranks.local_size == ranks.size else None)
    logging.getLogger("distributed").setLevel(logging.ERROR)  # as the local cluster: no per-worker INFO lines
    # scheduler_port=0: a free port (dask-mpi broadcasts the address), so that two jobs on one node never collide
    # on the default 8786 (the second one's scheduler would fail and leave its workers waiting forever).
    execute(client_side, client_rank=0, scheduler_rank=0, scheduler_port=0, exclusive_workers=False,
            interface=interface, nthreads=1, dashboard=False, dashboard_address=":0",
            local_directory=os.environ.get("TMPDIR", "/tmp"))
    result = ranks.comm.bcast(outcome, root=0)
    if "error" in result:
        raise result["error"]
    return result.get("result")


def completed(futures: list, sizes: list, report, what: str, unit: str):
    """Yield ``(index, result)`` of each future as it finishes, one at a time, and report progress.

    The future is released once the caller has taken its result (when the generator resumes), so neither the
    workers nor the client keep finished results: memory stays at one result whatever their number. The
    caller must keep no other reference to ``futures`` (pass ``client.map(...)`` directly). ``sizes``: the work of
    each future in ``unit``s; ``report(line)`` gets one line every 5 s and at the end (done/total, rate, ETA).
    """
    from distributed import as_completed

    where = {future.key: (i, size) for i, (future, size) in enumerate(zip(futures, sizes))}
    total, done = sum(sizes), 0
    arriving = as_completed(futures)
    futures.clear()
    t0 = last = time.monotonic()
    for future in arriving:
        i, size = where.pop(future.key)
        yield i, future.result()
        future.release()
        done += size
        now = time.monotonic()
        if now - last >= 5 or not where:
            last = now
            rate = done / max(now - t0, 1e-9)
            eta = time.strftime("%H:%M:%S", time.gmtime((total - done) / rate)) if rate > 0 else "?"
            report(f"{what}: {done}/{total} {unit}, {rate:.2f} {unit}/s, ETA {eta}")
