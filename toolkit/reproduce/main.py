"""Entry of ``repgeo reproduce``: check the run directory, write the prompt files, run the stages that are not
complete (extraction on every MPI rank, the rest on one Dask cluster), then the findings, figures and report."""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

from ..errors import UserError
from .report import findings_document, write_if_changed, write_report
from .stages import ANALYZE, EXTRACT, is_complete, run_stage

#: Study name → module of ``toolkit.reproduce.studies``.
STUDIES = {"token-geometry": "token_geometry", "languages": "languages", "concepts": "concepts",
           "models": "model_comparison"}
SCALES = ("tiny", "small", "full")


def _log(line: str):
    print(f"[reproduce] {line}", file=sys.stderr, flush=True)


def study_module(name: str):
    return importlib.import_module(f".studies.{STUDIES[name]}", __package__)


def _claim_directory(out: str, study: str, settings: dict):
    """Create ``out`` or check that it holds a run of the same study with the same settings (reproduce.json)."""
    record = os.path.join(out, "reproduce.json")
    wanted = {"study": study, "settings": settings}
    if os.path.isfile(record):
        with open(record, encoding="utf-8") as f:
            held = json.load(f)
        if held != json.loads(json.dumps(wanted)):
            changed = sorted(k for k in set(held.get("settings", {})) | set(settings)
                             if held.get("settings", {}).get(k) != settings.get(k))
            what = held.get("study") if held.get("study") != study else ", ".join(changed)
            raise UserError(f"{out} holds a reproduce run with other settings ({what}); rerun it with its own "
                            f"settings (see {record}) or give another --out")
        return
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--out {out} exists and is not a repgeo reproduce directory; give a new directory")
    try:
        os.makedirs(out, exist_ok=True)
        write_if_changed(record, json.dumps(wanted, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"cannot create --out {out} ({e.strerror}); give a writable directory") from None


class _Timings:
    """Seconds each stage took when it ran (timings.json), so that the report can say what a run cost."""

    def __init__(self, out: str):
        self.path = os.path.join(out, "timings.json")
        self.seconds = json.load(open(self.path)) if os.path.isfile(self.path) else {}

    def record(self, name: str, seconds: float):
        self.seconds[name] = round(seconds, 1)
        write_if_changed(self.path, json.dumps(self.seconds, indent=2) + "\n")


def _run(stages: list, timings, ranks=None, scheduler=None, workers=None) -> list:
    """Run every stage that is not complete, in order; every rank takes part (the root decides what is
    complete). Returns the names of the stages that ran."""
    ran, root = [], ranks is None or ranks.is_root
    for i, stage in enumerate(stages, 1):
        complete = is_complete(stage.out)
        if ranks is not None:
            complete = ranks.comm.bcast(complete, root=0)
        if complete:
            if root:
                _log(f"{stage.name}: complete, skipped")
            continue
        if root:
            _log(f"{stage.name} ({i}/{len(stages)}): repgeo {' '.join(stage.argv)}")
        t0 = time.monotonic()
        run_stage(stage, scheduler, workers)
        if ranks is not None:
            ranks.comm.Barrier()
        if root:
            timings.record(stage.name, time.monotonic() - t0)
        ran.append(stage.name)
    return ran


def _analysis(stages: list, timings, scheduler: str, workers, ranks) -> list:
    """Run the analysis stages on one Dask cluster (started only if a stage needs it); return those that ran."""
    from ..runtime.cluster import local_client, run_on_mpi

    if not any(not is_complete(s.out) for s in stages):
        return _run(stages, timings) if ranks is None or ranks.is_root else []
    if scheduler == "mpi":  # rank 0 runs the stages against the cluster of every rank's worker
        return run_on_mpi(lambda client: _run(stages, timings, scheduler=client.scheduler.address), ranks) or []
    if scheduler == "local" and any(s.cluster for s in stages):
        with local_client(workers) as client:
            return _run(stages, timings, scheduler=client.scheduler.address)
    return _run(stages, timings, scheduler=scheduler, workers=workers)


def run_reproduce(args) -> int:
    study = study_module(args.study)
    out = args.out or f"reproduce-{args.study}"
    settings = study.settings(args)
    ranks = None
    if args.scheduler == "mpi" or args.phase == EXTRACT:
        from ..runtime.ranks import mpi_ranks

        ranks = mpi_ranks()
    root = ranks is None or ranks.is_root
    problem = None
    if root:
        try:
            _claim_directory(out, args.study, settings)
            study.prepare(out, settings)
        except UserError as e:
            problem = e
    if ranks is not None:
        problem = ranks.comm.bcast(problem, root=0)
    if problem is not None:
        raise problem
    stages, timings = study.stages(out, settings), _Timings(out)
    ran = []
    if args.phase in ("all", EXTRACT):
        ran += _run([s for s in stages if s.phase == EXTRACT], timings, ranks)
    if args.phase == EXTRACT:
        return 0
    missing = [s.name for s in stages if s.phase == EXTRACT and not is_complete(s.out)]
    if missing:
        raise UserError(f"{out}: the extraction stage(s) {', '.join(missing)} are not complete; run repgeo reproduce "
                        f"{args.study} --phase extract (or --phase all) first")
    ran += _analysis([s for s in stages if s.phase == ANALYZE], timings, args.scheduler, args.workers, ranks)
    if root:
        import dask

        # the stores are read here, in this process: not through a Dask cluster that dask-mpi left as the default
        with dask.config.set(scheduler="synchronous"):
            _conclude(out, args.study, study, settings, timings, bool(ran))
    return 0


def _conclude(out: str, name: str, study, settings: dict, timings, anything_ran: bool):
    """Findings, figures and report; left as they are when no stage ran and they exist (a rerun rewrites nothing)."""
    findings_path = os.path.join(out, "findings.json")
    if not anything_ran and os.path.isfile(findings_path) and os.path.isfile(os.path.join(out, "report.md")):
        with open(findings_path, encoding="utf-8") as f:
            figures = json.load(f).get("figures", [])
        if all(os.path.isfile(os.path.join(out, p)) for p in figures):
            _log(f"{out}: every stage, findings.json and report.md complete; nothing to do")
            return
    findings = study.findings(out, settings)
    figures = study.figures(out, settings, os.path.join(out, "figures"))
    document = findings_document(name, settings, findings, figures, out)
    write_report(out, document, study.TITLE, study.DESCRIPTION, timings.seconds)
    for f in findings:
        _log(f"{f.verdict:>15}: {f.claim}" + (f" (depends on {', '.join(f.depends_on)})" if f.depends_on else ""))
    _log(f"report: {os.path.join(out, 'report.md')}")
