"""The real job scripts slurm/extract.sh, slurm/summarize.sh and slurm/pipeline.sh on the local Slurm cluster.

Jobs are submitted from the repository root as users submit them (``sbatch --export=ALL,REPGEO_...=...``), with
the real SmolLM2-135M on CPU and bin/slurm-local's node of 32 declared CPUs and four fake GPUs. Every store a job
writes is compared with what a plain single-process ``repgeo`` run writes. Job states come from
``scontrol show job`` (polled here: ``sbatch --wait`` polls slowly and returns 0 for a job that a failed dependency
cancelled). The module takes a few minutes on two cores, so jobs are shared: one prompt set and one reference
store serve every test, one job stopped by SIGUSR1 the requeue and per-task GPU tests, one pipeline (its extract
stopped by SIGTERM) the dependency, requeue, CPU-only and summarize tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr

REPO = Path(__file__).resolve().parents[1]
REPGEO = REPO / ".venv" / "bin" / "repgeo"
#: Seconds a job may take from submission to its end (a requeued one runs twice, 10-15 s apart).
JOB_TIMEOUT_S = 300
#: States after which a job does not run again (REQUEUED, PENDING and RUNNING are not among them).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
N_PROMPTS = 16
#: The options of every extraction here, the single-process reference's included.
EXTRACT_ARGS = ("--batch-size", "1")

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
]

SENTENCES = [
    "A river carries sand, silt and clay from the hills down to the sea.",
    "Rain loosens the soil on the slopes and small streams gather it after every storm.",
    "The baker wakes long before dawn to mix flour, water, salt and a little yeast.",
    "Bread that rises slowly in a cool room tastes better than bread that rises fast.",
    "Readers sit at long oak tables while the old clock ticks over the quiet library.",
    "The year 1789 appears in many history books about the revolution in France.",
    "Cold air sinks and warm air rises, so the wind at the coast turns at night.",
    "Heavy pebbles roll along the bottom of the channel while fine clay stays afloat.",
    "In spring the orchard fills with bees, and by autumn the branches bend with fruit.",
    "The ferry leaves the harbour at seven and reaches the island an hour later.",
    "Children learn to count with beads, then with pencils, and at last in their heads.",
    "A good map shows roads, rivers and the height of hills with thin brown lines.",
]


def prompt_texts(n: int) -> list:
    """``n`` distinct texts of about 100 SmolLM2 tokens: six consecutive sentences, each text starting one later."""
    return [" ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(6)) + f" This is text number {i}."
            for i in range(n)]


# ---------------------------------------------------------------------------------------------------- Slurm calls


def _plain_env(**repgeo) -> dict:
    """A fresh shell's environment plus ``repgeo``: no SLURM_* of an enclosing job, none of the job scripts'
    REPGEO* settings of the caller (bin/slurm-local's REPGEO_SLURM_* knobs stay)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "REPGEO")) or k.startswith("REPGEO_SLURM_")}
    env.update({k: str(v) for k, v in repgeo.items()})
    return env


def _run(args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=REPO, env=env or _plain_env(), capture_output=True, text=True,
                          timeout=timeout)


def sbatch(script: str, *options, **repgeo) -> str:
    """Submit ``script`` from the repository root with ``--export=ALL,REPGEO_...``; return the job id."""
    export = ",".join(["ALL", *(f"{k}={v}" for k, v in repgeo.items())])
    assert "," not in "".join(str(v) for v in repgeo.values()), "sbatch --export cannot carry commas in values"
    done = _run(["sbatch", "--parsable", f"--export={export}", *options, script])
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def job_fields(job_id: str) -> dict:
    shown = _run(["scontrol", "show", "job", "--oneliner", job_id])
    assert shown.returncode == 0, shown.stderr
    return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)


def wait_for(job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict:
    """Poll ``scontrol show job`` until the job is in a final state; return its fields."""
    deadline = time.monotonic() + timeout
    while True:
        fields = job_fields(job_id)
        if fields["JobState"] in FINAL_STATES:
            return fields
        if time.monotonic() > deadline:
            _run(["scancel", job_id])
            pytest.fail(f"job {job_id} still {fields['JobState']} after {timeout} s")
        time.sleep(0.5)


def n_done(store: Path) -> int:
    """Prompts marked done in an activation store, read from its ``done`` array (0 while it does not exist)."""
    try:
        return int(zarr.open_group(str(store), mode="r")["done"][:].sum())
    except Exception:  # not created yet, or a chunk being written right now: ask again later
        return 0


def devices(log: str) -> list:
    """Every ``extract: devices ...`` line of a job log, as lists of (rank, entry) pairs."""
    found = []
    for line in log.splitlines():
        if line.startswith("extract: devices "):
            entries = re.findall(r"(\d+):([^\s\[]+(?:\[[^\]]*\])?)", line[len("extract: devices "):])
            found.append([(int(rank), entry) for rank, entry in entries])
    return found


@dataclass
class Job:
    id: str
    fields: dict
    log: str
    store: Path


# ------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    """The local Slurm cluster (see ``slurm_cluster``: its absence fails these tests unless REPGEO_SKIP_SLURM=1)."""
    return slurm_cluster


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm-jobs")


@pytest.fixture(scope="module")
def prompts(work, write_jsonl) -> Path:
    rows = [{"text": text, "half": "first" if i < N_PROMPTS // 2 else "second"}
            for i, text in enumerate(prompt_texts(N_PROMPTS))]
    return write_jsonl(work / "prompts.jsonl", rows)


@pytest.fixture(scope="module")
def reference_store(work, prompts, smollm2_hf, run_repgeo) -> Path:
    """The store of one plain ``repgeo extract`` process (no MPI, no Slurm)."""
    out = work / "reference.zarr"
    code, _, err = run_repgeo("extract", "--model", smollm2_hf, "--prompts", prompts, "--out", out, *EXTRACT_ARGS)
    assert code == 0, err
    return out


def _extract_job(work, name, smollm2_hf, prompts, *options, **repgeo) -> tuple:
    """Submit slurm/extract.sh writing ``work/NAME.zarr``; return (job id, store, log path)."""
    store, log = work / f"{name}.zarr", work / f"{name}.out"
    job_id = sbatch("slurm/extract.sh", f"--output={log}", *options, REPGEO_MODEL=smollm2_hf,
                    REPGEO_PROMPTS=prompts, REPGEO_STORE=store, REPGEO_EXTRACT_ARGS=" ".join(EXTRACT_ARGS), **repgeo)
    return job_id, store, log


@pytest.fixture(scope="module")
def four_gpu_job(cluster, work, smollm2_hf, prompts) -> Job:
    """slurm/extract.sh as it is: 4 tasks, 4 (fake) GPUs, plain srun."""
    job_id, store, log = _extract_job(work, "four-gpus", smollm2_hf, prompts)
    fields = wait_for(job_id)
    return Job(job_id, fields, log.read_text(), store)


def stop_mid_run(job_id: str, store: Path, sig: str, log: Path) -> int:
    """Once a prompt is done, send ``sig`` to the job's steps; wait until the job has requeued itself and return
    the prompts done by then."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while n_done(store) == 0:  # the ranks are in their loop
        assert job_fields(job_id)["JobState"] in ("PENDING", "RUNNING"), log.read_text()
        assert time.monotonic() < deadline, f"no prompt done within {JOB_TIMEOUT_S} s:\n{log.read_text()}"
        time.sleep(0.1)
    # Steps only (no --batch/--full), as --signal=USR1@300 and preemption signal: the batch script stays to requeue.
    signalled = _run(["scancel", f"--signal={sig}", job_id])
    assert signalled.returncode == 0, signalled.stderr
    while job_fields(job_id)["Restarts"] == "0":
        assert job_fields(job_id)["JobState"] not in FINAL_STATES, log.read_text()
        assert time.monotonic() < deadline, f"not requeued within {JOB_TIMEOUT_S} s:\n{log.read_text()}"
        time.sleep(0.2)
    return n_done(store)


@pytest.fixture(scope="module")
def interrupted_job(cluster, work, smollm2_hf, prompts) -> Job:
    """slurm/extract.sh with one GPU per task, stopped by SIGUSR1 (Slurm's time-limit warning) while running; it
    requeues itself and completes. ``fields["done_at_stop"]``: the prompts done when it was requeued."""
    job_id, store, log = _extract_job(work, "interrupted", smollm2_hf, prompts,
                                      REPGEO_SRUN_ARGS="--gpus-per-task=1")
    done_at_stop = stop_mid_run(job_id, store, "USR1", log)
    fields = wait_for(job_id)
    fields["done_at_stop"] = done_at_stop
    return Job(job_id, fields, log.read_text(), store)


def requeue_lines(log: str) -> tuple:
    """From a job log: the restart count of every run, the signals rank 0 reports stops by, the exit codes requeued."""
    return ([int(r) for r in re.findall(r"^\[extract\.sh\] job \d+ restart (\d+)", log, flags=re.M)],
            re.findall(r"^extract: stopped by (SIG\w+)", log, flags=re.M),
            re.findall(r"^\[extract\.sh\] stopped before the end \(exit (\d+)\); requeueing", log, flags=re.M))


# ---------------------------------------------------------------------------------------------------------- tests


def test_extract_job_on_four_gpus_writes_the_single_process_store(four_gpu_job, reference_store, same_store):
    job = four_gpu_job
    assert (job.fields["JobState"], job.fields["ExitCode"], job.fields["Restarts"]) == ("COMPLETED", "0:0", "0"), \
        job.log
    assert job.fields["NumTasks"] == "4", job.fields
    assert zarr.open_group(str(job.store), mode="r")["done"][:].all()
    same_store(job.store, reference_store)
    assert "extract: complete:" in job.log
    # Plain srun: every task sees the node's four GPUs, node-local rank i takes GPU i (CUDA absent: the CPU).
    assert devices(job.log) == [[(i, f"cpu[gpu {i} of 0,1,2,3, no CUDA]") for i in range(4)]], job.log


def test_gpus_per_task_gives_every_rank_only_its_own_gpu(interrupted_job):
    runs = devices(interrupted_job.log)
    assert len(runs) == 2, interrupted_job.log  # the first run and the one after the requeue
    for run in runs:
        assert run == [(i, f"cpu[gpu {i} of {i}, no CUDA]") for i in range(4)], interrupted_job.log


def test_job_stopped_by_usr1_requeues_itself_and_resumes_to_the_uninterrupted_store(interrupted_job,
                                                                                   reference_store, same_store):
    job = interrupted_job
    assert (job.fields["JobState"], job.fields["ExitCode"], job.fields["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        job.log
    assert 0 < job.fields["done_at_stop"] < N_PROMPTS, job.fields["done_at_stop"]  # stopped mid-way
    assert requeue_lines(job.log) == ([0, 1], ["SIGUSR1"], ["138"]), job.log
    # Nothing but the stop: no rank killed, no traceback.
    assert "Traceback" not in job.log and "Terminated" not in job.log and "Killed" not in job.log, job.log
    assert "extract: complete:" in job.log
    same_store(job.store, reference_store)
    runs = zarr.open_group(str(job.store), mode="r").attrs["runs"]
    assert [run["resumed"] for run in runs] == [False, True]


def test_wrong_mpi_plugin_fails_fast_without_writing(cluster, work, smollm2_hf, prompts):
    # With --mpi=none the MPICH wheel starts every task as its own rank 0 of 1.
    job_id, store, log = _extract_job(work, "mpi-none", smollm2_hf, prompts, REPGEO_MPI="none")
    fields = wait_for(job_id, timeout=120)
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("FAILED", "2:0", "0"), text
    assert "srun started 4 tasks but MPI sees a world of 1" in text
    assert "use srun --mpi=pmi2 for MPICH" in text
    assert not store.exists() and not Path(f"{store}.partial").exists()


def test_failure_ending_in_sigterm_is_not_requeued(cluster, work):
    # A stand-in for repgeo: rank 0 fails, and srun --kill-on-bad-exit terminates the other ranks (SIGTERM), so
    # srun exits 143 as after a clean stop by SIGTERM. Requeued, such a job would fail again and again.
    failing = work / "failing-repgeo"
    failing.write_text('#!/bin/sh\nif [ "$SLURM_PROCID" = 0 ]; then echo "rank 0 fails" >&2; exit 2; fi\nexec sleep 60\n')
    failing.chmod(0o755)
    log = work / "failing.out"
    job_id = sbatch("slurm/extract.sh", f"--output={log}", REPGEO=failing, REPGEO_MODEL="unused",
                    REPGEO_PROMPTS="unused", REPGEO_STORE=work / "failing.zarr")
    fields = wait_for(job_id, timeout=60)
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("FAILED", "143:0", "0"), text
    assert "rank 0 fails" in text and "Terminated" in text and "requeueing" not in text, text


def _pipeline(work, name, smollm2_hf, prompts_path) -> tuple:
    """Run slurm/pipeline.sh (extract on 2 CPU-only tasks); return (extract id, summarize id, store, results)."""
    store, results = work / f"{name}.zarr", work / f"{name}-results.zarr"
    env = _plain_env(REPGEO_MODEL=smollm2_hf, REPGEO_PROMPTS=prompts_path, REPGEO_STORE=store,
                     REPGEO_RESULTS=results, REPGEO_EXTRACT_ARGS=" ".join(EXTRACT_ARGS),
                     REPGEO_EXTRACT_SBATCH="--gpus-per-node=0 --ntasks-per-node=2")
    submitted = _run(["slurm/pipeline.sh", f"--output={work}/{name}-%x.out"], env=env)
    assert submitted.returncode == 0, submitted.stderr
    lines = submitted.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("extract ") and lines[1].startswith("summarize "), lines
    return lines[0].split()[1], lines[1].split()[1], store, results


@dataclass
class Pipeline:
    extract: Job
    summarize: Job  # its store: the results store


@pytest.fixture(scope="module")
def pipeline(cluster, work, smollm2_hf, prompts) -> Pipeline:
    """slurm/pipeline.sh with extract on a CPU-only node (2 tasks, no GPU), summarize as the script has it."""
    extract_id, summarize_id, store, results = _pipeline(work, "pipeline", smollm2_hf, prompts)
    # Held back until extract has succeeded.
    assert job_fields(summarize_id)["Dependency"] == f"afterok:{extract_id}(unfulfilled)"
    extract_log = work / "pipeline-repgeo-extract.out"
    done_at_stop = stop_mid_run(extract_id, store, "TERM", extract_log)  # as preemption stops steps
    assert job_fields(summarize_id)["JobState"] == "PENDING"  # extract requeued, not failed
    extract, summarize = wait_for(extract_id), wait_for(summarize_id)
    extract["done_at_stop"] = done_at_stop
    return Pipeline(Job(extract_id, extract, extract_log.read_text(), store),
                    Job(summarize_id, summarize, (work / "pipeline-repgeo-summarize.out").read_text(), results))


def test_pipeline_runs_summarize_after_extract_even_if_extract_requeues(pipeline):
    extract, summarize = pipeline.extract, pipeline.summarize
    assert (extract.fields["JobState"], extract.fields["ExitCode"], extract.fields["Restarts"]) == \
        ("COMPLETED", "0:0", "1"), extract.log
    # Stopped mid-way by SIGTERM, requeued by the script (exit 143 and rank 0's report of a clean stop).
    assert 0 < extract.fields["done_at_stop"] < N_PROMPTS, extract.fields["done_at_stop"]
    assert requeue_lines(extract.log) == ([0, 1], ["SIGTERM"], ["143"]), extract.log
    assert "Traceback" not in extract.log and "Terminated" not in extract.log, extract.log
    # Summarize waited for the run that completed the store, not the first one.
    assert (summarize.fields["JobState"], summarize.fields["ExitCode"]) == ("COMPLETED", "0:0"), \
        summarize.log[-5000:]
    assert summarize.fields["StartTime"] >= extract.fields["EndTime"], (extract.fields, summarize.fields)
    valid = _run([REPGEO, "validate", summarize.store])
    assert valid.returncode == 0 and valid.stdout.strip() == f"{summarize.store}: valid", valid.stdout + valid.stderr
    done = zarr.open_group(str(summarize.store), mode="r")["done"][:]
    assert done.shape == (N_PROMPTS,) and done.all()


def test_extract_job_on_a_node_without_gpus(pipeline, reference_store, same_store):
    # pipeline.sh ran `sbatch --gpus-per-node=0 --ntasks-per-node=2 slurm/extract.sh` (REPGEO_EXTRACT_SBATCH).
    extract = pipeline.extract
    assert (extract.fields["JobState"], extract.fields["NumTasks"]) == ("COMPLETED", "2"), extract.log
    assert devices(extract.log) == [[(0, "cpu"), (1, "cpu")]] * 2, extract.log  # before and after its requeue
    same_store(extract.store, reference_store)


def test_failed_extract_cancels_summarize(cluster, work, smollm2_hf):
    extract_id, summarize_id, store, results = _pipeline(work, "broken", smollm2_hf, work / "missing.jsonl")
    extract, summarize = wait_for(extract_id, timeout=120), wait_for(summarize_id, timeout=60)
    extract_log = (work / "broken-repgeo-extract.out").read_text()
    assert (extract["JobState"], extract["ExitCode"], extract["Restarts"]) == ("FAILED", "2:0", "0"), extract_log
    assert "missing.jsonl" in extract_log
    # --kill-on-invalid-dep=yes: cancelled, never started.
    assert (summarize["JobState"], summarize["Reason"]) == ("CANCELLED", "DependencyNeverSatisfied"), summarize
    assert summarize["StartTime"] in ("None", "Unknown") or summarize["RunTime"] == "00:00:00", summarize
    assert not (work / "broken-repgeo-summarize.out").exists()
    assert not store.exists() and not results.exists()
    # The job-completion log agrees.
    sacct = _run(["sacct", "-c", "-j", f"{extract_id},{summarize_id}", "-n", "-P", "-o", "JobID,State"])
    assert sacct.returncode == 0, sacct.stderr
    states = dict(line.split("|") for line in sacct.stdout.splitlines())
    assert states[extract_id] == "FAILED" and states[summarize_id].startswith("CANCELLED"), sacct.stdout


def test_summarize_job_matches_the_local_scheduler(pipeline, work, run_repgeo):
    """summarize.sh (4 tasks, Dask on the MPI ranks) writes what `repgeo summarize --scheduler local` writes."""
    from toolkit.store.results import open_results

    job = pipeline.summarize
    assert (job.fields["JobState"], job.fields["NumTasks"]) == ("COMPLETED", "4"), job.log[-5000:]
    # Dask ran on the job's four ranks.
    assert f"summarize: {N_PROMPTS} prompts to do, 0 done before, 4 workers" in job.log, job.log[-5000:]
    local = work / "summarize-local.zarr"
    code, _, err = run_repgeo("summarize", "--store", pipeline.extract.store, "--out", local, "--scheduler",
                              "local", "--workers", 2)
    assert code == 0, err
    results = job.store
    on_slurm, here = open_results(str(results)).load(), open_results(str(local)).load()
    assert sorted(on_slurm.data_vars) == sorted(here.data_vars) and len(on_slurm.data_vars) > 5
    assert on_slurm.attrs["parameters"] == here.attrs["parameters"]
    for name in on_slurm.variables:
        a, b = on_slurm[name].values, here[name].values
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert on_slurm["done"].values.all()
    assert np.isfinite(on_slurm["norm_mean"].values).all()


def test_reproduce_script_extracts_on_ranks_then_its_analysis_job_writes_the_report(cluster, work):
    """sbatch slurm/reproduce.sh: the extraction job (2 CPU-only ranks here) submits the analysis job with
    afterok on itself; that one runs Dask on its ranks and writes findings.json and report.md."""
    out = work / "reproduce-token-geometry"
    job_id = sbatch("slurm/reproduce.sh", f"--output={work}/reproduce-%j.out", "--gpus-per-node=0",
                    "--ntasks-per-node=2", REPGEO_STUDY="token-geometry", REPGEO_OUT=out, REPGEO_SCALE="tiny",
                    REPGEO_ANALYZE_SBATCH=f"--ntasks-per-node=2 --output={work}/analyze-%j.out")
    extract = wait_for(job_id, timeout=600)
    log = (work / f"reproduce-{job_id}.out").read_text()
    assert (extract["JobState"], extract["ExitCode"]) == ("COMPLETED", "0:0"), log[-5000:]
    analyze_id = re.search(r"^analyze (\d+)$", log, re.M).group(1)
    analyze = wait_for(analyze_id, timeout=600)
    analyze_log = (work / f"analyze-{analyze_id}.out").read_text()
    assert (analyze["JobState"], analyze["ExitCode"], analyze["NumTasks"]) == ("COMPLETED", "0:0", "2"), \
        analyze_log[-5000:]
    assert analyze["StartTime"] >= extract["EndTime"]
    assert "1 rank(s)" not in log and "2 rank(s)" in log, log[-3000:]  # the extraction ran on both ranks
    assert "2 workers" in analyze_log and "extract:" not in analyze_log, analyze_log[-3000:]  # the model never loaded
    findings = (out / "findings.json").read_text()
    assert '"study": "token-geometry"' in findings and (out / "report.md").is_file()
