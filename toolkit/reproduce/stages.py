"""A study's stages: the repgeo commands it runs, in order, and whether each one's output is already complete."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import UserError

#: Stages of the extraction phase run on every MPI rank (GPU partition); the others on the analysis cluster.
EXTRACT, ANALYZE = "extract", "analyze"


@dataclass(frozen=True)
class Stage:
    """One repgeo command of a study.

    name: what the report and the log call it; out: the store or directory it creates; argv: the command line
    (without --resume, --scheduler, --workers); phase: EXTRACT or ANALYZE; cluster: it takes --scheduler
    (a Dask job); resume: it takes --resume.
    """

    name: str
    out: str
    argv: tuple
    phase: str = ANALYZE
    cluster: bool = False
    resume: bool = True


def is_complete(path: str) -> bool:
    """Whether the stage output at ``path`` is complete: a store whose every prompt (and group) is done, or an SAE
    directory (``repgeo sae train`` moves it into place only when it is whole). Reads metadata only: no model, no
    cluster."""
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, "cfg.json")):
        return True
    from ..store.validate import open_store, require_consistent

    try:
        _, kind = open_store(path)
        group = require_consistent(path, kind)
    except UserError:
        return False  # the stage's own --resume says what is wrong with it
    if "done" in group and not bool(group["done"][:].all()):
        return False
    parameters = group.attrs.get("parameters", {})
    return not (isinstance(parameters, dict) and parameters.get("groupby")) or bool(group.attrs.get("groups_done"))


def run_stage(stage: Stage, scheduler: str | None = None, workers: int | None = None) -> None:
    """Run one stage in this process (the repgeo command itself); :class:`UserError` when it fails.

    The command prints its own error first; this adds which stage failed and that a rerun continues from there.
    """
    from ..cli import main

    argv = list(stage.argv) + (["--resume"] if stage.resume else [])
    if stage.cluster and scheduler is not None:
        argv += ["--scheduler", scheduler] + (["--workers", str(workers)] if workers and scheduler == "local" else [])
    rc = main(argv)
    if rc != 0:
        error = UserError(f"stage {stage.name} failed (repgeo {' '.join(stage.argv[:2])} exit {rc}, its error is "
                          f"above); fix that and rerun the same repgeo reproduce command: finished stages are kept")
        error.exit_code = rc
        raise error
