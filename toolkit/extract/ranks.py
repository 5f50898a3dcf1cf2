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
    if expected and int(expected) != size:
        raise UserError(f"srun started {expected} tasks but MPI sees a world of {size}: the MPI plug-in does not "
                        f"match the MPI library; use srun --mpi=pmi2 for MPICH (the default install) or "
                        f"--mpi=pmix for Open MPI")


def cpu_threads(local_size: int, environ=os.environ) -> int:
    """CPU threads per rank: Slurm's --cpus-per-task when given, else this node's usable cores shared evenly."""
    if environ.get("SLURM_CPUS_PER_TASK"):
        return max(1, int(environ["SLURM_CPUS_PER_TASK"]))
    return max(1, len(os.sched_getaffinity(0)) // max(1, local_size))


def select_device(local_rank: int, requested: str = "auto") -> str:
    """The torch device of this rank: node-local rank → GPU among those visible.

    When Slurm gives each task its own GPU, ``CUDA_VISIBLE_DEVICES`` shows one device and every rank uses
    ``cuda:0``; when all of the node's GPUs are visible, rank i uses ``cuda:(i mod count)``.
    """
    import torch

    if requested == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise UserError("--device cuda was asked for but no CUDA device is visible; use --device auto or cpu")
        return "cpu"
    return f"cuda:{local_rank % torch.cuda.device_count()}"
