"""A job owns only what it created: its partial directory (mkdir + marker), reclaimed only from a dead run of the
same job; anything else at that path is refused (exit 2) and left untouched; of concurrent starts exactly one wins.

Before the fix every job deleted whatever sat at ``OUT.partial`` (``--out mydata`` deleted
``mydata.partial/important.txt``; ``--out ""`` deleted ``./.partial``).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from toolkit.errors import UserError
from toolkit.runtime.partial import MARKER, Partial


def marker_of(path, **fields) -> dict:
    """A marker as a run of ``repgeo summarize`` on this host would write it, with ``fields`` changed."""
    marker = {"job": "repgeo summarize", "out": os.path.abspath(str(path).removesuffix(".partial")),
              "host": socket.gethostname(), "pid": os.getpid(), "process_start": None, "slurm_job_id": None,
              "started": "2026-01-01T00:00:00+00:00"}
    return dict(marker, **fields)


def make_partial(path, marker: dict | None, extra: str = "keep me"):
    os.makedirs(path)
    (path / "important.txt").write_text(extra)
    if marker is not None:
        (path / MARKER).write_text(json.dumps(marker))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # ended and reaped: no such process (pids are not reused within a test)


@pytest.fixture
def small_store(many_prompts):
    return many_prompts.store_1rank


@pytest.mark.parametrize("case", ["no marker", "another job", "live owner", "another host"])
def test_a_partial_directory_that_is_not_ours_to_reclaim_is_refused_and_kept(case, tmp_path, small_store,
                                                                             run_repgeo, the_error_line,
                                                                             tree_snapshot):
    out = tmp_path / "mydata"
    partial = tmp_path / "mydata.partial"
    marker = {"no marker": None, "another job": marker_of(out, job="repgeo sae cooccurrence"),
              "live owner": marker_of(out, pid=os.getpid()),  # this test process: alive
              "another host": marker_of(out, host="elsewhere", pid=dead_pid())}[case]
    make_partial(partial, marker)
    before = tree_snapshot(tmp_path)
    code, _, err = run_repgeo("summarize", "--store", small_store, "--out", out, "--observables", "norm")
    line = the_error_line(err)
    assert code == 2 and str(partial) in line and ("untouched" in line or "running" in line), line
    assert tree_snapshot(tmp_path) == before


def test_a_partial_of_the_same_job_whose_process_died_is_reclaimed(tmp_path, small_store, run_repgeo):
    out = tmp_path / "results.zarr"
    make_partial(tmp_path / "results.zarr.partial", marker_of(out, pid=dead_pid()))
    code, _, err = run_repgeo("summarize", "--store", small_store, "--out", out, "--observables", "norm")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["results.zarr"]
    assert not (out / MARKER).exists() and not (out / "important.txt").exists()


def test_a_requeued_slurm_job_reclaims_its_own_partial(tmp_path, monkeypatch):
    out = tmp_path / "store"
    make_partial(tmp_path / "store.partial", marker_of(out, host="node-a", pid=12345, slurm_job_id="77"))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with Partial(str(out), "repgeo summarize") as partial:
        partial.finish()
    assert sorted(os.listdir(tmp_path)) == ["store"]


def test_a_reused_pid_is_not_taken_for_the_owner(tmp_path):
    out = tmp_path / "store"
    make_partial(tmp_path / "store.partial", marker_of(out, pid=os.getpid(), process_start=1))
    with Partial(str(out), "repgeo summarize") as partial:  # our pid, but another process start time
        partial.finish()
    assert os.listdir(out) == []


@pytest.mark.parametrize("out", ["", "/", ".", ".."])
def test_an_output_that_names_no_new_directory_is_refused(out, tmp_path, small_store, run_repgeo, the_error_line,
                                                          tree_snapshot):
    make_partial(tmp_path / ".partial", None)
    before = tree_snapshot(tmp_path)
    code, _, err = run_repgeo("summarize", "--store", small_store, "--out", out, "--observables", "norm",
                              cwd=tmp_path)
    assert code == 2, err
    the_error_line(err)
    assert tree_snapshot(tmp_path) == before


def test_an_output_under_a_file_is_refused_in_one_line(tmp_path, small_store, run_repgeo, the_error_line):
    (tmp_path / "file").write_text("x")
    code, _, err = run_repgeo("summarize", "--store", small_store, "--out", tmp_path / "file" / "r.zarr")
    assert code == 2 and "not a directory" in the_error_line(err)


@pytest.mark.parametrize("error, words", [(errno.EROFS, "read-only"), (errno.ENOSPC, "no free inodes"),
                                          (errno.EACCES, "permission denied"), (errno.EDQUOT, "quota")])
def test_file_system_refusals_become_one_line(error, words, tmp_path, monkeypatch):
    # Root ignores permissions and this sandbox cannot mount a read-only or inode-starved file system: the
    # errors the kernel would give are injected where the directory is made.
    def refuse(path, *args, **kwargs):
        raise OSError(error, os.strerror(error), path)

    monkeypatch.setattr(os, "mkdir", refuse)
    with pytest.raises(UserError, match=words):
        Partial(str(tmp_path / "out"), "repgeo summarize")


def test_a_store_that_appears_while_the_job_runs_is_not_replaced(tmp_path):
    out = tmp_path / "store"
    with pytest.raises(UserError, match="appeared while this run was writing"):
        with Partial(str(out), "repgeo summarize") as partial:
            out.mkdir()
            (out / "theirs").write_text("x")
            partial.finish()
    assert os.listdir(out) == ["theirs"] and not os.path.exists(partial.path)


@pytest.mark.slow  # two extractions at once (11 s): in the full suite, to keep the quick subset under 10 minutes
def test_concurrent_extractions_on_one_out_one_wins(tmp_path, tiny_model, make_tiny_texts, write_jsonl,
                                                   start_repgeo, same_store, run_repgeo):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in make_tiny_texts(40, seed=5)])
    out = tmp_path / "acts.zarr"
    args = ("extract", "--model", tiny_model, "--prompts", prompts, "--dtype", "float32")
    runs = [start_repgeo(*args, "--out", out) for _ in range(3)]
    outcomes = sorted((run.wait(timeout=300), run.stderr.read()) for run in runs)
    assert [code for code, _ in outcomes] == [0, 2, 2], outcomes
    for _, err in outcomes[1:]:
        assert "Traceback" not in err and len([x for x in err.splitlines() if "error" in x]) == 1, err
    assert sorted(os.listdir(tmp_path)) == ["acts.zarr", "p.jsonl"]  # no partial, lock or debris left
    code, _, err = run_repgeo(*args, "--out", tmp_path / "alone.zarr")
    assert code == 0, err
    same_store(out, tmp_path / "alone.zarr")
