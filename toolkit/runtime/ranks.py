"""MPI ranks, their node-local position, the device each one uses, and the CPU threads it may take."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import UserError


@dataclass
class Ranks:
    comm: object  # mpi4py communicator (COMM_WORLD)
    rank: int
    size: int
    local_rank: int  # position among the ranks on this node
    local_size: int

    @property
    def is_root(self) -> bool:
        return self.rank == 0


def mpi_ranks() -> Ranks:
    """The MPI world: works as a singleton (plain ``python``), under ``mpiexec`` and under ``srun --mpi=...``."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    check_world_size(world.Get_size())
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    return Ranks(world, world.Get_rank(), world.Get_size(), node.Get_rank(), node.Get_size())


def check_world_size(size: int, environ=os.environ):
    """Refuse to run when srun started N tasks but MPI sees another world size.

    A job step launched with an MPI plug-in that does not match the MPI library starts N independent copies of
    rank 0 that would all do the same work; catch it before any of them writes.
    """
    expected = environ.get("SLURM_STEP_NUM_TASKS") if environ.get("SLURM_STEP_ID") is not None else None
    # Only the symptom itself: mpiexec inside an allocation starts its proxies with srun, one per node, so a
    # correct world may well differ from the step's task count; a wrong plug-in gives worlds of one.
    if expected and size == 1 and int(expected) > 1:
        raise UserError(f"srun started {expected} tasks but MPI sees a world of {size}: the MPI plug-in does not "
                        f"match the MPI library; use srun --mpi=pmi2 for MPICH (the default install) or "
                        f"--mpi=pmix for Open MPI")


def cpu_threads(local_size: int, environ=os.environ) -> int:
    """CPU threads per rank: its own cores when bound to some (Slurm CPU binding), else the node's cores shared
    evenly by the node's ranks; never more than --cpus-per-task.
    """
    usable = len(os.sched_getaffinity(0))
    bound = usable < (os.cpu_count() or usable)
    threads = usable if bound else usable // max(1, local_size)
    if environ.get("SLURM_CPUS_PER_TASK"):
        threads = min(threads, int(environ["SLURM_CPUS_PER_TASK"]))
    return max(1, threads)


def visible_gpus(environ=os.environ) -> list:
    """The GPU ids this process may use, as Slurm or the user set ``CUDA_VISIBLE_DEVICES`` (None: not set)."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [v for v in value.split(",") if v.strip() and v.strip() != "-1"]


def gpu_slot(local_rank: int, n_visible: int) -> int:
    """Index among the visible GPUs for a node-local rank.

    When Slurm gives each task its own GPU one device is visible and every rank uses index 0; when all the
    node's GPUs are visible, rank i uses index i mod count.
    """
    return local_rank % n_visible


def select_device(local_rank: int, requested: str = "auto") -> str:
    """The torch device of this rank: node-local rank → GPU among those visible, or the CPU."""
    import torch

    if requested == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise UserError("--device cuda was asked for but no CUDA device is visible; use --device auto or cpu")
        return "cpu"
    return f"cuda:{gpu_slot(local_rank, torch.cuda.device_count())}"


def binding(ranks, device: str, environ=os.environ) -> str:
    """One line, gathered on rank 0, saying which device every rank uses and which GPU ids it was given."""
    visible = visible_gpus(environ)
    if visible:
        gpu = visible[gpu_slot(ranks.local_rank, len(visible))]
        usable = "" if device.startswith("cuda") else ", no CUDA"
        mine = f"{ranks.rank}:{device}[gpu {gpu} of {','.join(visible)}{usable}]"
    else:
        mine = f"{ranks.rank}:{device}"
    entries = ranks.comm.gather(mine, root=0)
    return "extract: devices " + " ".join(entries) if ranks.is_root else ""
