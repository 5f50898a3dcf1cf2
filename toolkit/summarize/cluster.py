"""Where the Dask workers come from: a local cluster, the MPI ranks of this job (dask-mpi), or an address."""

from __future__ import annotations

import contextlib
import logging
import os

from ..errors import UserError


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
    except OSError as e:
        raise UserError(f"cannot reach a Dask scheduler at {address} ({e}); start one or use --scheduler local") from None
    with client:
        yield client


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
